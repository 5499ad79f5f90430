"""The image preprocessing of the SD 2 image embedders (Stable unCLIP), without kornia.

``kornia.geometry.resize(x, size, "bicubic", align_corners=True, antialias=True)`` as in kornia
0.6.0 (the reference's pin): when either axis shrinks, a Gaussian blur with σ = max(in/out, 1) per
axis and kernel ``int(4σ)`` made odd (border ``reflect``), then ``F.interpolate`` bicubic with
``align_corners=True``. Then ``(x + 1) / 2`` and the CLIP mean/std.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["CLIP_MEAN", "CLIP_STD", "gaussian_kernel1d", "gaussian_blur2d", "antialiased_resize", "clip_preprocess"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def gaussian_kernel1d(size: int, sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """kornia's ``gaussian(size, sigma)``: ``exp(-x²/(2σ²))`` over ``x = arange(size) - size // 2``, sum 1."""
    x = torch.arange(size, dtype=dtype, device=device) - size // 2
    if size % 2 == 0:
        x = x + 0.5
    g = torch.exp(-x.pow(2.0) / float(2 * sigma**2))
    return g / g.sum()


def gaussian_blur2d(x: torch.Tensor, kernel_size: tuple[int, int], sigma: tuple[float, float]) -> torch.Tensor:
    """kornia's ``gaussian_blur2d`` (border ``reflect``): the 2-D kernel ``outer(k_h, k_w)`` applied
    per channel. :param x: ``[B, C, H, W]``; ``kernel_size``/``sigma``: (rows, columns)."""
    kh, kw = kernel_size
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel sizes must be odd, got {kernel_size}")
    k2d = torch.outer(gaussian_kernel1d(kh, sigma[0], x.dtype, x.device),
                      gaussian_kernel1d(kw, sigma[1], x.dtype, x.device))
    c = x.shape[1]
    padded = F.pad(x, ((kw - 1) // 2, (kw - 1) // 2, (kh - 1) // 2, (kh - 1) // 2), mode="reflect")
    return F.conv2d(padded, k2d.expand(c, 1, kh, kw), groups=c)


def antialiased_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """kornia 0.6.0 ``resize(x, size, "bicubic", align_corners=True, antialias=True)``.

    :param x: ``[B, C, H, W]`` float. :returns: ``[B, C, *size]``."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    factors = (h / size[0], w / size[1])
    if max(factors) > 1:  # blur only when an axis shrinks
        sigmas = (max(factors[0], 1.0), max(factors[1], 1.0))
        ks = [int(2.0 * 2 * s) for s in sigmas]
        ks = tuple(k + 1 if k % 2 == 0 else k for k in ks)
        x = gaussian_blur2d(x, ks, sigmas)
    return F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=True)


def clip_preprocess(x: torch.Tensor, size: int = 224, antialias: bool = True) -> torch.Tensor:
    """An image in [-1, 1] ``[B, 3, H, W]`` -> the CLIP image tower's input ``[B, 3, size, size]``:
    resized (antialiased bicubic, aspect ratio not kept, as the reference), to [0, 1], then
    ``(x − mean) / std`` with the CLIP statistics."""
    x = antialiased_resize(x, (size, size)) if antialias else F.interpolate(
        x, size=(size, size), mode="bicubic", align_corners=True)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device)[:, None, None]
    return ((x + 1.0) / 2.0 - mean) / std
