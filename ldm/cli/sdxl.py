"""The scripts' SDXL flags (txt2img.py, img2img.py): micro-conditioning and the refiner stage.

:func:`add_sdxl_args` defines them, :func:`check_sdxl_flags` checks them before anything is loaded
(inside ``plan_run``), :func:`attach_sdxl` gives the loaded pipeline its micro-conditioning and
loads the refiner (inside ``load_pipeline``). See :mod:`ldm.generate.sdxl` for what they do.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from ldm.errors import UserInputError

__all__ = ["add_sdxl_args", "check_sdxl_flags", "attach_sdxl", "find_refiner_config"]

log = logging.getLogger("ldm.scripts")

_MICRO = ("original_size", "crop_top_left", "target_size", "aesthetic_score", "negative_aesthetic_score")
_REFINER_CONFIG = "configs/inference/sd_xl_refiner.yaml"


def add_sdxl_args(parser: argparse.ArgumentParser, method: str) -> None:
    group = parser.add_argument_group("SDXL", "micro-conditioning (pixels, height first) and the refiner stage")
    group.add_argument("--original_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                       help="the size the image claims to have had (default: 1024 1024 for the base, the image "
                            "size for the refiner, as sgm)")
    group.add_argument("--crop_top_left", type=int, nargs=2, metavar=("T", "L"), default=None,
                       help="top-left corner of the crop it claims (default: 0 0)")
    group.add_argument("--target_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                       help="target size (default: the image size)")
    group.add_argument("--aesthetic_score", type=float, default=None,
                       help="the refiner's aesthetic score of the prompt, 0..10 (default: 6.0)")
    group.add_argument("--negative_aesthetic_score", type=float, default=None,
                       help="the refiner's aesthetic score of the unconditional branch, 0..10 (default: 2.5)")
    group.add_argument("--vae_tiling", choices=("auto", "on", "off"), default="auto",
                       help="decode in 512-pixel tiles (less memory, seams blended); auto: on CUDA devices with less "
                            "than 16 GiB")
    if method != "txt2img":
        return
    group.add_argument("--refiner", type=str, default=None, metavar="CKPT",
                       help="finish each image with this SDXL refiner (sd_xl_refiner_1.0.safetensors)")
    group.add_argument("--refiner_config", type=str, default=None,
                       help="the refiner's config (default: a .yaml beside --refiner with its name, else "
                            f"{_REFINER_CONFIG})")
    group.add_argument("--refiner_strength", type=float, default=0.15,
                       help="share of the steps the refiner runs (sgm: int(strength*(steps+1))-1 of them)")
    group.add_argument("--refiner_mode", choices=("latent", "image"), default="latent",
                       help="latent: the refiner finishes the base's denoising from the same noise level (sgm's "
                            "'finish denoising with refiner'); image: the base's decoded image goes through "
                            "img2img at --refiner_strength")


def find_refiner_config(ckpt: str, given: str | None) -> str:
    """``given``, else ``<ckpt stem>.yaml`` beside the checkpoint, else the sgm refiner config."""
    if given:
        return given
    beside = Path(ckpt).with_suffix(".yaml")
    return str(beside) if beside.is_file() else _REFINER_CONFIG


def check_sdxl_flags(opt: argparse.Namespace, spec, sampler: str, check_model) -> None:
    """The SDXL flags against the model; the refiner's file, config and step split.

    :param check_model: :func:`ldm.cli.checks.check_model` (passed in: that module calls this one)."""
    from ldm.generate.sdxl import refiner_steps

    given = [name for name in _MICRO if getattr(opt, name, None) is not None]
    refiner = getattr(opt, "refiner", None)
    if spec.family.kind != "sdxl":
        used = [f"--{n}" for n in given] + (["--refiner"] if refiner else [])
        if used:
            raise UserInputError(f"{', '.join(used)}: only for SDXL models, and {spec.family.title} is not one; drop "
                                 "the flag(s) or pass an SDXL config")
        return
    opt.micro_conditioning = micro_from_flags(opt).check()
    if not refiner:
        return
    if spec.family.name != "sdxl-base":
        raise UserInputError(f"--refiner needs the SDXL base model as --config/--ckpt; got {spec.family.title}")
    opt.refiner_config = find_refiner_config(refiner, opt.refiner_config)
    config, ref_spec = check_model(opt.refiner_config, refiner, "img2img")
    if ref_spec.family.name != "sdxl-refiner":
        raise UserInputError(f"--refiner_config {opt.refiner_config} is {ref_spec.family.title}, not the SDXL refiner; "
                             f"pass --refiner_config {_REFINER_CONFIG}")
    opt.refiner_config_node = config
    if opt.refiner_mode == "latent":
        refiner_steps(opt.steps, opt.refiner_strength)
        from ldm.models.diffusion.k_diffusion import K_SAMPLERS

        if sampler not in K_SAMPLERS or K_SAMPLERS[sampler][1]:
            raise UserInputError(f"--refiner_mode latent hands the latent over at one of the model's own noise levels: "
                                 f"use --sampler {', '.join(n for n, (_, k) in K_SAMPLERS.items() if not k)} (not "
                                 f"{sampler}), or --refiner_mode image")
    else:
        from ldm.models.diffusion.sampling import start_step_for_strength

        start_step_for_strength(opt.steps, opt.refiner_strength)


def micro_from_flags(opt: argparse.Namespace):
    from ldm.generate.sdxl import MicroConditioning

    defaults = MicroConditioning()
    pick = {name: getattr(opt, name, None) for name in _MICRO}
    return MicroConditioning(
        original_size=tuple(pick["original_size"]) if pick["original_size"] else None,
        crop_top_left=tuple(pick["crop_top_left"]) if pick["crop_top_left"] else defaults.crop_top_left,
        target_size=tuple(pick["target_size"]) if pick["target_size"] else None,
        aesthetic_score=defaults.aesthetic_score if pick["aesthetic_score"] is None else pick["aesthetic_score"],
        negative_aesthetic_score=(defaults.negative_aesthetic_score if pick["negative_aesthetic_score"] is None
                                  else pick["negative_aesthetic_score"]))


def attach_sdxl(opt: argparse.Namespace, plan, sd) -> None:
    """Give an SDXL pipeline its micro-conditioning and, with ``--refiner``, the loaded refiner."""
    if sd.kind != "sdxl":
        return
    sd.micro_conditioning = getattr(opt, "micro_conditioning", None) or micro_from_flags(opt).check()
    tiling = getattr(opt, "vae_tiling", "auto")
    if tiling == "auto":
        import torch

        small = plan.device.type == "cuda" and torch.cuda.get_device_properties(plan.device).total_memory < 16 * 2**30
        tiling = "on" if small else "off"
    sd.model.vae_tile = 64 if tiling == "on" else None
    if not getattr(opt, "refiner", None):
        return
    from ldm.generate import StableDiffusion

    log.info("loading the SDXL refiner %s (config %s)", opt.refiner, opt.refiner_config)
    refiner = StableDiffusion.from_files(opt.refiner_config_node, opt.refiner, device=plan.device,
                                         precision=plan.dtype, hash_checkpoint=False, progress=sd.progress,
                                         exact_batches=sd.exact_batches)
    # the refiner's sizes are sgm's defaults (the image's); the aesthetic scores are the flags'
    refiner.model.vae_tile = sd.model.vae_tile
    refiner.micro_conditioning = replace(sd.micro_conditioning, original_size=None, crop_top_left=(0, 0),
                                         target_size=None)
    sd.set_refiner(refiner, opt.refiner_strength, opt.refiner_mode)
