"""``sgm.modules.diffusionmodules.denoiser``: ``D(x, sigma)`` as sgm computes it, with the table of
noise levels as the persistent buffer ``denoiser.sigmas`` (in the released files).

``DiscreteDenoiser`` **quantises** sigma to the nearest of its 1000 levels first; the scalings use
the quantised level and the network's timestep is its index (int64)::

    idx = argmin |sigma - sigmas|,  s = sigmas[idx]
    D(x, sigma) = c_skip(s)·x + c_out(s)·F(c_in(s)·x, idx, cond)

With ``EpsScaling``: ``D = x - s·eps(x/sqrt(s² + 1), idx)``. The scaling adapters and the nearest-level
lookup are :mod:`ldm.models.diffusion.denoiser`'s. A file's ``denoiser.sigmas`` replaces the
computed table (as in sgm); it is kept in float32 whatever dtype the networks are cast to.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from ldm.models.diffusion.denoiser import TimestepLookup
from ldm.util import instantiate_from_config
from sgm.util import append_dims

__all__ = ["Denoiser", "DiscreteDenoiser"]


class Denoiser(nn.Module):
    """``D(x, sigma) = c_skip·x + c_out·network(c_in·x, c_noise, cond)`` (no quantisation)."""

    def __init__(self, scaling_config: Mapping[str, Any], weighting_config: Optional[Mapping[str, Any]] = None):
        super().__init__()
        self.scaling = instantiate_from_config(scaling_config)
        self.weighting_config = weighting_config  # a training loss weight (release-era configs); unused here

    def possibly_quantize_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def possibly_quantize_c_noise(self, c_noise: torch.Tensor) -> torch.Tensor:
        return c_noise

    def forward(self, network: nn.Module, input: torch.Tensor, sigma: torch.Tensor, cond: Mapping, **kwargs):
        """:param input: ``[B, C, H, W]`` in sigma space; :param sigma: ``[B]``; :returns: ``[B, C, H, W]``."""
        sigma = self.possibly_quantize_sigma(sigma)
        shape = sigma.shape
        c_skip, c_out, c_in, c_noise = self.scaling(append_dims(sigma, input.ndim))
        c_noise = self.possibly_quantize_c_noise(c_noise.reshape(shape))
        return network(input * c_in, c_noise, cond, **kwargs) * c_out + input * c_skip


class DiscreteDenoiser(Denoiser):
    """:class:`Denoiser` over ``num_idx`` discrete levels from ``discretization_config``
    (``sigmas`` ascending, ``[num_idx]``), quantising sigma and ``c_noise`` to them."""

    def __init__(self, scaling_config: Mapping[str, Any], num_idx: int, discretization_config: Mapping[str, Any],
                 do_append_zero: bool = False, quantize_c_noise: bool = True, flip: bool = True,
                 weighting_config: Optional[Mapping[str, Any]] = None):
        super().__init__(scaling_config, weighting_config)
        self.discretization = instantiate_from_config(discretization_config)
        device = "cpu" if torch.empty(0).is_meta else None  # computed on the CPU inside a meta-device build
        sigmas = self.discretization(num_idx, do_append_zero=do_append_zero, flip=flip, device=device)
        self.register_buffer("sigmas", sigmas)
        self.quantize_c_noise = quantize_c_noise
        self.num_idx = num_idx

    def _apply(self, fn, recurse=True):
        # Moves follow the module; the table stays float32 (a half copy would round the levels the
        # scalings use).
        table = self.sigmas
        super()._apply(fn, recurse)
        if self.sigmas.dtype != torch.float32:
            self.sigmas = table.to(self.sigmas.device, torch.float32)
        return self

    def lookup(self) -> TimestepLookup:
        """sigma -> index of the nearest level."""
        return TimestepLookup(self.sigmas, torch.arange(len(self.sigmas), device=self.sigmas.device))

    def sigma_to_idx(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.lookup()(sigma.reshape(-1)).view(sigma.shape)

    def idx_to_sigma(self, idx: torch.Tensor) -> torch.Tensor:
        return self.sigmas[idx]

    def possibly_quantize_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.idx_to_sigma(self.sigma_to_idx(sigma))

    def possibly_quantize_c_noise(self, c_noise: torch.Tensor) -> torch.Tensor:
        return self.sigma_to_idx(c_noise) if self.quantize_c_noise else c_noise
