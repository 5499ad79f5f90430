"""DPM-Solver++ (Lu et al. 2022) as the reference's ``--dpm_solver`` runs it."""
from ldm.models.diffusion.dpm_solver.sampler import DPMSolverSampler

__all__ = ["DPMSolverSampler"]
