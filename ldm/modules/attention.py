"""Cross-attention transformer of the Stable Diffusion UNet (``SpatialTransformer``).

Attention runs through :func:`attention`, one place for the math: PyTorch's
``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU), optionally in query
slices to bound peak memory on small cards, and for CPU inference a row-blocked form on oneDNN
matmuls that runs 1.1-4x faster than PyTorch's CPU flash kernel (see
:func:`set_attention_backend`).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from ldm.modules.diffusionmodules import util
from ldm.modules.diffusionmodules.util import Conv2d, Linear, _is_compiling, checkpoint, cpu_autocast, zero_module

# Number of query positions per attention call; None = all at once. Set by
# :func:`set_attention_slicing` (a memory/speed trade-off for small GPUs; same numbers).
_SLICE_SIZE: Optional[int] = None

# "auto": the blocked CPU form where it was measured faster (see set_attention_backend); "sdpa":
# always PyTorch's scaled_dot_product_attention.
_BACKEND = "auto"
ATTENTION_BACKENDS = ("auto", "sdpa")

# The blocked form runs from this many scores per head (queries x keys; below, the per-head
# Python loop costs more than it saves) ...
_BLOCKED_MIN_SCORES = 1 << 16
# ... in blocks of query rows whose scores take about this many bytes (they stay in cache).
_BLOCKED_SCORE_BYTES = 4 << 20


def set_attention_slicing(slice_size: Optional[int]) -> None:
    """Compute attention in chunks of ``slice_size`` query positions (``None`` turns it off)."""
    global _SLICE_SIZE
    if slice_size is not None and slice_size < 1:
        raise ValueError(f"attention slice size must be >= 1 or None, got {slice_size}")
    _SLICE_SIZE = slice_size


def set_attention_backend(name: str) -> None:
    """``"auto"`` (the default) or ``"sdpa"``.

    ``"auto"`` runs CPU inference attention with at least 65536 scores per head (SD v1's self- and
    cross-attention from 256 latent positions up) one head and one block of query rows at a time,
    ``softmax(scale·q·kᵀ)·v`` as two oneDNN matmuls with the block of scores kept in cache.
    Measured on a 2-core AMD EPYC (AVX-512 BF16, no AMX) against the SDPA flash kernel, SD v1 at
    512x512, CFG batch:

    * float32 (oneDNN's fp32 matmul; PyTorch's own CPU matmuls go to MKL, which is about half as
      fast there): 4096-token self-attention 274 → 179 ms, the VAE's 512-wide head 171 → 87 ms,
      cross-attention 8.8 → 5.3 ms. Scores stay float32; results agree with SDPA to ~1e-6.
    * bfloat16 (on CPUs with AVX-512 BF16 and no AMX, where the flash kernel has no fast bf16
      path): 286 → 125 ms, 171 → 44 ms, 8.9 → 7.0 ms. The scores are rounded to bfloat16 before
      the softmax (the flash kernel keeps them in float32), as in the reference code under bf16
      autocast. On random inputs the output's error against float32 is 1.5x (unit-variance
      logits) to 2.2x (logits of std 2) the flash kernel's own bf16 error; on SD v1 (random
      weights) a 10-step 256x256 image is 49.6 dB from the float32 image, against 49.7 dB with
      SDPA.

    Everywhere else (GPUs, autograd, ``torch.compile``, CPU autocast, small attentions, other
    dtypes), and with ``"sdpa"``, PyTorch's ``scaled_dot_product_attention`` runs.
    """
    global _BACKEND
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    _BACKEND = name


@functools.lru_cache(maxsize=None)
def _cpu_has_fast_bf16_matmul() -> bool:
    """AVX-512 BF16 without AMX tiles: where the blocked bf16 form was measured (AMD EPYC)."""
    from ldm.devices import cpu_supports_bf16

    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return cpu_supports_bf16() and not (callable(amx) and amx())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v over the last two dims.

    :param q: [..., Nq, d]; ``k``, ``v``: [..., Nk, d].
    :param scale: defaults to d^-0.5.
    :returns: [..., Nq, d].
    """
    if q.device.type == "cpu":
        # The CPU flash kernel walks rows of each head: with heads split out of [B, N, h·d]
        # (strided views) it runs about 5% slower than on contiguous copies, which cost far less.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if _use_blocked(q, k, v):
            return _blocked_attention(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)
    if _SLICE_SIZE is None or q.shape[-2] <= _SLICE_SIZE:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return torch.cat([F.scaled_dot_product_attention(q[..., i:i + _SLICE_SIZE, :], k, v, scale=scale)
                      for i in range(0, q.shape[-2], _SLICE_SIZE)], dim=-2)


def _use_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    if not (_BACKEND == "auto" and q.dtype == k.dtype == v.dtype and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]
            and q.shape[-2] * k.shape[-2] >= _BLOCKED_MIN_SCORES
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and not _is_compiling() and not cpu_autocast()):
        return False
    if q.dtype == torch.float32:
        return util._MKLDNN_LINEAR
    return q.dtype == torch.bfloat16 and _cpu_has_fast_bf16_matmul()


def _blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`attention` for contiguous CPU tensors without autograd, one head and one block of
    query rows at a time, the block of scores (about 4 MiB) staying in cache.

    float32: ``q·scale`` once, then per block oneDNN's ``linear`` op for ``S = q·kᵀ`` and for
    ``softmax(S)·v`` (against ``vᵀ``). bfloat16: ``addmm(alpha=scale)`` (the scale applied in float32
    before the scores are rounded) into a reused block, then ``mm`` (both oneDNN in bf16)."""
    *lead, n, d = q.shape
    m, dv = k.shape[-2], v.shape[-1]
    q, k, v = q.reshape(-1, n, d), k.reshape(-1, m, d), v.reshape(-1, m, dv)
    out = q.new_empty(q.shape[0], n, dv)
    rows = max(1, min(n, _BLOCKED_SCORE_BYTES // (m * q.element_size())))
    if q.dtype == torch.float32:
        linear, q = util._onednn_linear_op, q * scale
        for j in range(q.shape[0]):
            kj, vt = k[j], v[j].t().contiguous()
            for i in range(0, n, rows):
                s = linear(q[j, i:i + rows], kj, None, "none", [], "")
                out[j, i:i + rows] = linear(torch.softmax(s, -1), vt, None, "none", [], "")
    else:
        scores = q.new_empty(rows, m)
        for j in range(q.shape[0]):
            kt, vj = k[j].t(), v[j]
            for i in range(0, n, rows):
                s = scores[:min(rows, n - i)]
                torch.addmm(s, q[j, i:i + rows], kt, beta=0, alpha=scale, out=s)  # beta 0: s's old values unused
                torch.mm(torch.softmax(s, -1), vj, out=out[j, i:i + rows])
    return out.reshape(*lead, n, dv)


class GEGLU(nn.Module):
    """Linear(dim_in, 2·dim_out) split in halves [a, g]; returns a·GELU(g) (exact erf GELU)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled() and gate.requires_grad:
            return a * F.gelu(gate)
        # Inference: GELU in place on the projection's gate half, one full-size tensor fewer
        # (same values; bf16 feed-forward at 8192 tokens 45 -> 39 ms on the CPU).
        return a * torch.ops.aten.gelu_(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dim_out: Optional[int] = None, mult: int = 4, glu: bool = False, dropout: float = 0.):
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), Linear(inner_dim, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` [B, N, query_dim] over ``context`` [B, M, context_dim]
    (over ``x`` itself when context is None). q/k/v without bias, output projection with bias."""

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8,
                 dim_head: int = 64, dropout: float = 0.):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = context_dim or query_dim
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.to_q = Linear(query_dim, inner_dim, bias=False)
        self.to_k = Linear(context_dim, inner_dim, bias=False)
        self.to_v = Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, mask=None) -> torch.Tensor:
        if mask is not None:
            raise NotImplementedError("attention masks are not used by any Stable Diffusion model")
        context = x if context is None else context
        b, h = x.shape[0], self.heads
        # [B, N, h·d] -> [B, h, N, d]
        q, k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = attention(q, k, v, scale=self.scale)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]))


class BasicTransformerBlock(nn.Module):
    """x += attn1(LN1 x) (self); x += attn2(LN2 x, context) (cross); x += FF(LN3 x)."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0., context_dim: Optional[int] = None,
                 gated_ff: bool = True, checkpoint: bool = True, disable_self_attn: bool = False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout,
                                    context_dim=context_dim if disable_self_attn else None)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), context=context if self.disable_self_attn else None)
        x = x + self.attn2(self.norm2(x), context=context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the H·W positions of an image feature map, conditioned on ``context``.

    x → GroupNorm(32, eps 1e-6) → proj_in → (B, H·W, C) → blocks → proj_out → + x.
    proj_in/proj_out are 1x1 convs (SD 1) or Linear layers applied after the reshape
    (``use_linear=True``, SD 2).
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.,
                 context_dim=None, disable_self_attn: bool = False, use_linear: bool = False,
                 use_checkpoint: bool = True):
        super().__init__()
        if context_dim is not None and not isinstance(context_dim, (list, tuple)):
            context_dim = [context_dim] * depth
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = Linear(in_channels, inner_dim)
        else:
            self.proj_in = Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout,
                                  context_dim=None if context_dim is None else context_dim[d],
                                  disable_self_attn=disable_self_attn, checkpoint=use_checkpoint)
            for d in range(depth)])
        if use_linear:
            self.proj_out = zero_module(Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0))
        self.use_linear = use_linear

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        if not isinstance(context, list):
            context = [context]
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        # [B, C, H, W] -> [B, H·W, C], made contiguous once (free for channels_last input) so that
        # the LayerNorms, residual adds and projections of the blocks never work on a strided view.
        x = x.flatten(2).transpose(1, 2).contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, context=context[min(i, len(context) - 1)])
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)  # a view, channels_last-strided: no copy
        if not self.use_linear:
            x = self.proj_out(x)
        return x_in + x  # x_in first: the sum takes x_in's memory format
