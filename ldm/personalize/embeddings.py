"""Textual-inversion embeddings, loaded from the files users have, and used by name in prompts.

Formats read (the vectors are the only thing used; the file stem is the name, as in A1111):

- AUTOMATIC1111 / the textual-inversion paper's ``.pt``: ``{"string_to_param": {"*": [n, D]}, ...}``;
- A1111 ``.safetensors`` / ``.pt`` with ``{"emb_params": [n, D]}``;
- diffusers ``learned_embeds.bin`` / ``.safetensors``: ``{"<token>": [D] or [n, D]}``.

Pickles go through the checkpoint reader's weights-only unpickler (no code runs on load). An
SDXL embedding (``clip_l``/``clip_g``) is refused with a line saying so; a vector width that is
not the text encoder's (768 for SD v1, 1024 for SD 2) is one error line when a prompt uses it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from ldm.errors import UserInputError
from ldm.personalize.files import file_sha256, read_tensor_file

__all__ = ["EMBEDDING_SUFFIXES", "Embedding", "EmbeddingLibrary", "load_embedding", "save_embedding"]

log = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
_WIDTHS = {768: "SD v1", 1024: "SD 2", 1280: "SDXL (OpenCLIP bigG)"}


@dataclass
class Embedding:
    """One embedding: ``vectors`` ``[n, D]`` float32 on the CPU; ``hash``: A1111's short hash
    (first 12 hex digits of the file's SHA-256), written as ``TI hashes``."""

    name: str
    vectors: torch.Tensor
    path: Optional[Path] = None
    hash: str = ""

    def vectors_for(self, dim: Optional[int]) -> torch.Tensor:
        """The vectors, checked against the text encoder's width ``dim``."""
        width = self.vectors.shape[-1]
        if dim is not None and width != dim:
            made, model = _WIDTHS.get(width, f"a {width}-wide encoder"), _WIDTHS.get(dim, f"a {dim}-wide encoder")
            raise UserInputError(f"embedding {self.name!r} ({self.path or 'in memory'}) has {width}-wide vectors "
                                 f"(made for {made}) but this model's text encoder is {dim} wide ({model}); use an "
                                 "embedding trained for this model")
        return self.vectors


def _vectors(data: dict, path: Path) -> torch.Tensor:
    if "clip_l" in data or "clip_g" in data:
        raise UserInputError(f"embedding {path} is an SDXL embedding (clip_l/clip_g vectors); it needs an SDXL model")
    if "string_to_param" in data:
        params = dict(data["string_to_param"])
        if len(params) != 1:
            raise UserInputError(f"embedding {path} holds {len(params)} vectors sets in string_to_param; "
                                 "expected one")
        vectors = next(iter(params.values()))
    elif "emb_params" in data:
        vectors = data["emb_params"]
    else:
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            raise UserInputError(f"embedding {path}: unknown layout (keys {sorted(map(str, data))[:5]}); expected "
                                 "A1111's string_to_param / emb_params or diffusers' one {token: vector}")
        vectors = next(iter(tensors.values()))
    if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2) or not vectors.is_floating_point():
        raise UserInputError(f"embedding {path}: the vectors are not a [n, D] float tensor")
    return vectors.detach().float().reshape(-1, vectors.shape[-1]).cpu()


def load_embedding(path: Union[str, "os.PathLike[str]"], name: Optional[str] = None) -> Embedding:
    """Read one embedding file (any format above); ``name`` defaults to the file stem."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"embedding file not found: {path}")
    vectors = _vectors(read_tensor_file(path, "embedding"), path)
    return Embedding(name or path.stem, vectors, path, file_sha256(path)[:12])


def save_embedding(vectors: torch.Tensor, path: Union[str, "os.PathLike[str]"], name: Optional[str] = None) -> Path:
    """Write ``vectors`` ``[n, D]`` in A1111's layout: ``.safetensors`` (``emb_params``) or ``.pt``
    (``string_to_param``, ``string_to_token``, ``name``, ``step``)."""
    path = Path(path)
    vectors = vectors.detach().float().cpu().reshape(-1, vectors.shape[-1]).contiguous()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"emb_params": vectors}, str(path))
    else:
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors},
                    "name": name or path.stem, "step": 0}, path)
    return path


class EmbeddingLibrary:
    """Embeddings by name; a prompt uses one by writing its name (matched on tokens, as A1111)."""

    def __init__(self):
        self.embeddings: dict[str, Embedding] = {}
        self._index: dict = {}

    def __len__(self) -> int:
        return len(self.embeddings)

    def add(self, embedding: Embedding) -> None:
        self.embeddings[embedding.name] = embedding
        self._index.clear()

    def load_dir(self, folder: Union[str, "os.PathLike[str]"]) -> list[str]:
        """Load every embedding file in ``folder`` (subfolders too); :returns: the names loaded."""
        folder = Path(folder)
        if not folder.is_dir():
            raise UserInputError(f"--embeddings {folder}: not a folder; give the folder that holds the .pt / "
                                 ".safetensors / .bin embedding files")
        names = []
        for path in sorted(p for p in folder.rglob("*") if p.suffix in EMBEDDING_SUFFIXES and p.is_file()):
            embedding = load_embedding(path)
            if embedding.name in self.embeddings:
                log.warning("embedding %r from %s replaces the one from %s", embedding.name, path,
                            self.embeddings[embedding.name].path)
            self.add(embedding)
            names.append(embedding.name)
        log.info("loaded %d textual-inversion embedding(s) from %s: %s", len(names), folder, ", ".join(names))
        return names

    def find_at(self, tokens: list, position: int):
        """The embedding whose name's tokens start at ``tokens[position]``, and that token count;
        None when none does (longest name first)."""
        for ids, embedding in self._index.get("by_first", {}).get(tokens[position], ()):
            if tokens[position:position + len(ids)] == ids:
                return embedding, len(ids)
        return None

    def index(self, tokenizer) -> "EmbeddingLibrary":
        """Tokenize the names with ``tokenizer`` (once per tokenizer); :returns: self."""
        if self._index.get("tokenizer") is not tokenizer:
            by_first: dict = {}
            for name, embedding in self.embeddings.items():
                ids = tokenizer.encode(name)
                if ids:
                    by_first.setdefault(ids[0], []).append((ids, embedding))
            for entries in by_first.values():
                entries.sort(key=lambda e: -len(e[0]))
            self._index = {"tokenizer": tokenizer, "by_first": by_first}
        return self
