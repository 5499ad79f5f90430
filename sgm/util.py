"""``sgm.util``: the config factory (the one in :mod:`ldm.util`) and sgm's small helpers."""
from __future__ import annotations

from typing import Any

import torch

from ldm.util import config_get, default, exists, get_obj_from_str, instantiate_from_config  # noqa: F401

__all__ = ["instantiate_from_config", "get_obj_from_str", "append_dims", "append_zero", "default", "exists"]


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """``x`` with trailing singleton dimensions up to ``target_dims``."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * missing]


def append_zero(x: torch.Tensor) -> torch.Tensor:
    """``cat([x, 0])`` of a 1-D tensor."""
    return torch.cat([x, x.new_zeros([1])])


def _to_container(node: Any) -> Any:
    """A plain dict/list of an OmegaConf node (anything else unchanged)."""
    if hasattr(node, "_metadata"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(node, resolve=True)
    return node
