"""Checks and conversions of what a caller passes to the pipeline: prompts and seeds (one per
image), strengths, masks, padding to the autoencoder's factor. The CLI runs the same checks
before loading a model, with its flag names in the messages."""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
from PIL import Image

from ldm.errors import UserInputError

__all__ = ["as_list", "expand_prompts", "generators_for", "check_strength", "check_level", "binary_mask", "pad_image"]


def as_list(value: Union[str, Sequence[str]], n: int, what: str) -> list:
    """``value`` repeated ``n`` times, or the ``n`` values given; :raises UserInputError: otherwise."""
    if isinstance(value, str):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise UserInputError(f"got {len(value)} {what}s for {n} images; pass one {what} or one per image")
    return value


def expand_prompts(prompts: Union[str, Sequence[str]], seeds: Union[int, Sequence[int]], n=None):
    """Prompts and seeds, one per image: a single prompt is repeated, a single seed counts up.

    :param n: number of images (default: one per prompt, or per seed for a single prompt).
    :returns: ``(prompts, seeds)``, two lists of the same length.
    """
    if n is None:
        n = 1 if isinstance(prompts, str) else len(prompts)
        if isinstance(prompts, str) and not isinstance(seeds, (int, np.integer)):
            n = len(seeds)
    if n < 1:
        raise UserInputError("no images requested; pass at least one prompt")
    prompts = as_list(prompts, n, "prompt")
    if isinstance(seeds, (int, np.integer)):
        seeds = [int(seeds) + k for k in range(n)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != n:
        raise UserInputError(f"got {len(seeds)} seeds for {n} images; pass one seed (counted up per image) or "
                             "one per image")
    return prompts, seeds


def generators_for(seeds: Sequence[int]) -> list:
    """One seeded CPU generator per image."""
    from ldm.devices import seed_generators

    return [seed_generators(int(s), 1)[0] for s in seeds]


def check_strength(strength: float, name: str = "strength") -> None:
    """img2img strength must lie in ``[0, 1]``; ``name`` is how the message calls it (``--strength``)."""
    if not 0.0 <= strength <= 1.0:
        raise UserInputError(f"{name} {strength} is outside [0, 1]; pass a value such as 0.75")


def check_level(level, highest: int, name: str = "noise_level", hint: str = "") -> int:
    """A noise level (x4 upscaler, unCLIP) must be an integer in ``[0, highest]``; :returns: it as
    an int. ``hint`` ends the message (e.g. the default and what the level does)."""
    if isinstance(level, bool) or not float(level).is_integer() or not 0 <= level <= highest:
        raise UserInputError(f"{name} {level} is outside 0..{highest}; pass an integer in that range{hint}")
    return int(level)


def binary_mask(mask: Union[Image.Image, np.ndarray]) -> np.ndarray:
    """``True`` where the mask says repaint: gray level >= 128 (``mask / 255 >= 0.5``, the reference)."""
    a = np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask)
    return a >= 128 if a.dtype == np.uint8 else a >= 0.5


def pad_image(a: np.ndarray, multiple: int) -> np.ndarray:
    """Pad ``[H, W, ...]`` at the bottom and right by repeating the edge, to multiples of ``multiple``."""
    h, w = a.shape[:2]
    widths = [(0, (-h) % multiple), (0, (-w) % multiple)] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, widths, mode="edge") if any(p for _, p in widths) else a
