"""Writing images without ever overwriting a file: :func:`save_numbered` (``00000.png``,
``00001.png``, ...) and :func:`save_named` (``name.png``, ``name-1.png``, ...). Each image is
written to a temporary file and then published under its name atomically, so several processes can
write into one folder at once and an interrupted write leaves no partial file."""
from __future__ import annotations

import itertools
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Union

import numpy as np
from PIL import Image

from ldm.errors import UserInputError

if TYPE_CHECKING:  # pragma: no cover
    from PIL.PngImagePlugin import PngInfo

__all__ = ["save_numbered", "save_named", "count_existing"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


def count_existing(folder: PathLike) -> int:
    """Number of files in ``folder`` that count towards the next output number.

    The reference numbered outputs by counting ``os.listdir``: every entry in ``samples/``, and
    every entry but the ``samples`` folder for grids. Counting non-hidden entries that are not
    folders gives the same numbers in that layout, and ignores temporary files being written and
    stray ``.DS_Store`` files.
    """
    n = 0
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    continue
            except OSError:
                continue
            n += 1
    return n


def _format_for(name: str) -> str:
    ext = os.path.splitext(name)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise UserInputError(f"cannot tell the image format of {name!r}; end the file pattern in .png, .jpg or .webp")
    return fmt


def _publish(tmp: str, target: str, state: dict) -> None:
    """Make ``tmp`` appear under ``target`` atomically; FileExistsError if ``target`` exists."""
    if state.get("link", True):
        try:
            os.link(tmp, target)  # fails with EEXIST, never replaces: an atomic O_EXCL create
            return
        except FileExistsError:
            raise
        except (OSError, NotImplementedError, AttributeError) as exc:
            # file systems without hard links (FAT, some network shares): reserve then rename
            logger.debug("os.link not usable in %s (%s); using exclusive create + rename", target, exc)
            state["link"] = False
    with open(target, "xb"):
        pass  # reserves the name (O_CREAT | O_EXCL); FileExistsError when taken
    os.replace(tmp, target)


def save_numbered(
    image: Union[Image.Image, np.ndarray],
    folder: PathLike,
    pattern: str = "{:05}.png",
    pnginfo: "PngInfo | None" = None,
    *,
    start: int | None = None,
) -> Path:
    """Save ``image`` under the next free number in ``folder``, never overwriting a file.

    The first number tried is the count of existing files (:func:`count_existing`), so a fresh
    folder gets ``00000.png``, ``00001.png``, ... as in the reference (grids use
    ``pattern="grid-{:04}.png"``). The image is first written completely to a hidden temporary file
    in the same folder and then hard-linked to the final name, which fails instead of replacing when
    the name exists; on such a collision (another process got there first) the next number is
    tried. A file under a final name is therefore always complete, and two processes writing into
    the same folder never overwrite each other's images.

    :param image: a PIL image or a ``uint8`` array ``[H, W, C]``.
    :param folder: output folder (created when missing).
    :param pattern: ``str.format`` pattern taking the number; its extension picks the format.
    :param pnginfo: PNG text chunks (see :func:`ldm.metadata.pnginfo`); PNG only.
    :param start: first number to try instead of counting the folder.
    :returns: path of the written file.
    """
    try:
        names = {pattern.format(0), pattern.format(1)}
    except (IndexError, KeyError, ValueError) as exc:
        raise UserInputError(f"file pattern {pattern!r} is not valid ({exc}); use one like '{{:05}}.png'") from None
    if len(names) != 2:
        raise UserInputError(f"file pattern {pattern!r} has no number field; use one like '{{:05}}.png'")
    if any(os.sep in n or (os.altsep and os.altsep in n) for n in names):
        raise UserInputError(f"file pattern {pattern!r} must be a file name, not a path; pass the folder separately")
    fmt = _format_for(pattern.format(0))
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    save_kwargs = {}
    if pnginfo is not None:
        if fmt == "PNG":
            save_kwargs["pnginfo"] = pnginfo
        else:
            logger.warning("generation parameters are only embedded in PNG files, not in %s", fmt)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = count_existing(folder) if start is None else int(start)
    return _write_unique(image, folder, (pattern.format(k) for k in itertools.count(n)), fmt, save_kwargs)


def save_named(image: Union[Image.Image, np.ndarray], folder: PathLike, name: str,
               pnginfo: "PngInfo | None" = None) -> Path:
    """Save ``image`` as ``folder/name``, or ``stem-1.ext``, ``stem-2.ext``, ... when that is taken;
    never overwriting a file, and complete under its final name (as :func:`save_numbered`)."""
    if os.sep in name or (os.altsep and os.altsep in name):
        raise UserInputError(f"file name {name!r} must be a name, not a path; pass the folder separately")
    fmt = _format_for(name)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    stem, suffix = os.path.splitext(name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = itertools.chain([name], (f"{stem}-{k}{suffix}" for k in itertools.count(1)))
    return _write_unique(image, folder, names, fmt, {"pnginfo": pnginfo} if pnginfo is not None and fmt == "PNG"
                         else {})


def _write_unique(image: Image.Image, folder: Path, names: Iterator[str], fmt: str, save_kwargs: dict) -> Path:
    """Write ``image`` to a hidden temporary file in ``folder``, then publish it under the first of
    ``names`` that is free (:func:`_publish`: never replaces a file)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt, **save_kwargs)
            f.flush()
            os.fsync(f.fileno())
        state: dict = {}
        while True:
            target = folder / next(names)
            try:
                _publish(tmp, str(target), state)
                return target
            except FileExistsError:
                continue  # taken (maybe by another process a moment ago): the next name
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
