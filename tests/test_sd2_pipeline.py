"""The scripts and the Python API on an SD 2 (768-v code path) model: the tiny fixture model of
../shared/spec (OpenCLIP text encoder, v-prediction) renders end to end with the SD 2 family's
defaults (guidance 9, img2img strength 0.8, the SDV2 watermark)."""
from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from ldm.metadata import parse_parameters, read_parameters
from tests.helpers import register_tiny_openclip
from tests.test_scripts import load_main, restore_logging  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def v2_files(spec_dir):
    fixtures = spec_dir / "fixtures"
    register_tiny_openclip(fixtures)
    return fixtures / "sd-v2-v-tiny.yaml", fixtures / "sd-v2-v-tiny-random.ckpt"


def params(path) -> dict:
    return parse_parameters(read_parameters(path))


def test_the_family_of_the_sd2_configs(v2_files):
    from ldm.generate import describe_config, load_config
    from tests.helpers import REPO

    assert describe_config(load_config(v2_files[0])).family.name == "sd-v2-v"
    for name, family in (("v2-inference-v.yaml", "sd-v2-v"), ("v2-inference.yaml", "sd-v2"),
                         ("v2-inpainting-inference.yaml", "sd-v2-inpainting")):
        spec = describe_config(load_config(REPO / "configs" / "stable-diffusion" / name))
        assert spec.family.name == family
    assert (spec.family.watermark, spec.family.default_scale("inpaint")) == ("SDV2", 9.0)


def test_txt2img_and_img2img_run_an_sd2_model_with_its_family_defaults(v2_files, tmp_path, capsys):
    config, ckpt = v2_files
    out = tmp_path / "txt2img"
    code = load_main("txt2img.py")(["--prompt", "a castle", "--n_samples", "1", "--n_iter", "1", "--steps", "2",
                                    "--H", "256", "--W", "256", "--config", str(config), "--ckpt", str(ckpt),
                                    "--outdir", str(out), "--no_safety_check", "--device", "cpu", "--skip_grid"])
    assert code == 0, capsys.readouterr().err
    (sample,) = sorted((out / "samples").iterdir())
    meta = params(sample)
    assert (meta["CFG scale"], meta["Sampler"], meta["Size"], meta["Watermark"]) == ("9.0", "DDIM", "256x256", "SDV2")
    assert np.asarray(Image.open(sample)).std() > 0

    out2 = tmp_path / "img2img"
    code = load_main("img2img.py")(["--prompt", "a castle", "--init-img", str(sample), "--n_samples", "1",
                                    "--ddim_steps", "10", "--config", str(config), "--ckpt", str(ckpt), "--outdir",
                                    str(out2), "--no_safety_check", "--device", "cpu", "--skip_grid"])
    assert code == 0, capsys.readouterr().err
    meta = params(next((out2 / "samples").iterdir()))
    assert (meta["CFG scale"], meta["Denoising strength"]) == ("9.0", "0.8")


def test_sd2_attention_keeps_float32_scores_and_v1_does_not(v2_files, monkeypatch):
    """The SD 2 reference computes attention scores in float32 (ATTN_PRECISION); the bf16 blocked CPU
    form rounds them, so an SD 2 model never takes it, an SD v1 model still may."""
    import torch

    import ldm.ops.attention_ops as ops_attention
    from ldm.generate import StableDiffusion
    from ldm.modules.attention import CrossAttention
    from tests.helpers import TINY_CONFIG
    from tests.test_generate import random_model

    sd2 = StableDiffusion.from_files(v2_files[0], v2_files[1], device="cpu", precision="fp32", hash_checkpoint=False,
                                     progress=False)
    sd1 = StableDiffusion(random_model(TINY_CONFIG), progress=False)
    flags = {name: {m.upcast_attention for m in sd.model.modules() if isinstance(m, CrossAttention)}
             for name, sd in (("v2", sd2), ("v1", sd1))}
    assert flags == {"v2": {True}, "v1": {False}}

    monkeypatch.setattr(ops_attention.capability, "cpu_has_fast_bf16_matmul", lambda: True)
    q = torch.randn(1, 2, 512, 16).bfloat16()
    assert ops_attention._use_blocked(q, q, q, upcast=False)
    assert not ops_attention._use_blocked(q, q, q, upcast=True)


def test_a_v1_checkpoint_with_an_sd2_config_names_the_v1_config(v2_files, spec_dir):
    from ldm.checkpoint import CheckpointError
    from ldm.generate import StableDiffusion

    v1 = spec_dir / "fixtures" / "sd-v1-tiny-random.ckpt"
    with pytest.raises(CheckpointError, match=r"does not match the model config.*Stable Diffusion v1.*v1-inference"):
        StableDiffusion.from_files(v2_files[0], v1, device="cpu", precision="fp32", hash_checkpoint=False)
