"""Which layer of our model each key of a LoRA file names.

LoRA files name layers in three ways: kohya/A1111 (``lora_unet_down_blocks_0_attentions_0_..._to_q``,
``lora_te_text_model_encoder_layers_0_self_attn_q_proj``: the diffusers module path with ``_`` for
``.``; SDXL-era files use the LDM path, ``lora_unet_input_blocks_4_1_...``), diffusers/PEFT
(``unet.down_blocks.0.attentions.0....to_q.lora_A.weight``, ``text_encoder.text_model....``, and the
older ``...attn1.processor.to_q_lora.down.weight``). :func:`layer_names` lists, for every Linear and
Conv2d of the UNet and the text encoder, each of those names; the UNet's diffusers path is worked
out from the block structure (any ``num_res_blocks``/``channel_mult``, not just SD's), and the SD 2
text encoder's HF names map onto open_clip's stacked ``in_proj_weight`` rows.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from torch import nn

__all__ = ["Target", "layer_names", "split_key"]

# suffixes of one LoRA layer's tensors -> role
_KOHYA = {"lora_up.weight": "up", "lora_down.weight": "down", "alpha": "alpha", "lora_mid.weight": "mid"}
_PEFT = {"lora_B.weight": "up", "lora_A.weight": "down", "lora.up.weight": "up", "lora.down.weight": "down",
         "alpha": "alpha", "lora_B.default.weight": "up", "lora_A.default.weight": "down",
         "lora_layer.up.weight": "up", "lora_layer.down.weight": "down"}
_OLD_DIFFUSERS = re.compile(r"^(.*)\.processor\.(to_[qkv]|to_out)_lora\.(up|down)\.weight$")

_RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_OPEN_CLIP_MLP = {"mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}


@dataclass(frozen=True)
class Target:
    """A weight a LoRA layer adds to: ``module.<param>``, rows ``rows`` of it when set (q/k/v of a
    stacked ``in_proj_weight``). ``path`` is the model's parameter name, for messages."""

    module: nn.Module
    param: str
    path: str
    rows: Optional[tuple] = None

    @property
    def weight(self):
        return getattr(self.module, self.param)

    def shape(self) -> tuple:
        w = self.weight
        return tuple(w.shape) if self.rows is None else (self.rows[1] - self.rows[0], *w.shape[1:])


def split_key(key: str) -> Optional[tuple]:
    """``(layer name, role)`` of a LoRA file key (role ``up``/``down``/``alpha``/``mid``), None when
    the key is no LoRA tensor of a known layout."""
    m = _OLD_DIFFUSERS.match(key)
    if m:
        out = "to_out.0" if m.group(2) == "to_out" else m.group(2)
        return f"{m.group(1)}.{out}", m.group(3)
    if key.startswith("lora_"):
        for suffix, role in _KOHYA.items():
            if key.endswith("." + suffix):
                return key[: -len(suffix) - 1], role
        return None
    for suffix, role in _PEFT.items():
        if key.endswith("." + suffix):
            name = key[: -len(suffix) - 1]
            return (name[len("base_model.model."):] if name.startswith("base_model.model.") else name), role
    return None


def _unet_blocks(unet: nn.Module) -> dict:
    """LDM block prefix -> (diffusers prefix, kind) for the blocks of an ``UNetModel``."""
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample

    blocks = {"time_embed.0": ("time_embedding.linear_1", ""), "time_embed.2": ("time_embedding.linear_2", ""),
              "input_blocks.0.0": ("conv_in", ""), "out.0": ("conv_norm_out", ""), "out.2": ("conv_out", "")}

    def add(prefix: str, child: nn.Module, name: str) -> None:
        kind = "res" if isinstance(child, ResBlock) else "down" if isinstance(child, Downsample) else ""
        blocks[prefix] = (name, kind)

    level, j = 0, 0
    for i, block in enumerate(unet.input_blocks[1:], start=1):
        if isinstance(block[0], Downsample):
            add(f"input_blocks.{i}.0", block[0], f"down_blocks.{level}.downsamplers.0")
            level, j = level + 1, 0
            continue
        add(f"input_blocks.{i}.0", block[0], f"down_blocks.{level}.resnets.{j}")
        if len(block) > 1 and isinstance(block[1], SpatialTransformer):
            add(f"input_blocks.{i}.1", block[1], f"down_blocks.{level}.attentions.{j}")
        j += 1
    for i, name in enumerate(("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1")):
        if i < len(unet.middle_block):
            add(f"middle_block.{i}", unet.middle_block[i], name)
    per_level = len(unet.output_blocks) // (level + 1)
    for i, block in enumerate(unet.output_blocks):
        up, j = divmod(i, per_level)
        for k, child in enumerate(block):
            if isinstance(child, ResBlock):
                add(f"output_blocks.{i}.{k}", child, f"up_blocks.{up}.resnets.{j}")
            elif isinstance(child, SpatialTransformer):
                add(f"output_blocks.{i}.{k}", child, f"up_blocks.{up}.attentions.{j}")
            elif isinstance(child, Upsample):
                add(f"output_blocks.{i}.{k}", child, f"up_blocks.{up}.upsamplers.0")
    return blocks


def _diffusers_unet_name(name: str, blocks: dict) -> Optional[str]:
    parts = name.split(".")
    for n in range(min(len(parts), 3), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in blocks:
            new, kind = blocks[prefix]
            rest = ".".join(parts[n:])
            if kind == "res":
                rest = _RESBLOCK.get(rest, rest)
            elif kind == "down":
                rest = "conv" if rest == "op" else rest
            return f"{new}.{rest}" if rest else new
    return None


def _kohya(prefix: str, dotted: str) -> str:
    return prefix + dotted.replace(".", "_")


def layer_names(model: nn.Module) -> dict:
    """Every name a LoRA file may give a layer of ``model`` (a ``LatentDiffusion``) -> :class:`Target`."""
    names: dict = {}
    unet = model.model.diffusion_model
    blocks = _unet_blocks(unet)
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        target = Target(module, "weight", f"model.diffusion_model.{name}.weight")
        names[_kohya("lora_unet_", name)] = target
        diffusers = _diffusers_unet_name(name, blocks)
        if diffusers is not None:
            names[_kohya("lora_unet_", diffusers)] = target
            names[f"unet.{diffusers}"] = target
    encoder = getattr(model, "cond_stage_model", None)
    text_model = getattr(getattr(encoder, "transformer", None), "text_model", None)
    if text_model is not None:  # CLIP (SD v1): the HF names are ours
        for name, module in text_model.named_modules():
            if isinstance(module, nn.Linear):
                target = Target(module, "weight", f"cond_stage_model.transformer.text_model.{name}.weight")
                names[_kohya("lora_te_text_model_", name)] = target
                names[f"text_encoder.text_model.{name}"] = target
    open_clip = getattr(getattr(encoder, "model", None), "transformer", None)
    if open_clip is not None and hasattr(open_clip, "resblocks"):  # OpenCLIP (SD 2): HF names -> open_clip's
        for i, block in enumerate(open_clip.resblocks):
            base = f"cond_stage_model.model.transformer.resblocks.{i}"
            hf = f"text_model.encoder.layers.{i}"
            width = block.attn.in_proj_weight.shape[1]
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                target = Target(block.attn, "in_proj_weight", f"{base}.attn.in_proj_weight",
                                (j * width, (j + 1) * width))
                names[_kohya("lora_te_", f"{hf}.self_attn.{proj}")] = target
                names[f"text_encoder.{hf}.self_attn.{proj}"] = target
            for ours, theirs in _OPEN_CLIP_MLP.items():
                module = block.get_submodule(ours)
                target = Target(module, "weight", f"{base}.{ours}.weight")
                names[_kohya("lora_te_", f"{hf}.{theirs}")] = target
                names[f"text_encoder.{hf}.{theirs}"] = target
    return names
