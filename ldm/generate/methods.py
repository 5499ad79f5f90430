"""The pipeline's methods beyond txt2img / img2img / inpaint, one mixin module per kind of model.

:class:`ldm.generate.StableDiffusion` inherits every mixin listed here; a new family's method goes in
its own module (``ldm/generate/<method>.py``, a class with the method and its helpers) and one line
here. Each method starts with ``self._require("<method>")`` so a model of another family gets one
line naming the script that runs it.
"""
from __future__ import annotations

from ldm.generate.classcond import ClassConditionalMixin
from ldm.generate.depth import Depth2ImgMixin
from ldm.generate.inpaint_ldm import LDMInpaintMixin
from ldm.generate.sdxl import SDXLMixin
from ldm.generate.superres import SuperResMixin
from ldm.generate.unconditional import UnconditionalMixin
from ldm.generate.upscale import UpscaleMixin
from ldm.generate.variations import VariationsMixin

__all__ = ["METHOD_MIXINS"]

METHOD_MIXINS = (
    SDXLMixin,
    LDMInpaintMixin,
    UnconditionalMixin,
    UpscaleMixin,
    VariationsMixin,
    Depth2ImgMixin,
    ClassConditionalMixin,
    SuperResMixin,
)
