"""Sampler names for the scripts' ``--sampler`` flag, and one way to build them.

    sampler = make_sampler("dpmpp_2m_karras", model)
    samples, _ = sampler.sample(S=25, batch_size=..., shape=(4, H // 8, W // 8), conditioning=c, ...)

Every sampler has the same ``sample(...)`` surface (:meth:`ldm.models.diffusion.sampling.Sampler.sample`).
"""
from __future__ import annotations

from ldm.errors import UserInputError

__all__ = ["SAMPLER_NAMES", "SAMPLER_DESCRIPTIONS", "make_sampler"]

#: name -> one-line description (the published method it follows)
SAMPLER_DESCRIPTIONS = {
    "ddim": "DDIM (Song et al. 2021), the reference default",
    "plms": "PLMS / PNDM (Liu et al. 2022), the reference's --plms",
    "dpm_solver": "DPM-Solver++(2M) on the time-uniform grid, the reference's --dpm_solver",
    "euler": "Euler on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn)",
    "euler_a": "Euler ancestral (k-diffusion), stochastic",
    "heun": "Heun (Karras et al. 2022, Alg. 1), 2 model calls per step",
    "dpmpp_2m": "DPM-Solver++(2M) (Lu et al. 2022) on the model's own noise levels",
    "dpmpp_2m_karras": "DPM-Solver++(2M) on Karras et al. 2022 noise levels (rho 7)",
    "lms": "linear multistep, order 4 (k-diffusion)",
}
SAMPLER_NAMES = tuple(SAMPLER_DESCRIPTIONS)


def make_sampler(name: str, model, device=None):
    """Build the sampler called ``name`` (one of :data:`SAMPLER_NAMES`) for ``model``.

    :raises ValueError: for an unknown name, listing the known ones.
    """
    if name == "ddim":
        from ldm.models.diffusion.ddim import DDIMSampler
        return DDIMSampler(model, device=device)
    if name == "plms":
        from ldm.models.diffusion.plms import PLMSSampler
        return PLMSSampler(model, device=device)
    if name == "dpm_solver":
        from ldm.models.diffusion.dpm_solver import DPMSolverSampler
        return DPMSolverSampler(model, device=device)
    if name in SAMPLER_NAMES:
        from ldm.models.diffusion.k_diffusion import KDiffusionSampler
        return KDiffusionSampler(model, name, device=device)
    raise UserInputError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLER_NAMES)}")
