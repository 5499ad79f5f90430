"""Image variations with Stable unCLIP 2.1 (``ImageEmbeddingConditionedLatentDiffusion``): the method
behind ``StableDiffusion.variations`` and ``scripts/variations.py``.

The flow of the reference app (``scripts/streamlit/stableunclip.py``, image mode): the CLIP image
embedding of the input image is noise-augmented to ``noise_level`` (0: as it is; more keeps less of
the image) and, with the level's embedding, conditions the UNet as its vector ``c_adm``, next to
the prompt's text (which may be empty): ``{"c_crossattn": [c], "c_adm": adm}``. The unconditional
branch of guidance has the negative prompt and an all-zero ``c_adm``. Sampling starts from pure
noise at the output size (the input image's size does not matter: it is resized to 224x224 for the
embedding). Image ``k`` draws its augmentation noise and then its start noise from its own
generator.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from PIL import Image

from ldm.generate.inputs import as_list, check_level, expand_prompts, generators_for
from ldm.generate.records import GenerationResult

__all__ = ["MAX_VARIATION_NOISE_LEVEL", "check_variation_noise_level", "VariationsMixin"]

MAX_VARIATION_NOISE_LEVEL = 999  # the augmentation schedule has 1000 levels, 0..999 (the reference app's bound)


def check_variation_noise_level(level, name: str = "noise_level", highest: int = MAX_VARIATION_NOISE_LEVEL) -> int:
    """:returns: ``level`` as an int. :raises UserInputError: unless an integer in ``[0, highest]``."""
    return check_level(level, highest, name,
                       " (default 0: the image's own embedding; more noise keeps less of the image)")


class VariationsMixin:
    """The ``variations`` method of :class:`ldm.generate.StableDiffusion`."""

    @torch.no_grad()
    def variations(self, image: Image.Image, prompts: Union[str, Sequence[str]] = "",
                   seeds: Union[int, Sequence[int]] = 42, *, n: Optional[int] = None, noise_level: int = 0,
                   negative_prompt: Union[str, Sequence[str]] = "", steps: Optional[int] = None,
                   sampler: Optional[str] = None, scale: Optional[float] = None, eta: Optional[float] = None,
                   width: Optional[int] = None, height: Optional[int] = None,
                   noise: Optional[torch.Tensor] = None) -> GenerationResult:
        """Variations of ``image`` (see the module), optionally steered by a prompt. Settings left at
        None take the family's defaults (768x768, DDIM, 50 steps, scale 10). Needs a Stable unCLIP
        model (family ``sd-v2-unclip``).

        :param image: the RGB image whose CLIP embedding conditions the model (any size).
        :param prompts: one prompt (may be empty) or one per image.
        :param noise_level: in ``[0, 999]``: how much the image embedding is noised.
        :param noise: ``[B, D]`` augmentation noise to use instead of drawing it (tests).
        Other parameters as :meth:`StableDiffusion.txt2img`.
        """
        self._require("variations")
        steps, sampler, scale, eta = self._settings("variations", steps, sampler, scale, eta)
        level = check_variation_noise_level(noise_level, highest=self.model.max_noise_level)
        width = self.spec.width if width is None else width
        height = self.spec.height if height is None else height
        self.check_size(width, height)
        prompts, seeds = expand_prompts(prompts, seeds, n)
        negatives = as_list(negative_prompt, len(prompts), "negative prompt")
        image = image.convert("RGB") if image.mode != "RGB" else image
        c, uc = self._text_conditioning(prompts, negatives, scale)
        generators = generators_for(seeds)
        from ldm.image_io import image_to_tensor
        from ldm.models.diffusion.sampling import randn

        embedding = self.model.embed_image(image_to_tensor(image).to(self.device))   # [1, D]
        embedding = embedding.float().expand(len(seeds), -1)
        if noise is None:
            noise = randn(embedding.shape, generators, device=self.device)           # drawn before the start code
        adm = self.model.adm_conditioning(embedding, level, noise.to(self.device).float()).to(self.dtype)
        cond = {"c_crossattn": [c], "c_adm": adm}
        uncond = None if uc is None else {"c_crossattn": [uc], "c_adm": torch.zeros_like(adm)}
        shape = (self.latent_channels, height // self.factor, width // self.factor)
        z = self._sample(sampler, steps, shape, cond, uncond, scale, eta, generators)
        records = self._records("variations", prompts, negatives, seeds, sampler, steps, scale, eta, width, height)
        for record in records:
            record.extra["Noise level"] = level
        return self._finish(self.decode(z), records)
