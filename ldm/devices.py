"""Choosing the device, the compute dtype and the random generators, once, at the top of a script.

* :func:`pick_device`: ``auto`` is CUDA, then Apple MPS, then the CPU; an explicit device that is
  not there is an error that lists the ones that are.
* :func:`resolve_precision`: the reference's ``--precision autocast|full`` plus ``auto``, ``fp32``,
  ``fp16`` and ``bf16``, turned into one ``torch.dtype``.
* :func:`seed_generators`: one CPU ``torch.Generator`` per image (seed, seed+1, ...), so a seed
  gives the same noise on every device and for every batch size (house style, habit 7).
"""
from __future__ import annotations

import functools
import logging
import secrets

import torch

from ldm.errors import UserInputError

__all__ = [
    "UserInputError",
    "PRECISIONS",
    "available_devices",
    "pick_device",
    "cpu_supports_bf16",
    "resolve_precision",
    "seed_generators",
    "random_seed",
]

logger = logging.getLogger(__name__)

#: Accepted ``--precision`` values and their aliases.
PRECISIONS = {
    "auto": "auto",
    "autocast": "autocast",
    "full": "fp32",
    "fp32": "fp32",
    "float32": "fp32",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "bf16": "bf16",
    "bfloat16": "bf16",
}

_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes unsigned 64-bit seeds


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """Devices this machine can run on, e.g. ``["cuda:0", "cuda:1", "cpu"]`` or ``["mps", "cpu"]``."""
    found = []
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    found.append("cpu")
    return found


def pick_device(requested: str | None = "auto") -> torch.device:
    """Turn a ``--device`` value into a ``torch.device``.

    :param requested: ``None``/``"auto"`` (CUDA, else MPS, else CPU), ``"cpu"``, ``"cuda"``,
        ``"cuda:N"`` or ``"mps"``.
    :raises UserInputError: for an unknown name or a device this machine does not have; the message
        lists the available devices.
    """
    name = "auto" if requested is None else str(requested).strip().lower()
    if name in ("", "auto"):
        if torch.cuda.is_available():
            device = torch.device("cuda")
        elif _mps_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
        logger.info("using device %s", device)
        return device

    choices = ", ".join(["auto"] + available_devices())
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserInputError(f"unknown device {requested!r}; choose one of: {choices}") from None

    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(
                f"device {requested!r} requested but CUDA is not available (no NVIDIA GPU, or a CPU-only "
                f"PyTorch build); available devices: {choices}"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserInputError(
                f"device {requested!r} requested but this machine has {count} CUDA device(s); "
                f"available devices: {choices}"
            )
        return device
    if device.type == "mps":
        if not _mps_available():
            raise UserInputError(
                f"device {requested!r} requested but Apple MPS is not available (needs an Apple-silicon "
                f"Mac with macOS 12.3+ and an MPS-enabled PyTorch); available devices: {choices}"
            )
        return device
    raise UserInputError(f"device type {device.type!r} is not supported; choose one of: {choices}")


@functools.lru_cache(maxsize=None)
def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (so bf16 is faster than fp32, not emulated).

    True when PyTorch's CPU kernels run at the AVX512 level and the CPU has AVX512-BF16 or AMX
    (checked through ``torch.cpu`` where this PyTorch has the probes), and a small bf16 matmul
    gives the right answer. Other CPUs (AVX2 only, most ARM builds) report False.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX512" not in capability:
        return False
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [p for p in probes if callable(p)]
    if probes and not any(p() for p in probes):
        return False
    try:
        a = torch.full((4, 4), 1.5, dtype=torch.bfloat16)
        ok = float((a @ a)[0, 0]) == 9.0
    except RuntimeError:
        return False
    return ok


def resolve_precision(precision: str, device: torch.device | str) -> torch.dtype:
    """The compute dtype for ``--precision`` on ``device``.

    * ``autocast``: float16 on CUDA, float32 elsewhere (the reference's meaning: it autocast to
      fp16 on CUDA and ran fp32 otherwise).
    * ``full`` / ``fp32``: float32 everywhere.
    * ``fp16``: float16 on CUDA and MPS; an error on the CPU that names bf16 as the fix.
    * ``bf16``: bfloat16; an error on a GPU without bf16, a warning on a CPU without native bf16.
    * ``auto``: float16 on CUDA; on the CPU bfloat16 when :func:`cpu_supports_bf16`, else
      float32; float32 on MPS.

    ``auto`` keeps MPS at float32, the choice that works everywhere: how well half precision runs
    on MPS depends on the macOS and PyTorch versions, so ``fp16`` there is asked for explicitly.

    :raises UserInputError: for an unknown value, fp16 on the CPU, or bf16 on a GPU without it.
    """
    key = PRECISIONS.get(str(precision).strip().lower())
    if key is None:
        raise UserInputError(
            f"unknown precision {precision!r}; choose one of: auto, autocast, full, fp32, fp16, bf16"
        )
    device = torch.device(device)
    kind = device.type

    if key == "fp32":
        return torch.float32
    if key == "autocast":
        return torch.float16 if kind == "cuda" else torch.float32
    if key == "auto":
        if kind == "cuda":
            return torch.float16
        if kind == "cpu" and cpu_supports_bf16():
            return torch.bfloat16
        return torch.float32
    if key == "fp16":
        if kind == "cpu":
            raise UserInputError(
                "precision fp16 is not supported on the CPU (many half-precision CPU kernels are missing "
                "or very slow); use --precision bf16, or fp32"
            )
        return torch.float16
    # bf16
    if kind == "cuda" and not _cuda_bf16_supported(device):
        raise UserInputError(
            f"precision bf16 is not supported by {torch.cuda.get_device_name(device)}; use --precision fp16"
        )
    if kind == "cpu" and not cpu_supports_bf16():
        logger.warning("this CPU has no native bfloat16; bf16 will be emulated and slower than fp32")
    return torch.bfloat16


def _cuda_bf16_supported(device: torch.device) -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older PyTorch without the argument
        return bool(torch.cuda.is_bf16_supported())


def seed_generators(seed: int, n: int) -> list[torch.Generator]:
    """One CPU generator per image: image ``i`` of a run draws its noise from ``seed + i``.

    Noise is drawn on the CPU and moved to the device, so a seed gives the same image on CUDA, MPS
    and CPU, and image ``i`` does not depend on the batch size.

    :param seed: the run's seed, ``0 <= seed`` and ``seed + n - 1 < 2**64``.
    :param n: number of images.
    :returns: ``n`` ``torch.Generator`` objects on the CPU, seeded ``seed, seed + 1, ...``.
    :raises UserInputError: for a seed outside that range.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer (the number of images), got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserInputError(f"seed must be an integer, got {seed!r}")
    if seed < 0 or seed + n - 1 > _MAX_SEED:
        raise UserInputError(
            f"seed {seed} is out of range for {n} image(s); use a seed from 0 to {_MAX_SEED - n + 1}"
        )
    return [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(n)]


def random_seed() -> int:
    """A fresh seed for runs without ``--seed`` (0 .. 2**32-1, the range the reference drew from)."""
    return secrets.randbelow(2**32)


def resolve_placement(device: str | torch.device | None = "auto",
                      precision: str | torch.dtype = "auto") -> tuple[torch.device, torch.dtype]:
    """``(device, dtype)`` from a ``--device`` and a ``--precision`` value, each resolved once
    (:func:`pick_device`, :func:`resolve_precision`); a ``torch.device`` or ``torch.dtype`` passed
    in is taken as already chosen."""
    dev = device if isinstance(device, torch.device) else pick_device(device)
    dtype = precision if isinstance(precision, torch.dtype) else resolve_precision(precision, dev)
    return dev, dtype
