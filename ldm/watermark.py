"""The invisible watermark the reference txt2img put into every sample and grid.

``invisible-watermark``'s ``dwtDct`` method hides the bytes of ``"StableDiffusionV1"`` (136 bits)
in the DCT of the Haar-wavelet approximation of the Y and U channels, as
``scripts/txt2img.py`` did with ``WatermarkEncoder``. The library works on BGR arrays (OpenCV
order), so the RGB picture is flipped on the way in and out.

``imwatermark`` and ``cv2`` are imported inside the functions: importing this module is free, and
a missing package only matters when a watermark is actually written or read.

A text of the form ``0x<hex digits>`` is a raw bit message instead, written in ``bits`` mode:
SDXL's fixed 48-bit ``0xB3EC907BB19E`` (:data:`SDXL_WATERMARK`), as sgm's ``embed_watermark``.
"""
from __future__ import annotations

import logging

import numpy as np
from PIL import Image

__all__ = ["WATERMARK_TEXT", "WATERMARK_BITS", "SDXL_WATERMARK", "can_hold_watermark", "add_watermark",
           "read_watermark", "payload_bits", "has_watermark"]

logger = logging.getLogger(__name__)

WATERMARK_TEXT = "StableDiffusionV1"
#: Length of the payload in bits (17 bytes), the ``length`` the decoder needs.
WATERMARK_BITS = 8 * len(WATERMARK_TEXT.encode("utf-8"))  # 136

#: sgm's message for SDXL images (bits mode): 0b101100111110110010010000011110111011000110011110
SDXL_WATERMARK = "0xB3EC907BB19E"


def _bit_message(text: str):
    """The bits of a ``0x<hex>`` message (4 per digit, most significant first), else None."""
    if not text.startswith("0x"):
        return None
    digits = text[2:]
    return [int(b) for b in bin(int(digits, 16))[2:].zfill(4 * len(digits))]


def payload_bits(text: str) -> int:
    """Length in bits of the payload ``text`` (a ``0x`` message: 4 per digit; else 8 per UTF-8 byte)."""
    bits = _bit_message(text)
    return len(bits) if bits is not None else 8 * len(text.encode("utf-8"))


#: ``WatermarkEncoder.encode`` refuses images with fewer pixels than this (its own check).
_MIN_PIXELS = 256 * 256


def can_hold_watermark(width: int, height: int, bits: int = WATERMARK_BITS) -> bool:
    """Whether ``dwtDct`` can embed ``bits`` bits in a ``width`` x ``height`` image.

    The encoder needs at least 256*256 pixels, and every bit needs at least one 4x4 block of the
    half-resolution wavelet band, i.e. ``(h // 8) * (w // 8) >= bits``. So 256x256 works and
    anything with fewer pixels (e.g. 128x128 or 200x300) does not.
    """
    return width * height >= _MIN_PIXELS and (height // 8) * (width // 8) >= bits


def _import():
    try:
        import cv2
        from imwatermark import WatermarkDecoder, WatermarkEncoder
    except ImportError as exc:
        raise ImportError(
            f"the invisible watermark needs the 'invisible-watermark' package ({exc}); "
            "install it with `pip install invisible-watermark`, or turn the watermark off"
        ) from exc
    return cv2, WatermarkEncoder, WatermarkDecoder


def add_watermark(image: Image.Image, text: str = WATERMARK_TEXT) -> tuple[Image.Image, bool]:
    """Embed ``text`` with ``dwtDct``, exactly as the reference ``put_watermark``.

    :param image: an RGB picture (other modes are converted to RGB first).
    :param text: the payload; the reference used :data:`WATERMARK_TEXT`.
    :returns: ``(watermarked RGB image, True)``, or ``(image unchanged, False)`` when the image is
        too small to hold it (see :func:`can_hold_watermark`); the caller should log that once and
        record it (e.g. ``Watermark: none`` in the PNG parameters).
    """
    if not can_hold_watermark(image.width, image.height, payload_bits(text)):
        return image, False
    cv2, WatermarkEncoder, _ = _import()
    encoder = WatermarkEncoder()
    bits = _bit_message(text)
    if bits is not None:
        encoder.set_watermark("bits", bits)
    else:
        encoder.set_watermark("bytes", text.encode("utf-8"))
    rgb = np.array(image.convert("RGB") if image.mode != "RGB" else image)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    bgr = encoder.encode(bgr, "dwtDct")
    return Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1])), True


def read_watermark(image: Image.Image, length_bits: int = WATERMARK_BITS) -> str | None:
    """Decode a ``dwtDct`` watermark of ``length_bits`` bits (136 = ``"StableDiffusionV1"``).

    :param image: a PIL image (converted to RGB).
    :returns: the decoded text, or None when the image is too small to carry a mark or the decoded
        bytes are not UTF-8 (no watermark, or one destroyed by editing). An unmarked image can
        still decode to some garbage text; compare with :data:`WATERMARK_TEXT` to check for the
        SD mark.
    """
    if not can_hold_watermark(image.width, image.height, length_bits):
        return None
    cv2, _, WatermarkDecoder = _import()
    rgb = np.array(image.convert("RGB") if image.mode != "RGB" else image)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    decoder = WatermarkDecoder("bytes", length_bits)
    payload = decoder.decode(bgr, "dwtDct")
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return None


def has_watermark(image: Image.Image, text: str) -> bool:
    """Whether ``image`` carries the payload ``text`` (a UTF-8 text, or a ``0x`` bit message)."""
    bits = _bit_message(text)
    if bits is None:
        return read_watermark(image, payload_bits(text)) == text
    if not can_hold_watermark(image.width, image.height, len(bits)):
        return False
    cv2, _, WatermarkDecoder = _import()
    bgr = cv2.cvtColor(np.array(image.convert("RGB") if image.mode != "RGB" else image), cv2.COLOR_RGB2BGR)
    return [int(b) for b in WatermarkDecoder("bits", len(bits)).decode(bgr, "dwtDct")] == bits
