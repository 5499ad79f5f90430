"""The denoiser every sampler calls: ``D(x, sigma) -> x0`` for a discrete-time model over
``alphas_cumprod``, built from small parts as k-diffusion (``external.CompVisDenoiser``) and sgm
(``denoiser.DiscreteDenoiser`` + ``denoiser_scaling``) do.

Noise levels (the "sigma space" of Karras et al. 2022): a VP latent ``x_t = sqrt(a)·x0 + sqrt(1-a)·eps``
is ``x = x_t / sqrt(a) = x0 + sigma·eps`` with ``sigma = sqrt((1 - a)/a)``; ``a = 1/(sigma² + 1)``.

Parameterisation adapters (sgm's scalings) give ``(c_skip, c_out, c_in, c_noise)`` for a level, and
``D(x, sigma) = c_skip·x + c_out·F(c_in·x, t(c_noise))`` for the raw (guided) model output ``F``:

=========  ===============  ======================  ====================  =================
scaling    c_skip           c_out                   c_in                  c_noise
=========  ===============  ======================  ====================  =================
eps        1                -sigma                  1/sqrt(sigma²+1)      sigma
v          1/(sigma²+1)     -sigma/sqrt(sigma²+1)   1/sqrt(sigma²+1)      sigma
EDM        sd²/(sigma²+sd²) sigma·sd/sqrt(s²+sd²)   1/sqrt(sigma²+sd²)    ¼·log sigma
=========  ===============  ======================  ====================  =================

``c_in·x`` is the model's own latent ``x_t``; ``c_noise`` becomes the model timestep through the
denoiser's timestep map (``"interpolate"``: k-diffusion's fractional log-sigma interpolation;
``"nearest"``: sgm's quantisation to the nearest table entry, an integer; or an explicit
:class:`TimestepLookup` for a sampler with its own grid, such as DPM-Solver's fractional times).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch

__all__ = ["EpsScaling", "VScaling", "EDMScaling", "scaling_for", "TimestepLookup", "DiscreteDenoiser",
           "CompVisDenoiser", "alpha_from_sigma", "to_sigma_space", "from_sigma_space"]

Scalings = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------
# parameterisation adapters (sgm.modules.diffusionmodules.denoiser_scaling)
# --------------------------------------------------------------------------------------------
class EpsScaling:
    """Noise prediction (DDPM, SD 1.x): ``D = x - sigma·eps``."""

    unit_skip = True  # c_skip is 1: the denoiser skips the multiplication

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = (sigma ** 2 + 1.0).rsqrt()
        return c_skip, c_out, c_in, sigma  # c_noise = sigma (read only, so not copied)


class VScaling:
    """v prediction (Salimans & Ho 2022, SD 2.x 768): ``D = sqrt(a)·x_t - sqrt(1-a)·v`` in sigma space."""

    unit_skip = False

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        c_skip = 1.0 / (sigma ** 2 + 1.0)
        c_in = c_skip.sqrt()
        c_out = -sigma * c_in
        return c_skip, c_out, c_in, sigma  # c_noise = sigma (read only, so not copied)


class EDMScaling:
    """Karras et al. 2022 preconditioning (their Table 1) with data std ``sigma_data``."""

    unit_skip = False

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = sigma_data

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2) ** 0.5
        c_in = 1 / (sigma ** 2 + sd ** 2) ** 0.5
        c_noise = 0.25 * sigma.log()
        return c_skip, c_out, c_in, c_noise


def scaling_for(parameterization: str):
    """The adapter for a model's ``parameterization`` (``"eps"`` or ``"v"``).

    :raises ValueError: for anything else.
    """
    if parameterization == "eps":
        return EpsScaling()
    if parameterization == "v":
        return VScaling()
    raise ValueError(f"model.parameterization is {parameterization!r}; the samplers support 'eps' and 'v'")


# --------------------------------------------------------------------------------------------
# sigma space <-> the model's latents
# --------------------------------------------------------------------------------------------
def alpha_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """``sqrt(a) = 1/sqrt(sigma² + 1)``."""
    return 1 / (sigma ** 2 + 1) ** 0.5


def to_sigma_space(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x = x_t / sqrt(a) = x_t·sqrt(sigma² + 1)``."""
    return x_t * (sigma ** 2 + 1) ** 0.5


def from_sigma_space(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_t = x·sqrt(a) = x / sqrt(sigma² + 1)`` (the identity at sigma 0)."""
    return x / (sigma ** 2 + 1) ** 0.5


# --------------------------------------------------------------------------------------------
# the denoiser
# --------------------------------------------------------------------------------------------
class TimestepLookup:
    """``sigma -> timestep`` of the nearest tabulated level (sgm's ``DiscreteDenoiser`` quantisation).

    :param sigmas: ``[M]`` levels; :param timesteps: ``[M]`` the model timestep of each (any dtype).
    """

    def __init__(self, sigmas: torch.Tensor, timesteps: torch.Tensor):
        self.sigmas = sigmas.float().reshape(-1, 1)                                     # [M, 1]
        self.timesteps = timesteps.to(sigmas.device)

    def to(self, device) -> "TimestepLookup":
        """The same table on ``device``."""
        return TimestepLookup(self.sigmas.to(device), self.timesteps.to(device))

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        """:param sigma: ``[B]``; :returns: ``[B]`` timesteps."""
        return self.timesteps[(sigma.view(1, -1) - self.sigmas).abs().argmin(0)]


class DiscreteDenoiser:
    """``D(x, sigma) -> x0`` for a model trained on the discrete levels of ``alphas_cumprod``.

    :param model: ``model(x_t [B,C,H,W], t [B]) -> raw output`` (a
        :class:`~ldm.models.diffusion.guidance.GuidedModel`), or None for the schedule helpers only.
    :param alphas_cumprod: ``[N]`` alpha bar; levels ``sigmas[n] = sqrt((1 - a_n)/a_n)`` (ascending).
    :param scaling: parameterisation adapter (default :class:`EpsScaling`).
    :param timesteps: ``"interpolate"`` (fractional, log-sigma linear between table entries),
        ``"nearest"`` (integer index of the nearest entry) or a callable ``c_noise [B] -> t [B]``.
    :param mask: inpainting, ``[B or 1, 1 or C, H, W]``: 1 = known (keep ``x0``), 0 = generate.
    :param x0: the known latent ``[B,C,H,W]`` (with ``mask``).

    Known region (the one place it is enforced): where ``mask == 1`` the data prediction is ``x0``,
    ``D = mask·x0 + (1 - mask)·D``; i.e. the model's noise estimate there is replaced by the noise
    ``(x - x0)/sigma`` the state carries relative to ``x0``. Every sampler's update then keeps the
    known region on the forward-noising path of ``x0`` (ancestral steps add fresh noise to it, again
    a forward sample), with no extra random numbers: a mask of zeros is plain sampling bit for bit.
    """

    def __init__(self, model: Optional[Callable], alphas_cumprod: torch.Tensor, *, scaling=None,
                 timesteps: Union[str, Callable] = "interpolate", mask: Optional[torch.Tensor] = None,
                 x0: Optional[torch.Tensor] = None):
        ac = alphas_cumprod.detach().float()
        self.model = model
        self.scaling = scaling if scaling is not None else EpsScaling()
        self.sigmas = ((1 - ac) / ac) ** 0.5                                            # [N] ascending
        self.log_sigmas = self.sigmas.log()
        if timesteps == "interpolate":
            self.timestep = self.sigma_to_t
        elif timesteps == "nearest":
            self.timestep = TimestepLookup(self.sigmas, torch.arange(len(ac), device=ac.device))
        elif callable(timesteps):
            self.timestep = timesteps
        else:
            raise ValueError(f"timesteps must be 'interpolate', 'nearest' or a callable, got {timesteps!r}")
        self.known = self.keep = None
        if mask is not None:
            self.known, self.keep = mask * x0, 1 - mask  # once per run

    # -- noise levels (k-diffusion's CompVisDenoiser) -------------------------------------------
    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional model timestep of noise level ``sigma`` (log-sigma interpolation)."""
        log_sigma = sigma.log()
        n = len(self.log_sigmas)
        lo = (torch.searchsorted(self.log_sigmas, log_sigma.reshape(-1).contiguous(), right=True) - 1)
        lo = lo.clamp(0, n - 2).reshape(log_sigma.shape)
        w = ((log_sigma - self.log_sigmas[lo]) / (self.log_sigmas[lo + 1] - self.log_sigmas[lo])).clamp(0, 1)
        return lo + w

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level at (fractional) timestep ``t``."""
        t = t.float()
        lo, hi = t.floor().long(), t.ceil().long()
        w = t - lo
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def get_sigmas(self, n: int) -> torch.Tensor:
        """``n`` levels at timesteps ``linspace(N-1, 0, n)``, then 0: ``[n + 1]``."""
        t = torch.linspace(len(self.sigmas) - 1, 0, n, device=self.sigmas.device)
        return torch.cat([self.t_to_sigma(t), t.new_zeros(1)])

    # -- the denoiser --------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """:param x: ``[B,C,H,W]`` in sigma space; :param sigma: ``[B]``. :returns: ``x0`` ``[B,C,H,W]``."""
        c_skip, c_out, c_in, c_noise = self.scaling(sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1))))
        out = self.model(x * c_in, self.timestep(c_noise.view(sigma.shape)))
        # c_skip·x + c_out·out (one fused op when c_skip is 1)
        denoised = torch.addcmul(x if self.scaling.unit_skip else x * c_skip, out, c_out)
        if self.known is not None:
            denoised = torch.addcmul(self.known, self.keep, denoised)  # mask·x0 + (1 - mask)·D
        return denoised


#: k-diffusion's name for it
CompVisDenoiser = DiscreteDenoiser
