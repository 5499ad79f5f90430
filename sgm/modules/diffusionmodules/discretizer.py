"""``sgm.modules.diffusionmodules.discretizer``: noise-level grids as sgm computes them.

``LegacyDDPMDiscretization`` (SDXL): ``ᾱ`` of the scaled-linear betas in float64
(:func:`ldm.modules.diffusionmodules.util.make_beta_schedule`), then
``sigma_t = sqrt(float32((1 - ᾱ_t)/ᾱ_t))`` -- the ratio in float64, the square root in float32.
``n < 1000`` levels sit at timesteps ``linspace(999, 0, n, endpoint=False).astype(int)``
(n = 10: 999, 899, ..., 99). ``discretization(n)`` gives them noisiest first with a 0 appended
(``[n + 1]``); the denoiser's table is ``(1000, do_append_zero=False, flip=True)``: ascending.
"""
from __future__ import annotations

import numpy as np
import torch

from ldm.models.diffusion.discretization import get_sigmas_karras
from ldm.modules.diffusionmodules.util import make_beta_schedule

__all__ = ["Discretization", "LegacyDDPMDiscretization", "EDMDiscretization", "generate_roughly_equally_spaced_steps"]


def generate_roughly_equally_spaced_steps(num_substeps: int, max_step: int) -> np.ndarray:
    """``num_substeps`` integer timesteps in ``[0, max_step)``, ascending: ``linspace(max_step - 1,
    0, num_substeps, endpoint=False).astype(int)`` reversed."""
    return np.linspace(max_step - 1, 0, num_substeps, endpoint=False).astype(int)[::-1]


class Discretization:
    def __call__(self, n: int, do_append_zero: bool = True, device="cpu", flip: bool = False) -> torch.Tensor:
        """``[n (+1)]`` levels, descending (``flip``: ascending), with a final 0 when ``do_append_zero``."""
        sigmas = self.get_sigmas(int(n), device=device)
        if do_append_zero:
            sigmas = torch.cat([sigmas, sigmas.new_zeros([1])])
        return sigmas if not flip else torch.flip(sigmas, (0,))

    def get_sigmas(self, n: int, device="cpu") -> torch.Tensor:
        raise NotImplementedError


class LegacyDDPMDiscretization(Discretization):
    def __init__(self, linear_start: float = 0.00085, linear_end: float = 0.012, num_timesteps: int = 1000):
        self.num_timesteps = num_timesteps
        betas = make_beta_schedule("linear", num_timesteps, linear_start=linear_start, linear_end=linear_end)
        self.alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64), axis=0)

    def get_sigmas(self, n: int, device="cpu") -> torch.Tensor:
        if n > self.num_timesteps:
            raise ValueError(f"{n} levels asked of a {self.num_timesteps}-step schedule")
        ac = self.alphas_cumprod
        if n < self.num_timesteps:
            ac = ac[generate_roughly_equally_spaced_steps(n, self.num_timesteps)]
        sigmas = torch.tensor((1 - ac) / ac, dtype=torch.float32, device=device) ** 0.5
        return torch.flip(sigmas, (0,))


class EDMDiscretization(Discretization):
    """Karras et al. 2022 levels (``rho``), descending."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho

    def get_sigmas(self, n: int, device="cpu") -> torch.Tensor:
        return get_sigmas_karras(n, self.sigma_min, self.sigma_max, self.rho, device=device)[:-1]
