"""Exponential moving average of a model's parameters, stored as buffers in the checkpoint
layout of the reference (``model_ema.<parameter name without dots>``)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class LitEma(nn.Module):
    """Shadow copies of ``model``'s trainable parameters.

    Buffers: ``decay`` (float32 scalar), ``num_updates`` (int32 scalar; -1 when the warm-up
    ``decay = min(decay, (1 + n) / (10 + n))`` is off) and one shadow per parameter, named by
    removing every ``.`` from the parameter name.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.m_name2s_name = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    def reset_num_updates(self) -> None:
        self.num_updates = torch.tensor(0, dtype=torch.int, device=self.num_updates.device)

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA update: shadow -= (1 - decay) · (shadow - param)."""
        decay = float(self.decay)
        if self.num_updates >= 0:
            self.num_updates += 1
            n = int(self.num_updates)
            decay = min(decay, (1 + n) / (10 + n))
        shadows = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if p.requires_grad:
                shadow = shadows[self.m_name2s_name[name]]
                shadow.sub_((1.0 - decay) * (shadow - p.to(shadow.dtype)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow weights into ``model``'s parameters."""
        shadows = dict(self.named_buffers())
        params = dict(model.named_parameters())
        for name, s_name in self.m_name2s_name.items():
            params[name].copy_(shadows[s_name])

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Keep a copy of ``parameters`` for :meth:`restore`."""
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put back the parameters saved by :meth:`store`."""
        for saved, p in zip(self.collected_params, parameters):
            p.copy_(saved)
        self.collected_params = []
