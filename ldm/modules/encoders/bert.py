"""The BERT-style text encoder of the LDM text-to-image models (``BERTEmbedder``).

The reference builds it from its vendored x-transformers (``ldm/modules/x_transformer.py``):
``TransformerWrapper(num_tokens, max_seq_len, attn_layers=Encoder(dim, depth))``. Only what those
models use is written here, with the reference's module names so that the checkpoint keys
(``cond_stage_model.transformer.*``) load unchanged:

* ``token_emb`` (``Embedding [vocab, dim]``) plus learned absolute positions
  ``pos_emb.emb`` (``Embedding [max_seq_len, dim]``, positions ``0..n-1``);
* ``attn_layers.layers.{2i}`` = ``[LayerNorm, Attention]`` and ``{2i+1}`` = ``[LayerNorm,
  FeedForward]`` for layer ``i``, each pre-norm with a residual: ``x = block(norm(x)) + x``;
  attention has 8 heads of 64 (inner width 512 whatever ``dim`` is), bias-free ``to_q/to_k/to_v``,
  ``to_out`` with bias, ``softmax(q kᵀ / 8) v`` and **no padding mask** (every position, ``[PAD]``
  included, attends to all ``max_seq_len`` positions, so the output depends on padding to 77);
  the feed-forward is ``net.0.0`` Linear(dim, 4 dim), exact GELU, ``net.2`` Linear(4 dim, dim);
* a final ``norm`` (LayerNorm, eps 1e-5); ``to_logits`` exists in the checkpoints but is unused
  for conditioning (``return_embeddings=True``).

Dropout layers of the reference are identities at inference and have no parameters; they are
left out. Tokens come from :class:`ldm.modules.encoders.wordpiece.WordPieceTokenizer` (the
bert-base-uncased vocabulary the user supplies, see :func:`~ldm.modules.encoders.wordpiece.find_bert_vocab`).
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ldm.errors import UserInputError
from ldm.ops import Linear, attention
from ldm.modules.encoders.wordpiece import WordPieceTokenizer, find_bert_vocab

__all__ = ["AbsolutePositionalEmbedding", "Attention", "FeedForward", "Encoder", "TransformerWrapper",
           "BERTTokenizer", "BERTEmbedder", "TransformerEmbedder"]


class AbsolutePositionalEmbedding(nn.Module):
    """Learned positions: ``emb(arange(n))[None]`` for a sequence of length ``n``."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(torch.arange(x.shape[1], device=x.device))[None]


class Attention(nn.Module):
    """x-transformers self-attention: ``heads`` x ``dim_head``, no mask, no bias on q/k/v."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q = Linear(dim, inner, bias=False)
        self.to_k = Linear(dim, inner, bias=False)
        self.to_v = Linear(dim, inner, bias=False)
        self.to_out = Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        out = attention(q, k, v, self.scale)                                    # [B, heads, n, dim_head]
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """``Linear(dim, mult·dim)``, exact GELU, ``Linear(mult·dim, dim)`` as ``net.0.0`` / ``net.2``."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(Linear(dim, dim * mult), nn.GELU()), nn.Identity(),
                                 Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Encoder(nn.Module):
    """``depth`` pre-norm layers of self-attention then feed-forward (``layers.{2i}``, ``{2i+1}``).

    :param dim: model width; ``heads``/``dim_head``: attention shape (8 x 64 in every LDM config).
    """

    def __init__(self, dim: int, depth: int, heads: int = 8, dim_head: int = 64, ff_mult: int = 4):
        super().__init__()
        self.dim, self.depth = dim, depth
        blocks = []
        for _ in range(depth):
            blocks.append(nn.ModuleList([nn.LayerNorm(dim), Attention(dim, heads, dim_head)]))
            blocks.append(nn.ModuleList([nn.LayerNorm(dim), FeedForward(dim, ff_mult)]))
        self.layers = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, return_hiddens: bool = False):
        """:param x: ``[B, n, dim]``. :returns: ``[B, n, dim]`` (and, with ``return_hiddens``, the
        input of every attention layer)."""
        hiddens = []
        for norm, block in self.layers:
            if isinstance(block, Attention):
                hiddens.append(x)
            x = block(norm(x)) + x
        return (x, hiddens) if return_hiddens else x


class TransformerWrapper(nn.Module):
    """Token and position embeddings, the :class:`Encoder`, the final ``norm`` and ``to_logits``.

    :param num_tokens: vocabulary size; ``max_seq_len``: number of learned positions.
    """

    def __init__(self, *, num_tokens: int, max_seq_len: int, attn_layers: Encoder, emb_dropout: float = 0.0):
        super().__init__()
        dim = attn_layers.dim
        self.num_tokens, self.max_seq_len = num_tokens, max_seq_len
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = AbsolutePositionalEmbedding(dim, max_seq_len)
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.attn_layers = attn_layers
        self.norm = nn.LayerNorm(dim)
        self.to_logits = Linear(dim, num_tokens)

    def forward(self, x: torch.Tensor, return_embeddings: bool = False) -> torch.Tensor:
        """:param x: token ids ``[B, n]`` (``n <= max_seq_len``). :returns: ``[B, n, dim]`` features
        after the final norm (``return_embeddings``) or ``[B, n, num_tokens]`` logits."""
        if x.shape[1] > self.max_seq_len:
            raise ValueError(f"{x.shape[1]} tokens but the encoder has {self.max_seq_len} positions")
        x = self.token_emb(x)
        x = self.emb_dropout(x + self.pos_emb(x))
        x = self.norm(self.attn_layers(x))
        return x if return_embeddings else self.to_logits(x)


class BERTTokenizer(nn.Module):
    """The reference's tokenizer module: prompts -> ``[B, max_length]`` bert-base-uncased ids.

    :param vocab_file: the bert-base-uncased ``vocab.txt``; None looks where
        :func:`~ldm.modules.encoders.wordpiece.find_bert_vocab` does, when first needed (so a model
        can be built, e.g. on ``meta``, without the file).
    :param vq_interface: ``encode`` returns ``(None, None, [None, None, tokens])`` as the reference.
    :param device: accepted for config compatibility; ids are returned on the CPU.
    """

    def __init__(self, device: Any = None, vq_interface: bool = True, max_length: int = 77,
                 vocab_file: Union[str, os.PathLike, None] = None):
        super().__init__()
        self.vq_interface, self.max_length, self.vocab_file = vq_interface, max_length, vocab_file
        self._tokenizer: Optional[WordPieceTokenizer] = None

    @property
    def tokenizer(self) -> WordPieceTokenizer:
        if self._tokenizer is None:
            self._tokenizer = WordPieceTokenizer(find_bert_vocab(self.vocab_file), self.max_length)
        return self._tokenizer

    def forward(self, text: Union[str, Sequence[str]]) -> torch.Tensor:
        return self.tokenizer(text).input_ids

    @torch.no_grad()
    def encode(self, text):
        tokens = self(text)
        return (None, None, [None, None, tokens]) if self.vq_interface else tokens

    def decode(self, text):
        return text


class TransformerEmbedder(nn.Module):
    """The reference's ``TransformerEmbedder``: token ids ``[B, n]`` -> ``[B, n, n_embed]`` (no tokenizer)."""

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int, max_seq_len: int = 77, device: Any = None):
        super().__init__()
        self.transformer = TransformerWrapper(num_tokens=vocab_size, max_seq_len=max_seq_len,
                                              attn_layers=Encoder(dim=n_embed, depth=n_layer))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.transformer(tokens.to(self.transformer.token_emb.weight.device), return_embeddings=True)

    def encode(self, x):
        return self(x)


class BERTEmbedder(TransformerEmbedder):
    """The LDM text encoder: prompts -> bert-base-uncased ids -> ``[B, max_seq_len, n_embed]``.

    :param n_embed, n_layer: width and depth (1280 x 32 for text2img-large, 640 x 32 for text2img256).
    :param vocab_size, max_seq_len: 30522 and 77 for bert-base-uncased prompts.
    :param device: accepted for config compatibility (ids go to the device of the weights).
    :param use_tokenizer: False: the input is already a ``[B, max_seq_len]`` id tensor (layout2img).
    :param embedding_dropout: training only.
    :param vocab_file: the bert-base-uncased ``vocab.txt`` (see :class:`BERTTokenizer`).
    """

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int = 30522, max_seq_len: int = 77,
                 device: Any = None, use_tokenizer: bool = True, embedding_dropout: float = 0.0,
                 vocab_file: Union[str, os.PathLike, None] = None):
        nn.Module.__init__(self)
        self.use_tknz_fn = use_tokenizer
        self.max_length = max_seq_len
        if use_tokenizer:
            self.tknz_fn = BERTTokenizer(vq_interface=False, max_length=max_seq_len, vocab_file=vocab_file)
        self.transformer = TransformerWrapper(num_tokens=vocab_size, max_seq_len=max_seq_len,
                                              attn_layers=Encoder(dim=n_embed, depth=n_layer),
                                              emb_dropout=embedding_dropout)

    @property
    def device(self) -> torch.device:
        return self.transformer.token_emb.weight.device

    def tokenize(self, text: Union[str, Sequence[str]]):
        """:class:`~ldm.modules.encoders.tokenizer.TokenizedBatch` of the prompts (ids, lengths and
        what truncation dropped, for the pipeline's warning)."""
        tokenizer = self.tknz_fn.tokenizer
        if len(tokenizer) > self.transformer.num_tokens:
            raise UserInputError(f"the BERT vocabulary {tokenizer.path} has {len(tokenizer)} tokens, more than the "
                                 f"model's {self.transformer.num_tokens}; pass the bert-base-uncased vocab.txt "
                                 "with --bert_vocab PATH")
        return tokenizer(text)

    def forward(self, text) -> torch.Tensor:
        tokens = self.tokenize(text).input_ids if self.use_tknz_fn else text
        return super().forward(tokens)
