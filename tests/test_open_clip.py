"""SD 2 text encoder: open_clip tokenizer ids, the OpenCLIP text tower against the reference.

Ground truth: the SD 2 reference's recorded ids and features on the tiny open_clip arch
(``sd-v2-v-tiny-parity.pt``: ``tokenizer``, ``clip``) with the weights of
``sd-v2-v-tiny-random.ckpt``, the key manifests of the official checkpoints (``sd-v2-v.tsv``,
``sd-v2.tsv``, ``sdxl-base.tsv``), and ``open_clip`` itself where it is installed (it is not a
dependency; never used at run time).
"""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import instantiate_on_meta, load_weights_into
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
from ldm.modules.encoders.open_clip import OpenCLIPTextTransformer, open_clip_text_config, register_open_clip_arch
from ldm.modules.encoders.tokenizer import HF_CLIP, OPEN_CLIP, CLIPTokenizer
from tests.helpers import read_manifest, rel_err

TINY_ARCH = "ldmtest-tiny-ViT-H-14"
PREFIX = "cond_stage_model."
TOL = 1e-5


@pytest.fixture(scope="module")
def fixtures(spec_dir):
    return spec_dir / "fixtures"


@pytest.fixture(scope="module")
def v2_parity(fixtures) -> dict:
    parity = torch.load(fixtures / "sd-v2-v-tiny-parity.pt", weights_only=True)
    return {"tokenizer": parity["tokenizer"], "clip": parity["clip"]}


@pytest.fixture(scope="module")
def tiny_arch(fixtures) -> str:
    register_open_clip_arch(TINY_ARCH, json.loads((fixtures / f"{TINY_ARCH}.json").read_text()))
    return TINY_ARCH


@pytest.fixture(scope="module")
def tiny_text_sd(fixtures) -> dict:
    sd = torch.load(fixtures / "sd-v2-v-tiny-random.ckpt", weights_only=True)["state_dict"]
    return {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}


@pytest.fixture(scope="module")
def tiny_encoder(tiny_arch, tiny_text_sd, fixtures) -> FrozenOpenCLIPEmbedder:
    """The fixture config's cond stage, built on meta and loaded strictly through the checkpoint loader."""
    node = OmegaConf.load(fixtures / "sd-v2-v-tiny.yaml").model.params.cond_stage_config
    assert node.target == "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
    model = instantiate_on_meta(node)
    assert model.model.positional_embedding.is_meta
    load_weights_into(model, tiny_text_sd, assign=True)
    return model


@pytest.fixture(scope="module")
def open_clip_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_folder(dialect=OPEN_CLIP)


# -- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_matches_open_clip_ids(open_clip_tokenizer, v2_parity):
    ref = v2_parity["tokenizer"]
    assert len(ref["prompts"]) == 5 and ref["context_length"] == 77
    batch = open_clip_tokenizer(ref["prompts"])
    assert torch.equal(batch.input_ids, ref["input_ids"])
    # The >77-token prompt: truncated, EOT in the last slot; its dropped words are reported.
    assert batch.lengths[2] == 2 and batch.lengths[4] == 77 and batch.input_ids[4, 76] == 49407
    assert batch.truncated == [False, False, False, False, True]
    assert batch.dropped[4].startswith("prompt number 8 with many words")
    assert batch.dropped[4].endswith("prompt number 11 with many words")


def test_open_clip_dialect_against_hf_dialect(open_clip_tokenizer):
    hf = CLIPTokenizer.from_folder()
    assert hf.dialect is HF_CLIP and open_clip_tokenizer.pad_token_id == 0 and hf.pad_token_id == 49407
    prompt = "a photograph of an astronaut riding a horse"
    oc_ids, hf_ids = open_clip_tokenizer(prompt).input_ids[0], hf(prompt).input_ids[0]
    assert torch.equal(oc_ids[:10], hf_ids[:10]) and (oc_ids[10:] == 0).all() and (hf_ids[10:] == 49407).all()

    def ids(tok, text):
        return tok.encode(text)

    # open_clip unescapes HTML twice (ftfy once), also in text that holds a '<' (ftfy then does not).
    assert ids(open_clip_tokenizer, "fish &amp;amp; chips") == ids(hf, "fish & chips")
    assert ids(hf, "fish &amp;amp; chips") == ids(hf, "fish &amp; chips")
    assert ids(open_clip_tokenizer, "a <b> &amp; c") == ids(hf, "a <b> & c")
    assert ids(hf, "a <b> &amp; c") != ids(hf, "a <b> & c")
    # open_clip's special strings are <start_of_text>/<end_of_text>; HF's <|startoftext|>/<|endoftext|>.
    assert ids(open_clip_tokenizer, "x <END_of_text> y") == [*ids(hf, "x"), 49407, *ids(hf, "y")]
    assert 49407 not in ids(open_clip_tokenizer, "x <|endoftext|> y")
    assert ids(hf, "x <|endoftext|> y") == [*ids(hf, "x"), 49407, *ids(hf, "y")]
    with pytest.raises(ValueError, match="open_clip"):
        CLIPTokenizer.from_folder(dialect="openclip")


# -- the tiny reference model ------------------------------------------------------------------


def test_tiny_text_tower_matches_reference(tiny_encoder, v2_parity):
    ref = v2_parity["clip"]
    model = tiny_encoder.model
    # The mask: a non-persistent buffer with the reference's values.
    assert torch.equal(model.attn_mask, ref["attn_mask"]) and "attn_mask" not in model.state_dict()
    ids = tiny_encoder.tokenize(ref["prompts"]).input_ids
    with torch.no_grad():
        states = model.hidden_states(ids)
        c, uc, extra = tiny_encoder.encode(ref["prompts"]), tiny_encoder(""), tiny_encoder(ref["extra_prompts"])
    assert len(states) == len(ref["hidden_states"]) == 4
    errors = {f"hidden_states[{i}]": rel_err(a, b) for i, (a, b) in enumerate(zip(states, ref["hidden_states"]))}
    errors.update(c=rel_err(c, ref["c"]), uc=rel_err(uc, ref["uc"]), extra_c=rel_err(extra, ref["extra_c"]))
    assert c.shape == (2, 77, 32) and uc.shape == (1, 77, 32) and extra.shape == (3, 77, 32)
    assert max(errors.values()) < TOL, errors


def test_tiny_layers(tiny_arch, tiny_text_sd, tiny_encoder, v2_parity):
    ref = v2_parity["clip"]
    assert tiny_encoder.layer == ref["layer"] == "penultimate" and tiny_encoder.layer_idx == ref["layer_idx"] == 1
    last = FrozenOpenCLIPEmbedder(arch=tiny_arch, version=None, layer="last")
    last.load_state_dict(tiny_text_sd, strict=True)
    with torch.no_grad():
        out = last(ref["prompts"])
    assert rel_err(out, ref["c_layer_last"]) < TOL
    assert rel_err(ref["c_layer_last"], ref["c"]) > 0.1  # the two layers really differ
    assert not any(p.requires_grad for p in last.parameters()) and not last.training


# -- full-size layouts -------------------------------------------------------------------------


def _meta_state(arch: str, layer: str = "penultimate") -> dict:
    node = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
            "params": {"arch": arch, "version": "laion2b_s32b_b79k", "layer": layer, "freeze": True}}
    return instantiate_on_meta(OmegaConf.create(node)).state_dict()


@pytest.mark.parametrize("manifest", ["sd-v2-v.tsv", "sd-v2.tsv"])
def test_vit_h_layout_matches_manifest(spec_dir, manifest):
    rows = [(k[len(PREFIX):], s) for k, s in read_manifest(spec_dir / manifest) if k.startswith(PREFIX)]
    assert len(rows) == 294
    state = _meta_state("ViT-H-14")
    assert [(k, tuple(v.shape)) for k, v in state.items()] == rows  # keys, shapes and order
    assert all(v.is_meta for v in state.values())
    # The keys penultimate never uses (last block, text_projection, logit_scale) load strictly.
    with torch.device("meta"):
        model = FrozenOpenCLIPEmbedder(layer="penultimate")
    model.load_state_dict({k: torch.empty(s, device="meta") for k, s in rows}, strict=True, assign=True)


def test_vit_bigg_layout_matches_sdxl_manifest(spec_dir):
    prefix = "conditioner.embedders.1."
    rows = [(k[len(prefix):], s) for k, s in read_manifest(spec_dir / "sdxl-base.tsv") if k.startswith(prefix)]
    assert len(rows) == 390
    assert [(k, tuple(v.shape)) for k, v in _meta_state("ViT-bigG-14").items()] == rows


def test_arch_and_argument_errors(tiny_arch):
    with pytest.raises(ValueError, match=r"unknown OpenCLIP arch 'ViT-X'.*ViT-H-14.*ViT-bigG-14"):
        FrozenOpenCLIPEmbedder(arch="ViT-X")
    with pytest.raises(ValueError, match="layer must be one of"):
        FrozenOpenCLIPEmbedder(arch=tiny_arch, layer="pooled")
    with pytest.raises(ValueError, match="max_length"):
        FrozenOpenCLIPEmbedder(arch=tiny_arch, max_length=64)
    with pytest.raises(ValueError, match="ls_init_value"):
        register_open_clip_arch("bad", {"embed_dim": 8, "text_cfg": {"width": 8, "heads": 2, "layers": 2,
                                                                     "ls_init_value": 1e-5}})
    with pytest.raises(ValueError, match="custom_text"):
        register_open_clip_arch("bad", {"embed_dim": 8, "custom_text": True,
                                        "text_cfg": {"width": 8, "heads": 2, "layers": 2}})
    with pytest.raises(ValueError, match="unknown OpenCLIP arch 'bad'"):
        open_clip_text_config("bad")
    assert open_clip_text_config(tiny_arch).embed_dim == 48 and open_clip_text_config(tiny_arch).act == "gelu"


# -- open_clip as an oracle (only where it is installed) ---------------------------------------


def test_against_open_clip_on_shared_random_weights(open_clip_tokenizer):
    open_clip = pytest.importorskip("open_clip")
    cfg = {"embed_dim": 40, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3}}
    torch.manual_seed(0)
    ref = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]).eval()
    with torch.no_grad():  # open_clip zero-inits nothing here, but make every parameter non-trivial
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = OpenCLIPTextTransformer(register_open_clip_arch("ldmtest-oracle", cfg))
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("visual.")}, strict=True)
    prompts = ["a photograph of an astronaut riding a horse", "", "x " * 100]
    ids = open_clip.tokenize(prompts)
    assert torch.equal(open_clip_tokenizer(prompts).input_ids, ids)
    with torch.no_grad():
        x = ref.token_embedding(ids) + ref.positional_embedding
        batch_first = getattr(ref.transformer, "batch_first", False)  # open_clip >= 2.26
        x = x if batch_first else x.permute(1, 0, 2)
        states = [x]
        for block in ref.transformer.resblocks:
            states.append(block(states[-1], attn_mask=ref.attn_mask))
        states = [s if batch_first else s.permute(1, 0, 2) for s in states]
        for skip in (0, 1):
            assert rel_err(ours(ids, skip_last=skip), ref.ln_final(states[-1 - skip])) < 1e-4
        assert rel_err(ours.hidden_states(ids)[2], states[2]) < 1e-4
