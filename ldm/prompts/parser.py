"""The prompt syntax of AUTOMATIC1111's web UI, the de-facto standard of SD prompts.

- ``(text)`` multiplies the attention weight of ``text`` by 1.1, ``[text]`` divides it by 1.1,
  ``(text:1.3)`` multiplies it by 1.3; brackets nest (``((a))`` is 1.21) and an unclosed bracket
  runs to the end of the prompt (A1111's rule);
- ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literal characters;
- ``BREAK`` (upper case, a word of its own) ends the current 75-token window;
- ``<lora:name:weight>`` (and ``<lora:name>``, weight 1) asks for a LoRA; the tag is removed from
  the text the encoder sees (A1111's "extra networks" syntax).

:func:`parse_prompt_attention` returns A1111's list of ``(text, weight)`` runs, adjacent runs of
equal weight merged (so ``(word:1.0)`` reads exactly as ``word``). With the ``plain`` syntax the
whole prompt is one run of weight 1, brackets and ``BREAK`` included; LoRA tags are read under
both syntaxes.

One difference from A1111: ``BREAK`` inside brackets still breaks (A1111 multiplies the weight of
its marker and then no longer recognises it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from ldm.errors import UserInputError

__all__ = ["SYNTAXES", "BREAK", "Run", "parse_prompt_attention", "parse_prompt", "LoraTag", "extract_lora_tags",
           "parse_lora_spec"]

SYNTAXES = ("a1111", "plain")
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# One lexical item of the syntax (A1111's re_attention): escapes, brackets, a ":weight)" closer,
# plain text, and a lone ":" or "\".
_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(:[^>]*)?>")


class Run(NamedTuple):
    """A piece of prompt text and its attention weight; :data:`BREAK` is the window break."""

    text: str
    weight: float


#: The marker run of ``BREAK`` (A1111 writes it as ``["BREAK", -1]``).
BREAK = Run("BREAK", -1.0)


def parse_prompt_attention(text: str) -> list[Run]:
    """A1111's ``parse_prompt_attention``: the runs of ``text`` and their weights.

    >>> parse_prompt_attention("an (important) word")
    [Run(text='an ', weight=1.0), Run(text='important', weight=1.1), Run(text=' word', weight=1.0)]

    :raises UserInputError: for a weight that is not a number (``(word:1.2.3)``).
    """
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            if run is not _BREAK_ITEM:
                run[1] *= factor

    for match in _ATTENTION.finditer(text):
        item, weight = match.group(0), match.group(1)
        if item.startswith("\\"):
            runs.append([item[1:], 1.0])
        elif item == "(":
            round_open.append(len(runs))
        elif item == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                raise UserInputError(f"prompt weight {weight!r} in {item.strip()!r} is not a number; write e.g. "
                                     "(word:1.3), or escape the brackets as \\( \\)") from None
            multiply_from(round_open.pop(), factor)
        elif item == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif item == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(item)):
                if i:
                    runs.append(_BREAK_ITEM)
                runs.append([part, 1.0])
    for start in round_open:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)
    if not runs:
        runs = [["", 1.0]]
    merged: list[Run] = []
    for run in runs:
        if run is _BREAK_ITEM:
            merged.append(BREAK)
        elif merged and merged[-1] is not BREAK and merged[-1].weight == run[1]:
            merged[-1] = Run(merged[-1].text + run[0], run[1])
        else:
            merged.append(Run(run[0], run[1]))
    return merged


_BREAK_ITEM = ["BREAK", -1.0]  # identity-compared sentinel inside parse_prompt_attention


def parse_prompt(text: str, syntax: str = "a1111") -> list[Run]:
    """The runs of ``text`` under ``syntax`` (``"a1111"`` or ``"plain"``: one run, weight 1)."""
    if syntax not in SYNTAXES:
        raise UserInputError(f"unknown prompt syntax {syntax!r}; use one of {', '.join(SYNTAXES)}")
    return parse_prompt_attention(text) if syntax == "a1111" else [Run(text, 1.0)]


@dataclass(frozen=True)
class LoraTag:
    """``<lora:name:weight>`` of a prompt."""

    name: str
    weight: float


def extract_lora_tags(text: str) -> tuple[str, list[LoraTag]]:
    """``text`` without its ``<lora:name:weight>`` tags, and the tags in order.

    :raises UserInputError: for a weight that is not a number.
    """
    tags = []
    for match in _LORA_TAG.finditer(text):
        name, weight = match.group(1).strip(), (match.group(2) or "1").strip()
        if match.group(3):
            raise UserInputError(f"LoRA tag {match.group(0)!r}: separate text-encoder and UNet weights are not "
                                 f"supported; write one weight, <lora:{name}:{weight}>")
        try:
            tags.append(LoraTag(name, float(weight)))
        except ValueError:
            raise UserInputError(f"LoRA tag {match.group(0)!r}: weight {weight!r} is not a number; write "
                                 f"<lora:{name}:0.8>") from None
    return _LORA_TAG.sub("", text), tags


def parse_lora_spec(spec: str) -> tuple:
    """``PATH[:WEIGHT]`` -> ``(path, weight)`` (a Windows drive letter's colon is part of the path)."""
    path, sep, weight = spec.rpartition(":")
    if sep and path and not (len(path) == 1 and path.isalpha()):
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0
