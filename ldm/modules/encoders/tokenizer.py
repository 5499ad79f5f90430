"""The CLIP byte-level BPE tokenizer, offline and without ``transformers`` or ``open_clip``.

One vocabulary (OpenAI's, 49408 entries) and one BPE serve two front ends, the *dialects*
(:data:`HF_CLIP`, :data:`OPEN_CLIP`). The default, :data:`HF_CLIP`, reproduces what the SD v1
reference got from the *slow* Hugging Face ``CLIPTokenizer`` (transformers 4.19-4.30) called with
``truncation=True, max_length=77, padding="max_length"``:

1. the literal special-token strings ``<|startoftext|>`` / ``<|endoftext|>`` are split out first
   and become their ids;
2. every other piece goes through ``ftfy.fix_text`` (which also unescapes HTML entities such as
   ``&amp;``), whitespace runs collapse to one space, the ends are stripped, and the text is
   lower-cased;
3. the OpenAI CLIP regex cuts words, each word's UTF-8 bytes are mapped to printable symbols and
   merged by byte-level BPE (a word's last symbol carries the ``</w>`` end-of-word marker);
4. the ids become ``[49406] + ids[:75] + [49407]`` and are padded to 77 with **49407**
   (``<|endoftext|>``, not 0 as in ``open_clip.tokenize``).

:data:`OPEN_CLIP` reproduces ``open_clip.tokenize`` (2.x), the SD 2 / SDXL text encoders' tokenizer:
``ftfy.fix_text``, then ``html.unescape`` twice, strip, whitespace collapse (the ``regex`` module's
``\\s``), lower case, all on the whole prompt; the literal strings ``<start_of_text>`` /
``<end_of_text>`` (not ``<|...|>``) become BOS/EOS where the word regex meets them; the same
``[BOS] + ids[:75] + [EOS]`` truncation (open_clip cuts to 77 and forces EOS into the last slot);
padding with **0**.

The vocabulary files (``vocab.json``, ``merges.txt``) live beside this module in
``clip-vit-large-patch14/``; ``scripts/make_clip_tokenizer.py`` regenerates them from OpenAI's
public ``bpe_simple_vocab_16e6.txt.gz``.
"""
from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import ftfy
import regex
import torch

BUNDLED_TOKENIZER_DIR = Path(__file__).resolve().parent / "clip-vit-large-patch14"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
PAD_TOKEN_ID = EOS_TOKEN_ID  # the HF tokenizer the reference used pads with <|endoftext|>
END_OF_WORD = "</w>"

# OpenAI's word splitter after the dialect's two special strings: English contractions, runs of
# letters, single digits, runs of anything that is neither letter, digit nor space.
# Case-insensitive as in the original.
_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_WHITESPACE = re.compile(r"\s+")  # HF's whitespace_clean uses the standard `re` ...
_WHITESPACE_REGEX = regex.compile(r"\s+")  # ... open_clip's the `regex` module (Unicode White_Space)


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-character table of GPT-2/CLIP byte-level BPE.

    Bytes that are already printable Latin-1 characters (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``)
    stand for themselves; the other 68 bytes are given the code points 256, 257, ... in byte
    order. The dict's insertion order (printable bytes first) is the order of the first 256
    vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    """HF ``CLIPTokenizer``: ftfy repair, whitespace collapse and strip, lower case (its order)."""
    return _WHITESPACE.sub(" ", ftfy.fix_text(text)).strip().lower()


def open_clip_clean_text(text: str) -> str:
    """``open_clip.tokenize``: ftfy repair, HTML-unescape twice, strip, whitespace collapse and
    strip, lower case. (ftfy alone unescapes once, and not in text that holds a ``<``.)"""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE_REGEX.sub(" ", text).strip().lower()


@dataclass(frozen=True)
class TextDialect:
    """What a CLIP tokenizer front end does around the shared BPE.

    :ivar bos_text: / :ivar eos_text: the literal strings in a prompt that become BOS / EOS ids.
    :ivar clean: the text cleaning.
    :ivar split_specials_first: cut the special strings out of the raw prompt and clean the pieces
        between them (HF); otherwise clean the whole prompt and let the word regex find them (open_clip).
    :ivar pad_token_id: what fills the row after EOS.
    """

    name: str
    bos_text: str
    eos_text: str
    clean: Callable[[str], str]
    split_specials_first: bool
    pad_token_id: int
    word_pattern: regex.Pattern = field(init=False, repr=False, compare=False)
    special_split: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        specials = "|".join(re.escape(t) for t in (self.bos_text, self.eos_text))
        object.__setattr__(self, "word_pattern", regex.compile(f"{specials}|{_WORDS}", regex.IGNORECASE))
        object.__setattr__(self, "special_split", re.compile(f"({specials})"))


HF_CLIP = TextDialect("transformers", BOS_TOKEN, EOS_TOKEN, clean_text, split_specials_first=True,
                      pad_token_id=PAD_TOKEN_ID)
OPEN_CLIP = TextDialect("open_clip", "<start_of_text>", "<end_of_text>", open_clip_clean_text,
                        split_specials_first=False, pad_token_id=0)
DIALECTS = {d.name: d for d in (HF_CLIP, OPEN_CLIP)}


@dataclass
class TokenizedBatch:
    """Fixed-length token ids for a batch of prompts.

    :ivar input_ids: ``LongTensor [B, max_length]`` (CPU).
    :ivar lengths: number of real tokens per prompt, BOS and EOS included, before padding.
    :ivar dropped: per prompt, the words that truncation cut off, from the first word that lost
        any token to the end (``""`` when nothing was cut); cleaned and lower-cased as the
        tokenizer saw them.
    """

    input_ids: torch.Tensor
    lengths: list[int]
    dropped: list[str]

    @property
    def truncated(self) -> list[bool]:
        return [bool(d) for d in self.dropped]


class CLIPTokenizer:
    """Byte-level BPE tokenizer of OpenAI CLIP (ViT-L/14 vocabulary, also OpenCLIP's).

    :param vocab_file: ``vocab.json`` (token -> id, 49408 entries).
    :param merges_file: ``merges.txt`` (a ``#version`` header line, then one merge per line).
    :param model_max_length: fixed output length, 77 for every CLIP text model.
    :param dialect: :data:`HF_CLIP` (SD v1, the default) or :data:`OPEN_CLIP` (SD 2, SDXL), or its name.
    """

    def __init__(self, vocab_file: str | Path, merges_file: str | Path, model_max_length: int = 77,
                 dialect: TextDialect | str = HF_CLIP):
        if isinstance(dialect, str):
            if dialect not in DIALECTS:
                raise ValueError(f"unknown tokenizer dialect {dialect!r}; known: {sorted(DIALECTS)}")
            dialect = DIALECTS[dialect]
        self.dialect = dialect
        self._special_ids = {dialect.bos_text: BOS_TOKEN_ID, dialect.eos_text: EOS_TOKEN_ID}
        with open(vocab_file, encoding="utf-8") as f:
            self.encoder: dict[str, int] = json.load(f)
        self.decoder = {i: t for t, i in self.encoder.items()}
        lines = Path(merges_file).read_text(encoding="utf-8").strip().split("\n")
        # As the HF loader: skip the header line, and use at most the 48,894 merges that fit the
        # 49408-entry vocabulary (512 byte symbols + merges + 2 special tokens).
        merges = [tuple(line.split()) for line in lines[1 : VOCAB_SIZE - 512 - 2 + 1]]
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.model_max_length = model_max_length
        self._cache: dict[str, str] = {}
        self._check()

    @classmethod
    def from_folder(cls, folder: str | Path | None = None, model_max_length: int = 77,
                    dialect: TextDialect | str = HF_CLIP) -> "CLIPTokenizer":
        """Load ``vocab.json`` and ``merges.txt`` from ``folder`` (default: the bundled ViT-L/14 files)."""
        folder = Path(folder) if folder is not None else BUNDLED_TOKENIZER_DIR
        missing = [n for n in ("vocab.json", "merges.txt") if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"CLIP tokenizer folder {folder} lacks {', '.join(missing)}; "
                "regenerate the bundled files with scripts/make_clip_tokenizer.py"
            )
        return cls(folder / "vocab.json", folder / "merges.txt", model_max_length=model_max_length, dialect=dialect)

    def _check(self) -> None:
        if len(self.encoder) != VOCAB_SIZE:
            raise ValueError(f"CLIP vocab has {len(self.encoder)} entries, expected {VOCAB_SIZE}")
        if self.encoder.get(BOS_TOKEN) != BOS_TOKEN_ID or self.encoder.get(EOS_TOKEN) != EOS_TOKEN_ID:
            raise ValueError(f"CLIP vocab must map {BOS_TOKEN}={BOS_TOKEN_ID} and {EOS_TOKEN}={EOS_TOKEN_ID}")

    def __len__(self) -> int:
        return len(self.encoder)

    @property
    def bos_token_id(self) -> int:
        return BOS_TOKEN_ID

    @property
    def eos_token_id(self) -> int:
        return EOS_TOKEN_ID

    @property
    def pad_token_id(self) -> int:
        return self.dialect.pad_token_id

    # -- BPE -------------------------------------------------------------------------------

    def bpe(self, word: str) -> list[str]:
        """Merge the byte symbols of one (byte-encoded) word; lowest merge rank first."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached.split(" ")
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every non-overlapping occurrence, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = " ".join(symbols)
        return symbols

    def _words(self, text: str) -> tuple[list[list[str]], list[str]]:
        """The BPE tokens of each word of ``text``, and each word's cleaned text to the end.

        ``rest[i]`` is the cleaned prompt from the start of word ``i`` on (what a user would call
        "the words from here"), so truncation can report whole words rather than BPE pieces.
        """
        d = self.dialect
        if d.split_specials_first:
            pieces = [p if p in self._special_ids else d.clean(p) for p in d.special_split.split(text)]
        else:
            pieces = [d.clean(text)]
        cleaned = " ".join(p for p in pieces if p)
        words: list[list[str]] = []
        rest: list[str] = []
        offset = 0
        for piece in pieces:
            if not piece:
                continue
            if piece in self._special_ids:
                words.append([piece])
                rest.append(cleaned[offset:])
            else:
                for match in d.word_pattern.finditer(piece):
                    word = match.group()
                    if word in self._special_ids:  # open_clip's specials; HF's can come out of cleaning
                        words.append([word])
                    else:
                        words.append(self.bpe("".join(self.byte_encoder[b] for b in word.encode("utf-8"))))
                    rest.append(cleaned[offset + match.start() :])
            offset += len(piece) + 1
        return words, rest

    def tokenize(self, text: str) -> list[str]:
        """BPE tokens of ``text`` (no BOS/EOS, no truncation)."""
        return [token for word in self._words(text)[0] for token in word]

    def _id(self, token: str) -> int:
        special = self._special_ids.get(token)
        # EOS is the HF tokenizer's unk token; unreachable with this vocab.
        return special if special is not None else self.encoder.get(token, EOS_TOKEN_ID)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS, truncation or padding."""
        return [self._id(t) for t in self.tokenize(text)]

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``: end-of-word markers become spaces, bytes are decoded as UTF-8."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        tokens = [self.decoder[i] for i in ids]
        if skip_special_tokens:
            tokens = [t for t in tokens if t not in (BOS_TOKEN, EOS_TOKEN)]
        # The </w> marker is a word end, i.e. a space; every other character maps back to a byte.
        out = bytearray()
        for c in "".join(tokens).replace(END_OF_WORD, " "):
            out.extend(b" " if c == " " else bytes([self.byte_decoder[c]]))
        return out.decode("utf-8", errors="replace").strip()

    # -- fixed-length batches ----------------------------------------------------------------

    def __call__(self, text: str | list[str], max_length: int | None = None) -> TokenizedBatch:
        """Tokenize, truncate and pad a prompt or a batch of prompts.

        :param text: one prompt or a list of prompts.
        :param max_length: output length (default ``model_max_length``, 77); at least 2.
        :returns: :class:`TokenizedBatch` with ``input_ids [B, max_length]`` =
            ``[BOS] + ids[: max_length - 2] + [EOS] + [PAD] * ...`` (PAD: the dialect's) and the
            dropped text per prompt.
        """
        prompts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
        max_length = self.model_max_length if max_length is None else max_length
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (room for BOS and EOS), got {max_length}")
        rows, lengths, dropped = [], [], []
        for prompt in prompts:
            words, rest = self._words(prompt)
            ids = [self._id(t) for word in words for t in word]
            room = max_length - 2
            row = [BOS_TOKEN_ID, *ids[:room], EOS_TOKEN_ID]
            lengths.append(len(row))
            rows.append(row + [self.dialect.pad_token_id] * (max_length - len(row)))
            # Report from the start of the word that holds the first dropped token.
            n_tokens, cut_word = 0, None
            for i, word in enumerate(words):
                n_tokens += len(word)
                if n_tokens > room:
                    cut_word = i
                    break
            dropped.append("" if cut_word is None else rest[cut_word])
        return TokenizedBatch(torch.tensor(rows, dtype=torch.long), lengths, dropped)
