"""The DPT decoder of MiDaS (Ranftl et al. 2021): ``DPTDepthModel`` for the ``vitb_rn50_384`` backbone.

The four encoder maps (strides 4, 8, 16, 32; :mod:`.backbone`) are each brought to ``features``
(256) channels by a 3x3 convolution without bias (``scratch.layerN_rn``), then fused coarse to
fine: ``refinenet4`` takes the stride-32 map, each later one adds a residual unit of its own map to
the previous output; every fusion block ends with a residual unit, a bilinear 2x upsampling
(``align_corners=True``) and a 1x1 convolution. The head (``scratch.output_conv``): 3x3 conv to 128,
bilinear 2x (``align_corners=True``), 3x3 conv to 32, ReLU, 1x1 conv to 1, ReLU (``non_negative``).
The prediction is relative inverse depth (larger = nearer) at the input's size, ``[B, H, W]``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.midas.backbone import ViTHybridBackbone
from ldm.ops import Conv2d

__all__ = ["DPTDepthModel", "FeatureFusionBlock_custom", "ResidualConvUnit_custom", "Interpolate"]


class Interpolate(nn.Module):
    def __init__(self, scale_factor: float, mode: str, align_corners: bool = False):
        super().__init__()
        self.scale_factor, self.mode, self.align_corners = scale_factor, mode, align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode, align_corners=self.align_corners)


class ResidualConvUnit_custom(nn.Module):  # noqa: N801  (the reference's class name)
    """``x + conv2(ReLU(conv1(ReLU(x))))``."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock_custom(nn.Module):  # noqa: N801
    """``out_conv(up2(resConfUnit2(x + resConfUnit1(skip))))`` (without ``skip``: of ``x`` alone)."""

    def __init__(self, features: int):
        super().__init__()
        self.out_conv = Conv2d(features, features, kernel_size=1)
        self.resConfUnit1 = ResidualConvUnit_custom(features)
        self.resConfUnit2 = ResidualConvUnit_custom(features)

    def forward(self, x: torch.Tensor, skip: torch.Tensor = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTDepthModel(nn.Module):
    """MiDaS DPT with its depth head; ``pretrained`` is the encoder, ``scratch`` the decoder.

    :param backbone: only ``"vitb_rn50_384"`` (DPT-Hybrid, SD 2's depth model) is provided.
    :param features: channels of the decoder.
    :param non_negative: a ReLU on the output.
    :param hooks, encoder_features: the encoder's taps and their channels; the remaining keyword
        arguments size the hybrid ViT (:class:`~ldm.modules.midas.backbone.VisionTransformerHybrid`),
        so a smaller network of the same layout can be built (tests).
    """

    def __init__(self, backbone: str = "vitb_rn50_384", features: int = 256, non_negative: bool = True,
                 hooks: Sequence[int] = (0, 1, 8, 11), encoder_features: Sequence[int] = None, **vit_kwargs):
        super().__init__()
        if backbone != "vitb_rn50_384":
            raise ValueError(f"MiDaS backbone {backbone!r} is not provided; only 'vitb_rn50_384' (DPT-Hybrid, "
                             "model_type dpt_hybrid) is")
        width, dim = vit_kwargs.get("stem_width", 64), vit_kwargs.get("embed_dim", 768)
        encoder_features = tuple(encoder_features or (4 * width, 8 * width, dim, dim))
        self.pretrained = ViTHybridBackbone(hooks=hooks, features=encoder_features, **vit_kwargs)
        self.scratch = nn.Module()
        for i, channels in enumerate(encoder_features, start=1):
            setattr(self.scratch, f"layer{i}_rn", Conv2d(channels, features, kernel_size=3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self.scratch, f"refinenet{i}", FeatureFusionBlock_custom(features))
        self.scratch.output_conv = nn.Sequential(
            Conv2d(features, features // 2, kernel_size=3, padding=1),
            Interpolate(scale_factor=2, mode="bilinear", align_corners=True),
            Conv2d(features // 2, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            Conv2d(32, 1, kernel_size=1),
            nn.ReLU() if non_negative else nn.Identity(),
            nn.Identity(),
        )

    def forward_features(self, x: torch.Tensor) -> dict:
        """The decoder's intermediate maps by the fixture's names (``layer_N``, ``layer_N_rn``, ``path_N``)
        and ``output_conv``, ``[B, 1, H, W]``."""
        s = self.scratch
        got = {}
        for i, layer in enumerate(self.pretrained(x), start=1):
            got[f"layer_{i}"] = layer
            got[f"layer_{i}_rn"] = getattr(s, f"layer{i}_rn")(layer)
        got["path_4"] = s.refinenet4(got["layer_4_rn"])
        got["path_3"] = s.refinenet3(got["path_4"], got["layer_3_rn"])
        got["path_2"] = s.refinenet2(got["path_3"], got["layer_2_rn"])
        got["path_1"] = s.refinenet1(got["path_2"], got["layer_1_rn"])
        got["output_conv"] = s.output_conv(got["path_1"])
        return got

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: ``[B, 3, H, W]`` normalised to about [-1, 1], H and W multiples of 32. :returns: ``[B, H, W]``."""
        return self.forward_features(x)["output_conv"].squeeze(1)
