"""The low-scale models of the SD 2 x4 upscaler: how the low-resolution image is prepared before
it is concatenated to the latent (``low_scale_model`` of ``LatentUpscaleDiffusion``).

``ImageConcatWithNoiseAugmentation`` noises the image to an integer *noise level* ``l`` of its own
schedule, ``x_aug = sqrt(ā'[l])·x_low + sqrt(1−ā'[l])·n``, and returns ``l`` too: the UNet sees
``l`` as its class label (``c_adm``). The 8 schedule buffers are persistent (they are in the
released checkpoint), computed in float64 and kept in float32 on the CPU, also on ``meta``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ldm.modules.diffusionmodules.util import extract_into_tensor, forward_schedule, make_beta_schedule

__all__ = ["AbstractLowScaleModel", "SimpleImageConcat", "ImageConcatWithNoiseAugmentation", "LOW_SCALE_BUFFERS"]

#: The schedule buffers of a low-scale model, in state_dict order (no posterior buffers).
LOW_SCALE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod")


class AbstractLowScaleModel(nn.Module):
    """A low-resolution image, prepared for concatenation to the latent; ``forward(x) -> (x, None)``.

    :param noise_schedule_config: ``{beta_schedule, timesteps, linear_start, linear_end, cosine_s}``
        of the augmentation schedule (None: no schedule).
    """

    def __init__(self, noise_schedule_config=None):
        super().__init__()
        if noise_schedule_config is not None:
            self.register_schedule(**noise_schedule_config)

    def register_schedule(self, beta_schedule: str = "linear", timesteps: int = 1000, linear_start: float = 1e-4,
                          linear_end: float = 2e-2, cosine_s: float = 8e-3) -> None:
        betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end,
                                   cosine_s=cosine_s)
        values = forward_schedule(betas)
        self.num_timesteps = int(betas.shape[0])
        self.linear_start, self.linear_end = linear_start, linear_end
        for name in LOW_SCALE_BUFFERS:
            self.register_buffer(name, torch.tensor(values[name], dtype=torch.float32, device="cpu"))

    def to(self, *args, **kwargs):
        """Device moves only: the schedule stays float32 when the networks are cast to half."""
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        return super().to(device) if device is not None else self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in LOW_SCALE_BUFFERS:  # a half-precision file's schedule is used in float32
            if prefix + name in state_dict and state_dict[prefix + name].is_floating_point():
                state_dict[prefix + name] = state_dict[prefix + name].float()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``sqrt(ā'_t)·x_start + sqrt(1−ā'_t)·noise`` for integer levels ``t`` [B] (float32 coefficients)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        a = extract_into_tensor(self.sqrt_alphas_cumprod.to(x_start.device), t, x_start.shape)
        s = extract_into_tensor(self.sqrt_one_minus_alphas_cumprod.to(x_start.device), t, x_start.shape)
        return (a * x_start.float() + s * noise.float()).to(x_start.dtype)

    def forward(self, x: torch.Tensor):
        return x, None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SimpleImageConcat(AbstractLowScaleModel):
    """The image as it is, at the constant level 0 (no noise-level conditioning)."""

    def __init__(self):
        super().__init__(noise_schedule_config=None)
        self.max_noise_level = 0

    def forward(self, x: torch.Tensor):
        return x, torch.zeros(x.shape[0], device=x.device).long()


class ImageConcatWithNoiseAugmentation(AbstractLowScaleModel):
    """Noise augmentation of the low-resolution image (the x4 upscaler's ``low_scale_model``).

    :param max_noise_level: random levels are drawn from ``[0, max_noise_level)`` when none is given
        (training); it does not bound a given level (the apps allow 0..350).
    :param to_cuda: ignored (the reference's flag; the buffers follow the model's device).
    """

    def __init__(self, noise_schedule_config, max_noise_level: int = 1000, to_cuda: bool = False):
        super().__init__(noise_schedule_config=noise_schedule_config)
        self.max_noise_level = max_noise_level

    def forward(self, x: torch.Tensor, noise_level: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None):
        """:param x: ``[B, 3, h, w]`` in [-1, 1]; :param noise_level: int64 ``[B]`` (None: random);
        :param noise: ``[B, 3, h, w]`` (None: ``randn_like(x)``). :returns: ``(x_aug, noise_level)``."""
        if noise_level is None:
            noise_level = torch.randint(0, self.max_noise_level, (x.shape[0],), device=x.device).long()
        elif not isinstance(noise_level, torch.Tensor):
            raise TypeError(f"noise_level must be an int64 tensor [B], got {type(noise_level).__name__}")
        return self.q_sample(x, noise_level, noise), noise_level
