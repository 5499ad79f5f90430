"""Diffusion models: ``DDPM`` (pixel space) and ``LatentDiffusion`` (Stable Diffusion), plus the
9-channel ``LatentInpaintDiffusion`` and the SD 2 x4 ``LatentUpscaleDiffusion``.

This module holds the model and its math (noise schedule, conditioning, first-stage encode /
decode, the training loss). Sampling lives in ``ldm.models.diffusion`` samplers, checkpoint I/O in
``ldm.checkpoint`` and the training loop in ``ldm.training``. Constructor parameters and attribute
names are the reference's, so its YAML configs and checkpoints work unchanged.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from ldm.models.diffusion.depth import DepthConditioning
from ldm.models.diffusion.split_input import apply_model_split, decode_split, split_active
from ldm.models.diffusion.wrapper import DiffusionWrapper
from ldm.models.diffusion.unclip import ImageEmbeddingConditioning
from ldm.modules.diffusionmodules.util import extract_into_tensor, forward_schedule, make_beta_schedule
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import default, instantiate_from_config

log = logging.getLogger(__name__)

__conditioning_keys__ = {"concat": "c_concat", "crossattn": "c_crossattn", "adm": "y"}

# The 12 noise-schedule buffers every checkpoint carries, in state_dict order.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)

Cond = Union[torch.Tensor, list, dict, None]


def disabled_train(self, mode: bool = True):
    """Replacement for ``nn.Module.train`` that keeps a frozen module in eval mode."""
    return self


class DDPM(nn.Module):
    """Gaussian diffusion with a UNet denoiser (Ho et al. 2020), in the reference's layout.

    Holds the noise-schedule buffers (float32, computed in float64), the wrapped UNet
    (``self.model.diffusion_model``) and, with ``use_ema``, its EMA shadows (``self.model_ema``).
    ``parameterization`` is ``"eps"`` (predict the noise), ``"x0"`` or ``"v"`` (Salimans & Ho 2022).
    """

    #: Keys a checkpoint may lack (the config's schedule is kept); read by ldm.checkpoint's loader.
    optional_checkpoint_keys = frozenset(SCHEDULE_BUFFERS)

    def __init__(self, unet_config, timesteps: int = 1000, beta_schedule: str = "linear", loss_type: str = "l2",
                 ckpt_path: Optional[str] = None, ignore_keys=(), load_only_unet: bool = False,
                 monitor: str = "val/loss", use_ema: bool = True, first_stage_key: str = "image",
                 image_size: int = 256, channels: int = 3, log_every_t: int = 100, clip_denoised: bool = True,
                 linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3,
                 given_betas=None, original_elbo_weight: float = 0., v_posterior: float = 0.,
                 l_simple_weight: float = 1., conditioning_key: Optional[str] = None,
                 parameterization: str = "eps", scheduler_config=None, use_positional_encodings: bool = False,
                 learn_logvar: bool = False, logvar_init: float = 0., make_it_fit: bool = False,
                 ucg_training=None, reset_ema: bool = False, reset_num_ema_updates: bool = False,
                 offset_noise_level: float = 0.0):
        super().__init__()
        if parameterization not in ("eps", "x0", "v"):
            raise ValueError(f"parameterization must be 'eps', 'x0' or 'v', got {parameterization!r}")
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type must be 'l1' or 'l2', got {loss_type!r}")
        if offset_noise_level < 0:
            raise ValueError(f"offset_noise_level must be >= 0, got {offset_noise_level}")
        self.parameterization = parameterization
        self.cond_stage_model = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.use_positional_encodings = use_positional_encodings
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.use_ema = use_ema
        if self.use_ema:
            self.model_ema = LitEma(self.model)
        self.use_scheduler = scheduler_config is not None
        self.scheduler_config = scheduler_config
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        self.monitor = monitor
        self.make_it_fit = make_it_fit
        self.ucg_training = ucg_training or {}
        self.loss_type = loss_type
        self.offset_noise_level = offset_noise_level
        self.register_schedule(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                               linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)
        self.learn_logvar = learn_logvar
        logvar = torch.full((self.num_timesteps,), float(logvar_init), device="cpu")
        self.logvar = nn.Parameter(logvar) if learn_logvar else logvar
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)
            if reset_ema and self.use_ema:
                self.model_ema = LitEma(self.model)
            if reset_num_ema_updates and self.use_ema:
                self.model_ema.reset_num_updates()

    # ----------------------------------------------------------------- schedule
    def register_schedule(self, given_betas=None, beta_schedule: str = "linear", timesteps: int = 1000,
                          linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3) -> None:
        """Compute the schedule in float64 and register each buffer as float32 (as the reference),
        always on the CPU: a model built on ``meta`` whose weights come from a file keeps a real one."""
        betas = np.asarray(given_betas, dtype=np.float64) if given_betas is not None else \
            make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end,
                               cosine_s=cosine_s)
        alphas = 1. - betas
        values = forward_schedule(betas)
        alphas_cumprod, alphas_cumprod_prev = values["alphas_cumprod"], values["alphas_cumprod_prev"]
        self.num_timesteps = int(betas.shape[0])
        self.linear_start, self.linear_end = linear_start, linear_end
        posterior_variance = ((1 - self.v_posterior) * betas * (1. - alphas_cumprod_prev) / (1. - alphas_cumprod)
                              + self.v_posterior * betas)
        values.update({
            # log of the posterior variance clipped because it is 0 at the start of the chain
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1. - alphas_cumprod),
            "posterior_mean_coef2": (1. - alphas_cumprod_prev) * np.sqrt(alphas) / (1. - alphas_cumprod),
        })
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, torch.tensor(values[name], dtype=torch.float32, device="cpu"))
        if self.parameterization == "eps":
            lvlb_weights = self.betas ** 2 / (2 * self.posterior_variance * torch.tensor(alphas, dtype=torch.float32, device="cpu")
                                              * (1 - self.alphas_cumprod))
        elif self.parameterization == "x0":
            lvlb_weights = 0.5 * torch.sqrt(self.alphas_cumprod) / (2. * 1 - self.alphas_cumprod)
        else:
            lvlb_weights = torch.ones_like(self.betas)
        lvlb_weights[0] = lvlb_weights[1]
        self.register_buffer("lvlb_weights", lvlb_weights, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    # ----------------------------------------------------------------- checkpoints / EMA
    def init_from_ckpt(self, path: str, ignore_keys=(), only_model: bool = False) -> None:
        """Load weights from a checkpoint through the project's one loader (strict, reported)."""
        from ldm.checkpoint import load_weights_into

        load_weights_into(self, path, ignore_keys=ignore_keys, only_model=only_model)

    @contextmanager
    def ema_scope(self, context: Optional[str] = None):
        """Run the block with the EMA weights swapped into the UNet (a no-op without EMA)."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
            if context is not None:
                log.info("%s: switched to EMA weights", context)
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())
                if context is not None:
                    log.info("%s: restored training weights", context)

    # ----------------------------------------------------------------- diffusion math
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t)·x_0 + sqrt(1−ᾱ_t)·noise for integer timesteps ``t`` [B]."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape).to(x_start.dtype) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape).to(x_start.dtype) * noise)

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(1/ᾱ_t)·x_t − sqrt(1/ᾱ_t − 1)·eps."""
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def predict_start_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(ᾱ_t)·x_t − sqrt(1−ᾱ_t)·v."""
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)

    def predict_eps_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(ᾱ_t)·v + sqrt(1−ᾱ_t)·x_t."""
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * v
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t)

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(ᾱ_t)·eps − sqrt(1−ᾱ_t)·x_0."""
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x.shape) * noise
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * x)

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t−1} | x_t, x_0)."""
        mean = (extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return (mean, extract_into_tensor(self.posterior_variance, t, x_t.shape),
                extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape))

    # ----------------------------------------------------------------- model call and loss
    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Cond = None, return_ids: bool = False):
        """The raw UNet output (eps, x0 or v by ``parameterization``) for ``x_noisy`` [B, C, H, W] at
        timesteps ``t`` [B] (integer or fractional).

        ``cond`` is a tensor or list (routed to ``c_concat`` for a ``concat`` model, else to
        ``c_crossattn``) or a dict ``{"c_concat": [...], "c_crossattn": [...]}``.
        """
        if cond is None:
            cond = {}
        elif not isinstance(cond, dict):
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond if isinstance(cond, list) else [cond]}
        out = apply_model_split(self, x_noisy, t, cond) if split_active(self) else self.model(x_noisy, t, **cond)
        if isinstance(out, tuple) and not return_ids:
            return out[0]
        return out

    def get_loss(self, pred: torch.Tensor, target: torch.Tensor, mean: bool = True) -> torch.Tensor:
        if self.loss_type == "l1":
            loss = (target - pred).abs()
            return loss.mean() if mean else loss
        return F.mse_loss(target, pred, reduction="mean" if mean else "none")

    def training_target(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.parameterization == "eps":
            return noise
        if self.parameterization == "x0":
            return x_start
        return self.get_v(x_start, noise, t)

    def training_noise(self, x_start: torch.Tensor) -> torch.Tensor:
        """N(0, 1) noise plus ``offset_noise_level`` x a draw per sample and channel, constant over the
        positions (sgm's offset noise): a channel's mean of a noised input then tells the model little,
        so it does not learn to read an image's mean colour off the start noise (docs/demo-model.md)."""
        noise = torch.randn_like(x_start)
        if self.offset_noise_level > 0:
            shape = x_start.shape[:2] + (1,) * (x_start.ndim - 2)
            noise = noise + self.offset_noise_level * torch.randn(shape, device=x_start.device, dtype=x_start.dtype)
        return noise

    def p_losses(self, x_start: torch.Tensor, cond: Cond, t: torch.Tensor, noise: Optional[torch.Tensor] = None):
        """The denoising loss at timesteps ``t`` [B]: returns ``(loss, {name: value})``.

        loss = l_simple_weight · mean(L_simple / exp(logvar_t) + logvar_t) + original_elbo_weight · L_vlb.
        """
        noise = default(noise, lambda: self.training_noise(x_start))
        model_output = self.apply_model(self.q_sample(x_start=x_start, t=t, noise=noise), t, cond)
        target = self.training_target(x_start, noise, t)
        per_sample = self.get_loss(model_output.float(), target.float(), mean=False).mean(dim=(1, 2, 3))
        prefix = "train" if self.training else "val"
        logvar_t = self.logvar.to(x_start.device)[t]
        loss_vlb = (self.lvlb_weights[t] * per_sample).mean()
        loss = self.l_simple_weight * (per_sample / torch.exp(logvar_t) + logvar_t).mean() + self.original_elbo_weight * loss_vlb
        logs = {f"{prefix}/loss_simple": per_sample.mean().detach(), f"{prefix}/loss_vlb": loss_vlb.detach(),
                f"{prefix}/loss": loss.detach()}
        if self.learn_logvar:
            logs["logvar"] = self.logvar.data.mean()
        return loss, logs

    def sample_timesteps(self, batch_size: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (batch_size,), generator=generator).to(device)

    def forward(self, x: torch.Tensor, c: Cond = None, *args, **kwargs):
        """Training loss for a batch ``x`` (latents for LatentDiffusion) at random timesteps."""
        t = self.sample_timesteps(x.shape[0], x.device)
        return self.p_losses(x, c, t, *args, **kwargs)


class LatentDiffusion(DDPM):
    """Diffusion in the latent space of a frozen autoencoder (``first_stage_model``), conditioned
    by a text/class encoder (``cond_stage_model``) — Rombach et al. 2022, i.e. Stable Diffusion."""

    def __init__(self, first_stage_config, cond_stage_config, num_timesteps_cond: Optional[int] = None,
                 cond_stage_key: str = "image", cond_stage_trainable: bool = False, concat_mode: bool = True,
                 cond_stage_forward: Optional[str] = None, conditioning_key: Optional[str] = None,
                 scale_factor: float = 1.0, scale_by_std: bool = False, force_null_conditioning: bool = False,
                 *args, **kwargs):
        self.num_timesteps_cond = default(num_timesteps_cond, 1)
        self.scale_by_std = scale_by_std
        if self.num_timesteps_cond > kwargs.get("timesteps", 1000):
            raise ValueError("num_timesteps_cond cannot exceed timesteps")
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__" and not force_null_conditioning:
            conditioning_key = None
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        reset_ema = kwargs.pop("reset_ema", False)
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        try:
            self.num_downs = len(first_stage_config["params"]["ddconfig"]["ch_mult"]) - 1
        except (KeyError, TypeError):
            self.num_downs = 0
        if not scale_by_std:
            self.scale_factor = scale_factor
        else:
            self.register_buffer("scale_factor", torch.tensor(scale_factor, device="cpu"))
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        self.cond_stage_forward = cond_stage_forward
        self.clip_denoised = False
        self.restarted_from_ckpt = False
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)
            self.restarted_from_ckpt = True
            if reset_ema and self.use_ema:
                self.model_ema = LitEma(self.model)

    def instantiate_first_stage(self, config) -> None:
        model = instantiate_from_config(config).eval()
        model.train = disabled_train.__get__(model)
        model.requires_grad_(False)
        self.first_stage_model = model

    def instantiate_cond_stage(self, config) -> None:
        if config == "__is_first_stage__":
            # The LDM inpainting model conditions on the first stage's own encoding: same module.
            self.cond_stage_model = self.first_stage_model
        elif config == "__is_unconditional__":
            self.cond_stage_model = None
        else:
            model = instantiate_from_config(config)
            if not self.cond_stage_trainable:
                model = model.eval()
                model.train = disabled_train.__get__(model)
                model.requires_grad_(False)
            self.cond_stage_model = model

    # ----------------------------------------------------------------- conditioning
    def get_learned_conditioning(self, c: Any) -> torch.Tensor:
        """Encode raw conditioning (e.g. a list of prompts) with the cond stage model: [B, 77, D]
        for the CLIP text encoder."""
        if self.cond_stage_model is None:
            raise ValueError("this model is unconditional: it has no conditioning encoder")
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        if callable(getattr(self.cond_stage_model, "encode", None)):
            c = self.cond_stage_model.encode(c)
            return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c
        return self.cond_stage_model(c)

    # ----------------------------------------------------------------- first stage
    @property
    def first_stage_dtype(self) -> torch.dtype:
        return next(self.first_stage_model.parameters()).dtype

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor):
        """Encode images [B, 3, H, W] in [-1, 1]: a DiagonalGaussianDistribution (KL) or the
        pre-quantisation latent (VQ)."""
        return self.first_stage_model.encode(x.to(self.first_stage_dtype))

    def get_first_stage_encoding(self, encoder_posterior, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``scale_factor`` · (a posterior *sample*, as the reference, or the tensor itself).

        :param generator: CPU generator(s) for the posterior noise, for device-independent seeds.
        """
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator=generator)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"encoder_posterior of type {type(encoder_posterior).__name__} not supported")
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False) -> torch.Tensor:
        """Decode scaled latents ``z`` [B, C, h, w] to images [B, 3, 8h, 8w] (about [-1, 1])."""
        if predict_cids:
            raise NotImplementedError("predict_cids is only used by codebook-predicting models, not supported")
        z = (z / self.scale_factor).to(self.first_stage_dtype)
        if split_active(self):  # the patch-wise mode (split_input.py)
            return decode_split(self, z, force_not_quantize=force_not_quantize)
        if hasattr(self.first_stage_model, "quantize"):  # VQ first stage
            return self.first_stage_model.decode(z, force_not_quantize=force_not_quantize)
        return self.first_stage_model.decode(z)

    def forward(self, x: torch.Tensor, c: Any = None, *args, **kwargs):
        """Training loss for latents ``x`` and raw conditioning ``c`` (encoded here when the text
        encoder is trainable), at random timesteps."""
        t = self.sample_timesteps(x.shape[0], x.device)
        if self.model.conditioning_key is not None and self.cond_stage_trainable and c is not None:
            c = self.get_learned_conditioning(c)
        return self.p_losses(x, c, t, *args, **kwargs)


class LatentInpaintDiffusion(LatentDiffusion):
    """The 9-channel Stable Diffusion inpainting model (runwayml): UNet input is
    cat([x (4), mask (1), masked-image latent (4)]) with text cross-attention (``hybrid``)."""

    def __init__(self, concat_keys=("mask", "masked_image"), masked_image_key: str = "masked_image",
                 finetune_keys=None, keep_finetune_dims: int = 4, c_concat_log_start=None,
                 c_concat_log_end=None, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if masked_image_key not in concat_keys:
            raise ValueError(f"masked_image_key {masked_image_key!r} must be one of concat_keys {concat_keys}")
        self.concat_keys = tuple(concat_keys)
        self.masked_image_key = masked_image_key
        self.keep_dims = keep_finetune_dims

    @torch.no_grad()
    def inpaint_conditioning(self, image: torch.Tensor, mask: torch.Tensor,
                             generator: Optional[torch.Generator] = None) -> list:
        """The ``c_concat`` entries for an image [B, 3, H, W] in [-1, 1] and a mask [B, 1, H, W]
        in [0, 1] (1 = repaint): [mask at latent size (nearest), latent of image·(mask < 0.5)]."""
        masked_image = image * (mask < 0.5)
        z = self.get_first_stage_encoding(self.encode_first_stage(masked_image), generator=generator)
        small_mask = F.interpolate(mask.to(z.dtype), size=z.shape[-2:])
        parts = {"mask": small_mask, self.masked_image_key: z}
        return [torch.cat([parts[k] for k in self.concat_keys], dim=1)]


class LatentUpscaleDiffusion(LatentDiffusion):
    """The SD 2 x4 upscaler: UNet input ``cat([z, x_aug])`` with text cross-attention and the noise
    level of the augmented low-resolution image ``x_aug`` as the UNet's class label (``hybrid-adm``:
    ``{"c_concat": [x_aug], "c_crossattn": [c], "c_adm": level}``). The latent has the
    low-resolution size; the KL-f4 first stage decodes it to 4x. ``low_scale_model`` makes
    ``(x_aug, level)`` (:mod:`ldm.modules.diffusionmodules.upscaling`)."""

    def __init__(self, *args, low_scale_config, low_scale_key: str = "LR", noise_level_key=None, **kwargs):
        ckpt_path, ignore_keys = kwargs.pop("ckpt_path", None), kwargs.pop("ignore_keys", ())
        super().__init__(*args, **kwargs)
        if self.cond_stage_trainable:
            raise ValueError("LatentUpscaleDiffusion needs a frozen text encoder (cond_stage_trainable: false)")
        model = instantiate_from_config(low_scale_config).eval()
        model.train = disabled_train.__get__(model)
        self.low_scale_model = model.requires_grad_(False)
        self.low_scale_key, self.noise_level_key = low_scale_key, noise_level_key
        # its schedule buffers, like DDPM's, may be absent from a file: the config's are kept
        self.optional_checkpoint_keys = DDPM.optional_checkpoint_keys | {
            f"low_scale_model.{k}" for k in model.state_dict()}
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)


class ImageEmbeddingConditionedLatentDiffusion(ImageEmbeddingConditioning, LatentDiffusion):
    """Stable unCLIP 2.1: text and a noised CLIP image embedding (``c_adm``); see :mod:`.unclip`."""


class LatentDepth2ImageDiffusion(DepthConditioning, LatentDiffusion):
    """SD 2 depth2img: text and a MiDaS depth map concatenated to the latent (``hybrid``); see :mod:`.depth`."""
