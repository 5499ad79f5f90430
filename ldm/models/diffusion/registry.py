"""Sampler names for the scripts' ``--sampler`` flag, every fact about each sampler
(:mod:`.catalog`: description, metadata name, eta and step-count rules), and one way to build them::

    sampler = make_sampler("dpmpp_2m_karras", model)
    samples, _ = sampler.sample(S=25, batch_size=..., shape=(4, H // 8, W // 8), conditioning=c, ...)

Every sampler has the same ``sample(...)`` surface (:meth:`ldm.models.diffusion.sampling.Sampler.sample`).
"""
from __future__ import annotations

from ldm.models.diffusion.catalog import (SAMPLER_DESCRIPTIONS, SAMPLER_NAMES, SAMPLERS, SamplerInfo, check_steps,
                                          resolve_eta, sampler_info)

__all__ = ["SamplerInfo", "SAMPLERS", "SAMPLER_NAMES", "SAMPLER_DESCRIPTIONS", "sampler_info", "resolve_eta",
           "check_steps", "make_sampler"]


def make_sampler(name: str, model, device=None):
    """Build the sampler called ``name`` (one of :data:`SAMPLER_NAMES`) for ``model``.

    :raises UserInputError: for an unknown name, listing the known ones.
    """
    sampler_info(name)
    if name == "ddim":
        from ldm.models.diffusion.ddim import DDIMSampler
        return DDIMSampler(model, device=device)
    if name == "plms":
        from ldm.models.diffusion.plms import PLMSSampler
        return PLMSSampler(model, device=device)
    if name == "dpm_solver":
        from ldm.models.diffusion.dpm_solver import DPMSolverSampler
        return DPMSolverSampler(model, device=device)
    from ldm.models.diffusion.k_diffusion import KDiffusionSampler
    return KDiffusionSampler(model, name, device=device)
