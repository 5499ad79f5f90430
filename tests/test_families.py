"""ldm.families: each shipped config is recognised as its family, from the config and from the
built model alike; the pipeline and the scripts take their defaults from it."""
from __future__ import annotations

import dataclasses

import pytest

from ldm.errors import UserInputError
from ldm.families import FAMILIES, METHODS, facts_from_config, facts_from_model, family_of, get_family
from ldm.generate import StableDiffusion, describe_config, describe_model, load_config
from ldm.util import instantiate_from_config
from tests.helpers import DEMO_CONFIG, DEMO_WEIGHTS, REPO, TINY_CONFIG
from tests.test_generate import TINY_INPAINT_CONFIG, TINY_LDM_CONFIG, random_model

CONFIGS = {
    "configs/stable-diffusion/v1-inference.yaml": "sd-v1",
    "configs/stable-diffusion/v1-inpainting-inference.yaml": "sd-v1-inpainting",
    "models/ldm/inpainting_big/config.yaml": "ldm-inpainting",
    "configs/demo/demo-txt2img.yaml": "sd-v1",
    "tests/configs/v1-tiny.yaml": "sd-v1",
    "tests/configs/v1-inpainting-tiny.yaml": "sd-v1-inpainting",
    "tests/configs/ldm-inpainting-big-tiny.yaml": "ldm-inpainting",
}


@pytest.mark.parametrize("path, name", CONFIGS.items())
def test_each_config_is_recognised_by_its_family(path, name):
    assert describe_config(load_config(REPO / path)).family.name == name


@pytest.mark.parametrize("path", [TINY_CONFIG, TINY_INPAINT_CONFIG, TINY_LDM_CONFIG])
def test_a_built_model_gives_the_same_family_and_geometry_as_its_config(path):
    config = load_config(path)
    model = random_model(path)
    assert family_of(facts_from_model(model)) == family_of(facts_from_config(config))
    assert describe_model(model).geometry == describe_config(config).geometry


def test_the_bert_model_runs_txt2img():
    config = load_config(REPO / "configs" / "stable-diffusion" / "v1-inference.yaml")
    config.model.params.cond_stage_config.target = "ldm.modules.encoders.modules.BERTEmbedder"
    family = describe_config(config).family
    assert family.name == "ldm-txt2img" and family.kind == "txt2img" and family.methods == ("txt2img",)
    assert family.size == (256, 256) and family.default_scale("txt2img") == 5.0 and not family.unsupported


def test_family_table_is_consistent():
    names = [f.name for f in FAMILIES]
    assert len(names) == len(set(names))
    assert FAMILIES[-1].name == "unknown"  # the catch-all comes last
    for family in FAMILIES:
        assert set(family.methods) <= set(METHODS), family.name
        assert family.size[0] % 8 == 0 and family.size[1] % 8 == 0
    with pytest.raises(KeyError, match="sd-v1"):
        get_family("sd-v9")


def test_a_config_demo_section_overrides_size_and_safety_checker():
    spec = describe_config(load_config(DEMO_CONFIG))
    assert (spec.height, spec.width, spec.safety_checker) == (64, 64, False)
    sd = describe_config(load_config(REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"))
    assert (sd.height, sd.width, sd.safety_checker) == (512, 512, True)


def test_the_python_api_takes_the_models_default_size():
    """The demo model from the README's API, with no size given: 64x64 (its config's), not 512x512."""
    sd = StableDiffusion.from_files(DEMO_CONFIG, DEMO_WEIGHTS, device="cpu", precision="fp32",
                                    hash_checkpoint=False, progress=False)
    result = sd.txt2img("a red circle on a blue background", 1, steps=2)
    assert result.images[0].size == (64, 64)
    assert (result.records[0].width, result.records[0].height) == (64, 64)


def test_the_pipeline_takes_steps_sampler_scale_and_watermark_from_the_family():
    sd = StableDiffusion(random_model(TINY_CONFIG), progress=False)
    family = dataclasses.replace(sd.spec.family, steps=2, sampler="euler", scale={"txt2img": 3.0},
                                 watermark="TestMark", size=(32, 48))
    sd.spec = dataclasses.replace(sd.spec, family=family, height=32, width=48)
    record = sd.txt2img("a red cube", 7).records[0]
    assert (record.steps, record.sampler, record.scale, record.width, record.height) == (2, "euler", 3.0, 48, 32)
    assert record.watermark_text == "TestMark"
    record = sd.txt2img("a red cube", 7, steps=4, sampler="ddim", scale=1.5, width=64, height=64).records[0]
    assert (record.steps, record.sampler, record.scale, record.width, record.height) == (4, "ddim", 1.5, 64, 64)


def test_a_method_the_family_cannot_run_names_the_one_that_can():
    ldm = StableDiffusion(instantiate_from_config(load_config(TINY_LDM_CONFIG).model).eval(), progress=False)
    with pytest.raises(UserInputError, match=r"inpaint_ldm\(\) \(scripts/inpaint.py --indir\)"):
        ldm.img2img("x", None)


def test_sampler_settings_are_checked_before_any_model_call():
    sd = StableDiffusion(random_model(TINY_CONFIG), progress=False)
    calls = []
    sd.model.apply_model = lambda *a, **k: calls.append(1)
    with pytest.raises(UserInputError, match="plms is deterministic"):
        sd.txt2img("x", 1, sampler="plms", eta=0.5, steps=2)
    with pytest.raises(UserInputError, match="3 steps"):
        sd.txt2img("x", 1, sampler="ddim", steps=3)
    with pytest.raises(UserInputError, match="unknown sampler"):
        sd.txt2img("x", 1, sampler="nope", steps=2)
    assert calls == []


def test_a_checkpoint_of_another_family_names_the_config_that_fits_it(spec_dir):
    """An SD 2 file with an SD v1 config: the key mismatch error says what the file is and which config to pass."""
    from ldm.checkpoint import CheckpointError, read_checkpoint
    from ldm.families import facts_from_state_dict

    v2 = spec_dir / "fixtures" / "sd-v2-v-tiny-random.ckpt"
    shapes = {k: tuple(v.shape) for k, v in read_checkpoint(v2).state_dict.items()}
    assert family_of(facts_from_state_dict(shapes)).name == "sd-v2"  # v or eps cannot be told from keys
    with pytest.raises(CheckpointError, match=r"does not match the model config.*Stable Diffusion 2.*v2-inference"):
        StableDiffusion.from_files(TINY_CONFIG, v2, device="cpu", precision="fp32", hash_checkpoint=False)
    v1 = spec_dir / "fixtures" / "sd-v1-tiny-random.ckpt"
    with pytest.raises(CheckpointError, match=r"wrong shape.*Stable Diffusion v1 text-to-image.*v1-inference.yaml"):
        StableDiffusion.from_files(TINY_INPAINT_CONFIG, v1, device="cpu", precision="fp32", hash_checkpoint=False)
