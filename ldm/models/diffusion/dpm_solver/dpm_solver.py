"""The part of DPM-Solver that the reference's ``DPMSolverSampler`` uses, written out once.

Lu, Zhou, Bao, Chen, Li & Zhu, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models" (2022), multistep second order (their Algorithm 2, "DPM-Solver++(2M)"), on
the discrete-time VP schedule of the original DPM-Solver code:

* time ``t`` in ``[1/N, 1]``; ``t_n = n/N`` for the model's index ``n - 1``;
  ``log alpha(t)`` is ``0.5·log(alphas_cumprod)`` interpolated piecewise linearly over ``t_n``;
  ``sigma(t) = sqrt(1 - alpha²)``, ``lambda(t) = log alpha - log sigma`` (half log-SNR).
* the model gets the FRACTIONAL timestep ``(t - 1/N)·1000`` (999.0 first; 99.9 last for 10 steps).
* ``time_uniform`` steps: ``linspace(1, 1/N, S + 1)`` (float32).
* updates in data prediction (``x0``) form; first step first order; with ``lower_order_final``
  and fewer than 15 steps the last step is first order too; no thresholding, no final
  "denoise to zero"; S model calls.

Supported here: orders 1 and 2, ``time_uniform`` steps, ``lower_order_final`` on/off. Not
ported (the reference sampler never used them): single-step and adaptive solvers, order 3,
``logSNR``/``time_quadratic`` spacing, the noise-prediction (non-++) variant, thresholding,
continuous-time schedules.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["NoiseScheduleVP", "time_uniform_steps", "dpm_solver_pp_first_order", "dpm_solver_pp_second_order",
           "dpm_solver_pp_multistep"]


def _interp(x: torch.Tensor, xp: torch.Tensor, yp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ``y(x)`` through ``(xp, yp)`` (xp increasing), extrapolating the end segments."""
    hi = torch.searchsorted(xp, x.reshape(-1).contiguous()).clamp(1, len(xp) - 1).reshape(x.shape)
    x_lo, x_hi, y_lo, y_hi = xp[hi - 1], xp[hi], yp[hi - 1], yp[hi]
    return y_lo + (x - x_lo) * (y_hi - y_lo) / (x_hi - x_lo)


class NoiseScheduleVP:
    """Discrete-time VP schedule in continuous time (DPM-Solver's ``NoiseScheduleVP('discrete')``).

    :param alphas_cumprod: ``[N]`` alpha bar of the model (float32; kept on its device).
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = alphas_cumprod.detach().float()
        self.total_N = len(ac)
        self.T = 1.0
        self.t_array = torch.linspace(0.0, 1.0, self.total_N + 1)[1:].to(ac.device)
        self.log_alpha_array = 0.5 * torch.log(ac)

    def marginal_log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """``log alpha(t)``."""
        return _interp(t, self.t_array, self.log_alpha_array)

    def marginal_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t: torch.Tensor) -> torch.Tensor:
        log_alpha = self.marginal_log_mean_coeff(t)
        return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The (fractional) timestep the model is called with: ``(t - 1/N)·1000``."""
        return (t - 1.0 / self.total_N) * 1000.0


def time_uniform_steps(ns: NoiseScheduleVP, steps: int, device=None) -> torch.Tensor:
    """``linspace(T, 1/N, steps + 1)`` float32: the times the solver visits, noisiest first."""
    return torch.linspace(ns.T, 1.0 / ns.total_N, steps + 1).to(device)


def dpm_solver_pp_first_order(ns: NoiseScheduleVP, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                              x0_s: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(1) (= DDIM) from time ``s`` to ``t``:
    ``x_t = sigma_t/sigma_s·x_s - alpha_t·(e^{-h} - 1)·x0_s``, ``h = lambda_t - lambda_s``."""
    h = ns.marginal_lambda(t) - ns.marginal_lambda(s)
    alpha_t = ns.marginal_alpha(t)
    return (ns.marginal_std(t) / ns.marginal_std(s)) * x - (alpha_t * torch.expm1(-h)) * x0_s


def dpm_solver_pp_second_order(ns: NoiseScheduleVP, x: torch.Tensor, s_prev: torch.Tensor, s: torch.Tensor,
                               t: torch.Tensor, x0_prev: torch.Tensor, x0_s: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M) step from ``s`` to ``t`` using the data predictions at ``s_prev`` and ``s``:
    ``x_t = sigma_t/sigma_s·x_s - alpha_t(e^{-h}-1)·x0_s - ½·alpha_t(e^{-h}-1)·(x0_s - x0_prev)/r``,
    ``r = h_prev / h``."""
    lambda_prev, lambda_s, lambda_t = ns.marginal_lambda(s_prev), ns.marginal_lambda(s), ns.marginal_lambda(t)
    h_prev, h = lambda_s - lambda_prev, lambda_t - lambda_s
    d1 = (1.0 / (h_prev / h)) * (x0_s - x0_prev)
    phi = ns.marginal_alpha(t) * (torch.exp(-h) - 1.0)
    return (ns.marginal_std(t) / ns.marginal_std(s)) * x - phi * x0_s - 0.5 * phi * d1


def dpm_solver_pp_multistep(data_prediction: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                            x: torch.Tensor, times: torch.Tensor, ns: NoiseScheduleVP, order: int = 2,
                            lower_order_final: bool = True,
                            callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None):
    """Multistep DPM-Solver++ of ``order`` 1 or 2 along ``times`` (noisiest first, ``[n + 1]``).

    :param data_prediction: ``(x, t) -> x0`` at continuous time ``t`` (scalar tensor).
    :param x: the state at ``times[0]``.
    :param callback: ``callback(i, x_after_step_i, x0_used_by_step_i)``.
    :returns: the state at ``times[-1]``; ``n`` calls of ``data_prediction``.
    """
    if order not in (1, 2):
        raise ValueError(f"DPM-Solver++ multistep order must be 1 or 2 here, got {order}")
    n = len(times) - 1
    x0_hist = [data_prediction(x, times[0])]
    t_hist = [times[0]]
    for i in range(1, n + 1):
        step_order = order if i > 1 else 1
        if lower_order_final and n < 15:
            step_order = min(step_order, n + 1 - i)
        if step_order == 1:
            x = dpm_solver_pp_first_order(ns, x, t_hist[-1], times[i], x0_hist[-1])
        else:
            x = dpm_solver_pp_second_order(ns, x, t_hist[-2], t_hist[-1], times[i], x0_hist[-2], x0_hist[-1])
        if callback is not None:
            callback(i - 1, x, x0_hist[-1])
        if i < n:  # the final state needs no model call
            x0_hist = (x0_hist + [data_prediction(x, times[i])])[-2:]
            t_hist = (t_hist + [times[i]])[-2:]
    return x
