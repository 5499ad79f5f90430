"""The SD 2 x4 upscaler (``configs/stable-diffusion/x4-upscaling.yaml``, ``LatentUpscaleDiffusion``):
the config builds the official layout; the family is recognised from the config, a built model and
a checkpoint's keys; parity on the tiny fixture ``sd-x4-upscaler-tiny`` of ../shared/spec (the
noise augmentation with the recorded noise, the 7-channel UNet with its noise-level label, DDIM 10
steps at scale 9 with the recorded x_T, the f4 VAE); the pipeline's conditioning is the reference
app's; ``scripts/upscale.py`` renders end to end, lists its flags and refuses a bad noise level.

The tiny checkpoint is stored as a delta on ``sd-v2-v-tiny-random.ckpt``; it is rebuilt as
../shared/spec/sd2.md ("Delta checkpoints") shows.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.checkpoint import instantiate_on_meta, load_model_from_config
from ldm.models.diffusion.registry import make_sampler
from ldm.modules.diffusionmodules.util import timestep_embedding
from tests.conftest import FIXTURES
from tests.helpers import REPO, Recorder, delta_state_dict, help_entries, read_manifest, register_tiny_openclip, rel_err
from tests.test_scripts import load_main, restore_logging  # noqa: F401  (autouse fixture)

X4_CONFIG = REPO / "configs" / "stable-diffusion" / "x4-upscaling.yaml"
TINY_CONFIG = FIXTURES / "sd-x4-upscaler-tiny.yaml"
TINY_DELTA = FIXTURES / "sd-x4-upscaler-tiny-random.ckpt"
TINY_BASE = FIXTURES / "sd-v2-v-tiny-random.ckpt"
TINY_PARITY = FIXTURES / "sd-x4-upscaler-tiny-parity.pt"


def tiny_state_dict() -> dict:
    return delta_state_dict(TINY_DELTA, TINY_BASE)


@pytest.fixture(scope="module")
def x4(spec_dir) -> dict:
    """Everything the reference recorded on the tiny x4 upscaler."""
    return torch.load(TINY_PARITY, weights_only=True)


@pytest.fixture(scope="module")
def x4_files(spec_dir, tmp_path_factory):
    """The tiny config and the rebuilt full checkpoint (a file, as the scripts take it)."""
    register_tiny_openclip(FIXTURES)
    ckpt = tmp_path_factory.mktemp("x4") / "x4-tiny.ckpt"
    torch.save({"state_dict": tiny_state_dict()}, ckpt)
    return TINY_CONFIG, ckpt


@pytest.fixture(scope="module")
def x4_model(x4_files):
    return load_model_from_config(OmegaConf.load(x4_files[0]), x4_files[1])


# ---------------------------------------------------------------------------------- layout, family
def test_config_builds_the_official_layout(spec_dir):
    model = instantiate_on_meta(OmegaConf.load(X4_CONFIG).model)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    expected = read_manifest(spec_dir / "sd-x4-upscaler.tsv")
    assert len(ours) == len(expected) == 1205
    assert [(o, e) for o, e in zip(ours, expected) if o != e] == []
    # the schedules (12 + 8 low_scale_model buffers) are real CPU tensors, the networks on meta
    assert not model.low_scale_model.betas.is_meta and model.model.diffusion_model.label_emb.weight.is_meta
    assert {f"low_scale_model.{k}" for k in model.low_scale_model.state_dict()} <= model.optional_checkpoint_keys


def test_the_family_from_config_model_and_checkpoint_keys(x4_model):
    from ldm.families import METHODS, facts_from_model, facts_from_state_dict, family_of
    from ldm.generate import describe_config, load_config

    spec = describe_config(load_config(X4_CONFIG))
    family = spec.family
    assert (family.name, family.kind, family.methods, spec.geometry.factor) == ("sd-x4-upscaler", "upscale",
                                                                                 ("upscale",), 4)
    assert (family.default_scale("upscale"), family.steps, family.sampler, family.watermark,
            family.upcast_attention) == (9.0, 50, "ddim", "SDV2", True)
    assert METHODS["upscale"][1] == "scripts/upscale.py"
    assert describe_config(load_config(TINY_CONFIG)).family is family
    assert family_of(facts_from_model(x4_model)) is family
    shapes = {k: tuple(v.shape) for k, v in x4_model.state_dict().items()}
    assert family_of(facts_from_state_dict(shapes)) is family


def test_other_scripts_refuse_the_upscaler_and_name_upscale_py(x4_files):
    from ldm.cli.checks import check_model
    from ldm.errors import UserInputError

    with pytest.raises(UserInputError, match="x4 upscaler: use scripts/upscale.py"):
        check_model(str(x4_files[0]), str(x4_files[1]), "txt2img")


def test_hybrid_adm_needs_its_label():
    from ldm.models.diffusion.wrapper import DiffusionWrapper

    unet = {"target": "torch.nn.Identity"}
    wrapper = DiffusionWrapper(unet, "hybrid-adm")
    with pytest.raises(ValueError, match="c_adm"):
        wrapper(torch.zeros(1, 4, 2, 2), torch.zeros(1), c_concat=[torch.zeros(1, 3, 2, 2)],
                c_crossattn=[torch.zeros(1, 77, 8)])


# ---------------------------------------------------------------------------------- model math
def test_schedules_and_scale_factor(x4_model, x4):
    assert x4_model.parameterization == x4["parameterization"] == "v"
    for name, ref in x4["schedule"].items():
        assert torch.equal(getattr(x4_model, name), ref), name
    low = x4_model.low_scale_model
    for name, ref in x4["low_scale_schedule"].items():
        assert torch.equal(getattr(low, name), ref), name
    assert low.max_noise_level == x4["max_noise_level"] == 350
    assert x4_model.scale_factor == x4["scale_factor"] == 0.08333


def test_noise_augmentation_with_the_recorded_noise_is_exact(x4_model, x4):
    ref = x4["noise_augmentation"]
    x_aug, level = x4_model.low_scale_model(ref["x_low"], ref["noise_level"], ref["noise"])
    assert torch.equal(x_aug, ref["x_aug"])
    assert torch.equal(level, ref["noise_level_out"])
    # it is the level's own schedule: another level gives another image
    other, _ = x4_model.low_scale_model(ref["x_low"], ref["noise_level"] + 1, ref["noise"])
    assert rel_err(other, ref["x_aug"]) > 1e-4


def test_unet_call_and_blocks_match_reference(x4_model, x4):
    ref = x4["unet"]
    unet = x4_model.model.diffusion_model
    got = {}
    hooks = [unet.register_forward_pre_hook(lambda m, i: got.__setitem__("unet_input", i[0])),
             unet.time_embed.register_forward_hook(lambda m, i, o: got.__setitem__("time_embed", o)),
             unet.label_emb.register_forward_hook(lambda m, i, o: got.__setitem__("label_emb", o)),
             unet.middle_block.register_forward_hook(lambda m, i, o: got.__setitem__("middle_block", o))]
    for group in ("input_blocks", "output_blocks"):
        for i, block in enumerate(getattr(unet, group)):
            hooks.append(block.register_forward_hook(lambda m, inp, o, n=f"{group}.{i}": got.__setitem__(n, o)))
    try:
        with torch.no_grad():
            out = x4_model.apply_model(ref["x"], ref["t"], ref["cond"])
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        out_float = x4_model.apply_model(ref["x"], ref["t_float"], ref["cond"])
        out_uncond = x4_model.apply_model(ref["x"], ref["t"], ref["cond_uncond"])
    got["t_emb_sinusoidal"] = timestep_embedding(ref["t"], unet.model_channels)
    assert got["unet_input"].shape[1] == 7
    assert torch.equal(got["unet_input"], ref["blocks"]["unet_input"])  # cat([z, x_aug])
    errors = {name: rel_err(got[name], value) for name, value in ref["blocks"].items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, (worst, errors[worst])
    # measured: 1.6e-6 (out)
    assert rel_err(out, ref["out"]) < 1e-5
    assert rel_err(out_float, ref["out_float_t"]) < 1e-5
    assert rel_err(out_uncond, ref["out_uncond"]) < 1e-5


def test_ddim_upscale_matches_reference(x4_model, x4):
    """The reference app's sampling: DDIM 10 steps, scale 9, the recorded x_T; the unconditional
    branch keeps the same c_concat and c_adm (a tensor entry of the dict conditioning)."""
    from tests.test_sd2 import assert_uint8_close, to_uint8

    ref = x4["ddim"]
    model = Recorder(x4_model)
    out, _ = make_sampler("ddim", model).sample(ref["steps_total"], 2, tuple(ref["x_T"].shape[1:]),
                                                conditioning=ref["cond"], unconditional_conditioning=ref["uncond"],
                                                unconditional_guidance_scale=ref["scale"], x_T=ref["x_T"],
                                                eta=ref["eta"], verbose=False)
    assert len(model.calls) == len(ref["trace"]) == 10
    for k, ((x, t, mine), rec) in enumerate(zip(model.calls, ref["trace"])):
        assert torch.equal(t, rec["t"]), k
        # measured: inputs <= 3.9e-6, outputs <= 4.7e-6
        assert rel_err(x, rec["x"]) < 1e-4, k
        assert rel_err(mine, rec["out"]) < 1e-4, k
    assert rel_err(out, ref["samples"]) < 1e-4  # measured: 3.9e-6
    with torch.no_grad():
        decoded = x4_model.decode_first_stage(out)
    assert decoded.shape[-2:] == (64, 96)  # f4: 4x the 16x24 latent
    assert rel_err(decoded, ref["decoded"]) < 1e-4  # measured: 4.2e-6
    assert_uint8_close(to_uint8(decoded), ref["uint8"])


def test_f4_vae_matches_reference(x4_model, x4):
    ref = x4["vae"]
    vae = x4_model.first_stage_model
    got = {}
    modules = dict(vae.named_modules())
    hooks = [modules[name].register_forward_hook(lambda m, i, o, name=name: got.__setitem__(name, o))
             for name in ref["blocks"]]
    try:
        with torch.no_grad():
            posterior = x4_model.encode_first_stage(ref["x"])
            decoded = x4_model.decode_first_stage(ref["z_scaled"])
    finally:
        for h in hooks:
            h.remove()
    got.update(moments=posterior.parameters, mean=posterior.mean, logvar_clamped=posterior.logvar, std=posterior.std,
               mode=posterior.mode(), z_scaled=x4_model.scale_factor * posterior.mode(), decoded=decoded)
    expected = {k: ref[k] for k in ("moments", "mean", "logvar_clamped", "std", "mode", "z_scaled", "decoded")}
    expected.update(ref["blocks"])
    errors = {k: rel_err(got[k], v) for k, v in expected.items()}
    assert max(errors.values()) < 1e-5, errors


# ---------------------------------------------------------------------------------- pipeline, script
@pytest.fixture(scope="module")
def x4_pipeline(x4_files):
    from ldm.generate import StableDiffusion

    return StableDiffusion.from_files(*x4_files, device="cpu", precision="fp32", hash_checkpoint=False,
                                      progress=False)


def test_pipeline_conditions_the_model_as_the_reference_app(x4_pipeline, x4, monkeypatch):
    """``sd.upscale`` gives the sampler the reference's cond/uncond (x_aug from the recorded noise,
    c_adm = the level, the text) and decodes 4x; the sampling itself is replaced by the recorded
    samples, so the decoded images are the reference's."""
    aug, ddim = x4["noise_augmentation"], x4["ddim"]
    seen = {}

    def fake_sample(sampler, steps, shape, cond, uncond, scale, eta, generators, **kwargs):
        seen.update(sampler=sampler, steps=steps, shape=shape, cond=cond, uncond=uncond, scale=scale)
        return ddim["samples"][:1].clone()

    monkeypatch.setattr(x4_pipeline, "_sample", fake_sample)
    image = Image.fromarray(aug["image_uint8"].numpy())
    result = x4_pipeline.upscale(x4["text"]["prompts"][0], image, 0, noise=aug["noise"][:1], steps=10)
    assert (seen["sampler"], seen["steps"], seen["shape"], seen["scale"]) == ("ddim", 10, (4, 16, 24), 9.0)
    cond, uncond = seen["cond"], seen["uncond"]
    assert rel_err(cond["c_concat"][0], ddim["cond"]["c_concat"][0][:1]) < 1e-6
    assert uncond["c_concat"][0] is cond["c_concat"][0] and uncond["c_adm"] is cond["c_adm"]
    assert cond["c_adm"].tolist() == [20] and cond["c_adm"].dtype == torch.int64
    assert rel_err(cond["c_crossattn"][0], ddim["cond"]["c_crossattn"][0][:1]) < 1e-5
    assert rel_err(uncond["c_crossattn"][0], ddim["uncond"]["c_crossattn"][0][:1]) < 1e-5
    assert result.images[0].size == (96, 64)
    diff = np.abs(np.asarray(result.images[0]).astype(int) - ddim["uint8"][0].numpy().astype(int))
    assert diff.max() <= 1
    record = result.records[0]
    assert (record.mode, record.width, record.height, record.extra["Noise level"]) == ("upscale", 96, 64, 20)


def test_pipeline_checks_the_noise_level_and_the_model(x4_pipeline):
    from ldm.errors import UserInputError
    from ldm.generate import StableDiffusion
    from tests.helpers import TINY_CONFIG as V1_TINY
    from tests.test_generate import random_model

    image = Image.new("RGB", (24, 16))
    for bad in (-1, 351, 2.5):
        with pytest.raises(UserInputError, match="outside 0..350"):
            x4_pipeline.upscale("a", image, noise_level=bad)
    with pytest.raises(UserInputError, match="upscale"):
        x4_pipeline.txt2img("a")
    with pytest.raises(UserInputError, match=r"upscale\(\) cannot run"):
        StableDiffusion(random_model(V1_TINY), progress=False).upscale("a", image)


def test_out_of_memory_says_how_to_tile(x4_pipeline, monkeypatch):
    from ldm.generate import GenerationError

    def too_big(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(x4_pipeline, "_sample", too_big)
    with pytest.raises(GenerationError, match="out of memory upscaling a 24x16 image.*tiles of 256x256"):
        x4_pipeline.upscale("a", Image.new("RGB", (24, 16)), steps=10)
    monkeypatch.setattr(x4_pipeline, "_sample", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors pass through
        x4_pipeline.upscale("a", Image.new("RGB", (24, 16)), steps=10)


def test_bf16_keeps_the_augmentation_schedule_in_float32(x4_files, x4):
    model = load_model_from_config(OmegaConf.load(x4_files[0]), x4_files[1], dtype=torch.bfloat16)
    assert model.model.diffusion_model.label_emb.weight.dtype == torch.bfloat16
    assert model.low_scale_model.sqrt_alphas_cumprod.dtype == torch.float32
    ref = x4["noise_augmentation"]
    x_aug, _ = model.low_scale_model(ref["x_low"], ref["noise_level"], ref["noise"])
    assert torch.equal(x_aug, ref["x_aug"])
    with torch.no_grad():
        out = model.apply_model(x4["unet"]["x"], x4["unet"]["t"], x4["unet"]["cond"])
    assert out.dtype == torch.float32 and rel_err(out, x4["unet"]["out"]) < 3e-2


def test_tiled_decode_of_a_large_output_is_close_to_the_whole(x4_pipeline):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 40, 48, generator=g) * 0.08333
    whole = x4_pipeline.decode(z)
    from ldm.generate.upscale import _decode

    tiled = _decode(x4_pipeline, z, tile=24)
    assert tiled.shape == whole.shape == (1, 3, 160, 192)
    # GroupNorm statistics are per tile: close, not equal
    assert 0 < rel_err(tiled, whole) < 0.2


def test_upscale_script_renders_end_to_end(x4_files, tmp_path, capsys):
    from ldm.metadata import parse_parameters, read_parameters

    config, ckpt = x4_files
    low = tmp_path / "low.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(low)
    out = tmp_path / "out"
    code = load_main("upscale.py")(["--init-img", str(low), "--prompt", "a cat", "--steps", "4", "--n_samples", "2",
                                    "--noise_level", "50", "--config", str(config), "--ckpt", str(ckpt), "--outdir",
                                    str(out), "--no_safety_check", "--device", "cpu", "--precision", "fp32"])
    assert code == 0, capsys.readouterr().err
    samples = sorted((out / "samples").iterdir())
    assert [p.name for p in samples] == ["00000.png", "00001.png"]
    assert (out / "grid-0000.png").is_file()
    meta = parse_parameters(read_parameters(samples[1]))
    assert (meta["Size"], meta["CFG scale"], meta["Steps"], meta["Noise level"], meta["Seed"], meta["Sampler"]) == \
        ("80x64", "9.0", "4", "50", "1", "DDIM")
    with Image.open(samples[0]) as im:
        assert im.size == (80, 64) and np.asarray(im).std() > 0


def test_upscale_script_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_main("upscale.py")(["--help"])
    assert exit_info.value.code == 0
    entries = help_entries(capsys.readouterr().out)
    flags = ["--init-img", "--prompt", "--negative_prompt", "--noise_level", "--steps", "--scale", "--sampler",
             "--plms", "--dpm_solver", "--ddim_eta", "--n_samples", "--n_iter", "--seed", "--outdir", "--vae_tile",
             "--config", "--ckpt", "--device", "--precision", "--no_safety_check", "--from-file", "--fast_batch"]
    for flag in flags:
        assert flag in entries, f"{flag} missing from --help"
        assert "default" in entries[flag], (flag, entries[flag])
    assert "--ddim_steps" in entries["--steps"]
    assert "default: 20" in entries["--noise_level"] and "9.0" in entries["--scale"] and "50" in entries["--steps"]
    assert "x4-upscaling.yaml" in entries["--config"] and "(default: 0)" in entries["--seed"]


@pytest.mark.parametrize("level", ["400", "-1"])
def test_upscale_script_refuses_a_noise_level_out_of_range(x4_files, tmp_path, capsys, level):
    Image.new("RGB", (16, 16)).save(tmp_path / "any.png")
    code = load_main("upscale.py")(["--init-img", str(tmp_path / "any.png"), "--noise_level", level, "--config",
                                    str(x4_files[0]), "--ckpt", str(x4_files[1]), "--outdir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and f"--noise_level {level} is outside 0..350" in err[0]
    assert not (tmp_path / "o").exists()
