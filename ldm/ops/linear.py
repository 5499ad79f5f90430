"""``Linear``: ``nn.Linear`` whose CPU inference runs on oneDNN's matmul."""
from __future__ import annotations

import torch
from torch import nn

from ldm.ops import capability
from ldm.ops.config import SETTINGS, fast_path_allowed


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state_dict keys, same math) whose CPU inference runs
    through oneDNN's matmul (the op inductor uses, :data:`ldm.ops.capability.onednn_linear_op`)
    instead of ``F.linear``.

    On the CPU ``F.linear`` goes to the BLAS PyTorch was built with (MKL in the x86 wheels), which
    on some CPUs reaches about half of oneDNN's float32 speed; in bfloat16, where both use oneDNN,
    the direct op saves the bias broadcast. float32 stays float32: the results match ``F.linear``
    up to float rounding (summation order). Used for float32 and bfloat16 with a contiguous weight
    where :func:`ldm.ops.fast_path_allowed` holds and ``ldm.ops.SETTINGS.onednn_linear`` is on.
    Measured figures: docs/benchmarks.md.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if SETTINGS.onednn_linear and capability.ONEDNN_LINEAR and self._can_use_onednn(x):
            return capability.onednn_linear_op(x, self.weight, self.bias, "none", [], "")
        return super().forward(x)

    def _can_use_onednn(self, x: torch.Tensor) -> bool:
        w, b = self.weight, self.bias
        return (x.dim() >= 2 and x.numel() > 0 and x.dtype == w.dtype and x.dtype in (torch.float32, torch.bfloat16)
                and w.layout == torch.strided and w.is_contiguous() and (b is None or b.dtype == w.dtype)
                and fast_path_allowed(x, w, b))
