"""OpenAI CLIP transformers (text and vision towers), written once for both.

Attribute names equal the keys of the official checkpoints, which were written by Hugging Face
``transformers`` 4.x ``CLIPTextModel`` / ``CLIPVisionModel``: the SD v1 text encoder is
``cond_stage_model.transformer.text_model.*`` and the safety checker's tower is
``vision_model.vision_model.*``. Those keys do not depend on the installed ``transformers``
(which is not needed here at all).

Architecture (both towers): pre-LN transformer blocks
``x += attn(LN1(x)); x += fc2(act(fc1(LN2(x))))`` with ``act`` = quick_gelu
``x * sigmoid(1.702 x)`` for the OpenAI models, multi-head attention with biased q/k/v/out
projections and q scaled by ``head_dim ** -0.5`` before ``q @ k^T``. The text tower adds token and
position embeddings, uses a causal mask only (no padding mask) and ends with ``final_layer_norm``;
the vision tower embeds 14x14 (ViT-L/14) patches plus a class token, applies ``pre_layrnorm``
(the official misspelling) before the blocks and ``post_layernorm`` to the class token only.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ldm.ops import Linear

log = logging.getLogger(__name__)

# transformers config bookkeeping that has no effect on the network's numbers
_IGNORED_HF_KEYS = frozenset(
    {"model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
     "dropout", "attention_dropout", "initializer_range", "initializer_factor", "bos_token_id",
     "eos_token_id", "pad_token_id", "output_hidden_states", "output_attentions", "return_dict"}
)


def _config_from_dict(cls, d: Mapping[str, Any], base, strict: bool):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if strict and (bad := [k for k in unknown if k not in _IGNORED_HF_KEYS]):
        raise ValueError(f"unknown {cls.__name__} field(s) {bad}; known fields: {sorted(names)}")
    return dataclasses.replace(base, **{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class CLIPTextConfig:
    """Text tower hyper-parameters (Hugging Face ``CLIPTextConfig`` field names).

    Defaults are OpenAI CLIP ViT-L/14's text tower, the SD v1 text encoder.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768  # of the CLIP model the tower came from; the text model has no projection

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], strict: bool = True) -> "CLIPTextConfig":
        """ViT-L/14 defaults overridden by ``d``.

        :param strict: raise ``ValueError`` on a field this class does not know (a typo in a
            YAML override); with ``False`` unknown keys (of a saved HF config) are ignored.
        """
        return _config_from_dict(cls, d, cls(), strict)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
        """Read a saved HF text config: missing fields take HF ``CLIPTextConfig``'s own defaults
        (the 512-wide ViT-B text tower), as ``transformers`` itself would."""
        hf_defaults = cls(hidden_size=512, intermediate_size=2048, num_attention_heads=8, projection_dim=512)
        return _config_from_dict(cls, d, hf_defaults, strict=False)


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Vision tower hyper-parameters (Hugging Face ``CLIPVisionConfig`` field names).

    Defaults are OpenAI CLIP ViT-L/14's vision tower (the safety checker's).
    """

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], strict: bool = True) -> "CLIPVisionConfig":
        """ViT-L/14 defaults overridden by ``d`` (see :meth:`CLIPTextConfig.from_dict`)."""
        return _config_from_dict(cls, d, cls(), strict)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "CLIPVisionConfig":
        """Read a saved HF vision config: missing fields take HF ``CLIPVisionConfig``'s defaults
        (ViT-B/32: 768 wide, 12 layers, 12 heads, patch 32), as ``transformers`` would."""
        hf_defaults = cls(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          patch_size=32, projection_dim=512)
        return _config_from_dict(cls, d, hf_defaults, strict=False)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI's sigmoid approximation of GELU: ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)  # exact erf form, as HF's "gelu"


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": _gelu}


def activation(name: str):
    """The function of an activation name (``ACTIVATIONS``); ``ValueError`` on an unknown one."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool,
                         scale: float | None = None) -> torch.Tensor:
    """``softmax(q·kᵀ·scale)·v`` per head, for the CLIP and OpenCLIP towers.

    :param q: / ``k`` / ``v``: ``[B, L, D]`` projections, heads side by side along D.
    :param causal: position i attends to positions <= i only (the text towers' additive
        ``-inf`` mask above the diagonal).
    :param scale: default ``(D / heads) ** -0.5``; 1.0 when q is already scaled.
    :returns: ``[B, L, D]``.
    """
    b, n, d = q.shape
    q, k, v = (t.view(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    # SDPA, not ldm.ops.attention: the latter takes no mask, and at <= 257 tokens its blocked CPU
    # form (from 65536 scores per head) would not run anyway.
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)  # [B, H, L, Dh]
    return out.transpose(1, 2).reshape(b, n, d)


class CLIPAttention(nn.Module):
    """Multi-head self-attention. Projections are created in the checkpoint's key order (k, v, q, out)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_attention_heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.k_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        self.q_proj = Linear(dim, dim)
        self.out_proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        """:param x: ``[B, L, D]``; :param causal: position i attends to positions <= i only."""
        # q is scaled before the product, as the reference does; SDPA's own scale is then 1.
        q = self.q_proj(x) * self.scale
        return self.out_proj(multi_head_attention(q, self.k_proj(x), self.v_proj(x), self.heads, causal, scale=1.0))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: ``x += attn(LN1(x)); x += mlp(LN2(x))``."""

    def __init__(self, dim: int, heads: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.self_attn = CLIPAttention(dim, heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = CLIPMLP(dim, hidden, act)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            CLIPEncoderLayer(config.hidden_size, config.num_attention_heads, config.intermediate_size,
                             config.hidden_act, config.layer_norm_eps)
            for _ in range(config.num_hidden_layers)
        )

    def forward(self, x: torch.Tensor, causal: bool) -> list[torch.Tensor]:
        """:returns: ``[x, out_1, ..., out_N]``, the input and every layer's output, each ``[B, L, D]``."""
        states = [x]
        for layer in self.layers:
            states.append(layer(states[-1], causal))
        return states


@dataclass
class CLIPOutput:
    """:ivar last_hidden_state: ``[B, L, D]`` (text: after ``final_layer_norm``).
    :ivar pooler_output: ``[B, D]``: text: the last state at the first EOS token; vision: the
        class token after ``post_layernorm``.
    :ivar hidden_states: ``N + 1`` tensors ``[B, L, D]``: the embeddings, then each layer's output
        (before any final norm)."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: list[torch.Tensor]


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        # Persistent, as in transformers < 4.31: official SD v1 checkpoints contain it. Inside a
        # meta-device build it is made on the CPU (77 integers): arange on meta imports sympy, a
        # third of a second of every model load.
        device = "cpu" if torch.empty(0).is_meta else None
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings, device=device).unsqueeze(0),
                             persistent=True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "position_ids"
        n = self.position_embedding.num_embeddings
        if key not in state_dict:
            # Files written with transformers >= 4.31 (and diffusers conversions) lack this buffer.
            anchor = state_dict.get(prefix + "token_embedding.weight")
            state_dict[key] = torch.arange(n, device=anchor.device if anchor is not None else "cpu").unsqueeze(0)
        else:
            value = state_dict[key]
            if not value.is_meta and not torch.equal(value.detach().cpu().long(), torch.arange(n).unsqueeze(0)):
                # Some merged community checkpoints hold non-integer position ids; the reference
                # uses the loaded values (cast to int64), so do we, but say so.
                log.warning("%s is not 0..%d; using the checkpoint's values as the reference does", key, n - 1)
            if value.dtype != torch.long:
                state_dict[key] = value.long()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """:param input_ids: ``[B, L]`` int64, L <= max_position_embeddings.
        :param token_embeds: ``[B, L, D]`` to use instead of ``token_embedding(input_ids)`` (textual
            inversion vectors put in place of some rows). :returns: ``[B, L, D]``."""
        tokens = self.token_embedding(input_ids) if token_embeds is None else token_embeds
        return tokens + self.position_embedding(self.position_ids[:, : input_ids.shape[-1]])


class CLIPTextTransformer(nn.Module):
    """The text tower; its state_dict keys are the ``text_model.*`` part of the official files."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> CLIPOutput:
        """:param input_ids: ``[B, L]`` token ids (BOS ... EOS, padded). No padding mask: the
        reference attends to pad tokens (they only ever follow the real ones, so with the causal
        mask they cannot change earlier positions).
        :param token_embeds: optional ``[B, L, D]`` token embeddings replacing the lookup of ``input_ids``."""
        if input_ids.shape[-1] > self.config.max_position_embeddings:
            raise ValueError(f"{input_ids.shape[-1]} tokens exceed max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        states = self.encoder(self.embeddings(input_ids, token_embeds), causal=True)
        last = self.final_layer_norm(states[-1])
        # The first occurrence of the highest id is the first EOS (49407 is the largest id).
        pooled = last[torch.arange(last.shape[0], device=last.device), input_ids.argmax(dim=-1)]
        return CLIPOutput(last, pooled, states)


class CLIPTextModel(nn.Module):
    """Wrapper with a ``text_model`` attribute, so keys read ``text_model.embeddings...`` as in the files."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def forward(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> CLIPOutput:
        return self.text_model(input_ids, token_embeds)


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        dim = config.hidden_size
        n_positions = (config.image_size // config.patch_size) ** 2 + 1  # patches + class token
        self.class_embedding = nn.Parameter(torch.randn(dim) * dim**-0.5)  # CLIP's init; files overwrite it
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, config.patch_size, stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(n_positions, dim)
        # Non-persistent: older files carry it, newer do not; its value is always 0..n-1.
        self.register_buffer("position_ids", torch.arange(n_positions).unsqueeze(0), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        value = state_dict.pop(prefix + "position_ids", None)  # written by transformers < 4.31
        if value is not None and not value.is_meta:
            if not torch.equal(value.detach().cpu().long(), torch.arange(value.shape[-1]).unsqueeze(0)):
                raise ValueError(f"{prefix}position_ids in the file is not 0..{value.shape[-1] - 1}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """:param pixel_values: ``[B, C, S, S]`` normalised. :returns: ``[B, 1 + (S/P)^2, D]``."""
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [B, D, S/P, S/P]
        patches = patches.flatten(2).transpose(1, 2)  # [B, N, D]
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1)
        if x.shape[1] != self.position_ids.shape[1]:
            raise ValueError(f"vision tower expects {self.position_ids.shape[1] - 1} patches "
                             f"(image size of the config), got {x.shape[1] - 1}")
        return x + self.position_embedding(self.position_ids)


class CLIPVisionTransformer(nn.Module):
    """The vision tower; its keys are the ``vision_model.*`` part of the official files."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> CLIPOutput:
        """:returns: ``last_hidden_state [B, N+1, D]`` (no final norm) and ``pooler_output
        [B, D]`` = ``post_layernorm`` of the class token."""
        states = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)), causal=False)
        last = states[-1]
        return CLIPOutput(last, self.post_layernorm(last[:, 0]), states)


class CLIPVisionModel(nn.Module):
    """Wrapper with a ``vision_model`` attribute, as in the official files."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)

    def forward(self, pixel_values: torch.Tensor) -> CLIPOutput:
        return self.vision_model(pixel_values)
