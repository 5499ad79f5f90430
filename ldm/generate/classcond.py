"""Class-conditional sampling with the CompVis ImageNet LDMs (``cin256-v2``, ``cin256``): the
method behind ``StableDiffusion.sample_class`` and ``scripts/sample_class.py``.

The flow of the reference notebook (``scripts/latent_imagenet_diffusion.ipynb``): the class
labels go through the model's ``ClassEmbedder`` as a dict, ``c =
model.get_learned_conditioning({"class_label": labels})`` (``[B, 1, 512]``); classifier-free
guidance runs against the *null class*, the extra row 1000 of cin256-v2's 1001-row table
(``uc`` = the embedding of class 1000); DDIM (20 steps, eta 0, scale 3.0 in the notebook); the VQ
decoder quantises the sampled latent before decoding. The older ``cin256`` (VQ-f8) model has
only the 1000 class rows, so it samples without guidance (scale 1).

Class names: :func:`parse_class` takes an index or a name of the ImageNet class-index list
shipped as ``ldm/data/imagenet_classes.txt`` (line ``i`` = class ``i``, its synonyms separated by
commas); a name must pick exactly one class.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ldm.errors import UserInputError
from ldm.generate.inputs import generators_for
from ldm.generate.records import GenerationResult

__all__ = ["IMAGENET_CLASSES_FILE", "imagenet_classes", "class_name", "parse_class", "class_table", "NOTEBOOK_CLASSES",
           "ClassConditionalMixin"]

log = logging.getLogger(__name__)

IMAGENET_CLASSES_FILE = Path(__file__).resolve().parents[1] / "data" / "imagenet_classes.txt"
NOTEBOOK_CLASSES = (25, 187, 448, 992)   # the notebook's: fire salamander, Yorkshire terrier, birdhouse, agaric
NULL_CLASS_ROWS = 1001                   # a table of 1000 classes + the null class (cin256-v2)


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple:
    """The 1000 ImageNet classes, each a tuple of its names (first = the usual one)."""
    lines = IMAGENET_CLASSES_FILE.read_text(encoding="utf-8").splitlines()
    return tuple(tuple(n.strip() for n in line.split(",") if n.strip()) for line in lines)


def class_name(index: int) -> str:
    """The usual name of ImageNet class ``index`` (``"class <index>"`` beyond the list)."""
    names = imagenet_classes()
    return names[index][0] if 0 <= index < len(names) else f"class {index}"


def parse_class(text: Union[str, int], n_classes: int = 1000) -> int:
    """A class index from an index (``"25"``) or a name (``"Yorkshire terrier"``, case-insensitive;
    an exact synonym first, else a unique partial match).

    :param n_classes: classes the model has (indices ``0 .. n_classes - 1``).
    :raises UserInputError: out of range, unknown or ambiguous (naming the candidates).
    """
    value = str(text).strip()
    if value.lstrip("-").isdigit():
        index = int(value)
        if not 0 <= index < n_classes:
            raise UserInputError(f"class {index} is out of range: this model has classes 0..{n_classes - 1}; "
                                 f"pass an index in that range or a class name")
        return index
    key = value.lower()
    names = imagenet_classes()[:n_classes]
    exact = [i for i, syn in enumerate(names) if key in (s.lower() for s in syn)]
    found = exact or [i for i, syn in enumerate(names) if any(key in s.lower() for s in syn)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserInputError(f"no ImageNet class is called {value!r}; pass an index 0..{n_classes - 1} or a name "
                             f"from {IMAGENET_CLASSES_FILE.name} (ldm/data)")
    shown = "; ".join(f"{i} ({class_name(i)})" for i in found[:6]) + ("; ..." if len(found) > 6 else "")
    raise UserInputError(f"class name {value!r} is ambiguous: it matches {len(found)} classes: {shown}; "
                         "pass the index instead")


def class_table(rows: int, null_class: Optional[int] = None) -> tuple:
    """``(number of classes, null class or None)`` of a class-embedding table of ``rows`` rows: 1001
    rows are 1000 classes plus the null class 1000 (cin256-v2); otherwise every row is a class and
    there is no null class, unless ``null_class`` names the row to use (the last row then is no class).

    :raises UserInputError: ``null_class`` is not a row of the table.
    """
    if null_class is None:
        return (rows - 1, rows - 1) if rows == NULL_CLASS_ROWS else (rows, None)
    if not 0 <= null_class < rows:
        raise UserInputError(f"null class {null_class} is not a row of this model's class table (0..{rows - 1})")
    return (rows - 1 if null_class == rows - 1 else rows), int(null_class)


class ClassConditionalMixin:
    """The ``sample_class`` method of :class:`ldm.generate.StableDiffusion`."""

    def class_table(self, null_class: Optional[int] = None) -> tuple:
        """:func:`class_table` of the model's ``ClassEmbedder``."""
        return class_table(int(self.model.cond_stage_model.embedding.num_embeddings), null_class)

    @torch.no_grad()
    def sample_class(self, classes: Union[int, str, Sequence[Union[int, str]]], seeds: Union[int, Sequence[int]] = 42,
                     *, n: Optional[int] = None, steps: Optional[int] = None, sampler: Optional[str] = None,
                     scale: Optional[float] = None, eta: Optional[float] = None, width: Optional[int] = None,
                     height: Optional[int] = None, null_class: Optional[int] = None) -> GenerationResult:
        """Images of ImageNet classes (see the module). Settings left at None take the family's
        defaults (DDIM, 20 steps, scale 3.0 with a null class, else 1; 256x256).

        :param classes: one class (repeated ``n`` times) or one per image: indices or names.
        :param seeds: one seed (image ``k`` gets ``seed + k``) or one per image.
        :param scale: classifier-free guidance against the null class; needs a model that has one.
        :param null_class: the table row of the null class (default: see :meth:`class_table`).
        :returns: :class:`GenerationResult`; each record's prompt is the class name, ``Class`` its index.
        """
        self._require("sample_class")
        n_classes, null = self.class_table(null_class)
        if scale is None and null is None:
            scale = 1.0
        steps, sampler, scale, eta = self._settings("sample_class", steps, sampler, scale, eta)
        if scale != 1.0 and null is None:
            raise UserInputError(f"this model has no null class ({n_classes} classes, no unconditional row), so no "
                                 "classifier-free guidance: use scale 1 (or name its null class row)")
        classes = [classes] if isinstance(classes, (int, str)) else list(classes)
        labels = [parse_class(c, n_classes) for c in classes]
        if isinstance(seeds, int):
            count = n if n is not None else len(labels)
            seeds = [seeds + k for k in range(count)]
        seeds = [int(s) for s in seeds]
        if len(labels) == 1:
            labels = labels * len(seeds)
        if len(labels) != len(seeds) or not seeds:
            raise UserInputError(f"got {len(labels)} classes for {len(seeds)} images; pass one class or one per image")
        width = self.spec.width if width is None else width
        height = self.spec.height if height is None else height
        self.check_size(width, height)
        c = self._class_conditioning(labels)
        uc = self._class_conditioning([null] * len(labels)) if scale != 1.0 else None
        shape = (self.latent_channels, height // self.factor, width // self.factor)
        z = self._sample(sampler, steps, shape, c, uc, scale, eta, generators_for(seeds))
        names = [class_name(i) for i in labels]
        records = self._records("class", names, [""] * len(seeds), seeds, sampler, steps, scale, eta, width, height)
        for record, label in zip(records, labels):
            record.extra["Class"] = label
        return self._finish(self.decode(z), records)

    def _class_conditioning(self, labels: Sequence[int]) -> torch.Tensor:
        """``model.get_learned_conditioning({key: labels})``: ``[B, 1, D]``."""
        key = getattr(self.model.cond_stage_model, "key", "class_label")
        return self.model.get_learned_conditioning({key: torch.tensor(labels, dtype=torch.long, device=self.device)})
