"""Vector quantisation bottleneck of the VQ first stages (taming-transformers' ``VectorQuantizer2``).

The reference imports it from ``taming.modules.vqvae.quantize``; it lives here so the project
does not need taming. Same constructor, same ``embedding`` parameter (checkpoint key
``quantize.embedding.weight``), same return values.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)


class VectorQuantizer2(nn.Module):
    """Replace each latent vector by its nearest codebook entry (squared Euclidean distance).

    :param n_e: codebook size.
    :param e_dim: vector size (= latent channels).
    :param beta: commitment weight of the training loss.
    :param remap: optional ``.npy`` file of the codebook indices in use; indices are then reported
        in the reduced index space (training/analysis feature of the reference).
    :param unknown_index: with ``remap``: ``"random"``, ``"extra"`` or an int, the index reported for
        codes missing from the ``remap`` list.
    :param sane_index_shape: return indices shaped (B, h, w) instead of (B*h*w,).
    :param legacy: keep the reference's original (swapped) placement of ``beta`` in the loss:
        ``loss = |sg(z_q) - z|^2 + beta |z_q - sg(z)|^2``; ``legacy=False`` puts ``beta`` on the
        commitment term instead.
    """

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        beta: float,
        remap: str | None = None,
        unknown_index: str | int = "random",
        sane_index_shape: bool = False,
        legacy: bool = True,
    ):
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy

        self.embedding = nn.Embedding(n_e, e_dim)
        if self.embedding.weight.device.type != "meta":
            with torch.no_grad():
                self.embedding.weight.uniform_(-1.0 / n_e, 1.0 / n_e)

        self.remap = remap
        if remap is not None:
            self.register_buffer("used", torch.tensor(np.load(remap)))
            self.re_embed = self.used.shape[0]
            self.unknown_index = unknown_index
            if unknown_index == "extra":
                self.unknown_index = self.re_embed
                self.re_embed += 1
            logger.info("Remapping %d indices to %d indices; unknown codes -> %s", n_e, self.re_embed, self.unknown_index)
        else:
            self.re_embed = n_e
        self.sane_index_shape = sane_index_shape

    def remap_to_used(self, inds: torch.Tensor) -> torch.Tensor:
        """Full codebook indices (B, N) -> positions in ``self.used`` (unknown codes per ``unknown_index``)."""
        ishape = inds.shape
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        match = (inds[:, :, None] == used[None, None, ...]).long()
        new = match.argmax(-1)
        unknown = match.sum(2) < 1
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, size=new[unknown].shape, device=new.device)
        else:
            new[unknown] = self.unknown_index
        return new.reshape(ishape)

    def unmap_to_all(self, inds: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`remap_to_used` (the "extra" index maps to code 0)."""
        ishape = inds.shape
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        if self.re_embed > self.used.shape[0]:
            inds = inds.masked_fill(inds >= self.used.shape[0], 0)
        back = used[inds]
        return back.reshape(ishape)

    def codebook_indices(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Nearest codebook entry of each row of ``z_flat`` (N, e_dim) -> (N,) int64.

        Squared distance expanded as ``|z|^2 + |e|^2 - 2 z.e`` (as the reference), argmin over codes
        (ties -> lowest index).
        """
        weight = self.embedding.weight
        d = z_flat.pow(2).sum(dim=1, keepdim=True) + weight.pow(2).sum(dim=1) - 2.0 * (z_flat @ weight.t())  # (N, n_e)
        return torch.argmin(d, dim=1)

    def forward(self, z: torch.Tensor, temp=None, rescale_logits: bool = False, return_logits: bool = False):
        """Quantise ``z`` (B, e_dim, h, w).

        :return: ``(z_q, loss, (perplexity, min_encodings, min_encoding_indices))``: ``z_q``
            (B, e_dim, h, w) with straight-through gradients; ``loss`` the codebook + commitment
            loss (scalar); ``perplexity`` and ``min_encodings`` are None (as in the reference);
            indices (B*h*w,) in (b, h, w) order, or (B, h, w) with ``sane_index_shape``.
        """
        if temp not in (None, 1.0) or rescale_logits or return_logits:
            raise ValueError("temp, rescale_logits and return_logits only exist for interface compatibility with GumbelQuantize")
        b, c, h, w = z.shape
        if c != self.e_dim:
            raise ValueError(f"latent has {c} channels but the codebook vectors have e_dim={self.e_dim}")
        z = z.permute(0, 2, 3, 1).contiguous()  # (B, h, w, e_dim)
        min_encoding_indices = self.codebook_indices(z.view(-1, self.e_dim))  # (B*h*w,)
        z_q = self.embedding(min_encoding_indices).view(z.shape)

        if self.legacy:
            loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        else:
            loss = self.beta * torch.mean((z_q.detach() - z) ** 2) + torch.mean((z_q - z.detach()) ** 2)

        z_q = z + (z_q - z).detach()  # straight-through estimator
        z_q = z_q.permute(0, 3, 1, 2).contiguous()  # (B, e_dim, h, w)

        if self.remap is not None:
            min_encoding_indices = self.remap_to_used(min_encoding_indices.reshape(b, -1)).reshape(-1, 1)
        if self.sane_index_shape:
            min_encoding_indices = min_encoding_indices.reshape(b, h, w)
        return z_q, loss, (None, None, min_encoding_indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, int, int, int] | None) -> torch.Tensor:
        """Codebook vectors of ``indices``.

        :param indices: int64 (B*h*w,) (or anything reshapeable to it).
        :param shape: ``(B, h, w, e_dim)`` to return (B, e_dim, h, w); None returns (N, e_dim).
        """
        if self.remap is not None:
            indices = self.unmap_to_all(indices.reshape(shape[0], -1)).reshape(-1)
        z_q = self.embedding(indices.reshape(-1))
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q
