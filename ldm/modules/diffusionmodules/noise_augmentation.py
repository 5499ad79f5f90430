"""Noise augmentation of a CLIP image embedding (Stable unCLIP's ``noise_augmentor``).

``CLIPEmbeddingNoiseAugmentation`` noises the embedding ``e`` to an integer level ``l`` of its own
schedule (``squaredcos_cap_v2`` in the released configs) in normalised units,
``z = unscale(sqrt(ā[l])·scale(e) + sqrt(1−ā[l])·n)`` with ``scale(x) = (x − mean)/std``, and returns
``z`` with the sinusoidal embedding of ``l`` (``timestep_embedding(l, timestep_dim)``, cos half
first). The UNet's vector conditioning is ``cat([z, emb(l)])``. The statistics ``data_mean`` /
``data_std`` are non-persistent buffers: zeros/ones (unCLIP-H), or ``torch.load(clip_stats_path)``
(unCLIP-L: Karlo's ``ViT-L-14_stats.th``), never in a checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ldm.errors import UserInputError
from ldm.modules.diffusionmodules.upscaling import ImageConcatWithNoiseAugmentation
from ldm.modules.diffusionmodules.util import timestep_embedding

__all__ = ["Timestep", "CLIPEmbeddingNoiseAugmentation", "ClipStatsNotFoundError"]


class Timestep(nn.Module):
    """``timestep_embedding(t, dim)`` as a module (the reference's ``openaimodel.Timestep``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim)


class ClipStatsNotFoundError(UserInputError, FileNotFoundError):
    """The statistics file a user must bring is missing: one line in the scripts, still a ``FileNotFoundError``."""


def load_clip_stats(path, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` ``[dim]`` each from a ``torch.save``d pair (weights-only load).

    :raises ClipStatsNotFoundError: no file at ``path``; :raises UserInputError: not such a pair."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ClipStatsNotFoundError(
            f"clip_stats_path {str(path)!r} does not exist: the unCLIP-L noise augmentor normalises the image "
            "embedding with the (mean, std) of Karlo's ViT-L-14_stats.th (checkpoints/karlo_models/ in the "
            "reference); put that file there or set noise_aug_config.params.clip_stats_path")
    stats = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(stats, (tuple, list)) and len(stats) == 2):
        raise UserInputError(f"{path} must hold a (mean, std) pair of tensors, got {type(stats).__name__}")
    # on the CPU even inside the loaders' meta-device build: a non-persistent buffer is never loaded
    mean, std = (torch.as_tensor(s, dtype=torch.float32, device="cpu").reshape(-1) for s in stats)
    if mean.numel() != dim or std.numel() != dim:
        raise UserInputError(f"{path}: mean/std have {mean.numel()}/{std.numel()} values, the embedding has {dim}")
    return mean, std


class CLIPEmbeddingNoiseAugmentation(ImageConcatWithNoiseAugmentation):
    """Noise augmentation of ``[B, timestep_dim]`` image embeddings.

    :param noise_schedule_config: ``{timesteps, beta_schedule, ...}`` of the augmentation schedule.
    :param clip_stats_path: file with the embedding's ``(mean, std)``; None: zeros and ones.
    :param timestep_dim: width of the embedding (and of the level's sinusoidal embedding).
    :param max_noise_level: random levels are drawn from ``[0, max_noise_level)`` when none is given.
    """

    def __init__(self, *args, clip_stats_path: Optional[str] = None, timestep_dim: int = 256, **kwargs):
        super().__init__(*args, **kwargs)
        if clip_stats_path is None:
            mean, std = torch.zeros(timestep_dim, device="cpu"), torch.ones(timestep_dim, device="cpu")
        else:
            mean, std = load_clip_stats(clip_stats_path, timestep_dim)
        self.register_buffer("data_mean", mean[None, :], persistent=False)
        self.register_buffer("data_std", std[None, :], persistent=False)
        self.time_embed = Timestep(timestep_dim)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.data_mean.to(x)) * 1.0 / self.data_std.to(x)

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.data_std.to(x) + self.data_mean.to(x)

    def forward(self, x: torch.Tensor, noise_level: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:param x: ``[B, D]`` embeddings; :param noise_level: int64 ``[B]`` in ``[0, timesteps)``
        (None: random); :param noise: ``[B, D]`` (None: ``randn_like(x)``).
        :returns: ``(z [B, D], emb(level) [B, D])``."""
        if noise_level is None:
            noise_level = torch.randint(0, self.max_noise_level, (x.shape[0],), device=x.device).long()
        elif not isinstance(noise_level, torch.Tensor):
            raise TypeError(f"noise_level must be an int64 tensor [B], got {type(noise_level).__name__}")
        if noise_level.numel() and not 0 <= int(noise_level.min()) <= int(noise_level.max()) < self.num_timesteps:
            raise ValueError(f"noise levels must be in [0, {self.num_timesteps - 1}], got {noise_level.tolist()}")
        z = self.unscale(self.q_sample(self.scale(x), noise_level.to(x.device), noise))
        return z, self.time_embed(noise_level.to(x.device)).to(z.dtype)
