"""Stable unCLIP 2.1: a latent diffusion model conditioned on a CLIP image embedding as well as on text.

The conditioning (``scripts/streamlit/stableunclip.py`` of the reference):

* ``e = embedder(image)``: the CLIP image embedding ``[B, D]`` of an image in [-1, 1]
  (``FrozenOpenCLIPImageEmbedder``, D = 1024 for unCLIP-H);
* ``z, emb(l) = noise_augmentor(e, l)``: ``e`` noised to the integer level ``l`` (0: unchanged) and
  the sinusoidal embedding of ``l`` (:mod:`ldm.modules.diffusionmodules.noise_augmentation`);
* ``c_adm = cat([z, emb(l)], 1)·weight`` ``[B, 2D]``, the UNet's vector ``y`` (``label_emb``, added to
  the time embedding), next to the text context: ``{"c_crossattn": [c], "c_adm": c_adm}``
  (``crossattn-adm`` in :class:`~ldm.models.diffusion.wrapper.DiffusionWrapper`). The unconditional
  branch has the negative prompt's text and an all-zero ``c_adm``.

:class:`ImageEmbeddingConditioning` holds all of it; ``ddpm.ImageEmbeddingConditionedLatentDiffusion``
(the configs' target) is it over ``LatentDiffusion``. It lives here, as a mixin, so that ddpm.py
does not import a module that imports it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ldm.util import instantiate_from_config

__all__ = ["ImageEmbeddingConditioning"]


def _keep_eval(self, mode: bool = True):
    """Replacement for ``nn.Module.train`` that keeps a frozen module in eval mode."""
    return self


def _frozen(module: nn.Module, freeze: bool = True) -> nn.Module:
    if freeze:
        module.eval()
        module.train = _keep_eval.__get__(module)
        module.requires_grad_(False)
    return module


class ImageEmbeddingConditioning(nn.Module):
    """The image-embedding part of Stable unCLIP; mixed in before ``LatentDiffusion``.

    :param embedder_config: the image embedder (``embedder.*`` keys).
    :param embedding_key: the batch key of the conditioning image (training; kept for configs).
    :param embedding_dropout: training-time probability of dropping the whole ``c_adm``.
    :param freeze_embedder: eval mode and no gradients for the embedder.
    :param noise_aug_config: the ``noise_augmentor`` (``noise_augmentor.*`` schedule buffers); None:
        ``c_adm`` is the bare embedding.
    """

    #: what a checkpoint lacking these keys lacks, for the loader's one-line error (:mod:`ldm.checkpoint`)
    checkpoint_parts = {
        "embedder.": "the weights of the CLIP image embedder (embedder.model.*) that Stable unCLIP needs (the "
                     "reference downloaded them apart: open_clip ViT-H-14 laion2b_s32b_b79k for unCLIP-H, openai "
                     "ViT-L/14 for unCLIP-L; here they are read from the checkpoint only); use a checkpoint that "
                     "carries them, or add that image tower's tensors to it under embedder.model.",
    }

    def __init__(self, embedder_config, embedding_key: str = "jpg", embedding_dropout: float = 0.5,
                 freeze_embedder: bool = True, noise_aug_config=None, *args, **kwargs):
        ckpt_path, ignore_keys = kwargs.pop("ckpt_path", None), kwargs.pop("ignore_keys", ())
        super().__init__(*args, **kwargs)
        self.embed_key = embedding_key
        self.embedding_dropout = embedding_dropout
        self.embedder = _frozen(instantiate_from_config(embedder_config), freeze_embedder)
        self.noise_augmentor = None
        if noise_aug_config is not None:
            self.noise_augmentor = _frozen(instantiate_from_config(noise_aug_config))
            # its schedule, like DDPM's, is computed from the config when a file lacks it
            self.optional_checkpoint_keys = frozenset(self.optional_checkpoint_keys) | {
                f"noise_augmentor.{k}" for k in self.noise_augmentor.state_dict()}
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    @property
    def max_noise_level(self) -> int:
        """The largest noise level the augmentor takes (its schedule has ``timesteps`` entries)."""
        return 0 if self.noise_augmentor is None else self.noise_augmentor.num_timesteps - 1

    @torch.no_grad()
    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        """:param image: ``[B, 3, H, W]`` in [-1, 1]. :returns: the CLIP image embedding ``[B, D]``."""
        return self.embedder(image)

    def adm_conditioning(self, embedding: torch.Tensor, noise_level, noise: Optional[torch.Tensor] = None,
                         weight: float = 1.0) -> torch.Tensor:
        """``c_adm = cat([z, emb(level)], 1)·weight`` ``[B, 2D]`` (``embedding`` alone without an augmentor).

        :param embedding: ``[B, D]``; :param noise_level: an int or int64 ``[B]``;
        :param noise: ``[B, D]`` (None: ``randn_like``, the global generator)."""
        if self.noise_augmentor is None:
            return embedding * weight
        level = torch.as_tensor(noise_level, dtype=torch.long).reshape(-1).to(embedding.device)
        if level.numel() == 1:
            level = level.expand(embedding.shape[0])
        z, level_emb = self.noise_augmentor(embedding, noise_level=level, noise=noise)
        return torch.cat([z, level_emb], dim=1) * weight

    @torch.no_grad()
    def unclip_conditioning(self, prompts: Sequence[str], image: torch.Tensor, noise_level=0,
                            negative_prompt: str = "", noise: Optional[torch.Tensor] = None) -> tuple[dict, dict]:
        """``(c, uc)`` of one batch: text of ``prompts`` / ``negative_prompt`` and ``c_adm`` of ``image``
        (one image ``[1, 3, H, W]`` is used for every prompt) / zeros.

        :param noise: the augmentation noise ``[B, D]`` (None: ``randn_like``)."""
        n = len(prompts)
        embedding = self.embed_image(image)
        if embedding.shape[0] == 1 and n > 1:
            embedding = embedding.expand(n, -1)
        adm = self.adm_conditioning(embedding, noise_level, noise)
        c = self.get_learned_conditioning(list(prompts))
        uc = self.get_learned_conditioning([negative_prompt] * n)
        return {"c_crossattn": [c], "c_adm": adm}, {"c_crossattn": [uc], "c_adm": torch.zeros_like(adm)}
