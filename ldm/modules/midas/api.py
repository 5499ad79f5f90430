"""``MiDaSInference`` (the ``depth_stage_config`` target of ``v2-midas-inference.yaml``) and the
MiDaS input transform of the SD 2 depth model.

The input transform is the reference's ``AddMiDaS("dpt_hybrid")`` (``ldm/data/util.py``): the image
in [0, 1] is resized with keep-aspect-ratio "minimal" scaling toward 384x384, each side rounded to a
multiple of 32 (a 512x512 image becomes 384x384, a 64x128 one 192x384), bicubic (the reference's
``cv2.INTER_CUBIC``; here ``F.interpolate(mode="bicubic", align_corners=False)``, which uses the
same kernel), then normalised with mean 0.5 and std 0.5. ``MiDaSInference`` resizes the DPT
prediction back to that input size (bicubic).

Unlike the reference, nothing is read from ``midas_models/dpt_hybrid-midas-501f0c75.pt`` at
construction: the weights come from the SD checkpoint's ``depth_model.*`` tensors like every other
part (the model is built on ``meta`` and loaded once).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.midas.dpt import DPTDepthModel

__all__ = ["MiDaSInference", "midas_input_size", "midas_transform", "MODEL_TYPES"]

#: The model types of the reference's ``MiDaSInference`` (only ``dpt_hybrid`` is provided here).
MODEL_TYPES = ("dpt_large", "dpt_hybrid", "midas_v21", "midas_v21_small")
NET_SIZE = 384
MULTIPLE = 32


def _keep_eval(self, mode: bool = True):
    return self


def midas_input_size(height: int, width: int, target: int = NET_SIZE, multiple: int = MULTIPLE) -> tuple:
    """``(h, w)`` of the MiDaS input for an image of ``height x width`` (MiDaS ``Resize``,
    ``keep_aspect_ratio``, ``resize_method="minimal"``: the scale nearer to 1 wins, then each side is
    rounded to the nearest multiple, halves to even as numpy's ``round``)."""
    scale_h, scale_w = target / height, target / width
    scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
    return tuple(max(int(round(scale * side / multiple)) * multiple, multiple) for side in (height, width))


def midas_transform(image: torch.Tensor) -> torch.Tensor:
    """``AddMiDaS``: ``[B, 3, H, W]`` in [-1, 1] -> the MiDaS input ``[B, 3, h, w]`` (float32)."""
    x = (image.float() + 1.0) * 0.5
    size = midas_input_size(*x.shape[-2:])
    if tuple(x.shape[-2:]) != size:
        # on the CPU in float64, as the reference's cv2 on numpy: torch's float32 bicubic is up to 1e-5 off
        # cv2's (float64 matches it to 4e-7), and the fixture's random-weight MiDaS amplifies input changes ~200x
        x = F.interpolate(x.cpu().double(), size=size, mode="bicubic", align_corners=False).float().to(image.device)
    return (x - 0.5) / 0.5


class MiDaSInference(nn.Module):
    """A frozen MiDaS depth model: ``forward(x)`` is its prediction ``[B, 1, h, w]`` at the input's size.

    :param model_type: ``"dpt_hybrid"`` (DPT-Hybrid, the SD 2 depth model's). The reference's other
        types (``dpt_large``, ``midas_v21``, ``midas_v21_small``) are not provided.
    :param model_config: keyword arguments of :class:`~ldm.modules.midas.dpt.DPTDepthModel` that
        change its size (tests); the checkpoints need none.
    """

    def __init__(self, model_type: str = "dpt_hybrid", model_config: dict = None):
        super().__init__()
        if model_type != "dpt_hybrid":
            known = ", ".join(MODEL_TYPES)
            raise ValueError(f"MiDaS model_type {model_type!r} is not provided here (the reference knows {known}); "
                             "the SD 2 depth model uses 'dpt_hybrid'")
        self.model_type = model_type
        self.model = DPTDepthModel(backbone="vitb_rn50_384", non_negative=True, **dict(model_config or {}))
        self.model.eval()
        self.model.train = _keep_eval.__get__(self.model)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: the MiDaS input (:func:`midas_transform`). :returns: ``[B, 1, h, w]``, bicubic to x's size."""
        prediction = self.model(x).unsqueeze(1)
        return F.interpolate(prediction, size=x.shape[2:], mode="bicubic", align_corners=False)
