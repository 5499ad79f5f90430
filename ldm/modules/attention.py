"""Cross-attention transformer of the Stable Diffusion UNet (``SpatialTransformer``).

Attention runs through :func:`ldm.ops.attention` (PyTorch's ``scaled_dot_product_attention``, or
its fast CPU form), and the projections are :class:`ldm.ops.Linear` / :class:`ldm.ops.Conv2d`;
see :mod:`ldm.ops` for the fast paths and their switches.

Attention precision. SD 2's reference computes ``q·kᵀ·scale`` and the softmax in float32 also
under fp16 autocast (``_ATTN_PRECISION = "fp32"``, the default of its ``ATTN_PRECISION``
environment variable; 2.1 in fp16 is unstable without it). Here the activations stay in the
model's dtype and :func:`~ldm.ops.attention` gets them as they are: PyTorch's SDPA keeps the scores
and the softmax in float32 for fp16/bf16 inputs on every backend (the CPU flash kernel, the CUDA
flash and memory-efficient kernels, and the math kernel, which upcasts half inputs unless
``torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)``), and rounds only the output, so
SD 1 and SD 2 both get the upcast without a float32 copy of q and k. (The one exception is the
blocked bfloat16 CPU form of ``ldm.ops``, which rounds the scores to bfloat16 before the softmax,
as the SD 1 reference did under bf16 autocast; SD 2 models never take it: their family sets
``CrossAttention.upcast_attention``.) There is no switch for the reference's
``ATTN_PRECISION=fp16``: it only trades accuracy for speed on old GPUs. In float32 all of this
changes nothing.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from ldm.modules.diffusionmodules.util import checkpoint, zero_module
from ldm.ops import Conv2d, Linear, attention


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
        # (same values; docs/benchmarks.md).
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
    (over ``x`` itself when context is None). q/k/v without bias, output projection with bias.

    ``upcast_attention``: scores and softmax in float32 whatever the weights' dtype, as the SD 2
    reference (``ATTN_PRECISION = "fp32"``); the SD v1 reference rounds them under autocast. Set per
    model family (:func:`ldm.families.configure_model`); not part of the state_dict.
    """

    upcast_attention = False

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
        out = attention(q, k, v, scale=self.scale, upcast=self.upcast_attention)
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
