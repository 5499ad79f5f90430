"""The checkpoint loader: safe unpickling, strict key checks with clear errors, EMA handling,
round trips in the official layout."""
import os
import pickle

import numpy as np
import pytest
import torch

from ldm.checkpoint import (CheckpointError, POSITION_IDS, ema_key, instantiate_on_meta, load_model_from_config,
                            read_checkpoint, save_checkpoint)
from tests.helpers import REPO, load_config


@pytest.fixture(scope="module")
def tiny_sd(tiny_ckpt):
    return read_checkpoint(tiny_ckpt).state_dict


def test_reads_reference_checkpoint(tiny_ckpt, tiny_sd):
    assert len(tiny_sd) == 983
    assert all(isinstance(v, torch.Tensor) for v in tiny_sd.values())


def test_code_executing_payload_is_refused(tmp_path, tiny_sd):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*system") as info:
        read_checkpoint(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_lightning_era_checkpoint_loads(tmp_path, tiny_sd):
    # PL 1.x wrote callback classes and numpy scalars into checkpoints.
    from pytorch_lightning.callbacks import ModelCheckpoint

    path = tmp_path / "pl.ckpt"
    torch.save({"state_dict": tiny_sd, "global_step": 470000, "epoch": 5, "pytorch-lightning_version": "1.4.2",
                "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.12), "best_model_path": "x.ckpt"}}},
               path)
    ckpt = read_checkpoint(path)
    assert ckpt.global_step == 470000
    assert ckpt.state_dict.keys() == tiny_sd.keys()


def test_truncated_and_garbage_files(tmp_path, tiny_ckpt):
    data = tiny_ckpt.read_bytes()
    for name, payload in [("half.ckpt", data[: len(data) // 2]), ("garbage.ckpt", b"not a checkpoint" * 10),
                          ("empty.ckpt", b""), ("half.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")]:
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="models/ldm/stable-diffusion-v1/model.ckpt"):
        read_checkpoint(tmp_path / "missing.ckpt")


def test_config_checkpoint_mismatch_is_one_clear_error(tiny_sd):
    full = instantiate_on_meta(load_config(REPO / "configs/stable-diffusion/v1-inference.yaml").model)
    from ldm.checkpoint import resolve_state_dict

    with pytest.raises(CheckpointError, match="wrong shape.*config probably does not match") as info:
        resolve_state_dict(full, tiny_sd, path="tiny.ckpt")
    assert "\n" not in str(info.value)
    broken = dict(tiny_sd)
    broken.pop("model.diffusion_model.out.2.weight")
    broken["model.diffusion_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 missing keys \(model.diffusion_model.out.2.weight\).*"
                                              r"1 unexpected keys \(model.diffusion_model.extra.weight\)"):
        load_model_from_config(load_config(), broken)


def test_benign_differences_are_tolerated(tiny_sd):
    sd = dict(tiny_sd)
    sd.pop(POSITION_IDS)  # files written with transformers >= 4.31
    sd["model_ema.decay"] = torch.tensor(0.9999)  # official files carry these with use_ema False
    sd["model_ema.num_updates"] = torch.tensor(7, dtype=torch.int)
    model = load_model_from_config(load_config(), sd)
    assert torch.equal(model.state_dict()[POSITION_IDS], torch.arange(77)[None])
    assert not hasattr(model, "model_ema")


def test_bad_position_ids_are_reset(tiny_sd, caplog):
    sd = dict(tiny_sd)
    sd[POSITION_IDS] = (torch.arange(77)[None].float() * 0.999).long()  # a known fault of merged files
    model = load_model_from_config(load_config(), sd)
    assert torch.equal(model.state_dict()[POSITION_IDS], torch.arange(77)[None])
    assert "position_ids" in caplog.text


def _full_ema_sd(tiny_sd):
    """A tiny stand-in for a *-full-ema.ckpt: shadows differ from the live weights by +1."""
    sd = dict(tiny_sd)
    for k, v in tiny_sd.items():
        if k.startswith("model.diffusion_model."):
            sd[ema_key(k)] = v + 1
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(100, dtype=torch.int)
    return sd


def test_full_ema_checkpoint_default_runs_non_ema_weights(tiny_sd):
    key = "model.diffusion_model.out.2.bias"
    model = load_model_from_config(load_config(), _full_ema_sd(tiny_sd))  # use_ema False in the config
    assert torch.equal(model.state_dict()[key], tiny_sd[key])


def test_full_ema_checkpoint_with_ema_option_runs_ema_weights(tiny_sd):
    key = "model.diffusion_model.out.2.bias"
    model = load_model_from_config(load_config(), _full_ema_sd(tiny_sd), use_ema=True)
    assert torch.equal(model.state_dict()[key], tiny_sd[key] + 1)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_model_from_config(load_config(), tiny_sd, use_ema=True)


def test_config_use_ema_swaps_shadows_in_ema_scope(tiny_sd):
    key = "model.diffusion_model.out.2.bias"
    model = load_model_from_config(load_config(**{"model.params.use_ema": True}), _full_ema_sd(tiny_sd))
    live = lambda: model.model.diffusion_model.out[2].bias  # noqa: E731
    assert torch.equal(live(), tiny_sd[key])
    with model.ema_scope():
        assert torch.equal(live(), tiny_sd[key] + 1)
    assert torch.equal(live(), tiny_sd[key])


def test_missing_shadows_with_use_ema_config_copy_the_weights(tiny_sd):
    model = load_model_from_config(load_config(**{"model.params.use_ema": True}), tiny_sd)
    before = model.model.diffusion_model.out[2].bias.clone()
    with model.ema_scope():
        assert torch.equal(model.model.diffusion_model.out[2].bias, before)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_round_trip_keeps_every_tensor_and_the_official_layout(tmp_path, tiny_ckpt, tiny_sd, suffix):
    model = load_model_from_config(load_config(), tiny_ckpt)
    path = save_checkpoint(model, tmp_path / f"out{suffix}", global_step=12)
    back = read_checkpoint(path).state_dict
    assert list(back.keys()) == list(tiny_sd.keys()) or set(back) == set(tiny_sd)  # safetensors sorts keys
    assert set(back) == set(tiny_sd)
    for k, v in tiny_sd.items():
        assert torch.equal(back[k], v), k
    with pytest.raises(CheckpointError, match="exists"):
        save_checkpoint(model, path)
    if suffix == ".ckpt":
        assert list(back.keys()) == list(tiny_sd.keys())
        assert read_checkpoint(path).global_step == 12


def test_fp16_load_keeps_schedule_fp32(tiny_ckpt):
    model = load_model_from_config(load_config(), tiny_ckpt, dtype=torch.float16)
    assert model.model.diffusion_model.input_blocks[0][0].weight.dtype == torch.float16
    assert model.first_stage_model.decoder.conv_out.weight.dtype == torch.float16
    assert model.alphas_cumprod.dtype == torch.float32
    assert model.state_dict()[POSITION_IDS].dtype == torch.int64


def test_safetensors_checkpoint_loads_like_ckpt(tmp_path, tiny_ckpt, parity):
    from safetensors.torch import save_file

    sd = read_checkpoint(tiny_ckpt).state_dict
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = load_model_from_config(load_config(), path)
    ref = parity["unet"]
    with torch.no_grad():
        eps = model.apply_model(ref["x"], ref["t"], ref["context"])
    assert torch.allclose(eps, ref["eps"], rtol=1e-4, atol=1e-5)


@pytest.fixture
def tiny_safetensors(tmp_path, tiny_sd):
    """The reference tiny checkpoint saved as .safetensors (float32, as the reference wrote it)."""
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_sd.items()}, str(path))
    return path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_safetensors_cast_while_reading(tiny_safetensors, tiny_ckpt, tiny_sd, dtype):
    """A cast at load casts a .safetensors file tensor by tensor as it reads it: the same values as
    reading then casting, the schedule (top-level keys) and integers as stored."""
    streamed = read_checkpoint(tiny_safetensors, dtype=dtype).state_dict
    assert streamed.keys() == tiny_sd.keys()
    for key, ref in tiny_sd.items():
        got = streamed[key]
        expect = ref.to(dtype) if ref.is_floating_point() and "." in key else ref
        assert got.dtype == expect.dtype and torch.equal(got, expect), key
    assert streamed["alphas_cumprod"].dtype == torch.float32 and streamed[POSITION_IDS].dtype == torch.int64

    model = load_model_from_config(load_config(), tiny_safetensors, dtype=dtype)
    ref_model = load_model_from_config(load_config(), tiny_ckpt, dtype=dtype)
    for (name, a), (_, b) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_safetensors_cast_not_needed_keeps_the_memory_map(tiny_safetensors):
    from ldm.checkpoint import _read_safetensors_cast

    assert _read_safetensors_cast(tiny_safetensors, torch.float32) is None  # already float32: mmap it instead


def test_safetensors_cast_read_of_a_truncated_file_is_one_clear_error(tiny_safetensors):
    data = tiny_safetensors.read_bytes()
    tiny_safetensors.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(tiny_safetensors, dtype=torch.bfloat16)
    assert str(tiny_safetensors) in str(info.value) and "\n" not in str(info.value)


def test_meta_build_skips_init_and_restores_it():
    before = torch.nn.init.normal_
    model = instantiate_on_meta(load_config().model)
    assert torch.nn.init.normal_ is before
    assert all(p.is_meta for p in model.parameters())
    emb = torch.nn.Embedding(4, 3)  # outside the meta build, init works as ever
    assert emb.weight.std() > 0


def test_keys_a_file_may_lack_are_the_models_to_declare(tiny_sd):
    """The schedule buffers may be missing because DDPM says so (optional_checkpoint_keys), not
    because the loader knows DDPM: a model that declares nothing gets them checked strictly."""
    from ldm.checkpoint import resolve_state_dict
    from ldm.models.diffusion.ddpm import DDPM, SCHEDULE_BUFFERS

    assert DDPM.optional_checkpoint_keys == frozenset(SCHEDULE_BUFFERS)
    sd = {k: v for k, v in tiny_sd.items() if k not in SCHEDULE_BUFFERS}
    model = load_model_from_config(load_config(), sd)  # computed from the config instead
    assert torch.allclose(model.betas, tiny_sd["betas"].float())

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("betas", torch.zeros(3))
            self.lin = torch.nn.Linear(2, 2)

    file = {"lin.weight": torch.zeros(2, 2), "lin.bias": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"1 missing keys \(betas\)"):
        resolve_state_dict(Plain(), file)
    declared = Plain()
    declared.optional_checkpoint_keys = frozenset({"betas"})
    assert set(resolve_state_dict(declared, file)) == set(file)


def test_unet_only_load_checks_the_unet_keys_strictly(tiny_sd):
    from ldm.checkpoint import load_weights_into

    model = load_model_from_config(load_config(), tiny_sd)
    unet = {k: v + 1 for k, v in tiny_sd.items() if k.startswith("model.diffusion_model.")}
    key = "model.diffusion_model.out.2.bias"
    load_weights_into(model, unet, only_model=True)  # the rest of the model needs no keys
    assert torch.equal(model.state_dict()[key], tiny_sd[key] + 1)
    unet.pop(key)
    with pytest.raises(CheckpointError, match=r"1 missing keys \(model.diffusion_model.out.2.bias\)"):
        load_weights_into(model, unet, only_model=True)
