"""Generation parameters stored in output PNGs, in the layout AUTOMATIC1111's web UI uses.

The text goes into a PNG text chunk named ``parameters``, which A1111, ComfyUI, InvokeAI, civitai
and most image viewers for SD outputs read::

    a castle on a hill, oil painting
    Negative prompt: blurry
    Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: sd-v1-4

Line 1 (possibly several lines) is the prompt; the ``Negative prompt:`` line appears only when
there is one; the last line holds ``key: value`` pairs separated by ``", "``. A value containing a
comma, colon or newline is written as a JSON string (``"a, b"``), as A1111 does.

Known limit of the format (A1111 has it too): a prompt line that itself starts with
``Negative prompt:`` is read back as the start of the negative prompt. Leading and trailing spaces
of each prompt line are not kept (the CLIP tokenizer ignores them anyway).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Union

from ldm.errors import UserInputError

__all__ = [
    "PARAMETERS_KEY",
    "format_parameters",
    "parse_parameters",
    "quote",
    "unquote",
    "model_hash",
    "pnginfo",
    "read_parameters",
]

logger = logging.getLogger(__name__)

#: Name of the PNG text chunk.
PARAMETERS_KEY = "parameters"

_NEGATIVE = "Negative prompt:"

# One "key: value" item of the last line. A key starts with a word character and continues with
# word characters, spaces, '-' or '/'; a value is either a JSON string (backslash escapes allowed)
# or anything up to the next comma.
_ITEM = re.compile(
    r"""
    \s*
    (?P<key>\w[\w \-/]+)
    :\s*
    (?P<value>"(?:\\.|[^\\"])+"|[^,]*)
    (?:,|$)
    """,
    re.VERBOSE,
)
_KEY = re.compile(r"\w[\w \-/]*\w")

_STANDARD_KEYS = ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model")


def _to_text(value: Any) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


def quote(value: Any) -> str:
    """Write one value of the parameter line; JSON-quoted when it would break the line apart.

    A1111 quotes values that contain ``,``, ``:`` or a newline. Values that start with a double
    quote or have spaces at either end are quoted as well, so that they read back unchanged.
    """
    text = _to_text(value)
    needs = (
        any(ch in text for ch in ",:\n\r")
        or text.startswith('"')
        or text != text.strip()
    )
    return json.dumps(text, ensure_ascii=False) if needs else text


def unquote(text: str) -> str:
    """Inverse of :func:`quote`: a JSON string is decoded, anything else is returned as it is."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(value, str):
            return value
    return text


def format_parameters(
    prompt: str,
    negative_prompt: str | None,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model_hash: str | None = None,
    model_name: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Build the A1111 ``parameters`` text for one image.

    :param prompt: the prompt of this image (may contain newlines).
    :param negative_prompt: written as a ``Negative prompt:`` line only when non-empty.
    :param steps, sampler, cfg_scale, seed, width, height: written as
        ``Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512``.
    :param model_hash: short hash from :func:`model_hash`; left out when None.
    :param model_name: e.g. the checkpoint's file stem; left out when None.
    :param extra: more items in order, e.g. ``{"Eta": 0.0, "Denoising strength": 0.75,
        "Watermark": "StableDiffusionV1", "Safety checker": "off"}``; None values are left out.
    :returns: the text, without a trailing newline.
    :raises ValueError: for an ``extra`` key that the format cannot carry or that repeats a
        standard key.
    """
    items: dict[str, Any] = {
        "Steps": steps,
        "Sampler": sampler,
        "CFG scale": cfg_scale,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model_name,
    }
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(
                f"parameter name {key!r} cannot be stored: use letters, digits, spaces, '-' or '/', "
                "at least two characters, starting and ending with a letter or digit"
            )
        if key in items or key in ("Prompt", "Negative prompt"):
            raise ValueError(f"parameter {key!r} is written by format_parameters itself; pass it as its argument")
        items[key] = value
    line = ", ".join(f"{k}: {quote(v)}" for k, v in items.items() if v is not None)
    negative = f"\n{_NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def parse_parameters(text: str) -> dict[str, str]:
    """Read a ``parameters`` text (ours or A1111's) back into a dict.

    :returns: ``{"Prompt": ..., "Negative prompt": ..., "Steps": "50", "Sampler": "DDIM",
        "CFG scale": "7.5", "Seed": "42", "Size": "512x512", ...}``. Every value is the string that
        was written (JSON-quoted values are decoded); convert the ones you need. ``"Negative
        prompt"`` is ``""`` when there was none.
    """
    *lines, last = text.strip().split("\n")
    if len(_ITEM.findall(last)) < 3:  # no parameter line: everything is prompt
        lines.append(last)
        last = ""

    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if not in_negative and line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE) :].strip()
        (negative if in_negative else prompt).append(line)

    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for match in _ITEM.finditer(last):
        result[match.group("key")] = unquote(match.group("value"))
    return result


def model_hash(path: Union[str, "os.PathLike[str]"]) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's SHA-256.

    The file is read in 1 MiB chunks (checkpoints are several GB); nothing is cached.

    :raises UserInputError: when the file does not exist or cannot be read.
    """
    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"checkpoint {p}: file not found; check the --ckpt path")
    digest = hashlib.sha256()
    try:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise UserInputError(f"checkpoint {p}: cannot be read ({exc.strerror or exc})") from None
    return digest.hexdigest()[:10]


def pnginfo(text: str):
    """PNG text chunks carrying ``text`` under the key ``parameters``.

    ASCII text goes into a ``tEXt`` chunk; anything else into a UTF-8 ``iTXt`` chunk (``tEXt`` is
    Latin-1 only), so prompts in any script read back unchanged.

    :returns: ``PIL.PngImagePlugin.PngInfo`` for ``image.save(..., pnginfo=...)`` or
        :func:`ldm.image_save.save_numbered`.
    """
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if text.isascii():
        info.add_text(PARAMETERS_KEY, text)
    else:
        info.add_itxt(PARAMETERS_KEY, text)
    return info


def read_parameters(image) -> str | None:
    """The ``parameters`` text of a PNG (a path or an open PIL image), or None when it has none."""
    from PIL import Image

    if isinstance(image, Image.Image):
        value = image.info.get(PARAMETERS_KEY)
        if value is None and hasattr(image, "text"):
            value = image.text.get(PARAMETERS_KEY)  # chunks after the image data
    else:
        with Image.open(image) as im:
            im.load()
            value = im.info.get(PARAMETERS_KEY)
    return None if value is None else str(value)
