"""DDIM sampling (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models") with the
reference's schedule quirks, plus the img2img pair ``stochastic_encode`` / ``decode``.

:class:`DDIMSampler` is a thin adapter: it computes the reference's tables (the attributes other
code reads) and runs :func:`~ldm.models.diffusion.solvers.sample_euler` (eta 0) or
:func:`~ldm.models.diffusion.solvers.sample_euler_ancestral` (eta > 0) on the DDIM grid of noise
levels. A DDIM step ``x_prev = sqrt(a_prev)·pred_x0 + sqrt(1 - a_prev - s²)·eps + s·noise`` is
exactly that step in sigma space (``x/sqrt(a)``); the recorded reference traces are reproduced to
about 3e-7 relative per model call.

Numeric quirks kept from the reference (pinned by ``tests/test_samplers.py``):

* ``uniform`` timesteps are ``range(0, 1000, 1000 // S) + 1``: S=50 gives 1, 21, ..., 981 and
  S=10 gives 1, 101, ..., 901; when 1000 is not a multiple of S the schedule has
  ``len(range(0, 1000, 1000 // S))`` steps (S=7 gives 8).
* The last step's "previous" alpha is ``alphas_cumprod[0]`` (0.99915 for SD), not 1, so the
  returned latent is ``sqrt(a_0)·pred_x0 + sqrt(1-a_0)·eps``, not ``pred_x0``.
* The model gets the integer timesteps of the grid (``torch.long``).
* ``ddim_alphas_prev`` and ``ddim_sigmas`` are computed in float64 (numpy) from the float32
  ``alphas_cumprod``, as the reference's attributes.
* img2img: ``stochastic_encode(x0, t_enc)`` noises to the level of ``ddim_timesteps[t_enc]`` but
  ``decode(x, c, t_enc)`` starts denoising at ``ddim_timesteps[t_enc - 1]``, one step lower
  (reference off-by-one). ``sample(..., x0=..., start_step=...)`` does it without the offset.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

import numpy as np
import torch

from ldm.errors import UserInputError
from ldm.models.diffusion.denoiser import TimestepLookup, to_sigma_space
from ldm.models.diffusion.discretization import ddim_timesteps, make_ddim_timesteps  # noqa: F401 (public here too)
from ldm.models.diffusion.sampling import Generator, Sampler, SamplingPlan, _Progress, randn
from ldm.models.diffusion.solvers import sample_euler, sample_euler_ancestral

logger = logging.getLogger(__name__)

__all__ = ["DDIMSampler", "ddim_timesteps", "make_ddim_timesteps", "make_ddim_sampling_parameters"]

def make_ddim_sampling_parameters(alphacums: torch.Tensor, ddim_timesteps: np.ndarray, eta: float):
    """``(sigmas, alphas, alphas_prev)`` for the DDIM steps, with the reference's dtypes.

    :param alphacums: ``alphas_cumprod`` ``[N]`` float32 (CPU).
    :returns: ``sigmas`` float64 numpy ``[S]``, ``alphas`` float32 tensor ``[S]``,
        ``alphas_prev`` float64 numpy ``[S]`` with ``alphas_prev[0] = alphacums[0]``.
    """
    alphas = alphacums[torch.as_tensor(ddim_timesteps)]
    alphas_prev = np.asarray([alphacums[0].item()] + alphacums[ddim_timesteps[:-1]].tolist(), dtype=np.float64)
    one_minus_a = (1 - alphas).double().numpy()  # computed in float32, as the reference
    a = alphas.double().numpy()
    sigmas = eta * np.sqrt((1 - alphas_prev) / one_minus_a * (1 - a / alphas_prev))
    return sigmas, alphas, alphas_prev


class DDIMSampler(Sampler):
    """DDIM over a CompVis-style model (``LatentDiffusion``); reference-compatible surface.

    After ``make_schedule(S, ddim_discretize, ddim_eta)``:
    ``ddim_timesteps`` (numpy int64 ``[S]``, ascending), ``ddim_alphas`` (float32 tensor),
    ``ddim_alphas_prev`` (numpy float64), ``ddim_sigmas`` (numpy float64),
    ``ddim_sqrt_one_minus_alphas`` (float32 tensor), plus the model's full schedule
    (``alphas_cumprod``, ``sqrt_alphas_cumprod``, ...) used by ``use_original_steps=True``.

    :param model: the diffusion model.
    :param schedule: kept for compatibility; only ``"linear"`` is accepted because the noise
        schedule always comes from ``model.alphas_cumprod`` (the reference ignored this argument).
    :param device: where the schedule tensors live (default: the device of ``model.alphas_cumprod``).
    """

    name = "ddim"
    desc = "DDIM Sampler"

    def __init__(self, model, schedule: str = "linear", device=None):
        super().__init__(model, device)
        if schedule != "linear":
            raise UserInputError(f"schedule={schedule!r}: the noise schedule comes from model.alphas_cumprod; "
                                 "leave schedule at 'linear'")
        self.schedule = schedule
        self.ddim_timesteps = None

    # -- schedule --------------------------------------------------------------------------------
    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Compute the DDIM step tables for ``ddim_num_steps`` steps and noise amount ``ddim_eta``."""
        if ddim_eta < 0:
            raise UserInputError(f"eta must be >= 0, got {ddim_eta}")
        ac = self._alphas_cumprod()
        self.ddim_timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps,
                                                  verbose=verbose)
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(ac, self.ddim_timesteps, ddim_eta)
        self.ddim_eta = float(ddim_eta)
        self.ddim_sigmas = sigmas
        self.ddim_alphas = alphas.to(self.device)
        self.ddim_alphas_prev = alphas_prev
        # sqrt of the float32 (1 - a) rounded from float64, as the reference's np.sqrt
        self.ddim_sqrt_one_minus_alphas = (1 - alphas).double().sqrt().float().to(self.device)
        # the full 1000-step schedule (``use_original_steps=True``), float32 as the reference
        ac_prev = torch.cat([torch.ones(1), ac[:-1]])
        self.alphas_cumprod = ac.to(self.device)
        self.alphas_cumprod_prev = ac_prev.to(self.device)
        self.sqrt_alphas_cumprod = self._model_buffer("sqrt_alphas_cumprod", ac.double().sqrt())
        self.sqrt_one_minus_alphas_cumprod = self._model_buffer("sqrt_one_minus_alphas_cumprod",
                                                                (1 - ac.double()).sqrt())
        self.ddim_sigmas_for_original_num_steps = (
            ddim_eta * torch.sqrt((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev))).to(self.device)
        if verbose:
            logger.info("DDIM: a_t %s; a_prev %s; sigma %s", alphas.tolist(), alphas_prev.tolist(), sigmas.tolist())

    def _model_buffer(self, name: str, fallback: torch.Tensor) -> torch.Tensor:
        """The model's float32 buffer ``name`` (computed from float64 alphas), else ``fallback``."""
        value = getattr(self.model, name, None)
        value = fallback if value is None else value.detach()
        return value.to(self.device, torch.float32)

    def _require_schedule(self) -> None:
        if self.ddim_timesteps is None:
            raise RuntimeError(f"call {type(self).__name__}.make_schedule(S, ddim_eta=...) first")

    def _grid(self, first: int, original: bool = False):
        """Noise levels ``[first + 2]`` of the DDIM steps ``first, first - 1, ..., 0`` (step indices
        into ``ddim_timesteps``, or into all N timesteps with ``original``), then the level of the
        last step's ``a_prev``; and the model timestep of each level (long). Float32, CPU."""
        ac = self._alphas_cumprod()
        if original:
            ts = torch.arange(first, -1, -1)
            a = torch.cat([ac[ts], torch.ones(1)])  # alphas_cumprod_prev[0] = 1: the last step reaches sigma 0
        else:
            ts = torch.as_tensor(self.ddim_timesteps[first::-1].copy())
            a = torch.cat([ac[ts], ac[:1]])  # the last step's a_prev is alphas_cumprod[0] (reference quirk)
        sigmas = ((1 - a) / a) ** 0.5
        # The level after the last step is evaluated only by PLMS's warm-up when that is also the
        # last step (1 step, or img2img running only the last one): the reference clamps the next
        # index (max(index - 1, 0)) and so calls the model at the last step's own timestep there.
        return sigmas, torch.cat([ts, ts[-1:]])

    def _solver(self, eta: Optional[float]):
        """``(solver, options)``: DDIM is Euler in sigma space; with eta > 0, Euler ancestral."""
        return (sample_euler_ancestral, {"eta": float(eta)}) if eta else (sample_euler, {})

    def _plan(self, steps, eta, temperature, verbose=False) -> SamplingPlan:
        self.make_schedule(steps, ddim_eta=0.0 if eta is None else eta, verbose=verbose)
        return self._plan_from(len(self.ddim_timesteps) - 1, False, eta, temperature)

    def _plan_from(self, first: int, original: bool, eta, temperature: float) -> SamplingPlan:
        sigmas, timesteps = self._grid(first, original)
        solver, options = self._solver(eta)
        if "eta" in options:
            options["s_noise"] = temperature
        return SamplingPlan(sigmas.to(self.device), solver, options,
                            timesteps=TimestepLookup(sigmas.to(self.device), timesteps))

    # -- img2img, the reference's way ------------------------------------------------------------
    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t, use_original_steps: bool = False,
                          noise: Optional[torch.Tensor] = None, generator: Generator = None) -> torch.Tensor:
        """Noise ``x0`` to DDIM step ``t``: ``sqrt(ddim_alphas[t])·x0 + ddim_sqrt_one_minus_alphas[t]·noise``.

        :param x0: ``[B,C,H,W]``; :param t: step index per image (``[B]`` long tensor or int) into
            the DDIM tables, or into the 1000-step schedule with ``use_original_steps``.
        :param noise: standard normal like ``x0`` (drawn with ``generator`` if None).
        """
        self._require_schedule()
        if use_original_steps:
            sqrt_a, sqrt_1ma = self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod
        else:
            sqrt_a, sqrt_1ma = torch.sqrt(self.ddim_alphas), self.ddim_sqrt_one_minus_alphas
        t = torch.as_tensor(t, device=sqrt_a.device, dtype=torch.long).reshape(-1).expand(x0.shape[0])
        if noise is None:
            noise = randn(x0.shape, generator, x0.device, x0.dtype)
        bcast = (-1,) + (1,) * (x0.ndim - 1)
        return (sqrt_a[t].to(x0.device).reshape(bcast) * x0 + sqrt_1ma[t].to(x0.device).reshape(bcast) * noise)

    @torch.no_grad()
    def decode(self, x_latent: torch.Tensor, cond, t_start: int, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning=None, use_original_steps: bool = False, callback=None,
               generator: Generator = None, verbose: bool = True) -> torch.Tensor:
        """Denoise ``x_latent`` over the first ``t_start`` DDIM timesteps, highest first.

        With ``x_latent = stochastic_encode(x0, t_start)`` this starts at ``ddim_timesteps[t_start-1]``,
        one step below the level the noise was added at (the reference's off-by-one, kept).
        Uses the eta of the last ``make_schedule``; ``callback(i)`` after each step.
        :returns: ``[B,C,H,W]``.
        """
        self._require_schedule()
        n = self.ddpm_num_timesteps if use_original_steps else len(self.ddim_timesteps)
        if not 1 <= t_start <= n:
            raise UserInputError(f"t_start must be in 1..{n}, got {t_start}")
        plan = self._plan_from(t_start - 1, use_original_steps, self.ddim_eta, 1.0)
        sigmas = plan.sigmas.to(x_latent.device)
        plan = replace(plan, sigmas=sigmas, timesteps=plan.timesteps.to(x_latent.device))
        denoiser = self.denoiser(cond, unconditional_conditioning, unconditional_guidance_scale,
                                 device=x_latent.device, timesteps=plan.timesteps)
        progress = _Progress(x_latent, t_start, 100, callback, None, verbose, "Decoding image")
        return self._run(plan, to_sigma_space(x_latent, sigmas[0]), denoiser, progress, generator)
