"""``sgm.modules.diffusionmodules.denoiser_scaling``: the parameterisation adapters of
:mod:`ldm.models.diffusion.denoiser` (``(c_skip, c_out, c_in, c_noise)`` for a noise level)."""
from ldm.models.diffusion.denoiser import EDMScaling, EpsScaling, VScaling  # noqa: F401

__all__ = ["EpsScaling", "VScaling", "EDMScaling"]
