"""Grids of the samplers (sgm's ``discretizer`` role): which timesteps or noise levels a run
visits. The model's own levels and the k-diffusion uniform grid come from
:class:`~ldm.models.diffusion.denoiser.DiscreteDenoiser` (``sigmas``, ``get_sigmas``); DPM-Solver's
time-uniform grid is :func:`ldm.models.diffusion.dpm_solver.dpm_solver.time_uniform_grid`.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ldm.errors import UserInputError

logger = logging.getLogger(__name__)

__all__ = ["DISCRETIZATIONS", "ddim_timesteps", "make_ddim_timesteps", "get_sigmas_karras"]

DISCRETIZATIONS = ("uniform", "quad")


def ddim_timesteps(ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int = 1000) -> np.ndarray:
    """The model timesteps DDIM visits, ascending (``+1`` so the first is 1, as the reference).

    ``uniform``: ``range(0, N, N // S) + 1`` (may hold more than S entries, see module doc).
    ``quad``: ``int(linspace(0, sqrt(0.8·N), S)²) + 1``.
    :raises ValueError: unknown method, S < 1 or S > N, or a schedule reaching past timestep N-1
        (e.g. uniform S=3 gives 1000, an IndexError in the reference).
    """
    n, s = int(num_ddpm_timesteps), int(num_ddim_timesteps)
    if not 1 <= s <= n:
        raise UserInputError(f"number of DDIM steps must be in 1..{n}, got {num_ddim_timesteps}")
    if ddim_discr_method == "uniform":
        steps = np.asarray(list(range(0, n, n // s)))
    elif ddim_discr_method == "quad":
        steps = (np.linspace(0, np.sqrt(n * 0.8), s) ** 2).astype(int)
    else:
        raise UserInputError(f"unknown DDIM discretisation {ddim_discr_method!r}; choose one of {DISCRETIZATIONS}")
    steps = steps.astype(np.int64) + 1
    if steps[-1] >= n:
        raise UserInputError(f"{ddim_discr_method} discretisation with {s} steps reaches timestep {steps[-1]}, past "
                             f"the model's last timestep {n - 1}; pick another step count")
    return steps


def make_ddim_timesteps(ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int = 1000,
                        verbose: bool = False) -> np.ndarray:
    """:func:`ddim_timesteps`, with a warning when the step count differs from the one asked for."""
    steps = ddim_timesteps(ddim_discr_method, num_ddim_timesteps, num_ddpm_timesteps)
    if len(steps) != int(num_ddim_timesteps):
        logger.warning("%d DDIM steps requested; the reference's '%s' discretisation gives %d",
                       int(num_ddim_timesteps), ddim_discr_method, len(steps))
    if verbose:
        logger.info("DDIM timesteps: %s", steps.tolist())
    return steps


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device=None) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: ``(sigma_max^(1/rho) + i/(n-1)·(sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``,
    then 0: ``[n + 1]``."""
    ramp = torch.linspace(0, 1, n, device=device)
    min_inv, max_inv = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])
