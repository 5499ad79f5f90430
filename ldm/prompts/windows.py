"""Long and weighted prompts: 75-token windows, encoded one by one and joined along the token axis.

This is what AUTOMATIC1111's web UI (``sd_hijack_clip``) and stable-diffusion.cpp do with prompts
longer than CLIP's 77 positions. A prompt's runs (:mod:`ldm.prompts.parser`) are tokenized run by
run; tokens fill windows of 75, each framed as ``[BOS] + 75 tokens + [EOS]`` (the rest of a short
window padded with EOS, then, for a tokenizer that pads with another id such as open_clip's 0,
everything after the first EOS with that id); ``BREAK`` closes a window early; a window that fills
up within 20 tokens after a comma moves the words after the comma to the next window (A1111's
``comma_padding_backtrack``); a textual-inversion embedding never straddles two windows. Each
window goes through the text encoder alone, so the result is ``[B, 77 * n_windows, D]``; prompts
of one batch, and ``c`` and ``uc``, are padded to the same number of windows with the windows of
the empty prompt (as A1111 pads them).

Weights (A1111's "original" emphasis), per window: ``z *= w`` per token, then
``z *= mean(z_before) / mean(z_after)`` so the overall mean is kept. A1111 takes the two means over
the whole batch of one window; here they are taken per prompt, so an image does not depend on the
other prompts of its batch (the same numbers as A1111 for a batch of one prompt). A window whose
weights are all 1 is left untouched, so ``(word:1.0)`` gives exactly the features of ``word``.

The encoder side is a small protocol (:class:`WindowEncoder`): a ``tokenizer`` with
``encode(text) -> ids`` and the special ids, ``embed_tokens(ids)`` and ``encode_tokens(ids,
token_embeds)``; ``FrozenCLIPEmbedder`` and ``FrozenOpenCLIPEmbedder`` implement it, and a
conditioner with several encoders (SDXL) can build the windows once and encode them with each.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Protocol, Sequence

import torch

from ldm.prompts.parser import BREAK, Run

if TYPE_CHECKING:
    from ldm.personalize.embeddings import EmbeddingLibrary

__all__ = ["WINDOW", "COMMA_BACKTRACK", "WindowEncoder", "Window", "PromptWindows", "build_windows",
           "pad_windows", "encode_windows", "encode_prompts", "apply_weights"]

WINDOW = 75  # tokens per window between BOS and EOS
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
COMMA = ",</w>"


class WindowEncoder(Protocol):
    """What :func:`encode_prompts` needs of a text encoder."""

    tokenizer: "object"  # ldm.modules.encoders.tokenizer.CLIPTokenizer: encode(), bos/eos/pad_token_id, encoder

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def encode_tokens(self, input_ids: torch.Tensor, token_embeds: Optional[torch.Tensor] = None) -> torch.Tensor: ...


@dataclass
class Window:
    """One window before framing: up to 75 token ids, their weights, and textual-inversion vectors
    ``(offset, [n, D] tensor)`` replacing the placeholder ids from ``offset`` on."""

    tokens: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    fixes: list = field(default_factory=list)


@dataclass
class PromptWindows:
    """A prompt as windows: ``ids``/``weights`` ``[n, 77]`` framed and padded; ``fixes`` per window;
    ``embeddings`` the names of the textual-inversion embeddings it used; ``n_tokens`` its real tokens."""

    ids: torch.Tensor
    weights: torch.Tensor
    fixes: list
    embeddings: list
    n_tokens: int

    def __len__(self) -> int:
        return self.ids.shape[0]


def build_windows(tokenizer, runs: Sequence[Run], embeddings: "Optional[EmbeddingLibrary]" = None,
                  dim: Optional[int] = None) -> PromptWindows:
    """Cut a parsed prompt into framed 77-token windows (A1111's ``tokenize_line``).

    :param tokenizer: a ``CLIPTokenizer`` (any dialect).
    :param embeddings: textual-inversion embeddings found by their names' tokens, or None.
    :param dim: the encoder's width, checked against each embedding used.
    """
    comma = tokenizer.encoder.get(COMMA)
    windows: list[Window] = []
    window = Window()
    last_comma = -1
    used: list[str] = []
    n_tokens = 0

    def close() -> None:
        nonlocal window, last_comma
        windows.append(window)
        window, last_comma = Window(), -1

    for run in runs:
        if run is BREAK:
            close()
            continue
        tokens = tokenizer.encode(run.text)
        n_tokens += len(tokens)
        pos = 0
        while pos < len(tokens):
            token = tokens[pos]
            if token == comma:
                last_comma = len(window.tokens)
            elif len(window.tokens) == WINDOW and last_comma != -1 and WINDOW - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1  # the words after the last comma move to the next window
                moved = Window(window.tokens[cut:], window.weights[cut:],
                               [(o - cut, v) for o, v in window.fixes if o >= cut])
                window.tokens, window.weights = window.tokens[:cut], window.weights[:cut]
                window.fixes = [(o, v) for o, v in window.fixes if o < cut]
                close()
                window = moved
            if len(window.tokens) == WINDOW:
                close()
            found = embeddings.find_at(tokens, pos) if embeddings is not None else None
            if found is None:
                window.tokens.append(token)
                window.weights.append(run.weight)
                pos += 1
                continue
            embedding, name_length = found
            vectors = embedding.vectors_for(dim)
            if len(window.tokens) + len(vectors) > WINDOW:
                close()
            window.fixes.append((len(window.tokens), vectors))
            window.tokens += [0] * len(vectors)
            window.weights += [run.weight] * len(vectors)
            used.append(embedding.name)
            pos += name_length
    if window.tokens or not windows:
        close()
    return _frame(tokenizer, windows, list(dict.fromkeys(used)), n_tokens)


def _frame(tokenizer, windows: list[Window], used: list, n_tokens: int) -> PromptWindows:
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, weights = [], []
    for w in windows:
        fill = WINDOW - len(w.tokens)
        row = [bos, *w.tokens, eos, *[eos] * fill]
        if pad != eos:  # open_clip pads after the first EOS with its own id
            row = row[:len(w.tokens) + 2] + [pad] * fill
        ids.append(row)
        weights.append([1.0, *w.weights, 1.0, *[1.0] * fill])
    return PromptWindows(torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32),
                         [w.fixes for w in windows], used, n_tokens)


def pad_windows(prompt: PromptWindows, n: int, empty: PromptWindows) -> PromptWindows:
    """``prompt`` with windows of the empty prompt appended up to ``n`` windows."""
    extra = n - len(prompt)
    if extra <= 0:
        return prompt
    return PromptWindows(torch.cat([prompt.ids, empty.ids.repeat(extra, 1)]),
                         torch.cat([prompt.weights, empty.weights.repeat(extra, 1)]),
                         prompt.fixes + [[] for _ in range(extra)], prompt.embeddings, prompt.n_tokens)


def apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's emphasis on one window: ``z * w`` with the mean of ``z`` restored.

    :param z: ``[L, D]`` features of one window; :param weights: ``[L]``.
    """
    if bool((weights == 1).all()):
        return z
    original_mean = z.mean()
    z = z * weights.to(z.dtype)[:, None]
    return z * (original_mean / z.mean())


def encode_windows(encoder: WindowEncoder, prompts: Sequence[PromptWindows]) -> torch.Tensor:
    """Encode prompts of the same window count: ``[B, 77 * n, D]``.

    All windows of all prompts run through the encoder as one batch; textual-inversion vectors
    replace the token embeddings of their placeholders (A1111's ``EmbeddingsWithFixes``: after BOS).
    """
    ids = torch.cat([p.ids for p in prompts])                                 # [B * n, 77]
    token_embeds = None
    if any(fix for p in prompts for fixes in p.fixes for fix in fixes):
        token_embeds = encoder.embed_tokens(ids).clone()                      # [B * n, 77, D]
        row = 0
        for p in prompts:
            for fixes in p.fixes:
                for offset, vectors in fixes:
                    token_embeds[row, 1 + offset:1 + offset + len(vectors)] = vectors.to(token_embeds)
                row += 1
    z = encoder.encode_tokens(ids, token_embeds)                              # [B * n, 77, D]
    weights = torch.cat([p.weights for p in prompts]).to(z.device)
    z = torch.stack([apply_weights(z[i], weights[i]) for i in range(z.shape[0])])
    n = len(prompts[0])
    return z.reshape(len(prompts), n * z.shape[1], z.shape[2])


def encode_prompts(encoder: WindowEncoder, prompts: Sequence[PromptWindows], n_windows: int = 0,
                   empty: Optional[PromptWindows] = None) -> torch.Tensor:
    """Pad ``prompts`` to a common window count (at least ``n_windows``) and encode them.

    :param empty: the windows of ``""`` (made from the encoder's tokenizer when None).
    """
    n = max([n_windows, *(len(p) for p in prompts)])
    if any(len(p) < n for p in prompts):
        empty = empty if empty is not None else build_windows(encoder.tokenizer, [Run("", 1.0)])
        prompts = [pad_windows(p, n, empty) for p in prompts]
    return encode_windows(encoder, prompts)
