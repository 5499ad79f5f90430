"""SD v1 text encoder: tokenizer files, tokenizer ids, CLIP text tower against the reference.

Ground truth: the reference's recorded ids and features (``parity["tokenizer"]``, ``parity["clip"]``),
the key manifest of the official checkpoint (``sd-v1.tsv``), and ``transformers``' own
``CLIPTextModel`` / fast ``CLIPTokenizer`` built from config (never from the hub).
"""
from __future__ import annotations

import importlib.util
import json
import os
import zlib

import pytest
import torch

from ldm.modules.encoders import modules
from ldm.modules.encoders.clip import CLIPTextConfig, CLIPTextModel
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.modules.encoders.tokenizer import BUNDLED_TOKENIZER_DIR, CLIPTokenizer, bytes_to_unicode
from tests.helpers import REPO, read_manifest, rel_err

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

TINY_TEXT_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
PREFIX = "cond_stage_model."
STRESS_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "Hello, World! 12345 it's   \t COOL",
    "ünïcödé ÇA VA? 日本語のテキスト 🎉🚀",
    "x" * 300,
    "a.b,c;d:e/f\\g",
    "<|endoftext|> foo",
    "Straße façade naïve résumé",
    "  leading and trailing  ",
    "don't won't I'm you're we've they'll she'd",
    "emoji 👩‍👩‍👧 flag 🇯🇵",
]


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_folder()


@pytest.fixture(scope="module")
def tiny_embedder(tiny_ckpt) -> FrozenCLIPEmbedder:
    sd = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    text_sd = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
    model = FrozenCLIPEmbedder(text_config=TINY_TEXT_CONFIG)
    model.load_state_dict(text_sd, strict=True)
    return model


# -- tokenizer files ---------------------------------------------------------------------------


def test_bundled_vocab_layout():
    vocab = json.loads((BUNDLED_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (BUNDLED_TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2" and lines[-1] == ""
    merges = [tuple(line.split(" ")) for line in lines[1:-1]]
    assert len(vocab) == 49408 and len(merges) == 48894
    tokens = sorted(vocab, key=vocab.get)
    assert sorted(vocab.values()) == list(range(49408))
    symbols = list(bytes_to_unicode().values())
    assert tokens[:256] == symbols
    assert tokens[256:512] == [s + "</w>" for s in symbols]
    assert tokens[512:49406] == ["".join(m) for m in merges]
    assert tokens[49406:] == ["<|startoftext|>", "<|endoftext|>"]
    config = json.loads((BUNDLED_TOKENIZER_DIR / "config.json").read_text())
    assert CLIPTextConfig.from_hf_dict(config) == CLIPTextConfig()


def _load_script():
    spec = importlib.util.spec_from_file_location("make_clip_tokenizer", REPO / "scripts" / "make_clip_tokenizer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_regeneration_is_byte_exact():
    script = _load_script()
    source = script.find_bpe_source()
    if source is None or not source.is_file():
        pytest.skip("no bpe_simple_vocab_16e6.txt.gz: set CLIP_BPE_PATH to it (or to an open_clip_torch wheel)")
    files = script.render(*script.build_vocab(script.read_bpe_lines(source)))
    for name, data in files.items():
        committed = (BUNDLED_TOKENIZER_DIR / name).read_bytes()
        assert data == committed, f"{name} differs from what {source} gives (crc {zlib.crc32(data)} vs {zlib.crc32(committed)})"


# -- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_matches_reference_ids(tokenizer, parity):
    ref = parity["tokenizer"]
    batch = tokenizer(ref["prompts"])
    assert len(tokenizer) == 49408
    assert torch.equal(batch.input_ids, ref["input_ids"])
    assert batch.lengths == ref["length"].tolist()


def test_tokenizer_known_prompt(tokenizer):
    ids = tokenizer("a photograph of an astronaut riding a horse").input_ids[0].tolist()
    head = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert ids == head + [49407] * (77 - len(head))
    assert tokenizer("").input_ids[0].tolist() == [49406] + [49407] * 76


def test_truncation_reports_dropped_words(tokenizer, parity):
    long_prompt = parity["tokenizer"]["prompts"][4]
    batch = tokenizer([long_prompt, "a short prompt"])
    assert batch.truncated == [True, False]
    assert batch.dropped[1] == ""
    # 75 tokens fit: the prompt's 8th repetition loses its words from "prompt" on (digits are one token each).
    assert batch.dropped[0].startswith("prompt number 8 with many words a very long prompt number 9")
    assert batch.dropped[0].endswith("prompt number 11 with many words")
    # A word split by truncation is reported whole.
    cut = tokenizer("A Café &amp; CRÈME brûlée!! in 4K", max_length=10)
    assert cut.input_ids[0, -1].item() == 49407 and cut.dropped == ["brûlée!! in 4k"]


def test_tokenizer_matches_transformers_fast_tokenizer(tokenizer):
    # No ftfy in the fast tokenizer: these prompts are ones ftfy leaves alone.
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    merges = (BUNDLED_TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").strip().split("\n")[1:]
    vocab = json.loads((BUNDLED_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    hf = HFCLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])
    assert len(hf) == 49408
    for prompt in STRESS_PROMPTS:
        expected = hf(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert tokenizer(prompt).input_ids[0].tolist() == expected, prompt


# -- text model --------------------------------------------------------------------------------


def test_tiny_model_matches_reference(tiny_embedder, parity):
    ref = parity["clip"]
    with torch.no_grad():
        c = tiny_embedder.encode(ref["prompts"])
        uc = tiny_embedder.encode([""])
        extra = tiny_embedder.encode(ref["extra_prompts"])
        out = tiny_embedder.transformer(tiny_embedder.tokenize(ref["prompts"]).input_ids)
    assert c.shape == (2, 77, 32)
    assert rel_err(c, ref["c"]) < 1e-5
    assert rel_err(uc, ref["uc"]) < 1e-5
    assert rel_err(extra, ref["extra_c"]) < 1e-5
    assert len(out.hidden_states) == len(ref["hidden_states"]) == 3
    for ours, theirs in zip(out.hidden_states, ref["hidden_states"]):
        assert rel_err(ours, theirs) < 1e-5


def test_hidden_layer_selection(tiny_embedder, parity):
    prompts = parity["clip"]["prompts"]
    penultimate = FrozenCLIPEmbedder(layer="hidden", layer_idx=-2, text_config=TINY_TEXT_CONFIG)
    penultimate.load_state_dict(tiny_embedder.state_dict())
    with torch.no_grad():
        h = penultimate(prompts)
    assert rel_err(h, parity["clip"]["hidden_states"][1]) < 1e-5
    with pytest.raises(ValueError, match="layer_idx"):
        FrozenCLIPEmbedder(layer="hidden", text_config=TINY_TEXT_CONFIG)
    with pytest.raises(ValueError, match="layer must be"):
        FrozenCLIPEmbedder(layer="penultimate", text_config=TINY_TEXT_CONFIG)


def test_frozen_and_device_follows_weights(tiny_embedder):
    assert not tiny_embedder.training and not any(p.requires_grad for p in tiny_embedder.parameters())
    assert tiny_embedder.device.type == "cpu" and tiny_embedder.dtype == torch.float32
    half = FrozenCLIPEmbedder(text_config=TINY_TEXT_CONFIG).to(torch.float64)
    assert half("a cat").dtype == torch.float64


def test_position_ids_optional_in_file(tiny_embedder, parity):
    sd = {k: v for k, v in tiny_embedder.state_dict().items() if not k.endswith("position_ids")}
    model = FrozenCLIPEmbedder(text_config=TINY_TEXT_CONFIG)
    model.load_state_dict(sd, strict=True)  # transformers >= 4.31 files lack the buffer
    with torch.no_grad():
        assert rel_err(model(parity["clip"]["prompts"]), parity["clip"]["c"]) < 1e-5


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="nothing is downloaded"):
        FrozenCLIPEmbedder(version="openai/clip-vit-base-patch32")
    with pytest.raises(ValueError, match="unknown CLIPTextConfig field"):
        FrozenCLIPEmbedder(text_config={"hidden_sise": 32})
    with pytest.raises(NotImplementedError, match="FrozenCLIPTextEmbedder"):
        modules.FrozenCLIPTextEmbedder()


def test_full_size_keys_equal_official_layout(spec_dir):
    with torch.device("meta"):
        model = FrozenCLIPEmbedder()
    expected = [(key[len(PREFIX):], shape) for key, shape in read_manifest(spec_dir / "sd-v1.tsv") if key.startswith(PREFIX)]
    got = [(key, tuple(t.shape)) for key, t in model.state_dict().items()]
    assert len(expected) == 197
    assert got == expected


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Deterministic random weights in the style of the reference fixture (norms near 1, small biases)."""
    for i, (name, p) in enumerate(module.named_parameters()):
        r = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed * 1000003 + i))
        with torch.no_grad():
            if "norm" in name:
                p.copy_(1 + 0.1 * r if name.endswith("weight") else 0.1 * r)
            elif "embedding" in name:
                p.copy_(r)
            elif p.ndim >= 2:
                p.copy_(r / p.shape[1] ** 0.5)
            else:
                p.copy_(0.1 * r)


def test_full_size_matches_transformers():
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel as HFModel

    cfg = CLIPTextConfig()
    with torch.device("meta"):  # skip the default init of 123M weights: _randomize sets them all
        ours = CLIPTextModel(cfg).eval()
        hf = HFModel(HFConfig(**vars(cfg), attn_implementation="eager")).eval()
    ours.to_empty(device="cpu")
    ours.text_model.embeddings.position_ids.copy_(torch.arange(77)[None])
    _randomize(ours)
    sd = ours.state_dict()
    hf_keys = set(hf.state_dict())
    if not any(k.startswith("text_model.") for k in hf_keys):  # transformers 5: no text_model level
        sd = {k[len("text_model."):]: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k in hf_keys or not k.endswith("position_ids")}
    hf.load_state_dict(sd, strict=True, assign=True)
    for module in hf.modules():  # non-persistent buffers (position_ids in transformers >= 4.31) stay on meta
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_meta:
                module.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape).clone(), persistent=False)

    ids = CLIPTokenizer.from_folder()(STRESS_PROMPTS[:3]).input_ids
    with torch.no_grad():
        mine = ours(ids)
        theirs = hf(input_ids=ids, output_hidden_states=True)
    assert rel_err(mine.last_hidden_state, theirs.last_hidden_state) < 1e-4
    assert rel_err(mine.pooler_output, theirs.pooler_output) < 1e-4
    assert rel_err(mine.hidden_states[-2], theirs.hidden_states[-2]) < 1e-4
