"""``DiffusionWrapper``: how a diffusion model's conditioning reaches its UNet (``diffusion_model``).

Importable from ``ldm.models.diffusion.ddpm`` as in the reference; it lives here so that ddpm.py
keeps to the model math.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ldm.util import instantiate_from_config

__all__ = ["DiffusionWrapper", "CONDITIONING_KEYS"]

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm", "hybrid-adm", "crossattn-adm")


class DiffusionWrapper(nn.Module):
    """Routes conditioning into the UNet (``diffusion_model``) by ``conditioning_key``:

    * ``crossattn``: context = cat(c_crossattn, dim=1)
    * ``concat``: input = cat([x, *c_concat], dim=1)
    * ``hybrid``: both (the 9-channel inpainting model: x, mask, masked-image latent)
    * ``hybrid-adm``: both, and the class label / vector ``c_adm`` (the x4 upscaler: x, the
      noise-augmented image; ``c_adm`` its noise level)
    * ``crossattn-adm``: context and ``c_adm`` (unCLIP)
    * ``adm``: class/vector conditioning ``y`` (or ``c_crossattn[0]``)
    * ``None``: unconditional.
    """

    def __init__(self, diff_model_config, conditioning_key: Optional[str]):
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"unknown conditioning_key {conditioning_key!r}; use one of "
                             f"{', '.join(k for k in CONDITIONING_KEYS if k)} or leave it unset")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: Optional[list] = None,
                c_crossattn: Optional[list] = None, y: Optional[torch.Tensor] = None,
                c_adm: Optional[torch.Tensor] = None) -> torch.Tensor:
        key = self.conditioning_key
        if key in ("concat", "hybrid", "hybrid-adm"):
            if not c_concat:
                raise ValueError(f"a {key!r} model needs c_concat conditioning")
            x = torch.cat([x, *[c.to(x.dtype) for c in c_concat]], dim=1)
        context = None
        if key in ("crossattn", "hybrid", "hybrid-adm", "crossattn-adm"):
            if not c_crossattn:
                raise ValueError(f"a {key!r} model needs c_crossattn conditioning (text embeddings)")
            context = torch.cat(c_crossattn, dim=1)
        if key == "adm":
            return self.diffusion_model(x, t, y=c_crossattn[0] if y is None else y)
        if key in ("hybrid-adm", "crossattn-adm"):
            if c_adm is None:
                raise ValueError(f"a {key!r} model needs c_adm conditioning (its class label or vector)")
            return self.diffusion_model(x, t, context=context, y=c_adm)
        return self.diffusion_model(x, t, context=context)
