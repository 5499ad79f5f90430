"""CPU fast paths and memory tricks of the models, kept apart from the model code.

The UNet, its transformers, the VAE and CLIP build their layers from :class:`Conv2d` and
:class:`Linear` and call :func:`attention`; everything hardware-specific lives here:

* :class:`Conv2d` (``conv.py``): ``nn.Conv2d`` that, for CPU inference, keeps its weight
  reordered into oneDNN's blocked layout (once per weight and input shape, instead of on every
  call) and runs oneDNN's convolution on it. Its results come back channels_last.
* :class:`Linear` (``linear.py``): ``nn.Linear`` whose CPU inference runs on oneDNN's matmul
  instead of the BLAS behind ``F.linear``.
* :func:`attention` (``attention_ops.py``): ``softmax(q·kᵀ·scale)·v`` through PyTorch's
  ``scaled_dot_product_attention`` (optionally in slices of query positions, to bound peak memory),
  or, for large CPU inference attentions in float32 (oneDNN present) or bfloat16 (AVX-512 BF16
  without AMX), one head and one cache-sized block of query rows at a time on oneDNN matmuls.
* :func:`release_file_pages` and :func:`release_mapped_range` (``memory.py``): give pages of a
  memory-mapped checkpoint back to the kernel once they have been packed or cast (Linux), so the
  process does not hold both copies.

When: the fast paths run only where :func:`fast_path_allowed` holds (CPU tensors, no gradient
recorded for them, not under ``torch.compile``, not under CPU autocast), for float32/bfloat16, and
where this PyTorch and CPU have the ops (:mod:`ldm.ops.capability`, found once at import).
Everywhere else (GPUs, training, other dtypes) the plain PyTorch op runs. The numbers equal the
plain PyTorch path up to float rounding (summation order); the one exception is blocked bfloat16
attention, which rounds the scores to bfloat16 before the softmax as the reference does under bf16
autocast. Measured speed and memory: docs/benchmarks.md.

Switches: the one settings object :data:`SETTINGS` (read it; fields ``attention`` ``"auto"`` |
``"sdpa"``, ``attention_slice_size`` None | int >= 1, ``conv_prepack`` and ``onednn_linear``
bools), changed for a block with the context manager ::

    import ldm.ops
    with ldm.ops.settings(attention="sdpa", conv_prepack=False):
        ...  # PyTorch's SDPA and F.conv2d; the previous values come back on exit

or from then on with ``ldm.ops.configure(attention_slice_size=1024)`` (it returns the previous
values). Wrong names or values raise ``ValueError`` naming the allowed ones.
"""
from ldm.ops.attention_ops import attention
from ldm.ops.config import ATTENTION_CHOICES, SETTINGS, Settings, configure, fast_path_allowed, settings
from ldm.ops.conv import Conv2d
from ldm.ops.linear import Linear
from ldm.ops.memory import release_file_pages, release_mapped_range

__all__ = ["ATTENTION_CHOICES", "SETTINGS", "Settings", "settings", "configure", "fast_path_allowed",
           "Conv2d", "Linear", "attention", "release_file_pages", "release_mapped_range"]
