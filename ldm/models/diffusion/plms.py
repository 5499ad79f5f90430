"""PLMS: pseudo linear multistep sampling (Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical Methods
for Diffusion Models on Manifolds", PNDM), as the reference runs it.

PLMS is DDIM with a different noise estimate: the DDIM update (:func:`ddim_step`) is applied to an
Adams–Bashforth combination of the current and up to three earlier estimates,
``(3, -1)/2``, ``(23, -16, 5)/12``, ``(55, -59, 37, -9)/24``. The first step has no history and
uses a pseudo improved-Euler step instead: a provisional DDIM step with ``e_t``, a second model
call at the next timestep, and the average of both estimates, so S steps cost S + 1 model calls.
The history holds the plain estimates ``e_t`` (not the combinations). PLMS is deterministic:
``eta`` must be 0.
"""
from __future__ import annotations

import torch

from ldm.errors import UserInputError
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.sampling import ddim_step

__all__ = ["PLMSSampler"]


class PLMSSampler(DDIMSampler):
    """Same surface and schedule as :class:`DDIMSampler`; refuses ``eta != 0``."""

    desc = "PLMS Sampler"

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0.0, verbose=True):
        if ddim_eta != 0:
            raise UserInputError(f"PLMS is deterministic: eta must be 0 (got {ddim_eta}); "
                                 "use DDIMSampler for eta > 0")
        super().make_schedule(ddim_num_steps, ddim_discretize, 0.0, verbose)

    def _combine_eps(self, x, e_t, index, predictor, history, table):
        timesteps, alphas, alphas_prev, _, sqrt_one_minus = table
        if not history:
            # pseudo improved Euler: provisional DDIM step, estimate there, average
            f32 = dict(device=x.device, dtype=torch.float32)
            a_t, a_prev, s1m = (v[index].to(**f32) for v in (alphas, alphas_prev, sqrt_one_minus))
            x_next, _ = ddim_step(x, e_t, a_t, a_prev, sqrt_one_minus_a_t=s1m)
            index_next = max(index - 1, 0)
            t_next = torch.full((x.shape[0],), int(timesteps[index_next]), device=x.device, dtype=torch.long)
            e_next = predictor(x_next, t_next, alphas[index_next].to(**f32))
            e_prime = (e_t + e_next) / 2
        elif len(history) == 1:
            e_prime = (3 * e_t - history[-1]) / 2
        elif len(history) == 2:
            e_prime = (23 * e_t - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history.append(e_t)
        if len(history) > 3:
            history.pop(0)
        return e_prime
