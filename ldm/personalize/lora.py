"""LoRA: low-rank weight deltas from kohya/A1111 and diffusers/PEFT files, merged into the model.

A LoRA layer holds ``down`` ``[r, in(, kh, kw)]``, ``up`` ``[out, r(, 1, 1)]`` and optionally
``alpha``; its delta is ``weight * (alpha / r) * up @ down`` (``alpha`` missing: scale 1), reshaped
to the target weight (LoCon convolutions: ``up`` flattened times ``down`` flattened). Merging is
exact to undo: the first time a weight is changed its original is kept, each merge computes
``original.float() + sum of deltas`` in float32 and casts once to the weight's dtype, and
:meth:`LoraManager.restore` copies the originals back bit for bit, so a long-lived pipeline can
switch LoRAs any number of times in fp32, fp16 or bf16 without drift. A LoRA at weight 0 changes
nothing (the weights are not touched).

Keys that match no layer of the model are reported (a warning naming them, and
:attr:`LoraFile.unmatched`); a file of which nothing matches, or whose layers have other shapes
(a LoRA for another model), is one error line naming the layers and the model it was likely made for.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ldm.errors import UserInputError
from ldm.personalize.files import file_sha256, read_tensor_file
from ldm.personalize.lora_keys import Target, layer_names, split_key

__all__ = ["LORA_SUFFIXES", "LoraLayer", "LoraFile", "LoraManager", "load_lora", "save_lora", "lora_delta"]

log = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
_CONTEXT_WIDTHS = {768: "SD v1", 1024: "SD 2", 2048: "SDXL"}


@dataclass
class LoraLayer:
    up: torch.Tensor
    down: torch.Tensor
    alpha: Optional[float] = None

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]


@dataclass
class LoraFile:
    """A LoRA file's layers by the name the file gives them.

    :ivar hash: A1111's short hash (first 12 hex digits of kohya's "addnet" SHA-256 of a
        ``.safetensors`` file's tensor data, of the whole file otherwise), written as ``Lora hashes``.
    :ivar unmatched: names matching no layer of the model it was last checked against.
    """

    name: str
    layers: dict
    path: Optional[Path] = None
    hash: str = ""
    unsupported: list = field(default_factory=list)
    unmatched: list = field(default_factory=list)


def _read(path: Path) -> dict:
    data = read_tensor_file(path, "LoRA")
    if isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def parse_lora(state_dict: dict, name: str = "lora") -> LoraFile:
    """Group a LoRA state dict's tensors into layers; keys of unsupported kinds go to ``unsupported``."""
    parts: dict = {}
    unsupported = []
    for key, value in state_dict.items():
        split = split_key(key)
        if split is None or split[1] == "mid":  # LyCORIS kinds (LoHa, LoKr, Tucker mid, DoRA, ...) or not LoRA
            unsupported.append(key)
            continue
        parts.setdefault(split[0], {})[split[1]] = value
    layers = {}
    for layer, p in parts.items():
        if "up" not in p or "down" not in p:
            unsupported.append(layer + " (no up/down pair)")
            continue
        alpha = p.get("alpha")
        layers[layer] = LoraLayer(p["up"], p["down"], None if alpha is None else float(alpha))
    return LoraFile(name, layers, unsupported=unsupported)


def load_lora(path: Union[str, "os.PathLike[str]"], name: Optional[str] = None) -> LoraFile:
    """Read a LoRA file (``.safetensors``, or a pickle through the weights-only unpickler)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"LoRA file not found: {path}")
    lora = parse_lora(_read(path), name or path.stem)
    if not lora.layers:
        raise UserInputError(f"LoRA {path} holds no LoRA layers (lora_up/lora_down or lora_A/lora_B pairs); "
                             f"first keys: {lora.unsupported[:3]}")
    lora.path = path
    lora.hash = file_sha256(path, skip_safetensors_header=path.suffix == ".safetensors")[:12]
    return lora


def save_lora(layers: dict, path: Union[str, "os.PathLike[str]"]) -> Path:
    """Write ``{kohya layer name: LoraLayer}`` as a kohya/A1111 ``.safetensors`` file
    (``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``; alpha = rank when None)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.lora_down.weight"] = layer.down.detach().contiguous()
        tensors[f"{name}.lora_up.weight"] = layer.up.detach().contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(layer.down.shape[0] if layer.alpha is None else layer.alpha))
    save_file(tensors, str(path))
    return Path(path)


def lora_delta(layer: LoraLayer, shape: tuple, device=None) -> torch.Tensor:
    """``(alpha / r) * up @ down`` in float32, shaped as the target weight ``shape``."""
    up = layer.up.to(device=device, dtype=torch.float32).flatten(1)                  # [out, r]
    down = layer.down.to(device=device, dtype=torch.float32).flatten(1)              # [r, in * kh * kw]
    return (up @ down).reshape(shape) * layer.scale


def _guess_model(lora: LoraFile) -> str:
    names = " ".join(lora.layers)
    if "lora_te1_" in names or "lora_te2_" in names or "text_encoder_2" in names:
        return "SDXL"
    for layer_name, layer in lora.layers.items():
        if "attn2" in layer_name and ("to_k" in layer_name or "to_v" in layer_name):
            width = layer.down.shape[1]
            return _CONTEXT_WIDTHS.get(width, f"a model with {width}-wide text features")
    return "another model"


class LoraManager:
    """The LoRAs merged into one model, switchable with exact restore (see the module doc).

    :ivar active: ``[(LoraFile, weight)]`` merged now.
    """

    def __init__(self, model):
        self.model = model
        self.active: list = []
        self._originals: dict = {}
        self._names: Optional[dict] = None
        self._cache: dict = {}

    def names(self) -> dict:
        if self._names is None:
            self._names = layer_names(self.model)
        return self._names

    def load(self, path: Union[str, "os.PathLike[str]"]) -> LoraFile:
        """Load (once per path) and check a file against the model; see :meth:`check`."""
        key = str(Path(path).resolve())
        if key not in self._cache:
            self._cache[key] = self.check(load_lora(path))
        return self._cache[key]

    def check(self, lora: LoraFile) -> LoraFile:
        """Match ``lora``'s layers to the model: unmatched names are reported, and none matching or a
        shape mismatch is a :class:`UserInputError` naming them."""
        names = self.names()
        matched = [n for n in lora.layers if n in names]
        lora.unmatched = [n for n in lora.layers if n not in names] + lora.unsupported
        if not matched:
            raise UserInputError(f"LoRA {lora.path or lora.name} does not fit this model: none of its "
                                 f"{len(lora.layers)} layers exist here (e.g. {', '.join(sorted(lora.layers)[:3])}); "
                                 f"it looks made for {_guess_model(lora)}")
        bad = []
        for n in matched:
            layer, shape = lora.layers[n], names[n].shape()
            out, inner = shape[0], int(torch.Size(shape[1:]).numel())
            if layer.up.shape[0] != out or layer.down.flatten(1).shape[1] != inner:
                bad.append(f"{n} ({layer.up.shape[0]}x{layer.down.flatten(1).shape[1]} vs {out}x{inner})")
        if bad:
            raise UserInputError(f"LoRA {lora.path or lora.name} does not fit this model: {len(bad)} layer(s) have "
                                 f"other shapes, e.g. {'; '.join(bad[:3])}; it looks made for {_guess_model(lora)}")
        if lora.unmatched:
            log.warning("LoRA %s: %d of its %d entries match no layer of this model and are not applied: %s%s",
                        lora.name, len(lora.unmatched), len(lora.layers) + len(lora.unsupported),
                        ", ".join(lora.unmatched[:5]), " ..." if len(lora.unmatched) > 5 else "")
        return lora

    @torch.no_grad()
    def apply(self, loras: Sequence[tuple]) -> None:
        """Merge exactly ``loras`` (``[(LoraFile, weight)]``; weight-0 entries are dropped), undoing
        whatever was merged before. A no-op when the set is unchanged."""
        wanted = [(lora, float(w)) for lora, w in loras if float(w) != 0.0]
        if [(id(a), w) for a, w in wanted] == [(id(a), w) for a, w in self.active]:
            return
        self.restore()
        deltas: dict = {}
        names = self.names()
        for lora, weight in wanted:
            for n, layer in lora.layers.items():
                target = names.get(n)
                if target is None:
                    continue
                key = (id(target.module), target.param)
                if key not in deltas:
                    deltas[key] = (target, torch.zeros(target.weight.shape, dtype=torch.float32,
                                                       device=target.weight.device))
                rows = target.rows or (0, target.weight.shape[0])
                deltas[key][1][rows[0]:rows[1]] += weight * lora_delta(layer, target.shape(), target.weight.device)
        for target, delta in list(deltas.values()):  # a config with use_ema samples with the EMA shadows
            twin = self._ema_twin(target)
            if twin is not None:
                deltas[(id(twin.module), twin.param)] = (twin, delta)
        for key, (target, delta) in deltas.items():
            param = target.weight
            original = self._originals.setdefault(key, (target, param.detach().clone()))[1]
            param.copy_((original.float() + delta).to(param.dtype))
        self.active = wanted
        if wanted:
            log.info("LoRA merged: %s", ", ".join(f"{lora.name}:{w:g}" for lora, w in wanted))

    def _ema_twin(self, target: Target) -> Optional[Target]:
        """The EMA shadow of a UNet weight when the model swaps shadows in to sample (``use_ema``)."""
        ema = getattr(self.model, "model_ema", None)
        if not getattr(self.model, "use_ema", False) or ema is None or not target.path.startswith("model."):
            return None
        shadow = ema.m_name2s_name.get(target.path[len("model."):])
        return None if shadow is None else Target(ema, shadow, f"model_ema.{shadow}")

    @torch.no_grad()
    def restore(self) -> None:
        """Put back every weight a merge changed, bit for bit."""
        for target, original in self._originals.values():
            target.weight.copy_(original)
        self._originals.clear()
        self.active = []
