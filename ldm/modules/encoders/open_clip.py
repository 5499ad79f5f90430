"""OpenCLIP text tower (SD 2.x ``ViT-H-14``, SDXL ``ViT-bigG-14``) and image tower (Stable unCLIP's
image embedder, :class:`OpenCLIPImageModel`), without ``open_clip``.

Attribute names equal the keys of the official checkpoints, which hold an ``open_clip`` 2.x ``CLIP``
model with its visual tower deleted (``cond_stage_model.model.*``): ``positional_embedding``,
``text_projection``, ``logit_scale``, ``transformer.resblocks.N.{ln_1, attn.in_proj_weight,
attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``token_embedding``, ``ln_final``,
in that ``state_dict`` order; the causal ``attn_mask`` is a non-persistent buffer, as there.

Architecture: ``x = token_embedding(ids) + positional_embedding``, then pre-LN blocks
``x += out_proj(MHA(ln_1(x))); x += c_proj(gelu(c_fc(ln_2(x))))`` (``nn.MultiheadAttention``:
packed q/k/v projection, softmax scale ``head_dim ** -0.5``, the additive causal mask
``full(-inf).triu(1)``; exact erf GELU unless the arch says ``quick_gelu``; LayerNorm eps 1e-5),
then ``ln_final``. The reference runs the blocks sequence-first ([L, B, D]); the math is per
position, so batch-first here is the same. ``text_projection`` and ``logit_scale`` belong to the
CLIP contrastive head, which the SD 2 text features never use: they are kept as parameters so that
the official files load strictly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.encoders.clip import activation, multi_head_attention
from ldm.ops import Linear


@dataclass(frozen=True)
class OpenCLIPTextConfig:
    """Text tower hyper-parameters (``open_clip`` ``text_cfg`` names, plus the model's ``embed_dim``).

    Defaults are ViT-H-14's text tower, the SD 2 text encoder.
    """

    width: int = 1024
    heads: int = 16
    layers: int = 24
    context_length: int = 77
    vocab_size: int = 49408
    mlp_ratio: float = 4.0
    embed_dim: int = 1024  # columns of text_projection (the joint image-text space)
    act: str = "gelu"  # open_clip's "quick_gelu": true models (OpenAI weights) use "quick_gelu"

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)  # as open_clip


@dataclass(frozen=True)
class OpenCLIPVisionConfig:
    """Image tower hyper-parameters (``open_clip`` ``vision_cfg`` names; ``output_dim`` is the
    model's ``embed_dim``). Defaults are ViT-H-14's image tower (Stable unCLIP-H's embedder)."""

    width: int = 1280
    layers: int = 32
    head_width: int = 80
    patch_size: int = 14
    image_size: int = 224
    mlp_ratio: float = 4.0
    output_dim: int = 1024
    act: str = "gelu"

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


_VISION_CFG_KEYS = {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio"}
_VISION_ARCHS: dict[str, Any] = {"ViT-H-14": OpenCLIPVisionConfig()}

#: openai CLIP ViT-L/14 (``clip.load("ViT-L/14")``, unCLIP-L's image embedder): text and image towers.
OPENAI_VIT_L14 = (OpenCLIPTextConfig(width=768, heads=12, layers=12, embed_dim=768, act="quick_gelu"),
                  OpenCLIPVisionConfig(width=1024, layers=24, head_width=64, output_dim=768, act="quick_gelu"))

_ARCHS: dict[str, OpenCLIPTextConfig] = {
    "ViT-H-14": OpenCLIPTextConfig(),
    "ViT-bigG-14": OpenCLIPTextConfig(width=1280, heads=20, layers=32, embed_dim=1280),
}
# What register_open_clip_arch understands; other keys would change the network or its keys.
_TEXT_CFG_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "ls_init_value"}
_TOP_KEYS = {"embed_dim", "text_cfg", "vision_cfg", "quick_gelu"}


def known_open_clip_archs() -> list[str]:
    return sorted(_ARCHS)


def register_open_clip_arch(name: str, cfg: Mapping[str, Any]) -> OpenCLIPTextConfig:
    """Add (or replace) an arch from an ``open_clip`` model config (its JSON as a dict).

    ``embed_dim``, ``quick_gelu`` and ``text_cfg`` are read now; ``vision_cfg`` is kept and checked
    when an image tower is built (:func:`open_clip_vision_config`). Keys that would change the text
    tower in ways not written here (``custom_text``, Hugging Face text towers, layer scale, ...) are a
    ``ValueError``.
    :returns: the registered config.
    """
    unknown = sorted(set(cfg) - _TOP_KEYS)
    text = dict(cfg.get("text_cfg") or {})
    unknown += sorted(f"text_cfg.{k}" for k in set(text) - _TEXT_CFG_KEYS)
    if text.pop("ls_init_value", None) is not None:
        unknown.append("text_cfg.ls_init_value (layer scale)")
    if unknown:
        raise ValueError(f"open_clip arch {name!r}: unsupported key(s) {unknown}; this text tower reads "
                         f"embed_dim, quick_gelu and text_cfg {sorted(_TEXT_CFG_KEYS)}")
    if "embed_dim" not in cfg or not {"width", "heads", "layers"} <= set(text):
        raise ValueError(f"open_clip arch {name!r} needs embed_dim and text_cfg width, heads and layers")
    config = OpenCLIPTextConfig(embed_dim=int(cfg["embed_dim"]), act="quick_gelu" if cfg.get("quick_gelu") else "gelu",
                                **text)
    if config.width % config.heads:
        raise ValueError(f"open_clip arch {name!r}: width {config.width} is not divisible by heads {config.heads}")
    _ARCHS[name] = config
    # the image tower is checked when one is built (text-only users may register any vision_cfg)
    _VISION_ARCHS[name] = (dict(cfg.get("vision_cfg") or {}), config.embed_dim, config.act)
    return config


def open_clip_vision_config(arch: str) -> OpenCLIPVisionConfig:
    """The image-tower config of a built-in or registered arch; ``ValueError`` when it has none or
    asks for what is not written here (timm towers, layer scale, attentional pooling, ...)."""
    open_clip_text_config(arch)  # the unknown-arch error
    entry = _VISION_ARCHS.get(arch)
    if isinstance(entry, OpenCLIPVisionConfig):
        return entry
    if entry is None:
        raise ValueError(f"open_clip arch {arch!r} has no image tower here; register one with a vision_cfg")
    vision, embed_dim, act = entry
    unknown = sorted(set(vision) - _VISION_CFG_KEYS)
    if unknown or not {"width", "layers", "patch_size", "image_size"} <= set(vision):
        raise ValueError(f"open_clip arch {arch!r}: the image tower needs vision_cfg width, layers, patch_size "
                         f"and image_size and reads only {sorted(_VISION_CFG_KEYS)}; unsupported: {unknown}")
    config = OpenCLIPVisionConfig(output_dim=embed_dim, act=act, **{"head_width": 64, **vision})
    if config.width % config.head_width or config.image_size % config.patch_size:
        raise ValueError(f"open_clip arch {arch!r}: width must be a multiple of head_width and image_size of "
                         "patch_size")
    _VISION_ARCHS[arch] = config
    return config


def open_clip_text_config(arch: str) -> OpenCLIPTextConfig:
    """The text config of a built-in or registered arch; ``ValueError`` naming the known ones."""
    if arch not in _ARCHS:
        raise ValueError(f"unknown OpenCLIP arch {arch!r}; known: {known_open_clip_archs()} "
                         "(add one with ldm.modules.encoders.open_clip.register_open_clip_arch)")
    return _ARCHS[arch]


class OpenCLIPAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (``in_proj_weight`` = q, k, v rows stacked) and math."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's init
        nn.init.zeros_(self.in_proj_bias)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        """:param x: ``[B, L, D]``. :returns: ``[B, L, D]``."""
        # A bare parameter (the file's key), so F.linear rather than ldm.ops.Linear's oneDNN path.
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(multi_head_attention(q, k, v, self.heads, causal))


class OpenCLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.c_fc = Linear(dim, hidden)
        self.act = activation(act)
        self.c_proj = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: ``x += attn(ln_1(x)); x += mlp(ln_2(x))`` (the CLIP block's math, open_clip's names)."""

    def __init__(self, config: OpenCLIPTextConfig | OpenCLIPVisionConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width)
        self.attn = OpenCLIPAttention(config.width, config.heads)
        self.ln_2 = nn.LayerNorm(config.width)
        self.mlp = OpenCLIPMLP(config.width, config.mlp_width, config.act)

    def forward(self, x: torch.Tensor, causal: bool = True) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class OpenAIResidualAttentionBlock(ResidualAttentionBlock):
    """The same block with openai CLIP's registration (``state_dict``) order: attn, ln_1, mlp, ln_2."""

    def __init__(self, config: OpenCLIPTextConfig | OpenCLIPVisionConfig):
        nn.Module.__init__(self)
        self.attn = OpenCLIPAttention(config.width, config.heads)
        self.ln_1 = nn.LayerNorm(config.width)
        self.mlp = OpenCLIPMLP(config.width, config.mlp_width, config.act)
        self.ln_2 = nn.LayerNorm(config.width)


class OpenCLIPTransformer(nn.Module):
    def __init__(self, config: OpenCLIPTextConfig | OpenCLIPVisionConfig, block: type = ResidualAttentionBlock):
        super().__init__()
        self.width, self.layers = config.width, config.layers
        self.resblocks = nn.ModuleList(block(config) for _ in range(config.layers))

    def forward(self, x: torch.Tensor, n_blocks: int | None = None, causal: bool = True) -> list[torch.Tensor]:
        """:param x: ``[B, L, D]``; :param n_blocks: run only the first ``n_blocks`` (default all);
        :param causal: the text towers' mask (the image tower attends everywhere).
        :returns: ``[x, out_1, ..., out_n]``, each ``[B, L, D]``."""
        states = [x]
        for block in self.resblocks[:n_blocks]:
            states.append(block(states[-1], causal=causal))
        return states


def causal_mask(n: int, device=None) -> torch.Tensor:
    """open_clip's ``build_attention_mask``: ``[n, n]`` float32, ``-inf`` above the diagonal, 0 elsewhere."""
    return torch.full((n, n), float("-inf"), device=device).triu_(1)


class OpenCLIPTextTransformer(nn.Module):
    """The text part of an ``open_clip`` ``CLIP``; its keys are ``cond_stage_model.model.*``."""

    def __init__(self, config: OpenCLIPTextConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, width))
        self.text_projection = nn.Parameter(torch.empty(width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.transformer = OpenCLIPTransformer(config)
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.ln_final = nn.LayerNorm(width)
        # The reference's attribute; the attention applies the same mask as SDPA's is_causal. Made
        # on the CPU inside a meta-device build (a non-persistent buffer is never loaded).
        device = "cpu" if torch.empty(0).is_meta else None
        self.register_buffer("attn_mask", causal_mask(config.context_length, device), persistent=False)
        # open_clip's init (the checkpoint overwrites all of it; no-ops under a meta build)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width**-0.5)
        nn.init.constant_(self.logit_scale, math.log(1 / 0.07))

    def hidden_states(self, input_ids: torch.Tensor, n_blocks: int | None = None,
                      token_embeds: torch.Tensor | None = None) -> list[torch.Tensor]:
        """:param input_ids: ``[B, L]`` int64, ``L <= context_length``.
        :param token_embeds: optional ``[B, L, width]`` replacing ``token_embedding(input_ids)``
            (textual inversion vectors in some rows).
        :returns: ``[embeddings, out_1, ..., out_n]`` (no ``ln_final``), each ``[B, L, width]``."""
        n = input_ids.shape[-1]
        if n > self.config.context_length:
            raise ValueError(f"{n} tokens exceed the context length {self.config.context_length}")
        tokens = self.token_embedding(input_ids) if token_embeds is None else token_embeds
        x = tokens + self.positional_embedding[:n]
        return self.transformer(x, n_blocks)

    def forward(self, input_ids: torch.Tensor, skip_last: int = 0,
                token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """``ln_final`` of the output of all blocks but the last ``skip_last`` (SD 2 "penultimate": 1).

        :returns: ``[B, L, width]``."""
        return self.ln_final(self.hidden_states(input_ids, self.config.layers - skip_last, token_embeds)[-1])


class OpenCLIPVisionTransformer(nn.Module):
    """``open_clip`` 2.x ``VisionTransformer`` (the ``visual.*`` keys): patchify with ``conv1`` (no
    bias), prepend ``class_embedding``, add ``positional_embedding``, ``ln_pre``, the same pre-LN
    blocks as the text tower without a mask, then ``ln_post`` of the class token ``@ proj``."""

    def __init__(self, config: OpenCLIPVisionConfig, block: type = ResidualAttentionBlock):
        super().__init__()
        self.config = config
        width, scale = config.width, config.width**-0.5
        self.conv1 = nn.Conv2d(3, width, config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(config.grid**2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = OpenCLIPTransformer(config, block)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, config.output_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """:param pixels: ``[B, 3, image_size, image_size]``, CLIP-normalised.
        :returns: ``[B, output_dim]`` image embedding (not L2-normalised)."""
        x = self.conv1(pixels.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [B, grid², width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x), causal=False)[-1]
        return self.ln_post(x[:, 0]) @ self.proj


class OpenCLIPImageModel(nn.Module):
    """An ``open_clip`` ``CLIP`` after ``del model.transformer`` (Stable unCLIP-H's ``embedder.model.*``):
    the image tower ``visual`` and the text leftovers (``positional_embedding``, ``text_projection``,
    ``logit_scale``, ``token_embedding``, ``ln_final``), kept unused so that the files load strictly.
    With ``openai=True``: the whole openai CLIP (unCLIP-L), its text ``transformer`` included (unused)
    and every block in openai's key order."""

    def __init__(self, text: OpenCLIPTextConfig, vision: OpenCLIPVisionConfig, openai: bool = False):
        super().__init__()
        block = OpenAIResidualAttentionBlock if openai else ResidualAttentionBlock
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width))
        self.text_projection = nn.Parameter(torch.empty(text.width, text.embed_dim))
        self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))
        self.visual = OpenCLIPVisionTransformer(vision, block)
        if openai:
            self.transformer = OpenCLIPTransformer(text, block)
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.ln_final = nn.LayerNorm(text.width)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=text.width**-0.5)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)
