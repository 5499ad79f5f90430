"""The one settings object of the CPU fast paths, its context manager, and the one predicate
"may a fast path run on these tensors".

``SETTINGS`` is read by the fast paths on every call (an attribute read, nothing more); it is
changed only through :func:`settings` (for a block) or :func:`configure` (from then on), which
check every value first and change nothing when one is wrong.
"""
from __future__ import annotations

import contextlib
import functools
import numbers
from typing import Any, Iterator

import torch

#: Values of the ``attention`` setting.
ATTENTION_CHOICES = ("auto", "sdpa")

_DEFAULTS = {"attention": "auto", "attention_slice_size": None, "conv_prepack": True, "onednn_linear": True}


def _check_attention(value: Any) -> str:
    if not isinstance(value, str) or value not in ATTENTION_CHOICES:
        raise ValueError(f"attention backend must be one of {ATTENTION_CHOICES}, got {value!r}")
    return value


def _check_slice_size(value: Any):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"attention slice size must be None or an integer >= 1, got {value!r}")
    return int(value)


def _check_bool(name: str):
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
        return value
    return check


_CHECKS = {"attention": _check_attention, "attention_slice_size": _check_slice_size,
           "conv_prepack": _check_bool("conv_prepack"), "onednn_linear": _check_bool("onednn_linear")}


class Settings:
    """Switches of the CPU fast paths (read them here; change them with :func:`settings` or
    :func:`configure`).

    * ``attention``: ``"auto"`` (default) runs CPU inference attention in the blocked form where
      it is faster (see :mod:`ldm.ops.attention_ops`); ``"sdpa"``: always PyTorch's
      ``scaled_dot_product_attention``.
    * ``attention_slice_size``: ``None`` (default) or the number of query positions per SDPA call,
      to bound peak memory on small GPUs (same numbers).
    * ``conv_prepack``: prepacked conv weights for CPU inference (:class:`ldm.ops.Conv2d`); off frees
      the packed copies at the next forward of each conv. Default on.
    * ``onednn_linear``: oneDNN matmuls for CPU inference of :class:`ldm.ops.Linear`. Default on.
    """

    __slots__ = tuple(_DEFAULTS)

    def __init__(self) -> None:
        for name, value in _DEFAULTS.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"ldm.ops settings are changed with ldm.ops.settings({name}=...) or "
                             f"ldm.ops.configure({name}=...)")

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"


#: The one settings object of the process.
SETTINGS = Settings()


def configure(**changes: Any) -> dict:
    """Change settings from now on; returns the previous values of the changed ones (pass them to
    ``configure(**previous)`` to go back).

    :raises ValueError: for an unknown name or a value not allowed (nothing is changed then).
    """
    unknown = [name for name in changes if name not in _CHECKS]
    if unknown:
        raise ValueError(f"unknown ldm.ops setting {unknown[0]!r}; the settings are {', '.join(_CHECKS)}")
    checked = {name: _CHECKS[name](value) for name, value in changes.items()}
    previous = {name: getattr(SETTINGS, name) for name in checked}
    for name, value in checked.items():
        object.__setattr__(SETTINGS, name, value)
    return previous


@contextlib.contextmanager
def settings(**changes: Any) -> Iterator[Settings]:
    """``with ldm.ops.settings(attention="sdpa", conv_prepack=False): ...``: the changes hold inside
    the block; on exit, also when the block raises, every setting is back to its value at entry
    (a :func:`configure` inside the block included). Nests. Yields :data:`SETTINGS`.

    :raises ValueError: on entry, for an unknown name or a value not allowed (nothing changed).
    """
    saved = SETTINGS.as_dict()
    configure(**changes)
    try:
        yield SETTINGS
    finally:
        for name, value in saved.items():
            object.__setattr__(SETTINGS, name, value)


# -- when a fast path may run ------------------------------------------------------------------------

def _autocast_probe():
    try:
        torch.is_autocast_enabled("cpu")
    except TypeError:  # PyTorch < 2.4
        return torch.is_autocast_cpu_enabled
    return functools.partial(torch.is_autocast_enabled, "cpu")


#: ``cpu_autocast()``: whether CPU autocast is on.
cpu_autocast = _autocast_probe()


def _never() -> bool:
    return False


#: ``is_compiling()``: whether ``torch.compile`` is tracing the current call.
is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or _never


def fast_path_allowed(*tensors) -> bool:
    """Whether a CPU fast path may replace the plain PyTorch op for these tensors (``None`` entries,
    e.g. a missing bias, are skipped): all on the CPU, no gradient recorded for any of them, not
    under ``torch.compile`` (inductor makes its own kernels) and not under CPU autocast (whose
    casts belong to ``F.conv2d``/``F.linear``/SDPA, which the direct oneDNN ops would bypass).

    Only the conditions every fast path shares; each checks its own dtypes and shapes besides.
    """
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or (grad and t.requires_grad)):
            return False
    return not is_compiling() and not cpu_autocast()
