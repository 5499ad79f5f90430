"""Classifier-free guidance as one small object, the way sgm (``sgm.modules.diffusionmodules.guiders``)
splits it: a *guider* prepares the model inputs (the doubled batch) and combines the outputs, and
:class:`GuidedModel` binds a model, a conditioning and a guider into ``f(x_t, t) -> output``.

Guidance acts on the raw model output (eps or v), before any conversion, as the reference does.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import torch

from ldm.errors import UserInputError

Cond = Union[torch.Tensor, Mapping[str, Any], Sequence[Any], None]

__all__ = ["Cond", "IdentityGuider", "VanillaCFG", "make_guider", "GuidedModel", "cat_cond", "batch_of"]


def batch_of(cond: Cond) -> Optional[int]:
    """Batch size of a conditioning tensor, or of the first tensor inside a dict/list."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond.shape[0]
    if isinstance(cond, Mapping):
        for value in cond.values():
            found = batch_of(value)
            if found is not None:
                return found
        return None
    if isinstance(cond, (list, tuple)):
        return batch_of(cond[0]) if cond else None
    return None


def cat_cond(uncond: Cond, cond: Cond) -> Cond:
    """``cat([uncond, cond])`` along the batch, per key (and per list item) for dict conditionings."""
    if isinstance(cond, Mapping):
        if not isinstance(uncond, Mapping) or set(uncond) != set(cond):
            raise UserInputError("conditioning is a dict, so unconditional_conditioning must be a dict with the "
                                 f"same keys ({sorted(cond)}); got {type(uncond).__name__}")
        return {key: cat_cond(uncond[key], value) for key, value in cond.items()}
    if isinstance(cond, (list, tuple)):
        if not isinstance(uncond, (list, tuple)) or len(uncond) != len(cond):
            raise UserInputError("conditioning and unconditional_conditioning lists differ in length")
        return [cat_cond(u, c) for u, c in zip(uncond, cond)]
    return torch.cat([uncond, cond])


class IdentityGuider:
    """No guidance: one model call on the conditional batch (sgm's ``IdentityGuider``)."""

    def prepare_cond(self, cond: Cond, uncond: Cond) -> Cond:
        """The conditioning the model is called with (computed once per run)."""
        return cond

    def prepare_inputs(self, x: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(x [B,...], t [B])`` as the model gets them."""
        return x, t

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        return out


class VanillaCFG(IdentityGuider):
    """Classifier-free guidance (Ho & Salimans 2022), sgm's ``VanillaCFG``: the model runs once on
    ``cat([uncond, cond])`` with ``x`` and ``t`` doubled (the reference's batch order) and the two
    halves combine as ``out_u + scale·(out_c - out_u)``.

    :param scale: guidance scale ``s``.
    """

    def __init__(self, scale: float):
        self.scale = float(scale)

    def prepare_cond(self, cond: Cond, uncond: Cond) -> Cond:
        return cat_cond(uncond, cond)

    def prepare_inputs(self, x: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([x, x]), torch.cat([t, t])                                    # [2B, ...], [2B]

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        """:param out: ``[2B, ...]`` model output on ``cat([uncond, cond])``. :returns: ``[B, ...]``."""
        out_u, out_c = out.chunk(2)
        return out_u + self.scale * (out_c - out_u)


def make_guider(scale: float, uncond: Cond) -> IdentityGuider:
    """:class:`VanillaCFG` when guidance changes anything (an ``uncond`` and ``scale != 1``), else
    :class:`IdentityGuider` (one unguided call per step)."""
    return VanillaCFG(scale) if uncond is not None and float(scale) != 1.0 else IdentityGuider()


class GuidedModel:
    """``f(x_t, t) -> out``: ``model.apply_model`` under a guider, for one fixed conditioning.

    :param model: anything with ``apply_model(x [B,C,H,W], t [B], cond) -> [B,C,H,W]``.
    :param cond: tensor ``[B, ...]`` or dict ``{"c_crossattn": [tensor], "c_concat": [tensor]}``.
    :param uncond: same structure as ``cond`` (or None).
    :param scale: guidance scale (used when ``guider`` is None, see :func:`make_guider`).
    :param guider: an explicit guider (default :func:`make_guider(scale, uncond)`).
    """

    def __init__(self, model, cond: Cond, uncond: Cond = None, scale: float = 1.0, guider=None):
        self.model = model
        self.guider = guider if guider is not None else make_guider(scale, uncond)
        self.cond_in = self.guider.prepare_cond(cond, uncond)  # once per run, not per step

    @property
    def scale(self) -> float:
        return getattr(self.guider, "scale", 1.0)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """:param x: ``[B,C,H,W]``; :param t: ``[B]`` or a scalar tensor; :returns: ``[B,C,H,W]``."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        x_in, t_in = self.guider.prepare_inputs(x, t)
        return self.guider(self.model.apply_model(x_in, t_in, self.cond_in))


#: the name the reference-era code and the tests use
ClassifierFreeGuidance = GuidedModel
