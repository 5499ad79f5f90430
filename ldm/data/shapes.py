"""Procedural captioned shapes: the training set of the demo model, and the checker that reads
generated images back.

Every image is one filled shape on a plain background, captioned
``"a {shape colour} {shape} on a {background colour} background"``; the article is always "a"
(so "a orange square"): one fixed template is easiest for a tiny text model, and
:func:`parse_caption` also accepts "an". Nothing is downloaded and nothing random happens at
import time.

Palette (RGB, 0..255). The values are saturated and far apart: the closest pair is red/orange at
about 106 units of Euclidean RGB distance, so a colour shifted by up to ~50 units (a VAE round
trip, a blurry sample) still reads back as itself.

==========  ===============
name        RGB
==========  ===============
red         (210, 20, 20)
green       (30, 170, 40)
blue        (30, 60, 220)
yellow      (250, 230, 20)
white       (245, 245, 245)
black       (15, 15, 15)
orange      (240, 120, 0)
purple      (140, 30, 180)
==========  ===============

Geometry. Shapes are axis-aligned and sit in a square box whose side is drawn uniformly from
``SIDE_RANGE`` (40-80 %) of the image side, placed uniformly so that at least ``MARGIN`` (4 %) of
the image side of background separates it from every edge. The circle fills the box
(area ratio pi/4), the square is the box (1.0), the triangle is isosceles with its base on the
box's bottom edge and its apex at the top centre (0.5).

Anti-aliasing. :func:`render` supersamples: each pixel is ``supersample x supersample``
point-sampled and the shape colour is mixed in by the covered fraction (a box filter).
``supersample=1`` tests pixel centres only, i.e. hard edges. :func:`classify` handles both,
and blurred or noisy images too.

Held-out combinations. A combination is ``(shape colour, shape, background colour)``; there are
8 * 3 * 7 = 168. ``HELDOUT_COMBOS`` are 17 of them (a tenth, rounded up), chosen by walking the
combinations in the order of ``sha256(f"{HELDOUT_SALT}:{caption}")`` (stable across Python and
NumPy versions) and taking each one whose three attribute pairs (colour+shape, shape+background,
colour+background) all still occur in the training combinations. So every held-out
combination is new only as a triple, and every colour and shape occurs in training.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.errors import UserInputError

__all__ = [
    "COLOURS", "SHAPES", "SHARP_IOU", "Combo", "ALL_COMBOS", "TRAIN_COMBOS", "HELDOUT_COMBOS", "N_HELDOUT",
    "caption", "parse_caption", "render", "ShapesDataset", "classify", "check", "compare", "agreement",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 20, 20),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (250, 230, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "orange": (240, 120, 0),
    "purple": (140, 30, 180),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

SIDE_RANGE = (0.4, 0.8)  # shape box side, as a fraction of the image side
MARGIN = 0.04  # least background between the shape box and any image edge, fraction of the side
HELDOUT_SALT = "ldm-shapes-heldout-v1"
N_HELDOUT = 17  # ceil(168 / 10)
SHARP_IOU = 0.75  # template IoU a shape needs to count as drawn right (rendered ones: 0.86-1.0)

_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float32)  # (8, 3)


class Combo(NamedTuple):
    """One caption's content: ``(shape_colour, shape, background)``."""

    shape_colour: str
    shape: str
    background: str


ALL_COMBOS: tuple[Combo, ...] = tuple(
    Combo(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if b != c
)

_CAPTION_RE = re.compile(r"a (\w+) (\w+) on an? (\w+) background\.?")


def caption(combo: Sequence[str]) -> str:
    """``("red", "circle", "blue")`` -> ``"a red circle on a blue background"``."""
    c = _check_combo(combo)
    return f"a {c.shape_colour} {c.shape} on a {c.background} background"


def parse_caption(text: str) -> Combo:
    """Inverse of :func:`caption` (case and surrounding whitespace are ignored).

    :raises UserInputError: (a ValueError) when the text is not a caption of this dataset.
    """
    m = _CAPTION_RE.fullmatch(text.strip().lower())
    if m is None:
        raise UserInputError(
            f"caption {text!r} does not read 'a {{colour}} {{shape}} on a {{colour}} background'"
        )
    return _check_combo(m.groups())


def _check_combo(combo: Sequence[str]) -> Combo:
    if len(combo) != 3:
        raise UserInputError(f"a combination is (shape_colour, shape, background), got {combo!r}")
    c = Combo(*combo)
    for field, value, allowed in (
        ("shape colour", c.shape_colour, COLOURS),
        ("shape", c.shape, SHAPES),
        ("background", c.background, COLOURS),
    ):
        if value not in allowed:
            raise UserInputError(f"unknown {field} {value!r}; choose one of {', '.join(allowed)}")
    if c.shape_colour == c.background:
        raise UserInputError(f"shape colour and background are both {c.background!r}; they must differ")
    return c


def _pairs(c: Combo) -> tuple[tuple[str, ...], ...]:
    return (("cs", c.shape_colour, c.shape), ("sb", c.shape, c.background), ("cb", c.shape_colour, c.background))


def _split_heldout() -> tuple[tuple[Combo, ...], tuple[Combo, ...]]:
    def key(c: Combo) -> str:
        return hashlib.sha256(f"{HELDOUT_SALT}:{caption(c)}".encode()).hexdigest()

    pair_count: dict[tuple[str, ...], int] = {}
    for c in ALL_COMBOS:
        for p in _pairs(c):
            pair_count[p] = pair_count.get(p, 0) + 1
    held: set[Combo] = set()
    for c in sorted(ALL_COMBOS, key=key):
        if len(held) == N_HELDOUT:
            break
        if all(pair_count[p] > 1 for p in _pairs(c)):
            held.add(c)
            for p in _pairs(c):
                pair_count[p] -= 1
    train = tuple(c for c in ALL_COMBOS if c not in held)
    return train, tuple(c for c in ALL_COMBOS if c in held)


TRAIN_COMBOS, HELDOUT_COMBOS = _split_heldout()


# ---------------------------------------------------------------------------------------------
# geometry, shared by the renderer and the checker's templates


def _inside(shape: str, x: np.ndarray, y: np.ndarray, box: tuple[float, float, float, float],
            pointing: str = "up") -> np.ndarray:
    """Boolean mask: which points ``(x, y)`` (pixel units, y down) lie in ``shape`` drawn in
    ``box = (x0, y0, x1, y1)``. The triangle's apex is at the middle of the side it points to."""
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if shape == "circle":  # the ellipse inscribed in the box
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
    in_box = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    if shape == "square":
        return in_box
    if shape == "triangle":
        # u runs 0 at the apex to 1 at the base; |v| <= u / 2 in units of the base length
        if pointing == "up":
            u, v = (y - y0) / (2 * ry), (x - cx) / (2 * rx)
        elif pointing == "down":
            u, v = (y1 - y) / (2 * ry), (x - cx) / (2 * rx)
        elif pointing == "left":
            u, v = (x - x0) / (2 * rx), (y - cy) / (2 * ry)
        elif pointing == "right":
            u, v = (x1 - x) / (2 * rx), (y - cy) / (2 * ry)
        else:
            raise ValueError(f"unknown triangle direction {pointing!r}")
        return in_box & (np.abs(v) <= u / 2)
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def _coverage(shape: str, box: tuple[float, float, float, float], size: int, supersample: int) -> np.ndarray:
    """(size, size) float32 fraction of each pixel covered, from supersample**2 points a pixel."""
    k = supersample
    t = (np.arange(size * k, dtype=np.float64) + 0.5) / k  # sample positions in pixel units
    inside = _inside(shape, t[None, :], t[:, None], box)  # (size*k, size*k)
    return inside.reshape(size, k, size, k).mean(axis=(1, 3)).astype(np.float32)


def render(combo: Sequence[str], rng: np.random.Generator | int, size: int = 64,
           supersample: int = 4) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw one image of ``combo`` at a random size and place.

    :param combo: ``(shape_colour, shape, background)``.
    :param rng: a NumPy ``Generator`` (or an int seed for one); 3 uniforms are drawn from it.
    :param size: image side in pixels.
    :param supersample: points per pixel side for anti-aliasing; 1 gives hard edges.
    :return: ``(image, params)``: image is uint8 ``(size, size, 3)``; params holds the combo's
        fields plus ``box`` ``(x0, y0, x1, y1)`` in pixels (float) and ``side`` (pixels).
    """
    c = _check_combo(combo)
    if not isinstance(size, int) or size < 16:
        raise UserInputError(f"size must be an int >= 16 pixels, got {size!r}")
    if not isinstance(supersample, int) or supersample < 1:
        raise UserInputError(f"supersample must be an int >= 1 (1 = hard edges), got {supersample!r}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    side = rng.uniform(*SIDE_RANGE) * size
    margin = MARGIN * size
    x0 = rng.uniform(margin, size - margin - side)
    y0 = rng.uniform(margin, size - margin - side)
    box = (x0, y0, x0 + side, y0 + side)

    cover = _coverage(c.shape, box, size, supersample)[..., None]  # (H, W, 1)
    fg = np.array(COLOURS[c.shape_colour], dtype=np.float32)
    bg = np.array(COLOURS[c.background], dtype=np.float32)
    image = np.rint(bg + cover * (fg - bg)).astype(np.uint8)
    params = dict(c._asdict(), box=box, side=side)
    return image, params


class ShapesDataset(Dataset):
    """Map-style dataset of rendered shapes, in the layout the ldm training code reads.

    Item ``i`` is ``{image_key: float32 (size, size, 3) in [-1, 1] (channels last, as the
    original ldm datasets; ``LatentDiffusion.get_input`` permutes), caption_key: str}``.
    Item ``i`` shows combination ``combos[i % len(combos)]`` (every combination equally often)
    drawn with ``np.random.default_rng([seed, i])``, so it depends only on ``(seed, i)``.

    :param split: ``"train"`` (151 combinations), ``"heldout"`` (17) or ``"all"`` (168).
    :param size: image side in pixels.
    :param length: number of items.
    :param seed: changes every image's size and place, not the combination order.
    :param image_key: dict key of the image.
    :param caption_key: dict key of the caption.
    :param supersample: see :func:`render`.
    """

    SPLITS = {"train": TRAIN_COMBOS, "heldout": HELDOUT_COMBOS, "all": ALL_COMBOS}

    def __init__(self, split: str = "train", size: int = 64, length: int = 10000, seed: int = 0,
                 image_key: str = "image", caption_key: str = "caption", supersample: int = 4):
        if split not in self.SPLITS:
            raise UserInputError(f"unknown split {split!r}; choose one of {', '.join(self.SPLITS)}")
        if not isinstance(length, int) or length < 1:
            raise UserInputError(f"length must be a positive int, got {length!r}")
        if not isinstance(seed, int) or seed < 0:
            raise UserInputError(f"seed must be a non-negative int, got {seed!r}")
        if image_key == caption_key:
            raise UserInputError(f"image_key and caption_key are both {image_key!r}; give them different names")
        render(ALL_COMBOS[0], 0, size=size, supersample=supersample)  # checks size and supersample
        self.split, self.size, self.length, self.seed = split, size, length, seed
        self.image_key, self.caption_key, self.supersample = image_key, caption_key, supersample
        self.combos = self.SPLITS[split]

    def __len__(self) -> int:
        return self.length

    def combo(self, i: int) -> Combo:
        return self.combos[i % len(self.combos)]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of length {self.length}")
        i %= self.length
        combo = self.combo(i)
        image, _ = render(combo, np.random.default_rng([self.seed, i]), self.size, self.supersample)
        return {self.image_key: image.astype(np.float32) / 127.5 - 1.0, self.caption_key: caption(combo)}


# ---------------------------------------------------------------------------------------------
# checker

_TEMPLATES = (("circle", "up"), ("square", "up"), ("triangle", "up"), ("triangle", "down"),
              ("triangle", "left"), ("triangle", "right"))
_MIN_CONTRAST = 40.0  # RGB distance a pixel must lie from the background to seed the shape
_MIN_AREA = 0.005  # least shape area, fraction of the image, to report a shape at all


def _nearest_colour(rgb: np.ndarray) -> tuple[str, float]:
    """Nearest palette name and a confidence in [0, 1]: 1 - 2*d1/(d1+d2) for the distances to the
    nearest and second nearest palette colour (1 on a palette colour, 0 half-way between two)."""
    d = np.linalg.norm(_PALETTE - rgb[None, :], axis=1)
    order = np.argsort(d)
    d1, d2 = float(d[order[0]]), float(d[order[1]])
    return _PALETTE_NAMES[order[0]], 1.0 - 2.0 * d1 / (d1 + d2)


def _majority3x3(mask: np.ndarray) -> np.ndarray:
    """Keep a pixel where at least 5 of the 9 pixels of its 3x3 window are set (drops speckle)."""
    p = np.pad(mask.astype(np.int8), 1)
    h, w = mask.shape
    votes = sum(p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    return votes >= 5


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean (H, W) mask.

    Row runs are joined by union-find where they overlap a run of the row above."""
    runs: list[tuple[int, int, int]] = []  # (row, start, stop)
    parent: list[int] = []

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    above: list[int] = []
    for r, row in enumerate(mask):
        edges = np.flatnonzero(np.diff(np.concatenate(([0], row.astype(np.int8), [0]))))
        here = []
        for start, stop in zip(edges[::2].tolist(), edges[1::2].tolist()):
            k = len(runs)
            runs.append((r, start, stop))
            parent.append(k)
            here.append(k)
            for j in above:
                if runs[j][1] < stop and start < runs[j][2]:
                    parent[find(j)] = find(k)
        above = here
    sizes: dict[int, int] = {}
    for k, (_, start, stop) in enumerate(runs):
        root = find(k)
        sizes[root] = sizes.get(root, 0) + stop - start
    out = np.zeros_like(mask, dtype=bool)
    if sizes:
        best = max(sizes, key=sizes.get)
        for k, (r, start, stop) in enumerate(runs):
            if find(k) == best:
                out[r, start:stop] = True
    return out


def classify(image: Any) -> dict[str, Any]:
    """Read back background colour, shape colour and shape of one image.

    Background: nearest palette colour of the median of the border pixels (a ring ``side/32``
    wide). Shape: pixels farther than ``max(40, half the 98th percentile)`` from that median seed
    it; its median colour and the background median then split all pixels by nearest (2-means,
    so the edge sits at the half-way colour whatever the blur); a 3x3 majority vote and the
    largest connected component remove speckle. Shape colour: nearest palette colour of the
    shape pixels' median. Shape name: the template (inscribed ellipse, the box, or a triangle
    pointing up/down/left/right) with the highest IoU against the shape inside its bounding box.

    :param image: uint8 ``(H, W, 3)`` array, or a PIL image.
    :return: dict with ``background``, ``shape_colour``, ``shape`` (names; the last two ``None``
        when no shape is found), ``fill_ratio`` (shape area / bounding-box area: circle ~0.785,
        square ~1, triangle ~0.5), ``iou`` (template name -> best IoU), ``box`` (x0, y0, x1, y1
        inclusive pixel bounds), ``area`` (fraction of the image), ``mask`` (bool (H, W), the shape's
        pixels; templates of other shapes can be scored on it), ``confidence`` (min of
        ``background_confidence``, ``shape_colour_confidence``, ``shape_confidence``; colour
        confidences as in ``_nearest_colour``, shape confidence = the best IoU).
    """
    img = _as_uint8_rgb(image).astype(np.float32)
    h, w, _ = img.shape
    ring = max(1, min(h, w) // 32)
    border = np.concatenate([img[:ring].reshape(-1, 3), img[-ring:].reshape(-1, 3),
                             img[:, :ring].reshape(-1, 3), img[:, -ring:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background, bg_conf = _nearest_colour(bg_rgb)
    out: dict[str, Any] = dict(background=background, background_confidence=bg_conf,
                               shape_colour=None, shape_colour_confidence=0.0, shape=None,
                               shape_confidence=0.0, fill_ratio=0.0, iou={}, box=None, area=0.0,
                               confidence=0.0)

    dist_bg = np.linalg.norm(img - bg_rgb, axis=-1)  # (H, W)
    seed = dist_bg > max(_MIN_CONTRAST, 0.5 * float(np.percentile(dist_bg, 98)))
    if seed.sum() < _MIN_AREA * h * w:
        return out
    fg_rgb = np.median(img[seed], axis=0)
    mask = np.linalg.norm(img - fg_rgb, axis=-1) < dist_bg
    mask = _majority3x3(mask)
    if mask.sum() < _MIN_AREA * h * w:
        return out
    mask = _largest_component(mask)
    area = int(mask.sum())
    shape_colour, colour_conf = _nearest_colour(np.median(img[mask], axis=0))

    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    box = (float(x0), float(y0), float(x1 + 1), float(y1 + 1))  # continuous pixel-edge bounds
    gy, gx = np.mgrid[y0:y1 + 1, x0:x1 + 1] + 0.5  # pixel centres inside the box
    sub = mask[y0:y1 + 1, x0:x1 + 1]
    iou: dict[str, float] = {}
    for shape, pointing in _TEMPLATES:
        t = _inside(shape, gx, gy, box, pointing)
        score = float((t & sub).sum()) / max(1, int((t | sub).sum()))
        iou[shape] = max(iou.get(shape, 0.0), score)
    best = max(iou, key=iou.get)

    out.update(shape_colour=shape_colour, shape_colour_confidence=colour_conf, shape=best,
               shape_confidence=iou[best], fill_ratio=area / sub.size, iou=iou,
               box=(x0, y0, x1, y1), area=area / (h * w), mask=mask,
               confidence=min(bg_conf, colour_conf, iou[best]))
    return out


def check(image: Any, text: str, min_iou: float = 0.0) -> dict[str, Any]:
    """Does ``image`` show what ``text`` (a dataset caption) says?

    :param min_iou: least template IoU of the named shape for ``shape`` to hold (0: the best
        template is enough; :data:`SHARP_IOU`: drawn cleanly, not as a rounded diamond).
    :return: ``{"background", "shape_colour", "shape", "all"}`` -> bool; ``iou``: the named shape's IoU.
    """
    want, got = parse_caption(text), classify(image)
    return dict(compare(got, want, min_iou), iou=float(got["iou"].get(want.shape, 0.0)))


def compare(got: dict[str, Any], want: Combo, min_iou: float = 0.0) -> dict[str, bool]:
    """:func:`check`'s four verdicts on a :func:`classify` reading ``got`` against ``want``."""
    res = dict(background=got["background"] == want.background, shape_colour=got["shape_colour"] == want.shape_colour,
               shape=got["shape"] == want.shape and got["iou"].get(want.shape, 0.0) >= min_iou)
    return dict(res, all=all(res.values()))


def agreement(images: Sequence[Any], texts: Sequence[str], min_iou: float = 0.0) -> dict[str, float]:
    """Fraction of images for which each :func:`check` field holds (same keys as ``check``;
    ``iou`` is the mean IoU)."""
    if len(images) != len(texts) or not len(texts):
        raise UserInputError(f"need as many captions as images (and at least one); got {len(images)} and {len(texts)}")
    results = [check(im, t, min_iou) for im, t in zip(images, texts)]
    return {k: sum(r[k] for r in results) / len(results) for k in results[0]}


def _as_uint8_rgb(image: Any) -> np.ndarray:
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise UserInputError(
            f"expected a uint8 (H, W, 3) image, got dtype {image.dtype} shape {image.shape}; "
            "convert samples with ((x + 1) * 127.5).clip(0, 255).round().astype(np.uint8), channels last"
        )
    if min(image.shape[:2]) < 8:
        raise UserInputError(f"image {image.shape[:2]} is too small to classify; need at least 8x8 pixels")
    return image
