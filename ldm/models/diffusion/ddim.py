"""DDIM sampling (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models") with the
reference's schedule quirks, plus the img2img pair ``stochastic_encode`` / ``decode``.

Numeric quirks kept from the reference (pinned by ``tests/test_samplers.py``):

* ``uniform`` timesteps are ``range(0, 1000, 1000 // S) + 1``: S=50 gives 1, 21, ..., 981 and
  S=10 gives 1, 101, ..., 901; when 1000 is not a multiple of S the schedule has
  ``len(range(0, 1000, 1000 // S))`` steps (S=7 gives 8).
* The last step's "previous" alpha is ``alphas_cumprod[0]`` (0.99915 for SD), not 1, so the
  returned latent is ``sqrt(a_0)·pred_x0 + sqrt(1-a_0)·eps``, not ``pred_x0``.
* ``ddim_alphas_prev`` and ``ddim_sigmas`` are computed in float64 (numpy) from the float32
  ``alphas_cumprod`` and enter the update as float32.
* img2img: ``stochastic_encode(x0, t_enc)`` noises to the level of ``ddim_timesteps[t_enc]`` but
  ``decode(x, c, t_enc)`` starts denoising at ``ddim_timesteps[t_enc - 1]``, one step lower
  (reference off-by-one). ``sample(..., x0=..., start_step=...)`` does it without the offset.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from ldm.errors import UserInputError
from ldm.models.diffusion.sampling import (Generator, NoisePredictor, Sampler, _Progress, ddim_step, randn)

logger = logging.getLogger(__name__)

__all__ = ["DDIMSampler", "make_ddim_timesteps", "make_ddim_sampling_parameters"]

DISCRETIZATIONS = ("uniform", "quad")


def make_ddim_timesteps(ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int = 1000,
                        verbose: bool = False) -> np.ndarray:
    """The model timesteps DDIM visits, ascending (``+1`` so the first is 1, as the reference).

    ``uniform``: ``range(0, N, N // S) + 1`` (may hold more than S entries, see module doc).
    ``quad``: ``int(linspace(0, sqrt(0.8·N), S)²) + 1``.
    :raises ValueError: unknown method, S < 1 or S > N, or a schedule reaching past timestep N-1
        (e.g. uniform S=3 gives 1000, an IndexError in the reference).
    """
    n, s = int(num_ddpm_timesteps), int(num_ddim_timesteps)
    if not 1 <= s <= n:
        raise UserInputError(f"number of DDIM steps must be in 1..{n}, got {num_ddim_timesteps}")
    if ddim_discr_method == "uniform":
        steps = np.asarray(list(range(0, n, n // s)))
    elif ddim_discr_method == "quad":
        steps = (np.linspace(0, np.sqrt(n * 0.8), s) ** 2).astype(int)
    else:
        raise UserInputError(f"unknown DDIM discretisation {ddim_discr_method!r}; choose one of {DISCRETIZATIONS}")
    steps = steps.astype(np.int64) + 1
    if steps[-1] >= n:
        raise UserInputError(f"{ddim_discr_method} discretisation with {s} steps reaches timestep {steps[-1]}, past "
                             f"the model's last timestep {n - 1}; pick another step count")
    if len(steps) != s:
        logger.warning("%d DDIM steps requested; the reference's '%s' discretisation gives %d", s,
                       ddim_discr_method, len(steps))
    if verbose:
        logger.info("DDIM timesteps: %s", steps.tolist())
    return steps


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

    def _table(self, original: bool):
        """``(timesteps, a, a_prev, sigma, sqrt(1 - a))`` per step index (ascending); float32
        tensors on the CPU."""
        if original:
            return (np.arange(self.ddpm_num_timesteps), self.alphas_cumprod.cpu(), self.alphas_cumprod_prev.cpu(),
                    self.ddim_sigmas_for_original_num_steps.cpu(), self.sqrt_one_minus_alphas_cumprod.cpu())
        return (self.ddim_timesteps, self.ddim_alphas.cpu(), torch.as_tensor(self.ddim_alphas_prev, dtype=torch.float32),
                torch.as_tensor(self.ddim_sigmas, dtype=torch.float32), self.ddim_sqrt_one_minus_alphas.cpu())

    # -- Sampler hooks ---------------------------------------------------------------------------
    def _prepare(self, S, eta, verbose):
        eta = 0.0 if eta is None else float(eta)
        self.make_schedule(S, ddim_eta=eta, verbose=verbose)
        return len(self.ddim_timesteps), eta

    def _start(self, noise, x0, start_step):
        if start_step == 0:
            return noise
        a = self.ddim_alphas[len(self.ddim_timesteps) - 1 - start_step].to(noise.device)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def _run(self, x, predictor, start_step, generator, temperature, progress, eta):
        first = len(self.ddim_timesteps) - 1 - start_step
        return self._loop(x, predictor, range(first, -1, -1), generator, temperature, progress, original=False)

    # -- the loop DDIM and PLMS share ------------------------------------------------------------
    def _loop(self, x, predictor: NoisePredictor, indices, generator: Generator, temperature: float,
              progress: _Progress, original: bool):
        """Run the steps ``indices`` (descending step indices) from ``x``; returns the last ``x_prev``."""
        table = self._table(original)
        timesteps, alphas, alphas_prev, sigmas, sqrt_one_minus = table
        f32 = dict(device=x.device, dtype=torch.float32)
        history: list = []
        for i, index in enumerate(indices):
            t = torch.full((x.shape[0],), int(timesteps[index]), device=x.device, dtype=torch.long)
            a_t, a_prev, sigma, s1m = (v[index].to(**f32) for v in (alphas, alphas_prev, sigmas, sqrt_one_minus))
            e_t = predictor(x, t, a_t)
            eps = self._combine_eps(x, e_t, index, predictor, history, table)
            noise = None
            if sigma > 0:
                noise = randn(x.shape, generator, x.device, x.dtype) * temperature
            x, pred_x0 = ddim_step(x, eps, a_t, a_prev, sigma, noise, s1m)
            progress(i, x, pred_x0)
        return x

    def _combine_eps(self, x, e_t, index, predictor, history, table):
        """DDIM uses the model's estimate as is (PLMS overrides this)."""
        return e_t

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
        predictor = NoisePredictor(self.model, cond, unconditional_conditioning, unconditional_guidance_scale)
        progress = _Progress(x_latent, t_start, 100, callback, None, verbose, "Decoding image")
        try:
            return self._loop(x_latent, predictor, range(t_start - 1, -1, -1), generator, 1.0, progress,
                              original=use_original_steps)
        finally:
            progress.close()
