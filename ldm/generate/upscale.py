"""x4 upscaling with the SD 2 x4 upscaler (``LatentUpscaleDiffusion``): the method behind
``StableDiffusion.upscale`` and ``scripts/upscale.py``.

The flow of the reference app (``scripts/streamlit/superresolution.py`` ``paint()``): the
low-resolution image ``x_low`` in [-1, 1] is noise-augmented to ``noise_level`` by the model's own
schedule, ``x_aug = sqrt(ā'[l])·x_low + sqrt(1−ā'[l])·n``; the UNet gets ``cat([z, x_aug])``, the
text and ``l`` as its class label (``{"c_concat": [x_aug], "c_crossattn": [c], "c_adm": l}``; the
unconditional branch of guidance keeps the same ``c_concat`` and ``c_adm``). The latent has the
input's size and the KL-f4 autoencoder decodes it to 4x that size, in tiles for large outputs.
Image ``k`` draws its augmentation noise and then its start noise from its own generator.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import torch
from PIL import Image

from ldm.errors import UserInputError
from ldm.generate.inputs import as_list, check_level, expand_prompts, generators_for
from ldm.generate.records import GenerationError, GenerationResult

__all__ = ["MAX_NOISE_LEVEL", "DEFAULT_NOISE_LEVEL", "TILE_ABOVE", "DEFAULT_TILE", "check_noise_level", "check_tile",
           "UpscaleMixin"]

log = logging.getLogger(__name__)

MAX_NOISE_LEVEL = 350    # the reference apps' bound (the model's max_noise_level)
DEFAULT_NOISE_LEVEL = 20  # the reference apps' default
TILE_ABOVE = 256          # latent side (1024 output pixels) above which the decode is tiled by default
DEFAULT_TILE = 128        # latent positions per decode tile (512 output pixels)


def check_noise_level(level, name: str = "noise_level") -> int:
    """:returns: ``level`` as an int. :raises UserInputError: unless an integer in ``[0, 350]``."""
    return check_level(level, MAX_NOISE_LEVEL, name,
                       f" (default {DEFAULT_NOISE_LEVEL}: more noise keeps less of the input's detail)")


def check_tile(tile: Optional[int], name: str = "tile") -> None:
    if tile is not None and tile != 0 and tile < 16:
        raise UserInputError(f"{name} {tile} is too small; pass 0 (no tiling) or a tile side of at least 16 "
                             f"latent positions (default {DEFAULT_TILE})")


def _is_out_of_memory(exc: RuntimeError) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


class UpscaleMixin:
    """The ``upscale`` method of :class:`ldm.generate.StableDiffusion`."""

    @torch.no_grad()
    def upscale(self, prompts: Union[str, Sequence[str]], image: Image.Image, seeds: Union[int, Sequence[int]] = 0, *,
                n: Optional[int] = None, noise_level: int = DEFAULT_NOISE_LEVEL,
                negative_prompt: Union[str, Sequence[str]] = "", steps: Optional[int] = None,
                sampler: Optional[str] = None, scale: Optional[float] = None, eta: Optional[float] = None,
                tile: Optional[int] = None, noise: Optional[torch.Tensor] = None) -> GenerationResult:
        """Upscale ``image`` 4x following the prompt (see the module). Settings left at None take the
        family's defaults (DDIM, 50 steps, scale 9). Needs an x4 upscaler model
        (family ``sd-x4-upscaler``).

        :param image: the low-resolution RGB image, any size (the latent is padded inside each UNet call).
        :param noise_level: in ``[0, 350]``; how much the input is noised before it conditions the model.
        :param tile: decode in tiles of this many latent positions (``4·tile`` pixels); 0: in one
            piece; None: tiles of 128 when an output side is over 1024 pixels. Tiles approximate the
            untiled decode (GroupNorm statistics are per tile).
        :param noise: ``[B, 3, h, w]`` augmentation noise to use instead of drawing it (tests).
        Other parameters as :meth:`StableDiffusion.txt2img`; :returns: ``4w x 4h`` images.
        """
        self._require("upscale")
        steps, sampler, scale, eta = self._settings("upscale", steps, sampler, scale, eta)
        level = check_noise_level(noise_level)
        check_tile(tile)
        prompts, seeds = expand_prompts(prompts, seeds, n)
        negatives = as_list(negative_prompt, len(prompts), "negative prompt")
        image = image.convert("RGB") if image.mode != "RGB" else image
        width, height = image.size
        c, uc = self._text_conditioning(prompts, negatives, scale)
        generators = generators_for(seeds)
        from ldm.image_io import image_to_tensor
        from ldm.models.diffusion.sampling import randn

        x_low = image_to_tensor(image).to(self.device).expand(len(seeds), -1, -1, -1)   # [B, 3, h, w] in [-1, 1]
        if noise is None:
            noise = randn(x_low.shape, generators, device=self.device)                  # drawn before the start code
        levels = torch.full((len(seeds),), level, dtype=torch.long, device=self.device)
        x_aug, levels = self.model.low_scale_model(x_low, levels, noise.to(self.device))
        x_aug = x_aug.to(self.dtype)
        cond = {"c_concat": [x_aug], "c_crossattn": [c], "c_adm": levels}
        uncond = None if uc is None else {"c_concat": [x_aug], "c_crossattn": [uc], "c_adm": levels}
        try:
            shape = (self.latent_channels, height, width)                             # the input's size
            z = self._sample(sampler, steps, shape, cond, uncond, scale, eta, generators)
            x = _decode(self, z, tile)
        except RuntimeError as exc:
            if not _is_out_of_memory(exc):
                raise
            raise GenerationError(f"out of memory upscaling a {width}x{height} image (the model works at the input's "
                                  "size); upscale it in pieces: crop it into tiles of 256x256 or less, upscale each "
                                  "and join the results, or pass a smaller image") from None
        records = self._records("upscale", prompts, negatives, seeds, sampler, steps, scale, eta, 4 * width, 4 * height)
        for record in records:
            record.extra["Noise level"] = level
        return self._finish(x, records)


def _decode(sd, z: torch.Tensor, tile: Optional[int]) -> torch.Tensor:
    """The pipeline's decode, or the autoencoder's tiled decode for large latents."""
    if tile is None:
        tile = DEFAULT_TILE if max(z.shape[-2:]) > TILE_ABOVE else 0
    if not tile or max(z.shape[-2:]) <= tile:
        return sd.decode(z)
    model = sd.model
    log.info("decoding %dx%d latents in tiles of %d", z.shape[-1], z.shape[-2], tile)
    vae = model.first_stage_model
    x = torch.cat([vae.decode_tiled((z[k:k + 1] / model.scale_factor).to(model.first_stage_dtype), tile_latent=tile,
                                    overlap=max(4, tile // 8)) for k in range(z.shape[0])]).float()
    if not torch.isfinite(x).all():
        raise GenerationError("sampling or decoding produced NaN/inf (numeric overflow); run again with "
                              "--precision fp32")
    return x
