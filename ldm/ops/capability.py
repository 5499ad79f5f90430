"""What this PyTorch build and this CPU offer the fast paths, found once at import.

* ``ONEDNN_CONV``: oneDNN's prepacked-convolution ops (``torch.ops.mkldnn._reorder_convolution_weight``
  and ``_convolution_pointwise``, the ones inductor uses), on x86-64 where they were measured.
* ``ONEDNN_LINEAR``: besides, oneDNN's matmul ``torch.ops.mkldnn._linear_pointwise``
  (``onednn_linear_op``; None without it).
* :func:`cpu_has_fast_bf16_matmul`: AVX-512 BF16 without AMX tiles (asked on first use, then kept).
"""
from __future__ import annotations

import functools
import platform

import torch


def _onednn_conv_ops_available() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        ops = torch.ops.mkldnn
        return (torch.backends.mkldnn.is_available()
                and hasattr(ops, "_reorder_convolution_weight") and hasattr(ops, "_convolution_pointwise"))
    except (AttributeError, RuntimeError):
        return False


ONEDNN_CONV: bool = _onednn_conv_ops_available()
ONEDNN_LINEAR: bool = ONEDNN_CONV and hasattr(torch.ops.mkldnn, "_linear_pointwise")
onednn_linear_op = torch.ops.mkldnn._linear_pointwise if ONEDNN_LINEAR else None
reorder_conv_weight = torch.ops.mkldnn._reorder_convolution_weight if ONEDNN_CONV else None
onednn_conv_op = torch.ops.mkldnn._convolution_pointwise if ONEDNN_CONV else None


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16_matmul() -> bool:
    """AVX-512 BF16 without AMX tiles: where the blocked bf16 attention was measured (AMD EPYC)."""
    from ldm.devices import cpu_supports_bf16

    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return cpu_supports_bf16() and not (callable(amx) and amx())
