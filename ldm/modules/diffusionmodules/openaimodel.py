"""The diffusion UNet (``UNetModel``) of Stable Diffusion and the CompVis latent diffusion models.

Two attention flavours, chosen by the config: ``SpatialTransformer`` cross-attention
(``use_spatial_transformer: True``, SD 1/2) and the classic ``AttentionBlock`` self-attention
(LDM models, e.g. inpainting_big). Module attribute names equal the checkpoint keys
(``input_blocks.N.M.*``, ``middle_block.*``, ``output_blocks.N.M.*``, ``time_embed.*``, ``out.*``).
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (avg_pool_nd, checkpoint, conv_nd, linear, normalization,
                                               timestep_embedding, zero_module)
from ldm.ops import attention

logger = logging.getLogger(__name__)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that passes the timestep embedding to TimestepBlocks and the context to
    SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context=None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest ×2 upsampling, then a 3x3 conv when ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None,
                 padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (symmetric padding 1) when ``use_conv``, else 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None,
                 padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            if self.channels != self.out_channels:
                raise ValueError("Downsample without conv cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """h = conv(SiLU(GN(x))); h += Linear(SiLU(emb)) (or scale-shift norm); h = conv(drop(SiLU(GN(h))));
    returns skip(x) + h. With ``up``/``down`` both paths are resampled inside the block."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       conv_nd(dims, channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *((1,) * (h.dim() - 2)))  # [B, C] -> [B, C, 1, 1]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    """Attention over a packed qkv [B, 3·H·C, T] whose heads are split *before* q/k/v
    (the original guided-diffusion layout)."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        out = _attend_channels_first(q, k, v)
        return out.reshape(bs, -1, length)


class QKVAttention(nn.Module):
    """Attention over a packed qkv [B, 3·H·C, T] split into q, k, v *before* the heads."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = (t.reshape(bs * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))
        out = _attend_channels_first(q, k, v)
        return out.reshape(bs, -1, length)


def _attend_channels_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention for [N, C, T] tensors: softmax(qᵀk / sqrt(C)) in float32, returned as [N, C, T]."""
    dtype = q.dtype
    out = attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float())
    return out.transpose(1, 2).to(dtype)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions: x + proj_out(attention(qkv(GN(x))))."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, use_new_attention_order: bool = False):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} is not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = (QKVAttention if use_new_attention_order else QKVAttentionLegacy)(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """The full UNet with attention and timestep embedding.

    Constructor parameters are the reference's (SD 1, SD 2 and LDM configs build it unchanged);
    ``use_fp16`` / ``use_bf16`` (SD 2's configs set ``use_fp16: True``) are accepted for config
    compatibility: the compute dtype is the weights' dtype, so the same config runs in float32 on a
    CPU and in fp16/bf16 when the model is loaded in that dtype (the reference cast the input to
    fp16 and relied on CUDA autocast; on a CPU it failed). SD 2 options: ``num_head_channels``
    (fixed head width 64 with ``legacy: False``: 5/10/20 heads), ``use_linear_in_transformer``
    (Linear ``proj_in``/``proj_out``), ``context_dim`` 1024. SDXL: ``transformer_depth`` one int or one
    per level (the middle block takes the last). ``num_classes`` is an int
    (``nn.Embedding``, the x4 upscaler), ``"continuous"`` (``Linear(1, 4·mc)``) or ``"sequential"``
    (``Sequential(Sequential(Linear(adm_in_channels, 4·mc), SiLU, Linear(4·mc, 4·mc)))``, unCLIP);
    the label embedding of ``y`` is added to the timestep embedding. ``spatial_transformer_attn_type``
    ``"softmax-xformers"`` (unCLIP) has the same keys and math as ``"softmax"``: attention always
    runs through :func:`ldm.ops.attention`.

    ``forward(x [B, in_channels, H, W], timesteps [B] int or float, context [B, M, context_dim])``
    returns ``[B, out_channels, H, W]`` (contiguous). H and W must be multiples of
    2**(len(channel_mult)-1).

    Speed options (same numbers up to float rounding): ``unet.to(memory_format=torch.channels_last)``
    runs the activations in channels_last; :func:`compile_unet` compiles the forward; on the CPU
    the convolutions reuse prepacked weights (:class:`ldm.ops.Conv2d`; ``ldm.ops.settings(conv_prepack=False)``).
    """

    def __init__(self, image_size, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks, attention_resolutions: Iterable[int], dropout: float = 0,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes=None, use_checkpoint: bool = False, use_fp16: bool = False, use_bf16: bool = False,
                 num_heads: int = -1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, use_spatial_transformer: bool = False,
                 transformer_depth: int = 1, context_dim=None, n_embed: Optional[int] = None,
                 legacy: bool = True, disable_self_attentions=None, num_attention_blocks=None,
                 disable_middle_self_attn: bool = False, use_linear_in_transformer: bool = False,
                 adm_in_channels: Optional[int] = None, spatial_transformer_attn_type: str = "softmax"):
        super().__init__()
        if spatial_transformer_attn_type not in ("softmax", "softmax-xformers"):
            raise ValueError(f"spatial_transformer_attn_type must be 'softmax' or 'softmax-xformers', "
                             f"got {spatial_transformer_attn_type!r}")
        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer needs context_dim (the text embedding width)")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError("context_dim is set but use_spatial_transformer is False")
        if hasattr(context_dim, "__iter__") and not isinstance(context_dim, (list, tuple)):
            context_dim = list(context_dim)
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set either num_heads or num_head_channels")
        channel_mult = tuple(channel_mult)
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * len(channel_mult)
        elif len(num_res_blocks) != len(channel_mult):
            raise ValueError("num_res_blocks needs one entry per channel_mult level")
        if disable_self_attentions is not None and len(disable_self_attentions) != len(channel_mult):
            raise ValueError("disable_self_attentions needs one entry per channel_mult level")
        attention_resolutions = set(attention_resolutions)
        # SDXL (sgm): one depth per level; the middle block takes the last entry (not the largest)
        depths = [transformer_depth] * len(channel_mult) if isinstance(transformer_depth, int) else list(transformer_depth)
        if len(depths) != len(channel_mult):
            raise ValueError("transformer_depth needs one entry per channel_mult level (or one int)")

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.channel_mult = channel_mult
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.predict_codebook_ids = n_embed is not None

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(linear(model_channels, time_embed_dim), nn.SiLU(),
                                        linear(time_embed_dim, time_embed_dim))
        if isinstance(num_classes, int):
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)
        elif num_classes == "continuous":
            self.label_emb = nn.Linear(1, time_embed_dim)
        elif num_classes == "sequential":
            if adm_in_channels is None:
                raise ValueError('num_classes "sequential" needs adm_in_channels (the width of the vector y)')
            self.label_emb = nn.Sequential(nn.Sequential(linear(adm_in_channels, time_embed_dim), nn.SiLU(),
                                                         linear(time_embed_dim, time_embed_dim)))
        elif num_classes is not None:
            raise ValueError(f'num_classes must be an int, "continuous" or "sequential", got {num_classes!r}')

        def attn_block(ch: int, heads_for_classic: int, level: int, disable_self_attn: bool = False) -> nn.Module:
            # Head count / width as the reference derives them (num_heads fixed, or num_head_channels fixed).
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            if legacy:
                dim_head = ch // heads if use_spatial_transformer else num_head_channels
            if not use_spatial_transformer:
                return AttentionBlock(ch, use_checkpoint=use_checkpoint, num_heads=heads_for_classic,
                                      num_head_channels=dim_head, use_new_attention_order=use_new_attention_order)
            return SpatialTransformer(ch, heads, dim_head, depth=depths[level], context_dim=context_dim,
                                      disable_self_attn=disable_self_attn, use_linear=use_linear_in_transformer,
                                      use_checkpoint=use_checkpoint)

        def wants_attention(ds: int, level: int, i: int) -> bool:
            return ds in attention_resolutions and (num_attention_blocks is None or i < num_attention_blocks[level])

        def self_attn_disabled(level: int) -> bool:
            return bool(disable_self_attentions[level]) if disable_self_attentions is not None else False

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))])
        input_block_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for i in range(num_res_blocks[level]):
                layers = [ResBlock(ch, time_embed_dim, dropout, out_channels=mult * model_channels, dims=dims,
                                   use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm)]
                ch = mult * model_channels
                if wants_attention(ds, level, i):
                    layers.append(attn_block(ch, num_heads, level, self_attn_disabled(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(
                    ResBlock(ch, time_embed_dim, dropout, out_channels=ch, dims=dims, use_checkpoint=use_checkpoint,
                             use_scale_shift_norm=use_scale_shift_norm, down=True)
                    if resblock_updown else Downsample(ch, conv_resample, dims=dims, out_channels=ch)))
                input_block_chans.append(ch)
                ds *= 2

        def mid_resblock() -> ResBlock:
            return ResBlock(ch, time_embed_dim, dropout, dims=dims, use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm)

        self.middle_block = TimestepEmbedSequential(
            mid_resblock(), attn_block(ch, num_heads, len(channel_mult) - 1, disable_middle_self_attn), mid_resblock())

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks[level] + 1):
                ich = input_block_chans.pop()
                layers = [ResBlock(ch + ich, time_embed_dim, dropout, out_channels=model_channels * mult, dims=dims,
                                   use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm)]
                ch = model_channels * mult
                if wants_attention(ds, level, i):
                    layers.append(attn_block(ch, num_heads_upsample, level, self_attn_disabled(level)))
                if level and i == num_res_blocks[level]:
                    layers.append(
                        ResBlock(ch, time_embed_dim, dropout, out_channels=ch, dims=dims, use_checkpoint=use_checkpoint,
                                 use_scale_shift_norm=use_scale_shift_norm, up=True)
                        if resblock_updown else Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)))
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(normalization(ch), conv_nd(dims, model_channels, n_embed, 1))

    def forward(self, x: torch.Tensor, timesteps: Optional[torch.Tensor] = None, context=None,
                y: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        if kwargs:
            raise TypeError(f"UNetModel.forward got unexpected arguments {sorted(kwargs)}")
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("class labels y must be given exactly when the model is class-conditional")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y.to(dtype) if y.is_floating_point() else y)
        if context is not None:
            context = [c.to(dtype) for c in context] if isinstance(context, list) else context.to(dtype)

        h = x.to(dtype)
        if self._channels_last():
            h = h.contiguous(memory_format=torch.channels_last)
        skips = []
        for module in self.input_blocks:
            h = module(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb, context)
        if self.predict_codebook_ids:
            return self.id_predictor(h).contiguous()
        return self.out(h).to(x.dtype).contiguous()

    def _channels_last(self) -> bool:
        """Whether the weights were put in channels_last (``unet.to(memory_format=torch.channels_last)``):
        then activations run in that layout too."""
        w = self.input_blocks[0][0].weight
        return w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def compile_unet(model: nn.Module, *, mode: Optional[str] = None, dynamic: bool = False,
                 freezing: bool = False) -> nn.Module:
    """Compile the UNet's forward with ``torch.compile``, in place, and return ``model``.

    :param model: a :class:`UNetModel` or a diffusion model holding one at ``.model.diffusion_model``.
    :param mode: ``torch.compile`` mode (``None``, ``"max-autotune"``, ...).
    :param dynamic: compile for varying shapes (otherwise a new shape recompiles).
    :param freezing: inductor's weight freezing (CPU: prepacked weights, constant folding). The
        weights are then baked into the compiled code: later changes (another checkpoint,
        ``ema_scope``) are not seen until the model is compiled again. Inference only.
    :returns: ``model``; the module tree and the state_dict keys are unchanged (``nn.Module.compile``).

    No-op safe: calling it again does nothing, and where ``torch.compile`` is missing it logs a
    warning and leaves the model eager. Compilation happens at the first call (minutes on a CPU);
    a failure there raises, as ``torch.compile`` does.
    """
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    unet = diffusion_model if isinstance(diffusion_model, UNetModel) else model
    if not isinstance(unet, UNetModel):
        raise TypeError(f"compile_unet needs a UNetModel or a model with .model.diffusion_model; got {type(model).__name__}")
    if not callable(getattr(torch, "compile", None)) or not callable(getattr(unet, "compile", None)):
        logger.warning("torch.compile is not available in torch %s; the UNet stays eager", torch.__version__)
        return model
    if getattr(unet, "_compiled_call_impl", None) is not None:
        return model
    unet.compile(mode=mode, dynamic=dynamic, options={"freezing": True} if freezing else None)
    return model
