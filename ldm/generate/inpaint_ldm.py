"""LDM inpainting (the ``inpainting_big`` model, no text): the method behind ``scripts/inpaint.py --indir``."""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.generate.inputs import generators_for, pad_image
from ldm.generate.records import GenerationResult

__all__ = ["LDMInpaintMixin"]


class LDMInpaintMixin:
    """The ``inpaint_ldm`` method of :class:`ldm.generate.StableDiffusion`."""

    @torch.no_grad()
    def inpaint_ldm(self, image: Image.Image, mask: Union[Image.Image, np.ndarray], seed: int = 42, *,
                    steps: Optional[int] = None, sampler: Optional[str] = None,
                    eta: Optional[float] = None) -> GenerationResult:
        """The original ``scripts/inpaint.py`` with the LDM inpainting_big model (no text).

        ``image`` in [0, 1], mask thresholded to {0, 1}, ``masked = (1 - mask)·image``; all three
        mapped to [-1, 1]; conditioning ``cat([VQ encoding of masked (not quantised), mask resized
        to the latent (nearest)])``; DDIM, no guidance; the known pixels are then pasted back from
        ``image`` (the reference's ``(1 - m)·image + m·pred``, exact in 8 bits).
        """
        self._require("inpaint_ldm")
        steps, sampler, _, eta = self._settings("inpaint_ldm", steps, sampler, 1.0, eta)
        image, repaint, width, height = self._inpaint_inputs(image, mask)
        f = self.factor
        img01 = torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0)[None].permute(0, 3, 1, 2)
        m = torch.from_numpy(pad_image(repaint, f).astype(np.float32))[None, None]
        masked01 = (1 - m) * img01
        # the VQ encoder is the first stage (float32 after an overflowing half-precision decode)
        masked = (masked01 * 2.0 - 1.0).to(self.device, self.model.first_stage_dtype)
        c = self.model.get_learned_conditioning(masked)                            # [1, C, h, w]
        mask_pm1 = (m * 2.0 - 1.0).to(self.device, c.dtype)
        cc = F.interpolate(mask_pm1, size=c.shape[-2:])                             # nearest
        cond = torch.cat([c, cc], dim=1)
        generators = generators_for([seed])
        shape = (cond.shape[1] - 1, *cond.shape[2:])
        z = self._sample(sampler, steps, shape, {"c_concat": [cond]}, None, 1.0, eta, generators)
        x = self.decode(z)[..., :height, :width]
        records = self._records("ldm-inpaint", [""], [""], [seed], sampler, steps, 1.0, eta, width, height)
        return self._finish(x, records, keep=(np.asarray(image)[:height, :width], ~repaint))
