"""The encoder of MiDaS DPT-Hybrid: timm's ``vit_base_resnet50_384`` and MiDaS's reassembly of it.

The network is timm 0.6.13's hybrid vision transformer, written here (timm needs torchvision):

* a ResNet-50 v2 *without* pre-activation (BiT style) as the patch embedding's ``backbone``:
  a 7x7/2 stem convolution, GroupNorm + ReLU, a 3x3/2 max pool, then stages of 3, 4 and 9
  bottleneck blocks (256, 512 and 1024 channels; the stride in the 3x3 convolution). Every
  convolution is weight-standardised (``StdConv2dSame``: each filter is shifted and scaled to zero
  mean and unit variance, eps 1e-8, before it is applied) and padded like TensorFlow's ``SAME``
  (the total padding ``(ceil(n/s)−1)·s + k − n`` split with the extra pixel at the end; the max
  pool pads with −inf). GroupNorm has 32 groups and eps 1e-5;
* ``proj``: a 1x1 convolution to 768 channels, one token per stride-16 cell; the class token and
  the learned position embedding (24x24 cells, bilinearly resized to the image's grid, as MiDaS's
  ``forward_flex``);
* 12 pre-LayerNorm transformer blocks (eps 1e-6, 12 heads, qkv with bias, exact GELU MLP 3072).

MiDaS takes four activations (``_make_vit_b_rn50_backbone``): the outputs of ResNet stages 0 and 1
(stride 4 and 8) as they are, and the tokens after blocks 8 and 11, each with the class token
folded in (``ProjectReadout``: ``GELU(Linear(cat([token, cls])))``) and laid out as a stride-16
map; the last is then brought to stride 32 by a 3x3/2 convolution. The final LayerNorm and the
classifier ``head`` have weights in the checkpoint but take no part in the depth.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.ops import Conv2d, Linear, attention

__all__ = ["StdConv2dSame", "GroupNormAct", "ResNetV2", "VisionTransformerHybrid", "ViTHybridBackbone"]


def pad_same(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """TensorFlow ``SAME`` padding: the output has ``ceil(n / stride)`` positions per side."""
    pads = []
    for size, k, s in zip(reversed(x.shape[-2:]), reversed(tuple(kernel_size)), reversed(tuple(stride))):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class StdConv2dSame(nn.Conv2d):
    """A weight-standardised convolution with ``SAME`` padding (no bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, eps: float = 1e-8):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride)
        # per-filter (x − mean)/sqrt(var + eps), biased variance: timm's batch_norm over the weight
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, None, self.stride, 0)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm (32 groups, eps 1e-5), then ReLU unless ``apply_act`` is False."""

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5, apply_act: bool = True):
        super().__init__(num_groups, num_channels, eps=eps)
        self.apply_act = apply_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.relu(x) if self.apply_act else x


class MaxPool2dSame(nn.Module):
    """3x3/2 max pooling with ``SAME`` padding by −inf."""

    def __init__(self, kernel_size: int = 3, stride: int = 2):
        super().__init__()
        self.kernel_size, self.stride = (kernel_size, kernel_size), (stride, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(pad_same(x, self.kernel_size, self.stride, value=-float("inf")), self.kernel_size,
                            self.stride)


class DownsampleConv(nn.Module):
    """The projection shortcut of a stage's first block: 1x1 convolution (with the stride), GroupNorm."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv = StdConv2dSame(in_channels, out_channels, 1, stride=stride)
        self.norm = GroupNormAct(out_channels, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """1x1 → 3x3 (stride) → 1x1 to ``out_channels``, each followed by GroupNorm (ReLU but the last),
    plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, downsample: bool = False):
        super().__init__()
        mid = out_channels // 4
        self.downsample = DownsampleConv(in_channels, out_channels, stride) if downsample else None
        self.conv1 = StdConv2dSame(in_channels, mid, 1)
        self.norm1 = GroupNormAct(mid)
        self.conv2 = StdConv2dSame(mid, mid, 3, stride=stride)
        self.norm2 = GroupNormAct(mid)
        self.conv3 = StdConv2dSame(mid, out_channels, 1)
        self.norm3 = GroupNormAct(out_channels, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class ResNetStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, depth: int):
        super().__init__()
        self.blocks = nn.Sequential(*[
            Bottleneck(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1,
                       downsample=i == 0) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetV2(nn.Module):
    """The BiT-style ResNet stem of the hybrid ViT (no classifier: its output is the last stage's map).

    :param layers: blocks per stage (``(3, 4, 9)``: ResNet-50's first three stages).
    :param stem_width: channels of the stem; stage ``i`` has ``4·stem_width·2^i`` channels.
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 9), in_channels: int = 3, stem_width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(OrderedDict([
            ("conv", StdConv2dSame(in_channels, stem_width, 7, stride=2)),
            ("norm", GroupNormAct(stem_width)),
            ("pool", MaxPool2dSame(3, 2)),
        ]))
        channels, stages = stem_width, []
        for i, depth in enumerate(layers):
            out = 4 * stem_width * 2 ** i
            stages.append(ResNetStage(channels, out, 1 if i == 0 else 2, depth))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.num_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class HybridEmbed(nn.Module):
    """The ResNet's feature map, one token per cell, projected to the transformer width (``proj``)."""

    def __init__(self, backbone: ResNetV2, embed_dim: int):
        super().__init__()
        self.backbone = backbone
        self.proj = Conv2d(backbone.num_features, embed_dim, kernel_size=1, stride=1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformerHybrid(nn.Module):
    """timm's ``VisionTransformer`` with a ``HybridEmbed`` (``vit_base_resnet50_384`` by default).

    :param img_size: the training size; the position embedding has ``(img_size/16)² + 1`` rows.
    :param num_classes: rows of the (unused) classifier ``head``.
    """

    patch_size = 16

    def __init__(self, img_size: int = 384, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, resnet_layers: Sequence[int] = (3, 4, 9), stem_width: int = 64,
                 num_classes: int = 1000):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        grid = img_size // self.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.patch_embed = HybridEmbed(ResNetV2(resnet_layers, stem_width=stem_width), embed_dim)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = Linear(embed_dim, num_classes)

    def resized_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The position embedding for a ``grid_h x grid_w`` token grid (bilinear, align_corners False)."""
        tok, grid = self.pos_embed[:, :1], self.pos_embed[0, 1:]
        old = int(math.sqrt(grid.shape[0]))
        grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
        return torch.cat([tok, grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)], dim=1)


class ProjectReadout(nn.Module):
    """Each patch token concatenated with the class token, projected back: ``GELU(Linear(2D → D))``."""

    def __init__(self, dim: int):
        super().__init__()
        self.project = nn.Sequential(Linear(2 * dim, dim), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        readout = x[:, :1].expand_as(x[:, 1:])
        return self.project(torch.cat([x[:, 1:], readout], dim=-1))


class Transpose(nn.Module):
    def __init__(self, dim0: int, dim1: int):
        super().__init__()
        self.dim0, self.dim1 = dim0, dim1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(self.dim0, self.dim1)


class ViTHybridBackbone(nn.Module):
    """MiDaS's ``pretrained`` module for ``vitb_rn50_384``: the hybrid ViT (``model``) and the
    reassembly of its activations (``act_postprocess1..4``; 1 and 2, the ResNet maps, are identities).

    :param hooks: the transformer blocks whose outputs are taken (the last two of ``[0, 1, 8, 11]``;
        the first two name ResNet stages 0 and 1 in the hybrid).
    :param features: channels of the four maps (``[256, 512, 768, 768]``).
    """

    def __init__(self, hooks: Sequence[int] = (0, 1, 8, 11), features: Sequence[int] = (256, 512, 768, 768),
                 **vit_kwargs):
        super().__init__()
        self.model = VisionTransformerHybrid(**vit_kwargs)
        self.hooks = tuple(hooks)
        dim = self.model.cls_token.shape[-1]
        grid = int(math.sqrt(self.model.pos_embed.shape[1] - 1))
        self.act_postprocess1 = nn.Sequential(nn.Identity(), nn.Identity(), nn.Identity())
        self.act_postprocess2 = nn.Sequential(nn.Identity(), nn.Identity(), nn.Identity())
        self.act_postprocess3 = nn.Sequential(ProjectReadout(dim), Transpose(1, 2), nn.Unflatten(2, (grid, grid)),
                                              Conv2d(dim, features[2], kernel_size=1))
        self.act_postprocess4 = nn.Sequential(ProjectReadout(dim), Transpose(1, 2), nn.Unflatten(2, (grid, grid)),
                                              Conv2d(dim, features[3], kernel_size=1),
                                              Conv2d(features[3], features[3], kernel_size=3, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> tuple:
        """:param x: ``[B, 3, H, W]``, H and W multiples of 32. :returns: the four maps, strides 4/8/16/32."""
        vit = self.model
        grid_h, grid_w = x.shape[-2] // vit.patch_size, x.shape[-1] // vit.patch_size
        stages = vit.patch_embed.backbone.stages
        h = vit.patch_embed.backbone.stem(x)
        layer_1 = stages[0](h)
        layer_2 = stages[1](layer_1)
        h = layer_2
        for stage in stages[2:]:
            h = stage(h)
        tokens = vit.patch_embed.proj(h).flatten(2).transpose(1, 2)
        tokens = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + vit.resized_pos_embed(grid_h, grid_w).to(tokens.dtype)
        taken = {}
        for i, block in enumerate(vit.blocks[:max(self.hooks[2:]) + 1]):
            tokens = block(tokens)
            if i in self.hooks[2:]:
                taken[i] = tokens
        maps = []
        for post, hook in ((self.act_postprocess3, self.hooks[2]), (self.act_postprocess4, self.hooks[3])):
            t = post[0:2](taken[hook]).unflatten(2, (grid_h, grid_w))
            maps.append(post[3:](t))
        return (layer_1, layer_2, *maps)
