"""Convolutional encoder and decoder of the first-stage autoencoders (KL-f8 of Stable Diffusion,
VQ-f4 of the LDM inpainting model).

Attribute names equal the checkpoint keys of the reference (``encoder.down.0.block.0.norm1.weight``,
``decoder.up.3.upsample.conv.weight``, ``mid.attn_1.q.weight``, ...), so the official
``first_stage_model.*`` tensors load with the prefix stripped and nothing renamed.

Numeric conventions of the reference (see the spec README, section "Autoencoder"):

- every GroupNorm has 32 groups and eps 1e-6; the nonlinearity is swish ``x * sigmoid(x)``;
- downsampling pads one zero row/column on the right and bottom only, then runs a stride-2
  3x3 conv without padding;
- upsampling is nearest-neighbour x2 followed by a 3x3 conv;
- the attention block is a single head over the ``H*W`` positions with scale ``C**-0.5``.

Nothing here allocates more than the module's own parameters, so every class can be built under
``with torch.device("meta"):`` for key/shape checks. The convolutions are the UNet's
:class:`ldm.ops.Conv2d` (``nn.Conv2d`` with prepacked CPU inference weights; figures in
docs/benchmarks.md).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.ops import Conv2d, attention

logger = logging.getLogger(__name__)

ATTN_TYPES = ("vanilla", "vanilla-xformers", "linear", "none")


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish / SiLU: ``x * sigmoid(x)``, written out as the reference does (``F.silu`` rounds
    differently in the last bit, about 1e-6 relative on the decoded image)."""
    return x * torch.sigmoid(x)


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """The autoencoder's GroupNorm: ``num_groups`` groups, eps 1e-6, affine."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, then (when ``with_conv``) a 3x3 conv keeping the channels."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        if self.with_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """Halve H and W: asymmetric zero pad (right, bottom) + stride-2 3x3 conv, or 2x2 average pooling."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            # torch's conv padding is symmetric; the reference pads only right/bottom, done in forward.
            self.conv = Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # (left, right, top, bottom)
            return self.conv(x)  # (B, C, H/2, W/2)
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: ``skip(x) + conv2(drop(swish(GN(conv1(swish(GN(x))) + temb))))``.

    The autoencoders use ``temb_channels=0`` (no time embedding, no ``temb_proj`` weights). When the
    channel count changes the skip path is a 1x1 conv ``nin_shortcut`` (or a 3x3 ``conv_shortcut``
    when ``conv_shortcut=True``).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float,
        temb_channels: int = 512,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """:param x: (B, C_in, H, W). :param temb: (B, temb_channels) or None. :return: (B, C_out, H, W)."""
        h = self.conv1(nonlinearity(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions with 1x1-conv projections and a residual.

    ``out = x + proj_out(softmax(q k^T * C**-0.5) v)`` with q, k, v = 1x1 convs of GN(x).
    Computed by :func:`ldm.ops.attention` (PyTorch's scaled_dot_product_attention, or
    its blocked form for CPU inference), like the UNet's.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: (B, C, H, W). :return: (B, C, H, W)."""
        h_ = self.norm(x)
        b, c, h, w = x.shape
        # (B, C, H, W) -> (B, 1, H*W, C): one head, positions as the sequence axis.
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(h_), self.k(h_), self.v(h_)))
        out = attention(q, k, v, scale=int(c) ** -0.5)  # (B, 1, H*W, C)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


def make_attn(in_channels: int, attn_type: str = "vanilla") -> nn.Module:
    """The attention layer of the mid block (and of attention resolutions).

    :param attn_type: ``"vanilla"`` (:class:`AttnBlock`; ``"vanilla-xformers"``, the SD 2.1 unCLIP
        configs' value, is the same layer) or ``"none"`` (identity, no weights; the
        VQ-f4 of LDM inpainting). ``"linear"`` exists in the reference but no released first stage
        uses it, so it is not implemented.
    """
    if attn_type in ("vanilla", "vanilla-xformers"):  # same keys; xformers is a kernel choice, not math
        return AttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity()
    if attn_type == "linear":
        raise NotImplementedError(
            "attn_type 'linear' (LinAttnBlock) is not implemented: no released autoencoder uses it; "
            "use attn_type 'vanilla' or 'none'"
        )
    raise ValueError(f"unknown attn_type {attn_type!r}; expected one of {ATTN_TYPES}")


def _level_container(block: nn.ModuleList, attn: nn.ModuleList) -> nn.Module:
    """One resolution level: ``.block`` (ResnetBlocks) and ``.attn`` (attention after each block)."""
    level = nn.Module()
    level.block = block
    level.attn = attn
    return level


def _mid_block(channels: int, dropout: float, attn_type: str) -> nn.Module:
    """``mid.block_1`` -> ``mid.attn_1`` -> ``mid.block_2`` at the lowest resolution."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(in_channels=channels, out_channels=channels, temb_channels=0, dropout=dropout)
    mid.attn_1 = make_attn(channels, attn_type=attn_type)
    mid.block_2 = ResnetBlock(in_channels=channels, out_channels=channels, temb_channels=0, dropout=dropout)
    return mid


class Encoder(nn.Module):
    """Image -> latent moments. Resolution is divided by ``2**(len(ch_mult)-1)``.

    ``conv_in`` -> per level ``num_res_blocks`` ResnetBlocks (+ attention when the level's resolution
    is in ``attn_resolutions``) and a Downsample after every level but the last -> mid block ->
    GN, swish, ``conv_out`` to ``2*z_channels`` (``double_z``) or ``z_channels`` channels.

    ``out_ch``, ``give_pre_end``, ``tanh_out`` and other decoder options are accepted and ignored,
    so one ``ddconfig`` builds both halves, as in the reference.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int | None = None,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        **ignore_kwargs,
    ):
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.conv_in = Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        in_ch_mult = (1,) + tuple(ch_mult)
        self.in_ch_mult = in_ch_mult
        curr_res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=0, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type=attn_type))
            level = _level_container(block, attn)
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
                curr_res = curr_res // 2
            self.down.append(level)

        self.mid = _mid_block(block_in, dropout, attn_type)

        self.norm_out = Normalize(block_in)
        self.conv_out = Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: (B, in_channels, H, W). :return: (B, 2*z_channels or z_channels, H/f, W/f)."""
        h = self.conv_in(x)
        for i_level, level in enumerate(self.down):
            for i_block, block in enumerate(level.block):
                h = block(h, None)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)

        h = self.mid.block_1(h, None)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, None)

        # contiguous: the prepacked CPU convs work in channels_last; callers get the usual layout
        return self.conv_out(nonlinearity(self.norm_out(h))).contiguous()


class Decoder(nn.Module):
    """Latent -> image. Resolution is multiplied by ``2**(len(ch_mult)-1)``.

    ``conv_in`` -> mid block -> levels from the lowest resolution up, each ``num_res_blocks + 1``
    ResnetBlocks (+ attention at ``attn_resolutions``) and an Upsample after every level but
    level 0 -> GN, swish, ``conv_out`` (-> tanh when ``tanh_out``). ``self.up[i]`` is level ``i``
    (``up.0`` is the full-resolution level and runs last), matching the checkpoint keys.

    :param give_pre_end: return the features before ``norm_out`` (for feature extraction).
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int | None = None,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        **ignorekwargs,
    ):
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        # Latent shape at the configured training resolution (informative: any size divisible works).
        self.z_shape = (1, z_channels, curr_res, curr_res)
        logger.debug("Decoder works with z of shape %s", self.z_shape)

        self.conv_in = Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = _mid_block(block_in, dropout, attn_type)

        # Built from the lowest resolution up, stored so that self.up[i_level] is level i_level.
        levels: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=0, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type=attn_type))
            level = _level_container(block, attn)
            if i_level != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                curr_res = curr_res * 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)

        self.norm_out = Normalize(block_in)
        self.conv_out = Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """:param z: (B, z_channels, h, w). :return: (B, out_ch, h*f, w*f)."""
        self.last_z_shape = z.shape
        h = self.conv_in(z)

        h = self.mid.block_1(h, None)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, None)

        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block, block in enumerate(level.block):
                h = block(h, None)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)

        if self.give_pre_end:
            return h.contiguous()
        h = self.conv_out(nonlinearity(self.norm_out(h)))
        if self.tanh_out:
            h = torch.tanh(h)
        return h.contiguous()  # (see Encoder.forward)

    @property
    def downsample_factor(self) -> int:
        """Spatial factor between latent and image: ``2**(len(ch_mult)-1)`` (8 for SD, 4 for VQ-f4)."""
        return 2 ** (self.num_resolutions - 1)
