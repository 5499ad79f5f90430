"""ldm.generate, the Python API behind the scripts, on tiny random-weight models (64x64 images,
2-4 steps): per-image seeds, img2img with any sampler, the three inpainting paths, the fp16 decode
check, the safety checker, metadata records and the image writer."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.errors import UserInputError
from ldm.generate import (SAFETY_FLAGGED, SAFETY_NOT_NEEDED, SAFETY_OFF, SAFETY_PASSED, WATERMARK_TOO_SMALL,
                          GenerationError, GenerationResult, ImageRecord, ImageWriter, StableDiffusion,
                          config_needs_safety_checker, load_config, model_geometry)
from ldm.metadata import parse_parameters, read_parameters
from ldm.modules.encoders.clip import CLIPVisionConfig
from ldm.safety_checker import SafetyChecker
from ldm.util import instantiate_from_config
from ldm.watermark import WATERMARK_TEXT, read_watermark
from tests.helpers import REPO, TINY_CONFIG

TINY_INPAINT_CONFIG = REPO / "tests" / "configs" / "v1-inpainting-tiny.yaml"
TINY_LDM_CONFIG = REPO / "tests" / "configs" / "ldm-inpainting-big-tiny.yaml"
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=224,
                   patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
SMALL = dict(steps=2, width=64, height=64)


# -- helpers shared with tests/test_scripts.py -----------------------------------------------------
def random_model(config_path, seed: int = 0):
    """A model of ``config_path`` with torch's default random init, in eval mode."""
    torch.manual_seed(seed)
    return instantiate_from_config(load_config(config_path).model).eval().requires_grad_(False)


def tiny_checker(concepts: torch.Tensor | None = None, threshold: float = 1.5, seed: int = 0) -> SafetyChecker:
    """A random-weight safety checker with a 2-layer, 32-wide vision tower and 16-d embeddings.

    :param concepts: ``[17, 16]`` concept embeddings (default random); every concept threshold is
        ``threshold`` (1.5: never fires, since a cosine is at most 1; -1.5: always fires).
    """
    checker = SafetyChecker(CLIPVisionConfig.from_hf_dict(TINY_VISION), projection_dim=16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every tensor set here: some start as torch.empty (uninitialised memory)
        for name, p in checker.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.1 * r if name.endswith("weight") else 0.1 * r)
            else:
                p.copy_(r / r[0].numel() ** 0.5 if p.ndim >= 2 else r if "embedding" in name else 0.1 * r)
        checker.concept_embeds.copy_(torch.randn(17, 16, generator=g) if concepts is None else concepts)
        checker.special_care_embeds.copy_(torch.randn(3, 16, generator=g))
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(1.5)
    return checker


def write_checker_folder(folder, checker: SafetyChecker):
    """The folder layout ``SafetyChecker.from_folder`` reads (config.json + pytorch_model.bin)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"vision_config": TINY_VISION, "projection_dim": 16}))
    torch.save(checker.state_dict(), folder / "pytorch_model.bin")
    return folder


def textured_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def box_mask(width: int, height: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
    return mask


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd(tiny_ckpt):
    return StableDiffusion.from_files(TINY_CONFIG, tiny_ckpt, device="cpu", precision="fp32", progress=False)


@pytest.fixture(scope="module")
def batch3(sd):
    return sd.txt2img("a red cube", 42, n=3, negative_prompt="blurry", **SMALL)


# -- txt2img ---------------------------------------------------------------------------------------
def test_image_k_of_a_batch_is_the_image_its_seed_gives_alone(sd, batch3):
    assert [r.seed for r in batch3.records] == [42, 43, 44]
    alone = sd.txt2img("a red cube", 44, n=1, negative_prompt="blurry", **SMALL)
    assert alone.records[0].seed == 44
    np.testing.assert_array_equal(pixels(batch3.images[2]), pixels(alone.images[0]))  # bitwise
    assert not np.array_equal(pixels(batch3.images[0]), pixels(batch3.images[1]))


def test_fast_batches_differ_from_exact_ones_by_rounding_only(sd, batch3):
    sd.exact_batches = False
    try:
        fast = sd.txt2img("a red cube", 42, n=3, negative_prompt="blurry", **SMALL)
    finally:
        sd.exact_batches = True
    for a, b in zip(fast.images, batch3.images):
        assert np.abs(pixels(a).astype(int) - pixels(b)).max() <= 2


def test_records_carry_everything_to_remake_an_image(batch3, tiny_ckpt):
    from ldm.metadata import model_hash

    record = batch3.records[1]
    assert (record.mode, record.prompt, record.negative_prompt, record.sampler, record.steps, record.scale) == \
        ("txt2img", "a red cube", "blurry", "ddim", 2, 7.5)
    assert (record.width, record.height, record.eta, record.strength) == (64, 64, 0.0, None)
    assert record.safety == SAFETY_OFF and not record.nsfw
    parsed = parse_parameters(record.parameters())
    assert parsed["Prompt"] == "a red cube" and parsed["Negative prompt"] == "blurry"
    assert (parsed["Seed"], parsed["Steps"], parsed["Sampler"], parsed["CFG scale"], parsed["Size"]) == \
        ("43", "2", "DDIM", "7.5", "64x64")
    assert parsed["Model"] == "sd-v1-tiny-random" and parsed["Model hash"] == model_hash(tiny_ckpt)
    assert parsed["Safety checker"] == SAFETY_OFF
    assert all(im.size == (64, 64) and im.mode == "RGB" for im in batch3.images)


def test_sizes_that_are_multiples_of_8_but_not_64_run(sd):
    result = sd.txt2img("a red cube", 1, width=72, height=80, steps=2)
    assert result.images[0].size == (72, 80)
    with pytest.raises(UserInputError, match="multiple of 8"):
        sd.txt2img("a red cube", 1, width=70, height=64, steps=2)


def test_a_prompt_over_77_tokens_is_encoded_in_windows(sd, caplog):
    prompt = "a castle " + "very " * 80 + "tall towers"
    with caplog.at_level(logging.INFO, logger="ldm.prompts"):
        sd.txt2img(prompt, 3, n=1, **SMALL)
    messages = [r.getMessage() for r in caplog.records]
    assert any("2 windows of 75 tokens" in m for m in messages), messages  # nothing dropped (tests/test_prompts.py)
    assert not any("ignored" in m for m in messages), messages


# -- img2img ---------------------------------------------------------------------------------------
def test_img2img_with_a_non_ddim_sampler(sd):
    init = textured_image(64, 64)
    result = sd.img2img("a blue sphere", init, 7, n=2, strength=0.5, steps=4, sampler="euler_a")
    alone = sd.img2img("a blue sphere", init, 8, n=1, strength=0.5, steps=4, sampler="euler_a")
    np.testing.assert_array_equal(pixels(result.images[1]), pixels(alone.images[0]))
    record = result.records[0]
    assert (record.mode, record.sampler, record.strength, record.eta, record.scale) == \
        ("img2img", "euler_a", 0.5, 1.0, 5.0)
    parsed = parse_parameters(record.parameters())
    assert parsed["Denoising strength"] == "0.5" and parsed["Sampler"] == "Euler a" and parsed["Seed"] == "7"


@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_img2img_strength_outside_0_1_is_an_error(sd, strength):
    with pytest.raises(UserInputError, match=r"outside \[0, 1\]"):
        sd.img2img("x", textured_image(64, 64), 1, strength=strength)


# -- inpainting ------------------------------------------------------------------------------------
def test_inpaint_with_an_ordinary_sd_model_keeps_unmasked_pixels(sd):
    image, mask = textured_image(72, 56, seed=1), box_mask(72, 56)  # not multiples of 64: padded inside
    result = sd.inpaint("a window", image, mask, 5, n=2, **{"steps": 2})
    keep = mask < 128
    for out in result.images:
        assert out.size == image.size
        np.testing.assert_array_equal(pixels(out)[keep], pixels(image)[keep])
        assert (pixels(out)[~keep] != pixels(image)[~keep]).mean() > 0.5
    assert result.records[1].mode == "inpaint" and result.records[1].seed == 6


def test_inpaint_with_the_9_channel_model(tiny_ckpt):
    sd9 = StableDiffusion(random_model(TINY_INPAINT_CONFIG), progress=False)
    assert sd9.kind == "sd-inpaint"
    seen = []
    apply_model = sd9.model.apply_model
    sd9.model.apply_model = lambda x, t, cond, **kw: seen.append(cond) or apply_model(x, t, cond, **kw)
    image, mask = textured_image(64, 64, seed=2), box_mask(64, 64)
    result = sd9.inpaint("a door", image, mask, 3, n=1, steps=2, scale=7.5)
    keep = mask < 128
    np.testing.assert_array_equal(pixels(result.images[0])[keep], pixels(image)[keep])
    cond = seen[0]
    c_concat = cond["c_concat"][0]                       # [uncond, cond] rows, each [mask(1), latent(4)]
    assert c_concat.shape == (2, 5, 8, 8) and torch.equal(c_concat[0], c_concat[1])  # uncond keeps c_concat
    small = torch.from_numpy(mask >= 128).float()[None, None]
    assert torch.equal(c_concat[:1, :1], torch.nn.functional.interpolate(small, size=(8, 8)))
    with pytest.raises(UserInputError, match="inpainting"):
        sd9.txt2img("x", 1, **SMALL)


def test_ldm_inpainting_follows_the_reference_math():
    ldm = StableDiffusion(random_model(TINY_LDM_CONFIG), progress=False)
    assert ldm.kind == "ldm-inpaint" and ldm.factor == 4
    seen = []
    apply_model = ldm.model.apply_model
    ldm.model.apply_model = lambda x, t, cond, **kw: seen.append(cond) or apply_model(x, t, cond, **kw)
    image, mask = textured_image(64, 48, seed=3), box_mask(64, 48)
    result = ldm.inpaint_ldm(image, mask, 9, steps=2)
    keep = mask < 128
    np.testing.assert_array_equal(pixels(result.images[0])[keep], pixels(image)[keep])
    cond = seen[0]["c_concat"][0][..., :12, :16]           # [1, 3 + 1, 12, 16], padded to 16x16 for the UNet
    m = torch.from_numpy(mask >= 128).float()[None, None]
    img01 = torch.from_numpy(pixels(image).astype(np.float32) / 255).permute(2, 0, 1)[None]
    expected_c = ldm.model.first_stage_model.encode(((1 - m) * img01) * 2 - 1)
    torch.testing.assert_close(cond[:, :3], expected_c)
    torch.testing.assert_close(cond[:, 3:], torch.nn.functional.interpolate(m * 2 - 1, size=(12, 16)))
    record = result.records[0]
    assert (record.mode, record.seed, record.scale, record.width, record.height) == ("ldm-inpaint", 9, 1.0, 64, 48)
    with pytest.raises(UserInputError, match="inpaint_ldm"):
        ldm.txt2img("x", 1, **SMALL)


def test_mask_of_another_size_is_an_error(sd):
    with pytest.raises(UserInputError, match="same size"):
        sd.inpaint("x", textured_image(64, 64), box_mask(32, 64), 1, steps=2)


# -- decoding: half-precision overflow -------------------------------------------------------------
@pytest.fixture()
def half_vae():
    """A tiny model whose decoder runs in bfloat16 and gives NaN (or black) unless it is float32."""
    sd_half = StableDiffusion(random_model(TINY_CONFIG), progress=False)
    first_stage = sd_half.model.first_stage_model.to(torch.bfloat16)
    decode = first_stage.decode
    state = {"fault": "nan"}

    def faulty(z):
        out = decode(z)
        if first_stage.post_quant_conv.weight.dtype == torch.float32:
            return out
        return torch.full_like(out, float("nan") if state["fault"] == "nan" else -1.5)

    first_stage.decode = faulty
    return sd_half, state


@pytest.mark.parametrize("fault", ["nan", "black"])
def test_an_overflowing_half_precision_decode_is_redone_in_fp32(half_vae, fault, caplog):
    sd_half, state = half_vae
    state["fault"] = fault
    z = torch.randn(2, 4, 8, 8)
    with caplog.at_level(logging.WARNING, logger="ldm.generate"):
        x = sd_half.decode(z)
    assert torch.isfinite(x).all() and not (x <= -1).all()
    assert sd_half.model.first_stage_dtype == torch.float32
    assert any("float32" in r.getMessage() for r in caplog.records)


def test_nan_latents_are_an_error_not_a_black_image(sd):
    with pytest.raises(GenerationError, match="precision fp32"):
        sd.decode(torch.full((1, 4, 8, 8), float("nan")))


# -- safety checker --------------------------------------------------------------------------------
class _Spy:
    """Records what the pipeline hands the checker."""

    def __init__(self, checker):
        self.checker, self.seen = checker, []

    def check(self, images):
        self.seen.append(images)
        return self.checker.check(images)


def test_safety_checker_replaces_the_image_that_matches_a_concept(sd, tmp_path):
    from ldm.safety_checker import placeholder_image

    # the checker's inputs for seeds 20 and 21 (uint8, rounded as the reference)
    spy = _Spy(tiny_checker())
    sd.safety_checker = spy
    try:
        first = sd.txt2img("a bird", 20, n=2, **SMALL)
        checker_input = spy.seen[0]
        assert checker_input.dtype == np.uint8 and checker_input.shape == (2, 64, 64, 3)
        assert [r.safety for r in first.records] == [SAFETY_PASSED] * 2
        # concept 0 points from image 1's embedding to image 0's: cosine > 0 only for image 0
        probe = tiny_checker()
        with torch.no_grad():
            emb = torch.nn.functional.normalize(probe.image_embeds(probe.preprocess(checker_input)), dim=-1)
        concepts = torch.randn(17, 16, generator=torch.Generator().manual_seed(1))
        concepts[0] = emb[0] - emb[1]
        checker = tiny_checker(concepts)
        with torch.no_grad():
            checker.concept_embeds_weights[0] = 0.0  # only concept 0 can fire (the others need cosine > 1.5)
        sd.safety_checker = SafetyChecker.from_folder(write_checker_folder(tmp_path / "checker", checker))
        second = sd.txt2img("a bird", 20, n=2, **SMALL)
    finally:
        sd.safety_checker = None
    assert [r.nsfw for r in second.records] == [True, False]
    assert [r.safety for r in second.records] == [SAFETY_FLAGGED, SAFETY_PASSED]
    np.testing.assert_array_equal(pixels(second.images[0]), pixels(placeholder_image(64, 64)))
    np.testing.assert_array_equal(pixels(second.images[1]), pixels(first.images[1]))


def test_config_decides_whether_the_checker_is_needed():
    config = load_config(TINY_CONFIG)
    assert config_needs_safety_checker(config)
    config.demo = {"safety_checker": False}
    assert not config_needs_safety_checker(config)
    config.demo = {"safety_checker": True}
    assert config_needs_safety_checker(config)


def test_model_geometry_from_configs():
    assert model_geometry(load_config(TINY_CONFIG)) == model_geometry(load_config(REPO / "configs" / "stable-diffusion"
                                                                                  / "v1-inference.yaml"))
    sd_geometry = model_geometry(load_config(TINY_CONFIG))
    assert (sd_geometry.kind, sd_geometry.latent_channels, sd_geometry.factor, sd_geometry.unet_multiple) == \
        ("txt2img", 4, 8, 8)
    assert model_geometry(load_config(TINY_INPAINT_CONFIG)).kind == "sd-inpaint"
    ldm_geometry = model_geometry(load_config(REPO / "models" / "ldm" / "inpainting_big" / "config.yaml"))
    assert (ldm_geometry.kind, ldm_geometry.latent_channels, ldm_geometry.factor) == ("ldm-inpaint", 3, 4)
    bert = load_config(TINY_CONFIG)
    bert.model.params.cond_stage_config = {"target": "ldm.modules.encoders.modules.BERTEmbedder"}
    assert model_geometry(bert).kind == "txt2img"


def test_load_config_errors_are_one_line(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserInputError, match="YAML"):
        load_config(bad)
    (tmp_path / "nomodel.yaml").write_text("foo: 1\n")
    with pytest.raises(UserInputError, match="model"):
        load_config(tmp_path / "nomodel.yaml")


# -- writing ---------------------------------------------------------------------------------------
def _record(seed: int, width: int = 64, height: int = 64) -> ImageRecord:
    return ImageRecord("txt2img", "a prompt", "", seed, "ddim", 2, 7.5, width, height, eta=0.0,
                       safety=SAFETY_NOT_NEEDED)


def test_writer_numbers_continue_and_nothing_is_overwritten(tmp_path):
    images = [textured_image(64, 64, seed=s) for s in range(2)]
    for run in range(2):
        writer = ImageWriter(tmp_path)
        writer.add(GenerationResult(images, [_record(10 * run), _record(10 * run + 1)]))
        writer.write_grid(2)
    names = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert names == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert sorted(p.name for p in tmp_path.glob("grid-*.png")) == ["grid-0000.png", "grid-0001.png"]
    assert parse_parameters(read_parameters(tmp_path / "samples" / "00003.png"))["Seed"] == "11"
    with Image.open(tmp_path / "grid-0001.png") as grid:
        assert grid.size == (2 * 64 + 3 * 2, 64 + 2 * 2)
    writer = ImageWriter(tmp_path, sample_dir=None)
    first = writer.write(images[0], _record(1), tmp_path, name="x.png")
    second = writer.write(images[1], _record(2), tmp_path, name="x.png")
    assert (first.name, second.name) == ("x.png", "x-1.png")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_watermark_is_written_and_recorded(tmp_path, caplog):
    from tests.test_watermark import natural_image

    big, small = natural_image(512, seed=0), textured_image(128, 128)
    writer = ImageWriter(tmp_path, save_grid=False)
    with caplog.at_level(logging.INFO, logger="ldm.generate"):
        big_path, small_path, _ = writer.add(GenerationResult([big, small, small],
                                                              [_record(1, 512, 512), _record(2, 128, 128),
                                                               _record(3, 128, 128)]))
    with Image.open(big_path) as im:
        assert read_watermark(im) == WATERMARK_TEXT
        assert parse_parameters(read_parameters(im))["Watermark"] == WATERMARK_TEXT
    with Image.open(small_path) as im:
        assert parse_parameters(read_parameters(im))["Watermark"] == WATERMARK_TOO_SMALL
        np.testing.assert_array_equal(np.asarray(im), pixels(small))
    assert sum("cannot hold the invisible watermark" in r.getMessage() for r in caplog.records) == 1
