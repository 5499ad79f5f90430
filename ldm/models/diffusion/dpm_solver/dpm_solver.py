"""The discretisation of the reference's DPM-Solver (Lu, Zhou, Bao, Chen, Li & Zhu, "DPM-Solver++:
Fast Solver for Guided Sampling of Diffusion Probabilistic Models", 2022): the discrete-time VP
schedule of the original DPM-Solver code in continuous time, and its time-uniform grid. The solver
itself, DPM-Solver++(2M), is :func:`ldm.models.diffusion.solvers.sample_dpmpp_2m` (the same
function as the ``dpmpp_2m`` sampler; only the grid differs).

* time ``t`` in ``[1/N, 1]``; ``t_n = n/N`` for the model's index ``n - 1``;
  ``log alpha(t)`` is ``0.5·log(alphas_cumprod)`` interpolated piecewise linearly over ``t_n``;
  ``sigma(t) = sqrt(1 - alpha²)``, ``lambda(t) = log alpha - log sigma`` (half log-SNR); in the
  solvers' sigma space the level is ``sigma/alpha = exp(-lambda)``.
* the model gets the FRACTIONAL timestep ``(t - 1/N)·1000`` (999.0 first; 99.9 last for 10 steps).
* ``time_uniform`` steps: ``linspace(1, 1/N, S + 1)`` (float32).

Not ported (the reference sampler never used them): single-step and adaptive solvers, order 3,
``logSNR``/``time_quadratic`` spacing, the noise-prediction (non-++) variant, thresholding,
continuous-time schedules.
"""
from __future__ import annotations

import torch

__all__ = ["NoiseScheduleVP", "time_uniform_steps", "time_uniform_grid"]


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


def time_uniform_grid(ns: NoiseScheduleVP, steps: int):
    """The reference's time-uniform grid as noise levels: ``(times [steps+1], sigmas [steps+1],
    model_times [steps+1])`` with ``sigma(t) = std(t)/alpha(t)`` (sigma space) and the fractional
    model timestep ``(t - 1/N)·1000`` of each time (the last is never called)."""
    times = time_uniform_steps(ns, steps)
    log_alpha = ns.marginal_log_mean_coeff(times)
    sigmas = torch.sqrt(1.0 - torch.exp(2.0 * log_alpha)) / torch.exp(log_alpha)
    return times, sigmas, ns.model_time(times)
