"""``sgm.modules.diffusionmodules.wrappers``: how ``DiffusionEngine`` calls its network."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["IdentityWrapper", "OpenAIWrapper", "OPENAIUNETWRAPPER"]

OPENAIUNETWRAPPER = "sgm.modules.diffusionmodules.wrappers.OpenAIWrapper"


class IdentityWrapper(nn.Module):
    """Holds the network as ``diffusion_model`` (keys ``model.diffusion_model.*``). ``compile_model``
    is accepted; compile with :func:`ldm.modules.diffusionmodules.openaimodel.compile_unet`."""

    def __init__(self, diffusion_model: nn.Module, compile_model: bool = False):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, *args, **kwargs):
        return self.diffusion_model(*args, **kwargs)


class OpenAIWrapper(IdentityWrapper):
    """``UNet(cat([x, c["concat"]], 1), timesteps=t, context=c["crossattn"], y=c["vector"])``."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: dict, **kwargs) -> torch.Tensor:
        if c.get("concat") is not None:
            x = torch.cat((x, c["concat"].to(x.dtype)), dim=1)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"), **kwargs)
