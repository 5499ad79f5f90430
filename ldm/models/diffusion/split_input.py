"""The patch-wise mode of ``LatentDiffusion`` (the reference's ``split_input_params``): the UNet
and the first-stage decoder run on overlapping crops, so latents and images of any size fit in
bounded memory. The bsr_sr super-resolution notebook turns it on for outputs of 128 pixels or
more a side; :mod:`ldm.generate.superres` does the same.

Set ``model.split_input_params`` to a dict (the notebook's, :func:`notebook_split_params`)::

    {"ks": (128, 128), "stride": (64, 64), "vqf": 4, "patch_distributed_vq": True,
     "tie_braker": False, "clip_max_weight": 0.5, "clip_min_weight": 0.01,
     "clip_max_tie_weight": 0.5, "clip_min_tie_weight": 0.01}

and delete it (or set it to None) to turn the mode off. Then, as in the reference
(``LatentDiffusion.apply_model`` / ``decode_first_stage`` / ``get_fold_unfold``):

* :func:`apply_model_split`: the latent is cut into ``ks`` crops every ``stride`` positions, the
  UNet runs per crop (a spatial conditioning such as bsr_sr's low-resolution image, cond stage key
  ``image``/``LR_image``/``segmentation``/``bbox_img``, is cut the same way; any other conditioning
  goes whole to every crop), each output is multiplied by its weight map and the sum is divided by
  the summed weights. The weight of a crop position is its normalised distance to the crop's
  border (:func:`delta_border`: 0 at the border, 0.5 in the centre) clipped to
  ``[clip_min_weight, clip_max_weight]``; with ``tie_braker`` it is also multiplied by the crop's
  own distance to the border of the crop grid, clipped to the ``*_tie_weight`` bounds.
* :func:`decode_split` (``patch_distributed_vq``): the same over ``ks`` latent crops decoded one by
  one (VQ models quantise each crop), the weights at ``vqf`` times the size.

Where a crop grid covers the latent (sides ``ks + k*stride``) the numbers are the reference's (up
to the order of the float sums). Deliberate differences, each a failure of the reference:

* the crop size shrinks to the latent's size in :func:`apply_model_split` too (the reference did
  that only in the decoder, and its UNet call raised an Unfold/Fold error when a side was smaller
  than ``ks``);
* sides that are not ``ks + k*stride`` get one more crop aligned to the far edge (the reference
  left the uncovered strip with zero total weight: NaN in the eps and the image);
* non-square crops use their own height and width in the decoder (the reference used ``ks[0]``
  for both sides of the decoded crop);
* with ``tie_braker`` and a single row or column of crops the tie weights are finite (the
  reference divided 0 by 0 in :func:`delta_border`).

The patch-wise encoder of the reference (``encode_first_stage``, training and logging only) is
not provided: ``encode_first_stage`` always encodes in one piece.
"""
from __future__ import annotations

import logging
from typing import Mapping, Optional

import torch

__all__ = ["NOTEBOOK_SPLIT_PARAMS", "notebook_split_params", "delta_border", "patch_starts", "crop_weights",
           "apply_model_split", "decode_split", "split_active", "SPATIAL_COND_KEYS"]

log = logging.getLogger(__name__)

#: ``notebook_helpers.run``'s settings for super-resolution (ks/stride in latent positions).
NOTEBOOK_SPLIT_PARAMS = {"ks": (128, 128), "stride": (64, 64), "vqf": 4, "patch_distributed_vq": True,
                         "tie_braker": False, "clip_max_weight": 0.5, "clip_min_weight": 0.01,
                         "clip_max_tie_weight": 0.5, "clip_min_tie_weight": 0.01}

#: Cond stage keys whose conditioning is an image cut into crops with the latent (as the reference).
SPATIAL_COND_KEYS = ("image", "LR_image", "segmentation", "bbox_img")


def notebook_split_params(ks: int = 128, stride: int = 64, vqf: int = 4) -> dict:
    """The notebook's ``split_input_params`` with crop side ``ks`` and ``stride`` (latent positions)."""
    return {**NOTEBOOK_SPLIT_PARAMS, "ks": (int(ks), int(ks)), "stride": (int(stride), int(stride)), "vqf": int(vqf)}


def delta_border(h: int, w: int) -> torch.Tensor:
    """``[h, w]`` float32: each position's distance to the nearest border, each axis normalised to
    ``[0, 1]`` by ``(h - 1, w - 1)``: 0 on the border, 0.5 in the centre (the reference's; a side
    of 1 counts as border instead of the reference's 0/0 = NaN)."""
    y = torch.arange(h).view(h, 1, 1).expand(h, w, 1)
    x = torch.arange(w).view(1, w, 1).expand(h, w, 1)
    arr = torch.cat([y, x], dim=-1) / torch.tensor([max(h - 1, 1), max(w - 1, 1)]).view(1, 1, 2)
    near = torch.minimum(arr.min(dim=-1).values, (1 - arr).min(dim=-1).values)
    return near


def patch_starts(size: int, ks: int, stride: int) -> list:
    """Crop starts ``0, stride, ...`` while the crop fits, plus one at ``size - ks`` when those
    leave the end uncovered."""
    starts = list(range(0, size - ks + 1, stride))
    if starts[-1] != size - ks:
        starts.append(size - ks)
    return starts


def crop_weights(params: Mapping, ks: tuple, n_y: int, n_x: int, device=None) -> torch.Tensor:
    """``[1, 1, ks[0], ks[1], n_y * n_x]`` float32: each crop's weight map (crops in row-major
    order), the reference's ``weighting``."""
    w = delta_border(*ks).clip(params["clip_min_weight"], params["clip_max_weight"])
    w = w.reshape(1, 1, ks[0], ks[1], 1).repeat(1, 1, 1, 1, n_y * n_x)
    if params.get("tie_braker"):
        tie = delta_border(n_y, n_x).clip(params["clip_min_tie_weight"], params["clip_max_tie_weight"])
        w = w * tie.reshape(1, 1, 1, 1, n_y * n_x)
    return w.to(device)


def _blend(crop_fn, size: tuple, ks: tuple, stride: tuple, scale: int, params: Mapping, device):
    """Run ``crop_fn(y0, x0, k0, k1)`` (crop in input units -> output ``scale`` times larger) over
    the crop grid of ``size`` and blend: ``(sum of weight * output) / (sum of weights)``.

    :returns: ``(result, weighting [1,1,k0*s,k1*s,L], normalization [1,1,H*s,W*s])``.
    """
    ys, xs = patch_starts(size[0], ks[0], stride[0]), patch_starts(size[1], ks[1], stride[1])
    weighting = crop_weights(params, (ks[0] * scale, ks[1] * scale), len(ys), len(xs), device)
    norm = torch.zeros(1, 1, size[0] * scale, size[1] * scale, device=device)
    out = dtype = None
    for i, (y0, x0) in enumerate((y, x) for y in ys for x in xs):
        piece = crop_fn(y0, x0, ks[0], ks[1])
        if out is None:  # summed in float32 also for half-precision models
            dtype = piece.dtype
            out = piece.new_zeros((*piece.shape[:2], size[0] * scale, size[1] * scale), dtype=torch.float32)
        rows, cols = slice(y0 * scale, (y0 + ks[0]) * scale), slice(x0 * scale, (x0 + ks[1]) * scale)
        out[..., rows, cols] += piece.float() * weighting[..., i]
        norm[..., rows, cols] += weighting[..., i]
    return (out / norm).to(dtype), weighting, norm


def _crop_size(params: Mapping, h: int, w: int) -> tuple:
    ks = (min(int(params["ks"][0]), h), min(int(params["ks"][1]), w))
    stride = (min(int(params["stride"][0]), h), min(int(params["stride"][1]), w))
    if min(stride) < 1:
        raise ValueError(f"split_input_params stride must be >= 1, got {params['stride']}")
    return ks, stride


def apply_model_split(model, x_noisy: torch.Tensor, t: torch.Tensor, cond: dict, *, details: bool = False):
    """The UNet output for ``x_noisy`` computed crop by crop (see the module).

    :param cond: the conditioning dict ``{"c_concat": [...]}`` or ``{"c_crossattn": [...]}`` (one key,
        as the reference).
    :param details: also return the weighting and normalisation (tests).
    """
    params = model.split_input_params
    if len(cond) > 1:
        raise ValueError(f"split_input_params handles one kind of conditioning, got {sorted(cond)}")
    if model.cond_stage_key == "coordinates_bbox":
        raise NotImplementedError("split_input_params with bounding-box conditioning (layout2img) is not supported")
    ks, stride = _crop_size(params, *x_noisy.shape[-2:])
    spatial = model.cond_stage_key in SPATIAL_COND_KEYS and model.model.conditioning_key
    if spatial:
        (c_key, c_value), = cond.items()
        if len(c_value) != 1:
            raise ValueError(f"split_input_params needs one {c_key} tensor, got {len(c_value)}")

    def crop_fn(y0, x0, k0, k1):
        window = (..., slice(y0, y0 + k0), slice(x0, x0 + k1))
        crop_cond = {c_key: [c_value[0][window]]} if spatial else cond
        out = model.model(x_noisy[window], t, **crop_cond)
        if isinstance(out, tuple):
            raise ValueError("split_input_params cannot combine several model outputs")
        return out

    out, weighting, norm = _blend(crop_fn, tuple(x_noisy.shape[-2:]), ks, stride, 1, params, x_noisy.device)
    return (out, weighting, norm) if details else out


def decode_split(model, z: torch.Tensor, force_not_quantize: bool = False, *, details: bool = False):
    """Decode the unscaled latent ``z`` crop by crop (``patch_distributed_vq``; see the module);
    without ``patch_distributed_vq`` in one piece.

    :param details: also return the weighting and normalisation (tests).
    """
    params = model.split_input_params
    first = model.first_stage_model
    is_vq = hasattr(first, "quantize")

    def decode(piece: torch.Tensor) -> torch.Tensor:
        return first.decode(piece, force_not_quantize=force_not_quantize) if is_vq else first.decode(piece)

    if not params.get("patch_distributed_vq"):
        out = decode(z)
        return (out, None, None) if details else out
    ks, stride = _crop_size(params, *z.shape[-2:])
    uf = int(params["vqf"])

    def crop_fn(y0, x0, k0, k1):
        return decode(z[..., y0:y0 + k0, x0:x0 + k1])

    out, weighting, norm = _blend(crop_fn, tuple(z.shape[-2:]), ks, stride, uf, params, z.device)
    return (out, weighting, norm) if details else out


def split_active(model) -> Optional[Mapping]:
    """The model's ``split_input_params`` when the patch-wise mode is on, else None."""
    return getattr(model, "split_input_params", None) or None
