"""Safety checker: release folder layout, concept scoring rules, preprocessing, vision tower.

A tiny random-weight checker is written in the layout of the public
``CompVis/stable-diffusion-safety-checker`` release (config.json with vision_config,
preprocessor_config.json, pytorch_model.bin with ``vision_model.vision_model.*`` keys as saved by
transformers 4.x, position_ids included) and loaded back through ``SafetyChecker.from_folder``.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.modules.encoders.clip import CLIPVisionConfig, CLIPVisionModel
from ldm.safety_checker import CLIP_MEAN, CLIP_STD, SafetyChecker, placeholder_image, score_concepts
from tests.helpers import rel_err

os.environ["HF_HUB_OFFLINE"] = "1"

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=224,
                   patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
PROJECTION_DIM = 16
N_PATCHES = (224 // 32) ** 2


def _vision_keys(n_layers: int) -> list[str]:
    """The transformers 4.x CLIPVisionModel key names, written out independently of our module."""
    keys = ["embeddings.class_embedding", "embeddings.patch_embedding.weight", "embeddings.position_embedding.weight",
            "pre_layrnorm.weight", "pre_layrnorm.bias"]
    for i in range(n_layers):
        p = f"encoder.layers.{i}."
        keys += [p + f"self_attn.{n}_proj.{t}" for n in ("k", "v", "q", "out") for t in ("weight", "bias")]
        keys += [p + f"{n}.{t}" for n in ("layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2") for t in ("weight", "bias")]
    return keys + ["post_layernorm.weight", "post_layernorm.bias"]


def _random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A release-layout state dict with random weights (norm weights near 1, small biases)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    shapes = {"embeddings.class_embedding": [32], "embeddings.patch_embedding.weight": [32, 3, 32, 32],
              "embeddings.position_embedding.weight": [N_PATCHES + 1, 32]}
    for key in _vision_keys(2):
        if key in shapes:
            shape = shapes[key]
        elif "fc1" in key:
            shape = [64, 32] if key.endswith("weight") else [64]
        elif "fc2" in key:
            shape = [32, 64] if key.endswith("weight") else [32]
        else:
            shape = [32, 32] if key.endswith("proj.weight") else [32]
        r = torch.randn(shape, generator=g)
        if "norm" in key:
            value = 1 + 0.1 * r if key.endswith("weight") else 0.1 * r
        elif len(shape) >= 2:
            value = r / (r[0].numel() ** 0.5)
        else:
            value = r if "embedding" in key else 0.1 * r
        sd["vision_model.vision_model." + key] = value
    sd["vision_model.vision_model.embeddings.position_ids"] = torch.arange(N_PATCHES + 1)[None]
    sd["visual_projection.weight"] = torch.randn(PROJECTION_DIM, 32, generator=g) / 32**0.5
    sd["concept_embeds"] = torch.randn(17, PROJECTION_DIM, generator=g)
    sd["special_care_embeds"] = torch.randn(3, PROJECTION_DIM, generator=g)
    sd["concept_embeds_weights"] = torch.full((17,), 1.5)  # cos <= 1: never fires
    sd["special_care_embeds_weights"] = torch.full((3,), 1.5)
    return sd


def _write_folder(folder, sd, weights_name="pytorch_model.bin"):
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["StableDiffusionSafetyChecker"], "model_type": "clip", "projection_dim": PROJECTION_DIM,
              "text_config": {"hidden_size": 32}, "vision_config": {**TINY_VISION, "model_type": "clip_vision_model",
                                                                     "dropout": 0.0, "initializer_factor": 1.0}}
    preprocessor = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN),
                    "image_std": list(CLIP_STD), "resample": 3, "size": 224}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    if weights_name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / weights_name))
    else:
        torch.save(sd, folder / weights_name)
    return folder


def _images() -> list[Image.Image]:
    """A (smooth gradient, 300x200) and B (noise, 256x256): different sizes exercise resize and crop."""
    yy, xx = np.mgrid[0:200, 0:300]
    a = np.stack([xx * 255 // 299, yy * 255 // 199, np.full_like(xx, 60)], -1).astype(np.uint8)
    b = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    return [Image.fromarray(a), Image.fromarray(b)]


@pytest.fixture()
def tiny_folder(tmp_path):
    return _write_folder(tmp_path / "safety_checker", _random_state_dict())


# -- scoring rules (golden numbers) --------------------------------------------------------------


def test_scores_are_rounded_before_the_threshold_test():
    res = score_concepts([[0.0] * 3] * 3, [[0.3004], [0.3006], [0.2954]], [0.5] * 3, [0.3])
    assert [r.concept_scores for r in res] == [[0.0], [0.001], [-0.005]]
    assert [r.nsfw for r in res] == [False, True, False]  # 0.0004 over the threshold rounds to 0: passes


def test_special_care_adds_001_to_later_scores():
    quiet = score_concepts([[0.0, 0.0, 0.0]], [[0.2954]], [0.5] * 3, [0.3])[0]
    loud = score_concepts([[0.0, 0.52, 0.0]], [[0.2954]], [0.5] * 3, [0.3])[0]
    assert quiet.special_care == [] and not quiet.nsfw
    assert loud.special_scores == [-0.5, 0.02, -0.49]  # the special concept after the hit is raised too
    assert loud.special_care == [1] and loud.concept_scores == [0.005] and loud.nsfw and loud.bad_concepts == [0]
    chain = score_concepts([[0.51, 0.495, 0.0]], [[0.0]], [0.5] * 3, [0.3])[0]
    assert chain.special_scores == [0.01, 0.005, -0.49] and chain.special_care == [0, 1]


# -- release folder ------------------------------------------------------------------------------


def test_missing_folder_names_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        SafetyChecker.from_folder(tmp_path / "nowhere")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "config.json" in msg and "pytorch_model.bin" in msg
    assert "CompVis/stable-diffusion-safety-checker" in msg
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        SafetyChecker.from_folder(tmp_path / "half")


def test_wrong_weights_are_reported(tmp_path):
    sd = _random_state_dict()
    del sd["vision_model.vision_model.post_layernorm.bias"]
    sd["vision_model.vision_model.extra.weight"] = torch.zeros(1)
    folder = _write_folder(tmp_path / "bad", sd)
    with pytest.raises(ValueError, match="post_layernorm.bias.*extra.weight"):
        SafetyChecker.from_folder(folder)


def test_key_layout_is_the_release_layout(tiny_folder):
    checker = SafetyChecker.from_folder(tiny_folder)
    expected = ["vision_model.vision_model." + k for k in _vision_keys(2)]
    expected += ["visual_projection.weight", "concept_embeds", "special_care_embeds", "concept_embeds_weights",
                 "special_care_embeds_weights"]
    assert sorted(checker.state_dict()) == sorted(expected)  # position_ids is read from the file, not kept
    assert checker.dtype == torch.float32 and checker.device.type == "cpu"


def test_flags_the_matching_image_only(tmp_path, tiny_folder):
    images = _images()
    checker = SafetyChecker.from_folder(tiny_folder)
    emb = F.normalize(checker.image_embeds(checker.preprocess(images)).double(), dim=-1)
    a, b = emb
    assert abs(float(a @ b)) < 0.99, "test images embed too alike to separate"
    # A concept direction that A shares and B does not: A's component orthogonal to B.
    concept = a - (a @ b) * b
    cos_a = float(F.normalize(concept, dim=0) @ a)

    sd = _random_state_dict()
    sd["concept_embeds"][4] = concept.float()
    sd["concept_embeds_weights"][4] = cos_a / 2
    checker = SafetyChecker.from_folder(_write_folder(tmp_path / "flag", sd))
    assert checker.check(images) == [True, False]
    scores = checker.scores(images)
    assert scores[0].bad_concepts == [4] and scores[0].concept_scores[4] == pytest.approx(round(cos_a / 2, 3), abs=1e-3)
    assert scores[1].concept_scores[4] == pytest.approx(round(-cos_a / 2, 3), abs=1e-3)
    # uint8 arrays [N, H, W, 3] give the same decision as PIL images
    assert checker.check(np.asarray(images[1])[None]) == [False]
    out, flags = checker.filter_images(images)
    assert flags == [True, False] and out[1] is images[1] and out[0].size == images[0].size

    # Special care: A's concept score sits 0.005 under its threshold, so it passes alone...
    sd["concept_embeds_weights"][4] = cos_a + 0.005
    checker = SafetyChecker.from_folder(_write_folder(tmp_path / "near", sd, "model.safetensors"))
    assert checker.check(images) == [False, False]
    # ...and is flagged once a special-care concept fires for A (+0.01); B fires none.
    sd["special_care_embeds"][2] = concept.float()
    sd["special_care_embeds_weights"][2] = 0.0
    checker = SafetyChecker.from_folder(_write_folder(tmp_path / "special", sd))
    scores = checker.scores(images)
    assert [s.special_care for s in scores] == [[2], []]
    assert [s.nsfw for s in scores] == [True, False]


def test_rejects_float_arrays(tiny_folder):
    checker = SafetyChecker.from_folder(tiny_folder)
    with pytest.raises(ValueError, match="uint8"):
        checker.check(np.zeros((1, 64, 64, 3), dtype=np.float32))
    assert checker.check([]) == []


# -- preprocessing and vision tower against transformers ------------------------------------------


def test_preprocess_matches_transformers_pil_processor(tiny_folder):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    checker = SafetyChecker.from_folder(tiny_folder)
    hf = CLIPImageProcessorPil()
    for image in _images() + [Image.new("RGB", (512, 512), (10, 200, 30))]:
        ours = checker.preprocess([image])
        theirs = torch.as_tensor(np.asarray(hf(images=image, return_tensors="np")["pixel_values"]))
        assert ours.shape == theirs.shape == (1, 3, 224, 224)
        assert (ours - theirs).abs().max().item() < 1e-5


def test_vision_tower_matches_transformers():
    from transformers import CLIPVisionConfig as HFConfig
    from transformers import CLIPVisionModel as HFModel

    cfg = CLIPVisionConfig.from_dict(TINY_VISION)
    ours = CLIPVisionModel(cfg).eval()
    sd = {k[len("vision_model."):]: v for k, v in _random_state_dict().items() if k.startswith("vision_model.")}
    ours.load_state_dict(sd, strict=True)  # the file's position_ids is accepted and dropped
    hf = HFModel(HFConfig(**vars(cfg), attn_implementation="eager")).eval()
    hf_sd = {k.removeprefix("vision_model."): v for k, v in sd.items() if not k.endswith("position_ids")}
    if any(k.startswith("vision_model.") for k in hf.state_dict()):  # transformers 4.x layout
        hf_sd = {"vision_model." + k: v for k, v in hf_sd.items()}
    hf.load_state_dict(hf_sd, strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine, theirs = ours(x), hf(pixel_values=x)
    assert rel_err(mine.last_hidden_state, theirs.last_hidden_state) < 1e-5
    assert rel_err(mine.pooler_output, theirs.pooler_output) < 1e-5


def test_full_size_builds_on_meta_with_release_shapes():
    with torch.device("meta"):
        checker = SafetyChecker()
    sd = checker.state_dict()
    assert sd["visual_projection.weight"].shape == (768, 1024)
    assert sd["concept_embeds"].shape == (17, 768) and sd["special_care_embeds_weights"].shape == (3,)
    assert sd["vision_model.vision_model.embeddings.position_embedding.weight"].shape == (257, 1024)
    assert sd["vision_model.vision_model.embeddings.patch_embedding.weight"].shape == (1024, 3, 14, 14)
    assert len(sd) == 5 + 5 + 24 * 16 + 2  # 5 checker tensors, embeddings + pre norm, 24 blocks, post norm


# -- placeholder ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(512, 512), (640, 384), (20, 12)])
def test_placeholder_image(size):
    image = placeholder_image(*size)
    assert image.mode == "RGB" and image.size == size
    pixels = np.asarray(image, dtype=np.float64)
    assert 90 < pixels.mean() < 150  # a neutral grey, not black and not the original
    assert np.array_equal(pixels, np.asarray(placeholder_image(*size)))
    with pytest.raises(ValueError):
        placeholder_image(0, 10)
