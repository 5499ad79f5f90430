"""``DPMSolverSampler``: the reference's ``--dpm_solver`` sampler (DPM-Solver++(2M), time-uniform
steps, ``lower_order_final``) behind the common ``sample(...)`` surface."""
from __future__ import annotations

import torch

from ldm.errors import UserInputError
from ldm.models.diffusion.dpm_solver.dpm_solver import (NoiseScheduleVP, dpm_solver_pp_multistep,
                                                        time_uniform_steps)
from ldm.models.diffusion.sampling import Sampler, check_deterministic_eta

__all__ = ["DPMSolverSampler"]


class DPMSolverSampler(Sampler):
    """DPM-Solver++ multistep over a CompVis-style model; S steps cost S model calls.

    The reference ran ``DPM_Solver(model_fn, NoiseScheduleVP('discrete', alphas_cumprod),
    predict_x0=True).sample(x_T, steps=S, skip_type='time_uniform', method='multistep', order=2,
    lower_order_final=True)``; this reproduces it (see :mod:`.dpm_solver` for the math and for the
    options that are not ported). Unlike the reference it also honours ``callback``,
    ``img_callback``, ``mask``/``x0``, ``start_step`` and returns intermediates.

    :param order: 2 (the reference) or 1 (DPM-Solver++(1), i.e. DDIM on this time grid).
    :param lower_order_final: use a first-order last step when fewer than 15 steps (the reference).
    """

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
        """Set ``timesteps`` (continuous times ``[S+1]``) and ``model_timesteps`` (the ``S``
        fractional timesteps the model is called at). Only uniform-in-time spacing is supported."""
        check_deterministic_eta("DPM-Solver", ddim_eta)
        if ddim_discretize != "uniform":
            raise UserInputError(f"DPMSolverSampler supports only ddim_discretize='uniform' (time-uniform "
                                 f"steps), got {ddim_discretize!r}")
        if not isinstance(ddim_num_steps, int) or ddim_num_steps < 1:
            raise UserInputError(f"number of steps must be a positive int, got {ddim_num_steps!r}")
        self.timesteps = time_uniform_steps(self.ns, ddim_num_steps, self.device)
        self.model_timesteps = self.ns.model_time(self.timesteps[:-1])

    def _prepare(self, S, eta, verbose):
        self.make_schedule(S, ddim_eta=0.0 if eta is None else eta, verbose=verbose)
        return S, eta

    def _start(self, noise, x0, start_step):
        if start_step == 0:
            return noise
        t = self.timesteps[start_step].to(noise.device)
        return self.ns.marginal_alpha(t) * x0 + self.ns.marginal_std(t) * noise

    def _run(self, x, predictor, start_step, generator, temperature, progress, eta):
        ns = self.ns

        def data_prediction(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            log_alpha = ns.marginal_log_mean_coeff(t)
            alpha, sigma = torch.exp(log_alpha), torch.sqrt(1.0 - torch.exp(2.0 * log_alpha))
            eps = predictor(x, ns.model_time(t).expand(x.shape[0]), torch.exp(2.0 * log_alpha))
            return (x - sigma * eps) / alpha

        times = self.timesteps[start_step:].to(x.device)
        return dpm_solver_pp_multistep(data_prediction, x, times, ns, self.order, self.lower_order_final,
                                       callback=progress)
