"""Pieces every sampler shares: the noise helper, classifier-free guidance, the model-output to
noise-estimate conversion (with the inpainting known-region replacement), the DDIM update, and the
``sample(...)`` entry point with its input checks, progress bar, callbacks and intermediates.

Conventions used by every sampler in this package
-------------------------------------------------
* Latents are in the model's (variance-preserving) scaling: ``x_t = sqrt(a)·x0 + sqrt(1-a)·eps``
  with ``a = alphas_cumprod[t]`` ("alpha bar"). The k-diffusion family works internally with
  ``x / sqrt(a)`` (noise level ``sigma = sqrt((1-a)/a)``) and converts at its edges.
* Model timesteps are index-valued (0..999) and may be fractional (DPM-Solver and the k-diffusion
  family pass floats); they are handed to ``model.apply_model`` as a ``[B]`` tensor.
* ``mask`` follows the reference (``ddim.py``): **1 marks the known region** to keep from ``x0``,
  0 the region to generate. See :class:`NoisePredictor` for how the known region is enforced.
* Every random tensor comes from :func:`randn`, so one seed gives the same image on any device and
  for any batch size when a list of per-image generators is passed.
"""
from __future__ import annotations

import logging
import numbers
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from tqdm import tqdm

from ldm.errors import UserInputError

logger = logging.getLogger(__name__)

Generator = Union[torch.Generator, Sequence[torch.Generator], None]
Cond = Union[torch.Tensor, Mapping[str, Any], None]

__all__ = [
    "randn",
    "ClassifierFreeGuidance",
    "NoisePredictor",
    "ddim_step",
    "eps_from_v",
    "start_step_for_strength",
    "Sampler",
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


# --------------------------------------------------------------------------------------------
# guidance and the noise estimate
# --------------------------------------------------------------------------------------------
def _batch_of(cond: Cond) -> Optional[int]:
    """Batch size of a conditioning tensor, or of the first tensor inside a dict/list."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond.shape[0]
    if isinstance(cond, Mapping):
        for value in cond.values():
            found = _batch_of(value)
            if found is not None:
                return found
        return None
    if isinstance(cond, (list, tuple)):
        return _batch_of(cond[0]) if cond else None
    return None


def _cat_cond(uncond: Cond, cond: Cond) -> Cond:
    """``cat([uncond, cond])`` along the batch, per key (and per list item) for dict conditionings."""
    if isinstance(cond, Mapping):
        if not isinstance(uncond, Mapping) or set(uncond) != set(cond):
            raise UserInputError("conditioning is a dict, so unconditional_conditioning must be a dict with the "
                                 f"same keys ({sorted(cond)}); got {type(uncond).__name__}")
        return {key: _cat_cond(uncond[key], value) for key, value in cond.items()}
    if isinstance(cond, (list, tuple)):
        if not isinstance(uncond, (list, tuple)) or len(uncond) != len(cond):
            raise UserInputError("conditioning and unconditional_conditioning lists differ in length")
        return [_cat_cond(u, c) for u, c in zip(uncond, cond)]
    return torch.cat([uncond, cond])


class ClassifierFreeGuidance:
    """The model with classifier-free guidance (Ho & Salimans 2022): ``out = out_u + s·(out_c - out_u)``.

    The UNet is called once on the batch ``cat([uncond, cond])`` with ``x`` and ``t`` duplicated (the
    reference's batch order). With ``scale == 1`` or no ``uncond`` it is one call on ``cond`` only.
    Guidance is applied to the raw model output (eps or v), before any conversion, as the reference.

    :param model: anything with ``apply_model(x [B,C,H,W], t [B], cond) -> [B,C,H,W]``.
    :param cond: tensor ``[B, ...]`` or dict ``{"c_crossattn": [tensor], "c_concat": [tensor]}``.
    :param uncond: same structure as ``cond`` (or None).
    :param scale: guidance scale ``s``.
    """

    def __init__(self, model, cond: Cond, uncond: Cond = None, scale: float = 1.0):
        self.model = model
        self.cond = cond
        self.scale = float(scale)
        self.guided = uncond is not None and self.scale != 1.0
        self.cond_in = _cat_cond(uncond, cond) if self.guided else cond

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """:param x: ``[B,C,H,W]``; :param t: ``[B]`` or a scalar tensor; :returns: ``[B,C,H,W]``."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if not self.guided:
            return self.model.apply_model(x, t, self.cond)
        out_u, out_c = self.model.apply_model(torch.cat([x, x]), torch.cat([t, t]), self.cond_in).chunk(2)
        return out_u + self.scale * (out_c - out_u)


def eps_from_v(v: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Noise estimate from a v prediction (Salimans & Ho 2022): ``eps = sqrt(a)·v + sqrt(1-a)·x_t``."""
    return alpha_bar.sqrt() * v + (1 - alpha_bar).sqrt() * x


class NoisePredictor:
    """``eps(x_t, t, a)``: guided model output turned into a noise estimate, with the known region
    of an inpainting mask enforced. Every sampler in the package calls the model through this.

    :param model: the diffusion model (``apply_model``, ``parameterization`` "eps" or "v").
    :param cond, uncond, scale: see :class:`ClassifierFreeGuidance`.
    :param mask: ``[B or 1, 1 or C, H, W]``, 1 = known (keep ``x0``), 0 = generate; or None.
    :param x0: the known latent ``[B,C,H,W]`` (required with ``mask``).

    Known region: where ``mask == 1`` the estimate is replaced by the noise that ``x_t`` carries
    relative to ``x0``, ``eps_known = (x_t - sqrt(a)·x0) / sqrt(1-a)``, i.e. the model is told the
    answer there. Then ``pred_x0 == x0`` in the known region and every sampler's update keeps it
    exactly on the forward-noising path of ``x0`` (for DDIM, PLMS, DPM-Solver(++), Euler, Heun,
    LMS; ancestral samplers add fresh noise to it, which is again a forward sample). No extra
    random numbers are used, so a mask of zeros reproduces plain sampling bit for bit. (The
    reference instead overwrote the known region of ``x_t`` with ``q_sample(x0, t)`` and fresh
    noise before each DDIM/PLMS step; both keep the known region on a forward path.) The samplers
    finish with ``x = mask·x0 + (1-mask)·x`` so the known region comes back exactly.
    """

    def __init__(self, model, cond: Cond, uncond: Cond = None, scale: float = 1.0,
                 mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None):
        self.guided = ClassifierFreeGuidance(model, cond, uncond, scale)
        self.parameterization = getattr(model, "parameterization", "eps")
        if self.parameterization not in ("eps", "v"):
            raise ValueError(f"model.parameterization is {self.parameterization!r}; the samplers support 'eps' and 'v'")
        self.mask = mask
        self.x0 = x0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """:param x: ``x_t`` ``[B,C,H,W]``; :param t: model timesteps ``[B]`` (int or float);
        :param alpha_bar: ``a`` at that noise level, a scalar tensor or ``[B,1,1,1]``.
        :returns: eps ``[B,C,H,W]``."""
        out = self.guided(x, t)
        eps = out if self.parameterization == "eps" else eps_from_v(out, x, alpha_bar)
        if self.mask is not None:
            eps_known = (x - alpha_bar.sqrt() * self.x0) / (1 - alpha_bar).sqrt()
            eps = self.mask * eps_known + (1 - self.mask) * eps
        return eps


# --------------------------------------------------------------------------------------------
# the DDIM update (DDIM and PLMS)
# --------------------------------------------------------------------------------------------
def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor,
              sigma: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
              sqrt_one_minus_a_t: Optional[torch.Tensor] = None):
    """One DDIM update (Song et al. 2021, eq. 12), the reference's float32 arithmetic::

        pred_x0 = (x - sqrt(1-a_t)·eps) / sqrt(a_t)
        x_prev  = sqrt(a_prev)·pred_x0 + sqrt(1 - a_prev - sigma²)·eps + sigma·noise

    :param x: ``x_t`` ``[B,C,H,W]``; :param eps: noise estimate, same shape.
    :param a_t, a_prev: alpha bar at this and at the next (less noisy) level, scalar tensors.
    :param sigma: ``eta·sqrt((1-a_prev)/(1-a_t)·(1-a_t/a_prev))`` (None or 0: deterministic).
    :param noise: standard normal ``[B,C,H,W]`` (already multiplied by any temperature); needed
        when ``sigma > 0``.
    :param sqrt_one_minus_a_t: ``sqrt(1 - a_t)`` if precomputed (the reference rounds it from
        float64; default: computed here in the dtype of ``a_t``).
    :returns: ``(x_prev, pred_x0)``.
    """
    if sqrt_one_minus_a_t is None:
        sqrt_one_minus_a_t = (1 - a_t).sqrt()
    pred_x0 = (x - sqrt_one_minus_a_t * eps) / a_t.sqrt()
    if sigma is None:
        sigma = torch.zeros_like(a_prev)
    x_prev = a_prev.sqrt() * pred_x0 + (1 - a_prev - sigma ** 2).sqrt() * eps
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, pred_x0


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
# progress, callbacks and intermediates
# --------------------------------------------------------------------------------------------
class _Progress:
    """tqdm bar + the reference's ``callback(i)`` / ``img_callback(pred_x0, i)`` + intermediates."""

    def __init__(self, x: torch.Tensor, total: int, log_every_t: int, callback, img_callback,
                 verbose: bool, desc: str):
        self.total = total
        self.log_every_t = log_every_t
        self.callback = callback
        self.img_callback = img_callback
        self.intermediates = {"x_inter": [x], "pred_x0": [x]}
        self.bar = tqdm(total=total, desc=desc, disable=not verbose)

    def __call__(self, i: int, x: torch.Tensor, pred_x0: torch.Tensor) -> None:
        self.bar.update(1)
        if self.callback is not None:
            self.callback(i)
        if self.img_callback is not None:
            self.img_callback(pred_x0, i)
        index = self.total - i - 1
        if index % self.log_every_t == 0 or index == self.total - 1:
            self.intermediates["x_inter"].append(x)
            self.intermediates["pred_x0"].append(pred_x0)

    def close(self) -> None:
        self.bar.close()


class Sampler:
    """Base of every sampler: the reference's ``sample(...)`` surface and its checks.

    A subclass provides ``make_schedule(S, ...)`` (sets the schedule, returns nothing),
    ``_prepare(S, eta, verbose) -> (n_steps, eta)``, ``_start(noise, x0, start_step)`` (the state the
    first step runs from), ``_latent(state, step)`` (that state as a latent, for intermediates) and
    ``_run(x, predictor, start_step, generator, temperature, progress, eta) -> x``.
    """

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
            other samplers accept only None/0.
        :param mask, x0: inpainting: ``mask`` is 1 on the known region, taken from latent ``x0``
            (see :class:`NoisePredictor`). ``x0`` is also the init latent for ``start_step > 0``.
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
        n_steps, eta = self._prepare(int(S), eta, verbose)
        if start_step >= n_steps:
            raise UserInputError(f"start_step={start_step} leaves no step of the {n_steps}-step schedule to run")

        device = x_T.device if x_T is not None else (x0.device if x0 is not None else self.device)
        noise = x_T if x_T is not None else randn(size, generator, device)
        if verbose:
            logger.info("%s: %d steps of %d, latents %s, eta %s, guidance %.2f", type(self).__name__,
                        n_steps - start_step, n_steps, tuple(size), eta, unconditional_guidance_scale)
        predictor = NoisePredictor(self.model, conditioning, unconditional_conditioning,
                                   unconditional_guidance_scale, mask=mask, x0=x0)
        x = self._start(noise, x0, start_step)
        progress = _Progress(self._latent(x, start_step), n_steps - start_step, log_every_t, callback,
                             img_callback, verbose, self.desc)
        try:
            x = self._run(x, predictor, start_step, generator, temperature, progress, eta)
        finally:
            progress.close()
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
            got = _batch_of(c)
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
    def _prepare(self, S: int, eta: Optional[float], verbose: bool):  # pragma: no cover - abstract
        raise NotImplementedError

    def _start(self, noise, x0, start_step):  # pragma: no cover - abstract
        raise NotImplementedError

    def _latent(self, state, step):
        return state

    def _run(self, x, predictor, start_step, generator, temperature, progress, eta):  # pragma: no cover
        raise NotImplementedError


def check_deterministic_eta(name: str, eta: Optional[float]) -> None:
    """Samplers without a noise amount accept eta None or 0 and refuse anything else."""
    if eta is not None and eta != 0:
        raise UserInputError(f"{name} is deterministic: eta must be 0 (got {eta}); "
                             "use DDIM (eta > 0) or Euler ancestral for stochastic sampling")
