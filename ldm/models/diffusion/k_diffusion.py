"""The k-diffusion family (Karras et al. 2022 formulation) behind the reference's ``sample(...)``
surface: ``KDiffusionSampler(model, "euler_a")``.

The samplers themselves are the functions of :mod:`ldm.models.diffusion.solvers` and the model
adapter is :class:`~ldm.models.diffusion.denoiser.DiscreteDenoiser` (k-diffusion's
``CompVisDenoiser``); both are re-exported here under their k-diffusion names.
"""
from __future__ import annotations

import torch

from ldm.errors import UserInputError
from ldm.models.diffusion.denoiser import CompVisDenoiser, DiscreteDenoiser
from ldm.models.diffusion.catalog import resolve_eta, sampler_info
from ldm.models.diffusion.sampling import Sampler, SamplingPlan
from ldm.models.diffusion.discretization import get_sigmas_karras
from ldm.models.diffusion.solvers import (_lms_coefficient, get_ancestral_step, sample_dpmpp_2m,  # noqa: F401
                                          sample_euler, sample_euler_ancestral, sample_heun, sample_lms)

__all__ = [
    "CompVisDenoiser",
    "get_sigmas_karras",
    "get_ancestral_step",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lms",
    "sample_dpmpp_2m",
    "K_SAMPLERS",
    "KDiffusionSampler",
]

#: name -> (sampler function, Karras noise levels?)
K_SAMPLERS = {
    "euler": (sample_euler, False),
    "euler_a": (sample_euler_ancestral, False),
    "heun": (sample_heun, False),
    "dpmpp_2m": (sample_dpmpp_2m, False),
    "dpmpp_2m_karras": (sample_dpmpp_2m, True),
    "lms": (sample_lms, False),
}


class KDiffusionSampler(Sampler):
    """A k-diffusion-style sampler behind the reference's ``sample(...)`` surface.

    :param model: the diffusion model.
    :param sampler: one of :data:`K_SAMPLERS` (``euler``, ``euler_a``, ``heun``, ``dpmpp_2m``,
        ``dpmpp_2m_karras``, ``lms``).

    ``S`` steps use ``S`` noise levels at timesteps ``linspace(999, 0, S)`` (the ``_karras``
    variant: Karras et al. levels between the model's ``sigma_min`` and ``sigma_max``, rho 7), then
    0, so the result is a fully denoised latent (DDIM stops at ``alphas_cumprod[0]`` instead).
    The start noise ``x_T`` is scaled by ``sigma_max`` (k-diffusion's convention); for img2img
    (``start_step = k``) the start is ``x0 + sigmas[k]·x_T``. ``eta`` is Euler ancestral's noise
    amount (default 1; 0 makes it plain Euler); the others are deterministic. The model is called
    at fractional timesteps (log-sigma interpolation). ``intermediates["x_inter"]`` hold the state
    rescaled to the model's latent scaling.
    """

    def __init__(self, model, sampler: str = "euler", device=None):
        super().__init__(model, device)
        if sampler not in K_SAMPLERS:
            raise UserInputError(f"unknown k-diffusion sampler {sampler!r}; choose one of {sorted(K_SAMPLERS)}")
        self.name = self.sampler_name = sampler
        self.sample_fn, self.karras = K_SAMPLERS[sampler]
        self.stochastic = sampler_info(sampler).default_eta is not None
        self.desc = f"{sampler} sampler"
        self.levels = DiscreteDenoiser(None, self.model.alphas_cumprod.detach().to(self.device, torch.float32))
        self.sigmas = None

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Set ``sigmas`` (``[S + 1]``, ending at 0) for ``S`` steps."""
        if ddim_discretize != "uniform":
            raise UserInputError(f"{self.sampler_name}: ddim_discretize must be 'uniform', got {ddim_discretize!r}")
        if not isinstance(ddim_num_steps, int) or ddim_num_steps < 1:
            raise UserInputError(f"number of steps must be a positive int, got {ddim_num_steps!r}")
        resolve_eta(self.name, ddim_eta)
        if self.karras:
            self.sigmas = get_sigmas_karras(ddim_num_steps, self.levels.sigma_min.item(),
                                            self.levels.sigma_max.item(), device=self.device)
        else:
            self.sigmas = self.levels.get_sigmas(ddim_num_steps)

    def _plan(self, steps, eta, temperature, verbose=False) -> SamplingPlan:
        self.make_schedule(steps, ddim_eta=eta or 0.0, verbose=verbose)
        options = {"eta": eta, "s_noise": temperature} if self.stochastic else {}
        return SamplingPlan(self.sigmas, self.sample_fn, options, timesteps="interpolate", noise_times_sigma=True)
