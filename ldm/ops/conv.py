"""``Conv2d``: ``nn.Conv2d`` with prepacked weights for CPU inference."""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from ldm.ops import capability
from ldm.ops.config import SETTINGS, fast_path_allowed, is_compiling
from ldm.ops.memory import release_file_pages


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same state_dict keys, same math) that keeps a prepacked copy
    of its weight for CPU inference.

    On the CPU, ``F.conv2d`` hands the weight to oneDNN, which reorders it into its blocked layout
    on every call; for the UNet's deep levels (many channels, few positions) that reorder costs as
    much as the convolution itself. Here the reordered weight is made once per (weight, input
    shape, memory format) and reused. It is rebuilt when the weight changes (another tensor,
    ``.to()``, or an in-place update such as ``ema_scope``'s copy), and used only where
    :func:`ldm.ops.fast_path_allowed` holds, for float32/bfloat16 with ``padding_mode="zeros"``,
    with oneDNN's conv ops present and ``ldm.ops.SETTINGS.conv_prepack`` on. The result comes back
    in channels_last (oneDNN's native layout; same values up to float rounding), so the UNet's
    activations run in that layout after its first conv.

    The cost is a second copy of each conv weight while it is cached. When the weight is still the
    unmodified page-cache copy of a memory-mapped checkpoint (the usual CPU load), its pages are
    dropped from the process after packing (:func:`ldm.ops.release_file_pages`), so the packed copy
    replaces it in memory instead of doubling it; a later read of the weight (saving, ``.to()``,
    training) maps it back in from the file. Measured figures: docs/benchmarks.md.
    """

    _packed: Optional[tuple] = None  # (weakref to the weight, data_ptr, version, input shape, channels_last, packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_compiling():
            return super().forward(x)
        if not (SETTINGS.conv_prepack and capability.ONEDNN_CONV and self._can_prepack(x)):
            self._packed = None
            return super().forward(x)
        w = self.weight
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        key = (w.data_ptr(), _version(w), tuple(x.shape), channels_last)
        cached = self._packed
        if cached is None or cached[0]() is not w or cached[1:5] != key:
            same_weight = cached is not None and cached[0]() is w and cached[1:3] == key[:2]
            # Another input shape for the same weight: repack from the packed copy, so the weight
            # itself (released below) is not read again.
            source = cached[5].to_dense() if same_weight else w
            self._packed = cached = None  # free the old copy before making the new one
            dense = source.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            packed = capability.reorder_conv_weight(
                dense, list(self.padding), list(self.stride), list(self.dilation), self.groups, list(x.shape))
            del source, dense
            self._packed = cached = (weakref.ref(w), *key, packed)
            if not same_weight and key[1] == 0:
                release_file_pages(w)
        return capability.onednn_conv_op(
            x, cached[5], self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "none", [], "")

    def _can_prepack(self, x: torch.Tensor) -> bool:
        w, b = self.weight, self.bias
        return (x.dim() == 4 and x.dtype == w.dtype and x.dtype in (torch.float32, torch.bfloat16)
                and w.layout == torch.strided and (b is None or b.dtype == w.dtype)
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and fast_path_allowed(x, w, b))

    def _apply(self, fn, recurse=True):
        self._packed = None  # .to()/.half()/...: the packed copy belongs to the old weight
        return super()._apply(fn, recurse)

    def __getstate__(self):  # copy.deepcopy and pickling: the cache is not part of the module
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: v for k, v in state.items() if k != "_packed"}


def _version(t: torch.Tensor) -> Optional[int]:
    """In-place modification counter; None for inference tensors, which have none."""
    try:
        return t._version
    except RuntimeError:
        return None
