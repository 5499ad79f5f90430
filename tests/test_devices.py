"""ldm.devices: device choice, precision table and per-image generators (availability monkeypatched)."""
from __future__ import annotations

import pytest
import torch

from ldm import devices
from ldm.devices import pick_device, random_seed, resolve_precision, seed_generators
from ldm.errors import UserInputError


@pytest.fixture
def machine(monkeypatch):
    """Pretend hardware: machine(cuda=2, mps=False, bf16_cpu=False)."""

    def set_up(cuda: int = 0, mps: bool = False, bf16_cpu: bool = False, cuda_bf16: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: cuda_bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: bf16_cpu)

    return set_up


# --------------------------------------------------------------------------------------------
# pick_device


@pytest.mark.parametrize("cuda, mps, expected", [(0, False, "cpu"), (1, False, "cuda"), (0, True, "mps"), (2, True, "cuda")])
@pytest.mark.parametrize("requested", [None, "auto", "AUTO", ""])
def test_auto_order(machine, cuda, mps, expected, requested):
    machine(cuda=cuda, mps=mps)
    assert pick_device(requested).type == expected


def test_explicit_devices(machine):
    machine(cuda=2, mps=False)
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("cuda") == torch.device("cuda")
    assert pick_device("cuda:1") == torch.device("cuda", 1)


def test_unavailable_cuda_lists_what_is_there(machine):
    machine(cuda=0, mps=True)
    with pytest.raises(UserInputError) as info:
        pick_device("cuda")
    msg = str(info.value)
    assert "CUDA is not available" in msg and "mps" in msg and "cpu" in msg and "\n" not in msg


def test_cuda_index_out_of_range(machine):
    machine(cuda=2)
    with pytest.raises(UserInputError, match=r"2 CUDA device.*cuda:0, cuda:1, cpu"):
        pick_device("cuda:2")


def test_unavailable_mps_and_unknown_names(machine):
    machine(cuda=0, mps=False)
    with pytest.raises(UserInputError, match="MPS is not available.*auto, cpu"):
        pick_device("mps")
    with pytest.raises(UserInputError, match="unknown device 'gpu'"):
        pick_device("gpu")
    with pytest.raises(UserInputError, match="not supported"):
        pick_device("meta")


def test_error_is_value_error():
    assert issubclass(UserInputError, ValueError)


# --------------------------------------------------------------------------------------------
# resolve_precision


@pytest.mark.parametrize("precision, device, bf16_cpu, expected", [
    ("autocast", "cuda", False, torch.float16),  # the reference's meaning
    ("autocast", "cpu", True, torch.float32),
    ("autocast", "mps", False, torch.float32),
    ("full", "cuda", False, torch.float32),
    ("fp32", "cpu", True, torch.float32),
    ("fp16", "cuda", False, torch.float16),
    ("fp16", "mps", False, torch.float16),
    ("bf16", "cuda", False, torch.bfloat16),
    ("bf16", "cpu", True, torch.bfloat16),
    ("auto", "cuda", False, torch.float16),
    ("auto", "cpu", True, torch.bfloat16),
    ("auto", "cpu", False, torch.float32),
    ("auto", "mps", False, torch.float32),
    ("BF16", "cpu", True, torch.bfloat16),
    ("float32", "cpu", False, torch.float32),
])
def test_precision_table(machine, precision, device, bf16_cpu, expected):
    machine(cuda=1, mps=True, bf16_cpu=bf16_cpu)
    assert resolve_precision(precision, torch.device(device)) == expected


def test_fp16_on_cpu_names_bf16(machine):
    machine()
    with pytest.raises(UserInputError, match="bf16"):
        resolve_precision("fp16", "cpu")


def test_bf16_on_cpu_without_support_warns(machine, caplog):
    machine(bf16_cpu=False)
    assert resolve_precision("bf16", "cpu") == torch.bfloat16
    assert "emulated" in caplog.text


def test_bf16_on_old_gpu(machine):
    machine(cuda=1, cuda_bf16=False)
    with pytest.raises(UserInputError, match="Fake GPU.*fp16"):
        resolve_precision("bf16", "cuda")


def test_unknown_precision(machine):
    machine()
    with pytest.raises(UserInputError, match="unknown precision 'fp8'.*autocast"):
        resolve_precision("fp8", "cpu")


def test_cpu_bf16_probe(monkeypatch):
    devices.cpu_supports_bf16.cache_clear()
    try:
        assert isinstance(devices.cpu_supports_bf16(), bool)
        devices.cpu_supports_bf16.cache_clear()
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
        assert devices.cpu_supports_bf16() is False
    finally:
        devices.cpu_supports_bf16.cache_clear()


# --------------------------------------------------------------------------------------------
# seed_generators


def test_one_generator_per_image():
    gens = seed_generators(42, 3)
    assert len(gens) == 3 and all(g.device.type == "cpu" for g in gens)
    assert [g.initial_seed() for g in gens] == [42, 43, 44]
    draws = [torch.randn(4, generator=g) for g in gens]
    assert torch.equal(draws[1], torch.randn(4, generator=torch.Generator().manual_seed(43)))
    # image 0 does not depend on the batch size
    assert torch.equal(torch.randn(4, generator=seed_generators(42, 1)[0]), draws[0])


def test_seed_range():
    assert seed_generators(2**64 - 2, 2)[1].initial_seed() == 2**64 - 1
    with pytest.raises(UserInputError, match="out of range"):
        seed_generators(2**64 - 1, 2)
    with pytest.raises(UserInputError, match="out of range"):
        seed_generators(-1, 1)
    with pytest.raises(UserInputError, match="integer"):
        seed_generators(True, 1)
    with pytest.raises(ValueError):
        seed_generators(1, 0)


def test_random_seed_range():
    assert all(0 <= random_seed() < 2**32 for _ in range(10))
