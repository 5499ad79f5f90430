"""Text-to-image, image-to-image and inpainting with a loaded model: the library behind
``scripts/txt2img.py``, ``scripts/img2img.py`` and ``scripts/inpaint.py``, usable from Python::

    from ldm.generate import StableDiffusion, ImageWriter

    sd = StableDiffusion.from_files("configs/stable-diffusion/v1-inference.yaml", "sd-v1-4.ckpt",
                                    device="auto", precision="auto", safety_checker="models/safety_checker")
    result = sd.txt2img(["a castle on a hill"] * 3, seeds=42, steps=25, sampler="dpmpp_2m_karras")
    result.images[1]          # PIL image made from seed 43
    result.records[1].seed    # 43; result.records[1].parameters() is the PNG metadata text
    ImageWriter("outputs/txt2img-samples").add(result)

The package, one job per module:

* :mod:`.config`: reading a config; :class:`ModelSpec` (family, geometry, defaults) of a config or model.
* :mod:`.inputs`: checks and conversions of prompts, seeds, strengths and masks.
* :mod:`.batching`: :class:`PaddedPerImageModel`, how the samplers' UNet calls are padded and split.
* :mod:`.pipeline`: :class:`StableDiffusion`, the methods that run a model.
* :mod:`.upscale`: its ``upscale`` method (the SD 2 x4 upscaler) and the noise-level check.
* :mod:`.variations`: its ``variations`` method (Stable unCLIP 2.1 image variations).
* :mod:`.records`: :class:`ImageRecord` / :class:`GenerationResult`, what a call returns.
* :mod:`.writer`: :class:`ImageWriter`, files with watermark and metadata, never overwritten.

Seeds: image ``k`` of a call draws all its noise (start noise, img2img/inpainting posterior
sample, DDIM eta noise) from its own CPU generator seeded ``seeds[k]``, so an image can be re-made
alone from its seed, on any device and with any batch size.
"""
from ldm.generate.batching import PaddedPerImageModel
from ldm.generate.config import (ModelGeometry, ModelSpec, check_image_size, config_get,
                                 config_needs_safety_checker, describe_config, describe_model, load_config,
                                 model_geometry)
from ldm.generate.pipeline import StableDiffusion, load_safety_checker
from ldm.generate.records import (SAFETY_FLAGGED, SAFETY_NOT_NEEDED, SAFETY_OFF, SAFETY_PASSED, WATERMARK_TOO_SMALL,
                                  GenerationError, GenerationResult, ImageRecord, sampler_display_name)
from ldm.generate.upscale import DEFAULT_NOISE_LEVEL, MAX_NOISE_LEVEL, check_noise_level
from ldm.generate.writer import ImageWriter

__all__ = [
    "GenerationError", "ModelGeometry", "ModelSpec", "load_config", "config_get", "config_needs_safety_checker",
    "model_geometry", "describe_config", "describe_model", "check_image_size", "sampler_display_name",
    "ImageRecord", "GenerationResult", "StableDiffusion", "ImageWriter", "PaddedPerImageModel",
    "load_safety_checker", "SAFETY_PASSED", "SAFETY_FLAGGED", "SAFETY_OFF", "SAFETY_NOT_NEEDED",
    "WATERMARK_TOO_SMALL", "DEFAULT_NOISE_LEVEL", "MAX_NOISE_LEVEL", "check_noise_level",
]
