"""4x super-resolution with the CompVis ``bsr_sr`` LDM: the method behind
``StableDiffusion.superres`` and ``scripts/superres.py``.

The flow of the reference ``notebook_helpers.py`` (``get_cond`` + ``run`` +
``make_convolutional_sample``): the low-resolution RGB image becomes ``LR_image = 2·x - 1``
(``x = pixels / 255``, ``[1, 3, h, w]``), which the model takes unchanged (cond stage
``torch.nn.Identity``) and concatenates to the latent on channels (``c_concat``); the latent has
the input's size and the VQ-f4 decoder makes the 4x image, quantising the latent first. DDIM with
eta 1 (the notebook's; its step count is the caller's, 100 here), no guidance, EMA weights.

Large inputs: when the output is 128 pixels or more on both sides, the notebook turns on the
model's patch-wise mode (``split_input_params``, :mod:`ldm.models.diffusion.split_input`): the
UNet runs on overlapping ``ks`` x ``ks`` latent crops every ``stride`` positions and the decoder on
the matching crops, blended with border-distance weights, so memory stays bounded whatever the
size (the notebook's ``ks`` 128 and ``stride`` 64 latent positions, 512/256 output pixels). Image
``k`` draws its start noise and every DDIM noise from its own generator.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ldm.errors import UserInputError
from ldm.generate.inputs import generators_for
from ldm.generate.records import GenerationResult

__all__ = ["SPLIT_MODES", "DEFAULT_PATCH", "DEFAULT_STRIDE", "MIN_SIDE", "MAX_SIDE", "check_patches", "use_patches",
           "SuperResMixin"]

log = logging.getLogger(__name__)

SPLIT_MODES = ("auto", "on", "off")
DEFAULT_PATCH, DEFAULT_STRIDE = 128, 64   # notebook_helpers.run, in latent (= input) pixels
SPLIT_FROM = 32                           # the notebook's rule: 4x output >= 128 px on both sides
MIN_SIDE = 8                              # the UNet halves the latent three times
MAX_SIDE = 4096                           # input side: the 16384-px float32 output alone takes 3 GB
DEFAULT_ETA = 1.0                         # notebook_helpers.make_convolutional_sample


def check_patches(patch: int, stride: int, multiple: int = 8, names=("patch_size", "patch_stride")) -> None:
    """The crop side must be a positive multiple of the UNet's ``multiple``; ``1 <= stride <= patch``."""
    if patch < multiple or patch % multiple:
        raise UserInputError(f"{names[0]} {patch} must be a positive multiple of {multiple} (the UNet's); "
                             f"use e.g. {DEFAULT_PATCH}")
    if not 1 <= stride <= patch:
        raise UserInputError(f"{names[1]} {stride} must be between 1 and {names[0]} ({patch}); use e.g. "
                             f"{patch // 2} (crops overlapping by half)")


def use_patches(mode: str, width: int, height: int) -> bool:
    """Whether the patch-wise mode runs for a ``width x height`` input: ``on``, ``off`` or ``auto``
    (the notebook's rule: both sides at least 32 pixels, i.e. a 4x output of 128 or more)."""
    if mode not in SPLIT_MODES:
        raise UserInputError(f"split mode {mode!r} is not one of {', '.join(SPLIT_MODES)}")
    return mode == "on" or (mode == "auto" and min(width, height) >= SPLIT_FROM)


class SuperResMixin:
    """The ``superres`` method of :class:`ldm.generate.StableDiffusion`."""

    @torch.no_grad()
    def superres(self, image: Image.Image, seeds: Union[int, Sequence[int]] = 0, *, n: Optional[int] = None,
                 steps: Optional[int] = None, sampler: Optional[str] = None, eta: Optional[float] = None,
                 split: str = "auto", patch: int = DEFAULT_PATCH, stride: int = DEFAULT_STRIDE) -> GenerationResult:
        """Upscale ``image`` 4x (see the module). Needs the bsr_sr model (family ``ldm-superres``).

        :param image: the low-resolution RGB image, each side 8 to 4096 pixels.
        :param seeds: one seed (image ``k`` gets ``seed + k``, ``n`` images) or one per image.
        :param eta: DDIM / Euler a noise amount (None: 1, the notebook's; 0 is deterministic DDIM).
        :param split: ``auto`` (the notebook's rule), ``on`` or ``off``: the patch-wise mode.
        :param patch, stride: its crop side and step in input pixels (= latent positions).
        :returns: ``4w x 4h`` images.
        """
        from ldm.models.diffusion.registry import sampler_info
        from ldm.models.diffusion.split_input import notebook_split_params

        self._require("superres")
        if eta is None and sampler_info(sampler or self.spec.family.sampler).default_eta is not None:
            eta = DEFAULT_ETA
        steps, sampler, _, eta = self._settings("superres", steps, sampler, 1.0, eta)
        image = image.convert("RGB") if image.mode != "RGB" else image
        width, height = image.size
        if min(width, height) < MIN_SIDE:
            raise UserInputError(f"the input is {width}x{height}: too small, each side must be at least {MIN_SIDE} "
                                 "pixels; pass a larger image")
        if max(width, height) > MAX_SIDE:
            raise UserInputError(f"the input is {width}x{height}: too large, the 4x output would be {4 * width}x"
                                 f"{4 * height}; pass an image of at most {MAX_SIDE} pixels a side (crop it into pieces)")
        patched = use_patches(split, width, height)
        if patched:
            check_patches(patch, stride, self.spec.geometry.unet_multiple)
        seeds = [seeds + k for k in range(1 if n is None else n)] if isinstance(seeds, int) else [int(s) for s in seeds]
        if not seeds:
            raise UserInputError("no images requested; pass at least one seed")
        lr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        c = (2.0 * lr - 1.0).to(self.device, self.dtype).expand(len(seeds), -1, -1, -1)   # LR_image, b c h w
        shape = (self.latent_channels, height, width)
        previous = getattr(self.model, "split_input_params", None)
        self.model.split_input_params = notebook_split_params(patch, stride, self.factor) if patched else None
        try:
            z = self._sample(sampler, steps, shape, {"c_concat": [c]}, None, 1.0, eta, generators_for(seeds))
            x = self.decode(z)
        finally:
            self.model.split_input_params = previous
        records = self._records("superres", [""] * len(seeds), [""] * len(seeds), seeds, sampler, steps, 1.0, eta,
                                4 * width, 4 * height)
        for record in records:
            record.extra["Input size"] = f"{width}x{height}"
            record.extra["Patches"] = f"{patch} stride {stride}" if patched else "off"
        return self._finish(x, records)
