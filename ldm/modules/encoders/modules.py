"""Conditioning encoders named by the configs (``cond_stage_config.target``).

``FrozenCLIPEmbedder`` is the SD v1 text encoder: the CLIP ViT-L/14 tokenizer and text tower, built
offline from the files bundled in ``clip-vit-large-patch14/``; its weights come from the SD
checkpoint (``cond_stage_model.transformer.text_model.*``). ``FrozenOpenCLIPEmbedder`` is the SD 2
text encoder: the same BPE files in open_clip's dialect and the OpenCLIP ViT-H/14 text tower
(``cond_stage_model.model.*``). ``FrozenOpenCLIPImageEmbedder`` / ``ClipImageEmbedder`` are the
Stable unCLIP-H / -L image embedders (``embedder.model.*``), ``CLIPEmbeddingNoiseAugmentation`` its
noise augmentor (importable here, the configs' path). The other class names of the reference
module are kept so that configs naming them fail with a clear message instead of an import error.
"""
from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.encoders.clip import CLIPTextConfig, CLIPTextModel
from ldm.modules.diffusionmodules.noise_augmentation import CLIPEmbeddingNoiseAugmentation  # noqa: F401  (config path)
from ldm.modules.encoders.image_preprocess import clip_preprocess
from ldm.modules.encoders.open_clip import (OPENAI_VIT_L14, OpenCLIPImageModel, OpenCLIPTextTransformer,
                                            open_clip_text_config, open_clip_vision_config)
from ldm.modules.encoders.tokenizer import BUNDLED_TOKENIZER_DIR, OPEN_CLIP, CLIPTokenizer, TokenizedBatch

log = logging.getLogger(__name__)

CLIP_VIT_L14 = "openai/clip-vit-large-patch14"


class AbstractEncoder(nn.Module):
    """Base class of the conditioning encoders: ``encode(x)`` gives the conditioning tensor."""

    def encode(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not implement encode()")

    def freeze(self) -> None:
        """Eval mode and no gradients (the encoder is never trained here)."""
        self.eval()
        for param in self.parameters():
            param.requires_grad = False


class ClassEmbedder(nn.Module):
    """Class-conditional embedding: ``batch[key]`` (``[B]`` int64 labels) -> ``[B, 1, embed_dim]``."""

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class"):
        super().__init__()
        self.key = key
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, batch: Mapping[str, torch.Tensor], key: str | None = None) -> torch.Tensor:
        labels = batch[key or self.key]
        return self.embedding(labels[:, None].to(self.embedding.weight.device))


class SpatialRescaler(nn.Module):
    """Resize an image ``n_stages`` times by ``multiplier`` and optionally map channels with a 1x1 conv.

    :param method: an ``F.interpolate`` mode.
    """

    METHODS = ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area")

    def __init__(self, n_stages: int = 1, method: str = "bilinear", multiplier: float = 0.5, in_channels: int = 3,
                 out_channels: int | None = None, bias: bool = False):
        super().__init__()
        if n_stages < 0:
            raise ValueError(f"n_stages must be >= 0, got {n_stages}")
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {self.METHODS}, got {method!r}")
        self.n_stages = n_stages
        self.multiplier = multiplier
        self.interpolator = partial(F.interpolate, mode=method)
        self.remap_output = out_channels is not None
        if self.remap_output:
            self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n_stages):
            x = self.interpolator(x, scale_factor=self.multiplier)
        return self.channel_mapper(x) if self.remap_output else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


def resolve_clip_folder(version: str | Path) -> Path:
    """Folder holding the tokenizer files (and optionally ``config.json``) for ``version``.

    ``"openai/clip-vit-large-patch14"`` means the files bundled with this package; any other value
    must be a local folder (e.g. a downloaded copy of that repository). Nothing is downloaded.
    """
    if str(version) == CLIP_VIT_L14:
        return BUNDLED_TOKENIZER_DIR
    path = Path(version).expanduser()
    if path.is_dir():
        return path
    raise ValueError(
        f"FrozenCLIPEmbedder version {str(version)!r} is neither {CLIP_VIT_L14!r} (bundled) nor a local folder "
        "with vocab.json and merges.txt; nothing is downloaded at run time"
    )


def load_clip_text_config(folder: Path) -> CLIPTextConfig:
    """The text config in ``folder/config.json`` (a flat text config or a full CLIP config with a
    ``text_config`` section); ViT-L/14 when the folder has none."""
    path = folder / "config.json"
    if not path.is_file():
        log.info("%s has no config.json; using the CLIP ViT-L/14 text config", folder)
        return CLIPTextConfig()
    data = json.loads(path.read_text(encoding="utf-8"))
    return CLIPTextConfig.from_hf_dict(data.get("text_config", data))


class _FrozenTextEncoder(AbstractEncoder):
    """What the text encoders share: ``tokenizer``, ``max_length``, freezing, device and dtype of
    the weights (read from ``token_embedding``)."""

    tokenizer: CLIPTokenizer
    max_length: int

    def _token_embedding(self) -> nn.Embedding:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self._token_embedding().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._token_embedding().weight.dtype

    def tokenize(self, text: str | list[str]) -> TokenizedBatch:
        """Token ids ``[B, max_length]`` plus, per prompt, the words truncation dropped."""
        return self.tokenizer(text, max_length=self.max_length)

    def encode(self, text: str | list[str]) -> torch.Tensor:
        return self(text)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` ids -> ``[B, L, D]`` token embeddings (before positions), for textual inversion."""
        return self._token_embedding()(input_ids.to(self.device))

    # encode_tokens(input_ids [B, L], token_embeds [B, L, D] | None) -> [B, L, D] features, in each
    # encoder: the window encoder of ldm.prompts (long and weighted prompts) calls it per 75-token window.


class FrozenCLIPEmbedder(_FrozenTextEncoder):
    """CLIP text encoder (SD v1): prompts -> ``[B, 77, D]`` token features.

    :param version: ``"openai/clip-vit-large-patch14"`` (bundled tokenizer and config) or a local
        folder with ``vocab.json``, ``merges.txt`` and optionally ``config.json``. Only the
        tokenizer and the architecture come from here; weights come from the SD checkpoint.
    :param device: accepted for config compatibility and not used: token ids are put on the
        device of the weights (move the module with ``.to()``).
    :param max_length: token length, 77 for every released model.
    :param freeze: set eval mode and ``requires_grad=False`` (the reference always froze it).
    :param layer: ``"last"``: ``last_hidden_state`` after ``final_layer_norm`` (SD v1);
        ``"hidden"``: ``hidden_states[layer_idx]`` without the final norm (0 = embeddings,
        i = after layer i, -2 = penultimate); ``"pooled"``: the EOS token's final state, ``[B, 1, D]``.
    :param text_config: overrides of the text architecture, HF ``CLIPTextConfig`` field names
        (e.g. ``{"hidden_size": 32, "num_hidden_layers": 2}`` for a toy model).
    """

    LAYERS = ("last", "pooled", "hidden")

    def __init__(self, version: str = CLIP_VIT_L14, device: Any = None, max_length: int = 77, freeze: bool = True,
                 layer: str = "last", layer_idx: int | None = None, text_config: Mapping[str, Any] | None = None):
        super().__init__()
        folder = resolve_clip_folder(version)
        config = load_clip_text_config(folder)
        if text_config:
            config = CLIPTextConfig.from_dict({**vars(config), **dict(text_config)})
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        if layer == "hidden":
            n = config.num_hidden_layers
            if layer_idx is None or not -(n + 1) <= layer_idx <= n:
                raise ValueError(f"layer='hidden' needs layer_idx in [{-(n + 1)}, {n}], got {layer_idx}")
        if not 2 <= max_length <= config.max_position_embeddings:
            raise ValueError(f"max_length must be in [2, {config.max_position_embeddings}], got {max_length}")
        self.tokenizer = CLIPTokenizer.from_folder(folder, model_max_length=max_length)
        self.transformer = CLIPTextModel(config)
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx
        if freeze:
            self.freeze()

    def _token_embedding(self) -> nn.Embedding:
        return self.transformer.text_model.embeddings.token_embedding

    def forward(self, text: str | list[str]) -> torch.Tensor:
        """:param text: a prompt or a list of B prompts.
        :returns: ``[B, max_length, D]`` (``[B, 1, D]`` for ``layer="pooled"``), dtype of the weights."""
        return self.encode_tokens(self.tokenize(text).input_ids)

    def encode_tokens(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        out = self.transformer(input_ids.to(self.device), token_embeds)
        if self.layer == "last":
            return out.last_hidden_state
        if self.layer == "pooled":
            return out.pooler_output[:, None, :]
        return out.hidden_states[self.layer_idx]


class FrozenOpenCLIPEmbedder(_FrozenTextEncoder):
    """OpenCLIP text encoder (SD 2.x): prompts -> ``[B, 77, width]`` token features.

    :param arch: an OpenCLIP model name: ``"ViT-H-14"`` (SD 2), ``"ViT-bigG-14"``, or one added
        with :func:`ldm.modules.encoders.open_clip.register_open_clip_arch`.
    :param version: the open_clip pretrained tag (``"laion2b_s32b_b79k"``); accepted for config
        compatibility and not used: the weights come from the SD checkpoint, nothing is downloaded.
    :param device: accepted for config compatibility and not used (move the module with ``.to()``).
    :param max_length: token length; must equal the arch's context length (77), as the reference
        adds the whole positional embedding.
    :param freeze: eval mode and ``requires_grad=False``.
    :param layer: ``"last"``: every block, then ``ln_final``; ``"penultimate"`` (SD 2's configs):
        every block but the last, then ``ln_final``. Either way no projection, no pooling.
    """

    LAYERS = ("last", "penultimate")

    def __init__(self, arch: str = "ViT-H-14", version: str | None = "laion2b_s32b_b79k", device: Any = None,
                 max_length: int = 77, freeze: bool = True, layer: str = "last"):
        super().__init__()
        config = open_clip_text_config(arch)
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        self.layer_idx = {"last": 0, "penultimate": 1}[layer]  # the reference's name: blocks skipped at the end
        if config.layers <= self.layer_idx:
            raise ValueError(f"layer={layer!r} needs at least 2 blocks; arch {arch!r} has {config.layers}")
        if max_length != config.context_length:
            raise ValueError(f"max_length must be the context length of {arch!r}, {config.context_length}; "
                             f"got {max_length}")
        self.arch = arch
        self.layer = layer
        self.max_length = max_length
        self.tokenizer = CLIPTokenizer.from_folder(model_max_length=max_length, dialect=OPEN_CLIP)
        self.model = OpenCLIPTextTransformer(config)
        if freeze:
            self.freeze()

    def _token_embedding(self) -> nn.Embedding:
        return self.model.token_embedding

    def forward(self, text: str | list[str]) -> torch.Tensor:
        """:param text: a prompt or a list of B prompts.
        :returns: ``[B, max_length, width]``, dtype of the weights."""
        return self.encode_with_transformer(self.tokenize(text).input_ids.to(self.device))

    def encode_with_transformer(self, tokens: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The reference's name: ``[B, 77]`` token ids -> ``[B, 77, width]`` features of ``layer``."""
        return self.model(tokens, skip_last=self.layer_idx, token_embeds=token_embeds)

    def encode_tokens(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode_with_transformer(input_ids.to(self.device), token_embeds)


class FrozenOpenCLIPImageEmbedder(AbstractEncoder):
    """OpenCLIP image encoder (Stable unCLIP-H): images in [-1, 1] -> ``[B, embed_dim]`` embeddings.

    ``model`` is an ``open_clip`` ``CLIP`` without its text transformer (``embedder.model.*``);
    the embedding is ``model.visual`` of the preprocessed image (:func:`clip_preprocess`: kornia's
    antialiased bicubic resize to 224, the CLIP mean/std): ``ln_post`` of the class token ``@ proj``,
    not L2-normalised.

    :param arch: ``"ViT-H-14"`` or an arch registered with a ``vision_cfg``.
    :param version: / ``device`` / ``max_length``: accepted for config compatibility, not used (the
        weights come from the checkpoint; move the module with ``.to()``).
    :param layer: ``"pooled"`` only (the reference raises on anything else too).
    :param antialias: blur before a downscale (kornia's ``antialias``).
    :param ucg_rate: training-time embedding dropout (zeroes whole embeddings); not applied in eval.
    """

    def __init__(self, arch: str = "ViT-H-14", version: str | None = "laion2b_s32b_b79k", device: Any = None,
                 max_length: int = 77, freeze: bool = True, layer: str = "pooled", antialias: bool = True,
                 ucg_rate: float = 0.0):
        super().__init__()
        if layer != "pooled":
            raise ValueError(f"FrozenOpenCLIPImageEmbedder supports layer='pooled' only, got {layer!r}")
        vision = open_clip_vision_config(arch)
        self.model = OpenCLIPImageModel(open_clip_text_config(arch), vision)
        self.arch, self.layer, self.antialias, self.ucg_rate = arch, layer, antialias, ucg_rate
        self.image_size = vision.image_size
        self.max_length = max_length
        if freeze:
            self.freeze()

    @property
    def device(self) -> torch.device:
        return self.model.visual.proj.device

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> ``[B, 3, 224, 224]``, CLIP-normalised (float32 math)."""
        return clip_preprocess(x.float(), self.image_size, self.antialias)

    def forward(self, image: torch.Tensor, no_dropout: bool = False) -> torch.Tensor:
        """:param image: ``[B, 3, H, W]`` in [-1, 1]. :returns: ``[B, embed_dim]``."""
        z = self.encode_with_vision_transformer(image)
        if self.training and self.ucg_rate > 0.0 and not no_dropout:
            z = torch.bernoulli((1.0 - self.ucg_rate) * torch.ones(z.shape[0], device=z.device))[:, None] * z
        return z

    def encode_with_vision_transformer(self, image: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(image.to(self.device))
        return self.model.visual(pixels.to(self.model.visual.proj.dtype))

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self(image)


class _NotProvided(AbstractEncoder):
    """A class name of the reference kept so that configs naming it fail clearly."""

    missing = ""

    def __init__(self, *args, **kwargs):
        super().__init__()
        raise NotImplementedError(f"{type(self).__name__} is not implemented in this package: {self.missing}")


from ldm.modules.encoders.bert import BERTEmbedder, BERTTokenizer, TransformerEmbedder  # noqa: E402,F401  (config paths)


class FrozenCLIPTextEmbedder(_NotProvided):
    missing = "it wraps OpenAI's `clip` package (encode_text with a projection); use FrozenCLIPEmbedder for SD v1"


class FrozenClipImageEmbedder(_NotProvided):
    missing = "it wraps OpenAI's `clip` package and kornia for image conditioning"


class FrozenT5Embedder(_NotProvided):
    missing = "it needs a T5 encoder and tokenizer, which this package does not include"


class FrozenCLIPT5Encoder(_NotProvided):
    missing = "it needs a T5 encoder and tokenizer, which this package does not include"


class FrozenOpenCLIPImageEmbedderV2(_NotProvided):
    missing = ("it returns the image tower's token sequence (no released SD 2 config uses it); "
               "see FrozenOpenCLIPImageEmbedder")


class ClipImageEmbedder(FrozenOpenCLIPImageEmbedder):
    """openai CLIP image encoder (Stable unCLIP-L): images in [-1, 1] -> ``[B, 768]`` embeddings.

    ``model`` is the whole openai CLIP ViT-L/14 (``embedder.model.*``, text tower included and
    unused); the embedding is its ``encode_image`` of the same preprocessing as
    :class:`FrozenOpenCLIPImageEmbedder`. :param model: ``"ViT-L/14"`` only; ``jit`` / ``device``:
    accepted for config compatibility, not used (nothing is downloaded: the weights come from the
    checkpoint)."""

    def __init__(self, model: str = "ViT-L/14", jit: bool = False, device: Any = None, antialias: bool = True,
                 ucg_rate: float = 0.0):
        AbstractEncoder.__init__(self)
        if model != "ViT-L/14":
            raise ValueError(f"ClipImageEmbedder knows the openai CLIP 'ViT-L/14' only, got {model!r}")
        text, vision = OPENAI_VIT_L14
        self.model = OpenCLIPImageModel(text, vision, openai=True)
        self.arch, self.layer, self.antialias, self.ucg_rate = model, "pooled", antialias, ucg_rate
        self.image_size, self.max_length = vision.image_size, text.context_length
        self.freeze()
