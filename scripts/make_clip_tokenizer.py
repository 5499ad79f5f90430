"""Regenerate the bundled CLIP tokenizer files from OpenAI's public BPE merge list.

Writes ``vocab.json`` and ``merges.txt`` (OpenAI / Hugging Face layout) into
``ldm/modules/encoders/clip-vit-large-patch14/``:

- ids 0-255: the 256 byte symbols, 256-511: the same with ``</w>``, 512-49405: one entry per merge
  (48,894 merges, in rank order), 49406 ``<|startoftext|>``, 49407 ``<|endoftext|>``;
- ``merges.txt``: a ``#version: 0.2`` header line, then one ``left right`` merge per line.

The source is ``bpe_simple_vocab_16e6.txt.gz``, shipped by PyPI packages such as
``open_clip_torch`` (``open_clip/``) and ``openai-clip`` (``clip/``). Give its path, or the path of
such a wheel, as the argument; without one the script looks at ``$CLIP_BPE_PATH`` and then at the
installed ``open_clip`` / ``clip`` packages.

    python scripts/make_clip_tokenizer.py [PATH_TO_GZ_OR_WHEEL] [--out FOLDER] [--check]
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import logging
import os
import sys
import zipfile
from pathlib import Path

from ldm.modules.encoders.tokenizer import (
    BOS_TOKEN,
    BUNDLED_TOKENIZER_DIR,
    END_OF_WORD,
    EOS_TOKEN,
    VOCAB_SIZE,
    bytes_to_unicode,
)

log = logging.getLogger("make_clip_tokenizer")

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894
MERGES_HEADER = "#version: 0.2"


def find_bpe_source(explicit: str | Path | None = None) -> Path | None:
    """Where to read the BPE list from: the argument, ``$CLIP_BPE_PATH``, or an installed package."""
    if explicit:
        return Path(explicit)
    if os.environ.get("CLIP_BPE_PATH"):
        return Path(os.environ["CLIP_BPE_PATH"])
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)  # locates the package without importing it
        for folder in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(folder) / BPE_NAME
            if candidate.is_file():
                return candidate
    return None


def read_bpe_lines(source: Path) -> list[str]:
    """Lines of the BPE list from a ``.gz`` file, or from a wheel/zip that contains one."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            names = [n for n in wheel.namelist() if n.endswith("/" + BPE_NAME) or n == BPE_NAME]
            if not names:
                raise FileNotFoundError(f"{source} holds no {BPE_NAME}")
            data = wheel.read(names[0])
    else:
        data = source.read_bytes()
    return gzip.decompress(data).decode("utf-8").split("\n")


def build_vocab(lines: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (token -> id) and merge list from the lines of the BPE file.

    The first line is a header; the next 48,894 lines are the merges that CLIP uses (the file
    holds more).
    """
    merges = [tuple(line.split()) for line in lines[1 : 1 + N_MERGES]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"expected {N_MERGES} two-symbol merge lines after the header")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"built {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def render(vocab: dict[str, int], merges: list[tuple[str, str]]) -> dict[str, bytes]:
    """The exact bytes of ``vocab.json`` (id order, UTF-8, 2-space indent) and ``merges.txt``."""
    vocab_text = json.dumps(vocab, ensure_ascii=False, indent=2) + "\n"
    merges_text = "\n".join([MERGES_HEADER, *(f"{a} {b}" for a, b in merges)]) + "\n"
    return {"vocab.json": vocab_text.encode("utf-8"), "merges.txt": merges_text.encode("utf-8")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", help=f"{BPE_NAME}, or a wheel containing it")
    parser.add_argument("--out", default=str(BUNDLED_TOKENIZER_DIR), help="output folder")
    parser.add_argument("--check", action="store_true", help="compare with the files in --out, write nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    source = find_bpe_source(args.source)
    if source is None or not source.is_file():
        print(
            f"error: no {BPE_NAME} found; pass its path (or an open_clip_torch / openai-clip wheel), "
            "set CLIP_BPE_PATH, or install open_clip_torch",
            file=sys.stderr,
        )
        return 2
    files = render(*build_vocab(read_bpe_lines(source)))
    out = Path(args.out)
    if args.check:
        differ = [n for n, data in files.items() if not (out / n).is_file() or (out / n).read_bytes() != data]
        if differ:
            print(f"error: {', '.join(differ)} in {out} differ from what {source} gives", file=sys.stderr)
            return 1
        log.info("%s: vocab.json and merges.txt match %s", out, source)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
        log.info("wrote %s (%d bytes)", out / name, len(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
