"""Every input check of the scripts, in one place, run before any model is loaded:
:func:`plan_run` does the ones all scripts share and returns the :class:`RunPlan` they run by."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ldm.cli.args import LAION_CKPT, LAION_CONFIG, SD_CKPT
from ldm.errors import UserInputError
from ldm.families import METHODS

__all__ = ["resolve_sampler", "sampler_eta", "check_init_image", "check_positive", "check_batch_args", "read_prompts", "check_outdir",
           "check_checkpoint", "check_laion400m", "check_bert_vocab", "check_model", "check_geometry", "apply_family_defaults",
           "default_size", "safety_plan", "RunPlan", "plan_run", "check_sd2_flags", "check_watermark_available",
           "resolve_exact_batches"]

log = logging.getLogger("ldm.scripts")


def resolve_sampler(opt: argparse.Namespace, default: str = "ddim") -> str:
    """The sampler name from ``--sampler`` and its aliases ``--plms`` / ``--dpm_solver`` (else ``default``)."""
    aliases = [name for name, on in (("plms", opt.plms), ("dpm_solver", opt.dpm_solver)) if on]
    if len(aliases) > 1:
        raise UserInputError("--plms and --dpm_solver both given; pick one sampler (or use --sampler NAME)")
    if opt.sampler is not None and aliases and aliases[0] != opt.sampler:
        raise UserInputError(f"--sampler {opt.sampler} conflicts with --{aliases[0]}; pass only one of them")
    return opt.sampler or (aliases[0] if aliases else default)


def sampler_eta(opt: argparse.Namespace, sampler: str) -> Optional[float]:
    """The eta to pass: ``--ddim_eta``, where 0 means the sampler's default (0 for DDIM, 1 for
    Euler a: the flag's default is 0, as the reference's)."""
    from ldm.models.diffusion.registry import sampler_info

    if opt.ddim_eta < 0:
        raise UserInputError(f"--ddim_eta {opt.ddim_eta} is negative; use 0 (deterministic) or more")
    if opt.ddim_eta == 0:
        return None
    if sampler_info(sampler).default_eta is None:
        raise UserInputError(f"--ddim_eta {opt.ddim_eta} has no meaning for --sampler {sampler} (a deterministic "
                             "sampler); leave it at 0, or use --sampler ddim or euler_a")
    return opt.ddim_eta


def check_init_image(opt: argparse.Namespace) -> Path:
    """``--init-img``: given, and a file (its content is checked when it is read). :returns: its path."""
    if not opt.init_img:
        raise UserInputError("no init image given; pass --init-img PATH")
    path = Path(opt.init_img).expanduser()
    if not path.is_file():
        raise UserInputError(f"--init-img {opt.init_img}: {'is a folder' if path.is_dir() else 'file not found'}; "
                             "pass the path of an image file")
    return path


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
    if getattr(opt, "repeat", 1) < 1:
        raise UserInputError(f"--repeat must be at least 1, got {opt.repeat}")
    from ldm.models.diffusion.registry import check_steps

    check_steps(sampler, opt.steps)  # e.g. 3 DDIM steps would reach timestep 1000


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
        from ldm.batch.jobfile import read_user_text  # JSONL job files never reach here (cli.plan_batch)

        p = Path(path)
        text = read_user_text(p, "prompt file", "a text file, one prompt per line")
        source = str(p)
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserInputError(f"prompt file {source} has no prompts (empty or only blank lines); "
                             "put one prompt per line")
    log.info("read %d prompt(s) from %s", len(prompts), source)
    return [p for p in prompts for _ in range(getattr(opt, "repeat", 1))]


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


def check_laion400m(opt: argparse.Namespace) -> None:
    """``--laion400m``: the LAION-400M LDM (text2img-large) at the original scripts' paths becomes
    ``--config``/``--ckpt`` (as in the SD script); names what is missing."""
    missing = [(path, what) for path, what in
               ((LAION_CONFIG, "the config (txt2img-1p4B-eval.yaml of CompVis/latent-diffusion)"),
                (LAION_CKPT, "the checkpoint (text2img-large model.ckpt of CompVis/latent-diffusion)"))
               if not Path(path).is_file()]
    if missing:
        raise UserInputError(f"--laion400m runs {LAION_CONFIG} with {LAION_CKPT}; missing: "
                             + " and ".join(f"{what} at {path}" for path, what in missing)
                             + "; put the file(s) there, or pass --config and --ckpt without --laion400m")
    opt.config, opt.ckpt = LAION_CONFIG, LAION_CKPT


def check_bert_vocab(opt: argparse.Namespace, config) -> None:
    """For a model with the LDM BERT text encoder: find the bert-base-uncased ``vocab.txt``
    (``--bert_vocab``, else ``models/ldm/text2img-large/vocab.txt``) and write it into ``config``;
    raises a one-line error naming both places when it is missing. Other models: nothing."""
    from omegaconf import OmegaConf

    from ldm.modules.encoders.wordpiece import find_bert_vocab

    node = config.model.params.get("cond_stage_config")
    if not hasattr(node, "get") or "BERTEmbedder" not in str(node.get("target", "")):
        return
    if not node.get("params", {}).get("use_tokenizer", True):
        return
    path = find_bert_vocab(getattr(opt, "bert_vocab", None) or node.get("params", {}).get("vocab_file"))
    OmegaConf.update(config, "model.params.cond_stage_config.params.vocab_file", str(path), force_add=True)


def check_model(config_path: str, ckpt_path: Optional[str], method: str, expected_ckpt: str = SD_CKPT):
    """Load the config, check the checkpoint file and that the model's family can run ``method``
    (a key of :data:`ldm.families.METHODS`).

    :returns: ``(config, spec)`` with the :class:`ldm.generate.config.ModelSpec`.
    """
    from ldm.generate.config import describe_config, load_config

    config = load_config(config_path)
    spec = describe_config(config)
    check_checkpoint(ckpt_path, expected_ckpt)
    family = spec.family
    if family.unsupported:
        raise UserInputError(f"config {config_path}: {family.unsupported}")
    if method not in family.methods:
        raise UserInputError(f"config {config_path} cannot be used for {METHODS[method][0]}: {family.usage_hint()}")
    return config, spec


def check_geometry(opt: argparse.Namespace, geometry) -> None:
    """--C/--f (when given) must match the config; --H/--W (when given) must be multiples of f."""
    from ldm.generate.config import check_image_size

    if getattr(opt, "C", None) is not None and opt.C != geometry.latent_channels:
        raise UserInputError(f"--C {opt.C} does not match the config's {geometry.latent_channels} latent channels; "
                             f"drop --C or pass --C {geometry.latent_channels}")
    if getattr(opt, "f", None) is not None and opt.f != geometry.factor:
        raise UserInputError(f"--f {opt.f} does not match the config's downsampling factor {geometry.factor}; "
                             f"drop --f or pass --f {geometry.factor}")
    check_image_size(geometry.factor, getattr(opt, "W", None), getattr(opt, "H", None), names=("--W", "--H"))


def apply_family_defaults(opt: argparse.Namespace, spec, method: str) -> str:
    """Fill ``--steps``/``--scale`` left unset with the model family's defaults; returns the sampler
    (``--sampler``, an alias, or the family's)."""
    family = spec.family
    if opt.steps is None:
        opt.steps = family.steps
    if getattr(opt, "scale", None) is None:
        opt.scale = family.default_scale(method)
    return resolve_sampler(opt, default=family.sampler)


def default_size(opt: argparse.Namespace, spec) -> None:
    """Fill ``--H``/``--W`` left unset with the model's default size (:class:`ModelSpec`: the family's,
    or a config's ``demo.height``/``demo.width``)."""
    opt.H = spec.height if opt.H is None else opt.H
    opt.W = spec.width if opt.W is None else opt.W


def safety_plan(opt: argparse.Namespace, spec) -> tuple:
    """``(folder or None, status when None)``: whether the checker runs, before anything is loaded.

    :raises UserInputError: when it should run and its files are missing (names the folder).
    """
    from ldm.generate.records import SAFETY_NOT_NEEDED, SAFETY_OFF
    from ldm.safety_checker import WEIGHT_FILES

    if opt.no_safety_check:
        log.info("safety checker off (--no_safety_check)")
        return None, SAFETY_OFF
    if not spec.safety_checker:
        log.info("safety checker not needed: the model config says 'demo: {safety_checker: false}'")
        return None, SAFETY_NOT_NEEDED
    folder = Path(opt.safety_checker)
    if not (folder / "config.json").is_file() or not any((folder / n).is_file() for n in WEIGHT_FILES):
        raise UserInputError(f"safety checker files not found in {folder}: put config.json, preprocessor_config.json "
                             "and pytorch_model.bin (or model.safetensors) of the public "
                             "CompVis/stable-diffusion-safety-checker release there, pass --safety_checker DIR, "
                             "or turn it off with --no_safety_check")
    return folder, SAFETY_OFF


@dataclass
class RunPlan:
    """What :func:`plan_run` decided from the flags and the config, before anything is loaded."""

    config: Any
    spec: Any                     # ldm.generate.config.ModelSpec
    sampler: str
    eta: Optional[float]
    outdir: Path
    device: Any                   # torch.device
    dtype: Any                    # torch.dtype
    checker_folder: Optional[Path]
    safety_status: str
    exact_batches: Optional[bool] = None  # resolve_exact_batches: None = the pipeline's default


def plan_run(opt: argparse.Namespace, method: str, expected_ckpt: str = SD_CKPT, *,
             fill_size: bool = False) -> RunPlan:
    """Every check the scripts share, before any model is loaded: the config and checkpoint (and
    that the model's family can run ``method``), the family's defaults for flags left unset
    (``--H``/``--W`` too with ``fill_size``), the sampler and its eta, step and batch counts, sizes,
    the output folder, the watermark packages, the safety checker's files, device and precision
    (each resolved once, here)."""
    from ldm.devices import resolve_placement

    check_sd2_flags(opt)
    check_personalization(opt)
    config, spec = check_model(opt.config, opt.ckpt, method, expected_ckpt)
    sampler = apply_family_defaults(opt, spec, method)
    if fill_size:
        default_size(opt, spec)
    eta = sampler_eta(opt, sampler)
    check_batch_args(opt, sampler)
    check_geometry(opt, spec.geometry)
    from ldm.cli.sdxl import check_sdxl_flags

    check_sdxl_flags(opt, spec, sampler, check_model)
    outdir = check_outdir(opt.outdir)
    check_watermark_available()
    checker_folder, safety_status = safety_plan(opt, spec)
    device, dtype = resolve_placement(opt.device, opt.precision)
    return RunPlan(config, spec, sampler, eta, outdir, device, dtype, checker_folder, safety_status,
                   resolve_exact_batches(opt, device))


def resolve_exact_batches(opt: argparse.Namespace, device) -> bool:
    """``--exact_batches`` / ``--fast_batch``, else by device: one image at a time on the CPU (bit-identical
    per seed; batching gains about 5% there at SD sizes, docs/benchmarks.md), batched on CUDA and MPS."""
    exact, fast = getattr(opt, "exact_batches", False), getattr(opt, "fast_batch", False)
    if exact and fast:
        raise UserInputError("--exact_batches and --fast_batch are opposites; pass only one of them")
    if exact or fast:
        return bool(exact)
    return device.type == "cpu"


def check_personalization(opt: argparse.Namespace) -> None:
    """``--embeddings`` is a folder and every ``--lora PATH[:WEIGHT]`` names a file (read after the model loads)."""
    from ldm.prompts.parser import parse_lora_spec

    folder = getattr(opt, "embeddings", None)
    if folder is not None and not Path(folder).is_dir():
        raise UserInputError(f"--embeddings {folder}: not a folder; give the folder that holds the embedding files")
    for spec in getattr(opt, "lora", None) or ():
        path, _ = parse_lora_spec(spec)
        if not Path(path).is_file():
            raise UserInputError(f"--lora {spec}: file {path} not found; give PATH[:WEIGHT] of a .safetensors LoRA")


def check_sd2_flags(opt: argparse.Namespace) -> None:
    """The SD 2 scripts' ``--bf16`` (= ``--precision bf16``), ``--torchscript`` and ``--ipex``."""
    if opt.torchscript or opt.ipex:
        flag = "--torchscript" if opt.torchscript else "--ipex"
        raise UserInputError(f"{flag} is not supported: this toolkit runs its own CPU fast paths instead (oneDNN "
                             "convolutions, linear layers and attention, on by default) and bf16 with --precision "
                             f"bf16; drop {flag}")
    if opt.bf16:
        if opt.precision not in ("auto", "bf16"):
            raise UserInputError(f"--bf16 conflicts with --precision {opt.precision}; pass only one of them")
        opt.precision = "bf16"


def check_watermark_available() -> None:
    try:
        import cv2  # noqa: F401
        import imwatermark  # noqa: F401
    except ImportError as exc:
        raise UserInputError(f"the invisible watermark needs the 'invisible-watermark' and 'opencv' packages "
                             f"({exc}); install them with `pip install invisible-watermark`") from None

