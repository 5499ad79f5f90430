"""``sgm.modules.diffusionmodules.guiders``: sgm's guider interface over
:mod:`ldm.models.diffusion.guidance` (``cat([uc, c])``, then ``D_u + scale·(D_c - D_u)`` on the
denoised output)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ldm.models.diffusion.guidance import VanillaCFG as _VanillaCFG
from ldm.models.diffusion.guidance import cat_cond

__all__ = ["IdentityGuider", "VanillaCFG"]


class IdentityGuider:
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x

    def prepare_inputs(self, x: torch.Tensor, s: torch.Tensor, c: Mapping, uc: Mapping):
        return x, s, c


class VanillaCFG:
    """:param scale: guidance scale. :param dyn_thresh_config: the release commit's
    ``NoDynamicThresholding`` (the same ``u + scale·(c - u)``); anything else is refused."""

    def __init__(self, scale: float, dyn_thresh_config: Optional[Mapping[str, Any]] = None):
        target = (dyn_thresh_config or {}).get("target", "")
        if target and not target.endswith("NoDynamicThresholding"):
            raise ValueError(f"VanillaCFG: dynamic thresholding {target!r} is not supported")
        self.scale = float(scale)
        self._combine = _VanillaCFG(scale)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self._combine(x)

    def prepare_inputs(self, x: torch.Tensor, s: torch.Tensor, c: Mapping, uc: Mapping):
        """``(cat([x, x]), cat([s, s]), cat([uc, c]))`` per conditioning key (uc first)."""
        return torch.cat([x, x]), torch.cat([s, s]), cat_cond(uc, c)
