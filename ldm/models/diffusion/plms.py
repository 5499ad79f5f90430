"""PLMS: pseudo linear multistep sampling (Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical Methods
for Diffusion Models on Manifolds", PNDM), as the reference runs it.

:class:`PLMSSampler` is :class:`~ldm.models.diffusion.ddim.DDIMSampler` (same grid, tables and
surface) running :func:`~ldm.models.diffusion.solvers.sample_plms`: the DDIM update applied to an
Adams–Bashforth combination of the current and up to three earlier noise estimates, with a
pseudo improved-Euler first step (S steps cost S + 1 model calls). PLMS is deterministic:
``eta`` must be 0.
"""
from __future__ import annotations

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.catalog import resolve_eta
from ldm.models.diffusion.solvers import sample_plms

__all__ = ["PLMSSampler"]


class PLMSSampler(DDIMSampler):
    """Same surface and schedule as :class:`DDIMSampler`; refuses ``eta != 0``."""

    name = "plms"
    desc = "PLMS Sampler"

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0.0, verbose=True):
        resolve_eta(self.name, ddim_eta)
        super().make_schedule(ddim_num_steps, ddim_discretize, 0.0, verbose)

    def _solver(self, eta):
        return sample_plms, {}
