"""Reading the files users bring (embeddings, LoRAs) safely, and their A1111 hashes."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Union

from ldm.errors import UserInputError

__all__ = ["read_tensor_file", "file_sha256"]


def read_tensor_file(path: Path, what: str) -> dict:
    """The top-level dict of a ``.safetensors`` file or of a pickle (through the checkpoint reader's
    weights-only unpickler: no code runs on load); ``what`` names the file in the one-line errors."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserInputError(f"{what} {path}: not a readable safetensors file ({exc})") from None
    from ldm.checkpoint import CheckpointError, load_pickle

    try:
        data = load_pickle(path, "cpu")
    except CheckpointError as exc:
        raise UserInputError(f"{what} {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{what} {path} holds a {type(data).__name__}, not a dict of tensors")
    return data


def file_sha256(path: Union[str, "os.PathLike[str]"], skip_safetensors_header: bool = False) -> str:
    """SHA-256 of a file (hex); with ``skip_safetensors_header`` of the tensor data only (kohya's
    "addnet" hash of a ``.safetensors`` file, which A1111 writes for LoRAs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if skip_safetensors_header:
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
