"""Personalization trainers for ``main.py``: textual inversion and LoRA on a frozen, trained model.

Both are LightningModules named as ``model.target`` of a config (``wrap_model`` takes them as
they are); both load a trained inference model (``base_config`` + ``ckpt_path``, e.g. the demo
model), freeze every one of its weights, and train only their own parameters with the model's
noise-prediction loss (``p_losses``) on latents of the training images:

* :class:`TextualInversion` (Gal et al.): ``num_vectors`` token-embedding vectors named ``name``.
  Captions are cut into windows by the same code as inference (:mod:`ldm.prompts.windows`), so the
  vectors replace the tokens of ``name`` exactly where a prompt using the saved file puts them.
  Saved as an A1111 embedding ``<run>/embeddings/<name>.safetensors`` (``emb_params``; ``.pt``
  with ``file_format: pt``): ``--embeddings <run>/embeddings`` and ``name`` in a prompt.
* :class:`Lora` (Hu et al.): ``up @ down`` pairs of rank ``rank`` added to the Linear layers whose
  kohya name matches one of ``targets`` (default: the UNet's attention projections and the text
  encoder's self-attention), computed as ``W x + (alpha / rank) up (down x)`` by forward hooks
  during training; ``up`` starts at zero, so training starts from the base model. Saved as a
  kohya/A1111 ``.safetensors`` (``lora_unet_down_blocks_...``, ``lora_te_text_model_...``): the
  loader's merge ``W + (alpha / rank) up @ down`` is the same function.

Checkpoints (``last.ckpt``) hold only the trained parameters. The exported file is written when
training ends (also when it is interrupted) and at every checkpoint.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from ldm.errors import UserInputError
from ldm.training.modules import images_to_nchw

__all__ = ["TextualInversion", "Lora", "LORA_TARGETS", "lora_layer_names"]

log = logging.getLogger(__name__)

#: kohya-name patterns of the layers a LoRA trains by default
LORA_TARGETS = (r"^lora_unet_.*_attn[12]_to_(q|k|v|out_0)$", r"^lora_te_.*_self_attn_(q|k|v|out)_proj$")
_LDM_PATH = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks|out_|time_embed)")


class _Personalization(pl.LightningModule):
    """Loads and freezes the base model; the training step and the export around ``condition``."""

    trained_prefix = ""

    def __init__(self, base_config: str, ckpt_path: str, output: str, ucg_p: float = 0.0):
        super().__init__()
        from ldm.checkpoint import load_model_from_config

        for what, path in (("base_config", base_config), ("ckpt_path", ckpt_path)):
            if not Path(path).is_file():
                raise UserInputError(f"model.params.{what}: {path} not found")
        if not 0 <= ucg_p <= 1:
            raise UserInputError(f"model.params.ucg_p must be in [0, 1], got {ucg_p}")
        model = load_model_from_config(OmegaConf.load(base_config), ckpt_path)
        model.requires_grad_(False)
        self.model = model
        self.output = output
        self.ucg_p = float(ucg_p)
        self.learning_rate = 1.0e-3
        self.strict_loading = False  # checkpoints hold the trained parameters only

    def condition(self, captions: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def export(self, path: Path) -> Path:
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        m = self.model
        x = images_to_nchw(batch[m.first_stage_key]).to(self.device)
        with torch.no_grad():
            z = m.get_first_stage_encoding(m.encode_first_stage(x)).detach()
        captions = list(batch[m.cond_stage_key])
        if self.ucg_p:
            drop = (torch.rand(len(captions)) < self.ucg_p).tolist()
            captions = ["" if d else c for c, d in zip(captions, drop)]
        loss, logs = m.p_losses(z, self.condition(captions), m.sample_timesteps(z.shape[0], z.device))
        logs = {"train/" + k.split("/", 1)[-1]: v for k, v in logs.items()}  # the frozen model stays in eval mode
        self.log_dict(logs, prog_bar=True, on_step=True, on_epoch=False, batch_size=z.shape[0])
        return loss

    def trained_parameters(self) -> list:
        return [p for name, p in self.named_parameters() if name.startswith(self.trained_prefix)]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.trained_parameters(), lr=self.learning_rate, weight_decay=0.0)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k.startswith(self.trained_prefix)}
        self._export()

    def on_train_end(self) -> None:
        self._export()

    def _export(self) -> None:
        trainer = getattr(self, "_trainer", None)
        if trainer is None or trainer.global_rank != 0:
            return
        path = Path(trainer.default_root_dir) / self.output
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".partial" + path.suffix)
        self.export(tmp)
        tmp.replace(path)  # never a half-written file under the final name
        log.info("wrote %s (step %d)", path, trainer.global_step)


class TextualInversion(_Personalization):
    """Learn ``num_vectors`` embedding vectors for the word ``name`` (see the module doc).

    :param name: the embedding's name: the word captions (and later prompts) use, and the file stem.
    :param init_word: the vectors start as this word's token embeddings (its tokens, cycled to
        ``num_vectors``).
    :param num_vectors: vectors the word stands for. A word standing for two words of a caption
        template needs two: the demo's text encoder reads words by their position.
    :param file_format: ``safetensors`` or ``pt`` (A1111's ``string_to_param`` pickle).
    """

    trained_prefix = "vectors"

    def __init__(self, base_config: str, ckpt_path: str, name: str, init_word: str, num_vectors: int = 1,
                 file_format: str = "safetensors", ucg_p: float = 0.0):
        if file_format not in ("safetensors", "pt"):
            raise UserInputError(f"model.params.file_format must be safetensors or pt, got {file_format!r}")
        if not re.fullmatch(r"[\w-]+", name or ""):
            raise UserInputError(f"model.params.name {name!r} must be one word (letters, digits, _ or -): "
                                 "it is both the word prompts use and the file name")
        super().__init__(base_config, ckpt_path, f"embeddings/{name}.{file_format}", ucg_p)
        encoder = self.model.cond_stage_model
        init = encoder.tokenizer.encode(init_word)
        if not init:
            raise UserInputError(f"model.params.init_word {init_word!r} has no tokens")
        if not isinstance(num_vectors, int) or num_vectors < 1:
            raise UserInputError(f"model.params.num_vectors must be a positive int, got {num_vectors!r}")
        ids = (init * num_vectors)[:num_vectors]  # the init word's tokens, cycled
        start = encoder.embed_tokens(torch.tensor([ids])).detach()[0].float()
        self.vectors = nn.Parameter(start.clone())
        self.name = name

    def library(self):
        from ldm.personalize.embeddings import Embedding, EmbeddingLibrary

        library = EmbeddingLibrary()
        library.add(Embedding(self.name, self.vectors))
        return library.index(self.model.cond_stage_model.tokenizer)

    def condition(self, captions: Sequence[str]) -> torch.Tensor:
        from ldm.prompts.parser import Run
        from ldm.prompts.windows import build_windows, encode_prompts

        encoder = self.model.cond_stage_model
        library = self.library()
        windows = [build_windows(encoder.tokenizer, [Run(c, 1.0)], library, self.vectors.shape[-1]) for c in captions]
        if captions and not any(w.embeddings for w in windows) and not self.ucg_p:
            raise UserInputError(f"no training caption uses the word {self.name!r} (e.g. {captions[0]!r}); the "
                                 "embedding would not learn anything")
        return encode_prompts(encoder, windows)

    def export(self, path: Path) -> Path:
        from ldm.personalize.embeddings import save_embedding

        return save_embedding(self.vectors, path, self.name)


def lora_layer_names(model: nn.Module, targets: Sequence[str] = LORA_TARGETS) -> dict:
    """``{kohya name: Linear}`` of the layers of ``model`` whose kohya name (diffusers block names
    for the UNet, as A1111 files for SD v1 have them) matches one of ``targets``."""
    from ldm.personalize.lora_keys import layer_names

    patterns = [re.compile(t) for t in targets]
    chosen: dict = {}
    for name, target in layer_names(model).items():
        if not name.startswith(("lora_unet_", "lora_te_")) or _LDM_PATH.match(name):
            continue
        if any(p.search(name) for p in patterns):
            if target.rows is not None or not isinstance(target.module, nn.Linear):
                raise UserInputError(f"LoRA target {name} is not a plain Linear layer; LoRA training supports "
                                     "the SD v1 CLIP text encoder and the UNet's Linear layers")
            chosen[name] = target.module
    return chosen


class Lora(_Personalization):
    """Learn low-rank deltas of the layers matching ``targets`` (see the module doc).

    :param name: the file stem of ``<run>/lora/<name>.safetensors``.
    :param rank: the rank ``r`` of every pair; :param alpha: the scale is ``alpha / rank`` (default
        ``rank``: scale 1).
    :param targets: regular expressions over kohya layer names (``lora_unet_...``, ``lora_te_...``).
    :param ucg_p: the fraction of captions replaced by ``""`` (keeps the unconditional prediction
        that classifier-free guidance uses in training).
    """

    trained_prefix = "lora_"

    def __init__(self, base_config: str, ckpt_path: str, name: str, rank: int = 4, alpha: Optional[float] = None,
                 targets: Sequence[str] = LORA_TARGETS, ucg_p: float = 0.1, init_seed: int = 0):
        if not re.fullmatch(r"[\w-]+", name or ""):
            raise UserInputError(f"model.params.name {name!r} must be a file stem (letters, digits, _ or -)")
        super().__init__(base_config, ckpt_path, f"lora/{name}.safetensors", ucg_p)
        if not isinstance(rank, int) or rank < 1:
            raise UserInputError(f"model.params.rank must be a positive int, got {rank!r}")
        layers = lora_layer_names(self.model, list(targets))
        if not layers:
            raise UserInputError(f"model.params.targets {list(targets)} match no layer of the model")
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        generator = torch.Generator().manual_seed(init_seed)
        self.lora_down = nn.ParameterDict()
        self.lora_up = nn.ParameterDict()
        self._hooks = []
        for layer_name, linear in layers.items():
            down = torch.randn(rank, linear.in_features, generator=generator) / rank  # as kohya: up = 0
            self.lora_down[layer_name] = nn.Parameter(down)
            self.lora_up[layer_name] = nn.Parameter(torch.zeros(linear.out_features, rank))
            self._hooks.append(linear.register_forward_hook(self._hook(layer_name)))
        log.info("LoRA rank %d on %d layers (%d parameters)", rank, len(layers),
                 sum(p.numel() for p in self.trained_parameters()))

    def _hook(self, layer_name: str):
        def add_delta(module, inputs, output):
            x = inputs[0]
            down, up = self.lora_down[layer_name], self.lora_up[layer_name]
            return output + self.scale * F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype))
        return add_delta

    def remove_hooks(self) -> None:
        """Detach the adapters from the model (the base model alone again)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def condition(self, captions: Sequence[str]) -> torch.Tensor:
        return self.model.get_learned_conditioning(list(captions))

    def layers(self) -> dict:
        """``{kohya name: LoraLayer}`` of the current weights (what the file holds)."""
        from ldm.personalize.lora import LoraLayer

        return {n: LoraLayer(self.lora_up[n].detach().float().cpu(), self.lora_down[n].detach().float().cpu(),
                             self.alpha) for n in self.lora_down}

    def export(self, path: Path) -> Path:
        from ldm.personalize.lora import save_lora

        return save_lora(self.layers(), path)
