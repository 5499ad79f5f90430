"""The reference's "vanilla" sampling (``scripts/sample_diffusion.py -v``): DDPM ancestral sampling
over every one of the model's timesteps (``LatentDiffusion.p_sample_loop``).

That loop draws ``x_{t-1} ~ N(coef1·x0 + coef2·x_t, beta~_t)`` for ``t = N-1, ..., 0`` with
``x0`` predicted from eps (clamped to [-1, 1] only when ``model.clip_denoised``: never for
``LatentDiffusion``) and no noise at ``t = 0``. That posterior is exactly a DDIM step with
eta 1 between consecutive timesteps (``sigma_t(1)² = beta~_t``; the means agree term by term),
and at ``t = 0`` (``alphas_cumprod_prev[0] = 1``) it returns ``x0``. So this is
:class:`~ldm.models.diffusion.ddim.DDIMSampler` on its ``use_original_steps`` grid (all ``N``
timesteps, ending at noise level 0) with eta 1: the same solver, no second implementation.
"""
from __future__ import annotations

from typing import Optional

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.sampling import SamplingPlan

__all__ = ["VanillaDDPMSampler"]


class VanillaDDPMSampler(DDIMSampler):
    """DDPM ancestral sampling over all ``model.num_timesteps`` steps; ``S`` and ``eta`` of
    ``sample(...)`` are ignored (the step count is the model's, the noise that of eta 1)."""

    name = "ddim"  # eta rules of DDIM (any eta is accepted and replaced by 1)
    desc = "DDPM Sampler"

    def _plan(self, steps: int, eta: Optional[float], temperature: float, verbose: bool = False) -> SamplingPlan:
        return self._plan_from(self.ddpm_num_timesteps - 1, True, 1.0, temperature)

    def denoiser(self, *args, **kwargs):
        inner = super().denoiser(*args, **kwargs)
        if not getattr(self.model, "clip_denoised", False):
            return inner
        return lambda x, sigma: inner(x, sigma).clamp(-1.0, 1.0)
