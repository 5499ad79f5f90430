"""Textual-inversion embeddings: the file formats users have, use by name in prompts, clear errors.

Ground truth: an embedding whose vectors are the token embeddings of some words must encode exactly
as those words (the vectors replace the token lookup, nothing else), in every file format.
"""
from __future__ import annotations

import hashlib

import pytest
import torch

from ldm.errors import UserInputError
from ldm.metadata import parse_parameters
from ldm.personalize.embeddings import EmbeddingLibrary, load_embedding, save_embedding
from tests.helpers import DEMO_CONFIG, DEMO_WEIGHTS


@pytest.fixture(scope="module")
def demo():
    from ldm.generate import StableDiffusion

    return StableDiffusion.from_files(DEMO_CONFIG, DEMO_WEIGHTS, device="cpu", precision="fp32", progress=False,
                                      hash_checkpoint=False)


def _word_vectors(sd, words: str) -> torch.Tensor:
    enc = sd.model.cond_stage_model
    return enc.embed_tokens(torch.tensor([enc.tokenizer.encode(words)]))[0].detach()


def test_round_trip_in_every_format(tmp_path):
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    save_embedding(vectors, tmp_path / "a1111.pt")
    save_embedding(vectors, tmp_path / "a1111.safetensors")
    torch.save({"<cat-toy>": vectors[0]}, tmp_path / "learned_embeds.bin")          # diffusers, one vector
    from safetensors.torch import save_file

    save_file({"<cat-toy>": vectors}, str(tmp_path / "diffusers.safetensors"))
    for name, expected in (("a1111.pt", vectors), ("a1111.safetensors", vectors),
                           ("learned_embeds.bin", vectors[:1]), ("diffusers.safetensors", vectors)):
        e = load_embedding(tmp_path / name)
        assert e.name == name.split(".")[0]
        assert torch.equal(e.vectors, expected), name
        assert e.hash == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()[:12]
    data = torch.load(tmp_path / "a1111.pt", weights_only=True)
    assert set(data) >= {"string_to_param", "string_to_token", "name"}  # A1111's own layout


def test_embedding_encodes_as_the_words_it_stands_for(demo, tmp_path):
    save_embedding(_word_vectors(demo, "red"), tmp_path / "mycolor.pt")
    save_embedding(_word_vectors(demo, "red circle"), tmp_path / "redthing.safetensors")
    demo.text.embeddings = EmbeddingLibrary()
    try:
        assert demo.text.embeddings.load_dir(tmp_path) == ["mycolor", "redthing"]
        ref, _ = demo._text_conditioning(["a red circle on white"], [""], 7.5)
        one, _ = demo._text_conditioning(["a mycolor circle on white"], [""], 7.5)
        multi, _ = demo._text_conditioning(["a redthing on white"], [""], 7.5)
        weighted, _ = demo._text_conditioning(["a (mycolor:1.4) circle on white"], [""], 7.5)
        assert demo.text.extra["TI hashes"].startswith("mycolor: ")
        result = demo.txt2img("a mycolor circle", 1, steps=2)
    finally:
        demo.text.embeddings = EmbeddingLibrary()
    assert torch.equal(one, ref) and torch.equal(multi, ref)
    assert not torch.equal(weighted, ref)
    meta = parse_parameters(result.records[0].parameters())
    assert meta["Prompt"] == "a mycolor circle"
    assert meta["TI hashes"] == "mycolor: " + load_embedding(tmp_path / "mycolor.pt").hash


def test_width_mismatch_and_sdxl_files_are_one_line_errors(demo, tmp_path):
    save_embedding(torch.zeros(2, 768), tmp_path / "sdone.pt")
    demo.text.embeddings = EmbeddingLibrary()
    try:
        demo.text.embeddings.load_dir(tmp_path)
        with pytest.raises(UserInputError, match=r"768-wide vectors \(made for SD v1\).* 32 wide") as err:
            demo._text_conditioning(["a sdone circle"], [""], 7.5)
        assert "\n" not in str(err.value)
    finally:
        demo.text.embeddings = EmbeddingLibrary()
    from safetensors.torch import save_file

    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(UserInputError, match="SDXL embedding"):
        load_embedding(tmp_path / "xl.safetensors")
    with pytest.raises(UserInputError, match="not a folder"):
        EmbeddingLibrary().load_dir(tmp_path / "missing")
