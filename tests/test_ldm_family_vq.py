"""The CompVis latent-diffusion models with a VQ first stage: class-conditional ImageNet
(cin256-v2, cin256), the unconditional CelebA-HQ / FFHQ / LSUN-bedrooms layouts and the bsr_sr 4x
super-resolution model.

Against ../shared/spec (ldm-family.md): the original configs build the manifests ``ldm-*.tsv``
exactly; the tiny fixtures ``ldm-cin-tiny`` (ClassEmbedder, UNet with one-head transformers, VQ-f4
encode/quantise/decode, DDIM 10 steps with guidance against the null class) and ``ldm-sr-tiny``
(concat conditioning, EMA weights, DDIM at eta 1 with the recorded noise and at eta 0, the
patch-wise ``split_input_params`` mode) match every recorded number; the families are recognised
from configs, built models and checkpoint keys; ``StableDiffusion.sample_class`` /
``superres`` and ``scripts/sample_class.py`` / ``scripts/superres.py`` run end to end.
"""
from __future__ import annotations

import runpy

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import ldm.models.diffusion.solvers as solvers
from ldm.checkpoint import instantiate_on_meta, load_model_from_config
from ldm.errors import UserInputError
from ldm.models.diffusion.ddim import DDIMSampler
from tests.conftest import FIXTURES
from tests.helpers import REPO, Recorder, help_entries, read_manifest, rel_err, unet_block_outputs
from tests.test_scripts import load_main, restore_logging  # noqa: F401  (autouse fixture)

CIN_CONFIG, CIN_CKPT = FIXTURES / "ldm-cin-tiny.yaml", FIXTURES / "ldm-cin-tiny-random.ckpt"
SR_CONFIG, SR_CKPT = FIXTURES / "ldm-sr-tiny.yaml", FIXTURES / "ldm-sr-tiny-random.ckpt"

LAYOUTS = [
    ("ldm-cin256-v2.tsv", "configs/latent-diffusion/cin256-v2.yaml", 906),
    ("ldm-cin256.tsv", "models/ldm/cin256/config.yaml", 1566),
    ("ldm-celebahq-ldm-vq-4.tsv", "configs/latent-diffusion/celebahq-ldm-vq-4.yaml", 955),
    ("ldm-ffhq-ldm-vq-4.tsv", "configs/latent-diffusion/ffhq-ldm-vq-4.yaml", 955),
    ("ldm-lsun_bedrooms-ldm-vq-4.tsv", "configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml", 955),
    ("ldm-bsr_sr.tsv", "models/ldm/bsr_sr/config.yaml", 831),
    # the configs shipped beside the released checkpoints (sample_diffusion.py reads them there)
    ("ldm-celebahq-ldm-vq-4.tsv", "models/ldm/celeba256/config.yaml", 955),
    ("ldm-ffhq-ldm-vq-4.tsv", "models/ldm/ffhq256/config.yaml", 955),
    ("ldm-lsun_bedrooms-ldm-vq-4.tsv", "models/ldm/lsun_beds256/config.yaml", 955),
]


@pytest.fixture(scope="module")
def cin(spec_dir) -> dict:
    return torch.load(FIXTURES / "ldm-cin-tiny-parity.pt", weights_only=True)


@pytest.fixture(scope="module")
def sr(spec_dir) -> dict:
    return torch.load(FIXTURES / "ldm-sr-tiny-parity.pt", weights_only=True)


@pytest.fixture(scope="module")
def cin_model(spec_dir):
    return load_model_from_config(OmegaConf.load(CIN_CONFIG), CIN_CKPT)


@pytest.fixture(scope="module")
def sr_model(spec_dir):
    return load_model_from_config(OmegaConf.load(SR_CONFIG), SR_CKPT)


def replay_noise(monkeypatch, noise: list) -> list:
    """Make the samplers' fresh noise the recorded draws, in order; returns the remaining list."""
    pending = list(noise)
    monkeypatch.setattr(solvers, "randn", lambda shape, generator=None, device=None, dtype=None:
                        pending.pop(0).to(device, dtype or torch.float32))
    return pending


def check_run(recorder: Recorder, ref: dict, samples: torch.Tensor) -> None:
    """Every recorded UNet call (input, timestep, raw output) and the final latents."""
    assert len(recorder.calls) == len(ref["trace"])
    for (x, t, eps), call in zip(recorder.calls, ref["trace"]):
        assert torch.equal(t.cpu(), call["t"].to(t.dtype))
        assert rel_err(x, call["x"]) < 1e-4 and rel_err(eps, call["eps"]) < 1e-4
    assert rel_err(samples, ref["samples"]) < 1e-4


# ------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("manifest,config,count", LAYOUTS, ids=[c for _, c, _ in LAYOUTS])
def test_config_builds_the_official_layout(spec_dir, manifest, config, count):
    # built on meta the first stage's training-time ckpt_path (absent here) is skipped
    model = instantiate_on_meta(OmegaConf.load(REPO / config).model)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    expected = read_manifest(spec_dir / manifest)
    assert len(ours) == len(expected) == count
    assert [(o, e) for o, e in zip(ours, expected) if o != e] == []


def test_a_missing_first_stage_file_still_fails_a_real_build(tmp_path):
    from ldm.checkpoint import CheckpointError
    from ldm.models.autoencoder import VQModelInterface

    ddconfig = dict(double_z=False, z_channels=3, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    with pytest.raises((CheckpointError, FileNotFoundError, UserInputError)):
        VQModelInterface(embed_dim=3, n_embed=16, ddconfig=ddconfig, lossconfig=None,
                         ckpt_path=str(tmp_path / "missing.ckpt"))


# ------------------------------------------------------------------------------------------ families
def test_families_from_configs_models_and_checkpoint_keys(cin_model, sr_model):
    from ldm.families import facts_from_model, facts_from_state_dict, family_of
    from ldm.generate import describe_config, load_config

    def name(config):
        return describe_config(load_config(REPO / config if not str(config).startswith("/") else config)).family.name

    assert {name(c) for c in ("configs/latent-diffusion/cin256-v2.yaml", "models/ldm/cin256/config.yaml",
                              CIN_CONFIG)} == {"ldm-cin"}
    assert name("models/ldm/bsr_sr/config.yaml") == name(SR_CONFIG) == "ldm-superres"
    for config in ("celebahq", "ffhq", "lsun_bedrooms"):
        assert name(f"configs/latent-diffusion/{config}-ldm-vq-4.yaml") == "ldm-uncond"
    for folder in ("celeba256", "ffhq256", "lsun_beds256"):
        assert name(f"models/ldm/{folder}/config.yaml") == "ldm-uncond"
    for model, family in ((cin_model, "ldm-cin"), (sr_model, "ldm-superres")):
        assert family_of(facts_from_model(model)).name == family
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert family_of(facts_from_state_dict(shapes)).name == family
    spec = describe_config(load_config(REPO / "configs/latent-diffusion/cin256-v2.yaml"))
    assert (spec.family.steps, spec.family.default_scale("sample_class"), spec.geometry.factor,
            spec.width) == (20, 3.0, 4, 256)
    sr_family = describe_config(load_config(REPO / "models/ldm/bsr_sr/config.yaml")).family
    assert (sr_family.methods, sr_family.steps, sr_family.default_scale("superres")) == (("superres",), 100, 1.0)


def test_other_scripts_refuse_these_models_and_name_theirs(tmp_path):
    from ldm.cli.checks import check_model

    with pytest.raises(UserInputError, match="class-conditional ImageNet LDM.*scripts/sample_class.py"):
        check_model(str(CIN_CONFIG), str(CIN_CKPT), "txt2img")
    with pytest.raises(UserInputError, match="super-resolution model.*scripts/superres.py"):
        check_model(str(SR_CONFIG), str(SR_CKPT), "upscale")


# ------------------------------------------------------------------------------- cin: model numbers
def test_class_embedding_and_null_class(cin_model, cin):
    ref = cin["class_embedding"]
    assert cin_model.cond_stage_key == cin_model.cond_stage_model.key == ref["embedder_key"] == "class_label"
    c = cin_model.get_learned_conditioning({"class_label": ref["labels"]})
    assert torch.equal(c, ref["c"])
    uc = cin_model.get_learned_conditioning({"class_label": torch.full((2,), ref["uncond_label"])})
    assert torch.equal(uc, ref["uc"])


def test_cin_unet_call_and_blocks(cin_model, cin):
    ref = cin["unet"]
    with torch.no_grad():
        assert rel_err(cin_model.apply_model(ref["x"], ref["t"], ref["context"]), ref["eps"]) < 1e-5
        assert rel_err(cin_model.apply_model(ref["x"], ref["t"], ref["context_uncond"]), ref["eps_uncond"]) < 1e-5
    got = unet_block_outputs(cin_model.model.diffusion_model, ref["x"], ref["t"], ref["context"])
    for name, value in ref["blocks"].items():
        assert rel_err(got[name], value) < 1e-5, name


def test_vq_encode_quantise_and_decode(cin_model, cin):
    ref = cin["vq"]
    x = torch.from_numpy(ref["image_uint8"].numpy().astype(np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
    assert torch.equal(x, ref["x"])
    assert rel_err(cin_model.encode_first_stage(ref["x"]), ref["h"]) < 1e-5
    quant, _, (_, _, indices) = cin_model.first_stage_model.quantize(ref["z"])
    assert torch.equal(indices.view(ref["indices"].shape), ref["indices"])
    assert (quant - ref["quant"]).abs().max() <= 1e-6            # z + (e - z): not bitwise the codebook row
    assert rel_err(cin_model.decode_first_stage(ref["h"]), ref["decoded"]) < 1e-5
    assert rel_err(cin_model.decode_first_stage(ref["h"], force_not_quantize=True), ref["decoded_noquant"]) < 1e-5


def test_cin_ddim_with_guidance_against_the_null_class(cin_model, cin):
    ref = cin["sample"]
    recorder = Recorder(cin_model)
    sampler = DDIMSampler(recorder)
    samples, _ = sampler.sample(S=ref["S"], batch_size=ref["n_samples"], shape=ref["shape"], conditioning=ref["c"],
                                unconditional_guidance_scale=ref["scale"], unconditional_conditioning=ref["uc"],
                                eta=ref["eta"], x_T=ref["x_T"], verbose=False)
    assert np.array_equal(sampler.ddim_timesteps, ref["schedule"]["ddim_timesteps"].numpy())
    check_run(recorder, ref, samples)
    _, _, (_, _, indices) = cin_model.first_stage_model.quantize(samples)
    assert torch.equal(indices.view(ref["quantize"]["indices"].shape), ref["quantize"]["indices"])
    decoded = cin_model.decode_first_stage(samples)
    assert rel_err(decoded, ref["decoded"]) < 1e-4
    from ldm.image_io import tensor_to_uint8

    assert np.abs(tensor_to_uint8(decoded).astype(int) - ref["uint8"].numpy().astype(int)).max() <= 1


# -------------------------------------------------------------------------------- sr: model numbers
def test_sr_conditioning_and_unet_with_ema(sr_model, sr):
    ref = sr["unet"]
    lr = torch.from_numpy(sr["cond"]["lr_uint8"].numpy().astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    assert torch.equal(2.0 * lr - 1.0, sr["cond"]["c"])
    with torch.no_grad():
        assert rel_err(sr_model.apply_model(ref["x"], ref["t"], ref["c"]), ref["eps_non_ema"]) < 1e-5
        with sr_model.ema_scope():
            assert rel_err(sr_model.apply_model(ref["x"], ref["t"], ref["c"]), ref["eps"]) < 1e-5
            got = unet_block_outputs(sr_model.model.diffusion_model, ref["unet_input"], ref["t"], None)
    for name, value in ref["blocks"].items():
        assert rel_err(got[name], value) < 1e-5, name


@pytest.mark.parametrize("run", ["ddim", "ddim_eta0"])
def test_sr_ddim_at_eta_1_and_0_with_the_recorded_noise(sr_model, sr, monkeypatch, run):
    ref = sr["sample"][run]
    pending = replay_noise(monkeypatch, ref.get("noise", []))
    recorder = Recorder(sr_model)
    with sr_model.ema_scope():
        samples, _ = DDIMSampler(recorder).sample(S=sr["sample"]["S"], batch_size=1, shape=ref["x_T"].shape[1:],
                                                  conditioning=sr["unet"]["c"], eta=ref["eta"], x_T=ref["x_T"],
                                                  verbose=False)
    assert pending == []                                          # eta 1: one draw per step, the last one too
    check_run(recorder, ref, samples)
    assert rel_err(sr_model.decode_first_stage(samples), ref["decoded"]) < 1e-4
    assert rel_err(sr_model.decode_first_stage(samples, force_not_quantize=True), ref["decoded_noquant"]) < 1e-4


# --------------------------------------------------------------------------- sr: the patch-wise mode
def test_split_input_unet_and_decoder_match_the_reference(sr_model, sr):
    from ldm.models.diffusion.split_input import apply_model_split, decode_split

    ref = sr["split_input"]
    sr_model.split_input_params = dict(ref["split_input_params"])
    try:
        with torch.no_grad(), sr_model.ema_scope():
            assert rel_err(sr_model.apply_model(ref["x"], ref["t"], ref["c"]), ref["eps"]) < 1e-5
            _, weighting, norm = apply_model_split(sr_model, ref["x"], ref["t"], {"c_concat": [ref["c"]]}, details=True)
        assert torch.equal(weighting, ref["weighting"]) and rel_err(norm, ref["normalization"]) < 1e-6
        assert rel_err(sr_model.decode_first_stage(ref["decode_input"]), ref["decoded"]) < 1e-5
        _, weighting, norm = decode_split(sr_model, ref["decode_input"], details=True)
        assert torch.equal(weighting, ref["decode_weighting"]) and rel_err(norm, ref["decode_normalization"]) < 1e-6
    finally:
        del sr_model.split_input_params
    with torch.no_grad(), sr_model.ema_scope():   # off again: the whole-latent call differs
        assert rel_err(sr_model.apply_model(ref["x"], ref["t"], ref["c"]), ref["eps"]) > 1e-2


def test_split_input_single_crop_equals_whole_and_any_size_is_finite(sr_model, sr):
    from ldm.models.diffusion.split_input import notebook_split_params

    ref = sr["unet"]
    with torch.no_grad(), sr_model.ema_scope():
        whole = sr_model.apply_model(ref["x"], ref["t"], ref["c"])
        sr_model.split_input_params = notebook_split_params(128, 64)     # larger than the latent: one crop
        try:
            one = sr_model.apply_model(ref["x"], ref["t"], ref["c"])
            # 24x32 with 16/12 crops is not covered by 16 + 12k (the reference: NaN strips)
            sr_model.split_input_params = notebook_split_params(16, 12)
            odd = sr_model.apply_model(ref["x"], ref["t"], ref["c"])
            decoded = sr_model.decode_first_stage(ref["x"])
        finally:
            del sr_model.split_input_params
    assert rel_err(one, whole) < 1e-6
    assert torch.isfinite(odd).all() and torch.isfinite(decoded).all() and decoded.shape == (1, 3, 96, 128)
    assert 0 < rel_err(odd, whole) < 1


def test_delta_border_and_patch_starts():
    from ldm.models.diffusion.split_input import delta_border, patch_starts

    d = delta_border(5, 5)
    assert d[0].eq(0).all() and d[2, 2] == 0.5 and d[1, 2] == 0.25
    assert delta_border(1, 3).tolist() == [[0.0, 0.0, 0.0]]                 # the reference: NaN (0/0)
    assert patch_starts(24, 16, 8) == [0, 8] and patch_starts(30, 16, 8) == [0, 8, 14] and patch_starts(8, 8, 4) == [0]


# ----------------------------------------------------------------------------------- class names
def test_parse_class_by_index_and_name():
    from ldm.generate.classcond import class_name, imagenet_classes, parse_class

    assert len(imagenet_classes()) == 1000
    assert [class_name(i) for i in (25, 187, 448, 992)] == ["European fire salamander", "Yorkshire terrier",
                                                             "birdhouse", "agaric"]
    assert parse_class("187") == parse_class("yorkshire TERRIER") == 187 and parse_class("Tinca tinca") == 0
    assert parse_class("toilet tissue") == 999 and parse_class("fire salamander") == 25
    with pytest.raises(UserInputError, match=r"class 1000 is out of range: this model has classes 0\.\.999"):
        parse_class("1000")
    with pytest.raises(UserInputError, match=r"'crane' is ambiguous: it matches 2 classes: 134 \(crane\); 517"):
        parse_class("crane")
    with pytest.raises(UserInputError, match="no ImageNet class is called 'unicorn'"):
        parse_class("unicorn")


# ------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def cin_pipeline(spec_dir):
    from ldm.generate import StableDiffusion

    return StableDiffusion.from_files(CIN_CONFIG, CIN_CKPT, device="cpu", precision="fp32", hash_checkpoint=False,
                                      progress=False)


@pytest.fixture(scope="module")
def sr_pipeline(spec_dir):
    from ldm.generate import StableDiffusion

    return StableDiffusion.from_files(SR_CONFIG, SR_CKPT, device="cpu", precision="fp32", hash_checkpoint=False,
                                      progress=False)


def test_sample_class_conditioning_seeds_and_records(cin_pipeline, cin):
    ref = cin["class_embedding"]
    assert torch.equal(cin_pipeline._class_conditioning([25, 187]), ref["c"])
    assert cin_pipeline.class_table() == (1000, 1000)
    both = cin_pipeline.sample_class([25, "agaric"], [7, 8], steps=2, width=32, height=32)
    alone = cin_pipeline.sample_class("agaric", 8, steps=2, width=32, height=32)
    assert np.array_equal(np.asarray(both.images[1]), np.asarray(alone.images[0]))     # per-image seeds
    record = both.records[1]
    assert (record.prompt, record.extra["Class"], record.scale, record.seed, record.mode) == ("agaric", 992, 3.0, 8,
                                                                                           "class")
    unguided = cin_pipeline.sample_class("agaric", 8, steps=2, width=32, height=32, scale=1.0)
    assert not np.array_equal(np.asarray(unguided.images[0]), np.asarray(alone.images[0]))
    with pytest.raises(UserInputError, match="out of range"):
        cin_pipeline.sample_class(1000, 0, steps=2)
    with pytest.raises(UserInputError, match="no null class"):
        _no_null(cin_pipeline)


def _no_null(sd):
    """A 1000-row table (cin256) has no null class: guidance is refused, scale 1 is the default."""
    table = sd.model.cond_stage_model.embedding
    sd.model.cond_stage_model.embedding = torch.nn.Embedding(1000, table.embedding_dim)
    try:
        assert sd.class_table() == (1000, None)
        assert sd.sample_class(3, 0, steps=2, width=16, height=16).records[0].scale == 1.0
        sd.sample_class(3, 0, steps=2, width=16, height=16, scale=2.0)
    finally:
        sd.model.cond_stage_model.embedding = table


def test_superres_conditioning_split_and_sizes(sr_pipeline, sr, monkeypatch):
    lr = Image.fromarray(sr["cond"]["lr_uint8"].numpy())
    seen = {}
    original = type(sr_pipeline)._sample

    def spy(self, sampler, steps, shape, cond, *args, **kwargs):
        seen.update(cond=cond, shape=shape, split=getattr(self.model, "split_input_params", None))
        return original(self, sampler, steps, shape, cond, *args, **kwargs)

    monkeypatch.setattr(type(sr_pipeline), "_sample", spy)
    result = sr_pipeline.superres(lr, 3, steps=2, split="on", patch=16, stride=8)
    assert torch.equal(seen["cond"]["c_concat"][0], sr["cond"]["c"]) and seen["shape"] == (3, 24, 32)
    assert seen["split"]["ks"] == (16, 16) and sr_pipeline.model.split_input_params is None     # restored
    assert result.images[0].size == (128, 96)
    record = result.records[0]
    assert (record.eta, record.steps, record.extra["Patches"], record.extra["Input size"]) == (1.0, 2, "16 stride 8",
                                                                                              "32x24")
    assert sr_pipeline.superres(lr, 3, steps=2).records[0].extra["Patches"] == "off"    # auto: 24 px < 32
    odd = sr_pipeline.superres(lr.crop((0, 0, 29, 21)), 3, steps=2, eta=0.0, split="on", patch=16, stride=8)
    assert odd.images[0].size == (116, 84) and np.asarray(odd.images[0]).std() > 0
    with pytest.raises(UserInputError, match="too small"):
        sr_pipeline.superres(lr.crop((0, 0, 7, 20)), 0, steps=2)
    with pytest.raises(UserInputError, match="too large, the 4x output would be 16388x32"):
        sr_pipeline.superres(Image.new("RGB", (4097, 8)), 0, steps=2)
    with pytest.raises(UserInputError, match="multiple of 8"):
        sr_pipeline.superres(lr, 0, steps=2, split="on", patch=12)


# ---------------------------------------------------------------------------------------- scripts
def _parser(script: str):
    return runpy.run_path(str(REPO / "scripts" / script), run_name="loaded_for_tests")["build_parser"]()


@pytest.mark.parametrize("script", ["sample_class.py", "superres.py"])
def test_help_lists_every_flag(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_main(script)(["--help"])
    assert exit_info.value.code == 0
    entries = help_entries(capsys.readouterr().out)
    flags = {a.option_strings[0] for a in _parser(script)._actions if a.option_strings} - {"-h"}
    assert flags <= set(entries), flags - set(entries)
    for flag in flags:
        assert "default" in entries[flag] or flag in ("--help",), (flag, entries[flag])


def test_sample_class_script_end_to_end(tmp_path, capsys):
    from ldm.metadata import parse_parameters, read_parameters

    out = tmp_path / "out"
    argv = ["--config", str(CIN_CONFIG), "--ckpt", str(CIN_CKPT), "--classes", "25", "birdhouse", "--n_samples", "3",
            "--ddim_steps", "2", "--H", "16", "--W", "16", "--outdir", str(out), "--device", "cpu", "--precision",
            "fp32", "--seed", "5"]
    assert load_main("sample_class.py")(argv) == 0, capsys.readouterr().err
    assert load_main("sample_class.py")(argv[:-2] + ["--seed", "9", "--skip_grid"]) == 0    # never overwrites
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == [f"{i:05}.png" for i in range(12)] and (out / "grid-0000.png").is_file()
    meta = parse_parameters(read_parameters(out / "samples" / "00003.png"))
    assert (meta["Class"], meta["Seed"], meta["CFG scale"], meta["Steps"], meta["Size"]) == ("448", "8", "3.0", "2",
                                                                                           "16x16")
    with Image.open(out / "grid-0000.png") as grid:
        assert grid.size[0] > grid.size[1]                        # one row of 3 per class, 2 rows


@pytest.mark.parametrize("classes,message", [(["1000"], "class 1000 is out of range"),
                                             (["crane"], "'crane' is ambiguous")])
def test_sample_class_script_one_line_errors(tmp_path, capsys, classes, message):
    code = load_main("sample_class.py")(["--config", str(CIN_CONFIG), "--ckpt", str(CIN_CKPT), "--classes", *classes,
                                         "--outdir", str(tmp_path / "o"), "--device", "cpu", "--precision", "fp32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and ": error: " in err[-1]
    assert not (tmp_path / "o").exists()


def test_sample_class_script_lists_classes(capsys):
    assert load_main("sample_class.py")(["--list_classes", "SALAMANDER"]) == 0
    assert capsys.readouterr().out.splitlines() == ["25: European fire salamander, Salamandra salamandra",
                                                    "28: spotted salamander, Ambystoma maculatum"]


def test_a_checkpoint_of_the_other_model_names_its_config(tmp_path, capsys):
    code = load_main("sample_class.py")(["--config", str(CIN_CONFIG), "--ckpt", str(SR_CKPT), "--outdir",
                                         str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].endswith("The checkpoint is the LDM 4x super-resolution model (bsr_sr): pass "
                                          "--config models/ldm/bsr_sr/config.yaml")


def test_superres_script_end_to_end_and_errors(sr, tmp_path, capsys):
    from ldm.metadata import parse_parameters, read_parameters

    low = tmp_path / "low.png"
    Image.fromarray(sr["cond"]["lr_uint8"].numpy()).save(low)
    out = tmp_path / "out"
    base = ["--config", str(SR_CONFIG), "--ckpt", str(SR_CKPT), "--outdir", str(out), "--device", "cpu",
            "--precision", "fp32"]
    code = load_main("superres.py")(["--init-img", str(low), "--steps", "2", "--split", "on", "--patch_size", "16",
                                     "--patch_stride", "8", "--n_samples", "2", *base])
    assert code == 0, capsys.readouterr().err
    samples = sorted((out / "samples").iterdir())
    assert [p.name for p in samples] == ["00000.png", "00001.png"]
    meta = parse_parameters(read_parameters(samples[1]))
    assert (meta["Size"], meta["Seed"], meta["Eta"], meta["Patches"]) == ("128x96", "1", "1.0", "16 stride 8")
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((6, 40, 3), np.uint8)).save(tiny)
    for extra, message in ((["--init-img", str(tiny)], "too small"),
                           (["--init-img", str(low), "--scale", "3"], "has no guidance"),
                           (["--init-img", str(low), "--patch_size", "20"], "--patch_size 20 must be a positive "
                                                                            "multiple of 8")):
        code = load_main("superres.py")(extra + base)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and message in err[-1], err
    assert len(list((out / "samples").iterdir())) == 2
