"""A concept the demo model has never seen, for personalization training: the **ring**.

The demo model knows 8 colours and 3 shapes (:mod:`ldm.data.shapes`). A new colour cannot be
taught to it by textual inversion or a UNet/text-encoder LoRA: its tiny autoencoder (trained on
the 8 colours only, and frozen by both methods) does not reproduce other colours. A cyan
(20, 200, 210) shape comes back from an encode/decode round trip as about (39, 125, 195), a
blue: 11 of 28 cyan test images read back cyan (docs/demo-model.md has the other colours). New
*shapes* survive it: rings read back as rings in 28 of 28 round trips.

A ring is the dataset's circle (the ellipse inscribed in the shape box) with the concentric
ellipse of half its radii cut out, drawn in the dataset's geometry (side 40-80 % of the image,
4 % margin) and anti-aliasing. It is read back from :func:`ldm.data.shapes.classify`'s shape
mask with one more template: an image shows a ring when the ring template's IoU beats every
template ``classify`` tries (circle, square, four triangles).

Textual inversion cannot teach the frozen model a shape it cannot draw; its demo concept is a new
*word* for an object the model can draw (``warning``: a yellow triangle), captioned through
:class:`ConceptDataset`'s ``caption`` template and checked against ``--expect``.

Usage (after training, see docs/demo-model.md)::

    python -m ldm.training.concepts --config configs/demo/demo-txt2img.yaml --ckpt models/demo/demo.safetensors \
        --prompt "a red ring on a white background" --n 50 [--embeddings DIR] [--lora PATH]
    python -m ldm.training.concepts --prompt "a warning on a white background" \
        --expect "a yellow triangle on a white background" --embeddings DIR
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np
from torch.utils.data import Dataset

from ldm.data.shapes import _CAPTION_RE, COLOURS, SHAPES, Combo, _coverage, classify, compare, render
from ldm.errors import UserInputError

__all__ = ["CONCEPT_SHAPES", "INNER_RADIUS", "render_concept", "ConceptDataset", "classify_concept",
           "check_concept", "evaluate_prompt"]

CONCEPT_SHAPES = ("ring",)
INNER_RADIUS = 0.5  # the hole's radii, as a fraction of the ring's


def _ring_inner(box: tuple) -> tuple:
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 * INNER_RADIUS, (y1 - y0) / 2 * INNER_RADIUS
    return cx - rx, cy - ry, cx + rx, cy + ry


def _check(combo: Sequence[str]) -> tuple:
    if len(combo) != 3:
        raise UserInputError(f"a combination is (shape_colour, shape, background), got {combo!r}")
    colour, shape, background = combo
    for field, value, allowed in (("shape colour", colour, COLOURS), ("shape", shape, SHAPES + CONCEPT_SHAPES),
                                  ("background", background, COLOURS)):
        if value not in allowed:
            raise UserInputError(f"unknown {field} {value!r}; choose one of {', '.join(allowed)}")
    if colour == background:
        raise UserInputError(f"shape colour and background are both {colour!r}; they must differ")
    return colour, shape, background


def render_concept(combo: Sequence[str], rng, size: int = 64, supersample: int = 4):
    """:func:`ldm.data.shapes.render` that also draws rings (same random draws, so a ring sits
    where the circle of the same ``rng`` would)."""
    colour, shape, background = _check(combo)
    if shape not in CONCEPT_SHAPES:
        return render(combo, rng, size, supersample)
    image, params = render((colour, "circle", background), rng, size, supersample)
    cover = _coverage("circle", params["box"], size, supersample) - _coverage(
        "circle", _ring_inner(params["box"]), size, supersample)
    fg = np.array(COLOURS[colour], dtype=np.float32)
    bg = np.array(COLOURS[background], dtype=np.float32)
    image = np.rint(bg + cover[..., None] * (fg - bg)).astype(np.uint8)
    return image, dict(params, shape=shape)


class ConceptDataset(Dataset):
    """A handful of rendered images, repeated: item ``i`` is image ``i % n_images``; image ``k``
    shows ``combos[k % len(combos)]`` drawn with ``np.random.default_rng([seed, k])``. Items are
    ``{image_key: float32 (size, size, 3) in [-1, 1], caption_key: caption}`` as
    :class:`ldm.data.shapes.ShapesDataset`'s.

    :param combos: ``[[shape colour, shape, background], ...]``; shapes may be :data:`CONCEPT_SHAPES`.
    :param n_images: distinct images (default: one per combination).
    :param length: items per epoch.
    :param base_every: when > 0, every ``base_every``-th item is instead item ``i`` of the base
        dataset (:class:`ldm.data.shapes.ShapesDataset`, split ``train``, same seed): a LoRA then
        also sees what the model already draws, so it does not turn every circle into the concept
        (DreamBooth's prior preservation, with the dataset's own images).
    :param caption: the caption template (``str.format`` with ``shape_colour``, ``shape``,
        ``background``); default the dataset's ``"a {shape_colour} {shape} on a {background} background"``.
    """

    def __init__(self, combos: Sequence[Sequence[str]], n_images: Optional[int] = None, length: int = 1000,
                 seed: int = 0, size: int = 64, image_key: str = "image", caption_key: str = "caption",
                 supersample: int = 4, caption: str = "a {shape_colour} {shape} on a {background} background",
                 base_every: int = 0):
        if not combos:
            raise UserInputError("ConceptDataset needs at least one combination in combos")
        self.combos = [_check(list(c)) for c in combos]
        self.n_images = len(self.combos) if n_images is None else int(n_images)
        if self.n_images < 1 or length < 1:
            raise UserInputError(f"n_images and length must be positive, got {n_images!r} and {length!r}")
        self.length, self.seed, self.size, self.supersample = int(length), int(seed), size, supersample
        self.image_key, self.caption_key, self.caption = image_key, caption_key, caption
        self._cache: dict = {}
        self.image(0)  # checks the caption template
        self.base_every = int(base_every)
        self.base = None
        if self.base_every > 0:
            from ldm.data.shapes import ShapesDataset

            self.base = ShapesDataset("train", size, self.length, self.seed, image_key, caption_key, supersample)

    def __len__(self) -> int:
        return self.length

    def image(self, k: int) -> tuple:
        """``(uint8 image, caption)`` of distinct image ``k``."""
        if k not in self._cache:
            combo = self.combos[k % len(self.combos)]
            image, _ = render_concept(combo, np.random.default_rng([self.seed, k]), self.size, self.supersample)
            try:
                text = self.caption.format(**dict(zip(("shape_colour", "shape", "background"), combo)))
            except (KeyError, IndexError, ValueError) as e:
                raise UserInputError(f"caption template {self.caption!r}: {e!r}; it may name {{shape_colour}}, "
                                     "{shape} and {background}") from None
            self._cache[k] = (image, text)
        return self._cache[k]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of length {self.length}")
        i %= self.length
        if self.base is not None and i % self.base_every == self.base_every - 1:
            return self.base[i]
        image, text = self.image(i % self.n_images)
        return {self.image_key: image.astype(np.float32) / 127.5 - 1.0, self.caption_key: text}


def classify_concept(image: Any) -> dict[str, Any]:
    """:func:`ldm.data.shapes.classify` with the ring as one more template: ``shape`` becomes
    ``"ring"`` when the ring template's IoU on the shape mask beats the best of the others;
    ``iou["ring"]`` holds that IoU."""
    from ldm.data.shapes import _inside

    out = classify(image)
    mask = out.get("mask")
    if mask is None:
        return out
    x0, y0, x1, y1 = out["box"]
    box = (float(x0), float(y0), float(x1 + 1), float(y1 + 1))
    gy, gx = np.mgrid[y0:y1 + 1, x0:x1 + 1] + 0.5
    sub = mask[y0:y1 + 1, x0:x1 + 1]
    ring = _inside("circle", gx, gy, box) & ~_inside("circle", gx, gy, _ring_inner(box))
    score = float((ring & sub).sum()) / max(1, int((ring | sub).sum()))
    best = max(out["iou"].values())
    out["iou"] = dict(out["iou"], ring=score)
    if score > best:
        out.update(shape="ring", shape_confidence=score,
                   confidence=min(out["background_confidence"], out["shape_colour_confidence"], score))
    return out


def check_concept(image: Any, text: str) -> dict[str, bool]:
    """:func:`ldm.data.shapes.check` for captions that may name a concept shape."""
    m = _CAPTION_RE.fullmatch(text.strip().lower())
    if m is None:
        raise UserInputError(f"caption {text!r} does not read 'a {{colour}} {{shape}} on a {{colour}} background'")
    return compare(classify_concept(image), Combo(*_check(m.groups())))


def evaluate_prompt(config: str, ckpt: str, prompt: str, n: int = 50, seed: int = 0, sampler: str = "ddim",
                    steps: int = 50, scale: float = 7.5, embeddings: Optional[str] = None,
                    loras: Sequence[str] = (), batch_size: int = 25, expect: Optional[str] = None) -> dict:
    """Draw ``prompt`` with seeds ``seed .. seed + n - 1`` through the txt2img pipeline (the
    ``--embeddings`` / ``--lora`` loaders) and read each image back against ``expect`` (a dataset
    caption; default the prompt itself): fractions of :func:`check_concept`'s fields, plus what the
    images showed (``seen``: caption -> count)."""
    from ldm.generate.pipeline import StableDiffusion

    sd = StableDiffusion.from_files(config, ckpt, device="cpu", precision="fp32", hash_checkpoint=False,
                                    progress=False)
    sd.text.configure(embeddings=embeddings, loras=list(loras))
    t = time.time()
    images = []
    for start in range(0, n, batch_size):
        k = min(batch_size, n - start)
        images += sd.txt2img(prompt, seeds=seed + start, n=k, sampler=sampler, steps=steps, scale=scale).images
    checks = [check_concept(im, expect or prompt) for im in images]
    seen: dict = {}
    for im in images:
        got = classify_concept(im)
        key = f"{got['shape_colour']} {got['shape']} on {got['background']}"
        seen[key] = seen.get(key, 0) + 1
    result = {k: sum(c[k] for c in checks) / n for k in checks[0]}
    result.update(n=n, seed=seed, prompt=prompt, expect=expect or prompt, sampler=sampler, steps=steps, scale=scale, embeddings=embeddings,
                  loras=list(loras), seconds=round(time.time() - t, 1),
                  seen=dict(sorted(seen.items(), key=lambda kv: -kv[1])))
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="How often a prompt naming a concept shape is drawn right.")
    p.add_argument("--config", default="configs/demo/demo-txt2img.yaml")
    p.add_argument("--ckpt", default="models/demo/demo.safetensors")
    p.add_argument("--prompt", default="a red ring on a white background")
    p.add_argument("--expect", default=None, help="the caption the images should show (default: the prompt)")
    p.add_argument("--n", type=int, default=50, help="images (seeds seed .. seed + n - 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scale", type=float, default=7.5)
    p.add_argument("--embeddings", default=None, metavar="DIR")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]")
    a = p.parse_args(argv)
    try:
        result = evaluate_prompt(a.config, a.ckpt, a.prompt, a.n, a.seed, a.sampler, a.steps, a.scale, a.embeddings,
                                 a.lora, expect=a.expect)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
