"""ldm.metadata: A1111 `parameters` text, model hash, PNG text chunk."""
from __future__ import annotations

import hashlib

import pytest
from PIL import Image

from ldm.errors import UserInputError
from ldm.metadata import (
    format_parameters,
    model_hash,
    parse_parameters,
    pnginfo,
    quote,
    read_parameters,
    unquote,
)

BASE = dict(steps=50, sampler="DDIM", cfg_scale=7.5, seed=42, width=512, height=512,
            model_hash="abcdef1234", model_name="sd-v1-4")


def test_layout_matches_a1111():
    text = format_parameters("a castle on a hill", "blurry", **BASE,
                             extra={"Eta": 0.0, "Watermark": "StableDiffusionV1", "Safety checker": None})
    assert text == (
        "a castle on a hill\n"
        "Negative prompt: blurry\n"
        "Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: abcdef1234, "
        "Model: sd-v1-4, Eta: 0.0, Watermark: StableDiffusionV1"
    )


@pytest.mark.parametrize("negative", ["", None])
def test_no_negative_line_when_empty(negative):
    text = format_parameters("a cat", negative, **{**BASE, "model_hash": None, "model_name": None})
    assert text == "a cat\nSteps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512"
    parsed = parse_parameters(text)
    assert parsed["Negative prompt"] == "" and parsed["Prompt"] == "a cat"
    assert "Model hash" not in parsed


def test_quoting_rules():
    assert quote("DDIM") == "DDIM"
    assert quote(7.5) == "7.5" and quote(True) == "True"
    assert quote("a, b") == '"a, b"'
    assert quote("k: v") == '"k: v"'
    assert quote('say "hi"') == 'say "hi"'  # quotes alone need no quoting (as A1111)
    assert quote('"hi"') == '"\\"hi\\""'  # ... unless the value would look quoted
    assert quote("café, 城") == '"café, 城"'  # no \\u escapes (ensure_ascii=False)
    assert unquote('"a, b"') == "a, b" and unquote("plain") == "plain" and unquote('"broken') == '"broken'


def test_round_trip_with_hard_prompts():
    prompt = 'a "quoted" castle, oil painting: 城堡 — café 🏰\nsecond line, with commas'
    negative = "blurry, low quality\nwatermark: text"
    extra = {
        "Eta": 0.0,
        "Strength": 0.75,
        "Denoising strength": 0.75,
        "Watermark": "StableDiffusionV1",
        "Safety checker": "off",
        "Note": 'say "hi", ok: yes\nnext',
        "Sampler/Schedule": '"q"',
    }
    text = format_parameters(prompt, negative, **{**BASE, "model_name": "sd-v1-4, ema: full"}, extra=extra)
    assert text.count("\n") == 4  # prompt (2 lines), negative (2 lines), one parameter line
    assert text.split("\n")[-1].startswith("Steps: 50, ")
    parsed = parse_parameters(text)
    assert parsed["Prompt"] == prompt
    assert parsed["Negative prompt"] == negative
    assert parsed["Steps"] == "50" and parsed["Sampler"] == "DDIM" and parsed["CFG scale"] == "7.5"
    assert parsed["Seed"] == "42" and parsed["Size"] == "512x512"
    assert parsed["Model hash"] == "abcdef1234" and parsed["Model"] == "sd-v1-4, ema: full"
    for key, value in extra.items():
        assert parsed[key] == str(value), key


def test_parses_a1111_written_text():
    text = (
        "girl with a beret, blue eyes, (detailed:1.2)\n"
        "Negative prompt: ugly, (deformed), bad anatomy\n"
        'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x768, Model hash: 45dee52b, '
        'Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.6.0'
    )
    parsed = parse_parameters(text)
    assert parsed["Prompt"] == "girl with a beret, blue eyes, (detailed:1.2)"
    assert parsed["Negative prompt"] == "ugly, (deformed), bad anatomy"
    assert parsed["Sampler"] == "Euler a" and parsed["Size"] == "512x768"
    assert parsed["Lora hashes"] == "add_detail: 7c6bad76eb54" and parsed["Version"] == "v1.6.0"


def test_text_without_parameter_line_is_all_prompt():
    assert parse_parameters("just a prompt, nothing else") == {
        "Prompt": "just a prompt, nothing else", "Negative prompt": ""}


def test_bad_extra_keys():
    with pytest.raises(ValueError, match="cannot be stored"):
        format_parameters("p", "", **BASE, extra={"bad:key": 1})
    with pytest.raises(ValueError, match="cannot be stored"):
        format_parameters("p", "", **BASE, extra={"x": 1})
    with pytest.raises(ValueError, match="itself"):
        format_parameters("p", "", **BASE, extra={"Seed": 1})


def test_model_hash_is_first_10_hex_of_sha256(tmp_path):
    small = tmp_path / "abc.ckpt"
    small.write_bytes(b"abc")
    assert model_hash(small) == "ba7816bf8f"
    big = tmp_path / "big.ckpt"
    data = bytes(range(256)) * (5 * 4096 + 17)  # > 5 MiB, not a multiple of the chunk size
    big.write_bytes(data)
    assert model_hash(big) == hashlib.sha256(data).hexdigest()[:10]
    with pytest.raises(UserInputError, match="not found"):
        model_hash(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("text, chunk", [
    ("a cat\nSteps: 1, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 8x8", b"tEXtparameters"),
    ("城堡, café 🏰\nSteps: 1, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 8x8", b"iTXtparameters"),
])
def test_png_chunk_round_trip(tmp_path, text, chunk):
    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=pnginfo(text))
    assert chunk in path.read_bytes()
    with Image.open(path) as im:
        assert im.info["parameters"] == text
        assert read_parameters(im) == text
    assert read_parameters(path) == text
    assert parse_parameters(read_parameters(path))["Size"] == "8x8"


def test_png_without_parameters(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    assert read_parameters(path) is None
