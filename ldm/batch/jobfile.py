"""JSONL job files for ``--from-file``: one JSON object per line with the prompt and, optionally,
its own settings. Every line is checked before anything runs; an error names its line.

Keys: ``prompt`` (required), ``negative_prompt``, ``seed``, ``steps``, ``scale``, ``sampler``,
``H``, ``W``, ``n`` (images of this line per iteration, default 1). Unset keys take the flags'
values. Seeds: a line without ``seed`` gives its images ``--seed + k`` (``k`` counting every image
of the run, as plain prompt files); a line with ``seed`` gives image ``j`` of iteration ``i`` the
seed ``seed + i * n + j`` (``seed + j`` in every iteration with ``--fixed_code``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

from ldm.batch.items import MAX_SEED, WorkItem
from ldm.errors import UserInputError

__all__ = ["JOB_KEYS", "is_job_file", "read_user_text", "read_jobs", "items_from_jobs"]

JOB_KEYS = ("prompt", "negative_prompt", "seed", "steps", "scale", "sampler", "H", "W", "n")
SIZE_KEYS = ("H", "W")


def is_job_file(path: Optional[str]) -> bool:
    """A ``--from-file`` path ending in ``.jsonl`` (or ``.ndjson``) is a job file; anything else
    (and ``-``, standard input) is a plain prompt list."""
    return bool(path) and path != "-" and Path(path).suffix.lower() in (".jsonl", ".ndjson")


def _int(value, key: str, minimum: int, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'"{key}" must be an integer, got {json.dumps(value)}')
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
        raise ValueError(f'"{key}" must be {bound}, got {value}')
    return value


def _check_line(obj, size_keys: bool) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object like {{\"prompt\": \"a red cube\"}}, got {type(obj).__name__}")
    allowed = JOB_KEYS if size_keys else tuple(k for k in JOB_KEYS if k not in SIZE_KEYS)
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        hint = " (this script takes the size from its input image)" if set(unknown) & set(SIZE_KEYS) else ""
        raise ValueError(f'unknown key "{unknown[0]}"{hint}; the keys are: {", ".join(allowed)}')
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError('"prompt" is missing or empty; every line needs "prompt": "..."')
    job = {"prompt": prompt.strip()}
    if "negative_prompt" in obj:
        if not isinstance(obj["negative_prompt"], str):
            raise ValueError('"negative_prompt" must be a string')
        job["negative_prompt"] = obj["negative_prompt"]
    if "sampler" in obj:
        if not isinstance(obj["sampler"], str):
            raise ValueError('"sampler" must be a string (a --sampler name)')
        job["sampler"] = obj["sampler"]
    if "scale" in obj:
        scale = obj["scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f'"scale" must be a number, got {json.dumps(scale)}')
        job["scale"] = float(scale)
    for key, minimum in (("seed", 0), ("steps", 1), ("H", 1), ("W", 1), ("n", 1)):
        if key in obj:
            job[key] = _int(obj[key], key, minimum, MAX_SEED if key == "seed" else None)
    return job


def read_user_text(p: Path, kind: str, what: str) -> str:
    """The UTF-8 text of a file the user named (``kind``: "prompt file", "job file"; ``what`` it
    should be), or a one-line error."""
    if not p.is_file():
        raise UserInputError(f"{kind} {p}: {'is a folder' if p.is_dir() else 'file not found'}; pass --from-file "
                             f"with {what}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserInputError(f"{kind} {p} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise UserInputError(f"{kind} {p} cannot be read ({exc.strerror or exc})") from None


def read_jobs(path: str, *, size_keys: bool = True) -> list:
    """The checked lines of a job file as ``(line number, dict)``; blank lines are skipped.

    :param size_keys: whether ``H``/``W`` are allowed (not for scripts sized by an input image).
    :raises UserInputError: ``job file PATH, line N: ...`` for the first bad line.
    """
    p = Path(path)
    text = read_user_text(p, "job file", "a JSONL file, one JSON object per line")
    jobs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"job file {p}, line {number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                 "write one JSON object per line") from None
        try:
            jobs.append((number, _check_line(obj, size_keys)))
        except ValueError as exc:
            raise UserInputError(f"job file {p}, line {number}: {exc}") from None
    if not jobs:
        raise UserInputError(f"job file {p} has no jobs (empty or only blank lines); put one JSON object per line")
    return jobs


def items_from_jobs(path: str, jobs: Sequence, opt, *, sampler: str, eta_for: Callable[[str], Optional[float]],
                    check: Callable[[dict], None]) -> list:
    """The items of a job file: for each iteration, each line's ``n`` images.

    :param sampler: the run's sampler (for lines without ``sampler``).
    :param eta_for: the eta a sampler runs with under the flags (raises for a sampler without eta
        when ``--ddim_eta`` is set).
    :param check: checks a line's resolved settings (``steps``, ``sampler``, ``H``, ``W``).
    :raises UserInputError: ``job file PATH, line N: ...``.
    """
    from ldm.models.diffusion.registry import check_steps, sampler_info

    resolved = []
    for number, job in jobs:
        try:
            name = sampler_info(job.get("sampler", sampler)).name
            steps = job.get("steps", opt.steps)
            check_steps(name, steps)
            settings = {"steps": steps, "sampler": name, "scale": job.get("scale", opt.scale), "eta": eta_for(name),
                        "H": job.get("H", getattr(opt, "H", None)), "W": job.get("W", getattr(opt, "W", None))}
            check(settings)
        except UserInputError as exc:
            raise UserInputError(f"job file {path}, line {number}: {exc}") from None
        resolved.append((number, job, settings))
    items, k = [], 0
    for iteration in range(opt.n_iter):
        for number, job, s in resolved:
            n = job.get("n", 1)
            for j in range(n):
                if "seed" in job:
                    seed = job["seed"] + (j if opt.fixed_code else iteration * n + j)
                else:
                    seed = opt.seed + (j if opt.fixed_code else k)
                if seed > MAX_SEED:
                    raise UserInputError(f"job file {path}, line {number}: seed {seed} of its image {j} is out of "
                                         f"range; use seeds up to {MAX_SEED}")
                items.append(WorkItem(k, job["prompt"], seed, job.get("negative_prompt", opt.negative_prompt),
                                      int(s["steps"]), s["sampler"], float(s["scale"]), s["eta"], s["W"], s["H"]))
                k += 1
    return items
