"""What the scripts share: argument definitions (:mod:`.args`), every input check in one place
(:mod:`.checks`), logging setup and the ``main()`` wrapper that turns user mistakes into one
``error: ...`` line and exit code 2 instead of a traceback.

Nothing here imports torch at module level, so ``--help`` and argument errors are instant; the
checks that need the library (config, sizes, files) run before any model is loaded.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

# the scripts use every piece as cli.<name>
from ldm.cli.args import *  # noqa: F401,F403
from ldm.cli.args import EXIT_USER_ERROR
from ldm.cli.checks import *  # noqa: F401,F403
from ldm.cli.checks import RunPlan
from ldm.cli.batch import batch_call, image_digest, plan_batch, run_batch  # noqa: F401  (cli.<name> in the scripts)
from ldm.errors import UserInputError  # noqa: F401  (cli.UserInputError in the scripts)

log = logging.getLogger("ldm.scripts")


def load_pipeline(opt: argparse.Namespace, plan: RunPlan, job=None):
    """The safety checker, then the model, on the device and in the precision of ``plan``.

    :param job: the :func:`plan_batch` job of a batch run: its model hash is reused, and the
        sampler's per-batch progress bars are off when the run shows one bar over all images.
    """
    from ldm.generate import StableDiffusion, load_safety_checker

    checker = None
    if plan.checker_folder is not None:
        log.info("loading the safety checker from %s", plan.checker_folder)
        checker = load_safety_checker(plan.checker_folder, plan.device)
    exact = plan.exact_batches if plan.exact_batches is not None else not getattr(opt, "fast_batch", False)
    sd = StableDiffusion.from_files(plan.config, opt.ckpt, device=plan.device, precision=plan.dtype,
                                    use_ema=True if opt.use_ema else None, safety_checker=checker,
                                    safety_status=plan.safety_status, exact_batches=exact,
                                    hash_checkpoint=job is None, progress=job is None or job.sampler_bars)
    if job is not None:
        sd.model_hash = job.model_hash
    sd.text.configure(getattr(opt, "prompt_syntax", None), getattr(opt, "embeddings", None),
                      getattr(opt, "lora", None) or (), getattr(opt, "lora_dir", None))  # ldm.prompts
    from ldm.cli.sdxl import attach_sdxl

    attach_sdxl(opt, plan, sd)  # SDXL: micro-conditioning, --refiner
    return sd


def report_saved(paths: Sequence[Path], records: Sequence) -> None:
    for path, record in zip(paths, records):
        note = " (flagged by the safety checker: placeholder saved)" if record.nsfw else ""
        log.info("%s: seed %d%s", path, record.seed, note)
    if not paths:
        for record in records:
            if record.nsfw:
                log.warning("image of seed %d flagged by the safety checker", record.seed)


def _is_user_error(exc: BaseException) -> bool:
    """A :class:`UserInputError` or a :class:`ldm.checkpoint.CheckpointError` (looked up only when
    that module is loaded, so an early error does not import torch)."""
    if isinstance(exc, UserInputError):
        return True
    checkpoint = sys.modules.get("ldm.checkpoint")
    return checkpoint is not None and isinstance(exc, checkpoint.CheckpointError)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname}: {text}"


_handler: Optional[logging.Handler] = None


def setup_logging(level: int = logging.INFO) -> None:
    """Messages on stderr: plain for INFO, ``WARNING: ...`` above (replaces the handler an earlier
    call installed, and only that one)."""
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(_Formatter("%(message)s"))
    root.addHandler(_handler)
    root.setLevel(level)
    # the samplers log their tables at INFO: useful when debugging, noise in a script's output
    logging.getLogger("ldm.models.diffusion").setLevel(max(level, logging.WARNING))


def run_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], None],
             argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and call ``run(opt)``; user errors become ``error: <one line>`` and exit code 2.

    :returns: the exit code (0 on success).
    """
    opt = parser.parse_args(argv)
    setup_logging()
    if os.environ.get("RANK", "0") != "0":  # torchrun's other ranks: their own images and warnings only
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("ldm.batch").setLevel(logging.INFO)
    try:
        run(opt)
    except Exception as exc:  # noqa: BLE001 - only user errors are handled, everything else is re-raised
        if not _is_user_error(exc):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        # under torchrun the ranks of a machine hit the same errors: one of them says it
        if os.environ.get("LOCAL_RANK", "0") == "0" or getattr(exc, "every_rank", False):
            print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return 0
