"""The pipeline: :class:`StableDiffusion`, a loaded model with txt2img / img2img / inpaint methods.

What every method does, in the reference's order: text conditioning (classifier-free guidance
with the negative prompt, or ``""``, as the unconditional prompt whenever ``scale != 1``),
sampling inside ``model.ema_scope()`` with any sampler of :mod:`ldm.models.diffusion.registry`,
decoding (redone in float32 when a half-precision decode overflows), the safety check, and 8-bit
images by truncation as the reference wrote them. Defaults (size, sampler, steps, guidance scale,
watermark) come from the model's family (:class:`ldm.generate.config.ModelSpec`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.errors import UserInputError
from ldm.generate.batching import PaddedPerImageModel
from ldm.generate.config import (ModelSpec, check_image_size, checkpoint_family_hint, describe_config, describe_model,
                                 load_config)
from ldm.generate.inputs import as_list, binary_mask, check_strength, expand_prompts, generators_for, pad_image
from ldm.generate.methods import METHOD_MIXINS
from ldm.generate.records import SAFETY_OFF, GenerationError, GenerationResult, ImageRecord, make_result
from ldm.prompts.conditioner import TextConditioner

__all__ = ["StableDiffusion", "load_safety_checker"]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


class StableDiffusion(*METHOD_MIXINS):
    """A loaded model with txt2img / img2img / inpaint methods, and more per family from the mixins
    of :mod:`ldm.generate.methods` (LDM inpainting, upscale, variations, ...).

    :param model: a loaded ``LatentDiffusion`` (see :func:`ldm.checkpoint.load_model_from_config`).
    :param model_name: written as ``Model:`` (e.g. the checkpoint's file stem).
    :param model_hash: written as ``Model hash:`` (:func:`ldm.metadata.model_hash`).
    :param safety_checker: a :class:`ldm.safety_checker.SafetyChecker`, or None.
    :param safety_status: what to record when ``safety_checker`` is None: ``SAFETY_OFF`` or
        ``SAFETY_NOT_NEEDED``.
    :param progress: show a progress bar per sampling run.
    :param exact_batches: run the networks one image at a time, so that an image is bit-identical
        to the one its seed gives alone (batched kernels round differently per batch size). False
        runs each batch at once: faster on GPUs, and an image then differs from its single-image
        run by float rounding (about one level in 8 bits).
    """

    def __init__(self, model, *, spec: Optional[ModelSpec] = None, model_name: Optional[str] = None,
                 model_hash: Optional[str] = None, safety_checker=None, safety_status: str = SAFETY_OFF,
                 progress: bool = True, exact_batches: bool = True):
        from ldm.families import configure_model

        self.model = model
        self.spec = spec if spec is not None else describe_model(model)
        configure_model(model, self.spec.family)
        self.exact_batches = exact_batches
        self.model_name = model_name
        self.model_hash = model_hash
        self.safety_checker = safety_checker
        self.safety_status = safety_status
        self.progress = progress
        #: the text side: prompt syntax, embeddings, LoRAs (:class:`ldm.prompts.TextConditioner`)
        self.text = TextConditioner(model)

    @classmethod
    def from_files(cls, config: Union[PathLike, Mapping[str, Any]], ckpt: PathLike, *,
                   device: Union[str, torch.device] = "auto", precision: Union[str, torch.dtype] = "auto",
                   use_ema: Optional[bool] = None, safety_checker: Union[None, PathLike, Any] = None,
                   safety_status: str = SAFETY_OFF, hash_checkpoint: bool = True, progress: bool = True,
                   exact_batches: bool = True) -> "StableDiffusion":
        """Load a config and checkpoint.

        :param config: a YAML path or a loaded config; its family and ``demo:`` section set the
            defaults (:func:`ldm.generate.config.describe_config`).
        :param ckpt: ``.ckpt`` / ``.safetensors`` (format by extension).
        :param device: ``auto`` (CUDA, MPS, CPU), ``cpu``, ``cuda[:N]``, ``mps``, or a ``torch.device``.
        :param precision: ``auto`` (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32),
            ``full``/``fp32``, ``fp16``, ``bf16``, ``autocast`` (fp16 on CUDA, else fp32: the
            reference), or a ``torch.dtype`` already chosen.
        :param use_ema: None: as the config says (``ema_scope``); True: run the EMA weights of a
            full-EMA checkpoint; False: run the non-EMA weights.
        :param safety_checker: a loaded checker, the folder of its files, or None (off).
        :param exact_batches, progress: see the class.
        :raises UserInputError / CheckpointError: one-line messages.
        """
        from ldm.checkpoint import CheckpointError, load_model_from_config
        from ldm.devices import resolve_placement

        if not isinstance(config, Mapping) and not hasattr(config, "get"):
            config = load_config(config)
        dev, dtype = resolve_placement(device, precision)
        checker = safety_checker
        if isinstance(checker, (str, os.PathLike)):
            checker = load_safety_checker(checker, dev)
        spec = describe_config(config)
        if spec.family.name == "sd-v2" and "768" in Path(ckpt).name:
            log.warning("%s looks like the 768-v SD 2 model by its name, but the config is the 512-base (eps) one; "
                        "pass --config configs/stable-diffusion/v2-inference-v.yaml if it is", Path(ckpt).name)
        log.info("loading model from %s (%s, %s)", ckpt, dev, str(dtype).replace("torch.", ""))
        try:
            model = load_model_from_config(config, ckpt, device=dev, dtype=dtype, use_ema=use_ema)
        except CheckpointError as exc:
            hint = checkpoint_family_hint(ckpt, spec) if "does not match the model config" in str(exc) else ""
            if not hint:
                raise
            raise CheckpointError(f"{exc}. {hint[0].upper()}{hint[1:]}") from None
        digest = None
        if hash_checkpoint:
            from ldm.metadata import model_hash

            log.info("computing the model hash of %s for the metadata", ckpt)
            digest = model_hash(ckpt)
        return cls(model, spec=spec, model_name=Path(ckpt).stem, model_hash=digest,
                   safety_checker=checker, safety_status=safety_status, progress=progress,
                   exact_batches=exact_batches)

    # -- properties -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.betas.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.model.parameters()).dtype

    @property
    def factor(self) -> int:
        """Pixels per latent position (8 for SD)."""
        return self.spec.geometry.factor

    @property
    def latent_channels(self) -> int:
        return self.spec.geometry.latent_channels

    @property
    def kind(self) -> str:
        """The family's kind: ``"txt2img"``, ``"sd-inpaint"`` or ``"ldm-inpaint"`` (:class:`ldm.families.Family`)."""
        return self.spec.family.kind

    def check_size(self, width: int, height: int) -> None:
        """:raises UserInputError: when a side is not a positive multiple of the autoencoder's factor."""
        check_image_size(self.factor, width, height)

    # -- public methods ---------------------------------------------------------------------------
    @torch.no_grad()
    def txt2img(self, prompts: Union[str, Sequence[str]], seeds: Union[int, Sequence[int]] = 42, *,
                n: Optional[int] = None, negative_prompt: Union[str, Sequence[str]] = "", steps: Optional[int] = None,
                sampler: Optional[str] = None, scale: Optional[float] = None, eta: Optional[float] = None,
                width: Optional[int] = None, height: Optional[int] = None) -> GenerationResult:
        """Images from text; one batch. Settings left at None take the model family's defaults
        (:attr:`spec`: e.g. 512x512, DDIM, 50 steps, scale 7.5 for SD v1; 64x64 for the demo model).

        :param prompts: one prompt (repeated ``n`` times) or one per image.
        :param seeds: one seed (image ``k`` gets ``seed + k``) or one per image.
        :param n: number of images (default: one per prompt, or per seed).
        :param negative_prompt: the unconditional prompt of guidance, one or one per image.
        :param sampler: a name of :data:`ldm.models.diffusion.registry.SAMPLER_NAMES`.
        :param eta: DDIM / Euler a noise amount (None: their defaults, 0 and 1).
        :returns: :class:`GenerationResult` with ``width x height`` RGB images.
        """
        self._require("txt2img")
        steps, sampler, scale, eta = self._settings("txt2img", steps, sampler, scale, eta)
        width = self.spec.width if width is None else width
        height = self.spec.height if height is None else height
        prompts, seeds = expand_prompts(prompts, seeds, n)
        negatives = as_list(negative_prompt, len(prompts), "negative prompt")
        self.check_size(width, height)
        c, uc = self._text_conditioning(prompts, negatives, scale, (height, width))
        generators = generators_for(seeds)
        shape = (self.latent_channels, height // self.factor, width // self.factor)
        z = self._txt2img_latents(prompts, negatives, sampler, steps, shape, c, uc, scale, eta, generators)
        records = self._records("txt2img", prompts, negatives, seeds, sampler, steps, scale, eta, width, height)
        return self._finish(self.decode(z), records)

    @torch.no_grad()
    def img2img(self, prompts: Union[str, Sequence[str]], init_image: Image.Image,
                seeds: Union[int, Sequence[int]] = 42, *, n: Optional[int] = None, strength: Optional[float] = None,
                negative_prompt: Union[str, Sequence[str]] = "", steps: Optional[int] = None,
                sampler: Optional[str] = None, scale: Optional[float] = None,
                eta: Optional[float] = None) -> GenerationResult:
        """Variations of ``init_image``: it is encoded (a posterior sample, as the reference), noised
        to the level of ``strength`` and denoised over the last ``int(strength * steps)`` steps.

        :param init_image: RGB PIL image whose sides are multiples of the autoencoder factor
            (8 for SD; see :func:`ldm.image_io.resize_to_multiple`).
        :param strength: in ``[0, 1]``; 1 ignores the image's content, 0 returns it re-encoded
            (default: the family's, 0.75 for SD v1, 0.8 for SD 2).
        Other parameters as :meth:`txt2img`.
        """
        return self._img2img("img2img", prompts, init_image, seeds, n=n, strength=strength,
                             negative_prompt=negative_prompt, steps=steps, sampler=sampler, scale=scale, eta=eta)

    def _img2img(self, method: str, prompts, init_image: Image.Image, seeds, *, n, strength, negative_prompt, steps,
                 sampler, scale, eta, condition=None, extra: Optional[dict] = None) -> GenerationResult:
        """img2img, and the methods that add conditioning to it (depth2img): ``condition(image, z0, c,
        uc) -> (cond, uncond)`` turns the text conditioning into the model's; ``extra`` goes into
        every image's parameters."""
        self._require(method)
        steps, sampler, scale, eta = self._settings(method, steps, sampler, scale, eta)
        strength = self.spec.family.strength if strength is None else strength
        check_strength(strength)
        prompts, seeds = expand_prompts(prompts, seeds, n)
        negatives = as_list(negative_prompt, len(prompts), "negative prompt")
        image = init_image.convert("RGB") if init_image.mode != "RGB" else init_image
        self.check_size(*image.size)
        c, uc = self._text_conditioning(prompts, negatives, scale, image.size[::-1])
        generators = generators_for(seeds)
        z0 = self._encode(image, generators)
        if condition is not None:
            c, uc = condition(image, z0, c, uc)
        if strength == 0:
            log.info("strength 0: the init image is only encoded and decoded")
            z = z0
        else:
            from ldm.models.diffusion.sampling import start_step_for_strength

            start = start_step_for_strength(steps, strength)
            z = self._sample(sampler, steps, tuple(z0.shape[1:]), c, uc, scale, eta, generators, x0=z0,
                             start_step=start)
        records = self._records(method, prompts, negatives, seeds, sampler, steps, scale, eta, *image.size,
                                strength=strength)
        for record in records:
            record.extra.update(extra or {})
        return self._finish(self.decode(z), records)

    @torch.no_grad()
    def inpaint(self, prompts: Union[str, Sequence[str]], image: Image.Image, mask: Union[Image.Image, np.ndarray],
                seeds: Union[int, Sequence[int]] = 42, *, n: Optional[int] = None,
                negative_prompt: Union[str, Sequence[str]] = "", steps: Optional[int] = None,
                sampler: Optional[str] = None, scale: Optional[float] = None,
                eta: Optional[float] = None) -> GenerationResult:
        """Repaint the white part of ``mask`` following the prompt; the rest of the image comes back
        bit for bit.

        With the 9-channel SD inpainting model the UNet is conditioned on the mask and the latent
        of the masked image (``c_concat``; the unconditional branch of guidance keeps the same
        ``c_concat``). With an ordinary SD model the known region is held on the forward path of
        the image's latent at every step (the samplers' ``mask``/``x0``; a latent cell counts as
        known when none of its pixels is to be repainted). Either way the known pixels are then
        pasted back from ``image``.

        :param image: RGB PIL image of any size (padded internally to a multiple of 8).
        :param mask: PIL image or array of the same size; gray >= 128 (white) means repaint.
        Other parameters as :meth:`txt2img`.
        """
        self._require("inpaint")
        steps, sampler, scale, eta = self._settings("inpaint", steps, sampler, scale, eta)
        prompts, seeds = expand_prompts(prompts, seeds, n)
        negatives = as_list(negative_prompt, len(prompts), "negative prompt")
        image, repaint, width, height = self._inpaint_inputs(image, mask)
        c, uc = self._text_conditioning(prompts, negatives, scale)
        generators = generators_for(seeds)
        pixels = self._pixels(image)                                               # [1, 3, H, W] in [-1, 1]
        m = torch.from_numpy(pad_image(repaint, self.factor).astype(np.float32))[None, None].to(self.device)
        if self.kind == "sd-inpaint":
            # [mask, masked-image latent] per image, the latent a posterior sample from its generator
            c_concat = [torch.cat([self.model.inpaint_conditioning(pixels, m, generator=[g])[0] for g in generators])]
            cond = {"c_concat": c_concat, "c_crossattn": [c]}
            uncond = None if uc is None else {"c_concat": c_concat, "c_crossattn": [uc]}
            shape = (self.latent_channels, pixels.shape[2] // self.factor, pixels.shape[3] // self.factor)
            z = self._sample(sampler, steps, shape, cond, uncond, scale, eta, generators)
        else:
            z0 = self._encode(image, generators)
            known = 1.0 - F.max_pool2d(m, self.factor)                             # [1, 1, h, w], 1 = keep
            z = self._sample(sampler, steps, tuple(z0.shape[1:]), c, uc, scale, eta, generators, x0=z0,
                             mask=known.to(z0.dtype))
        x = self.decode(z)[..., :height, :width]
        records = self._records("inpaint", prompts, negatives, seeds, sampler, steps, scale, eta, width, height)
        return self._finish(x, records, keep=(np.asarray(image)[:height, :width], ~repaint))

    # -- decoding ---------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latents to float32 images ``[B, 3, H, W]`` in about ``[-1, 1]``.

        A half-precision decoder can overflow (NaN, or an all-black image): then the decode is
        redone in float32 and the decoder stays in float32 for the rest of the run.

        :raises GenerationError: when even the float32 decode is not finite (the sampler itself
            produced NaN latents).
        """
        x = self._decode_batch(z)
        bad = _bad_decodes(x)
        if bad and self.model.first_stage_dtype != torch.float32:
            what = ", ".join(f"{i} ({why})" for i, why in bad)
            log.warning("the %s decoder overflowed on image(s) %s of this batch; decoding again in float32 "
                        "(the decoder stays in float32 from now on)", str(self.model.first_stage_dtype)
                        .replace("torch.", ""), what)
            self.model.first_stage_model.to(torch.float32)
            x = self._decode_batch(z.float())
        if not torch.isfinite(x).all():
            raise GenerationError("sampling produced NaN/inf latents (numeric overflow); run again with "
                                  "--precision fp32 (or bf16)")
        return x.float()

    def _decode_batch(self, z: torch.Tensor) -> torch.Tensor:
        if not self.exact_batches:
            return self.model.decode_first_stage(z)
        return torch.cat([self.model.decode_first_stage(z[k:k + 1]) for k in range(z.shape[0])])

    # -- internals --------------------------------------------------------------------------------
    def _require(self, method: str) -> None:
        """:raises UserInputError: when the model's family cannot run ``method``, naming what can."""
        from ldm.families import METHODS

        family = self.spec.family
        if method in family.methods:
            return
        if family.unsupported:
            raise UserInputError(f"{method}() cannot run this model: {family.unsupported}")
        can = " or ".join(f"{m}() ({METHODS[m][1]})" for m in family.methods) or "load a matching model"
        raise UserInputError(f"{method}() cannot run {family.title}; use {can}")

    def _settings(self, method: str, steps: Optional[int], sampler: Optional[str], scale: Optional[float],
                  eta: Optional[float]):
        """``(steps, sampler, scale, eta)`` with the family's defaults where None and the eta the
        sampler runs with (:func:`~ldm.models.diffusion.registry.resolve_eta`); checked before any
        work, the step count against the sampler's schedule."""
        from ldm.models.diffusion.registry import check_steps, resolve_eta, sampler_info

        family = self.spec.family
        steps = family.steps if steps is None else int(steps)
        sampler = sampler_info(sampler or family.sampler).name
        check_steps(sampler, steps)
        scale = family.default_scale(method) if scale is None else float(scale)
        return steps, sampler, scale, resolve_eta(sampler, eta)

    def _records(self, mode, prompts, negatives, seeds, sampler, steps, scale, eta, width, height, strength=None):
        return [ImageRecord(mode, p, neg, s, sampler, int(steps), float(scale), int(width), int(height),
                            eta=eta, strength=strength, model_name=self.model_name, model_hash=self.model_hash,
                            watermark_text=self.spec.family.watermark, extra=dict(self.text.extra))
                for p, neg, s in zip(prompts, negatives, seeds)]

    def _text_conditioning(self, prompts: Sequence[str], negatives: Sequence[str], scale: float, size=None):
        """``c`` for the prompts and, when ``scale != 1``, ``uc`` for the negative prompts (""), through
        :attr:`text` (long and weighted prompts, embeddings, LoRA tags); SDXL: :mod:`ldm.generate.sdxl`
        (``size`` = ``(height, width)`` of the images)."""
        if self.kind == "sdxl":
            return self._sdxl_conditioning(prompts, negatives, scale, size)
        return self.text(prompts, negatives, scale)

    def _sample(self, sampler: str, steps: int, shape, cond, uncond, scale, eta, generators, *, x0=None, mask=None,
                start_step: int = 0, stop_step: Optional[int] = None, x_T=None) -> torch.Tensor:
        multiple = self.spec.geometry.unet_multiple
        if shape[1] % multiple or shape[2] % multiple:
            log.info("latent size %dx%d is not a multiple of %d: padded inside each UNet call", shape[2], shape[1],
                     multiple)
        else:
            multiple = 1
        engine = self._sampler_for(sampler, PaddedPerImageModel(self.model, multiple,
                                                                len(generators) if self.exact_batches else None),
                                   stop_step)
        with self.model.ema_scope():
            z, _ = engine.sample(S=int(steps), batch_size=len(generators), shape=tuple(shape), conditioning=cond,
                                 unconditional_guidance_scale=scale, unconditional_conditioning=uncond, eta=eta,
                                 x0=x0, mask=mask, start_step=start_step, generator=generators, x_T=x_T,
                                 verbose=self.progress)
        return z

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        """``[1, 3, H, W]`` in [-1, 1] on the model's device, sides padded to multiples of the factor."""
        from ldm.image_io import image_to_tensor

        padded = Image.fromarray(pad_image(np.asarray(image), self.factor))
        return image_to_tensor(padded).to(self.device)

    def _encode(self, image: Image.Image, generators) -> torch.Tensor:
        """Latents ``[B, C, h, w]`` of one image, a posterior sample per generator (the reference
        encoded the image repeated B times; the posterior is the same for each copy)."""
        posterior = self.model.encode_first_stage(self._pixels(image))
        return torch.cat([self.model.get_first_stage_encoding(posterior, generator=[g]) for g in generators])

    def _inpaint_inputs(self, image: Image.Image, mask):
        image = image.convert("RGB") if image.mode != "RGB" else image
        repaint = binary_mask(mask)
        if repaint.shape != (image.height, image.width):
            raise UserInputError(f"the mask is {repaint.shape[1]}x{repaint.shape[0]} but the image is "
                                 f"{image.width}x{image.height}; give a mask of the same size")
        if not repaint.any():
            log.warning("the mask has no white pixels: nothing to repaint, the image comes back unchanged")
        return image, repaint, image.width, image.height

    def _finish(self, x: torch.Tensor, records: list, keep=None) -> GenerationResult:
        return make_result(x, records, self.safety_checker, self.safety_status, keep)


def _bad_decodes(x: torch.Tensor) -> list:
    """``[(index, reason)]`` of decoded images that are not finite or entirely black."""
    bad = []
    for i, image in enumerate(x):
        if not torch.isfinite(image).all():
            bad.append((i, "NaN/inf"))
        elif bool((image <= -1.0).all()):
            bad.append((i, "all black"))
    return bad


def load_safety_checker(folder: PathLike, device: Union[str, torch.device, None] = None):
    """:func:`SafetyChecker.from_folder` with its errors as one-line :class:`UserInputError`."""
    from ldm.safety_checker import SafetyChecker

    try:
        return SafetyChecker.from_folder(folder, device=device)
    except FileNotFoundError as exc:
        raise UserInputError(str(exc)) from None
    except ValueError as exc:
        raise UserInputError(f"safety checker in {folder}: {exc}") from None

