"""The ``bert-base-uncased`` WordPiece tokenizer, as Hugging Face's ``BertTokenizerFast`` runs it.

The LDM text-to-image models (``BERTEmbedder``) tokenised prompts with
``BertTokenizerFast.from_pretrained("bert-base-uncased")`` called with ``truncation=True,
max_length=77, padding="max_length"``. This module reproduces that pipeline from the vocabulary
file alone (``vocab.txt``: one token per line, id = 0-based line number), without ``transformers``
or ``tokenizers``:

1. special tokens written verbatim in the text (``[CLS]``, ``[SEP]``, ``[PAD]``, ``[MASK]``,
   ``[UNK]``, case-sensitive) are kept whole; the text between them goes through 2-4;
2. normaliser (``BertNormalizer``): drop NUL, U+FFFD and control/format/unassigned/private-use
   characters (except tab, newline, carriage return), map every white-space character to a space,
   put spaces around CJK ideographs, strip accents (NFD, then drop combining marks), lower-case
   (accents are stripped *before* lower-casing, as the Rust implementation does);
3. pre-tokeniser (``BertPreTokenizer``): split on white space and isolate every punctuation
   character (Unicode ``P*`` and all ASCII symbols such as ``$ + < = > ^ ` |``);
4. WordPiece: per word, greedy longest match from the left, continuations prefixed with ``##``;
   a word with a piece that matches nothing, or longer than 100 characters, becomes ``[UNK]``;
5. ``[CLS] tokens [SEP]``, truncated to ``max_length`` (keeping ``[CLS]`` + ``max_length - 2``
   tokens + ``[SEP]``) and padded with ``[PAD]`` (id 0 in bert-base-uncased).

The vocabulary is not part of any LDM checkpoint and nothing is downloaded: see
:data:`DEFAULT_BERT_VOCAB` and :func:`find_bert_vocab`.
"""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence, Union

import torch

from ldm.errors import UserInputError
from ldm.families import get_family
from ldm.modules.encoders.tokenizer import TokenizedBatch

__all__ = ["DEFAULT_BERT_VOCAB", "BERT_VOCAB_ENV", "find_bert_vocab", "WordPieceTokenizer", "basic_tokenize"]

#: Where the bert-base-uncased ``vocab.txt`` is looked for (beside the LAION-400M checkpoint).
DEFAULT_BERT_VOCAB = str(PurePosixPath(get_family("ldm-txt2img").checkpoint).parent / "vocab.txt")
#: Environment variable naming the vocabulary file (``--bert_vocab`` sets it for a script run).
BERT_VOCAB_ENV = "LDM_BERT_VOCAB"

SPECIAL_TOKENS = ("[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]")
MAX_WORD_CHARS = 100  # longer words become [UNK] (WordPiece's max_input_chars_per_word)

# CJK Unified Ideographs blocks (and compatibility ideographs) that get spaces around them
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def find_bert_vocab(path: Union[str, os.PathLike, None] = None) -> Path:
    """The bert-base-uncased vocabulary file: ``path``, else ``$LDM_BERT_VOCAB``, else
    :data:`DEFAULT_BERT_VOCAB` (relative to the working directory).

    :raises UserInputError: naming where to put the file when it is not there.
    """
    given = path or os.environ.get(BERT_VOCAB_ENV) or DEFAULT_BERT_VOCAB
    p = Path(given).expanduser()
    if p.is_file():
        return p
    raise UserInputError(
        f"the BERT text encoder needs the bert-base-uncased vocabulary, and {p} does not exist: vocab.txt "
        "(30522 lines) is not part of the checkpoint and is not downloaded here; put it at "
        f"{DEFAULT_BERT_VOCAB} or pass --bert_vocab PATH")


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def normalize(text: str) -> str:
    """The ``BertNormalizer`` of bert-base-uncased: clean, CJK spacing, accent stripping, lower case."""
    out = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        if ch.isspace():
            out.append(" ")
        elif _is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    stripped = "".join(c for c in unicodedata.normalize("NFD", "".join(out)) if unicodedata.category(c) != "Mn")
    return stripped.lower()


def basic_tokenize(text: str) -> list:
    """Normalised words and punctuation marks of ``text`` (steps 2 and 3 of the module doc)."""
    words = []
    for chunk in normalize(text).split():
        start = 0
        for i, ch in enumerate(chunk):
            if _is_punctuation(ch):
                if i > start:
                    words.append(chunk[start:i])
                words.append(ch)
                start = i + 1
        if start < len(chunk):
            words.append(chunk[start:])
    return words


class WordPieceTokenizer:
    """bert-base-uncased tokenisation to fixed-length id tensors (see the module doc).

    :param vocab_file: ``vocab.txt``, one token per line (line ``i`` is id ``i``).
    :param model_max_length: output length (77 for the LDM models); longer prompts are truncated.
    """

    def __init__(self, vocab_file: Union[str, os.PathLike], model_max_length: int = 77):
        path = Path(vocab_file)
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserInputError(f"BERT vocabulary {path} cannot be read ({exc}); pass the bert-base-uncased "
                                 "vocab.txt with --bert_vocab PATH") from None
        if lines and lines[-1] == "":
            lines.pop()
        self.vocab = {}
        for index, token in enumerate(lines):
            self.vocab[token.rstrip()] = index  # a repeated token keeps its last id (as tokenizers does)
        missing = [t for t in SPECIAL_TOKENS if t not in self.vocab]
        if missing:
            raise UserInputError(f"BERT vocabulary {path} lacks the special token(s) {', '.join(missing)}: it is not "
                                 "a bert-base-uncased vocab.txt; pass that file with --bert_vocab PATH")
        if model_max_length < 2:
            raise ValueError(f"model_max_length must be at least 2 ([CLS] and [SEP]), got {model_max_length}")
        self.path = path
        self.model_max_length = model_max_length
        self.unk_id, self.cls_id = self.vocab["[UNK]"], self.vocab["[CLS]"]
        self.sep_id, self.pad_id = self.vocab["[SEP]"], self.vocab["[PAD]"]
        self.ids_to_tokens = {i: t for t, i in self.vocab.items()}

    def __len__(self) -> int:
        return len(self.vocab)

    def wordpiece(self, word: str) -> list:
        """Pieces of one normalised word: greedy longest match, ``##`` continuations, or ``[UNK]``."""
        if len(word) > MAX_WORD_CHARS:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list:
        """Tokens of ``text`` without ``[CLS]``/``[SEP]``, before truncation."""
        tokens = []
        for part, special in self._split_special(text):
            if special:
                tokens.append(part)
            else:
                for word in basic_tokenize(part):
                    tokens.extend(self.wordpiece(word))
        return tokens

    def _split_special(self, text: str) -> list:
        """``[(text, is_special)]``: verbatim special tokens, leftmost first (longest on a tie)."""
        parts, start, i = [], 0, 0
        while i < len(text):
            match = next((t for t in sorted(SPECIAL_TOKENS, key=len, reverse=True) if text.startswith(t, i)), None)
            if match is None:
                i += 1
                continue
            if i > start:
                parts.append((text[start:i], False))
            parts.append((match, True))
            i = start = i + len(match)
        if start < len(text):
            parts.append((text[start:], False))
        return parts

    def encode(self, text: str) -> tuple:
        """``(ids, length, dropped)``: ``[CLS] ... [SEP]`` padded to ``model_max_length``, the number
        of ids before padding, and the tokens truncation cut off (joined back into words)."""
        tokens = self.tokenize(text)
        keep = self.model_max_length - 2
        dropped = " ".join(tokens[keep:]).replace(" ##", "")
        ids = [self.cls_id] + [self.vocab.get(t, self.unk_id) for t in tokens[:keep]] + [self.sep_id]
        return ids + [self.pad_id] * (self.model_max_length - len(ids)), len(ids), dropped

    def __call__(self, text: Union[str, Sequence[str]], max_length: Optional[int] = None) -> TokenizedBatch:
        """Token ids ``[B, max_length]`` (int64, CPU) of one prompt or a list of prompts."""
        if max_length is not None and max_length != self.model_max_length:
            raise ValueError(f"this tokenizer pads to {self.model_max_length} tokens, got max_length={max_length}")
        texts = [text] if isinstance(text, str) else list(text)
        ids, lengths, dropped = zip(*(self.encode(t) for t in texts)) if texts else ((), (), ())
        return TokenizedBatch(torch.tensor(ids, dtype=torch.int64).reshape(len(texts), self.model_max_length),
                              list(lengths), list(dropped))

    def decode(self, ids: Sequence[int]) -> list:
        """Token strings of ``ids``."""
        return [self.ids_to_tokens.get(int(i), "[UNK]") for i in ids]
