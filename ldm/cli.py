"""What the three scripts share: argument definitions, every input check in one place, logging
setup and the ``main()`` wrapper that turns user mistakes into one ``error: ...`` line and exit
code 2 instead of a traceback.

Nothing here imports torch at module level, so ``--help`` and argument errors are instant; the
checks that need the library (config, sizes, files) run before any model is loaded.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from ldm.errors import UserInputError

log = logging.getLogger("ldm.scripts")

EXIT_USER_ERROR = 2

DEFAULT_PROMPT = "a painting of a virus monster playing guitar"
SD_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
SD_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
LAION_CONFIG = "configs/latent-diffusion/txt2img-1p4B-eval.yaml"
LAION_CKPT = "models/ldm/text2img-large/model.ckpt"
LDM_INPAINT_CONFIG = "models/ldm/inpainting_big/config.yaml"
LDM_INPAINT_CKPT = "models/ldm/inpainting_big/last.ckpt"
SAFETY_CHECKER_DIR = "models/safety_checker"
PRECISION_CHOICES = ("autocast", "full", "auto", "fp32", "fp16", "bf16")

SEED_HELP = ("seed of the first image; image k of the run (counting over all batches and iterations) uses "
             "seed + k, printed and stored in its PNG, so it can be re-made alone with --seed <its seed> "
             "--n_samples 1 --n_iter 1 and its prompt")


# --------------------------------------------------------------------------------------------
# Parser pieces
# --------------------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag with its default; a help text that already names its default is left alone."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default:" in text or "%(default)" in text:
            return text
        if action.default is None and action.option_strings and action.nargs != 0:
            return text + " (default: none)"
        if action.default == "":
            return text + " (default: empty)"
        return super()._get_help_string(action)


def make_parser(prog_doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of the script's docstring and whose
    epilog is the rest."""
    head, _, rest = prog_doc.strip().partition("\n\n")
    return argparse.ArgumentParser(description=head, epilog=rest or None, formatter_class=HelpFormatter)


def add_prompt_args(parser: argparse.ArgumentParser, default: Optional[str] = DEFAULT_PROMPT,
                    from_file: bool = True) -> None:
    parser.add_argument("--prompt", type=str, nargs="?", default=default, help="the prompt to render")
    parser.add_argument("--negative_prompt", type=str, default="",
                        help="what to steer away from: the unconditional prompt of classifier-free guidance")
    if from_file:
        parser.add_argument("--from-file", dest="from_file", type=str, default=None,
                            help="read prompts from this file, one per line (blank lines skipped; '-' reads "
                                 "stdin); each prompt gives one image per iteration, --n_samples at a time")


def add_output_args(parser: argparse.ArgumentParser, outdir: str) -> None:
    parser.add_argument("--outdir", type=str, nargs="?", default=outdir, help="folder to write results to")
    parser.add_argument("--skip_grid", action="store_true",
                        help="do not save a grid, only individual samples")
    parser.add_argument("--skip_save", action="store_true", help="do not save individual samples")


def add_sampling_args(parser: argparse.ArgumentParser, *, steps_flags: Sequence[str] = ("--ddim_steps",),
                      steps: int = 50, scale: float = 7.5, n_samples: int = 3, n_iter: int = 2,
                      seed: int = 42) -> None:
    from ldm.models.diffusion.registry import SAMPLER_DESCRIPTIONS

    parser.add_argument(*steps_flags, dest="steps", type=int, default=steps, help="number of sampling steps")
    parser.set_defaults(steps_flag=steps_flags[0])
    parser.add_argument("--sampler", choices=tuple(SAMPLER_DESCRIPTIONS), default=None,
                        help="sampling method (default: ddim; --plms and --dpm_solver are aliases): "
                             + "; ".join(f"{k}: {v}" for k, v in SAMPLER_DESCRIPTIONS.items()))
    parser.add_argument("--plms", action="store_true", help="use PLMS sampling (same as --sampler plms)")
    parser.add_argument("--dpm_solver", action="store_true",
                        help="use DPM-Solver sampling (same as --sampler dpm_solver)")
    parser.add_argument("--ddim_eta", type=float, default=0.0,
                        help="DDIM eta (0 is deterministic); with --sampler euler_a its noise amount "
                             "(0 there means the default, 1)")
    parser.add_argument("--fixed_code", action="store_true",
                        help="use the same start noise in every iteration: image k of every batch uses seed + k")
    parser.add_argument("--n_iter", type=int, default=n_iter, help="how often to sample")
    parser.add_argument("--n_samples", type=int, default=n_samples,
                        help="how many images to make at once for each prompt, a.k.a. batch size")
    parser.add_argument("--n_rows", type=int, default=0, help="images per row in the grid (0: n_samples)")
    parser.add_argument("--scale", type=float, default=scale,
                        help="classifier-free guidance scale: eps = eps(x, negative) + scale * (eps(x, prompt) - "
                             "eps(x, negative))")
    parser.add_argument("--seed", type=int, default=seed, help=SEED_HELP)
    parser.add_argument("--fast_batch", action="store_true",
                        help="run each batch through the networks at once: faster on GPUs, but an image then "
                             "differs by float rounding from the one its seed gives alone (by default images are "
                             "computed one at a time and are bit-identical)")


def add_size_args(parser: argparse.ArgumentParser, *, default: Optional[int] = 512, help_extra: str = "") -> None:
    parser.add_argument("--H", type=int, default=default, help="image height in pixels" + help_extra)
    parser.add_argument("--W", type=int, default=default, help="image width in pixels" + help_extra)
    parser.add_argument("--C", type=int, default=4, help="latent channels (must match the config)")
    parser.add_argument("--f", type=int, default=8, help="downsampling factor (must match the config)")


def add_model_args(parser: argparse.ArgumentParser, *, config: Optional[str] = SD_CONFIG,
                   ckpt: Optional[str] = SD_CKPT, config_help: str = "", ckpt_help: str = "") -> None:
    parser.add_argument("--config", type=str, default=config,
                        help=config_help or "path to the config that constructs the model")
    parser.add_argument("--ckpt", type=str, default=ckpt,
                        help=ckpt_help or "path to the checkpoint (.ckpt or .safetensors)")
    parser.add_argument("--use_ema", action="store_true",
                        help="run the EMA weights of a checkpoint that holds both (the *-full-ema files)")
    parser.add_argument("--device", type=str, default="auto",
                        help="auto (CUDA, else Apple MPS, else CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--precision", type=str, choices=PRECISION_CHOICES, default="auto",
                        help="auto (default): fp16 on CUDA, bf16 on CPUs with native bf16, else fp32; "
                             "fp32/full: float32 everywhere; autocast: fp16 on CUDA, fp32 elsewhere (the "
                             "original's choice); fp16; bf16")


def add_safety_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--safety_checker", type=str, default=SAFETY_CHECKER_DIR,
                        help="folder with the files of the CompVis/stable-diffusion-safety-checker release "
                             "(config.json, preprocessor_config.json, pytorch_model.bin or model.safetensors)")
    parser.add_argument("--no_safety_check", action="store_true",
                        help="do not run the safety checker (recorded in each image's metadata)")


# --------------------------------------------------------------------------------------------
# Checks (all user input is checked here, before a model is loaded)
# --------------------------------------------------------------------------------------------
def resolve_sampler(opt: argparse.Namespace) -> str:
    """The sampler name from ``--sampler`` and its aliases ``--plms`` / ``--dpm_solver``."""
    aliases = [name for name, on in (("plms", opt.plms), ("dpm_solver", opt.dpm_solver)) if on]
    if len(aliases) > 1:
        raise UserInputError("--plms and --dpm_solver both given; pick one sampler (or use --sampler NAME)")
    if opt.sampler is not None and aliases and aliases[0] != opt.sampler:
        raise UserInputError(f"--sampler {opt.sampler} conflicts with --{aliases[0]}; pass only one of them")
    return opt.sampler or (aliases[0] if aliases else "ddim")


def sampler_eta(opt: argparse.Namespace, sampler: str) -> Optional[float]:
    """The eta to pass: ``--ddim_eta`` for DDIM, for other samplers only when it is not 0."""
    if opt.ddim_eta < 0:
        raise UserInputError(f"--ddim_eta {opt.ddim_eta} is negative; use 0 (deterministic) or more")
    if sampler == "ddim":
        return opt.ddim_eta
    if opt.ddim_eta == 0:
        return None
    if sampler != "euler_a":
        raise UserInputError(f"--ddim_eta {opt.ddim_eta} has no meaning for --sampler {sampler} (a deterministic "
                             "sampler); leave it at 0, or use --sampler ddim or euler_a")
    return opt.ddim_eta


def check_positive(**values: int) -> None:
    """Each ``--name value`` must be >= 1."""
    for name, value in values.items():
        if value is None or value < 1:
            raise UserInputError(f"--{name} must be at least 1, got {value}")


def check_batch_args(opt: argparse.Namespace, sampler: str) -> None:
    """Steps, batch size, iterations and grid rows; the step count must give a valid schedule."""
    check_positive(**{opt.steps_flag.lstrip("-"): opt.steps}, n_samples=opt.n_samples, n_iter=opt.n_iter)
    if opt.n_rows < 0:
        raise UserInputError(f"--n_rows must be 0 (= n_samples) or more, got {opt.n_rows}")
    if sampler in ("ddim", "plms"):
        from ldm.models.diffusion.ddim import make_ddim_timesteps

        make_ddim_timesteps("uniform", opt.steps, 1000)  # e.g. 3 steps would reach timestep 1000


def read_prompts(opt: argparse.Namespace) -> list:
    """The prompts of the run: ``--prompt``, or the non-blank lines of ``--from-file`` ('-' = stdin)."""
    path = getattr(opt, "from_file", None)
    if not path:
        if opt.prompt is None:
            raise UserInputError("no prompt given; pass --prompt \"...\" or --from-file FILE")
        return [opt.prompt]
    if path == "-":
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError:
            raise UserInputError("the prompts on standard input are not UTF-8 text; send UTF-8") from None
        source = "standard input"
    else:
        p = Path(path)
        if not p.is_file():
            raise UserInputError(f"prompt file {p}: {'is a folder' if p.is_dir() else 'file not found'}; "
                                 "pass --from-file with a text file, one prompt per line")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserInputError(f"prompt file {p} is not UTF-8 text; save it as UTF-8") from None
        except OSError as exc:
            raise UserInputError(f"prompt file {p} cannot be read ({exc.strerror or exc})") from None
        source = str(p)
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserInputError(f"prompt file {source} has no prompts (empty or only blank lines); "
                             "put one prompt per line")
    log.info("read %d prompt(s) from %s", len(prompts), source)
    return prompts


def check_outdir(path: str) -> Path:
    """The output folder must be creatable and writable; nothing is created here."""
    p = Path(path)
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserInputError(f"--outdir {p}: {probe} is a file, not a folder; pass another --outdir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserInputError(f"--outdir {p}: no permission to write in {probe}; pass --outdir with a folder you "
                             "can write to")
    return p


def check_checkpoint(path: Optional[str], expected: str = SD_CKPT) -> Path:
    """The checkpoint must be a readable, non-empty file (its contents are checked on load).

    :param expected: where the original scripts looked for it, named in the error.
    """
    if not path:
        raise UserInputError(f"no checkpoint given; pass --ckpt PATH (the original scripts expected it at {expected})")
    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"checkpoint {p} not found; put the checkpoint there or pass --ckpt PATH "
                             f"(the original scripts expected it at {expected})")
    if p.suffix.lower() not in (".ckpt", ".safetensors", ".pt", ".pth", ".bin"):
        raise UserInputError(f"checkpoint {p}: unknown format {p.suffix!r}; pass a .ckpt or .safetensors file")
    if not os.access(p, os.R_OK):
        raise UserInputError(f"checkpoint {p} cannot be read (permission denied); check its permissions")
    if p.stat().st_size == 0:
        raise UserInputError(f"checkpoint {p} is empty (0 bytes): the download or copy did not finish")
    return p


def check_laion400m() -> None:
    """``--laion400m``: name what is missing, or say that its BERT encoder is not provided."""
    missing = [(path, what) for path, what in
               ((LAION_CONFIG, "the config (txt2img-1p4B-eval.yaml of CompVis/latent-diffusion)"),
                (LAION_CKPT, "the checkpoint (text2img-large model.ckpt of CompVis/latent-diffusion)"))
               if not Path(path).is_file()]
    if missing:
        raise UserInputError("--laion400m needs " + " and ".join(f"{what} at {path}" for path, what in missing)
                             + "; put the file(s) there (and note: this package cannot run that model's BERT "
                             "text encoder yet)")
    raise UserInputError(f"--laion400m: found {LAION_CONFIG} and {LAION_CKPT}, but this package cannot run that "
                         "model's BERT text encoder yet; use a Stable Diffusion checkpoint (--ckpt)")


def check_model(config_path: str, ckpt_path: Optional[str], kinds: Sequence[str], purpose: str,
                expected_ckpt: str = SD_CKPT):
    """Load the config, check the checkpoint file and that the model can do ``purpose``.

    :returns: ``(config, geometry)``.
    """
    from ldm.generate import load_config, model_geometry

    config = load_config(config_path)
    geometry = model_geometry(config)
    check_checkpoint(ckpt_path, expected_ckpt)
    if geometry.kind == "bert":
        raise UserInputError(f"config {config_path} uses the BERT text encoder of the LDM 1p4B model, which this "
                             "package cannot run yet; use a Stable Diffusion config and checkpoint")
    if geometry.kind not in kinds:
        hint = {"sd-inpaint": "it is an SD inpainting model: use scripts/inpaint.py --init-img --mask --prompt",
                "ldm-inpaint": "it is the LDM inpainting model: use scripts/inpaint.py --indir",
                "txt2img": "it is a text-to-image model"}.get(geometry.kind, "it is not a text-to-image model")
        raise UserInputError(f"config {config_path} cannot be used for {purpose}: {hint}")
    return config, geometry


def check_geometry(opt: argparse.Namespace, geometry) -> None:
    """--C/--f must match the config; --H/--W (when given) must be multiples of f."""
    if getattr(opt, "C", None) is not None and opt.C != geometry.latent_channels:
        raise UserInputError(f"--C {opt.C} does not match the config's {geometry.latent_channels} latent channels; "
                             f"drop --C or pass --C {geometry.latent_channels}")
    if getattr(opt, "f", None) is not None and opt.f != geometry.factor:
        raise UserInputError(f"--f {opt.f} does not match the config's downsampling factor {geometry.factor}; "
                             f"drop --f or pass --f {geometry.factor}")
    for flag in ("H", "W"):
        value = getattr(opt, flag, None)
        if value is None:
            continue
        f = geometry.factor
        if value < f or value % f:
            fix = max(f, value - value % f)
            raise UserInputError(f"--{flag} {value} is not a multiple of {f}; use --{flag} {fix} or another "
                                 f"multiple of {f}")


def default_size(opt: argparse.Namespace, config, fallback: int = 512) -> None:
    """Fill ``--H``/``--W`` left unset: the config's ``demo.height``/``demo.width`` (the size a
    bundled model was trained at), else ``fallback`` (512, SD v1's size)."""
    from ldm.generate import config_get

    for flag, key in (("H", "height"), ("W", "width")):
        if getattr(opt, flag) is None:
            setattr(opt, flag, int(config_get(config, "demo", key, default=fallback)))


def safety_plan(opt: argparse.Namespace, config) -> tuple:
    """``(folder or None, status when None)``: whether the checker runs, before anything is loaded.

    :raises UserInputError: when it should run and its files are missing (names the folder).
    """
    from ldm.generate import SAFETY_NOT_NEEDED, SAFETY_OFF, config_needs_safety_checker
    from ldm.safety_checker import WEIGHT_FILES

    if opt.no_safety_check:
        log.info("safety checker off (--no_safety_check)")
        return None, SAFETY_OFF
    if not config_needs_safety_checker(config):
        log.info("safety checker not needed: the model config says 'demo: {safety_checker: false}'")
        return None, SAFETY_NOT_NEEDED
    folder = Path(opt.safety_checker)
    if not (folder / "config.json").is_file() or not any((folder / n).is_file() for n in WEIGHT_FILES):
        raise UserInputError(f"safety checker files not found in {folder}: put config.json, preprocessor_config.json "
                             "and pytorch_model.bin (or model.safetensors) of the public "
                             "CompVis/stable-diffusion-safety-checker release there, pass --safety_checker DIR, "
                             "or turn it off with --no_safety_check")
    return folder, SAFETY_OFF


def check_watermark_available() -> None:
    try:
        import cv2  # noqa: F401
        import imwatermark  # noqa: F401
    except ImportError as exc:
        raise UserInputError(f"the invisible watermark needs the 'invisible-watermark' and 'opencv' packages "
                             f"({exc}); install them with `pip install invisible-watermark`") from None


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
def batches(items: Sequence, size: int) -> Iterator[list]:
    """Consecutive chunks of ``size``; the last one may be smaller."""
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def prompt_batches(opt: argparse.Namespace, prompts: Sequence[str]) -> list:
    """One prompt ``n_samples`` times, or the file's prompts ``n_samples`` at a time (the last batch
    may be smaller, unlike the original, which failed then). Also checks that every seed of the run
    (``seed`` .. ``seed + images - 1``) is in range."""
    from ldm.devices import seed_generators

    if getattr(opt, "from_file", None):
        data = list(batches(prompts, opt.n_samples))
    else:
        data = [[prompts[0]] * opt.n_samples]
    seed_generators(opt.seed, opt.n_iter * sum(map(len, data)))
    return data


def generate_all(opt: argparse.Namespace, data: Sequence[list], make_batch: Callable, writer) -> None:
    """Run ``make_batch(prompts, first_seed)`` for every batch of every iteration, write the images
    and the grid, and log each file with its seed.

    Image ``k`` of the run gets seed ``opt.seed + k``; with ``--fixed_code`` every iteration
    repeats the seeds of the first batch (image ``k`` of each batch: ``opt.seed + k``).
    """
    index = 0
    for _ in range(opt.n_iter):
        for batch_prompts in data:
            result = make_batch(batch_prompts, opt.seed if opt.fixed_code else opt.seed + index)
            report_saved(writer.add(result), result.records)
            index += len(batch_prompts)
    grid = writer.write_grid(opt.n_rows or opt.n_samples)
    if grid:
        log.info("grid: %s", grid)
    log.info("your samples are in %s", writer.outdir)


def load_pipeline(opt: argparse.Namespace, config, checker_folder, safety_status: str):
    """Device, precision, safety checker, then the model (in that order, cheapest failures first)."""
    from ldm.devices import pick_device, resolve_precision
    from ldm.generate import StableDiffusion, load_safety_checker

    device = pick_device(opt.device)
    resolve_precision(opt.precision, device)
    checker = None
    if checker_folder is not None:
        log.info("loading the safety checker from %s", checker_folder)
        checker = load_safety_checker(checker_folder, device)
    return StableDiffusion.from_files(config, opt.ckpt, device=str(device), precision=opt.precision,
                                      use_ema=True if opt.use_ema else None, safety_checker=checker,
                                      safety_status=safety_status,
                                      exact_batches=not getattr(opt, "fast_batch", False))


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
    try:
        run(opt)
    except Exception as exc:  # noqa: BLE001 - only user errors are handled, everything else is re-raised
        if not _is_user_error(exc):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return 0
