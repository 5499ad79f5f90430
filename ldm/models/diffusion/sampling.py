"""What every sampler shares: the noise helper, the img2img start step, and the :class:`Sampler`
base with the reference's ``sample(...)`` surface (input checks, start latent, progress bar,
callbacks, intermediates) running a core sampler function.

How a sampler runs (see docs/samplers.md)
-----------------------------------------
* A subclass (DDIM, PLMS, DPM-Solver, the k-diffusion family) turns ``S`` and ``eta`` into a
  :class:`SamplingPlan`: a grid of noise levels ``sigmas``, a function of
  :mod:`ldm.models.diffusion.solvers` and its options, and how the denoiser maps a level to the
  model's timestep.
* The model becomes a denoiser ``D(x, sigma) -> x0``: the guider (:mod:`.guidance`) on the raw
  model output, then the parameterisation adapter (eps / v, :mod:`.denoiser`), then the
  inpainting known-region rule.
* The solver runs in sigma space, ``x = x_t / sqrt(a) = x0 + sigma·eps`` with
  ``sigma = sqrt((1-a)/a)``; the base converts from and to the model's (variance-preserving)
  latents ``x_t = sqrt(a)·x0 + sqrt(1-a)·eps`` at the edges, ``a = alphas_cumprod[t]``.
* ``mask`` follows the reference (``ddim.py``): **1 marks the known region** to keep from ``x0``,
  0 the region to generate (see :class:`~ldm.models.diffusion.denoiser.DiscreteDenoiser`).
* Every random tensor comes from :func:`randn`, so one seed gives the same image on any device and
  for any batch size when a list of per-image generators is passed.
"""
from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from tqdm import tqdm

from ldm.errors import UserInputError
from ldm.models.diffusion.denoiser import (DiscreteDenoiser, TimestepLookup, from_sigma_space, scaling_for,
                                           to_sigma_space)
from ldm.models.diffusion.guidance import ClassifierFreeGuidance, Cond, GuidedModel, batch_of
from ldm.models.diffusion.catalog import resolve_eta

logger = logging.getLogger(__name__)

Generator = Union[torch.Generator, Sequence[torch.Generator], None]

__all__ = [
    "randn",
    "start_step_for_strength",
    "SamplingPlan",
    "Sampler",
    "ClassifierFreeGuidance",
]


# --------------------------------------------------------------------------------------------
# noise
# --------------------------------------------------------------------------------------------
def randn(shape: Sequence[int], generator: Generator = None, device=None,
          dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Standard normal noise, drawn where the generator lives (the CPU for CPU generators) in
    float32 and then moved, so a seed gives the same numbers on CPU, CUDA and MPS.

    :param shape: ``[B, ...]``.
    :param generator: ``None`` (the global CPU generator), one ``torch.Generator`` for the whole
        tensor, or a list of ``B`` generators: image ``k`` is drawn from generator ``k`` alone, so
        it does not depend on the batch size or on the other images.
    :param device: where the result goes (default: the CPU).
    :param dtype: dtype of the result (default float32); the draw itself is always float32.
    :returns: tensor of ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise UserInputError(
                f"got {len(generator)} generators for a batch of {shape[0]}; pass one generator per image")
        noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32)
                           for g in generator])
    else:
        where = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(shape, generator=generator, device=where, dtype=torch.float32)
    return noise.to(device=device if device is not None else noise.device, dtype=dtype or torch.float32)


def start_step_for_strength(steps: int, strength: float) -> int:
    """First step to run for img2img at ``strength`` over an ``steps``-step schedule.

    The reference's ``t_enc = int(strength·steps)`` steps are run, so the start is
    ``steps - t_enc``; the start latent is ``x0`` noised to that step's own level (see
    ``Sampler.sample(start_step=...)``). ``DDIMSampler.stochastic_encode`` + ``decode`` keep the
    reference's one-step-lower noise level instead.
    """
    if not 0.0 < strength <= 1.0:
        raise UserInputError(f"strength must be in (0, 1], got {strength}")
    t_enc = int(strength * steps)
    if t_enc < 1:
        raise UserInputError(f"strength {strength} with {steps} steps runs no step; raise strength or steps")
    return steps - t_enc


# --------------------------------------------------------------------------------------------
# the Sampler base
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingPlan:
    """What a :class:`Sampler` runs for one ``sample`` call.

    :ivar sigmas: ``[n + 1]`` noise levels visited, noisiest first (``n`` steps; see
        :mod:`ldm.models.diffusion.solvers`).
    :ivar solver: ``solver(denoiser, x, sigmas, *, callback, generator, **options) -> x``.
    :ivar options: extra keyword arguments of ``solver`` (``eta``, ``s_noise``, ``lower_order_final``).
    :ivar timesteps: the denoiser's level -> model timestep map (``"interpolate"``, ``"nearest"``
        or a callable, see :class:`~ldm.models.diffusion.denoiser.DiscreteDenoiser`).
    :ivar noise_times_sigma: start from ``sigmas[0]·x_T`` (k-diffusion's convention) instead of
        treating ``x_T`` as the model's latent at that level (the reference's).
    """

    sigmas: torch.Tensor
    solver: Callable
    options: Mapping[str, Any] = field(default_factory=dict)
    timesteps: Union[str, Callable] = "interpolate"
    noise_times_sigma: bool = False

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


def _on(timesteps, device):
    """A plan's timestep map with its tables on ``device``."""
    return timesteps.to(device) if isinstance(timesteps, TimestepLookup) else timesteps


class _Progress:
    """Solver callback: tqdm bar, the reference's ``callback(i)`` / ``img_callback(pred_x0, i)`` and
    the intermediates (latents in the model's scaling; converted only on logged steps)."""

    def __init__(self, x: torch.Tensor, total: int, log_every_t: int, callback, img_callback,
                 verbose: bool, desc: str):
        self.total = total
        self.log_every_t = log_every_t
        self.callback = callback
        self.img_callback = img_callback
        self.intermediates = {"x_inter": [x], "pred_x0": [x]}
        self.bar = tqdm(total=total, desc=desc, disable=not verbose)

    def __call__(self, info: Mapping[str, Any]) -> None:
        i, denoised = info["i"], info["denoised"]
        self.bar.update(1)
        if self.callback is not None:
            self.callback(i)
        if self.img_callback is not None:
            self.img_callback(denoised, i)
        index = self.total - i - 1
        if index % self.log_every_t == 0 or index == self.total - 1:
            self.intermediates["x_inter"].append(from_sigma_space(info["x"], info["sigma_next"]))
            self.intermediates["pred_x0"].append(denoised)

    def close(self) -> None:
        self.bar.close()


class Sampler:
    """Base of every sampler: the reference's ``sample(...)`` surface and its checks.

    A subclass sets ``name`` (its registry name) and provides ``make_schedule(S, ...)`` (the
    reference's schedule attributes) and ``_plan(steps, eta, temperature, verbose) -> SamplingPlan``, with
    ``eta`` already resolved by :func:`ldm.models.diffusion.registry.resolve_eta`.
    """

    name = ""
    desc = "Sampler"

    def __init__(self, model, device=None):
        for attr in ("alphas_cumprod", "apply_model"):
            if not hasattr(model, attr):
                raise TypeError(f"{type(self).__name__} needs a diffusion model with .{attr} "
                                f"(e.g. LatentDiffusion); got {type(model).__name__}")
        self.model = model
        self.ddpm_num_timesteps = int(getattr(model, "num_timesteps", len(model.alphas_cumprod)))
        if self.ddpm_num_timesteps != len(model.alphas_cumprod):
            raise ValueError(f"model.num_timesteps ({self.ddpm_num_timesteps}) != len(model.alphas_cumprod) "
                             f"({len(model.alphas_cumprod)})")
        self.device = torch.device(device) if device is not None else model.alphas_cumprod.device

    # -- helpers for subclasses ---------------------------------------------------------------
    def _alphas_cumprod(self) -> torch.Tensor:
        """The model's alpha bar as float32 on the CPU (the reference's ``alphas_cumprod.cpu()``)."""
        return self.model.alphas_cumprod.detach().to("cpu", torch.float32)

    def denoiser(self, cond: Cond = None, uncond: Cond = None, scale: float = 1.0, *, device=None,
                 timesteps="interpolate", mask: Optional[torch.Tensor] = None,
                 x0: Optional[torch.Tensor] = None) -> DiscreteDenoiser:
        """The model as ``D(x, sigma) -> x0``: guidance, then the model's parameterisation, then
        the known region of ``mask``."""
        alphas = self.model.alphas_cumprod.detach().to(device or self.device, torch.float32)
        scaling = scaling_for(getattr(self.model, "parameterization", "eps"))
        return DiscreteDenoiser(GuidedModel(self.model, cond, uncond, scale), alphas, scaling=scaling,
                                timesteps=timesteps, mask=mask, x0=x0)

    def _run(self, plan: SamplingPlan, x: torch.Tensor, denoiser: DiscreteDenoiser, progress: _Progress,
             generator: Generator = None) -> torch.Tensor:
        """Run ``plan.solver`` from the sigma-space state ``x`` at ``plan.sigmas[0]``; returns the
        model-scaled latent at ``plan.sigmas[-1]``."""
        try:
            x = plan.solver(denoiser, x, plan.sigmas, callback=progress, generator=generator, **plan.options)
        finally:
            progress.close()
        return from_sigma_space(x, plan.sigmas[-1])

    # -- entry point ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Cond = None,
               callback: Optional[Callable[[int], None]] = None, normals_sequence=None,
               img_callback: Optional[Callable[[torch.Tensor, int], None]] = None, quantize_x0: bool = False,
               eta: Optional[float] = None, mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
               temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector=None, corrector_kwargs=None,
               verbose: bool = True, x_T: Optional[torch.Tensor] = None, log_every_t: int = 100,
               unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Cond = None,
               generator: Generator = None, start_step: int = 0):
        """Draw ``batch_size`` latents of ``shape`` in ``S`` steps.

        :param S: number of steps (DDIM's ``uniform`` discretisation may give a few more, as the
            reference, when 1000 is not a multiple of S).
        :param batch_size, shape: the latents are ``[batch_size, *shape]`` (shape = ``(C, H, W)``).
        :param conditioning: ``[B, 77, D]`` tensor or dict (``c_crossattn`` / ``c_concat`` lists).
        :param callback: ``callback(i)`` after each step; ``img_callback(pred_x0, i)`` likewise.
        :param eta: DDIM noise amount (default 0); Euler ancestral's noise amount (default 1);
            other samplers accept only None/0 (:func:`~ldm.models.diffusion.registry.resolve_eta`).
        :param mask, x0: inpainting: ``mask`` is 1 on the known region, taken from latent ``x0``.
            ``x0`` is also the init latent for ``start_step > 0``.
        :param temperature: multiplies the fresh noise of stochastic steps (DDIM eta > 0, ancestral).
        :param verbose: show the progress bar and log the settings.
        :param x_T: the start noise ``[B, C, H, W]`` (standard normal); drawn with ``generator`` if None.
        :param log_every_t: keep every ``log_every_t``-th step in ``intermediates``.
        :param unconditional_guidance_scale, unconditional_conditioning: classifier-free guidance.
        :param generator: one ``torch.Generator`` or a list of one per image (see :func:`randn`).
        :param start_step: img2img: skip the first ``start_step`` steps of the ``S``-step schedule and
            start from ``x0`` noised with ``x_T`` to the level of step ``start_step`` (use
            :func:`start_step_for_strength`). 0 = start from pure noise ``x_T``.
        :returns: ``(samples [B,C,H,W], intermediates {"x_inter": [...], "pred_x0": [...]})``.
        :raises ValueError: for inconsistent inputs and options this implementation does not support
            (``normals_sequence``, ``quantize_x0``, ``noise_dropout``, ``score_corrector``).
        """
        unsupported = [name for name, value in (("normals_sequence", normals_sequence),
                                                ("score_corrector", score_corrector),
                                                ("corrector_kwargs", corrector_kwargs)) if value is not None]
        unsupported += ["quantize_x0"] if quantize_x0 else []
        unsupported += ["noise_dropout"] if noise_dropout != 0 else []
        if unsupported:
            raise UserInputError(f"{type(self).__name__}.sample: {', '.join(unsupported)} not supported by this "
                                 "implementation; leave at the default (None / False / 0)")
        size = self._check_inputs(S, batch_size, shape, conditioning, unconditional_conditioning, x_T, mask, x0,
                                  start_step, log_every_t)
        eta = resolve_eta(self.name, eta)
        plan = self._plan(int(S), eta, temperature, verbose=verbose)
        if start_step >= plan.steps:
            raise UserInputError(f"start_step={start_step} leaves no step of the {plan.steps}-step schedule to run")

        device = x_T.device if x_T is not None else (x0.device if x0 is not None else self.device)
        noise = x_T if x_T is not None else randn(size, generator, device)
        if verbose:
            logger.info("%s: %d steps of %d, latents %s, eta %s, guidance %.2f", type(self).__name__,
                        plan.steps - start_step, plan.steps, tuple(size), eta, unconditional_guidance_scale)
        sigmas = plan.sigmas[start_step:].to(device)
        plan = replace(plan, sigmas=sigmas, timesteps=_on(plan.timesteps, device))
        denoiser = self.denoiser(conditioning, unconditional_conditioning, unconditional_guidance_scale,
                                 device=device, timesteps=plan.timesteps, mask=mask, x0=x0)
        if start_step > 0:
            x = x0 + sigmas[0] * noise
        else:
            x = noise * sigmas[0] if plan.noise_times_sigma else to_sigma_space(noise, sigmas[0])
        start = noise if start_step == 0 and not plan.noise_times_sigma else from_sigma_space(x, sigmas[0])
        progress = _Progress(start, plan.steps, log_every_t, callback, img_callback, verbose, self.desc)
        x = self._run(plan, x, denoiser, progress, generator)
        if mask is not None:
            x = mask * x0 + (1 - mask) * x
        return x, progress.intermediates

    def _check_inputs(self, S, batch_size, shape, cond, uncond, x_T, mask, x0, start_step, log_every_t):
        """All user-input checks of ``sample`` in one place; returns the latent size ``[B,C,H,W]``."""
        if not isinstance(S, numbers.Integral) or isinstance(S, bool) or S < 1:
            raise UserInputError(f"S (number of steps) must be a positive int, got {S!r}")
        if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise UserInputError(f"batch_size must be a positive int, got {batch_size!r}")
        if len(shape) != 3:
            raise UserInputError(f"shape must be (C, H, W), got {tuple(shape)}")
        size = (batch_size, *(int(s) for s in shape))
        for name, c in (("conditioning", cond), ("unconditional_conditioning", uncond)):
            got = batch_of(c)
            if got is not None and got != batch_size:
                raise UserInputError(f"{name} has batch {got} but batch_size is {batch_size}; "
                                     f"repeat it to one entry per image")
        if x_T is not None and tuple(x_T.shape) != size:
            raise UserInputError(f"x_T has shape {tuple(x_T.shape)}, expected {size}")
        if not isinstance(start_step, numbers.Integral) or start_step < 0:
            raise UserInputError(f"start_step must be an int >= 0, got {start_step!r}")
        if (mask is not None or start_step > 0) and x0 is None:
            raise UserInputError("mask and start_step > 0 need x0 (the known / init latent)")
        if x0 is not None:
            if mask is None and start_step == 0:
                raise UserInputError("x0 is used only with a mask (inpainting) or start_step > 0 (img2img)")
            if tuple(x0.shape) != size:
                raise UserInputError(f"x0 has shape {tuple(x0.shape)}, expected {size}")
        if mask is not None:
            try:
                torch.broadcast_shapes(mask.shape, size)
            except RuntimeError:
                raise UserInputError(f"mask of shape {tuple(mask.shape)} does not broadcast to the latents "
                                     f"{size}; use [B or 1, 1, H, W]") from None
        if not isinstance(log_every_t, numbers.Integral) or log_every_t < 1:
            raise UserInputError(f"log_every_t must be a positive int, got {log_every_t!r}")
        return size

    # -- to be provided by subclasses -----------------------------------------------------------
    def _plan(self, steps: int, eta: Optional[float], temperature: float,
              verbose: bool = False) -> SamplingPlan:  # pragma: no cover
        raise NotImplementedError
