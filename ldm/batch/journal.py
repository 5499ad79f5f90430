"""The journal of an output folder, ``OUTDIR/journal.jsonl``: what makes a run resumable.

One JSON object per line, appended, never rewritten:

* a run header when a run starts: ``{"run": R, "settings_hash": ..., "settings": {...},
  "items": N, "first_number": B, "token": ..., "created": ...}``;
* one line per finished image, appended only after the image is complete under its final name
  (written to a temporary file, then published atomically): ``{"run": R, "item": k, "prompt": ...,
  "seed": ..., "settings_hash": ..., "file": "samples/0000k.png", "sha256": ..., "record": {...},
  "time": ...}``.

Image ``k`` of run ``R`` is ``samples/{B + k:05}.png``: ``B`` is the next free number when the
run starts (0 in a fresh folder; after the files an earlier run left), so a single run looks as
it always did, and names never depend on which process finished first. Several processes append
to the file; each line is one ``write`` under an exclusive ``fcntl`` lock, then ``fsync``.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ldm.errors import UserInputError

__all__ = ["JOURNAL_NAME", "SUMMARY_NAME", "RUN_FILES", "RunState", "Plan", "read_journal", "settings_hash",
           "decide", "append_line", "write_header", "next_number", "now"]

log = logging.getLogger("ldm.scripts")

JOURNAL_NAME = "journal.jsonl"
SUMMARY_NAME = "summary.json"
#: files this package keeps in an output folder (not counted when numbering grids)
RUN_FILES = (JOURNAL_NAME, SUMMARY_NAME)

_NUMBERED = re.compile(r"^(\d+)(?:-\d+)?\.[A-Za-z]+$")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def settings_hash(settings: dict) -> str:
    """First 16 hex digits of the SHA-256 of the settings as canonical JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class RunState:
    """A run as the journal has it: its header and the lines of its finished images by index."""

    header: dict
    done: dict = field(default_factory=dict)

    @property
    def run(self) -> int:
        return int(self.header["run"])

    @property
    def complete(self) -> bool:
        return len(self.done) >= int(self.header["items"])


def read_journal(path: Path) -> list:
    """The runs of a journal, oldest first. A line that does not parse (a write cut short by a
    crash) is skipped with a warning."""
    if not path.is_file():
        return []
    runs: dict = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"journal {path} cannot be read ({exc}); move it away or choose another --outdir") \
            from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            run = int(obj["run"])
        except (ValueError, KeyError, TypeError):
            log.warning("journal %s, line %d does not parse (cut short by a crash?): skipped", path, number)
            continue
        if "item" not in obj:
            runs[run] = RunState(obj)
        elif run in runs:
            runs[run].done.setdefault(int(obj["item"]), obj)
    return [runs[k] for k in sorted(runs)]


def next_number(folder: Path) -> int:
    """The first number of a new run's images in ``folder``: after every entry there (as the
    reference counted them) and after the highest numbered file, so no name of the run is taken."""
    if not folder.is_dir():
        return 0
    count, highest = 0, -1
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith(".") or entry.is_dir():
                continue
            count += 1
            match = _NUMBERED.match(entry.name)
            if match:
                highest = max(highest, int(match.group(1)))
    return max(count, highest + 1)


@dataclass
class Plan:
    """What the journal says this run is: a new run ``run`` starting at ``first_number``, or the
    unfinished (or finished) run ``run`` resumed, with its finished items."""

    run: int
    first_number: int
    new: bool
    done: dict
    token: str
    header: Optional[dict] = None


def _differences(old: dict, new: dict) -> list:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


def decide(outdir: Path, sample_dir: Path, settings: dict, n_items: int, resume: bool) -> Plan:
    """Whether this is a new run or a resumed one, before anything is written.

    :raises UserInputError: ``--resume`` with other settings than the journal's last run; no
        ``--resume`` while that run is unfinished.
    """
    journal = outdir / JOURNAL_NAME
    runs = read_journal(journal)
    digest = settings_hash(settings)
    last = runs[-1] if runs else None
    if last is not None and resume:
        if last.header.get("settings_hash") != digest:
            changed = ", ".join(_differences(last.header.get("settings", {}), settings)) or "settings"
            raise UserInputError(f"--resume: the settings differ from those of the run in {journal} (changed: "
                                 f"{changed}); pass the same flags and prompt file as that run, or choose another "
                                 "--outdir")
        return Plan(last.run, int(last.header["first_number"]), False, last.done, last.header.get("token", ""),
                    last.header)
    if last is not None and not last.complete:
        raise UserInputError(f"--outdir {outdir} holds an unfinished run ({len(last.done)} of "
                             f"{last.header['items']} images done, see {JOURNAL_NAME}); pass --resume to finish it, "
                             "or choose another --outdir")
    if resume:
        log.info("--resume: no journal in %s; starting a new run", outdir)
    run = last.run + 1 if last is not None else 0
    return Plan(run, next_number(sample_dir), True, {}, secrets.token_hex(8))


def write_header(outdir: Path, plan: Plan, settings: dict, n_items: int) -> dict:
    header = {"run": plan.run, "settings_hash": settings_hash(settings), "settings": settings, "items": n_items,
              "first_number": plan.first_number, "token": plan.token, "created": now()}
    outdir.mkdir(parents=True, exist_ok=True)
    append_line(outdir / JOURNAL_NAME, header)
    plan.header = header
    return header


def append_line(path: Path, obj: dict) -> None:
    """Append one JSON line: a single ``write`` under an exclusive lock, then ``fsync``. A line
    left without its newline by a crash is ended first, so the new line stays readable."""
    try:
        import fcntl
    except ImportError:  # Windows: no fcntl; one process per folder there
        fcntl = None
    data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.lockf(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the lock
