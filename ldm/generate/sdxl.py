"""SDXL in the pipeline (:class:`SDXLMixin`): micro-conditioning, the unconditional branch, the
samplers on the model's own grid, and two-stage generation with the refiner.

Conditioning (what sgm's ``get_batch`` + ``GeneralConditioner`` build): the prompts, and per image
``original_size_as_tuple`` (h, w), ``crop_coords_top_left`` (top, left), ``target_size_as_tuple``
(h, w) (base) or ``aesthetic_score`` (refiner), all raw pixel numbers, **height first**
(:class:`MicroConditioning`; sgm's defaults: original size 1024x1024 for the base and the image
size for the refiner, crop (0, 0), target = the image size, aesthetic 6.0 / negative 2.5).

Unconditional branch of guidance:

* **base, no negative prompt**: the text embeddings are zeros (``crossattn`` and the pooled part
  of ``vector``), as sgm's SDXL base (``force_uc_zero_embeddings=["txt"]``); the size parts equal
  the conditional ones;
* **base, a negative prompt**: it is encoded and used (what diffusers and A1111 users expect; sgm
  ignores it). Per image: an image whose negative prompt is empty still gets zeros;
* **refiner**: the negative prompt (``""`` by default) is always encoded, with the negative
  aesthetic score (sgm's ``is_legacy`` path).

Samplers: the k-diffusion family (``euler``, ``euler_a``, ``heun``, ``dpmpp_2m``, ``lms``) runs on
the model's own discretization, as sgm's samplers do: ``n`` levels at integer timesteps
``linspace(999, 0, n, endpoint=False)`` plus 0, the start noise scaled by ``sqrt(1 + sigma_max²)``,
and the UNet called at the nearest level's index. ``dpmpp_2m_karras``, ``ddim``, ``plms`` and
``dpm_solver`` run on their own grids, as for every model.

Two stages (``refiner`` set, :meth:`SDXLMixin.set_refiner`): sgm's "finish denoising with refiner":
of ``n`` steps the refiner runs the last ``int(strength·(n + 1)) - 1`` (strength 0.15: 6 of 50),
starting from the base's noisy latent at that very level (no new noise); or, with mode ``"image"``,
the base finishes, its image is decoded and the refiner runs img2img at ``strength``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple

import torch

from ldm.errors import UserInputError
from ldm.models.diffusion.denoiser import TimestepLookup, to_sigma_space
from ldm.models.diffusion.k_diffusion import K_SAMPLERS, KDiffusionSampler
from ldm.models.diffusion.registry import make_sampler
from ldm.models.diffusion.sampling import start_step_for_strength

__all__ = ["MicroConditioning", "conditioning_batch", "SDXLMixin", "ModelGridSampler", "refiner_steps",
           "REFINER_MODES"]

log = logging.getLogger(__name__)

Size = Tuple[int, int]
REFINER_MODES = ("latent", "image")
_MAX_SIDE = 16384


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size and aesthetic conditioning; None = sgm's default (see the module doc).

    :ivar original_size: ``(height, width)`` the image claims to have been before cropping.
    :ivar crop_top_left: ``(top, left)`` of the crop.
    :ivar target_size: ``(height, width)`` aimed at.
    :ivar aesthetic_score, negative_aesthetic_score: the refiner's score for the prompt and for the
        unconditional branch.
    """

    original_size: Optional[Size] = None
    crop_top_left: Size = (0, 0)
    target_size: Optional[Size] = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    def check(self) -> "MicroConditioning":
        """:raises UserInputError: one line naming the value and the range."""
        for name, pair, low in (("original_size", self.original_size, 1), ("target_size", self.target_size, 1),
                                ("crop_top_left", self.crop_top_left, 0)):
            if pair is not None and (len(pair) != 2 or any(int(v) != v or not low <= v <= _MAX_SIDE for v in pair)):
                raise UserInputError(f"--{name} {' '.join(map(str, pair))}: give two whole numbers of pixels in "
                                     f"[{low}, {_MAX_SIDE}] (height first)")
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            value = getattr(self, name)
            if not 0.0 <= value <= 10.0:
                raise UserInputError(f"--{name} {value} is outside [0, 10] (the refiner's scores; sgm uses 6 and 2.5)")
        return self


def conditioning_batch(keys: Sequence[str], prompts: Sequence[str], size: Size, micro: MicroConditioning, *,
                       refiner: bool, negative: bool = False, device=None) -> dict:
    """The conditioner's batch for ``prompts`` (sgm's ``get_batch``): every key in ``keys`` as
    ``[B, 2]`` int64 (sizes, height first) or ``[B]`` float (aesthetic score), ``txt`` as a list.

    :param size: ``(height, width)`` of the image being made.
    :param negative: the unconditional batch (takes ``negative_aesthetic_score``).
    """
    n = len(prompts)
    original = micro.original_size or (tuple(size) if refiner else (1024, 1024))
    values = {"original_size_as_tuple": original, "crop_coords_top_left": micro.crop_top_left,
              "target_size_as_tuple": micro.target_size or tuple(size)}
    batch = {"txt": list(prompts)}
    for key in keys:
        if key in values:
            batch[key] = torch.tensor([list(map(int, values[key]))] * n, device=device)
        elif key == "aesthetic_score":
            score = micro.negative_aesthetic_score if negative else micro.aesthetic_score
            batch[key] = torch.full((n,), float(score), device=device)
        elif key != "txt":
            raise UserInputError(f"the SDXL conditioner needs {key!r}, which the pipeline does not provide")
    return batch


def refiner_steps(steps: int, strength: float) -> int:
    """How many of ``steps`` the refiner runs when it finishes the base's denoising (sgm's
    ``Img2ImgDiscretizationWrapper`` / ``Txt2NoisyDiscretizationWrapper`` pair):
    ``int(strength·(steps + 1)) - 1``.

    :raises UserInputError: when that is no step at all, or every step."""
    if not 0.0 < strength < 1.0:
        raise UserInputError(f"--refiner_strength {strength} must be in (0, 1) (sgm's default: 0.15)")
    k = int(strength * (steps + 1)) - 1
    if not 1 <= k < steps:
        raise UserInputError(f"--refiner_strength {strength} with {steps} steps leaves the refiner {max(k, 0)} steps; "
                             "raise the strength or the steps")
    return k


class ModelGridSampler(KDiffusionSampler):
    """A k-diffusion-family sampler (not ``_karras``) on the model's own discretization (sgm's
    samplers, see the module doc); ``stop_step`` ends the run early at that step's level (the base
    of two stages) and returns the noisy latent there."""

    def __init__(self, model, sampler: str = "euler", device=None, stop_step: Optional[int] = None):
        super().__init__(model, sampler, device=device)
        self.stop_step = stop_step

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0.0, verbose=True):
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)
        self.sigmas = self.model.denoiser.discretization(ddim_num_steps, device=self.device)

    def _plan(self, steps, eta, temperature, verbose=False):
        plan = super()._plan(steps, eta, temperature, verbose)
        table = self.model.denoiser.sigmas.to(self.device)
        sigmas = plan.sigmas if self.stop_step is None else plan.sigmas[:self.stop_step + 1]
        return replace(plan, sigmas=sigmas, noise_times_sigma=False,
                       timesteps=TimestepLookup(table, torch.arange(len(table), device=table.device)))


class SDXLMixin:
    """SDXL conditioning, samplers and the refiner stage of :class:`ldm.generate.StableDiffusion`."""

    micro_conditioning: MicroConditioning = MicroConditioning()
    refiner = None                # a StableDiffusion with an SDXL refiner, see set_refiner
    refiner_strength: float = 0.15
    refiner_mode: str = "latent"

    def set_refiner(self, refiner, strength: float = 0.15, mode: str = "latent") -> None:
        """Finish every :meth:`txt2img` with ``refiner`` (a loaded SDXL refiner pipeline).

        :param mode: ``"latent"`` (hand the noisy latent over at the same level) or ``"image"``
            (decode, then img2img at ``strength``)."""
        if mode not in REFINER_MODES:
            raise UserInputError(f"refiner mode {mode!r}: choose one of {', '.join(REFINER_MODES)}")
        if refiner.spec.family.name != "sdxl-refiner" or self.spec.family.name != "sdxl-base":
            raise UserInputError(f"a refiner stage needs an SDXL base and an SDXL refiner; got "
                                 f"{self.spec.family.title} and {refiner.spec.family.title}")
        if not 0.0 < strength < 1.0:
            raise UserInputError(f"refiner strength {strength} must be in (0, 1) (sgm's default: 0.15)")
        self.refiner, self.refiner_strength, self.refiner_mode = refiner, float(strength), mode

    # -- conditioning -----------------------------------------------------------------------------
    def _sdxl_conditioning(self, prompts: Sequence[str], negatives: Sequence[str], scale: float,
                           size: Optional[Size]):
        """``(c, uc)`` dicts ``{"crossattn", "vector"}``; ``uc`` None when ``scale == 1``."""
        conditioner = self.model.conditioner
        keys, refiner = conditioner.input_keys, self.spec.family.name == "sdxl-refiner"
        size = tuple(size) if size is not None else (self.spec.height, self.spec.width)
        micro = self.micro_conditioning.check()
        warn = getattr(getattr(self, "text", None), "_warn_truncated", None)  # the pipeline's truncation warning
        if callable(warn):
            warn(list(prompts) + [n for n in negatives if n])
        c = conditioner(conditioning_batch(keys, prompts, size, micro, refiner=refiner, device=self.device))
        if scale == 1.0:
            if any(negatives):
                log.warning("the negative prompt has no effect with guidance scale 1")
            return c, None
        batch_uc = conditioning_batch(keys, negatives, size, micro, refiner=refiner, negative=True, device=self.device)
        zero = [not refiner and not neg for neg in negatives]
        uc = conditioner(batch_uc, force_zero_embeddings=["txt"]) if any(zero) else None
        if not all(zero):
            encoded = conditioner(batch_uc)
            if uc is None:
                uc = encoded
            else:
                rows = torch.tensor(zero, device=encoded["vector"].device)
                uc = {k: torch.where(rows.view(-1, *[1] * (v.ndim - 1)), uc[k], v) for k, v in encoded.items()}
        return c, uc

    # -- samplers ---------------------------------------------------------------------------------
    def _sampler_for(self, name: str, model, stop_step: Optional[int] = None):
        """The sampler ``name`` for ``model``; for SDXL the k-diffusion family on the model's grid."""
        if self.kind == "sdxl" and name in K_SAMPLERS and not K_SAMPLERS[name][1]:
            return ModelGridSampler(model, name, stop_step=stop_step)
        if stop_step is not None:
            raise UserInputError(f"the refiner's latent hand-off needs a sampler on the model's own levels "
                                 f"({', '.join(n for n, (_, k) in K_SAMPLERS.items() if not k)}); got {name}")
        return make_sampler(name, model)

    # -- two stages -------------------------------------------------------------------------------
    def _txt2img_latents(self, prompts, negatives, sampler, steps, shape, c, uc, scale, eta, generators):
        """txt2img's latents: the base alone, or base + refiner (see the module doc)."""
        if self.refiner is None:
            return self._sample(sampler, steps, shape, c, uc, scale, eta, generators)
        size = (shape[1] * self.factor, shape[2] * self.factor)
        ref = self.refiner
        rc, ruc = ref._sdxl_conditioning(prompts, negatives, scale, size)
        if self.refiner_mode == "image":
            images = self.decode(self._sample(sampler, steps, shape, c, uc, scale, eta, generators)).to(ref.device)
            z0 = torch.cat([ref.model.get_first_stage_encoding(ref.model.encode_first_stage(images[i:i + 1]),
                                                               generator=[g]) for i, g in enumerate(generators)])
            start = start_step_for_strength(steps, self.refiner_strength)
            return ref._sample(sampler, steps, shape, rc, ruc, scale, eta, generators, x0=z0, start_step=start)
        k = steps - refiner_steps(steps, self.refiner_strength)
        z = self._sample(sampler, steps, shape, c, uc, scale, eta, generators, stop_step=k)
        sigma = self.model.denoiser.discretization(steps)[k].to(z.device)
        x = to_sigma_space(z, sigma).to(ref.device)  # the state at that level: continued without new noise
        return ref._sample(sampler, steps, shape, rc, ruc, scale, eta, generators, x0=x, start_step=k,
                           x_T=torch.zeros_like(x))
