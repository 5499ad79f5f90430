"""The scripts' batch runs over :mod:`ldm.batch`: :func:`plan_batch` turns the flags and the
prompt source (``--prompt``, a text file, a JSONL job file; or the script's own list of labels:
classes, nothing) into the run's items and settings, joins the processes ``torchrun`` started and
consults the journal; :func:`run_batch` makes the images with the script's ``render(items)``.
Every image-making script but ``inpaint.py --indir`` and ``sample_diffusion.py`` (named by their
inputs, or by the original's folder layout) runs through here: one process or many, the output
folder ends up the same."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from ldm.cli.checks import RunPlan, read_prompts, sampler_eta
from ldm.errors import UserInputError

__all__ = ["plan_batch", "run_batch", "image_digest", "batch_call"]

log = logging.getLogger("ldm.scripts")


#: flags that do not change the images, or whose effect the settings already hold resolved or hashed
#: (paths -> file hashes, --plms -> sampler, --precision -> dtype, prompts and seeds -> items)
_NOT_IMAGE_FLAGS = frozenset({
    "outdir", "resume", "skip_grid", "skip_save", "from_file", "prompt", "repeat", "device", "config", "ckpt",
    "safety_checker", "no_safety_check", "steps_flag", "plms", "dpm_solver", "bf16", "precision", "torchscript", "ipex",
    "laion400m", "fast_batch", "exact_batches", "n_samples", "n_rows", "ddim_eta", "init_img", "keep_size", "mask",
    "depth_map", "indir", "list_classes"})


def _plain(value) -> bool:
    """JSON values that compare the same after a round trip."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def file_digest(path) -> str:
    """SHA-256 of a file's bytes (for the settings of a run that reads it)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def batch_call(items: list, sized: bool = False) -> tuple:
    """What a pipeline method takes from one batch of work items with equal settings
    (:class:`ldm.batch.items.WorkItem`): ``(prompts, seeds, keywords)``, the keywords being the
    negative prompts, steps, sampler, scale and eta (and the image size with ``sized``)."""
    s = items[0]
    keywords = dict(negative_prompt=[i.negative_prompt for i in items], steps=s.steps, sampler=s.sampler,
                    scale=s.scale, eta=s.eta)
    if sized:
        keywords.update(width=s.width, height=s.height)
    return [i.prompt for i in items], [i.seed for i in items], keywords


def image_digest(image) -> str:
    """``WxH:MODE:sha256`` of a PIL image's pixels as the script uses them (after any resize), for
    the settings: the same pixels from another file (or format) give the same run."""
    return f"{image.width}x{image.height}:{image.mode}:{hashlib.sha256(image.tobytes()).hexdigest()}"


def _text_data(opt: argparse.Namespace, prompts: list) -> list:
    """The batches of a plain run: one prompt ``n_samples`` times, or the file's prompts
    ``n_samples`` at a time (the last batch may be smaller, unlike the original, which failed then)."""
    if getattr(opt, "from_file", None):
        return [prompts[i:i + opt.n_samples] for i in range(0, len(prompts), opt.n_samples)]
    return [[prompts[0]] * opt.n_samples]


def _items(opt: argparse.Namespace, plan: RunPlan, sized: bool, check_job: Optional[Callable],
           data: Optional[list]) -> tuple:
    """``(items, prompt source text for the settings)``."""
    from ldm.batch.items import check_item_seeds, items_from_batches
    from ldm.batch.jobfile import is_job_file, items_from_jobs, read_jobs
    from ldm.generate.config import check_image_size

    width, height = (opt.W, opt.H) if sized else (None, None)
    if data is not None:  # the script's own labels (classes; "" for a run without prompts)
        items = items_from_batches(opt, data, sampler=plan.sampler, eta=plan.eta, width=width, height=height)
        check_item_seeds(items)
        return items, hashlib.sha256(json.dumps(data).encode()).hexdigest()
    path = getattr(opt, "from_file", None)
    if is_job_file(path):
        if getattr(opt, "repeat", 1) != 1:
            raise UserInputError("--repeat applies to plain prompt files; in a JSONL job file give a line \"n\" "
                                 "(images per iteration) instead")
        jobs = read_jobs(path, size_keys=sized)
        factor = plan.spec.geometry.factor

        def check(settings: dict) -> None:
            check_image_size(factor, settings["W"], settings["H"], names=('"W"', '"H"'))
            if check_job is not None:
                check_job(settings)

        items = items_from_jobs(path, jobs, opt, sampler=plan.sampler,
                                eta_for=lambda name: sampler_eta(opt, name), check=check)
        if not sized:
            items = [replace(item, width=None, height=None) for item in items]
        log.info("read %d job(s) from %s: %d image(s)", len(jobs), path, len(items))
        return items, file_digest(path)
    prompts = read_prompts(opt)
    items = items_from_batches(opt, _text_data(opt, prompts), sampler=plan.sampler, eta=plan.eta, width=width,
                               height=height)
    check_item_seeds(items)
    return items, hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def plan_batch(opt: argparse.Namespace, plan: RunPlan, method: str, *, sized: bool = True,
               extra: Optional[dict] = None, check: Optional[Callable[[dict], None]] = None,
               data: Optional[list] = None):
    """The run's items, settings and journal plan, before any model is loaded.

    :param method: the pipeline method the script runs (a key of :data:`ldm.families.METHODS`).
    :param sized: whether the flags (and job lines) set the image size; False where an input
        image does (img2img, upscale, depth2img, inpaint).
    :param extra: more settings that change the images (e.g. the init image's hash, strength;
        flags with plain values are in the settings anyway, see :data:`_NOT_IMAGE_FLAGS`).
    :param check: more checks of a JSONL line's resolved settings (``steps``, ``sampler``, ``scale``,
        ``eta``, ``H``, ``W``); raises :class:`UserInputError`.
    :param data: for a script without prompts: the labels of one iteration's batches (each label
        becomes an item's ``prompt``: a class for sample_class, ``""`` for superres), instead of
        ``--prompt``/``--from-file``.
    :returns: a :class:`ldm.batch.BatchJob`; ``plan.device`` becomes this process's device.
    :raises UserInputError: bad job file lines (``line N: ...``), a journal that refuses the run.
    """
    from ldm.batch import BatchJob, DistContext, items_digest, prepare
    from ldm.metadata import model_hash

    ctx = DistContext.from_env()
    items, prompts_digest = _items(opt, plan, sized, check, data)
    digest = model_hash(opt.ckpt)
    settings = {"method": method, "config": file_digest(opt.config), "model": digest,
                "use_ema": bool(opt.use_ema), "precision": str(plan.dtype).replace("torch.", ""),
                "device": plan.device.type, "exact_batches": plan.exact_batches, "safety": plan.safety_status
                if plan.checker_folder is None else "checker", "prompts": prompts_digest, "seed": opt.seed,
                "steps": opt.steps, "sampler": plan.sampler, "scale": opt.scale, "eta": plan.eta,
                "negative_prompt": getattr(opt, "negative_prompt", ""), "n_iter": opt.n_iter,
                "fixed_code": bool(opt.fixed_code),
                "H": opt.H if sized else None, "W": opt.W if sized else None,
                "grid_rows": opt.n_rows or opt.n_samples, "items": items_digest(items), **(extra or {})}
    if not plan.exact_batches:  # batched networks: the batch size changes the float rounding
        settings["n_samples"] = opt.n_samples
    for name, value in sorted(vars(opt).items()):  # any other flag (prompt syntax, LoRA, SDXL's, ...) counts
        if name not in settings and name not in _NOT_IMAGE_FLAGS and _plain(value):
            settings[name] = list(value) if isinstance(value, tuple) else value
    plan.device = ctx.device_for(plan.device)
    ctx.start(plan.device)
    job = BatchJob(outdir=plan.outdir, sample_dir=plan.outdir / "samples", items=items, settings=settings, ctx=ctx,
                   batch_size=opt.n_samples, grid_rows=opt.n_rows or opt.n_samples, model_hash=digest)
    try:
        return prepare(job, resume=bool(getattr(opt, "resume", False)), save_samples=not opt.skip_save)
    except BaseException:
        ctx.close()
        raise


def run_batch(job, render: Callable[[list], object], writer) -> None:
    """Make the images of ``job`` (this rank's share) with ``render(items) -> GenerationResult``."""
    from ldm.batch import run_items

    try:
        run_items(job, render, writer)
    finally:
        job.ctx.close()

