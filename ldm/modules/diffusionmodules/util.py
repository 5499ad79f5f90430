"""Small building blocks shared by the diffusion UNet: the noise schedule, the timestep
embedding and a few layer constructors whose names the reference configs and code use.

``Conv2d`` and ``Linear`` are :mod:`ldm.ops`'s (``nn.Conv2d``/``nn.Linear`` with CPU fast paths),
re-exported here under their old names."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
import torch.utils.checkpoint

from ldm.ops import Conv2d, Linear  # re-exported: configs and callers name util.Conv2d / util.Linear


def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-4,
                       linear_end: float = 2e-2, cosine_s: float = 8e-3) -> np.ndarray:
    """Betas of a DDPM noise schedule, float64, shape ``[n_timestep]``.

    ``"linear"`` is the reference's name, but it is linear in sqrt(beta), i.e. quadratic in beta
    (diffusers calls it ``scaled_linear``): ``betas = linspace(sqrt(start), sqrt(end), n)**2``.
    ``"cosine"`` is Nichol & Dhariwal (2021), clipped at 0.999. ``"sqrt_linear"`` is linear in beta,
    ``"sqrt"`` its square root. ``"squaredcos_cap_v2"`` (the unCLIP noise augmentation) is
    ``1 − ᾱ(t+1/n)/ᾱ(t)`` with ``ᾱ(t) = cos((t + 0.008)/1.008·π/2)²``, capped at 0.999.

    :raises ValueError: for an unknown schedule name.
    """
    if schedule == "linear":
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64, device="cpu") ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64, device="cpu") / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alphas = alphas / alphas[0]
        betas = (1 - alphas[1:] / alphas[:-1]).clamp(max=0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu")
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu") ** 0.5
    elif schedule == "squaredcos_cap_v2":  # Karlo / unCLIP: betas_for_alpha_bar, max_beta 0.999
        alpha_bar = [math.cos((i / n_timestep + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(n_timestep + 1)]
        return np.array([min(1 - alpha_bar[i + 1] / alpha_bar[i], 0.999) for i in range(n_timestep)])
    else:
        raise ValueError(f"unknown beta schedule {schedule!r}; use one of linear, cosine, sqrt_linear, sqrt, "
                         "squaredcos_cap_v2")
    return betas.numpy()


def forward_schedule(betas: np.ndarray) -> dict:
    """The forward-process quantities of a schedule ``betas`` (float64 ``[T]``), each float64 ``[T]``:
    ``betas``, ``alphas_cumprod`` (ā), ``alphas_cumprod_prev`` (1 then ā[:-1]), ``sqrt_alphas_cumprod``,
    ``sqrt_one_minus_alphas_cumprod``, ``log_one_minus_alphas_cumprod``, ``sqrt_recip_alphas_cumprod``,
    ``sqrt_recipm1_alphas_cumprod`` (the reference's buffer names; the diffusion model and the
    x4 upscaler's noise augmentation both register them)."""
    alphas_cumprod = np.cumprod(1. - betas, axis=0)
    return {"betas": betas, "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": np.append(1., alphas_cumprod[:-1]),
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1. - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1. - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1. / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1. / alphas_cumprod - 1)}


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape) -> torch.Tensor:
    """``a[t]`` for a batch of integer timesteps ``t`` [B], shaped [B, 1, 1, ...] to broadcast
    against a tensor of shape ``x_shape``."""
    out = a.gather(-1, t.long())
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000,
                       repeat_only: bool = False) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    :param timesteps: [B] integer or float timesteps.
    :param dim: output width; ``cat([cos, sin])`` with frequencies ``exp(-ln(max_period)*i/half)``.
    :returns: [B, dim] float32.
    """
    if repeat_only:
        return timesteps.float()[:, None].expand(-1, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype (as the reference).

    On the CPU, PyTorch's group-norm kernel already does exactly that for bfloat16/float16 inputs
    with weights of the same dtype (statistics and the affine map in float32, one rounding of the
    result), so there the input goes straight in and the two full-size dtype copies of the explicit
    upcast are skipped (see docs/benchmarks.md; the outputs differ from the upcast form only in the last
    bit of about one element in 10^5, from the order of the float32 sums). Elsewhere the upcast is
    explicit.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or (x.device.type == "cpu" and x.dtype == self.weight.dtype
                                        and x.dtype in (torch.bfloat16, torch.float16)):
            return super().forward(x)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The UNet's norm layer: 32 groups, eps 1e-5."""
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (the reference's init for residual outputs) and return it.
    A no-op on the meta device, where there is nothing to zero."""
    for p in module.parameters():
        if not p.is_meta:
            nn.init.zeros_(p)
    return module


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv1d``, :class:`ldm.ops.Conv2d` (``nn.Conv2d`` with prepacked CPU inference) or
    ``nn.Conv3d`` by dimension."""
    return {1: nn.Conv1d, 2: Conv2d, 3: nn.Conv3d}[dims](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """``nn.AvgPool1d/2d/3d`` by dimension."""
    return {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](*args, **kwargs)


def linear(*args, **kwargs) -> nn.Module:
    """:class:`ldm.ops.Linear` (``nn.Linear`` with oneDNN CPU inference)."""
    return Linear(*args, **kwargs)


def checkpoint(func, inputs, params, flag: bool):
    """Gradient checkpointing when ``flag`` and gradients are needed; a plain call otherwise.
    No numeric effect."""
    if flag and torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
