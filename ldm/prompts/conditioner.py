""":class:`TextConditioner`: prompts -> ``(c, uc)`` with the prompt syntax, long prompts,
textual-inversion embeddings and LoRAs (one per pipeline, ``StableDiffusion.text``).

Per call: the ``<lora:name:weight>`` tags are taken out of the prompts and negative prompts, the
LoRAs (the pipeline's ``loras`` plus the tags) are merged (:class:`ldm.personalize.lora.LoraManager`,
undone and redone only when the set changes), then prompts are parsed (``syntax``), cut into
windows (:mod:`ldm.prompts.windows`) and encoded; ``c`` and ``uc`` get the same number of windows.
A text encoder without the window protocol (a pooled or BERT encoder) gets the prompts as they are
through ``get_learned_conditioning``, with a warning naming the words cut off at its length.
The metadata items ``Lora hashes`` and ``TI hashes`` (A1111's) are kept in :attr:`extra`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ldm.errors import UserInputError
from ldm.personalize.embeddings import EmbeddingLibrary
from ldm.personalize.lora import LORA_SUFFIXES, LoraManager
from ldm.prompts.parser import SYNTAXES, extract_lora_tags, parse_lora_spec, parse_prompt

__all__ = ["TextConditioner"]

log = logging.getLogger(__name__)


class TextConditioner:
    """The text side of a pipeline.

    :ivar syntax: ``"a1111"`` (weights, ``BREAK``) or ``"plain"`` (the prompt as it is).
    :ivar embeddings: :class:`EmbeddingLibrary` (``load_dir`` a folder of embeddings).
    :ivar loras: ``[(LoraFile, weight)]`` merged for every call (``--lora``); a prompt's tags add to
        them (a tag's weight replaces the weight of the same file).
    :ivar lora_dir: where ``<lora:name:...>`` looks for ``name.safetensors`` (and .pt/.ckpt/.bin).
    :ivar extra: the metadata items of the last call.
    """

    def __init__(self, model):
        self.model = model
        self.syntax = "a1111"
        self.embeddings = EmbeddingLibrary()
        self.loras: list = []
        self.lora_dir: Optional[Path] = None
        self.manager = LoraManager(model)
        self.extra: dict = {}
        self._warned: set = set()

    def configure(self, syntax: Optional[str] = None, embeddings: Union[None, str, "os.PathLike[str]"] = None,
                  loras: Optional[Sequence] = None,
                  lora_dir: Union[None, str, "os.PathLike[str]"] = None) -> "TextConditioner":
        """Set what is given: the syntax, a folder of embeddings to load, the LoRAs (``"PATH[:WEIGHT]"``
        strings or ``(path, weight)`` pairs, loaded and checked now; ``[]`` for none), the tags' folder."""
        if syntax is not None:
            if syntax not in SYNTAXES:
                raise UserInputError(f"unknown prompt syntax {syntax!r}; use one of {', '.join(SYNTAXES)}")
            self.syntax = syntax
        if embeddings is not None:
            self.embeddings.load_dir(embeddings)
        if lora_dir is not None:
            self.lora_dir = Path(lora_dir)
        if loras is not None:
            pairs = [parse_lora_spec(s) if isinstance(s, str) else tuple(s) for s in loras]
            self.loras = [(self.manager.load(p), float(w)) for p, w in pairs]
        return self

    def _lora_by_name(self, name: str):
        for lora, _ in self.loras:
            if lora.name == name:
                return lora
        candidates = [Path(name)]
        if self.lora_dir is not None:
            candidates += [self.lora_dir / f"{name}{suffix}" for suffix in ("", *LORA_SUFFIXES)]
        for path in candidates:
            if path.is_file():
                return self.manager.load(path)
        where = f"in {self.lora_dir}" if self.lora_dir is not None else "(no --lora_dir given)"
        raise UserInputError(f"<lora:{name}:...>: no LoRA named {name!r} {where}; put {name}.safetensors there or "
                             "pass its file with --lora PATH")

    def _activate(self, texts: Sequence[str]) -> list:
        """Strip the LoRA tags of ``texts``, merge the LoRAs; :returns: the texts without tags."""
        stripped, wanted, tagged = [], {id(lora): (lora, w) for lora, w in self.loras}, {}
        for text in texts:
            clean, tags = extract_lora_tags(text)
            stripped.append(clean)
            for tag in tags:  # a tag's weight replaces the --lora weight of the same file
                lora = self._lora_by_name(tag.name)
                if tagged.setdefault(id(lora), tag.weight) != tag.weight:
                    raise UserInputError(f"<lora:{tag.name}> has two weights in one batch ({tagged[id(lora)]:g}, "
                                         f"{tag.weight:g}); a LoRA is merged into the model once per batch")
                wanted[id(lora)] = (lora, tag.weight)
        self.manager.apply(list(wanted.values()))
        active = [(lora, w) for lora, w in self.manager.active]
        self.extra["Lora hashes"] = ", ".join(f"{lora.name}: {lora.hash}" for lora, _ in active) or None
        return stripped

    def windowed(self) -> bool:
        """Whether the model's text encoder speaks the window protocol of :mod:`ldm.prompts.windows`."""
        encoder = getattr(self.model, "cond_stage_model", None)
        return (getattr(self.model, "cond_stage_forward", None) is None
                and callable(getattr(encoder, "encode_tokens", None)) and hasattr(encoder, "tokenizer")
                and getattr(encoder, "layer", None) != "pooled")

    def __call__(self, prompts: Sequence[str], negatives: Sequence[str], scale: float):
        """``(c, uc)`` for the prompts and, when ``scale != 1``, the negative prompts (else ``uc`` None)."""
        self.extra = {}
        texts = self._activate(list(prompts) + list(negatives))
        prompts, negatives = texts[:len(prompts)], texts[len(prompts):]
        use_uc = scale != 1.0
        if not use_uc and any(negatives):
            log.warning("the negative prompt has no effect with guidance scale 1")
        if not self.windowed():
            self._warn_truncated(list(prompts) + [n for n in negatives if n])
            c = self.model.get_learned_conditioning(list(prompts))
            return c, (self.model.get_learned_conditioning(list(negatives)) if use_uc else None)
        from ldm.prompts.windows import encode_prompts

        cw = [self.windows(p) for p in prompts]
        uw = [self.windows(n) for n in negatives] if use_uc else []
        used = list(dict.fromkeys(name for w in cw + uw for name in w.embeddings))
        self.extra["TI hashes"] = ", ".join(f"{n}: {self.embeddings.embeddings[n].hash}" for n in used) or None
        n = max(len(w) for w in cw + uw)
        if n > 1:
            log.info("long prompt: %d windows of 75 tokens", n)
        encoder = self.model.cond_stage_model
        c = encode_prompts(encoder, cw, n)
        return c, (encode_prompts(encoder, uw, n) if use_uc else None)

    def windows(self, text: str):
        """The :class:`~ldm.prompts.windows.PromptWindows` of one prompt (LoRA tags already removed)."""
        from ldm.prompts.windows import build_windows

        encoder = self.model.cond_stage_model
        library = self.embeddings.index(encoder.tokenizer) if len(self.embeddings) else None
        dim = None
        if library is not None:  # the encoder's width, for the embeddings' check
            dim = encoder.embed_tokens(torch.tensor([[encoder.tokenizer.bos_token_id]])).shape[-1]
        return build_windows(encoder.tokenizer, parse_prompt(text, self.syntax), library, dim)

    def _warn_truncated(self, texts: Sequence[str]) -> None:
        encoder = self.model.cond_stage_model
        tokenize = getattr(encoder, "tokenize", None)
        new = [t for t in dict.fromkeys(texts) if t not in self._warned]
        if not callable(tokenize) or not new:
            return
        self._warned.update(new)
        dropped = getattr(tokenize(list(new)), "dropped", None) or []
        limit = getattr(encoder, "max_length", 77)
        for text, cut in zip(new, dropped):
            if cut:
                log.warning("prompt longer than %d tokens, these words are ignored: %r (prompt: %r)", limit, cut,
                            text if len(text) <= 80 else text[:77] + "...")
