"""Running the items of a run: :func:`prepare` (the journal's decision, agreed by every process
before anything is written) and :func:`run_items` (this rank's share, batch by batch, each image
published under its item's name and then journaled; rank 0 writes the grid and the summary).

Rank ``r`` of ``W`` makes the unfinished items ``r, r + W, r + 2W, ...`` (in index order), so the
shares differ by one image at most. A first SIGINT or SIGTERM lets the current batch finish and be
saved, then the rank stops (a second Ctrl-C, outside torchrun, stops at once: torchrun sends its
own signal after the terminal's, and kills what is left after its grace period).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ldm.batch.dist import DistContext, RankError
from ldm.batch.items import group_batches
from ldm.batch.journal import (JOURNAL_NAME, RUN_FILES, SUMMARY_NAME, Plan, append_line, decide, now, read_journal,
                               settings_hash, write_header)
from ldm.errors import UserInputError

__all__ = ["BatchJob", "RunStopped", "prepare", "run_items", "file_name", "sha256_file"]

log = logging.getLogger("ldm.batch")


class RunStopped(KeyboardInterrupt):
    """The run stopped on a signal after saving what it had made (the scripts exit with 130)."""


@dataclass
class BatchJob:
    """A prepared run: its items and settings, where it writes, and the journal's plan (None with
    ``--skip_save``: then nothing is journaled and the images only go into the grid)."""

    outdir: Path
    sample_dir: Path
    items: list
    settings: dict
    ctx: DistContext
    batch_size: int
    grid_rows: int
    model_hash: Optional[str] = None
    plan: Optional[Plan] = None

    @property
    def digest(self) -> str:
        return settings_hash(self.settings)

    @property
    def sampler_bars(self) -> bool:
        """Per-batch sampler progress bars: only in a single process whose run is one batch (else
        rank 0 shows one bar over the whole run)."""
        pending = [i for i in self.items if not self.plan or i.index not in self.plan.done]
        return not self.ctx.distributed and len(list(group_batches(pending, self.batch_size))) <= 1


def file_name(plan: Plan, index: int) -> str:
    return f"{plan.first_number + index:05}.png"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prepare(job: BatchJob, *, resume: bool, save_samples: bool) -> BatchJob:
    """Decide new or resumed run before anything is loaded or written (rank 0 reads the journal;
    every rank gets its answer). :func:`run_items` writes the run header."""
    ctx = job.ctx
    if not save_samples:
        if resume:
            raise UserInputError("--resume needs the saved images; drop --skip_save")
        if ctx.distributed:
            raise UserInputError("--skip_save cannot be used with several processes (the grid is made from the "
                                 "saved images); drop --skip_save, or run one process")
        return job
    answer = None
    if ctx.is_main:
        try:
            answer = decide(job.outdir, job.sample_dir, job.settings, len(job.items), resume)
        except UserInputError as exc:
            answer = exc
    answer = ctx.broadcast(answer)
    if isinstance(answer, UserInputError):
        raise UserInputError(str(answer))
    job.plan = answer
    if not job.plan.new and ctx.is_main:
        log.info("--resume: run %d in %s, %d of %d images already done", job.plan.run, job.outdir,
                 len(job.plan.done), len(job.items))
    return job


def _start(job: BatchJob) -> None:
    """Rank 0 writes the header of a new run (or clears a killed run's temporary files); then every
    rank checks that it sees the run (the output folder must be shared by every machine)."""
    ctx = job.ctx
    if ctx.is_main:
        if job.plan.new:
            write_header(job.outdir, job.plan, job.settings, len(job.items))
        else:
            _remove_stale_temporaries(job.sample_dir)
    ctx.barrier()
    if not ctx.is_main:
        runs = read_journal(job.outdir / JOURNAL_NAME)
        if not any(r.header.get("token") == job.plan.token for r in runs):
            raise RankError(f"rank {ctx.rank} on {socket.gethostname()} does not see the run rank 0 started in "
                            f"{job.outdir / JOURNAL_NAME}: put --outdir on a file system every machine of the run "
                            "shares")


def _remove_stale_temporaries(folder: Path) -> None:
    """Hidden ``.tmp-*.tmp`` files a killed run left (never under an image's name)."""
    if folder.is_dir():
        for p in folder.glob(".tmp-*.tmp"):
            p.unlink(missing_ok=True)


class _StopOnSignal:
    """SIGINT/SIGTERM set a flag; the loop stops after the batch in progress."""

    def __init__(self, ctx: DistContext):
        self.ctx = ctx
        self.requested = False
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT and not os.environ.get("TORCHELASTIC_RUN_ID"):
            raise KeyboardInterrupt
        if not self.requested:
            log.warning("%s%s: finishing the image(s) in progress, then stopping (run again with --resume to "
                        "go on)", self.ctx.tag, signal.Signals(signum).name)
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class _Progress:
    """Rank 0's bar over the whole run (every rank's images, read from the journal as they are
    appended): images done / total, images per minute, ETA."""

    def __init__(self, job: BatchJob, enabled: bool):
        self.job = job
        self.bar = None
        self._stop = threading.Event()
        self._thread = None
        self._seen = set(job.plan.done) if job.plan else set()
        self._offset = 0
        self._t0 = time.monotonic()
        self._start = len(self._seen)
        if not enabled:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=len(job.items), initial=len(self._seen), unit="img", dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
        if job.plan is not None:
            path = job.outdir / JOURNAL_NAME
            self._offset = path.stat().st_size if path.exists() else 0
            self._thread = threading.Thread(target=self._follow, daemon=True)
            self._thread.start()

    def _follow(self) -> None:
        while not self._stop.wait(0.5):
            self.poll()

    def poll(self) -> None:
        path = self.job.outdir / JOURNAL_NAME
        try:
            with open(path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if obj.get("run") == self.job.plan.run and "item" in obj:
                self._seen.add(obj["item"])
        self.set(len(self._seen))

    def set(self, n: int) -> None:
        if self.bar is None or n == self.bar.n:
            return
        minutes = (time.monotonic() - self._t0) / 60
        self.bar.n = n
        if minutes > 0 and n > self._start:
            self.bar.set_postfix_str(f"{(n - self._start) / minutes:.1f} img/min", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.poll()
        if self.bar is not None:
            self.bar.close()


def run_items(job: BatchJob, render: Callable[[list], object], writer) -> dict:
    """Make this rank's share of the unfinished items and write them; then (rank 0) the grid and
    the summary.

    :param render: makes one batch of items, returns a ``GenerationResult`` in item order.
    :returns: this run's summary entry (on every rank).
    :raises RunStopped: after a signal; :raises UserInputError: when images failed (their items
        stay unfinished, so ``--resume`` makes them).
    """
    from ldm.generate.records import GenerationError

    ctx, plan = job.ctx, job.plan
    if plan is not None:
        _start(job)
    done_before = set(plan.done) if plan else set()
    pending = [item for item in job.items if item.index not in done_before]
    mine = pending[ctx.rank::ctx.world_size]
    stats = {"rank": ctx.rank, "host": socket.gethostname(), "done": 0, "failed": 0, "seconds": 0.0}
    failures: list = []
    t0 = time.monotonic()
    batches = list(group_batches(mine, job.batch_size))
    log.info("%s%d image(s) to make here (%d of %d left in the run)", ctx.tag, len(mine), len(pending),
             len(job.items))
    show_bar = ctx.is_main and not job.sampler_bars
    progress = _Progress(job, show_bar)
    with _StopOnSignal(ctx) as stop, _redirect_logging(progress.bar is not None):
        try:
            for batch in batches:
                if stop.requested:
                    break
                try:
                    result = render(batch)
                except GenerationError as exc:
                    stats["failed"] += len(batch)
                    failures += [{"item": i.index, "seed": i.seed, "prompt": i.prompt, "error": str(exc)}
                                 for i in batch]
                    log.warning("%simages %s failed: %s", ctx.tag, ", ".join(str(i.index) for i in batch), exc)
                    continue
                for item, image, record in zip(batch, result.images, result.records):
                    path = _save(job, writer, item, image, record)
                    stats["done"] += 1
                    if path is not None:
                        note = " (flagged by the safety checker: placeholder saved)" if record.nsfw else ""
                        log.info("%s%s: seed %d%s", ctx.tag, path, record.seed, note)
                if plan is None:
                    progress.set(stats["done"])
        finally:
            progress.close()
    stats["seconds"] = round(time.monotonic() - t0, 3)
    stats["images_per_minute"] = round(60 * stats["done"] / stats["seconds"], 2) if stats["seconds"] else None
    stats["failures"] = failures
    if stop.requested and ctx.distributed:
        per_rank = [stats]  # the others may be gone: no collective after a signal
    else:
        per_rank = ctx.gather(stats)
    summary = _finish(job, writer, per_rank, stopped=stop.requested) if ctx.is_main else {}
    if stop.requested:
        raise RunStopped()
    failed = sum(s["failed"] for s in per_rank)
    if failed:
        first = next(f for s in per_rank for f in s["failures"])
        raise UserInputError(f"{failed} of {len(job.items)} images failed ({first['error']}); the others are saved; "
                             "after fixing that, run again with --resume to make the missing ones")
    return summary


def _save(job: BatchJob, writer, item, image, record) -> Optional[Path]:
    """Publish one image under its item's name and journal it (with ``--skip_save``: keep it for
    the grid only). A file already under that name (a resumed run killed between publishing and
    journaling) is taken when its bytes are the ones just made; else the image gets ``-1``."""
    if job.plan is None:
        writer.add(_One(image, record))
        return None
    name = file_name(job.plan, item.index)
    target = job.sample_dir / name
    existing = sha256_file(target) if target.exists() else None
    if existing is not None and existing == hashlib.sha256(writer.encode(image, record)).hexdigest():
        path, digest = target, existing
    else:
        if existing is not None:
            log.warning("%s%s exists and is not image %d of this run: it is kept, the image goes beside it",
                        job.ctx.tag, target, item.index)
        path = writer.write(image, record, job.sample_dir, name=name)
        digest = sha256_file(path)
    from dataclasses import asdict

    append_line(job.outdir / JOURNAL_NAME,
                {"run": job.plan.run, "item": item.index, "prompt": item.prompt, "seed": item.seed,
                 "settings_hash": job.digest, "file": path.relative_to(job.outdir).as_posix(), "sha256": digest,
                 "record": asdict(record), "time": now()})
    return path


class _One:
    """A one-image ``GenerationResult`` for :meth:`ImageWriter.add`."""

    def __init__(self, image, record):
        self.images, self.records = [image], [record]


class _redirect_logging:
    """Log lines above rank 0's bar instead of through it."""

    def __init__(self, active: bool):
        self._cm = None
        if active:
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._cm = logging_redirect_tqdm()

    def __enter__(self):
        if self._cm is not None:
            self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc) if self._cm is not None else False


def _finish(job: BatchJob, writer, per_rank: Sequence[dict], stopped: bool) -> dict:
    """Rank 0: the grid once every item is done, and the summary."""
    from ldm.image_save import count_existing

    runs = {r.run: r for r in read_journal(job.outdir / JOURNAL_NAME)} if job.plan else {}
    state = runs.get(job.plan.run) if job.plan else None
    done = len(state.done) if state else sum(s["done"] for s in per_rank)
    complete = done >= len(job.items)
    summary_path = job.outdir / SUMMARY_NAME
    previous = _read_summary(summary_path)
    key = str(job.plan.run) if job.plan else None
    entry = previous.get("runs", {}).get(key, {}) if key else {}
    grid = entry.get("grid")
    if complete and grid is None:
        if state is not None:
            _load_grid_images(job, writer, state)
        start = count_existing(job.outdir) - sum((job.outdir / n).exists() for n in RUN_FILES) \
            if job.outdir.is_dir() else 0
        path = writer.write_grid(job.grid_rows, start=start)
        if path is not None:
            grid = path.relative_to(job.outdir).as_posix()
            log.info("grid: %s", path)
    session = {"finished": now(), "world_size": job.ctx.world_size, "interrupted": stopped,
               "per_rank": [{k: v for k, v in s.items() if k != "failures"} for s in per_rank],
               "failures": [f for s in per_rank for f in s["failures"]]}
    entry = {"run": job.plan.run if job.plan else None, "settings_hash": job.digest, "items": len(job.items),
             "done": done, "complete": complete, "grid": grid, "sessions": entry.get("sessions", []) + [session]}
    if job.plan is not None:
        previous.setdefault("runs", {})[key] = entry
        _write_json(summary_path, previous)
    log.info("%d of %d images done%s; your samples are in %s", done, len(job.items),
             "" if complete else " (run again with --resume to finish)", job.outdir)
    return entry


def _load_grid_images(job: BatchJob, writer, state) -> None:
    """The grid's images and records in item order, from the saved files (every rank's, every
    session's): the grid is the same whichever processes made the images."""
    if not writer.save_grid:
        return
    import numpy as np
    from PIL import Image

    from ldm.generate.records import ImageRecord

    writer.grid_images, writer.grid_records = [], []
    for k in range(len(job.items)):
        line = state.done[k]
        with Image.open(job.outdir / line["file"]) as im:
            writer.grid_images.append(np.asarray(im.convert("RGB")))
        writer.grid_records.append(ImageRecord(**line["record"]))


def _read_summary(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, obj: dict) -> None:
    """Replace ``path`` atomically (temporary file, then ``os.replace``)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
