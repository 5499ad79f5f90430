"""SD 2 depth2img: a latent diffusion model conditioned on a depth map as well as on text.

The conditioning (``LatentDepth2ImageDiffusion`` and ``scripts/streamlit/depth2img.py`` of the
reference):

* ``d = depth_model(midas_in)``: the MiDaS DPT-Hybrid prediction (relative inverse depth, larger =
  nearer) of the image, at the MiDaS input size (:mod:`ldm.modules.midas.api`);
* ``d`` resized to the latent size (bicubic, ``align_corners=False``) and mapped per image to
  [-1, 1]: ``2·(d − min)/(max − min) − 1`` (the apps; the training ``get_input`` adds 0.001 to the
  denominator, ``eps`` here);
* the UNet input is ``cat([z, d])`` (5 channels) with the text through cross-attention (``hybrid``:
  ``{"c_concat": [d], "c_crossattn": [c]}``); the unconditional branch keeps the same depth.

:class:`DepthConditioning` holds all of it; ``ddpm.LatentDepth2ImageDiffusion`` (the config's target)
is it over ``LatentDiffusion``. It lives here, as a mixin, so that ddpm.py does not import a module
that imports it.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldm.util import instantiate_from_config

__all__ = ["DepthConditioning", "normalize_depth"]

log = logging.getLogger(__name__)


def _keep_eval(self, mode: bool = True):
    return self


def normalize_depth(depth: torch.Tensor, size=None, eps: float = 0.0) -> torch.Tensor:
    """``depth`` ``[B, 1, h, w]`` -> bicubic to ``size`` (when given) -> per image
    ``2·(d − min)/(max − min + eps) − 1``, in float32. An image whose depth is flat (max = min) maps
    to 0 everywhere (the reference divides by zero)."""
    d = depth.float()
    if size is not None and tuple(d.shape[-2:]) != tuple(size):
        d = F.interpolate(d, size=tuple(size), mode="bicubic", align_corners=False)
    lo, hi = torch.amin(d, dim=(1, 2, 3), keepdim=True), torch.amax(d, dim=(1, 2, 3), keepdim=True)
    span = hi - lo + eps
    flat = span == 0
    if bool(flat.any()):
        log.warning("the depth map of %d image(s) is flat (one value everywhere): it carries no depth", int(flat.sum()))
    return torch.where(flat, torch.zeros_like(d), 2.0 * (d - lo) / torch.where(flat, torch.ones_like(span), span) - 1.0)


class DepthConditioning(nn.Module):
    """The depth part of the SD 2 depth model; mixed in before ``LatentDiffusion``.

    :param depth_stage_config: the depth estimator (``depth_model.*`` keys; MiDaS DPT-Hybrid).
    :param concat_keys: batch keys of the concatenated conditioning (training; the first is the MiDaS input).
    :param finetune_keys, keep_finetune_dims, c_concat_log_start, c_concat_log_end: the reference's
        ``LatentFinetuneDiffusion`` options (fine-tuning from a 4-channel checkpoint and logging);
        accepted so its configs load, not used at inference.
    """

    #: what a checkpoint lacking these keys lacks, for the loader's one-line error (:mod:`ldm.checkpoint`)
    checkpoint_parts = {
        "depth_model.": "the weights of the MiDaS depth model (depth_model.*, DPT-Hybrid) that depth2img needs; "
                        "use the full 512-depth-ema.ckpt of stabilityai/stable-diffusion-2-depth, which carries "
                        "them (a file saved without them cannot estimate depth)",
    }

    def __init__(self, depth_stage_config, concat_keys=("midas_in",), finetune_keys=None, keep_finetune_dims: int = 4,
                 c_concat_log_start=None, c_concat_log_end=None, *args, **kwargs):
        ckpt_path, ignore_keys = kwargs.pop("ckpt_path", None), kwargs.pop("ignore_keys", ())
        super().__init__(*args, **kwargs)
        self.concat_keys = tuple(concat_keys)
        self.depth_stage_key = self.concat_keys[0]
        self.finetune_keys, self.keep_dims = finetune_keys, keep_finetune_dims
        model = instantiate_from_config(depth_stage_config).eval()
        model.train = _keep_eval.__get__(model)
        self.depth_model = model.requires_grad_(False)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    @torch.no_grad()
    def estimate_depth(self, image: torch.Tensor) -> torch.Tensor:
        """MiDaS's prediction for ``image`` ``[B, 3, H, W]`` in [-1, 1]: ``[B, 1, h, w]`` float32 at the
        MiDaS input size (``AddMiDaS``, then ``MiDaSInference``)."""
        from ldm.modules.midas.api import midas_transform

        midas_in = midas_transform(image)
        dtype = next(self.depth_model.parameters()).dtype
        return self.depth_model(midas_in.to(dtype)).float()

    @torch.no_grad()
    def depth_conditioning(self, image: torch.Tensor, latent_size, depth: Optional[torch.Tensor] = None,
                           eps: float = 0.0) -> torch.Tensor:
        """The ``c_concat`` depth ``[B, 1, h, w]`` in [-1, 1] at ``latent_size``: of MiDaS's estimate for
        ``image``, or of ``depth`` ``[B, 1, H', W']`` (any size, larger = nearer) when given."""
        if depth is None:
            depth = self.estimate_depth(image)
        return normalize_depth(depth, latent_size, eps)
