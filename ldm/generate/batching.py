"""How the pipeline calls the UNet: :class:`PaddedPerImageModel`, the model as the samplers see it."""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F

__all__ = ["PaddedPerImageModel"]


class PaddedPerImageModel:
    """A diffusion model whose ``apply_model`` pads the latents to the UNet's multiple and runs the
    UNet one image at a time; every other attribute is the wrapped model's, so any sampler takes it.

    Padding: the UNet halves the latent ``len(channel_mult) - 1`` times and concatenates skip
    connections, so the reference only ran sizes that are multiples of ``8 * 2 ** (levels - 1)``
    pixels (64 for SD). Other multiples of 8 run with the latent padded at the bottom and right
    (edge values repeated) to that multiple inside each call, and the output cropped back.

    One image at a time (``n_images``): the batch a sampler passes holds ``n_images`` images, or
    ``2 * n_images`` with guidance (``cat([uncond, cond])``); image ``k``'s rows ``k, k + n, ...``
    go through the UNet together, exactly as when that image is made alone. Batched convolution
    kernels (oneDNN, cuDNN) round differently for different batch sizes, so this is what makes an
    image bit-identical whatever batch it was made in. ``n_images=None`` runs the batch at once.
    """

    def __init__(self, model, multiple: int = 1, n_images: Optional[int] = None):
        self._model = model
        self._multiple = multiple
        self._n = n_images

    def __getattr__(self, name):
        return getattr(self._model, name)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond=None, **kwargs):
        n = self._n
        if not n or n == 1 or x.shape[0] % n:
            return self._padded(x, t, cond, **kwargs)
        groups = x.shape[0] // n
        out = None
        for k in range(n):
            rows = torch.arange(k, x.shape[0], n, device=x.device)                      # [groups]
            piece = self._padded(x[rows], t[rows] if t.ndim else t, _take_rows(cond, rows, x.shape[0]), **kwargs)
            if out is None:
                out = piece.new_empty((groups * n, *piece.shape[1:]))
            out[rows] = piece
        return out

    def _padded(self, x: torch.Tensor, t: torch.Tensor, cond, **kwargs):
        h, w = x.shape[-2:]
        ph, pw = (-h) % self._multiple, (-w) % self._multiple
        if not ph and not pw:
            return self._model.apply_model(x, t, cond, **kwargs)

        def pad(y: torch.Tensor) -> torch.Tensor:
            return F.pad(y, (0, pw, 0, ph), mode="replicate")

        if isinstance(cond, Mapping) and cond.get("c_concat"):
            cond = {**cond, "c_concat": [pad(c) for c in cond["c_concat"]]}
        return self._model.apply_model(pad(x), t, cond, **kwargs)[..., :h, :w]


def _take_rows(cond, rows: torch.Tensor, batch: int):
    """``cond`` (tensor, list or dict of them) with only ``rows`` of its batch dimension."""
    if isinstance(cond, torch.Tensor):
        return cond[rows.to(cond.device)] if cond.ndim and cond.shape[0] == batch else cond
    if isinstance(cond, Mapping):
        return {key: _take_rows(value, rows, batch) for key, value in cond.items()}
    if isinstance(cond, (list, tuple)):
        return [_take_rows(value, rows, batch) for value in cond]
    return cond
