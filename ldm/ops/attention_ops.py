"""``attention(q, k, v, scale)``: PyTorch's SDPA, optionally in query slices, or on the CPU a
row-blocked form on oneDNN matmuls."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ldm.ops import capability
from ldm.ops.config import SETTINGS, fast_path_allowed

# The blocked form runs from this many scores per head (queries x keys; below, the per-head
# Python loop costs more than it saves) ...
_BLOCKED_MIN_SCORES = 1 << 16
# ... in blocks of query rows whose scores take about this many bytes (they stay in cache).
_BLOCKED_SCORE_BYTES = 4 << 20


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None, *,
              upcast: bool = False) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v over the last two dims.

    :param q: [..., Nq, d]; ``k``, ``v``: [..., Nk, d].
    :param scale: defaults to d^-0.5.
    :param upcast: the scores and the softmax must be float32 whatever the input dtype (the SD 2
        reference's ``ATTN_PRECISION = "fp32"``); then the bfloat16 blocked form, which rounds the
        scores to bfloat16, is not used (SDPA keeps them in float32 and rounds only the output).
    :returns: [..., Nq, d].

    With ``ldm.ops.SETTINGS.attention == "auto"`` (the default), CPU inference attention with at
    least 65536 scores per head runs one head and one block of query rows at a time,
    ``softmax(scale·q·kᵀ)·v`` as two oneDNN matmuls with the block of scores kept in cache: in
    float32 where oneDNN's matmul is present (results equal SDPA up to float rounding), in bfloat16
    on CPUs with AVX-512 BF16 and no AMX (the scores are rounded to bfloat16 before the softmax, as
    in the reference under bf16 autocast; PyTorch's flash kernel keeps them in float32). Everywhere
    else (GPUs, autograd, ``torch.compile``, CPU autocast, small attentions, other dtypes), and
    with ``attention="sdpa"``, PyTorch's ``scaled_dot_product_attention`` runs, in slices of
    ``SETTINGS.attention_slice_size`` query positions when that is set. Measured figures:
    docs/benchmarks.md.
    """
    if q.device.type == "cpu":
        # The CPU flash kernel walks rows of each head: with heads split out of [B, N, h·d]
        # (strided views) it runs about 5% slower than on contiguous copies, which cost far less.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if _use_blocked(q, k, v, upcast):
            return _blocked_attention(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)
    slice_size = SETTINGS.attention_slice_size
    if slice_size is None or q.shape[-2] <= slice_size:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return torch.cat([F.scaled_dot_product_attention(q[..., i:i + slice_size, :], k, v, scale=scale)
                      for i in range(0, q.shape[-2], slice_size)], dim=-2)


def _use_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, upcast: bool = False) -> bool:
    """For contiguous CPU tensors: whether :func:`attention` takes the blocked form."""
    if not (SETTINGS.attention == "auto" and q.dtype == k.dtype == v.dtype
            and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]
            and q.shape[-2] * k.shape[-2] >= _BLOCKED_MIN_SCORES and fast_path_allowed(q, k, v)):
        return False
    if q.dtype == torch.float32:
        return capability.ONEDNN_LINEAR
    return q.dtype == torch.bfloat16 and not upcast and capability.cpu_has_fast_bf16_matmul()


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
        linear, q = capability.onednn_linear_op, q * scale
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
