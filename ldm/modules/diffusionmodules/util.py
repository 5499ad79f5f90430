"""Small building blocks shared by the diffusion UNet: the noise schedule, the timestep
embedding and a few layer constructors whose names the reference configs and code use."""
from __future__ import annotations

import ctypes
import math
import os
import platform
import sys
import weakref
from typing import Optional

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
import torch.utils.checkpoint


def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-4,
                       linear_end: float = 2e-2, cosine_s: float = 8e-3) -> np.ndarray:
    """Betas of a DDPM noise schedule, float64, shape ``[n_timestep]``.

    ``"linear"`` is the reference's name, but it is linear in sqrt(beta), i.e. quadratic in beta
    (diffusers calls it ``scaled_linear``): ``betas = linspace(sqrt(start), sqrt(end), n)**2``.
    ``"cosine"`` is Nichol & Dhariwal (2021), clipped at 0.999. ``"sqrt_linear"`` is linear in beta,
    ``"sqrt"`` its square root.

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
    else:
        raise ValueError(f"unknown beta schedule {schedule!r}; use one of linear, cosine, sqrt_linear, sqrt")
    return betas.numpy()


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
    upcast are skipped (about 2x faster; the outputs differ from the upcast form only in the last
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


# Whether :class:`Conv2d` may run CPU inference on prepacked weights; see set_conv_prepacking.
_CONV_PREPACK = True
# Whether :class:`Linear` may run CPU inference through oneDNN; see set_onednn_linear.
_ONEDNN_LINEAR = True


def set_onednn_linear(enabled: bool) -> None:
    """Turn the oneDNN path of :class:`Linear` (CPU inference) on or off. On by default; off gives
    ``F.linear`` (the numbers differ only by float rounding)."""
    global _ONEDNN_LINEAR
    _ONEDNN_LINEAR = bool(enabled)


def set_conv_prepacking(enabled: bool) -> None:
    """Turn the CPU weight prepacking of the UNet's convolutions (:class:`Conv2d`) on or off.

    On by default. Off frees the packed copies at the next forward of each conv and gives the
    plain ``F.conv2d`` path (the numbers differ only by float rounding).
    """
    global _CONV_PREPACK
    _CONV_PREPACK = bool(enabled)


def _mkldnn_conv_ops_available() -> bool:
    """oneDNN's prepacked-conv ops (the ones inductor uses), on x86-64 where they were measured."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        ops = torch.ops.mkldnn
        return (torch.backends.mkldnn.is_available()
                and hasattr(ops, "_reorder_convolution_weight") and hasattr(ops, "_convolution_pointwise"))
    except (AttributeError, RuntimeError):
        return False


_MKLDNN_CONV = _mkldnn_conv_ops_available()
_MKLDNN_LINEAR = _MKLDNN_CONV and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_onednn_linear_op = torch.ops.mkldnn._linear_pointwise if _MKLDNN_LINEAR else None


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same state_dict keys, same math) that keeps a prepacked copy
    of its weight for CPU inference.

    On the CPU, ``F.conv2d`` hands the weight to oneDNN, which reorders it into its blocked layout
    on every call. For the UNet's deep levels (1280 channels at 8x8 or 4x4 latent positions) that
    reorder costs as much as the convolution itself. Here the reordered weight is made once per
    (weight, input shape, memory format) and reused. It is rebuilt when the weight changes (another
    tensor, ``.to()``, or an in-place update such as ``ema_scope``'s copy), and it is not used while
    gradients are recorded, under CPU autocast or under ``torch.compile``. The result comes back in channels_last
    (oneDNN's native layout; same values), so the UNet's activations run in that layout after its
    first conv. The cost: a second copy of each conv weight while it is cached (1.1 GiB for the SD
    v1 UNet in bfloat16, 2.2 GiB in float32); :func:`set_conv_prepacking` turns it off. When the
    weight is still the unmodified page-cache copy of a memory-mapped checkpoint (the usual CPU
    load), its pages are dropped from the process after packing (:func:`release_file_pages`; they
    stay in the page cache), so the packed copy replaces it in memory instead of doubling it. A
    later read of the weight (saving, ``.to()``, training) maps it back in from the file.
    """

    _packed: Optional[tuple] = None  # (weakref to the weight, data_ptr, version, input shape, channels_last, packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_compiling():
            return super().forward(x)
        if not (_CONV_PREPACK and _MKLDNN_CONV and self._can_prepack(x)):
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
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                dense, list(self.padding), list(self.stride), list(self.dilation), self.groups, list(x.shape))
            del source, dense
            self._packed = cached = (weakref.ref(w), *key, packed)
            if not same_weight and key[1] == 0:
                release_file_pages(w)
        return torch.ops.mkldnn._convolution_pointwise(
            x, cached[5], self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "none", [], "")

    def _can_prepack(self, x: torch.Tensor) -> bool:
        w = self.weight
        return (x.device.type == "cpu" and w.device.type == "cpu" and x.dim() == 4 and x.dtype == w.dtype
                and x.dtype in (torch.float32, torch.bfloat16) and w.layout == torch.strided
                and (self.bias is None or self.bias.dtype == w.dtype)
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)) and not cpu_autocast())

    def _apply(self, fn, recurse=True):
        self._packed = None  # .to()/.half()/...: the packed copy belongs to the old weight
        return super()._apply(fn, recurse)

    def __getstate__(self):  # copy.deepcopy and pickling: the cache is not part of the module
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: v for k, v in state.items() if k != "_packed"}


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state_dict keys, same math) whose CPU inference runs
    through oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the op inductor uses) instead
    of ``F.linear``.

    On the CPU ``F.linear`` goes to the BLAS PyTorch was built with (MKL in the x86 wheels), which
    on the AMD EPYC this was measured on reaches about half of oneDNN's float32 speed: 94 → 58 ms
    for SD v1's 320→2560 feed-forward projection over 8192 tokens, 37 → 16 ms for its 1280→320
    one, 4.1 → 1.9 ms for CLIP's 768→3072 over 154 tokens; in bfloat16, where both sides already
    use oneDNN, it saves the bias broadcast (35 → 30 ms for the first). float32 stays float32:
    the results match ``F.linear`` to ~3e-7 relative (summation order). Used for float32 and
    bfloat16 on x86-64 when no gradient is recorded, not under CPU autocast and not under
    ``torch.compile``; :func:`set_onednn_linear` turns it off.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _ONEDNN_LINEAR and _MKLDNN_LINEAR and self._can_use_onednn(x):
            return _onednn_linear_op(x, self.weight, self.bias, "none", [], "")
        return super().forward(x)

    def _can_use_onednn(self, x: torch.Tensor) -> bool:
        w, b = self.weight, self.bias
        return (x.device.type == "cpu" and w.device.type == "cpu" and x.dim() >= 2 and x.numel() > 0
                and x.dtype == w.dtype and x.dtype in (torch.float32, torch.bfloat16)
                and w.layout == torch.strided and w.is_contiguous() and (b is None or b.dtype == w.dtype)
                and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad
                                                      or (b is not None and b.requires_grad)))
                and not cpu_autocast() and not _is_compiling())


_MADV_DONTNEED = 4
_libc = None


def release_file_pages(t: torch.Tensor) -> int:
    """Drop ``t``'s memory pages from this process when they are still the page-cache pages of a
    privately mapped file (a memory-mapped checkpoint nobody wrote to); returns the bytes released
    (0 elsewhere: other platforms, anonymous memory, written pages, a tensor smaller than a page).

    The data stays in the kernel's page cache and is mapped back in when next read, from the file,
    so the values never change. ``MADV_DONTNEED`` would discard pages that were written
    (copy-on-write copies of the file's), so ``/proc/self/pagemap`` is read first and anything but
    untouched or file-backed pages leaves the tensor alone. Only whole pages inside the tensor are
    named, so neighbouring tensors keep theirs.
    """
    global _libc
    if sys.platform != "linux" or t.device.type != "cpu" or t.numel() == 0 or not t.is_contiguous():
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    start = t.data_ptr()
    lo, hi = -(-start // page) * page, (start + t.numel() * t.element_size()) // page * page
    if hi <= lo or not _in_private_file_mapping(lo, hi) or not _only_file_pages(lo, hi, page):
        return 0
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return hi - lo if _libc.madvise(lo, hi - lo, _MADV_DONTNEED) == 0 else 0


def _only_file_pages(lo: int, hi: int, page: int) -> bool:
    """Whether every page of ``[lo, hi)`` is either not yet mapped in (and not swapped out) or a
    page-cache page of the file (``/proc/self/pagemap``: bit 63 present, 62 swapped, 61 file)."""
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(lo // page * 8)
            entries = np.frombuffer(f.read((hi - lo) // page * 8), dtype=np.uint64)
    except OSError:
        return False
    if entries.size != (hi - lo) // page:
        return False
    present, swapped, file = (entries >> np.uint64(63)) & 1, (entries >> np.uint64(62)) & 1, (entries >> np.uint64(61)) & 1
    return bool(np.all(np.where(present == 1, file == 1, swapped == 0)))


def _in_private_file_mapping(lo: int, hi: int) -> bool:
    """Whether ``[lo, hi)`` lies in one private mapping of a regular file (``/proc/self/maps``)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                a, b = (int(v, 16) for v in fields[0].split("-"))
                if a <= lo < b:
                    return (hi <= b and fields[1].endswith("p") and fields[4] != "0" and len(fields) == 6
                            and fields[5].startswith("/"))
    except (OSError, ValueError, IndexError):
        pass
    return False


def _version(t: torch.Tensor) -> Optional[int]:
    """In-place modification counter; None for inference tensors, which have none."""
    try:
        return t._version
    except RuntimeError:
        return None


def cpu_autocast() -> bool:
    """Whether CPU autocast is on: the oneDNN fast paths then step aside, since autocast's casts
    belong to ``F.conv2d``/``F.linear``/SDPA and the direct oneDNN ops would bypass them."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # PyTorch < 2.4
        return torch.is_autocast_cpu_enabled()


def _is_compiling() -> bool:
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv1d``, :class:`Conv2d` (``nn.Conv2d`` with prepacked CPU inference) or ``nn.Conv3d``
    by dimension."""
    return {1: nn.Conv1d, 2: Conv2d, 3: nn.Conv3d}[dims](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """``nn.AvgPool1d/2d/3d`` by dimension."""
    return {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](*args, **kwargs)


def linear(*args, **kwargs) -> nn.Module:
    """:class:`Linear` (``nn.Linear`` with oneDNN CPU inference)."""
    return Linear(*args, **kwargs)


def checkpoint(func, inputs, params, flag: bool):
    """Gradient checkpointing when ``flag`` and gradients are needed; a plain call otherwise.
    No numeric effect."""
    if flag and torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
