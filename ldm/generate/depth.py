"""Depth-conditioned image-to-image with the SD 2 depth model (``LatentDepth2ImageDiffusion``): the
method behind ``StableDiffusion.depth2img`` and ``scripts/depth2img.py``.

The flow of the reference app (``scripts/streamlit/depth2img.py`` ``paint()``): MiDaS estimates the
init image's depth (or a depth map is given), which is resized to the latent size and mapped to
[-1, 1] per image; the UNet gets ``cat([z, depth])`` and the text (``{"c_concat": [depth],
"c_crossattn": [c]}``; the unconditional branch of guidance keeps the same depth). As img2img, the
init image is encoded (a posterior sample), noised to the level of ``strength`` and denoised over
the last ``int(strength·steps)`` steps, so the result keeps the image's depth layout, and with a
low strength its colours too.

Two differences from the app, both as this package's img2img: the latent is noised to the level of
the first step that runs (the reference noises one DDIM step higher than it starts denoising, which
``DDIMSampler.stochastic_encode`` + ``decode`` keep: tests/test_sd2_depth.py replays the app that
way), and strength 1.0 runs all ``steps`` steps from the image noised to the highest level (the app
caps the count at ``steps − 1`` and starts from fresh noise, ``randn_like``; the two starts differ by
``sqrt(ā)·z``, ā ≈ 0.005 at the last step). ``strength·steps`` must run at least one step.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ldm.errors import UserInputError
from ldm.generate.records import GenerationResult

__all__ = ["depth_map_tensor", "Depth2ImgMixin"]


def depth_map_tensor(depth_map: Union[Image.Image, np.ndarray, torch.Tensor]) -> torch.Tensor:
    """A depth map given by the user as ``[1, 1, H, W]`` float32, larger = nearer (MiDaS's convention:
    white is near). Only its shape matters, not its scale: it is min-max normalised later.

    :param depth_map: a PIL image (gray ``L``/``I;16``/``I``/``F``; colour images are converted to gray),
        or an ``[H, W]`` array/tensor (or ``[1, 1, H, W]``, e.g. this function's own result).
    :raises UserInputError: for a map that is not 2-D, not finite, or flat.
    """
    if isinstance(depth_map, Image.Image):
        image = depth_map if depth_map.mode in ("L", "I", "I;16", "I;16B", "F") else depth_map.convert("L")
        array = np.asarray(image).astype(np.float32)
    else:
        array = np.asarray(depth_map.detach().cpu() if isinstance(depth_map, torch.Tensor) else depth_map,
                           dtype=np.float32)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise UserInputError(f"the depth map must be a gray image or a 2-D array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise UserInputError("the depth map has NaN or infinite values")
    if array.max() == array.min():
        raise UserInputError("the depth map is flat (one value everywhere), so it carries no depth; give a gray "
                             "image whose brightness is the nearness of each pixel (white = near)")
    return torch.from_numpy(array)[None, None]


class Depth2ImgMixin:
    """The ``depth2img`` method of :class:`ldm.generate.StableDiffusion`."""

    @torch.no_grad()
    def depth2img(self, prompts: Union[str, Sequence[str]], init_image: Image.Image,
                  seeds: Union[int, Sequence[int]] = 0, *, n: Optional[int] = None, strength: Optional[float] = None,
                  depth_map=None, negative_prompt: Union[str, Sequence[str]] = "", steps: Optional[int] = None,
                  sampler: Optional[str] = None, scale: Optional[float] = None,
                  eta: Optional[float] = None) -> GenerationResult:
        """Re-imagine ``init_image`` following the prompt while keeping its depth layout (see the module).
        Settings left at None take the family's defaults (DDIM, 50 steps, scale 9, strength 0.9).
        Needs the SD 2 depth model (family ``sd-v2-depth``).

        :param init_image: RGB image whose sides are multiples of 8 (see :func:`ldm.image_io.resize_to_multiple`).
        :param strength: in ``[0, 1]``: how much of the image is replaced (0 returns it re-encoded).
        :param depth_map: a depth map to use instead of MiDaS's estimate (:func:`depth_map_tensor`:
            a gray image or 2-D array of any size, white/larger = near); resized to the latent size.
        Other parameters as :meth:`StableDiffusion.txt2img`.
        """
        self._require("depth2img")  # before the depth map is read
        given = None if depth_map is None else depth_map_tensor(depth_map)

        def condition(image, z0, c, uc):  # the depth at latent size, concatenated to the latent
            pixels = self._pixels(image)
            depth = self.model.depth_conditioning(pixels, z0.shape[-2:],
                                                  depth=None if given is None else given.to(self.device))
            depth = depth.to(self.dtype).expand(z0.shape[0], -1, -1, -1)
            return ({"c_concat": [depth], "c_crossattn": [c]},
                    None if uc is None else {"c_concat": [depth], "c_crossattn": [uc]})

        return self._img2img("depth2img", prompts, init_image, seeds, n=n, strength=strength,
                             negative_prompt=negative_prompt, steps=steps, sampler=sampler, scale=scale, eta=eta,
                             condition=condition, extra={"Depth": "MiDaS" if given is None else "given depth map"})
