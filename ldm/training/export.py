"""Turn a LatentDiffusion training checkpoint into a release: one ``.safetensors`` file plus the
inference config that builds the model it fits.

What changes on the way (the reference's releases did the same by hand):

* the EMA weights (``model_ema.*``) replace the UNet's training weights
  (``model.diffusion_model.*``) and the shadows are dropped (``use_ema: false``);
* a ``scale_factor`` buffer (written by ``scale_by_std: true``) becomes the config's number
  (``scale_by_std: false``, ``scale_factor: <value>``);
* training-only settings leave the model config: the first stage's ``ckpt_path``, the text
  encoder's ``freeze: false``, ``cond_stage_trainable``, ``ucg_training``, ``scheduler_config``,
  ``offset_noise_level``;
* tensors are stored as float32, or the networks as float16 with ``--half`` (the noise schedule stays
  float32; ``load_model_from_config`` casts the networks back to float32 unless asked otherwise).

Usage::

    python -m ldm.training.export --ckpt logs/<run>/checkpoints/last.ckpt \
        --config logs/<run>/configs/<time>-project.yaml \
        --out models/demo/demo.safetensors --out-config configs/demo/demo-txt2img.yaml
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import EMA_PREFIX, UNET_PREFIX, ema_key, load_model_from_config, read_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

TRAINING_ONLY_PARAMS = ("ckpt_path", "ignore_keys", "ucg_training", "scheduler_config", "scale_by_std",
                        "reset_ema", "reset_num_ema_updates", "offset_noise_level")


def inference_model_config(model_config: Mapping[str, Any], scale_factor: float) -> dict:
    """The ``model`` node for inference, from a training ``model`` node (see module doc)."""
    node = copy.deepcopy(OmegaConf.to_container(OmegaConf.create(dict(model_config)), resolve=True))
    params = node["params"]
    for key in TRAINING_ONLY_PARAMS:
        params.pop(key, None)
    params.update(use_ema=False, scale_factor=float(scale_factor), cond_stage_trainable=False)
    params["first_stage_config"].get("params", {}).pop("ckpt_path", None)
    cond_params = params.get("cond_stage_config", {}).get("params")
    if isinstance(cond_params, dict):
        cond_params.pop("freeze", None)
    return node


def release_state_dict(state_dict: Mapping[str, torch.Tensor], use_ema: bool = True,
                       dtype: Optional[torch.dtype] = None) -> dict:
    """The training state dict with the EMA weights in the UNet, no shadows, no ``scale_factor``."""
    sd = dict(state_dict)
    unet_keys = [k for k in sd if k.startswith(UNET_PREFIX)]
    if use_ema:
        missing = [k for k in unet_keys if ema_key(k) not in sd]
        if missing:
            raise ValueError(f"the checkpoint has no EMA shadow for {missing[0]} (trained with use_ema: false?); "
                             "export with --no-ema")
        for k in unet_keys:
            sd[k] = sd[ema_key(k)]
    sd = {k: v for k, v in sd.items() if not k.startswith(EMA_PREFIX) and k != "scale_factor"}
    if dtype is not None:
        # networks only: the noise schedule (root-level buffers such as alphas_cumprod) stays float32
        sd = {k: v.to(dtype) if v.is_floating_point() and "." in k else v for k, v in sd.items()}
    return {k: v.contiguous() for k, v in sd.items()}


def export(ckpt: str, train_config: str, out: str, out_config: str, use_ema: bool = True, half: bool = False,
           extra_sections: Optional[Mapping[str, Any]] = None) -> dict:
    """Write the release weights and config; returns the inference config. Loads the result back
    with :func:`ldm.checkpoint.load_model_from_config` to prove the two fit."""
    checkpoint = read_checkpoint(ckpt)
    config = OmegaConf.load(train_config)
    sd = checkpoint.state_dict
    params = config.model.params
    if "scale_factor" in sd:
        scale = float(sd["scale_factor"])
    else:
        scale = float(params.get("scale_factor", 1.0))
    model_node = inference_model_config(config.model, scale)
    release = release_state_dict(sd, use_ema=use_ema, dtype=torch.float16 if half else None)
    inference = {"model": model_node}
    if extra_sections:
        inference.update(OmegaConf.to_container(OmegaConf.create(dict(extra_sections)), resolve=True))
    load_model_from_config(inference, release)  # raises CheckpointError on any mismatch
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(release, out, global_step=checkpoint.global_step)
    Path(out_config).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(inference), out_config)
    size = Path(out).stat().st_size
    log.info("wrote %s (%.1f MB, %d tensors, step %s) and %s; scale_factor %.6f", out, size / 1e6, len(release),
             checkpoint.global_step, out_config, scale)
    return inference


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description="Export a LatentDiffusion training checkpoint as a release.")
    p.add_argument("--ckpt", required=True, help="training checkpoint (logs/<run>/checkpoints/last.ckpt)")
    p.add_argument("--config", required=True, help="the run's project config (logs/<run>/configs/*-project.yaml)")
    p.add_argument("--out", required=True, help="output .safetensors (never overwritten)")
    p.add_argument("--out-config", required=True, help="output inference YAML")
    p.add_argument("--no-ema", action="store_true", help="keep the training weights instead of the EMA weights")
    p.add_argument("--half", action="store_true", help="store float16 tensors")
    p.add_argument("--section", action="append", default=[], metavar="KEY=VALUE",
                   help="extra top-level YAML entries for the inference config, dotlist style "
                        "(e.g. demo.safety_checker=false)")
    opt = p.parse_args(argv)
    from ldm.checkpoint import CheckpointError

    bad = [s for s in opt.section if "=" not in s]
    if bad:
        print(f"error: --section wants KEY=VALUE, got {bad}", file=sys.stderr)
        return 2
    extra = OmegaConf.from_dotlist(opt.section) if opt.section else None
    if extra is not None and "model" in extra:
        print("error: --section cannot set model.*; edit the training config instead", file=sys.stderr)
        return 2
    try:
        export(opt.ckpt, opt.config, opt.out, opt.out_config, use_ema=not opt.no_ema, half=opt.half,
               extra_sections=extra)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
