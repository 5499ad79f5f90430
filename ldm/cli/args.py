"""Argument definitions the scripts share: one ``add_*_args`` function per group of flags, with
defaults that name the model family's where the family decides (see :mod:`ldm.families`)."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ldm.families import get_family

__all__ = ["EXIT_USER_ERROR", "DEFAULT_PROMPT", "SD_CONFIG", "SD_CKPT", "LAION_CONFIG", "LAION_CKPT",
           "LDM_INPAINT_CONFIG", "LDM_INPAINT_CKPT", "SAFETY_CHECKER_DIR", "PRECISION_CHOICES", "SEED_HELP",
           "HelpFormatter", "make_parser", "add_prompt_args", "add_personalization_args", "add_output_args", "add_sampling_args",
           "add_size_args", "add_model_args", "add_safety_args", "add_batch_args"]

EXIT_USER_ERROR = 2

DEFAULT_PROMPT = "a painting of a virus monster playing guitar"
# where the original scripts looked for each model (ldm.families holds them)
SD_CONFIG, SD_CKPT = get_family("sd-v1").config, get_family("sd-v1").checkpoint
LAION_CONFIG, LAION_CKPT = get_family("ldm-txt2img").config, get_family("ldm-txt2img").checkpoint
LDM_INPAINT_CONFIG = get_family("ldm-inpainting").config
LDM_INPAINT_CKPT = get_family("ldm-inpainting").checkpoint
SAFETY_CHECKER_DIR = "models/safety_checker"
PRECISION_CHOICES = ("autocast", "full", "auto", "fp32", "fp16", "bf16")

SEED_HELP = ("seed of the first image; image k of the run (counting over all batches and iterations) uses "
             "seed + k, printed and stored in its PNG, so it can be re-made alone with --seed <its seed> "
             "--n_samples 1 --n_iter 1 and its prompt")


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
                                 "stdin); each prompt gives one image per iteration, --n_samples at a time. A "
                                 ".jsonl file holds one JSON object per line with its own "
                                 "settings (prompt, negative_prompt, seed, steps, scale, sampler, H, W, n; see README)")
        parser.add_argument("--repeat", type=int, default=1,
                            help="with --from-file: use each prompt of the file this many times in a row (as the "
                                 "SD 2 scripts)")
    add_personalization_args(parser)


def add_personalization_args(parser: argparse.ArgumentParser) -> None:
    """Prompt syntax, textual-inversion embeddings and LoRAs (:mod:`ldm.prompts`, :mod:`ldm.personalize`)."""
    parser.add_argument("--prompt_syntax", choices=("a1111", "plain"), default="a1111",
                        help="a1111: (word) x1.1, [word] /1.1, (word:1.3), \\( for a literal bracket, BREAK starts a "
                             "new 75-token window, <lora:name:weight> merges a LoRA; plain: the prompt as it is. Either "
                             "way prompts longer than 75 tokens are encoded in windows of 75")
    parser.add_argument("--embeddings", type=str, default=None, metavar="DIR",
                        help="folder of textual-inversion embeddings (A1111 .pt/.safetensors, diffusers "
                             "learned_embeds.bin/.safetensors); a prompt uses one by its file name")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                        help="merge this LoRA (kohya/A1111 or diffusers/PEFT file) with WEIGHT (default 1); repeatable")
    parser.add_argument("--lora_dir", type=str, default="models/lora", metavar="DIR",
                        help="where a prompt's <lora:name:weight> tag finds name.safetensors (.pt, .ckpt, .bin)")


def add_output_args(parser: argparse.ArgumentParser, outdir: str) -> None:
    parser.add_argument("--outdir", type=str, nargs="?", default=outdir, help="folder to write results to")
    parser.add_argument("--skip_grid", action="store_true",
                        help="do not save a grid, only individual samples")
    parser.add_argument("--skip_save", action="store_true", help="do not save individual samples")


def add_sampling_args(parser: argparse.ArgumentParser, method: str, *,
                      steps_flags: Sequence[str] = ("--ddim_steps",), n_samples: int = 3, n_iter: int = 2,
                      seed: int = 42, family: str = "sd-v1") -> None:
    """Sampling flags; steps, sampler and scale default to the model family's (filled in by
    :func:`plan_run` once the config is read; ``--help`` shows those of ``family``, the script's
    usual model)."""
    from ldm.models.diffusion.registry import SAMPLER_DESCRIPTIONS

    sd = get_family(family)
    title = {"sd-v1": "SD v1"}.get(family, family)
    parser.add_argument(*steps_flags, dest="steps", type=int, default=None,
                        help=f"number of sampling steps (default: the model family's, {sd.steps} for {title})")
    parser.set_defaults(steps_flag=steps_flags[0])
    parser.add_argument("--sampler", choices=tuple(SAMPLER_DESCRIPTIONS), default=None,
                        help=f"sampling method (default: the model family's, {sd.sampler} for {title}; --plms and "
                             "--dpm_solver (--dpm) are aliases): "
                             + "; ".join(f"{k}: {v}" for k, v in SAMPLER_DESCRIPTIONS.items()))
    parser.add_argument("--plms", action="store_true", help="use PLMS sampling (same as --sampler plms)")
    parser.add_argument("--dpm_solver", "--dpm", dest="dpm_solver", action="store_true",
                        help="use DPM-Solver sampling (same as --sampler dpm_solver; --dpm is the SD 2 scripts' name)")
    parser.add_argument("--ddim_eta", type=float, default=0.0,
                        help="DDIM eta (0 is deterministic); with --sampler euler_a its noise amount "
                             "(0 there means the default, 1)")
    parser.add_argument("--fixed_code", action="store_true",
                        help="use the same start noise in every iteration: image k of every batch uses seed + k")
    parser.add_argument("--n_iter", type=int, default=n_iter, help="how often to sample")
    parser.add_argument("--n_samples", type=int, default=n_samples,
                        help="how many images to make at once for each prompt, a.k.a. batch size")
    parser.add_argument("--n_rows", type=int, default=0, help="images per row in the grid (0: n_samples)")
    parser.add_argument("--scale", type=float, default=None,
                        help="classifier-free guidance scale: eps = eps(x, negative) + scale * (eps(x, prompt) - "
                             f"eps(x, negative)) (default: the model family's, {sd.default_scale(method)} for {title})")
    parser.add_argument("--seed", type=int, default=seed, help=SEED_HELP)
    parser.add_argument("--exact_batches", action="store_true",
                        help="run the networks one image at a time, so that each image is bit-identical to the one "
                             "its seed gives alone, in any batch and with any number of processes (default: on the "
                             "CPU, where it costs about 5%% at SD sizes; on CUDA/MPS batches run at once, and an "
                             "image then differs from its single-image render by float rounding)")
    parser.add_argument("--fast_batch", action="store_true",
                        help="run each batch through the networks at once (the default on CUDA/MPS; the opposite of "
                             "--exact_batches): faster on GPUs, but an image then differs by float rounding from the "
                             "one its seed gives alone")
    if method in ("txt2img", "img2img"):
        from ldm.cli.sdxl import add_sdxl_args

        add_sdxl_args(parser, method)


def add_batch_args(parser: argparse.ArgumentParser) -> None:
    """``--resume``: batch runs keep a journal in the output folder (see ldm/batch/journal.py)."""
    parser.add_argument("--resume", action="store_true",
                        help="finish the unfinished run in --outdir: images its journal (OUTDIR/journal.jsonl) lists "
                             "are kept, the others are made; refused when the flags or prompts differ from that "
                             "run's. Without a journal there, a new run starts")


def add_size_args(parser: argparse.ArgumentParser, *, default: Optional[int] = 512, help_extra: str = "") -> None:
    parser.add_argument("--H", type=int, default=default, help="image height in pixels" + help_extra)
    parser.add_argument("--W", type=int, default=default, help="image width in pixels" + help_extra)
    parser.add_argument("--C", type=int, default=None, help="latent channels (default: the config's; must match it)")
    parser.add_argument("--f", type=int, default=None,
                        help="downsampling factor (default: the config's; must match it)")


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
    parser.add_argument("--bf16", action="store_true", help="the SD 2 scripts' flag: same as --precision bf16")
    parser.add_argument("--torchscript", action="store_true",
                        help="the SD 2 scripts' TorchScript tracing: not supported here (the error says what to use)")
    parser.add_argument("--ipex", action="store_true",
                        help="the SD 2 scripts' Intel Extension for PyTorch: not supported here (the error says what "
                             "to use)")


def add_safety_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--safety_checker", type=str, default=SAFETY_CHECKER_DIR,
                        help="folder with the files of the CompVis/stable-diffusion-safety-checker release "
                             "(config.json, preprocessor_config.json, pytorch_model.bin or model.safetensors)")
    parser.add_argument("--no_safety_check", action="store_true",
                        help="do not run the safety checker (recorded in each image's metadata)")

