"""The samplers, each a short function over a denoiser and a 1-D tensor of noise levels
(k-diffusion's ``k_diffusion/sampling.py`` style)::

    x = fn(denoiser, x, sigmas, *, callback=None, generator=None, **options)

* ``denoiser(x [B,C,H,W], sigma [B]) -> x0`` (a :class:`~ldm.models.diffusion.denoiser.DiscreteDenoiser`);
* ``x`` is in sigma space, ``x = x0 + sigma·eps`` (a VP latent ``x_t`` is ``x·sqrt(a)``);
* ``sigmas`` ``[n + 1]``: the levels visited, noisiest first; ``n`` steps. The k-diffusion grids
  end at 0 (fully denoised); the reference's DDIM/PLMS/DPM-Solver grids end at the model's
  smallest level (``alphas_cumprod[0]``), as the reference did;
* ``callback({"i", "x" (after step i), "sigma", "sigma_next", "denoised"})`` after each step;
* every random tensor comes from :func:`ldm.models.diffusion.sampling.randn` with ``generator``.

The reference samplers in this form: DDIM is :func:`sample_euler_ancestral` (eta 0: exactly
:func:`sample_euler`), because a DDIM step is an Euler step of the probability-flow ODE in sigma
(Karras et al. 2022, sec. 3), and DDIM's ``sigma_t(eta)`` is the ancestral split of
:func:`get_ancestral_step`. PLMS is :func:`sample_plms`. The reference's ``--dpm_solver`` and the
k-diffusion ``dpmpp_2m`` are both :func:`sample_dpmpp_2m`, on different grids.
"""
from __future__ import annotations

import numpy as np
import torch

from ldm.models.diffusion.sampling import Generator, randn

__all__ = ["get_ancestral_step", "to_d", "sample_euler", "sample_euler_ancestral",
           "sample_heun", "sample_lms", "sample_plms", "sample_dpmpp_2m"]


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0):
    """Split a step ``sigma_from -> sigma_to`` into a deterministic step to ``sigma_down`` and fresh
    noise ``sigma_up`` with ``sigma_down² + sigma_up² = sigma_to²``:
    ``sigma_up = eta·sigma_to·sqrt(sigma_from² - sigma_to²)/sigma_from`` (capped at ``sigma_to``).
    eta 1 is the DDPM ancestral step; for any eta it is DDIM's ``sigma_t`` (Song et al. 2021, eq. 16)
    divided by ``sqrt(a_prev)``."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """ODE derivative ``dx/dsigma = (x - D(x; sigma)) / sigma`` (Karras et al. 2022, eq. 3 with
    sigma(t) = t); it is the noise estimate ``eps``."""
    return (x - denoised) / sigma


def _report(callback, i, x, sigma, sigma_next, denoised):
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, callback=None, generator: Generator = None):
    """Euler's method on the probability-flow ODE: Karras et al. 2022, Algorithm 2 without
    stochastic churn. One model call per step. On the DDIM grid this is DDIM with eta 0."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        # x + (sigma_next - sigma)·(x - D)/sigma, written as D + (sigma_next/sigma)·(x - D): one op
        x = torch.lerp(denoised, x, sigma_next / sigma)
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, callback=None, generator: Generator = None,
                           eta: float = 1.0, s_noise: float = 1.0):
    """Ancestral sampling with Euler steps (k-diffusion's ``sample_euler_ancestral``): an Euler step
    to ``sigma_down``, then fresh noise of size ``s_noise·sigma_up`` (:func:`get_ancestral_step`).
    On the DDIM grid this is DDIM with the same eta (``s_noise`` is the reference's temperature);
    eta 0 is :func:`sample_euler`."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x = torch.lerp(denoised, x, sigma_down / sigma)  # the Euler step to sigma_down, as in sample_euler
        if sigma_next > 0 and sigma_up > 0:
            x = x + randn(x.shape, generator, x.device, x.dtype) * (s_noise * sigma_up)
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, callback=None, generator: Generator = None):
    """Heun's second-order method: Karras et al. 2022, Algorithm 1 (deterministic). The step to
    ``sigma = 0`` is a plain Euler step, so n steps cost 2n - 1 model calls."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        d = to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, denoiser(x_2, sigma_next * s_in))
            x = x + (d + d_2) / 2 * dt
        _report(callback, i, x, sigma, sigma_next, denoised)
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
def sample_lms(denoiser, x, sigmas, *, callback=None, generator: Generator = None, order: int = 4):
    """Linear multistep (Adams–Bashforth type) on the probability-flow ODE in sigma, with the
    variable-step coefficients of k-diffusion's ``sample_lms`` (Crowson): the last ``order``
    derivatives weighted by integrals of their Lagrange basis polynomials over the step."""
    s_in = x.new_ones([x.shape[0]])
    sigmas_np = sigmas.detach().cpu().double().numpy()
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * s_in)
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        cur_order = min(i + 1, order)
        coeffs = [_lms_coefficient(sigmas_np, i, j, cur_order) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        _report(callback, i, x, sigmas[i], sigmas[i + 1], denoised)
    return x


@torch.no_grad()
def sample_plms(denoiser, x, sigmas, *, callback=None, generator: Generator = None):
    """PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022), as the reference runs it.

    Each step is an Euler (= DDIM) step with the derivative (= noise estimate) ``d'`` replaced by an
    Adams–Bashforth combination of the current and up to three earlier estimates, with the
    fixed-step weights ``(3, -1)/2``, ``(23, -16, 5)/12``, ``(55, -59, 37, -9)/24``. The first step
    has no history and takes a Heun step instead (a provisional Euler step, a second model call at
    ``sigmas[1]``, the mean of both estimates), so n steps cost n + 1 model calls. The history holds
    the plain estimates. ``callback``'s ``denoised`` is the prediction behind the combined
    estimate, ``x - sigma·d'`` (the reference's ``pred_x0``).
    """
    s_in = x.new_ones([x.shape[0]])
    history = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        dt = sigma_next - sigma
        d = to_d(x, sigma, denoiser(x, sigma * s_in))
        if not history and sigma_next > 0:
            x_2 = x + d * dt
            d_comb = (d + to_d(x_2, sigma_next, denoiser(x_2, sigma_next * s_in))) / 2
        elif not history:  # a single step to sigma 0: plain Euler
            d_comb = d
        elif len(history) == 1:
            d_comb = (3 * d - history[-1]) / 2
        elif len(history) == 2:
            d_comb = (23 * d - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            d_comb = (55 * d - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history = (history + [d])[-3:]
        denoised = torch.addcmul(x, d_comb, sigma, value=-1) if callback is not None else None  # x - sigma·d'
        x = torch.addcmul(x, d_comb, dt)  # the Euler (= DDIM) step with d'
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, callback=None, generator: Generator = None,
                    lower_order_final: bool = False):
    """DPM-Solver++(2M): Lu et al. 2022, Algorithm 2, in sigma form (k-diffusion's
    ``sample_dpmpp_2m``). With ``lambda = -log sigma`` and ``h = lambda_next - lambda``::

        x_next = sigma_next/sigma·x - (e^{-h} - 1)·D,   D = (1 + 1/(2r))·x0_i - 1/(2r)·x0_{i-1},  r = h_prev/h

    The first step and a step to ``sigma = 0`` are first order (``D = x0_i``). ``lower_order_final``
    is the original DPM-Solver's rule: with fewer than 15 steps the last step is first order too
    (the reference's ``--dpm_solver``; the k-diffusion grids end at 0, where it changes nothing).
    One model call per step.
    """
    s_in = x.new_ones([x.shape[0]])
    n = len(sigmas) - 1
    old_denoised = None
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        if sigma_next == 0:
            x = denoised
        else:
            t, t_next = -sigma.log(), -sigma_next.log()
            h = t_next - t
            if old_denoised is None or (lower_order_final and n < 15 and i == n - 1):
                d = denoised
            else:
                r = (t - (-sigmas[i - 1].log())) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - torch.expm1(-h) * d
        old_denoised = denoised
        _report(callback, i, x, sigma, sigma_next, denoised)
    return x
