"""Reading input images and masks, converting between images and tensors, and writing results.

Everything a script needs between the user's files and the model:

* :func:`load_image` / :func:`load_mask` open any file PIL can read (any colour mode, 16-bit,
  EXIF-rotated) and turn every failure into a one-line :class:`~ldm.errors.UserInputError`.
* :func:`resize_to_multiple`, :func:`image_to_tensor`, :func:`tensor_to_uint8` do what the
  reference ``img2img.py`` / ``txt2img.py`` did, with the same numbers.
* :func:`make_grid` replaces ``torchvision.utils.make_grid`` (torchvision is not a dependency).
* :func:`save_numbered` / :func:`save_named` (:mod:`ldm.image_save`) write ``00000.png``,
  ``00001.png``, ... without ever overwriting a file, also when several processes write into the
  same folder at once.

torch is imported inside the two tensor functions only, so reading and writing images (for example
in ``scripts/tests/test_watermark.py``) does not pay for importing it.
"""
from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from ldm.errors import UserInputError
from ldm.image_save import count_existing, save_named, save_numbered  # writing; importable from here too

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "UserInputError",
    "load_image",
    "load_mask",
    "to_rgb",
    "resize_to_multiple",
    "image_to_tensor",
    "tensor_to_uint8",
    "make_grid",
    "save_numbered",
    "save_named",
    "count_existing",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: Modes with more than 8 bits per sample; PIL's own ``convert("RGB")`` clips them at 255
#: instead of scaling, which would turn most of a 16-bit image white.
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")

# What PIL raises for unreadable, truncated or malformed files (some plugins use SyntaxError or
# struct.error for broken headers).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)


# --------------------------------------------------------------------------------------------
# Reading


def _has_alpha(image: Image.Image) -> bool:
    """True when the image carries transparency (an alpha band or a tRNS colour key)."""
    if hasattr(image, "has_transparency_data"):  # Pillow >= 10.1
        return bool(image.has_transparency_data)
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _high_bit_to_l(image: Image.Image) -> Image.Image:
    """Scale a 16-bit / 32-bit grayscale image to 8-bit ``L`` (0..65535 -> 0..255)."""
    a = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        # float images: [0, 1] when they look normalised, otherwise taken as 0..255
        scale = 255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0
        a = a * scale
    elif image.mode.startswith("I;16") or (a.size and a.max() > 255):
        # 16-bit samples (PNG/TIFF); mode "I" with values above 255 is taken as 16-bit too
        a = a / 257.0
    a = np.nan_to_num(a, nan=0.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))  # 2-D uint8 -> "L"


def to_rgb(image: Image.Image, background: int = 255) -> Image.Image:
    """Convert an image in any PIL mode to 8-bit ``RGB``.

    :param image: any mode: ``1``, ``L``, ``LA``, ``P`` (with or without transparency), ``RGBA``,
        ``CMYK``, ``YCbCr``, ``I;16`` and the other 16/32-bit grayscale modes, ...
    :param background: gray level (0..255) that transparent pixels are composited onto;
        white (255) for pictures, black (0) for masks (transparent = not painted = keep).
    :returns: a new ``RGB`` image (or ``image`` itself when it already is plain RGB).
    :raises UserInputError: for a colour mode PIL cannot convert to RGB.
    """
    if image.mode in _HIGH_BIT_MODES:
        image = _high_bit_to_l(image)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (background, background, background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise UserInputError(
            f"images in colour mode {image.mode!r} cannot be converted to RGB ({exc}); "
            "save the image as an 8-bit RGB PNG or JPEG"
        ) from None


def _open_rgb(path: PathLike, what: str, background: int) -> Image.Image:
    """Open ``path``, apply its EXIF orientation and return it as RGB; every failure is one line."""
    if path is None or (isinstance(path, str) and not path.strip()):
        raise UserInputError(f"no {what} file given; pass the path of a PNG or JPEG file")
    p = Path(path)
    if not p.exists():
        raise UserInputError(f"{what} {p}: file not found; check the path")
    if p.is_dir():
        raise UserInputError(f"{what} {p}: is a folder, not an image file; pass the path of an image")
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise UserInputError(f"{what} {p}: cannot be read ({exc.strerror or exc})") from None
    if size == 0:
        raise UserInputError(f"{what} {p}: the file is empty (0 bytes); re-export or re-download it")
    try:
        with Image.open(p) as im:
            im.load()
            fmt = im.format
            try:
                im = ImageOps.exif_transpose(im)
            except _DECODE_ERRORS + (KeyError, TypeError) as exc:
                # a damaged EXIF block should not stop the run; the pixels themselves are fine
                logger.warning("%s %s: ignoring unreadable EXIF orientation (%s)", what, p, exc)
            rgb = to_rgb(im, background=background)
            if rgb is im:
                rgb = im.copy()  # detach from the file that the with-block closes
    except UserInputError as exc:
        raise UserInputError(f"{what} {p}: {exc}") from None
    except Image.DecompressionBombError as exc:
        raise UserInputError(f"{what} {p}: refused as too large ({exc}); use a smaller image") from None
    except PermissionError as exc:
        raise UserInputError(f"{what} {p}: cannot be read ({exc.strerror}); check its permissions") from None
    except Image.UnidentifiedImageError:
        raise UserInputError(
            f"{what} {p}: not an image file PIL can read; pass a PNG, JPEG, WebP, BMP or TIFF file"
        ) from None
    except _DECODE_ERRORS as exc:
        raise UserInputError(
            f"{what} {p}: the image data cannot be decoded ({exc}); the file is corrupt or truncated, "
            "re-export it"
        ) from None
    logger.info("loaded %s %s: %dx%d (%s)", what, p, rgb.width, rgb.height, fmt)
    return rgb


def load_image(path: PathLike) -> Image.Image:
    """Read an input picture as 8-bit RGB.

    Transparent pixels are composited onto white, palette and grayscale images are expanded,
    16-bit images are scaled (not clipped) to 8 bits, CMYK is converted, and the EXIF orientation
    is applied (a phone photo comes out the way it is displayed). Multi-frame files give their
    first frame.

    :param path: the image file.
    :returns: a ``PIL.Image`` in mode ``RGB``, at the file's size.
    :raises UserInputError: one line naming the file for a missing, empty, unreadable or
        corrupt file.
    """
    return _open_rgb(path, "image", background=255)


def load_mask(path: PathLike, size: tuple[int, int]) -> Image.Image:
    """Read an inpainting mask as 8-bit grayscale; white (255) marks the pixels to repaint.

    Read as robustly as :func:`load_image`; colour masks become gray with PIL's ``convert("L")``
    (ITU-R 601 luma, as the reference's ``convert("L")``). Transparent pixels count as black
    (keep), so a brush layer saved with transparency works. The mask is not thresholded.

    :param path: the mask file.
    :param size: ``(width, height)`` of the image the mask belongs to (``image.size``).
    :returns: a ``PIL.Image`` in mode ``L`` of exactly ``size``.
    :raises UserInputError: for an unusable file, or when the mask's size differs from ``size``
        (both sizes are named; the mask is never resized silently).
    """
    w, h = _check_size(size)
    mask = _open_rgb(path, "mask", background=0).convert("L")
    if mask.size != (w, h):
        raise UserInputError(
            f"mask {Path(path)} is {mask.width}x{mask.height} pixels but the image is {w}x{h}; "
            f"give a mask of the same size as the image ({w}x{h}, width x height)"
        )
    return mask


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (width, height), got {size!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"size must be positive, got {w}x{h}")
    return w, h


# --------------------------------------------------------------------------------------------
# Between images and tensors


def resize_to_multiple(
    image: Image.Image,
    multiple: int = 32,
    resample: int = Image.Resampling.LANCZOS,
) -> Image.Image:
    """Shrink each side down to a multiple of ``multiple`` pixels, as the reference img2img did.

    The reference used 32 (CompVis ``img2img.py``); runway's inpainting scripts used 64. Any
    multiple of 8 (the autoencoder's factor) works for SD models. Sizes are rounded **down**
    (``w - w % multiple``) and the whole picture is rescaled (no crop). An image that already fits
    is returned unchanged.

    :param image: any PIL image (an RGB picture or an ``L`` mask).
    :param multiple: positive integer.
    :param resample: PIL resampling filter, LANCZOS as in the reference.
    :raises UserInputError: when a side is smaller than ``multiple``.
    """
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise ValueError(f"multiple must be a positive integer such as 8, 32 or 64, got {multiple!r}")
    w, h = image.size
    new_w, new_h = w - w % multiple, h - h % multiple
    if new_w == 0 or new_h == 0:
        raise UserInputError(
            f"the image is {w}x{h} pixels; each side must be at least {multiple} pixels, use a larger image"
        )
    if (new_w, new_h) == (w, h):
        return image
    logger.info("resizing %dx%d to %dx%d (a multiple of %d)", w, h, new_w, new_h, multiple)
    return image.resize((new_w, new_h), resample=resample)


def image_to_tensor(image: Image.Image) -> "torch.Tensor":
    """Turn an RGB picture into the model's pixel input.

    ``x = 2 * (pixels / 255) - 1``, computed in float32 exactly as the reference ``load_img``.

    :param image: a PIL image (converted with :func:`to_rgb` when it is not RGB).
    :returns: float32 tensor ``[1, 3, H, W]`` in ``[-1, 1]`` on the CPU.
    """
    import torch

    if image.mode != "RGB":
        image = to_rgb(image)
    a = np.asarray(image).astype(np.float32) / 255.0  # [H, W, 3]
    t = torch.from_numpy(np.ascontiguousarray(a[None].transpose(0, 3, 1, 2)))  # [1, 3, H, W]
    return 2.0 * t - 1.0


def tensor_to_uint8(x: "torch.Tensor") -> np.ndarray:
    """Turn decoder output into 8-bit pixels the way the reference scripts wrote them.

    ``x01 = clamp((x + 1) / 2, 0, 1)`` then ``(255 * x01).astype(uint8)``: **truncation, not
    rounding** (a value of 254.9 becomes 254), which is what ``txt2img.py``/``img2img.py`` saved.
    The arithmetic runs in float32 (half-precision inputs are upcast first). NaNs, which an fp16
    decoder can produce, become black with a warning.

    :param x: tensor ``[N, 3, H, W]`` (or ``[3, H, W]``) in about ``[-1, 1]``, any device/dtype.
    :returns: ``np.uint8`` array ``[N, H, W, 3]``.
    """
    import torch

    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected decoder output of shape [N, C, H, W], got {tuple(x.shape)}")
    x = x.detach().to(torch.float32)
    x01 = torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0)
    if torch.isnan(x01).any():
        logger.warning(
            "decoded images contain NaN values (written as black); this usually means fp16 overflow, "
            "try --precision fp32 or bf16"
        )
        x01 = torch.nan_to_num(x01, nan=0.0)
    a = x01.cpu().permute(0, 2, 3, 1).numpy()  # [N, H, W, C]
    return (255.0 * a).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Grids


def make_grid(
    images: Union[Sequence[np.ndarray], np.ndarray],
    nrow: int = 8,
    padding: int = 2,
    pad_value: int = 0,
) -> np.ndarray:
    """Lay images out in a grid, as ``torchvision.utils.make_grid`` did for the reference scripts.

    ``nrow`` images per row, filled row-major; a ``padding``-pixel border of ``pad_value`` around
    and between the images. The result is ``(rows * (H + p) + p) x (cols * (W + p) + p)`` with
    ``cols = min(nrow, N)`` and ``rows = ceil(N / cols)``; empty cells in the last row stay
    ``pad_value``. Like torchvision, a single image is returned as it is, without a border.

    :param images: ``N`` arrays ``[H, W, C]`` (uint8, all the same shape) or one array
        ``[N, H, W, C]``.
    :param nrow: images per row (the scripts pass ``n_rows``, default ``n_samples``).
    :returns: ``np.uint8`` array ``[H_grid, W_grid, C]``.
    """
    if isinstance(nrow, bool) or not isinstance(nrow, (int, np.integer)) or nrow < 1:
        raise ValueError(f"nrow must be a positive integer, got {nrow!r}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise ValueError(f"expected images of shape [N, H, W, C], got {images.shape}")
        batch = images
    else:
        arrays = [np.asarray(im) for im in images]
        if not arrays:
            raise ValueError("make_grid needs at least one image")
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"all images in a grid must have the same shape, got {sorted(shapes)}")
        if arrays[0].ndim != 3:
            raise ValueError(f"expected images of shape [H, W, C], got {arrays[0].shape}")
        batch = np.stack(arrays)
    n, h, w, c = batch.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    if n == 1:
        return batch[0].copy()
    cols = min(int(nrow), n)
    rows = -(-n // cols)
    cell_h, cell_w = h + padding, w + padding
    grid = np.full((rows * cell_h + padding, cols * cell_w + padding, c), pad_value, dtype=batch.dtype)
    for k in range(n):
        r, col = divmod(k, cols)
        y, x = r * cell_h + padding, col * cell_w + padding
        grid[y : y + h, x : x + w] = batch[k]
    return grid
