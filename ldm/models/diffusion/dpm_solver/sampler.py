"""``DPMSolverSampler``: the reference's ``--dpm_solver`` sampler (DPM-Solver++(2M), time-uniform
steps, ``lower_order_final``) behind the common ``sample(...)`` surface."""
from __future__ import annotations

import torch

from ldm.errors import UserInputError
from ldm.models.diffusion.denoiser import TimestepLookup
from ldm.models.diffusion.dpm_solver.dpm_solver import NoiseScheduleVP, time_uniform_grid
from ldm.models.diffusion.catalog import resolve_eta
from ldm.models.diffusion.sampling import Sampler, SamplingPlan
from ldm.models.diffusion.solvers import sample_dpmpp_2m, sample_euler

__all__ = ["DPMSolverSampler"]


class DPMSolverSampler(Sampler):
    """DPM-Solver++ multistep over a CompVis-style model; S steps cost S model calls.

    The reference ran ``DPM_Solver(model_fn, NoiseScheduleVP('discrete', alphas_cumprod),
    predict_x0=True).sample(x_T, steps=S, skip_type='time_uniform', method='multistep', order=2,
    lower_order_final=True)``. This runs :func:`~ldm.models.diffusion.solvers.sample_dpmpp_2m` on
    that grid (:func:`.dpm_solver.time_uniform_grid`), calling the model at the grid's fractional
    timesteps; the recorded reference trace is reproduced to about 3e-7 relative per model call.
    Unlike the reference it also honours ``callback``, ``img_callback``, ``mask``/``x0``,
    ``start_step`` and returns intermediates.

    :param order: 2 (the reference) or 1 (DPM-Solver++(1), i.e. DDIM = Euler on this grid).
    :param lower_order_final: first-order last step when fewer than 15 steps are run (the reference).
    """

    name = "dpm_solver"
    desc = "DPM-Solver++ Sampler"

    def __init__(self, model, device=None, *, order: int = 2, lower_order_final: bool = True):
        super().__init__(model, device)
        if order not in (1, 2):
            raise UserInputError(f"DPMSolverSampler order must be 1 or 2, got {order}")
        self.order = order
        self.lower_order_final = lower_order_final
        self.ns = NoiseScheduleVP(self.model.alphas_cumprod.detach().to(self.device, torch.float32))
        self.timesteps = None

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Set ``timesteps`` (continuous times ``[S+1]``), ``sigmas`` (their noise levels) and
        ``model_timesteps`` (the ``S`` fractional timesteps the model is called at). Only
        uniform-in-time spacing is supported."""
        resolve_eta(self.name, ddim_eta)
        if ddim_discretize != "uniform":
            raise UserInputError(f"DPMSolverSampler supports only ddim_discretize='uniform' (time-uniform "
                                 f"steps), got {ddim_discretize!r}")
        if not isinstance(ddim_num_steps, int) or ddim_num_steps < 1:
            raise UserInputError(f"number of steps must be a positive int, got {ddim_num_steps!r}")
        self.timesteps, self.sigmas, times = time_uniform_grid(self.ns, ddim_num_steps)
        self.timesteps, self.sigmas, times = (v.to(self.device) for v in (self.timesteps, self.sigmas, times))
        self._grid_timesteps = times
        self.model_timesteps = times[:-1]

    def _plan(self, steps, eta, temperature, verbose=False) -> SamplingPlan:
        self.make_schedule(steps, verbose=verbose)
        if self.order == 1:  # DPM-Solver++(1) is DDIM, i.e. Euler in sigma space
            solver, options = sample_euler, {}
        else:
            solver, options = sample_dpmpp_2m, {"lower_order_final": self.lower_order_final}
        return SamplingPlan(self.sigmas, solver, options, timesteps=TimestepLookup(self.sigmas, self._grid_timesteps))
