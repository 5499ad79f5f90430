"""``sgm.modules.diffusionmodules.sampling``: sgm's sampler objects (``sampler(denoiser, x, cond, uc)``)
as adapters over the solver functions of :mod:`ldm.models.diffusion.solvers`.

Every sampler: levels ``sigmas = discretization(num_steps)`` (``[n + 1]``, ending at 0), the start
``x·sqrt(1 + sigmas[0]²)`` (the VP noise taken to sigma space, **not** ``x·sigma_max``), and a guided
denoiser ``D(x, s) = guider(denoiser(*guider.prepare_inputs(x, s, cond, uc)))``; ``uc`` defaults to
``cond``. The solver then runs in sigma space:

* ``EulerEDMSampler`` (``s_churn`` 0): :func:`~ldm.models.diffusion.solvers.sample_euler`;
* ``HeunEDMSampler`` (``s_churn`` 0): :func:`~ldm.models.diffusion.solvers.sample_heun`;
* ``EulerAncestralSampler``: :func:`~ldm.models.diffusion.solvers.sample_euler_ancestral`;
* ``DPMPP2MSampler``: :func:`~ldm.models.diffusion.solvers.sample_dpmpp_2m` (first step and the
  step to 0 first order);
* ``LinearMultistepSampler``: :func:`~ldm.models.diffusion.solvers.sample_lms`.

Stochastic churn (``s_churn > 0``) and ``DPMPP2SAncestralSampler`` are not provided (a clear error).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch

from ldm.models.diffusion import solvers
from ldm.util import instantiate_from_config

__all__ = ["BaseDiffusionSampler", "EulerEDMSampler", "HeunEDMSampler", "EulerAncestralSampler", "DPMPP2MSampler",
           "LinearMultistepSampler", "DPMPP2SAncestralSampler"]

_IDENTITY_GUIDER = {"target": "sgm.modules.diffusionmodules.guiders.IdentityGuider"}


class BaseDiffusionSampler:
    solver: Callable = None

    def __init__(self, discretization_config: Mapping[str, Any], num_steps: Optional[int] = None,
                 guider_config: Optional[Mapping[str, Any]] = None, verbose: bool = False, device: Any = "cuda"):
        self.num_steps = num_steps
        self.discretization = instantiate_from_config(discretization_config)
        self.guider = instantiate_from_config(guider_config or _IDENTITY_GUIDER)
        self.verbose = verbose
        self.device = device  # unused: tensors go where x is

    def prepare_sampling_loop(self, x: torch.Tensor, cond: Mapping, uc: Optional[Mapping] = None,
                              num_steps: Optional[int] = None):
        n = num_steps or self.num_steps
        if not n:
            raise ValueError(f"{type(self).__name__}: give num_steps")
        sigmas = self.discretization(n, device=x.device)
        x = x * torch.sqrt(1.0 + sigmas[0] ** 2.0)
        return x, sigmas, cond, cond if uc is None else uc

    def denoise(self, x: torch.Tensor, denoiser: Callable, sigma: torch.Tensor, cond: Mapping, uc: Mapping):
        return self.guider(denoiser(*self.guider.prepare_inputs(x, sigma, cond, uc)), sigma)

    def solver_options(self) -> dict:
        return {}

    def __call__(self, denoiser: Callable, x: torch.Tensor, cond: Mapping, uc: Optional[Mapping] = None,
                 num_steps: Optional[int] = None, callback: Optional[Callable] = None) -> torch.Tensor:
        """:param denoiser: ``denoiser(x [B', ...], sigma [B'], cond) -> D`` (sgm's
            ``lambda x, s, c: model.denoiser(model.model, x, s, c)``).
        :param x: ``[B, C, H, W]`` standard normal. :returns: the final ``x0`` ``[B, C, H, W]``."""
        x, sigmas, cond, uc = self.prepare_sampling_loop(x, cond, uc, num_steps)
        solver = type(self).solver
        return solver(lambda x_, s: self.denoise(x_, denoiser, s, cond, uc), x, sigmas, callback=callback,
                      **self.solver_options())


class _EDMSampler(BaseDiffusionSampler):
    def __init__(self, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 *args, **kwargs):
        super().__init__(*args, **kwargs)
        if s_churn:
            raise ValueError(f"{type(self).__name__}: s_churn > 0 (stochastic churn) is not supported; use s_churn 0 "
                             "or EulerAncestralSampler")
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = s_churn, s_tmin, s_tmax, s_noise


class EulerEDMSampler(_EDMSampler):
    solver = solvers.sample_euler


class HeunEDMSampler(_EDMSampler):
    solver = solvers.sample_heun


class EulerAncestralSampler(BaseDiffusionSampler):
    solver = solvers.sample_euler_ancestral

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.eta, self.s_noise = eta, s_noise

    def solver_options(self) -> dict:
        return {"eta": self.eta, "s_noise": self.s_noise}


class DPMPP2MSampler(BaseDiffusionSampler):
    solver = solvers.sample_dpmpp_2m


class LinearMultistepSampler(BaseDiffusionSampler):
    solver = solvers.sample_lms

    def __init__(self, order: int = 4, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.order = order

    def solver_options(self) -> dict:
        return {"order": self.order}


class DPMPP2SAncestralSampler(BaseDiffusionSampler):
    def __init__(self, *args, **kwargs):
        raise ValueError("DPMPP2SAncestralSampler is not provided; use DPMPP2MSampler, EulerEDMSampler, "
                         "EulerAncestralSampler, HeunEDMSampler or LinearMultistepSampler")
