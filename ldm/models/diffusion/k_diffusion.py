"""The k-diffusion family (Karras et al. 2022 formulation) on CompVis-style models.

A sampler here is a short function over a *denoiser* ``D(x, sigma) -> x0`` and a 1-D tensor of
noise levels ``sigmas`` (decreasing, usually ending at 0), in the sigma-scaled space
``x = x_t / sqrt(a)`` where ``x = x0 + sigma·eps`` and ``sigma = sqrt((1 - a)/a)``:

    fn(denoiser, x, sigmas, extra_args=None, callback=None, generator=None, ...) -> x

``callback`` receives ``{"i", "x" (after step i), "sigma", "sigma_next", "denoised"}``.
:class:`CompVisDenoiser` adapts a model (through :class:`NoisePredictor`: guidance, v-prediction,
inpainting mask) into such a denoiser; :class:`KDiffusionSampler` gives them the common
``sample(...)`` surface (``KDiffusionSampler(model, "euler_a")``).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from ldm.errors import UserInputError
from ldm.models.diffusion.sampling import Generator, NoisePredictor, Sampler, check_deterministic_eta, randn

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


# --------------------------------------------------------------------------------------------
# the denoiser adapter and noise levels
# --------------------------------------------------------------------------------------------
class CompVisDenoiser:
    """``D(x, sigma)`` for a discrete-time eps/v model with ``alphas_cumprod`` (k-diffusion's
    ``CompVisDenoiser`` / ``CompVisVDenoiser``).

    The model's noise levels are ``sigmas[n] = sqrt((1 - a_n)/a_n)``; a level ``sigma`` maps to the
    fractional timestep ``t`` that interpolates ``log sigma`` linearly between neighbouring ``n``.
    The model sees ``x_t = c_in·x`` with ``c_in = 1/sqrt(sigma² + 1) = sqrt(a)`` and the result is
    ``x - sigma·eps``.

    :param eps_fn: ``eps_fn(x_t, t [B], alpha_bar [B,1,1,1]) -> eps`` (a :class:`NoisePredictor`);
        None when only the schedule helpers are needed.
    :param alphas_cumprod: ``[N]``.
    """

    def __init__(self, eps_fn: Optional[Callable], alphas_cumprod: torch.Tensor):
        ac = alphas_cumprod.detach().float()
        self.eps_fn = eps_fn
        self.sigmas = ((1 - ac) / ac) ** 0.5
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional model timestep of noise level ``sigma`` (log-sigma interpolation)."""
        log_sigma = sigma.log()
        n = len(self.log_sigmas)
        lo = (torch.searchsorted(self.log_sigmas, log_sigma.reshape(-1).contiguous(), right=True) - 1)
        lo = lo.clamp(0, n - 2).reshape(log_sigma.shape)
        w = ((log_sigma - self.log_sigmas[lo]) / (self.log_sigmas[lo + 1] - self.log_sigmas[lo])).clamp(0, 1)
        return lo + w

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level at (fractional) timestep ``t``."""
        t = t.float()
        lo, hi = t.floor().long(), t.ceil().long()
        w = t - lo
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def get_sigmas(self, n: int) -> torch.Tensor:
        """``n`` levels at timesteps ``linspace(N-1, 0, n)``, then 0: ``[n + 1]``."""
        t = torch.linspace(len(self.sigmas) - 1, 0, n, device=self.sigmas.device)
        return torch.cat([self.t_to_sigma(t), t.new_zeros(1)])

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """:param x: ``[B,C,H,W]`` sigma-scaled; :param sigma: ``[B]``. :returns: denoised ``[B,C,H,W]``."""
        sigma = sigma.to(x.dtype)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        c_in = 1 / (s ** 2 + 1) ** 0.5
        eps = self.eps_fn(x * c_in, self.sigma_to_t(sigma), c_in ** 2)
        return x - s * eps


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device=None) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: ``(sigma_max^(1/rho) + i/(n-1)·(sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``,
    then 0: ``[n + 1]``."""
    ramp = torch.linspace(0, 1, n, device=device)
    min_inv, max_inv = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0):
    """Split a step ``sigma_from -> sigma_to`` into a deterministic step to ``sigma_down`` and fresh
    noise ``sigma_up`` with ``sigma_down² + sigma_up² = sigma_to²`` (eta 1: the DDPM ancestral step)."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def _to_d(x, sigma, denoised):
    """ODE derivative ``dx/dsigma = (x - D(x; sigma)) / sigma`` (Karras et al. 2022, eq. 3 with sigma(t) = t)."""
    return (x - denoised) / sigma


def _report(callback, i, x, sigmas, denoised):
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})


# --------------------------------------------------------------------------------------------
# samplers
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_euler(denoiser, x, sigmas, extra_args=None, callback=None, generator: Generator = None):
    """Euler's method on the probability-flow ODE: Karras et al. 2022, Algorithm 2 without
    stochastic churn (gamma = 0) and without the Heun correction. One model call per step."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        _report(callback, i, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, extra_args=None, callback=None, generator: Generator = None,
                           eta: float = 1.0, s_noise: float = 1.0):
    """Ancestral sampling with Euler steps (k-diffusion's ``sample_euler_ancestral``): an Euler step
    to ``sigma_down`` then fresh noise of size ``sigma_up`` (:func:`get_ancestral_step`; eta 1 is
    the DDPM ancestral sampler of Ho et al. 2020 in sigma form). ``s_noise`` scales the noise."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0 and sigma_up > 0:
            x = x + randn(x.shape, generator, x.device, x.dtype) * (s_noise * sigma_up)
        _report(callback, i, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, extra_args=None, callback=None, generator: Generator = None):
    """Heun's second-order method: Karras et al. 2022, Algorithm 1 (deterministic). The step to
    ``sigma = 0`` is a plain Euler step, so n steps cost 2n - 1 model calls."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        d = _to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigmas[i + 1], denoiser(x_2, sigmas[i + 1] * s_in, **extra_args))
            x = x + (d + d_2) / 2 * dt
        _report(callback, i, x, sigmas, denoised)
    return x


def _lms_coefficient(sigmas: np.ndarray, i: int, j: int, order: int) -> float:
    """``∫_{sigma_i}^{sigma_{i+1}} L_j(s) ds`` for the Lagrange basis polynomial ``L_j`` through
    ``sigmas[i], sigmas[i-1], ..., sigmas[i-order+1]`` (exact polynomial integration, float64)."""
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
    antiderivative = poly.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


@torch.no_grad()
def sample_lms(denoiser, x, sigmas, extra_args=None, callback=None, generator: Generator = None, order: int = 4):
    """Linear multistep (Adams–Bashforth type) on the probability-flow ODE in sigma, with the
    variable-step coefficients of k-diffusion's ``sample_lms`` (Crowson): the last ``order``
    derivatives weighted by integrals of their Lagrange basis polynomials over the step."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    sigmas_np = sigmas.detach().cpu().double().numpy()
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        ds = (ds + [_to_d(x, sigmas[i], denoised)])[-order:]
        cur_order = min(i + 1, order)
        coeffs = [_lms_coefficient(sigmas_np, i, j, cur_order) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        _report(callback, i, x, sigmas, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, extra_args=None, callback=None, generator: Generator = None):
    """DPM-Solver++(2M): Lu et al. 2022, Algorithm 2, in sigma form (k-diffusion's
    ``sample_dpmpp_2m``). With ``lambda = -log sigma`` and ``h = lambda_next - lambda``::

        x_next = sigma_next/sigma·x - (e^{-h} - 1)·D,   D = (1 + 1/(2r))·x0_i - 1/(2r)·x0_{i-1},  r = h_prev/h

    First step and the step to ``sigma = 0`` are first order (``D = x0_i``)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
            h = t_next - t
            if old_denoised is None:
                d = denoised
            else:
                r = (t - (-sigmas[i - 1].log())) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * d
        old_denoised = denoised
        _report(callback, i, x, sigmas, denoised)
    return x


#: name -> (sampler function, Karras noise levels?, stochastic?)
K_SAMPLERS = {
    "euler": (sample_euler, False, False),
    "euler_a": (sample_euler_ancestral, False, True),
    "heun": (sample_heun, False, False),
    "dpmpp_2m": (sample_dpmpp_2m, False, False),
    "dpmpp_2m_karras": (sample_dpmpp_2m, True, False),
    "lms": (sample_lms, False, False),
}


# --------------------------------------------------------------------------------------------
# the common sample(...) surface
# --------------------------------------------------------------------------------------------
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
    amount (default 1; 0 makes it plain Euler); the others are deterministic.
    ``intermediates["x_inter"]`` hold the state rescaled to the model's latent scaling.
    """

    def __init__(self, model, sampler: str = "euler", device=None):
        super().__init__(model, device)
        if sampler not in K_SAMPLERS:
            raise UserInputError(f"unknown k-diffusion sampler {sampler!r}; choose one of {sorted(K_SAMPLERS)}")
        self.sampler_name = sampler
        self.sample_fn, self.karras, self.stochastic = K_SAMPLERS[sampler]
        self.desc = f"{sampler} sampler"
        self.levels = CompVisDenoiser(None, self.model.alphas_cumprod.detach().to(self.device, torch.float32))
        self.sigmas = None

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Set ``sigmas`` (``[S + 1]``, ending at 0) for ``S`` steps."""
        if ddim_discretize != "uniform":
            raise UserInputError(f"{self.sampler_name}: ddim_discretize must be 'uniform', got {ddim_discretize!r}")
        if not isinstance(ddim_num_steps, int) or ddim_num_steps < 1:
            raise UserInputError(f"number of steps must be a positive int, got {ddim_num_steps!r}")
        if not self.stochastic:
            check_deterministic_eta(self.sampler_name, ddim_eta)
        if self.karras:
            self.sigmas = get_sigmas_karras(ddim_num_steps, self.levels.sigma_min.item(),
                                            self.levels.sigma_max.item(), device=self.device)
        else:
            self.sigmas = self.levels.get_sigmas(ddim_num_steps)

    def _prepare(self, S, eta, verbose):
        if self.stochastic:
            eta = 1.0 if eta is None else float(eta)
            if eta < 0:
                raise UserInputError(f"eta must be >= 0, got {eta}")
        self.make_schedule(S, ddim_eta=0.0 if self.stochastic or eta is None else eta, verbose=verbose)
        return S, eta

    def _start(self, noise, x0, start_step):
        sigma = self.sigmas[start_step].to(noise.device)
        return noise * sigma if start_step == 0 else x0 + sigma * noise

    def _latent(self, state, step):
        return state / (self.sigmas[step].to(state.device) ** 2 + 1) ** 0.5

    def _run(self, x, predictor: NoisePredictor, start_step, generator, temperature, progress, eta):
        denoiser = CompVisDenoiser(predictor, self.model.alphas_cumprod.detach().to(x.device, torch.float32))
        sigmas = self.sigmas[start_step:].to(x.device)

        def report(info):
            latent = info["x"] / (info["sigma_next"] ** 2 + 1) ** 0.5
            progress(info["i"], latent, info["denoised"])

        kwargs = dict(eta=eta, s_noise=temperature) if self.stochastic else {}
        return self.sample_fn(denoiser, x, sigmas, callback=report, generator=generator, **kwargs)
