"""Print the invisible watermark hidden in an image: ``python scripts/tests/test_watermark.py IMAGE``.

Prints the decoded text: the watermark of the model family that made the image
(``StableDiffusionV1`` for SD v1, ``SDV2`` for SD 2, ``0xB3EC907BB19E`` for SDXL; every text of :data:`ldm.families.FAMILIES` is
tried with its own length), else what 136 bits decode to, or ``null`` when nothing decodes, as the
reference script did. ``--bits N`` decodes exactly N bits. Exit status 2 with a one-line message
when the file cannot be used.
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
    parser.add_argument("--bits", type=int, default=None,
                        help="payload length in bits (default: try every family's watermark, e.g. 136 for "
                             "'StableDiffusionV1', 32 for 'SDV2')")
    args = parser.parse_args(argv)

    from ldm.errors import UserInputError
    from ldm.families import FAMILIES
    from ldm.image_io import load_image
    from ldm.watermark import WATERMARK_BITS, can_hold_watermark, has_watermark, payload_bits, read_watermark

    bits = WATERMARK_BITS if args.bits is None else args.bits
    if bits <= 0 or bits % 8:
        parser.error(f"--bits must be a positive multiple of 8, got {bits}")
    try:
        image = load_image(args.image)
    except UserInputError as exc:
        parser.exit(2, f"error: {exc}\n")
    if not can_hold_watermark(image.width, image.height, bits):
        print(f"note: {args.image} is {image.width}x{image.height}, too small to carry a watermark", file=sys.stderr)
    if args.bits is None:
        for known in dict.fromkeys(f.watermark for f in FAMILIES):
            if can_hold_watermark(image.width, image.height, payload_bits(known)) and has_watermark(image, known):
                print(known)
                return 0
    text = read_watermark(image, bits)
    print("null" if text is None else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
