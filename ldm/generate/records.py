"""What a generation call returns: one :class:`ImageRecord` per image (everything needed to make
it again, and its PNG metadata) and the :class:`GenerationResult` that pairs records with images."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ldm.errors import UserInputError
from ldm.watermark import WATERMARK_TEXT

__all__ = ["GenerationError", "ImageRecord", "GenerationResult", "make_result", "sampler_display_name", "SAFETY_PASSED",
           "SAFETY_FLAGGED", "SAFETY_OFF", "SAFETY_NOT_NEEDED", "WATERMARK_TOO_SMALL"]

log = logging.getLogger(__name__)

#: ``Safety checker:`` values written into the metadata of each image.
SAFETY_PASSED = "passed"
SAFETY_FLAGGED = "flagged, replaced by a placeholder"
SAFETY_OFF = "off"
SAFETY_NOT_NEEDED = "not needed (model config)"
#: ``Watermark:`` value of an image too small to carry the invisible watermark.
WATERMARK_TOO_SMALL = "none (too small)"


class GenerationError(UserInputError):
    """A run that cannot give a usable image (e.g. NaN latents in half precision); the message is
    one line naming the fix."""


def sampler_display_name(name: str) -> str:
    """The ``Sampler:`` text of a registry name (``"euler_a"`` -> ``"Euler a"``)."""
    from ldm.models.diffusion.registry import SAMPLERS

    info = SAMPLERS.get(name)
    return info.display_name if info is not None else name


@dataclass
class ImageRecord:
    """Everything needed to re-make one image, and its metadata text.

    :ivar mode: the pipeline method that made it: ``"txt2img"``, ``"img2img"``, ``"inpaint"``,
        ``"ldm-inpaint"``, ``"upscale"``, ...
    :ivar seed: the seed of this image's own generator.
    :ivar eta: the sampler's eta where it has one (DDIM, Euler a), else None.
    :ivar strength: img2img strength (written as ``Denoising strength``).
    :ivar safety: one of the ``SAFETY_*`` values; :ivar nsfw: True when the image was replaced.
    :ivar watermark: set when the image is written: ``watermark_text``, or ``none (too small)``.
    :ivar watermark_text: the invisible watermark the image is to carry (its model family's).
    """

    mode: str
    prompt: str
    negative_prompt: str
    seed: int
    sampler: str
    steps: int
    scale: float
    width: int
    height: int
    eta: Optional[float] = None
    strength: Optional[float] = None
    model_name: Optional[str] = None
    model_hash: Optional[str] = None
    safety: str = SAFETY_OFF
    nsfw: bool = False
    watermark: Optional[str] = None
    extra: dict = field(default_factory=dict)
    watermark_text: str = WATERMARK_TEXT

    def parameters(self) -> str:
        """The AUTOMATIC1111 ``parameters`` text (see :mod:`ldm.metadata`)."""
        from ldm.metadata import format_parameters

        extra = {"Eta": self.eta, "Denoising strength": self.strength, "Watermark": self.watermark,
                 "Safety checker": self.safety, **self.extra}
        return format_parameters(self.prompt, self.negative_prompt, self.steps, sampler_display_name(self.sampler),
                                 self.scale, self.seed, self.width, self.height, model_hash=self.model_hash,
                                 model_name=self.model_name, extra=extra)


@dataclass
class GenerationResult:
    """Images of one call and their records (same order)."""

    images: list
    records: list

    def __len__(self) -> int:
        return len(self.images)


def make_result(x: torch.Tensor, records: list, safety_checker=None, safety_status: str = SAFETY_OFF,
                keep=None) -> GenerationResult:
    """Decoded ``[B, 3, H, W]`` -> 8-bit PIL images (truncation, as the reference wrote them), the
    known pixels pasted back, checked by the safety checker (on rounded pixels, as the reference's
    checker input), flagged ones replaced by a placeholder; the records get their safety status.

    :param keep: ``(original [H, W, 3] uint8, known [H, W] bool)`` pixels to paste back, or None.
    :param safety_status: what the records say when ``safety_checker`` is None.
    """
    from ldm.image_io import tensor_to_uint8
    from ldm.safety_checker import placeholder_image

    out = tensor_to_uint8(x)                                                    # [B, H, W, 3] truncated
    x01 = torch.clamp((x.float() + 1.0) / 2.0, 0.0, 1.0).cpu().permute(0, 2, 3, 1).numpy()
    rounded = (x01 * 255).round().astype(np.uint8)                              # the checker's input
    if keep is not None:
        original, known = keep
        out = np.where(known[None, :, :, None], original[None], out)
        rounded = np.where(known[None, :, :, None], original[None], rounded)
    flags = [False] * len(out) if safety_checker is None else safety_checker.check(rounded)
    images = []
    for pixels, flag, record in zip(out, flags, records):
        record.nsfw = bool(flag)
        if safety_checker is None:
            record.safety = safety_status
        else:
            record.safety = SAFETY_FLAGGED if flag else SAFETY_PASSED
        images.append(placeholder_image(pixels.shape[1], pixels.shape[0]) if flag else Image.fromarray(pixels))
    if any(flags):
        log.warning("safety checker flagged the image(s) of seed %s: replaced by a placeholder",
                    ", ".join(str(r.seed) for r in records if r.nsfw))
    return GenerationResult(images, records)
