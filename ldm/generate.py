"""Text-to-image, image-to-image and inpainting with a loaded model: the library behind
``scripts/txt2img.py``, ``scripts/img2img.py`` and ``scripts/inpaint.py``, usable from Python::

    from ldm.generate import StableDiffusion, ImageWriter

    sd = StableDiffusion.from_files("configs/stable-diffusion/v1-inference.yaml", "sd-v1-4.ckpt",
                                    device="auto", precision="auto", safety_checker="models/safety_checker")
    result = sd.txt2img(["a castle on a hill"] * 3, seeds=42, steps=25, sampler="dpmpp_2m_karras")
    result.images[1]          # PIL image made from seed 43
    result.records[1].seed    # 43; result.records[1].parameters() is the PNG metadata text
    ImageWriter("outputs/txt2img-samples").add(result)

What every method does, in the reference's order: text conditioning (classifier-free guidance
with the negative prompt, or ``""``, as the unconditional prompt whenever ``scale != 1``),
sampling inside ``model.ema_scope()`` with any sampler of :mod:`ldm.models.diffusion.registry`,
decoding (redone in float32 when a half-precision decode overflows), the safety check, and 8-bit
images by truncation as the reference wrote them.

Seeds: image ``k`` of a call draws all its noise (start noise, img2img/inpainting posterior
sample, DDIM eta noise) from its own CPU generator seeded ``seeds[k]``, so an image can be re-made
alone from its seed, on any device and with any batch size.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.errors import UserInputError

__all__ = [
    "GenerationError",
    "ModelGeometry",
    "load_config",
    "config_needs_safety_checker",
    "model_geometry",
    "sampler_display_name",
    "ImageRecord",
    "GenerationResult",
    "StableDiffusion",
    "ImageWriter",
    "SAFETY_PASSED",
    "SAFETY_FLAGGED",
    "SAFETY_OFF",
    "SAFETY_NOT_NEEDED",
    "WATERMARK_TOO_SMALL",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: ``Safety checker:`` values written into the metadata of each image.
SAFETY_PASSED = "passed"
SAFETY_FLAGGED = "flagged, replaced by a placeholder"
SAFETY_OFF = "off"
SAFETY_NOT_NEEDED = "not needed (model config)"
#: ``Watermark:`` value of an image too small to carry the invisible watermark.
WATERMARK_TOO_SMALL = "none (too small)"

#: Names written as ``Sampler:`` in the metadata (the names AUTOMATIC1111 uses where it has one).
_SAMPLER_DISPLAY = {
    "ddim": "DDIM",
    "plms": "PLMS",
    "dpm_solver": "DPM-Solver++ 2M (time uniform)",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "lms": "LMS",
}

#: Samplers whose ``eta`` means something, and the eta they use when none is given.
_ETA_DEFAULTS = {"ddim": 0.0, "euler_a": 1.0}


class GenerationError(UserInputError):
    """A run that cannot give a usable image (e.g. NaN latents in half precision); the message is
    one line naming the fix."""


def sampler_display_name(name: str) -> str:
    """The ``Sampler:`` text of a registry name (``"euler_a"`` -> ``"Euler a"``)."""
    return _SAMPLER_DISPLAY.get(name, name)


# --------------------------------------------------------------------------------------------
# Reading a config (no model needed)
# --------------------------------------------------------------------------------------------
def load_config(path: PathLike):
    """Read a model YAML config.

    :returns: an OmegaConf ``DictConfig`` with a ``model`` node.
    :raises UserInputError: one line for a missing, unreadable or malformed file.
    """
    from omegaconf import OmegaConf

    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"config {p}: file not found; pass --config with the YAML file that matches the "
                             "checkpoint (e.g. configs/stable-diffusion/v1-inference.yaml)")
    try:
        config = OmegaConf.load(p)
    except Exception as exc:  # yaml.YAMLError, OmegaConf errors, UnicodeDecodeError: all mean "bad file"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"config {p} cannot be read as YAML ({first}); pass a model config file") from None
    if not hasattr(config, "get") or config.get("model") is None or "target" not in config.model:
        raise UserInputError(f"config {p} has no 'model: {{target: ..., params: ...}}' section; "
                             "pass a model config such as configs/stable-diffusion/v1-inference.yaml")
    return config


def config_needs_safety_checker(config: Mapping[str, Any]) -> bool:
    """Whether images of this model go through the safety checker.

    A config may declare that its model needs none with a top-level section beside ``model:``::

        demo:
          safety_checker: false

    Every other config (all the released ones) needs the checker.
    """
    demo = config.get("demo") if hasattr(config, "get") else None
    if demo is None or not hasattr(demo, "get"):
        return True
    return bool(demo.get("safety_checker", True))


@dataclass(frozen=True)
class ModelGeometry:
    """What a config says about image and latent sizes and about what the model can do.

    :ivar kind: ``"txt2img"`` (text-conditioned SD/LDM), ``"sd-inpaint"`` (the 9-channel SD
        inpainting model), ``"ldm-inpaint"`` (LDM inpainting_big: conditioned on its own first
        stage), ``"bert"`` (the LDM 1p4B text model, whose BERT encoder is not provided) or
        ``"other"``.
    :ivar latent_channels: ``C`` of the latents.
    :ivar factor: pixels per latent position (``f``: 8 for SD's VAE, 4 for the VQ-f4 model).
    :ivar unet_multiple: the UNet needs latent sides that are multiples of this
        (``2 ** (len(channel_mult) - 1)``); other sizes are padded inside each model call.
    """

    kind: str
    latent_channels: int
    factor: int
    unet_multiple: int


def config_get(node: Any, *keys: str, default: Any = None) -> Any:
    """``node[keys[0]][keys[1]]...`` of a config (OmegaConf or dict), or ``default`` where missing."""
    for key in keys:
        if node is None or not hasattr(node, "get"):
            return default
        node = node.get(key)
    return default if node is None else node


def model_geometry(config: Mapping[str, Any]) -> ModelGeometry:
    """Read :class:`ModelGeometry` from a config (the whole YAML or its ``model`` node)."""
    node = config.get("model", config) if hasattr(config, "get") else config
    params = config_get(node, "params", default={})
    target = str(config_get(node, "target", default=""))
    unet = config_get(params, "unet_config", "params", default={})
    first = config_get(params, "first_stage_config", "params", default={})
    ch_mult = list(config_get(first, "ddconfig", "ch_mult", default=[1, 2, 4, 4]))
    factor = 2 ** (len(ch_mult) - 1)
    channels = int(config_get(first, "embed_dim", default=config_get(params, "channels", default=4)))
    unet_mult = list(config_get(unet, "channel_mult", default=[1, 2, 4, 4]))
    unet_multiple = 2 ** (len(unet_mult) - 1)
    cond_stage = config_get(params, "cond_stage_config", default=None)
    cond_target = str(config_get(cond_stage, "target", default="")) if hasattr(cond_stage, "get") else str(cond_stage)
    conditioning_key = config_get(params, "conditioning_key", default=None)
    in_channels = int(config_get(unet, "in_channels", default=channels))
    if cond_target == "__is_first_stage__":
        kind = "ldm-inpaint"
    elif target.endswith("LatentInpaintDiffusion") or (conditioning_key == "hybrid"
                                                        and in_channels == 2 * channels + 1):
        kind = "sd-inpaint"
    elif "BERT" in cond_target:
        kind = "bert"
    elif cond_target and in_channels == channels:
        kind = "txt2img"
    else:
        kind = "other"
    return ModelGeometry(kind, channels, factor, unet_multiple)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass
class ImageRecord:
    """Everything needed to re-make one image, and its metadata text.

    :ivar mode: ``"txt2img"``, ``"img2img"``, ``"inpaint"`` or ``"ldm-inpaint"``.
    :ivar seed: the seed of this image's own generator.
    :ivar eta: the sampler's eta where it has one (DDIM, Euler a), else None.
    :ivar strength: img2img strength (written as ``Denoising strength``).
    :ivar safety: one of the ``SAFETY_*`` values; :ivar nsfw: True when the image was replaced.
    :ivar watermark: set when the image is written (``StableDiffusionV1`` or ``none (too small)``).
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


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
class _UNetView:
    """The model as the samplers see it: ``apply_model`` optionally pads the latents and runs the
    UNet one image at a time; everything else is the wrapped model's.

    Padding: the UNet halves the latent ``len(channel_mult) - 1`` times and concatenates skip
    connections, so the reference only ran sizes that are multiples of ``8 * 2 ** (levels - 1)``
    pixels (64 for SD). Other multiples of 8 run with the latent padded at the bottom and right
    (edge values repeated) to that multiple inside each call, and the output cropped back.

    One image at a time (``n_images``): the batch a sampler passes holds ``n_images`` images, or
    ``2 * n_images`` with guidance (``cat([uncond, cond])``); image ``k``'s rows ``k, k + n, ...``
    go through the UNet together, exactly as when that image is made alone. Batched convolution
    kernels (oneDNN, cuDNN) round differently for different batch sizes, so this is what makes an
    image bit-identical whatever batch it was made in.
    """

    def __init__(self, model, multiple: int = 1, n_images: Optional[int] = None):
        self._model = model
        self._multiple = multiple
        self._n = n_images

    def __getattr__(self, name):
        return getattr(self._model, name)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond=None, **kwargs):
        n = self._n
        if not n or n == 1 or x.shape[0] % n:
            return self._padded(x, t, cond, **kwargs)
        groups = x.shape[0] // n
        out = None
        for k in range(n):
            rows = torch.arange(k, x.shape[0], n, device=x.device)                      # [groups]
            piece = self._padded(x[rows], t[rows] if t.ndim else t, _take_rows(cond, rows, x.shape[0]), **kwargs)
            if out is None:
                out = piece.new_empty((groups * n, *piece.shape[1:]))
            out[rows] = piece
        return out

    def _padded(self, x: torch.Tensor, t: torch.Tensor, cond, **kwargs):
        h, w = x.shape[-2:]
        ph, pw = (-h) % self._multiple, (-w) % self._multiple
        if not ph and not pw:
            return self._model.apply_model(x, t, cond, **kwargs)

        def pad(y: torch.Tensor) -> torch.Tensor:
            return F.pad(y, (0, pw, 0, ph), mode="replicate")

        if isinstance(cond, Mapping) and cond.get("c_concat"):
            cond = {**cond, "c_concat": [pad(c) for c in cond["c_concat"]]}
        return self._model.apply_model(pad(x), t, cond, **kwargs)[..., :h, :w]


def _take_rows(cond, rows: torch.Tensor, batch: int):
    """``cond`` (tensor, list or dict of them) with only ``rows`` of its batch dimension."""
    if isinstance(cond, torch.Tensor):
        return cond[rows.to(cond.device)] if cond.ndim and cond.shape[0] == batch else cond
    if isinstance(cond, Mapping):
        return {key: _take_rows(value, rows, batch) for key, value in cond.items()}
    if isinstance(cond, (list, tuple)):
        return [_take_rows(value, rows, batch) for value in cond]
    return cond


def _generators(seeds: Sequence[int]) -> list:
    from ldm.devices import seed_generators

    return [seed_generators(int(s), 1)[0] for s in seeds]


def _as_list(value: Union[str, Sequence[str]], n: int, what: str) -> list:
    if isinstance(value, str):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise UserInputError(f"got {len(value)} {what}s for {n} images; pass one {what} or one per image")
    return value


def _expand(prompts: Union[str, Sequence[str]], seeds: Union[int, Sequence[int]], n: Optional[int]):
    """Prompts and seeds, one per image: a single prompt is repeated, a single seed counts up."""
    if n is None:
        n = 1 if isinstance(prompts, str) else len(prompts)
        if isinstance(prompts, str) and not isinstance(seeds, (int, np.integer)):
            n = len(seeds)
    if n < 1:
        raise UserInputError("no images requested; pass at least one prompt")
    prompts = _as_list(prompts, n, "prompt")
    if isinstance(seeds, (int, np.integer)):
        seeds = [int(seeds) + k for k in range(n)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != n:
        raise UserInputError(f"got {len(seeds)} seeds for {n} images; pass one seed (counted up per image) or "
                             "one per image")
    return prompts, seeds


def _binary_mask(mask: Union[Image.Image, np.ndarray]) -> np.ndarray:
    """``True`` where the mask says repaint: gray level >= 128 (``mask / 255 >= 0.5``, the reference)."""
    a = np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask)
    return a >= 128 if a.dtype == np.uint8 else a >= 0.5


def _pad_image(a: np.ndarray, multiple: int) -> np.ndarray:
    """Pad ``[H, W, ...]`` at the bottom and right by repeating the edge, to multiples of ``multiple``."""
    h, w = a.shape[:2]
    widths = [(0, (-h) % multiple), (0, (-w) % multiple)] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, widths, mode="edge") if any(p for _, p in widths) else a


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------
class StableDiffusion:
    """A loaded model with txt2img / img2img / inpaint methods.

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

    def __init__(self, model, *, model_name: Optional[str] = None, model_hash: Optional[str] = None,
                 safety_checker=None, safety_status: str = SAFETY_OFF, progress: bool = True,
                 exact_batches: bool = True):
        self.model = model
        self.exact_batches = exact_batches
        self.model_name = model_name
        self.model_hash = model_hash
        self.safety_checker = safety_checker
        self.safety_status = safety_status
        self.progress = progress
        self._warned_prompts: set = set()

    @classmethod
    def from_files(cls, config: Union[PathLike, Mapping[str, Any]], ckpt: PathLike, *, device: str = "auto",
                   precision: str = "auto", use_ema: Optional[bool] = None,
                   safety_checker: Union[None, PathLike, Any] = None, safety_status: str = SAFETY_OFF,
                   hash_checkpoint: bool = True, progress: bool = True,
                   exact_batches: bool = True) -> "StableDiffusion":
        """Load a config and checkpoint.

        :param config: a YAML path or a loaded config.
        :param ckpt: ``.ckpt`` / ``.safetensors`` (format by extension).
        :param device: ``auto`` (CUDA, MPS, CPU), ``cpu``, ``cuda[:N]``, ``mps``.
        :param precision: ``auto`` (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32),
            ``full``/``fp32``, ``fp16``, ``bf16``, ``autocast`` (fp16 on CUDA, else fp32: the reference).
        :param use_ema: None: as the config says (``ema_scope``); True: run the EMA weights of a
            full-EMA checkpoint; False: run the non-EMA weights.
        :param safety_checker: a loaded checker, the folder of its files, or None (off).
        :param exact_batches, progress: see the class.
        :raises UserInputError / CheckpointError: one-line messages.
        """
        from ldm.checkpoint import load_model_from_config
        from ldm.devices import pick_device, resolve_precision

        if not isinstance(config, Mapping) and not hasattr(config, "get"):
            config = load_config(config)
        dev = pick_device(device)
        dtype = resolve_precision(precision, dev)
        checker = safety_checker
        if isinstance(checker, (str, os.PathLike)):
            checker = load_safety_checker(checker, dev)
        log.info("loading model from %s (%s, %s)", ckpt, dev, str(dtype).replace("torch.", ""))
        model = load_model_from_config(config, ckpt, device=dev, dtype=dtype, use_ema=use_ema)
        digest = None
        if hash_checkpoint:
            from ldm.metadata import model_hash

            log.info("computing the model hash of %s for the metadata", ckpt)
            digest = model_hash(ckpt)
        return cls(model, model_name=Path(ckpt).stem, model_hash=digest, safety_checker=checker,
                   safety_status=safety_status, progress=progress, exact_batches=exact_batches)

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
        return int(self.model.first_stage_model.downsample_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.model.channels)

    @property
    def kind(self) -> str:
        """``"txt2img"``, ``"sd-inpaint"`` or ``"ldm-inpaint"`` (see :class:`ModelGeometry`)."""
        if self.model.cond_stage_model is self.model.first_stage_model:
            return "ldm-inpaint"
        if self.model.model.conditioning_key == "hybrid":
            return "sd-inpaint"
        return "txt2img"

    def check_size(self, width: int, height: int) -> None:
        """:raises UserInputError: when a side is not a positive multiple of the autoencoder's factor."""
        f = self.factor
        for name, v in (("width", width), ("height", height)):
            if v < f or v % f:
                raise UserInputError(f"{name} {v} is not a multiple of {f}; use a size such as {max(f, v - v % f)} "
                                     f"(sides must be multiples of {f} for this model)")

    # -- public methods ---------------------------------------------------------------------------
    @torch.no_grad()
    def txt2img(self, prompts: Union[str, Sequence[str]], seeds: Union[int, Sequence[int]] = 42, *,
                n: Optional[int] = None, negative_prompt: Union[str, Sequence[str]] = "", steps: int = 50,
                sampler: str = "ddim", scale: float = 7.5, eta: Optional[float] = None, width: int = 512,
                height: int = 512) -> GenerationResult:
        """Images from text; one batch.

        :param prompts: one prompt (repeated ``n`` times) or one per image.
        :param seeds: one seed (image ``k`` gets ``seed + k``) or one per image.
        :param n: number of images (default: one per prompt, or per seed).
        :param negative_prompt: the unconditional prompt of guidance, one or one per image.
        :param sampler: a name of :data:`ldm.models.diffusion.registry.SAMPLER_NAMES`.
        :param eta: DDIM / Euler a noise amount (None: their defaults, 0 and 1).
        :returns: :class:`GenerationResult` with ``width x height`` RGB images.
        """
        self._require("txt2img", ("txt2img",))
        prompts, seeds = _expand(prompts, seeds, n)
        negatives = _as_list(negative_prompt, len(prompts), "negative prompt")
        self.check_size(width, height)
        c, uc = self._text_conditioning(prompts, negatives, scale)
        generators = _generators(seeds)
        shape = (self.latent_channels, height // self.factor, width // self.factor)
        z = self._sample(sampler, steps, shape, c, uc, scale, eta, generators)
        records = self._records("txt2img", prompts, negatives, seeds, sampler, steps, scale, eta, width, height)
        return self._finish(self.decode(z), records)

    @torch.no_grad()
    def img2img(self, prompts: Union[str, Sequence[str]], init_image: Image.Image,
                seeds: Union[int, Sequence[int]] = 42, *, n: Optional[int] = None, strength: float = 0.75,
                negative_prompt: Union[str, Sequence[str]] = "", steps: int = 50, sampler: str = "ddim",
                scale: float = 5.0, eta: Optional[float] = None) -> GenerationResult:
        """Variations of ``init_image``: it is encoded (a posterior sample, as the reference), noised
        to the level of ``strength`` and denoised over the last ``int(strength * steps)`` steps.

        :param init_image: RGB PIL image whose sides are multiples of the autoencoder factor
            (8 for SD; see :func:`ldm.image_io.resize_to_multiple`).
        :param strength: in ``[0, 1]``; 1 ignores the image's content, 0 returns it re-encoded.
        Other parameters as :meth:`txt2img`.
        """
        self._require("img2img", ("txt2img",))
        if not 0.0 <= strength <= 1.0:
            raise UserInputError(f"strength {strength} is outside [0, 1]; pass a strength such as 0.75")
        prompts, seeds = _expand(prompts, seeds, n)
        negatives = _as_list(negative_prompt, len(prompts), "negative prompt")
        image = init_image.convert("RGB") if init_image.mode != "RGB" else init_image
        self.check_size(*image.size)
        c, uc = self._text_conditioning(prompts, negatives, scale)
        generators = _generators(seeds)
        z0 = self._encode(image, generators)
        if strength == 0:
            log.info("strength 0: the init image is only encoded and decoded")
            z = z0
        else:
            from ldm.models.diffusion.sampling import start_step_for_strength

            start = start_step_for_strength(steps, strength)
            z = self._sample(sampler, steps, tuple(z0.shape[1:]), c, uc, scale, eta, generators, x0=z0,
                             start_step=start)
        records = self._records("img2img", prompts, negatives, seeds, sampler, steps, scale, eta, *image.size,
                                strength=strength)
        return self._finish(self.decode(z), records)

    @torch.no_grad()
    def inpaint(self, prompts: Union[str, Sequence[str]], image: Image.Image, mask: Union[Image.Image, np.ndarray],
                seeds: Union[int, Sequence[int]] = 42, *, n: Optional[int] = None,
                negative_prompt: Union[str, Sequence[str]] = "", steps: int = 50, sampler: str = "ddim",
                scale: float = 7.5, eta: Optional[float] = None) -> GenerationResult:
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
        self._require("inpaint", ("txt2img", "sd-inpaint"))
        prompts, seeds = _expand(prompts, seeds, n)
        negatives = _as_list(negative_prompt, len(prompts), "negative prompt")
        image, repaint, width, height = self._inpaint_inputs(image, mask)
        c, uc = self._text_conditioning(prompts, negatives, scale)
        generators = _generators(seeds)
        pixels = self._pixels(image)                                               # [1, 3, H, W] in [-1, 1]
        m = torch.from_numpy(_pad_image(repaint, self.factor).astype(np.float32))[None, None].to(self.device)
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

    @torch.no_grad()
    def inpaint_ldm(self, image: Image.Image, mask: Union[Image.Image, np.ndarray], seed: int = 42, *,
                    steps: int = 50, sampler: str = "ddim", eta: Optional[float] = None) -> GenerationResult:
        """The original ``scripts/inpaint.py`` with the LDM inpainting_big model (no text).

        ``image`` in [0, 1], mask thresholded to {0, 1}, ``masked = (1 - mask)·image``; all three
        mapped to [-1, 1]; conditioning ``cat([VQ encoding of masked (not quantised), mask resized
        to the latent (nearest)])``; DDIM, no guidance; the known pixels are then pasted back from
        ``image`` (the reference's ``(1 - m)·image + m·pred``, exact in 8 bits).
        """
        self._require("inpaint_ldm", ("ldm-inpaint",))
        image, repaint, width, height = self._inpaint_inputs(image, mask)
        f = self.factor
        img01 = torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0)[None].permute(0, 3, 1, 2)
        m = torch.from_numpy(_pad_image(repaint, f).astype(np.float32))[None, None]
        masked01 = (1 - m) * img01
        # the VQ encoder is the first stage (float32 after an overflowing half-precision decode)
        masked = (masked01 * 2.0 - 1.0).to(self.device, self.model.first_stage_dtype)
        c = self.model.get_learned_conditioning(masked)                            # [1, C, h, w]
        mask_pm1 = (m * 2.0 - 1.0).to(self.device, c.dtype)
        cc = F.interpolate(mask_pm1, size=c.shape[-2:])                             # nearest
        cond = torch.cat([c, cc], dim=1)
        generators = _generators([seed])
        shape = (cond.shape[1] - 1, *cond.shape[2:])
        z = self._sample(sampler, steps, shape, {"c_concat": [cond]}, None, 1.0, eta, generators)
        x = self.decode(z)[..., :height, :width]
        records = self._records("ldm-inpaint", [""], [""], [seed], sampler, steps, 1.0, eta, width, height)
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
    def _require(self, method: str, kinds: Sequence[str]) -> None:
        kind = self.kind
        if kind in kinds:
            return
        hints = {"ldm-inpaint": "this is the LDM inpainting model: use inpaint_ldm() (scripts/inpaint.py --indir)",
                 "sd-inpaint": "this is an SD inpainting checkpoint: use inpaint() (scripts/inpaint.py --init-img "
                               "--mask), or load an ordinary SD checkpoint",
                 "txt2img": "this model has no inpainting conditioning: use inpaint() "
                            "(scripts/inpaint.py --init-img --mask --prompt)"}
        raise UserInputError(f"{method} cannot run this model; {hints.get(kind, 'load a matching model')}")

    def _records(self, mode, prompts, negatives, seeds, sampler, steps, scale, eta, width, height, strength=None):
        eta_used = None
        if sampler in _ETA_DEFAULTS:
            eta_used = _ETA_DEFAULTS[sampler] if eta is None else float(eta)
        elif eta:
            eta_used = float(eta)
        return [ImageRecord(mode, p, neg, s, sampler, int(steps), float(scale), int(width), int(height),
                            eta=eta_used, strength=strength, model_name=self.model_name,
                            model_hash=self.model_hash) for p, neg, s in zip(prompts, negatives, seeds)]

    def _warn_truncated(self, texts: Sequence[str]) -> None:
        tokenize = getattr(self.model.cond_stage_model, "tokenize", None)
        new = [t for t in dict.fromkeys(texts) if t not in self._warned_prompts]
        if not callable(tokenize) or not new:
            return
        self._warned_prompts.update(new)
        dropped = getattr(tokenize(list(new)), "dropped", None) or []
        limit = getattr(self.model.cond_stage_model, "max_length", 77)
        for text, cut in zip(new, dropped):
            if cut:
                log.warning("prompt longer than %d tokens, these words are ignored: %r (prompt: %r)", limit, cut,
                            text if len(text) <= 80 else text[:77] + "...")

    def _text_conditioning(self, prompts: Sequence[str], negatives: Sequence[str], scale: float):
        """``c`` for the prompts and, when ``scale != 1``, ``uc`` for the negative prompts ("")."""
        self._warn_truncated(list(prompts) + [n for n in negatives if n])
        c = self.model.get_learned_conditioning(list(prompts))
        uc = None
        if scale != 1.0:
            uc = self.model.get_learned_conditioning(list(negatives))
        elif any(negatives):
            log.warning("the negative prompt has no effect with guidance scale 1")
        return c, uc

    def _sample(self, sampler: str, steps: int, shape, cond, uncond, scale, eta, generators, *, x0=None, mask=None,
                start_step: int = 0) -> torch.Tensor:
        from ldm.models.diffusion.registry import make_sampler

        multiple = 2 ** (len(self.model.model.diffusion_model.channel_mult) - 1)
        if shape[1] % multiple or shape[2] % multiple:
            log.info("latent size %dx%d is not a multiple of %d: padded inside each UNet call", shape[2], shape[1],
                     multiple)
        else:
            multiple = 1
        engine = make_sampler(sampler, _UNetView(self.model, multiple, len(generators) if self.exact_batches else None))
        with self.model.ema_scope():
            z, _ = engine.sample(S=int(steps), batch_size=len(generators), shape=tuple(shape), conditioning=cond,
                                 unconditional_guidance_scale=scale, unconditional_conditioning=uncond, eta=eta,
                                 x0=x0, mask=mask, start_step=start_step, generator=generators,
                                 verbose=self.progress)
        return z

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        """``[1, 3, H, W]`` in [-1, 1] on the model's device, sides padded to multiples of the factor."""
        from ldm.image_io import image_to_tensor

        padded = Image.fromarray(_pad_image(np.asarray(image), self.factor))
        return image_to_tensor(padded).to(self.device)

    def _encode(self, image: Image.Image, generators) -> torch.Tensor:
        """Latents ``[B, C, h, w]`` of one image, a posterior sample per generator (the reference
        encoded the image repeated B times; the posterior is the same for each copy)."""
        posterior = self.model.encode_first_stage(self._pixels(image))
        return torch.cat([self.model.get_first_stage_encoding(posterior, generator=[g]) for g in generators])

    def _inpaint_inputs(self, image: Image.Image, mask):
        image = image.convert("RGB") if image.mode != "RGB" else image
        repaint = _binary_mask(mask)
        if repaint.shape != (image.height, image.width):
            raise UserInputError(f"the mask is {repaint.shape[1]}x{repaint.shape[0]} but the image is "
                                 f"{image.width}x{image.height}; give a mask of the same size")
        if not repaint.any():
            log.warning("the mask has no white pixels: nothing to repaint, the image comes back unchanged")
        return image, repaint, image.width, image.height

    def _finish(self, x: torch.Tensor, records: list, keep=None) -> GenerationResult:
        """Decoded ``[B, 3, H, W]`` -> 8-bit PIL images (truncation, as the reference wrote them),
        the known pixels pasted back, checked by the safety checker (on rounded pixels, as the
        reference's checker input), flagged ones replaced by a placeholder."""
        from ldm.image_io import tensor_to_uint8
        from ldm.safety_checker import placeholder_image

        out = tensor_to_uint8(x)                                                    # [B, H, W, 3] truncated
        x01 = torch.clamp((x.float() + 1.0) / 2.0, 0.0, 1.0).cpu().permute(0, 2, 3, 1).numpy()
        rounded = (x01 * 255).round().astype(np.uint8)                              # the checker's input
        if keep is not None:
            original, known = keep
            out = np.where(known[None, :, :, None], original[None], out)
            rounded = np.where(known[None, :, :, None], original[None], rounded)
        flags = [False] * len(out)
        if self.safety_checker is not None:
            flags = self.safety_checker.check(rounded)
        images = []
        for k, (pixels, flag, record) in enumerate(zip(out, flags, records)):
            record.nsfw = bool(flag)
            if self.safety_checker is None:
                record.safety = self.safety_status
            else:
                record.safety = SAFETY_FLAGGED if flag else SAFETY_PASSED
            images.append(placeholder_image(pixels.shape[1], pixels.shape[0]) if flag else Image.fromarray(pixels))
        if any(flags):
            log.warning("safety checker flagged the image(s) of seed %s: replaced by a placeholder",
                        ", ".join(str(r.seed) for r in records if r.nsfw))
        return GenerationResult(images, records)


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


# --------------------------------------------------------------------------------------------
# Writing results
# --------------------------------------------------------------------------------------------
class ImageWriter:
    """Writes images as the reference scripts laid them out, with watermark and metadata.

    ``outdir/samples/00000.png, 00001.png, ...`` and ``outdir/grid-0000.png``; numbers continue
    after what is there and nothing is ever overwritten, also with several runs writing at once
    (:func:`ldm.image_io.save_numbered`). Every file gets the invisible watermark (images under
    256x256 cannot hold it: logged once and recorded as ``Watermark: none (too small)``) and the
    ``parameters`` text of its record.

    :param save_samples: write each image (``--skip_save`` turns it off).
    :param save_grid: keep images for :meth:`write_grid` (``--skip_grid`` turns it off).
    """

    def __init__(self, outdir: PathLike, *, sample_dir: Optional[str] = "samples", save_samples: bool = True,
                 save_grid: bool = True):
        self.outdir = Path(outdir)
        self.sample_dir = self.outdir / sample_dir if sample_dir else self.outdir
        self.save_samples = save_samples
        self.save_grid = save_grid
        self.grid_images: list = []
        self.grid_records: list = []
        self._told_small = False

    def add(self, result: GenerationResult) -> list:
        """Write the images of ``result`` (unless ``save_samples`` is off); returns their paths."""
        paths = []
        for image, record in zip(result.images, result.records):
            if self.save_samples:
                paths.append(self.write(image, record, self.sample_dir))
            if self.save_grid:
                self.grid_images.append(np.asarray(image))
                self.grid_records.append(record)
        return paths

    def write(self, image: Image.Image, record: ImageRecord, folder: PathLike, pattern: str = "{:05}.png",
              name: Optional[str] = None) -> Path:
        """Watermark ``image``, set ``record.watermark`` and write it with its metadata.

        :param name: write ``folder/name`` (``stem-1.png``, ``stem-2.png``, ... when taken) instead
            of the next number of ``pattern``.
        """
        from ldm.image_io import save_named, save_numbered
        from ldm.metadata import pnginfo

        marked, record.watermark = self._watermark(image)
        info = pnginfo(record.parameters())
        try:
            if name is None:
                return save_numbered(marked, folder, pattern, pnginfo=info)
            return save_named(marked, folder, name, info)
        except OSError as exc:
            raise UserInputError(f"cannot write into {folder} ({exc.strerror or exc}); pass --outdir with a folder "
                                 "you can write to and that has free space") from None

    def write_grid(self, n_per_row: int) -> Optional[Path]:
        """Write one grid of every image added so far, ``n_per_row`` per row; None when there are none."""
        from ldm.image_io import make_grid

        if not self.save_grid or not self.grid_images:
            return None
        if len({a.shape for a in self.grid_images}) > 1:
            log.warning("images of different sizes: no grid written")
            return None
        grid = Image.fromarray(make_grid(self.grid_images, nrow=max(1, int(n_per_row))))
        first = self.grid_records[0]  # the grid carries the parameters of its first image
        record = ImageRecord(**{**vars(first), "extra": {**first.extra, "Grid": f"{len(self.grid_images)} images"}})
        if any(r.nsfw for r in self.grid_records):
            record.safety = f"{sum(r.nsfw for r in self.grid_records)} image(s) replaced by a placeholder"
        return self.write(grid, record, self.outdir, "grid-{:04}.png")

    def _watermark(self, image: Image.Image):
        from ldm.watermark import WATERMARK_TEXT, add_watermark

        marked, ok = add_watermark(image)
        if ok:
            return marked, WATERMARK_TEXT
        if not self._told_small:
            log.info("images under 256x256 pixels cannot hold the invisible watermark; their metadata says "
                     "'Watermark: %s'", WATERMARK_TOO_SMALL)
            self._told_small = True
        return marked, WATERMARK_TOO_SMALL
