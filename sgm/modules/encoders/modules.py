"""SDXL's conditioner and embedders (``sgm.modules.encoders.modules``), over the ``ldm`` text towers.

:class:`GeneralConditioner` runs its embedders on a batch dict and routes each output by its rank:
``[B, D]`` -> ``vector`` (concatenated along dim 1), ``[B, L, D]`` -> ``crossattn`` (along dim 2),
``[B, C, H, W]`` -> ``concat`` (along dim 1). The SDXL base config has five embedders:

* ``FrozenCLIPEmbedder`` (``layer: hidden, layer_idx: 11``): CLIP ViT-L ``hidden_states[11]``, the
  output of the 11th of 12 layers, no ``final_layer_norm`` -> ``crossattn`` [B, 77, 768];
* ``FrozenOpenCLIPEmbedder2`` (ViT-bigG, ``penultimate``, ``legacy: False``): the input of the
  last block *without* ``ln_final`` -> ``crossattn`` [B, 77, 1280], and the pooled output
  ``ln_final(last)[EOT] @ text_projection`` -> ``vector`` [B, 1280];
* three ``ConcatTimestepEmbedderND(256)`` of ``original_size_as_tuple`` (h, w),
  ``crop_coords_top_left`` (top, left) and ``target_size_as_tuple`` (h, w): 256-wide sinusoidal
  embeddings (cos first) of the raw pixel numbers -> ``vector``.

So ``crossattn`` is [B, 77, 2048] (CLIP-L first) and ``vector`` [B, 2816]. The refiner has bigG,
the original size, the crop and ``aesthetic_score`` (``vector`` 2560).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.encoders.modules import CLIP_VIT_L14
from ldm.modules.encoders.modules import FrozenCLIPEmbedder as _LdmCLIPEmbedder
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder as _LdmOpenCLIPEmbedder
from ldm.util import instantiate_from_config

__all__ = ["AbstractEmbModel", "GeneralConditioner", "FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2",
           "FrozenOpenCLIPEmbedder", "ConcatTimestepEmbedderND", "OUTPUT_DIM2KEYS", "KEY2CATDIM"]

#: rank of an embedder output -> the conditioning key it goes to; key -> the dim it is concatenated on
OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}


class AbstractEmbModel(nn.Module):
    """sgm's embedder base: ``input_key``, ``is_trainable``, ``ucg_rate``, ``legacy_ucg_val`` are set
    by :class:`GeneralConditioner` from the config entry."""

    input_key: str = ""
    is_trainable: bool = False
    ucg_rate: float = 0.0
    legacy_ucg_val: Any = None


class FrozenCLIPEmbedder(_LdmCLIPEmbedder):
    """CLIP ViT-L/14 text (sgm): :class:`ldm.modules.encoders.modules.FrozenCLIPEmbedder` plus
    ``always_return_pooled`` (then ``(z, pooled)``, pooled = ``final_layer_norm`` at the EOT token).

    ``device`` is accepted and unused (move the module); ``text_config`` overrides the architecture
    (tests)."""

    def __init__(self, version: str = CLIP_VIT_L14, device: Any = "cuda", max_length: int = 77, freeze: bool = True,
                 layer: str = "last", layer_idx: Optional[int] = None, always_return_pooled: bool = False,
                 text_config: Optional[Mapping[str, Any]] = None):
        super().__init__(version, device, max_length, freeze, layer, layer_idx, text_config)
        self.return_pooled = always_return_pooled

    def forward(self, text):
        tokens = self.tokenize(text).input_ids.to(self.device)
        out = self.transformer(tokens)
        z = {"last": out.last_hidden_state, "pooled": out.pooler_output[:, None, :]}.get(self.layer)
        if z is None:
            z = out.hidden_states[self.layer_idx]
        return (z, out.pooler_output) if self.return_pooled else z


class FrozenOpenCLIPEmbedder2(_LdmOpenCLIPEmbedder):
    """OpenCLIP text (sgm's SDXL embedder) over :class:`ldm.modules.encoders.open_clip.OpenCLIPTextTransformer`.

    :param layer: ``"last"`` or ``"penultimate"`` (the input of the last block).
    :param always_return_pooled: also return ``ln_final(last)[EOT] @ text_projection`` ``[B, embed_dim]``
        (EOT = the first 49407, the largest id: ``argmax``).
    :param legacy: True (sgm's class default): ``ln_final`` of the chosen layer and no pooled output;
        False (both SDXL configs): the chosen layer **raw**. SD 2's embedder applies ``ln_final``
        to the penultimate layer; SDXL's does not.
    """

    def __init__(self, arch: str = "ViT-H-14", version: str = "laion2b_s32b_b79k", device: Any = "cuda",
                 max_length: int = 77, freeze: bool = True, layer: str = "last",
                 always_return_pooled: bool = False, legacy: bool = True):
        super().__init__(arch, version, device, max_length, freeze, layer)
        if legacy and always_return_pooled:
            raise ValueError("FrozenOpenCLIPEmbedder2: legacy=True cannot return the pooled output; "
                             "set legacy: False (as the SDXL configs do)")
        self.return_pooled = always_return_pooled
        self.legacy = legacy

    def forward(self, text):
        return self.encode_with_transformer(self.tokenize(text).input_ids.to(self.device))

    def encode_with_transformer(self, tokens: torch.Tensor):
        """``[B, 77]`` ids -> ``[B, 77, width]`` (and ``[B, embed_dim]`` pooled when asked)."""
        states = self.model.hidden_states(tokens)          # [emb, out_1, ..., out_n], each [B, 77, width]
        z = states[-1 - self.layer_idx]
        if self.legacy:
            return self.model.ln_final(z)
        if not self.return_pooled:
            return z
        last = self.model.ln_final(states[-1])
        eot = last[torch.arange(last.shape[0], device=last.device), tokens.argmax(dim=-1)]   # [B, width]
        pooled = eot @ self.model.text_projection
        return z, pooled


#: SD 2.1 re-expressed for sgm (``configs/inference/sd_2_1.yaml``) names the ldm embedder here
FrozenOpenCLIPEmbedder = _LdmOpenCLIPEmbedder


class ConcatTimestepEmbedderND(AbstractEmbModel):
    """``[B, d]`` numbers -> ``[B, d·outdim]``: each number's sinusoidal embedding (``cos`` first,
    max period 10000, the UNet's :func:`timestep_embedding`), concatenated. No parameters."""

    def __init__(self, outdim: int):
        super().__init__()
        self.outdim = outdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 1:
            x = x[:, None]
        b, dims = x.shape
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(b, dims * self.outdim)


class GeneralConditioner(nn.Module):
    """The conditioner of ``DiffusionEngine`` (sgm): ``embedders`` (an ``nn.ModuleList``, keys
    ``conditioner.embedders.N.*``) built from ``emb_models`` entries ``{target, params, input_key
    (or input_keys), is_trainable, ucg_rate, legacy_ucg_value}``.

    ``ucg_rate`` (conditioning dropout) is a training option: it is stored, and inference never
    drops anything.
    """

    OUTPUT_DIM2KEYS = OUTPUT_DIM2KEYS
    KEY2CATDIM = KEY2CATDIM

    def __init__(self, emb_models: Sequence[Mapping[str, Any]]):
        super().__init__()
        embedders = []
        for n, cfg in enumerate(emb_models):
            embedder = instantiate_from_config(cfg)
            if not isinstance(embedder, nn.Module):
                raise TypeError(f"conditioner embedder {n} ({cfg['target']}) is not a torch module")
            embedder.is_trainable = bool(cfg.get("is_trainable", False))
            embedder.ucg_rate = float(cfg.get("ucg_rate", 0.0))
            if not embedder.is_trainable:
                embedder.eval()
                embedder.requires_grad_(False)
            if cfg.get("input_key") is not None:
                embedder.input_key = cfg["input_key"]
            elif cfg.get("input_keys") is not None:
                embedder.input_keys = list(cfg["input_keys"])
            else:
                raise KeyError(f"conditioner embedder {n} ({cfg['target']}) needs input_key or input_keys")
            embedder.legacy_ucg_val = cfg.get("legacy_ucg_value", None)
            embedders.append(embedder)
        self.embedders = nn.ModuleList(embedders)

    @property
    def input_keys(self) -> list:
        """The batch keys the embedders read, in embedder order (each once)."""
        keys = []
        for embedder in self.embedders:
            keys += [embedder.input_key] if hasattr(embedder, "input_key") else list(embedder.input_keys)
        return list(dict.fromkeys(keys))

    def _device(self) -> Optional[torch.device]:
        return next((p.device for p in self.parameters()), None)

    def forward(self, batch: Mapping[str, Any], force_zero_embeddings: Optional[Iterable[str]] = None) -> dict:
        """:param batch: ``{input_key: value}`` (``txt``: list of B prompts; sizes: ``[B, 2]``;
            ``aesthetic_score``: ``[B]``).
        :param force_zero_embeddings: input keys whose embeddings are replaced by zeros (sgm's SDXL
            base unconditional text).
        :returns: ``{"crossattn": [B, L, D], "vector": [B, V], ...}``."""
        force = set(force_zero_embeddings or ())
        device = self._device()
        output: dict = {}
        for embedder in self.embedders:
            if hasattr(embedder, "input_key"):
                outs = embedder(batch[embedder.input_key])
            else:
                outs = embedder(*[batch[k] for k in embedder.input_keys])
            if not isinstance(outs, (list, tuple)):
                outs = [outs]
            for emb in outs:
                key = OUTPUT_DIM2KEYS[emb.dim()]
                if device is not None:
                    emb = emb.to(device)
                if getattr(embedder, "input_key", None) in force:
                    emb = torch.zeros_like(emb)
                output[key] = torch.cat((output[key], emb), KEY2CATDIM[key]) if key in output else emb
        return output

    def get_unconditional_conditioning(self, batch_c: Mapping[str, Any], batch_uc: Optional[Mapping[str, Any]] = None,
                                       force_uc_zero_embeddings: Optional[Iterable[str]] = None,
                                       force_cond_zero_embeddings: Optional[Iterable[str]] = None):
        """``(c, uc)``: every embedder on both batches (``batch_uc`` defaults to ``batch_c``), the
        embeddings of the keys in ``force_uc_zero_embeddings`` zeroed in ``uc``."""
        c = self(batch_c, force_cond_zero_embeddings)
        uc = self(batch_c if batch_uc is None else batch_uc, force_uc_zero_embeddings)
        return c, uc
