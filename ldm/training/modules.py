"""LightningModules that train the plain ``nn.Module`` models of ``ldm``.

The models (``AutoencoderKL``, ``DDPM`` / ``LatentDiffusion``) hold the architecture and the math;
the wrappers here hold what only training needs: reading a batch, the optimiser and schedule, the
EMA update, classifier-free-guidance caption dropout, logging. A wrapper keeps its model as
``self.model`` and writes checkpoints **without** that prefix, i.e. in the official layout
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``, ``model_ema.*`` for a
LatentDiffusion; ``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*`` for an
autoencoder), so ``ldm.checkpoint.load_model_from_config`` reads what training wrote.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from ldm.errors import UserInputError
from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)

__all__ = ["AutoencoderTrainer", "DiffusionTrainer", "wrap_model", "instantiate_model", "images_to_nchw",
           "latent_scale_factor"]

MODEL_PREFIX = "model."


def images_to_nchw(images: Any) -> torch.Tensor:
    """Dataset images ``[B, H, W, C]`` (channels last, as the ldm datasets give them; ``[B, H, W]``
    for grey) -> float32 ``[B, C, H, W]``, contiguous."""
    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise UserInputError(f"expected a batch of images [B, H, W, C], got shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float().contiguous()


class _ModelTrainer(pl.LightningModule):
    """Holds ``self.model`` and keeps checkpoints in the model's own (official) key layout."""

    def __init__(self, model: nn.Module, learning_rate: float):
        super().__init__()
        if not learning_rate > 0:
            raise UserInputError(f"learning rate must be > 0, got {learning_rate}")
        self.model = model
        self.learning_rate = float(learning_rate)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        sd = checkpoint["state_dict"]
        stray = [k for k in sd if not k.startswith(MODEL_PREFIX)]
        if stray:
            raise RuntimeError(f"{type(self).__name__} has state outside its model: {stray[:4]}")
        checkpoint["state_dict"] = {k[len(MODEL_PREFIX):]: v for k, v in sd.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Resuming: the file has the model's keys; Lightning loads into the wrapper ("model." + key).
        checkpoint["state_dict"] = {MODEL_PREFIX + k: v for k, v in checkpoint["state_dict"].items()}

    def _log_lr(self) -> None:
        optimizer = self.optimizers(use_pl_optimizer=False)
        self.log("lr_abs", optimizer.param_groups[0]["lr"], prog_bar=True, on_step=True, on_epoch=False)


# ----------------------------------------------------------------------------- autoencoder
class AutoencoderTrainer(_ModelTrainer):
    """Trains an ``AutoencoderKL`` with the loss its ``lossconfig`` names (built by ``init_loss``).

    The reference optimises encoder, decoder, ``quant_conv`` and ``post_quant_conv`` with Adam,
    betas (0.5, 0.9); the loss module's own parameters (LPIPS, a discriminator) are not in that
    optimiser. Only the reconstruction path is trained here: a loss with a discriminator needs the
    reference's second optimiser, which this trainer does not have (it refuses such a loss).

    :param model: the autoencoder (``model.image_key`` names the batch entry, channels last).
    :param learning_rate: Adam's learning rate (``main.py`` sets it from ``base_learning_rate``).
    :param betas: Adam's betas.
    """

    def __init__(self, model: nn.Module, learning_rate: float = 4.5e-6, betas=(0.5, 0.9)):
        super().__init__(model, learning_rate)
        if not hasattr(model, "init_loss"):
            raise UserInputError(f"{type(model).__name__} is not a first-stage autoencoder (no init_loss)")
        loss = model.loss if isinstance(getattr(model, "loss", None), nn.Module) else model.init_loss()
        if hasattr(loss, "discriminator"):
            raise UserInputError(f"{type(loss).__name__} has a discriminator, which needs a second optimiser that "
                                 "AutoencoderTrainer does not have; use ldm.modules.losses.autoencoder."
                                 "ReconstructionKLLoss")
        self.betas = tuple(betas)

    def get_input(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """``batch[image_key]`` ``[B, H, W, 3]`` in [-1, 1] -> ``[B, 3, H, W]``."""
        return images_to_nchw(batch[self.model.image_key]).to(self.device)

    def training_step(self, batch, batch_idx):
        x = self.get_input(batch)
        reconstructions, posterior = self.model(x)
        loss, logs = self.model.loss(x, reconstructions, posterior, split="train")
        self.log("train/rec_loss", logs["train/rec_loss"], prog_bar=True, on_step=True, batch_size=x.shape[0])
        self.log_dict({k: v for k, v in logs.items() if k != "train/rec_loss"}, on_step=True, on_epoch=False,
                      batch_size=x.shape[0])
        self._log_lr()
        return loss

    def validation_step(self, batch, batch_idx):
        """Reconstruction through the posterior mode (deterministic, so values compare across runs)."""
        x = self.get_input(batch)
        reconstructions, posterior = self.model(x, sample_posterior=False)
        _, logs = self.model.loss(x, reconstructions, posterior, split="val")
        self.log_dict(logs, on_step=False, on_epoch=True, batch_size=x.shape[0])
        return logs

    def configure_optimizers(self):
        params = [p for name, p in self.model.named_parameters()
                  if not name.startswith("loss.") and p.requires_grad]
        return torch.optim.Adam(params, lr=self.learning_rate, betas=self.betas)


# ----------------------------------------------------------------------------- diffusion
class DiffusionTrainer(_ModelTrainer):
    """Trains a ``DDPM`` or ``LatentDiffusion`` (the reference's ``training_step`` and friends).

    Per batch: images ``[B, H, W, C]`` -> ``[B, C, H, W]``; for a LatentDiffusion they are encoded
    by the frozen first stage to ``scale_factor · z`` (a posterior sample) and the captions are
    encoded by the text encoder (with gradients when ``cond_stage_trainable``); then
    ``p_losses`` at uniformly drawn timesteps. After every optimiser step the EMA shadows
    (``model_ema``) are updated when ``use_ema``.

    The model's ``ucg_training`` (``{batch_key: {p: 0.1, val: ""}}``) replaces each entry of
    ``batch[batch_key]`` by ``val`` with probability ``p`` before encoding (caption dropout), so
    the model also learns the unconditional prediction classifier-free guidance needs.

    ``scale_by_std``: at the first training batch of a fresh run ``scale_factor`` becomes
    ``1 / std`` of that batch's (unscaled) latents, as the reference. (The reference took the std of
    latents already multiplied by the configured ``scale_factor``; with its default 1.0 that is
    the same.)

    :param model: the diffusion model.
    :param learning_rate: AdamW's learning rate, before the ``scheduler_config`` multiplier.
    """

    def __init__(self, model: nn.Module, learning_rate: float = 1.0e-4):
        super().__init__(model, learning_rate)
        from ldm.models.diffusion.ddpm import DDPM

        if not isinstance(model, DDPM):
            raise UserInputError(f"DiffusionTrainer trains DDPM/LatentDiffusion models, got {type(model).__name__}")
        key = model.model.conditioning_key
        if key not in (None, "crossattn", "adm"):
            raise UserInputError(f"conditioning_key {key!r} (concat/hybrid inputs) is not supported by "
                                 "DiffusionTrainer; it trains unconditional and cross-attention models")
        if getattr(model, "cond_stage_trainable", False):
            if not any(p.requires_grad for p in model.cond_stage_model.parameters()):
                raise UserInputError("cond_stage_trainable is true but the text encoder is frozen; set "
                                     "cond_stage_config.params.freeze: false")
        for batch_key, spec in dict(model.ucg_training).items():
            p = spec.get("p") if isinstance(spec, Mapping) else None
            if p is None or not 0 <= p <= 1:
                raise UserInputError(f"ucg_training.{batch_key} needs p in [0, 1] (e.g. {{p: 0.1, val: ''}}), "
                                     f"got {spec!r}")
        self._is_latent = hasattr(model, "first_stage_model")

    # -- batch --------------------------------------------------------------------------------
    def drop_conditions(self, batch: Mapping[str, Any], generator: Optional[torch.Generator] = None) -> dict:
        """A shallow copy of ``batch`` where ``ucg_training`` replaced entries (probability ``p``)
        by their unconditional value (default ``""``)."""
        batch = dict(batch)
        for key, spec in dict(self.model.ucg_training).items():
            p, val = float(spec["p"]), spec.get("val")
            val = "" if val is None else val
            values = list(batch[key])
            drop = torch.rand(len(values), generator=generator) < p
            batch[key] = [val if d else v for v, d in zip(values, drop.tolist())]
        return batch

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> diffusion input: scaled latents for a LatentDiffusion."""
        if not self._is_latent:
            return x
        return self.model.get_first_stage_encoding(self.model.encode_first_stage(x)).detach()

    def encode_condition(self, raw: Any) -> Any:
        """Raw conditioning (a list of captions) -> what ``apply_model`` takes."""
        m = self.model
        if m.model.conditioning_key is None:
            return None
        if m.cond_stage_trainable:
            return m.get_learned_conditioning(raw)
        with torch.no_grad():
            return m.get_learned_conditioning(raw)

    def get_input(self, batch: Mapping[str, Any]):
        """:return: ``(x, raw_condition)``: ``x`` the diffusion input ``[B, C, h, w]``, the raw
        conditioning ``batch[cond_stage_key]`` (None for an unconditional model)."""
        x = images_to_nchw(batch[self.model.first_stage_key]).to(self.device)
        raw = None
        if self.model.model.conditioning_key is not None:
            key = self.model.cond_stage_key
            raw = batch[key] if key in batch else batch  # class embedders read the whole batch
            if isinstance(raw, torch.Tensor):
                raw = raw.to(self.device)
        return self.encode_images(x), raw

    def _losses(self, x: torch.Tensor, raw: Any, generator: Optional[torch.Generator] = None):
        t = self.model.sample_timesteps(x.shape[0], x.device, generator=generator)
        noise = None
        if generator is not None:
            noise = torch.randn(x.shape, generator=generator).to(x)
        return self.model.p_losses(x, self.encode_condition(raw), t, noise=noise)

    # -- Lightning hooks ----------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx):
        m = self.model
        if (getattr(m, "scale_by_std", False) and self.global_step == 0 and batch_idx == 0
                and self.current_epoch == 0 and not m.restarted_from_ckpt):
            x = images_to_nchw(batch[m.first_stage_key]).to(self.device)
            with torch.no_grad():
                z = m.encode_first_stage(x).sample()
            std = float(z.flatten().std())
            m.scale_factor.fill_(1.0 / std)
            log.info("scale_by_std: latent std %.4f, scale_factor set to %.6f", std, 1.0 / std)

    def training_step(self, batch, batch_idx):
        if self.model.ucg_training:
            batch = self.drop_conditions(batch)
        x, raw = self.get_input(batch)
        loss, logs = self._losses(x, raw)
        self.log_dict(logs, prog_bar=True, on_step=True, on_epoch=False, batch_size=x.shape[0])
        self.log("global_step", float(self.global_step), prog_bar=True, on_step=True, on_epoch=False)
        if self.model.use_scheduler:
            self._log_lr()
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.model.use_ema:
            self.model.model_ema(self.model.model)

    def validation_step(self, batch, batch_idx):
        """Loss of the training weights and of the EMA weights, at timesteps and noise fixed per
        ``batch_idx`` (so successive validations compare like with like)."""
        x, raw = self.get_input(batch)
        _, logs = self._losses(x, raw, torch.Generator().manual_seed(batch_idx))
        if self.model.use_ema:
            with self.model.ema_scope():
                _, logs_ema = self._losses(x, raw, torch.Generator().manual_seed(batch_idx))
            logs.update({k + "_ema": v for k, v in logs_ema.items()})
        self.log_dict(logs, on_step=False, on_epoch=True, batch_size=x.shape[0])
        return logs

    def configure_optimizers(self):
        m = self.model
        params = list(m.model.parameters())
        if getattr(m, "cond_stage_trainable", False):
            params += [p for p in m.cond_stage_model.parameters() if p.requires_grad]
        if m.learn_logvar:
            params.append(m.logvar)
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate)
        if not m.use_scheduler:
            return optimizer
        multiplier = instantiate_from_config(m.scheduler_config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=multiplier.schedule)
        log.info("LR schedule %s (per step)", type(multiplier).__name__)
        return [optimizer], [{"scheduler": scheduler, "interval": "step", "frequency": 1}]


# ----------------------------------------------------------------------------- building
def instantiate_model(model_config: Mapping[str, Any]) -> nn.Module:
    """Build the model of a config's ``model`` node for training.

    ``first_stage_config.params.ckpt_path`` (the reference's way to start a LatentDiffusion from a
    trained autoencoder) is loaded here through :mod:`ldm.checkpoint`, strictly: the file may be an
    autoencoder checkpoint (``encoder.*``, ...; ``loss.*`` keys are ignored) or a full
    LatentDiffusion checkpoint (its ``first_stage_model.*`` keys are used).
    """
    from omegaconf import OmegaConf

    from ldm.checkpoint import load_weights_into, read_checkpoint

    node = OmegaConf.to_container(OmegaConf.create(dict(model_config) if not OmegaConf.is_config(model_config)
                                                   else model_config), resolve=True)
    params = node.get("params") or {}
    first = params.get("first_stage_config")
    first_ckpt = None
    if isinstance(first, dict) and isinstance(first.get("params"), dict):
        first_ckpt = first["params"].pop("ckpt_path", None)
    model = instantiate_from_config(node)
    if first_ckpt:
        sd = read_checkpoint(first_ckpt).state_dict
        prefix = "first_stage_model."
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
        load_weights_into(model.first_stage_model, sd)
        log.info("first stage loaded from %s", first_ckpt)
    return model


def wrap_model(model: nn.Module, learning_rate: float) -> pl.LightningModule:
    """The trainer for ``model``: :class:`DiffusionTrainer` for DDPM/LatentDiffusion,
    :class:`AutoencoderTrainer` for first-stage autoencoders; a LightningModule is returned as is
    (with ``learning_rate`` set)."""
    from ldm.models.diffusion.ddpm import DDPM

    if isinstance(model, pl.LightningModule):
        model.learning_rate = learning_rate
        return model
    if isinstance(model, DDPM):
        return DiffusionTrainer(model, learning_rate)
    if hasattr(model, "init_loss") and hasattr(model, "encode") and hasattr(model, "decode"):
        return AutoencoderTrainer(model, learning_rate)
    raise UserInputError(f"don't know how to train {type(model).__name__}; model.target must be a DDPM/"
                         "LatentDiffusion, an AutoencoderKL or a LightningModule")


@torch.no_grad()
def latent_scale_factor(autoencoder: nn.Module, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> float:
    """``1 / std`` of posterior samples of ``images`` ``[B, 3, H, W]`` (what ``scale_by_std`` computes)."""
    z = autoencoder.encode(images).sample(generator)
    std = float(z.flatten().std())
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"latent std is {std}; the autoencoder is broken")
    return 1.0 / std
