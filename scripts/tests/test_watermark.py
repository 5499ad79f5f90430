"""Print the invisible watermark hidden in an image: ``python scripts/tests/test_watermark.py IMAGE``.

Prints the decoded text (``StableDiffusionV1`` for images written by txt2img with the watermark
on), or ``null`` when nothing decodes, as the reference script did. Exit status 2 with a one-line
message when the file cannot be used.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import ldm  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Decode the dwtDct invisible watermark of an image.")
    parser.add_argument("image", help="image file (PNG, JPEG, ...)")
    parser.add_argument("--bits", type=int, default=None, help="payload length in bits (default 136, 'StableDiffusionV1')")
    args = parser.parse_args(argv)

    from ldm.errors import UserInputError
    from ldm.image_io import load_image
    from ldm.watermark import WATERMARK_BITS, can_hold_watermark, read_watermark

    bits = WATERMARK_BITS if args.bits is None else args.bits
    if bits <= 0 or bits % 8:
        parser.error(f"--bits must be a positive multiple of 8, got {bits}")
    try:
        image = load_image(args.image)
    except UserInputError as exc:
        parser.exit(2, f"error: {exc}\n")
    if not can_hold_watermark(image.width, image.height, bits):
        print(f"note: {args.image} is {image.width}x{image.height}, too small to carry a watermark", file=sys.stderr)
    text = read_watermark(image, bits)
    print("null" if text is None else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
