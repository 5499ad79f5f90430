"""Personalization training through ``main.py`` (configs/demo/demo-ti-warning.yaml, demo-lora-ring.yaml) on
the bundled demo model, a few steps each: only the intended parameters change, the files are
A1111's formats and load with the inference loaders, and what the loaders do equals what training
computed (the same conditioning for the embedding; the merged LoRA equals the training hooks).
The full runs and their accuracy are in docs/demo-model.md ("Personalization")."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("pytorch_lightning")

import ldm.training.run as run  # noqa: E402
from ldm.checkpoint import load_model_from_config  # noqa: E402
from ldm.data.shapes import ShapesDataset, classify, render  # noqa: E402
from ldm.training.concepts import ConceptDataset, check_concept, classify_concept, render_concept  # noqa: E402
from tests.helpers import DEMO_CONFIG, DEMO_WEIGHTS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TI_CONFIG = REPO / "configs" / "demo" / "demo-ti-warning.yaml"
TI_RING_CONFIG = REPO / "configs" / "demo" / "demo-ti-ring.yaml"
LORA_CONFIG = REPO / "configs" / "demo" / "demo-lora-ring.yaml"
CAPTION = "a red ring on a white background"
WARNING = "a warning on a white background"

pytestmark = pytest.mark.skipif(not DEMO_WEIGHTS.is_file(), reason="models/demo/demo.safetensors missing")


def _train(tmp_path, monkeypatch, config: Path, *overrides: str):
    """Run ``main.py`` for 3 steps (batch 2); returns (exit code, trained module, run directory)."""
    from main import main

    seen = {}

    def recording_train(*args, **kwargs):
        seen["trainer"], seen["module"] = real_train(*args, **kwargs)
        return seen["trainer"], seen["module"]

    real_train = run.train
    monkeypatch.setattr(run, "train", recording_train)
    monkeypatch.chdir(REPO)
    code = main(["--base", str(config), "-t", "--logdir", str(tmp_path), "--max_steps", "3", "--batch_size", "2",
                 "lightning.callbacks.progress_log.params.every_n_steps=1", *overrides])
    runs = sorted(tmp_path.iterdir())
    return code, seen.get("module"), (runs[-1] if runs else None)


def _demo_model():
    return load_model_from_config(OmegaConf.load(DEMO_CONFIG), DEMO_WEIGHTS)


def _assert_base_unchanged(model) -> None:
    fresh = _demo_model().state_dict()
    trained = model.state_dict()
    assert trained.keys() == fresh.keys()
    changed = [k for k in fresh if not torch.equal(trained[k], fresh[k])]
    assert changed == []


# ----------------------------------------------------------------------------- the concept
def test_rings_read_back_as_rings_and_circles_stay_circles():
    for seed in range(12):
        for supersample in (1, 4):
            ring, params = render_concept(("blue", "ring", "yellow"), seed, supersample=supersample)
            got = classify_concept(ring)
            assert got["shape"] == "ring" and got["iou"]["ring"] > 0.8, (seed, got["iou"])
            circle, _ = render(("blue", "circle", "yellow"), seed, supersample=supersample)
            assert classify_concept(circle)["shape"] == "circle"
            assert classify(ring)["shape"] == "circle"  # the plain checker has no ring template
            # same random draws: the ring sits in the circle's box, with the background in its middle
            x0, y0, x1, y1 = params["box"]
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            assert tuple(ring[cy, cx]) == (250, 230, 20) and tuple(circle[cy, cx]) == (30, 60, 220)
    assert check_concept(ring, "a blue ring on a yellow background") == {
        "background": True, "shape_colour": True, "shape": True, "all": True}
    assert check_concept(circle, "a blue ring on a yellow background")["all"] is False


def test_concept_dataset_is_a_handful_of_images_repeated():
    ds = ConceptDataset([["red", "ring", "white"], ["green", "square", "black"]], n_images=3, length=10, seed=1)
    assert len(ds) == 10
    assert [ds[i]["caption"] for i in range(4)] == [CAPTION, "a green square on a black background", CAPTION, CAPTION]
    np.testing.assert_array_equal(ds[0]["image"], ds[3]["image"])
    assert not np.array_equal(ds[0]["image"], ds[2]["image"])  # image 2: the first combo, other draws
    assert ds[0]["image"].dtype == np.float32 and ds[0]["image"].min() >= -1 and ds[0]["image"].max() <= 1
    with pytest.raises(ValueError, match="unknown shape 'star'"):
        ConceptDataset([["red", "star", "white"]])
    mixed = ConceptDataset([["red", "ring", "white"]], length=6, seed=1, base_every=3)  # prior preservation
    base = ShapesDataset("train", length=6, seed=1)
    assert [mixed[i]["caption"] for i in range(6)] == [CAPTION, CAPTION, base[2]["caption"], CAPTION, CAPTION,
                                                       base[5]["caption"]]
    np.testing.assert_array_equal(mixed[5]["image"], base[5]["image"])
    named = ConceptDataset([["yellow", "triangle", "blue"]], caption="a warning on a {background} background")
    assert named[0]["caption"] == "a warning on a blue background"
    with pytest.raises(ValueError, match="caption template"):
        ConceptDataset([["yellow", "triangle", "blue"]], caption="a {colour} thing")


# ----------------------------------------------------------------------------- textual inversion
def test_textual_inversion_trains_the_vectors_only_and_the_file_loads(tmp_path, monkeypatch):
    from ldm.personalize.embeddings import load_embedding
    from ldm.prompts.conditioner import TextConditioner

    code, module, rundir = _train(tmp_path, monkeypatch, TI_CONFIG)
    assert code == 0
    _assert_base_unchanged(module.model)
    ckpt = torch.load(rundir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert list(ckpt["state_dict"]) == ["vectors"]  # the checkpoint holds the trained vectors only

    path = rundir / "embeddings" / "warning.safetensors"
    embedding = load_embedding(path)
    assert embedding.name == "warning" and embedding.vectors.shape == (2, 32)
    torch.testing.assert_close(embedding.vectors, module.vectors.detach(), rtol=0, atol=0)
    encoder = module.model.cond_stage_model
    start = encoder.embed_tokens(torch.tensor([encoder.tokenizer.encode("triangle") * 2]))[0]  # init_word, twice
    assert (embedding.vectors - start).abs().max() > 1e-4  # it moved

    model = _demo_model()  # the inference loader: --embeddings DIR, the word in the prompt
    text = TextConditioner(model).configure(embeddings=path.parent)
    c, _ = text([WARNING], [""], 1.0)
    assert text.extra["TI hashes"].startswith("warning: ")
    with torch.no_grad():
        torch.testing.assert_close(c, module.condition([WARNING]), rtol=1e-6, atol=1e-6)
    plain = TextConditioner(model)([WARNING], [""], 1.0)[0]
    assert (c - plain).abs().max() > 1e-3


# ----------------------------------------------------------------------------- LoRA
def test_lora_trains_adapters_only_and_the_merged_file_equals_training(tmp_path, monkeypatch):
    from ldm.personalize.lora import LoraManager, load_lora

    code, module, rundir = _train(tmp_path, monkeypatch, LORA_CONFIG, "model.base_learning_rate=5e-3")
    assert code == 0
    ckpt = torch.load(rundir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all(k.startswith(("lora_down.", "lora_up.")) for k in ckpt["state_dict"])

    path = rundir / "lora" / "ring-lora.safetensors"
    lora = load_lora(path)
    names = set(lora.layers)
    unet = {n for n in names if n.startswith("lora_unet_")}
    te = {n for n in names if n.startswith("lora_te_text_model_encoder_layers_")}
    # demo UNet: 7 transformer blocks (2 down, mid, 4 up) x 2 attentions x q/k/v/out; text encoder: 2 layers x 4
    assert len(unet) == 56 and len(te) == 8 and names == unet | te
    assert all("_attn" in n and "input_blocks" not in n for n in unet)
    assert all(float(layer.up.abs().max()) > 0 for layer in lora.layers.values())  # every up moved from 0

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    with torch.no_grad():
        hooked = module.model.apply_model(x, t, module.model.get_learned_conditioning([CAPTION] * 2))
        module.remove_hooks()
        _assert_base_unchanged(module.model)
        model = _demo_model()
        base = model.apply_model(x, t, model.get_learned_conditioning([CAPTION] * 2))
        manager = LoraManager(model)
        manager.apply([(manager.load(path), 1.0)])  # what --lora PATH does
        assert manager.load(path).unmatched == []
        merged = model.apply_model(x, t, model.get_learned_conditioning([CAPTION] * 2))
    assert (hooked - base).abs().max() > 1e-3
    torch.testing.assert_close(merged, hooked, rtol=1e-5, atol=1e-5)


def test_lora_targets_matching_nothing_is_one_error_line(tmp_path, monkeypatch, capsys):
    code, module, _ = _train(tmp_path, monkeypatch, LORA_CONFIG, "model.params.targets=[nothing_like_this]")
    assert code == 2 and module is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: model.params.targets ['nothing_like_this'] match no layer")


def test_an_embedding_word_no_caption_uses_is_one_error_line(tmp_path, monkeypatch, capsys):
    code, module, _ = _train(tmp_path, monkeypatch, TI_RING_CONFIG, "model.params.name=hexagon")
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no training caption uses the word 'hexagon' (e.g. 'a ")


def test_the_bundled_example_files_load_with_the_loaders():
    """models/demo/personalization/: the files of the measured runs (docs/demo-model.md)."""
    from ldm.personalize.embeddings import EmbeddingLibrary
    from ldm.personalize.lora import LoraManager

    folder = REPO / "models" / "demo" / "personalization"
    library = EmbeddingLibrary()
    assert library.load_dir(folder / "embeddings") == ["warning"]
    assert library.embeddings["warning"].vectors.shape == (2, 32)
    model = _demo_model()
    manager = LoraManager(model)
    lora = manager.load(folder / "lora" / "ring-lora.safetensors")
    assert len(lora.layers) == 64 and lora.unmatched == []
    assert {layer.alpha for layer in lora.layers.values()} == {4.0}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    manager.apply([(lora, 1.0)])
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert len(changed) == 64 and all(k.endswith("weight") and ("attn" in k or "self_attn" in k) for k in changed)
    manager.restore()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
