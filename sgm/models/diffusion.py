"""``sgm.models.diffusion.DiffusionEngine``: SDXL's model, assembled from the config's parts.

Children, in registration (= ``state_dict``) order, as sgm:

* ``model``: :class:`~sgm.modules.diffusionmodules.wrappers.OpenAIWrapper` around the UNet
  (``model.diffusion_model.*``);
* ``denoiser``: :class:`~sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser` (``denoiser.sigmas``);
* ``conditioner``: :class:`~sgm.modules.encoders.modules.GeneralConditioner` (``conditioner.embedders.N.*``);
* ``first_stage_model``: the VAE (``first_stage_model.*``).

Besides sgm's surface (``denoiser(model, x, sigma, cond)``, ``conditioner``, ``sample``,
``decode_first_stage``), the engine offers the ``LatentDiffusion`` surface the project's samplers and
pipeline use: ``alphas_cumprod`` (``1/(sigma² + 1)`` of the denoiser's levels), ``apply_model(x_t, t,
cond)`` with ``cond = {"crossattn", "vector"}``, ``get_learned_conditioning``, ``ema_scope``,
``encode_first_stage`` (the posterior) / ``get_first_stage_encoding``.

The first stage runs in float32 (``disable_first_stage_autocast``: the SDXL VAE overflows in fp16):
when the networks are cast to a half dtype, the decoder is put back to float32 at the first decode.
"""
from __future__ import annotations

import contextlib
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ldm.models.autoencoder import DiagonalGaussianDistribution
from ldm.util import get_obj_from_str, instantiate_from_config
from sgm.modules.diffusionmodules.wrappers import OPENAIUNETWRAPPER

__all__ = ["DiffusionEngine", "SIZE_KEYS"]

#: micro-conditioning defaults of sgm's ``SamplingParams`` for a plain prompt list
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


class DiffusionEngine(nn.Module):
    """:param network_config, denoiser_config, conditioner_config, first_stage_config: ``{target, params}``.
    :param sampler_config: optional sgm sampler for :meth:`sample`.
    :param scale_factor: latent scale (0.13025 for SDXL).
    :param use_ema: only False (the inference configs); EMA training is not part of this package.
    :param ckpt_path: a checkpoint to load (strictly, :func:`ldm.checkpoint.load_weights_into`).
    Training options (``optimizer_config``, ``scheduler_config``, ``loss_fn_config``, ``input_key``,
    ``log_keys``, ...) are accepted and stored.
    """

    parameterization = "eps"

    def __init__(self, network_config: Mapping[str, Any], denoiser_config: Mapping[str, Any],
                 first_stage_config: Mapping[str, Any], conditioner_config: Optional[Mapping[str, Any]] = None,
                 sampler_config: Optional[Mapping[str, Any]] = None, optimizer_config=None, scheduler_config=None,
                 loss_fn_config=None, network_wrapper: Optional[str] = None, ckpt_path: Optional[str] = None,
                 use_ema: bool = False, ema_decay_rate: float = 0.9999, scale_factor: float = 1.0,
                 disable_first_stage_autocast: bool = False, input_key: str = "jpg", log_keys=None,
                 no_cond_log: bool = False, compile_model: bool = False,
                 en_and_decode_n_samples_a_time: Optional[int] = None):
        super().__init__()
        if use_ema:
            raise ValueError("DiffusionEngine: use_ema: True (EMA training) is not supported; the inference "
                             "configs set it False")
        network = instantiate_from_config(network_config)
        self.model = get_obj_from_str(network_wrapper or OPENAIUNETWRAPPER)(network, compile_model=compile_model)
        self.denoiser = instantiate_from_config(denoiser_config)
        self.sampler = instantiate_from_config(sampler_config) if sampler_config is not None else None
        self.conditioner = instantiate_from_config(conditioner_config or {"target": "sgm.modules.GeneralConditioner",
                                                                          "params": {"emb_models": []}})
        first_stage = instantiate_from_config(first_stage_config)
        first_stage.eval()
        first_stage.requires_grad_(False)
        self.first_stage_model = first_stage
        self.scale_factor = float(scale_factor)
        self.disable_first_stage_autocast = bool(disable_first_stage_autocast)
        self.en_and_decode_n_samples_a_time = en_and_decode_n_samples_a_time
        self.input_key, self.log_keys, self.no_cond_log = input_key, log_keys, no_cond_log
        self.training_configs = {"optimizer": optimizer_config, "scheduler": scheduler_config,
                                 "loss_fn": loss_fn_config}
        self.use_ema = False
        self.channels = int(getattr(network, "out_channels", 4))
        if ckpt_path is not None:
            from ldm.checkpoint import load_weights_into

            load_weights_into(self, ckpt_path)

    # -- keys a released file may lack (ldm.checkpoint.resolve_state_dict asks) ----------------------
    @property
    def optional_checkpoint_keys(self) -> tuple:
        """``denoiser.sigmas`` (recomputed from the config) and CLIP's ``position_ids`` (absent from
        files written with transformers >= 4.31)."""
        return ("denoiser.sigmas",) + tuple(k for k in self.state_dict(keep_vars=True)
                                            if k.endswith("embeddings.position_ids"))

    # -- the LatentDiffusion surface ------------------------------------------------------------------
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """``[N]`` float32 ``1/(sigma² + 1)`` of the denoiser's levels (ascending sigma)."""
        return 1.0 / (self.denoiser.sigmas.float() ** 2 + 1.0)

    @property
    def betas(self) -> torch.Tensor:
        """``[N]`` the schedule's betas, ``1 - ᾱ_t/ᾱ_{t-1}`` (``ᾱ_{-1} = 1``)."""
        ac = self.alphas_cumprod
        return 1.0 - ac / torch.cat([ac.new_ones(1), ac[:-1]])

    @property
    def num_timesteps(self) -> int:
        return len(self.denoiser.sigmas)

    @property
    def cond_stage_model(self) -> Optional[nn.Module]:
        """The first text embedder (what the pipeline's truncation warning tokenises with)."""
        return next((e for e in self.conditioner.embedders if getattr(e, "input_key", None) == "txt"), None)

    @property
    def first_stage_dtype(self) -> torch.dtype:
        return next(self.first_stage_model.parameters()).dtype

    def ema_scope(self, context: Any = None):
        return contextlib.nullcontext()

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The network's raw output (eps) for the model latent ``x_noisy`` at timesteps ``t`` [B]."""
        return self.model(x_noisy, t, cond)

    def get_learned_conditioning(self, c: Union[str, Sequence[str], Mapping[str, Any]]) -> dict:
        """``{"crossattn", "vector"}`` of a batch dict, or of prompts with sgm's default micro-conditioning
        (1024x1024 original and target size, crop (0, 0), aesthetic score 6)."""
        if isinstance(c, Mapping):
            return self.conditioner(c)
        prompts = [c] if isinstance(c, str) else list(c)
        n = len(prompts)
        batch = {"txt": prompts, "aesthetic_score": torch.full((n,), 6.0)}
        batch.update({key: torch.tensor([[1024, 1024] if key != "crop_coords_top_left" else [0, 0]] * n)
                      for key in SIZE_KEYS})
        return self.conditioner(batch)

    def encode_first_stage(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """The posterior of images ``[B, 3, H, W]`` in [-1, 1] (float32 VAE)."""
        self._first_stage_float32()
        return self.first_stage_model.encode(x.float())

    def get_first_stage_encoding(self, encoder_posterior, generator=None) -> torch.Tensor:
        """``scale_factor ·`` a posterior sample (sgm's ``encode_first_stage``)."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator=generator)
        else:
            z = encoder_posterior
        return self.scale_factor * z

    #: latent side of the tiles of a tiled decode (None: decode whole); latents larger than one tile
    #: are decoded tile by tile (:meth:`ldm.models.autoencoder.AutoencoderKL.decode_tiled`; close to,
    #: not equal to, the whole decode), for 1024x1024 images on small GPUs
    vae_tile: Optional[int] = None

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """``first_stage_model.decode((1/scale_factor)·z)`` in float32 (a multiplication by the
        reciprocal, as sgm), tiled when :attr:`vae_tile` says so. :returns: ``[B, 3, 8h, 8w]`` float32."""
        self._first_stage_float32()
        z = (1.0 / self.scale_factor) * z.float()
        n = self.en_and_decode_n_samples_a_time or z.shape[0]
        tile = self.vae_tile
        if tile and max(z.shape[-2:]) > tile:
            return torch.cat([self.first_stage_model.decode_tiled(z[i:i + 1], tile_latent=tile, overlap=tile // 4)
                              for i in range(z.shape[0])])
        return torch.cat([self.first_stage_model.decode(z[i:i + n]) for i in range(0, z.shape[0], n)])

    def _first_stage_float32(self) -> None:
        if self.disable_first_stage_autocast and self.first_stage_dtype != torch.float32:
            self.first_stage_model.to(torch.float32)

    # -- sgm's sampling surface -----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, cond: Mapping[str, torch.Tensor], uc: Optional[Mapping[str, torch.Tensor]] = None,
               batch_size: int = 16, shape: Optional[Sequence[int]] = None, generator=None, **kwargs) -> torch.Tensor:
        """sgm's ``DiffusionEngine.sample``: standard normal ``[batch_size, *shape]`` through ``self.sampler``."""
        if self.sampler is None:
            raise ValueError("DiffusionEngine.sample needs a sampler_config in the model config")
        x = torch.randn((batch_size, *shape), generator=generator).to(self.denoiser.sigmas.device)
        return self.sampler(lambda inp, sigma, c: self.denoiser(self.model, inp, sigma, c, **kwargs), x, cond, uc=uc)
