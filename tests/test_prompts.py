"""Prompts: the A1111 syntax, long prompts as 75-token windows, weights with the mean restored.

Ground truth: A1111's own doctests of ``parse_prompt_attention`` (its published expected runs),
the emphasis formula ``z *= w; z *= mean(z_before) / mean(z_after)`` worked out by hand below,
the reference encoder (``get_learned_conditioning``) for prompts that fit one window, and the
demo model end to end.
"""
from __future__ import annotations

import pytest
import torch

from ldm.errors import UserInputError
from ldm.modules.encoders.tokenizer import OPEN_CLIP, CLIPTokenizer
from ldm.prompts.parser import BREAK, Run, extract_lora_tags, parse_prompt, parse_prompt_attention
from ldm.prompts.windows import apply_weights, build_windows, encode_prompts
from tests.helpers import DEMO_CONFIG, DEMO_WEIGHTS

FILLER = "a small house next to a tall tree under a blue sky with white clouds and green grass, " * 6


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_folder()


@pytest.fixture(scope="module")
def demo():
    from ldm.generate import StableDiffusion

    return StableDiffusion.from_files(DEMO_CONFIG, DEMO_WEIGHTS, device="cpu", precision="fp32", progress=False,
                                      hash_checkpoint=False)


# -- parser ------------------------------------------------------------------------------------
def _runs(text):
    return [(r.text, round(r.weight, 10)) for r in parse_prompt_attention(text)]


def test_parser_matches_a1111_doctests():
    assert _runs("normal text") == [("normal text", 1.0)]
    assert _runs("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert _runs("(unbalanced") == [("unbalanced", 1.1)]
    assert _runs("\\(literal\\]") == [("(literal]", 1.0)]
    assert _runs("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    assert _runs("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]


def test_parser_weights_breaks_and_plain():
    assert _runs("[red]") == [("red", round(1 / 1.1, 10))]
    assert _runs("((red))") == [("red", 1.21)]
    assert _runs("(red:1.0) circle") == [("red circle", 1.0)]  # merged: exactly the plain prompt
    assert parse_prompt_attention("a BREAK b") == [Run("a", 1.0), BREAK, Run("b", 1.0)]
    assert parse_prompt_attention("(a BREAK b)") == [Run("a", 1.1), BREAK, Run("b", 1.1)]  # A1111 loses it here
    assert parse_prompt("(a:2) BREAK [b]", "plain") == [Run("(a:2) BREAK [b]", 1.0)]
    with pytest.raises(UserInputError, match="not a number"):
        parse_prompt_attention("(red:1.2.3)")


def test_lora_tags_are_taken_out():
    text, tags = extract_lora_tags("a cat <lora:style:0.7>, <lora:other>")
    assert text == "a cat , "
    assert [(t.name, t.weight) for t in tags] == [("style", 0.7), ("other", 1.0)]
    with pytest.raises(UserInputError, match="not a number"):
        extract_lora_tags("<lora:x:abc>")
    with pytest.raises(UserInputError, match="separate text-encoder and UNet weights"):
        extract_lora_tags("<lora:x:1:0.5>")


# -- windows -----------------------------------------------------------------------------------
def test_windows_frame_each_75_tokens(tokenizer):
    ids = tokenizer.encode(FILLER)
    assert 110 < len(ids) < 150
    w = build_windows(tokenizer, [Run(FILLER, 1.0)])
    assert w.ids.shape == (2, 77)
    assert (w.ids[:, 0] == 49406).all()
    first = w.ids[0, 1:-1].tolist()
    # the first window ends after the last comma within 20 tokens of 75 (A1111's backtrack)
    assert first[-1] == tokenizer.encoder[",</w>"] or len(first) == 75
    real = [t for t in first if t != 49407]
    assert real == ids[:len(real)] and 55 <= len(real) <= 75
    rest = [t for t in w.ids[1, 1:].tolist() if t != 49407]
    assert real + rest == ids  # nothing lost, nothing repeated
    assert w.ids[0, -1] == 49407 and w.ids[1, len(rest) + 1] == 49407


def test_break_starts_a_window_and_open_clip_pads_with_zero(tokenizer):
    w = build_windows(tokenizer, parse_prompt("a red circle BREAK a blue square"))
    assert w.ids.shape == (2, 77)
    assert w.ids[0, :5].tolist() == [49406, *tokenizer.encode("a red circle"), 49407]
    oc = CLIPTokenizer.from_folder(dialect=OPEN_CLIP)
    w = build_windows(oc, parse_prompt("a red circle"))
    assert w.ids[0, :5].tolist() == [49406, *oc.encode("a red circle"), 49407]
    assert (w.ids[0, 5:] == 0).all()


def test_weights_golden_numbers():
    # z = [[1, 2], [3, 4]], w = [1, 2]: z*w = [[1, 2], [6, 8]]; means 10/4 and 17/4 -> * 10/17
    z = apply_weights(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(z, torch.tensor([[0.5882353, 1.1764706], [3.5294118, 4.7058824]]))
    ones = torch.ones(3, 2)
    assert apply_weights(ones, torch.ones(3)) is ones  # all weights 1: untouched


class _ConstantEncoder:
    """Features of 1 everywhere: weighted windows then read ``w / mean(w)`` per token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def embed_tokens(self, ids):
        return torch.zeros(*ids.shape, 2)

    def encode_tokens(self, ids, token_embeds=None):
        return torch.ones(*ids.shape, 2)


def test_weights_through_windows(tokenizer):
    enc = _ConstantEncoder(tokenizer)
    w = build_windows(tokenizer, parse_prompt("(red:2) circle"))
    assert len(tokenizer.encode("red")) == len(tokenizer.encode("circle")) == 1
    z = encode_prompts(enc, [w])[0, :, 0]
    # weights [1, 2, 1, ...] over 77 tokens: mean 78/77; red -> 2 * 77/78, the others 77/78
    assert z[1].item() == pytest.approx(1.9743590, abs=1e-6)
    assert z[0].item() == pytest.approx(0.9871795, abs=1e-6) and z[2].item() == pytest.approx(0.9871795, abs=1e-6)
    z = encode_prompts(enc, [build_windows(tokenizer, parse_prompt("[red] circle"))])[0, :, 0]
    # weight 1/1.1 on one token: mean (76 + 1/1.1)/77; red -> (1/1.1) / that
    assert z[1].item() == pytest.approx((1 / 1.1) / ((76 + 1 / 1.1) / 77), abs=1e-6)
    z = encode_prompts(enc, [build_windows(tokenizer, parse_prompt("red")), w], 3)
    assert z.shape == (2, 231, 2)  # padded to the common (and asked) window count


# -- the demo model ----------------------------------------------------------------------------
def test_short_prompt_and_unit_weight_equal_the_reference_encoder(demo):
    ref = demo.model.get_learned_conditioning(["a red circle on a white background"])
    c, uc = demo._text_conditioning(["a red circle on a white background"], [""], 7.5)
    assert torch.equal(c, ref)
    assert torch.equal(uc, demo.model.get_learned_conditioning([""]))
    c1, _ = demo._text_conditioning(["a (red:1.0) circle on a white background"], [""], 7.5)
    assert torch.equal(c1, ref)
    c2, _ = demo._text_conditioning(["a (red:1.3) circle on a white background"], [""], 7.5)
    assert not torch.equal(c2, ref)
    demo.text.syntax = "plain"
    try:
        c3, _ = demo._text_conditioning(["a (red:1.0) circle on a white background"], [""], 7.5)
    finally:
        demo.text.syntax = "a1111"
    assert not torch.equal(c3, ref)  # the brackets are tokens now


def test_cond_and_uncond_get_the_same_window_count(demo):
    c, uc = demo._text_conditioning(["a red circle"], [FILLER + FILLER], 7.5)
    n = c.shape[1] // 77
    assert c.shape == uc.shape and c.shape[1] == 77 * n and n >= 3
    empty = demo.model.get_learned_conditioning([""])
    for i in range(1, n):  # padded with the windows of ""
        assert torch.equal(c[:, 77 * i:77 * (i + 1)], empty)


def test_a_word_after_token_77_changes_the_image(demo):
    tok = demo.model.cond_stage_model.tokenizer
    a, b = FILLER + "a red circle", FILLER + "a blue circle"
    ta, tb = tok.encode(a), tok.encode(b)
    first_diff = next(i for i, (x, y) in enumerate(zip(ta, tb)) if x != y)
    assert first_diff > 77 and len(ta) >= 115
    ia = demo.txt2img(a, 3, steps=8).images[0]
    ib = demo.txt2img(b, 3, steps=8).images[0]
    assert ia.tobytes() != ib.tobytes()
    assert demo.txt2img(a, 3, steps=8).images[0].tobytes() == ia.tobytes()


def test_cross_attention_over_154_tokens_blocked_equals_sdpa():
    import torch.nn.functional as F

    from ldm.ops import attention, settings

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 40, generator=g) for n in (512, 154, 154))
    with torch.no_grad():
        blocked = attention(q, k, v)  # 512 x 154 scores per head: the blocked CPU form where it runs
        with settings(attention="sdpa"):
            ref = attention(q, k, v)
    torch.testing.assert_close(blocked, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref, F.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=1e-6)


def test_open_clip_windows_equal_the_reference_encoder(spec_dir):
    from omegaconf import OmegaConf

    from ldm.checkpoint import instantiate_on_meta, load_weights_into
    from tests.helpers import register_tiny_openclip

    fixtures = spec_dir / "fixtures"
    register_tiny_openclip(fixtures)
    node = OmegaConf.load(fixtures / "sd-v2-v-tiny.yaml").model.params.cond_stage_config
    enc = instantiate_on_meta(node)
    sd = torch.load(fixtures / "sd-v2-v-tiny-random.ckpt", weights_only=True)["state_dict"]
    load_weights_into(enc, {k[17:]: v for k, v in sd.items() if k.startswith("cond_stage_model.")}, assign=True)
    with torch.no_grad():
        ref = enc(["a red circle"])
        got = encode_prompts(enc, [build_windows(enc.tokenizer, parse_prompt("a red circle"))])
        assert torch.equal(got, ref)
        long = encode_prompts(enc, [build_windows(enc.tokenizer, parse_prompt(FILLER + "BREAK a red circle"))])
    assert long.shape[1] == 77 * 3
    torch.testing.assert_close(long[:, 154:], ref)


def test_an_encoder_without_windows_keeps_the_truncation_warning(demo, caplog):
    import logging

    encoder = demo.model.cond_stage_model
    encoder.layer = "pooled"  # one vector per prompt: no windows
    try:
        with caplog.at_level(logging.WARNING, logger="ldm.prompts"):
            c, _ = demo._text_conditioning(["a castle " + "very " * 80 + "tall towers"], [""], 7.5)
    finally:
        encoder.layer = "last"
    assert c.shape[1] == 1
    assert any("77 tokens" in r.getMessage() and "tall towers" in r.getMessage() for r in caplog.records)
