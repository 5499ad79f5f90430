"""First-stage autoencoders: the KL-regularised VAE of Stable Diffusion (``AutoencoderKL``), the
vector-quantised one of the LDM inpainting model (``VQModel`` / ``VQModelInterface``) and the
pass-through ``IdentityFirstStage``.

These are plain ``nn.Module``s holding the inference path. Their state_dict keys are exactly the
reference's (``encoder.*``, ``decoder.*``, ``quantize.embedding.weight``, ``quant_conv.*``,
``post_quant_conv.*``), i.e. the ``first_stage_model.*`` keys of a full checkpoint with that prefix
stripped. Training (Lightning steps, optimisers, the LPIPS/discriminator loss) is not here yet:
the loss named by ``lossconfig`` is only built by :meth:`init_loss`, so inference never needs it.

Large images: :meth:`AutoencoderKL.decode_tiled` / :meth:`AutoencoderKL.encode_tiled` run the VAE
on overlapping latent tiles blended with linear ramps, so memory stays bounded (a 2048x2048 decode
fits in a few GB). They are approximations: GroupNorm statistics differ per tile.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution, Generator
from ldm.modules.vqvae.quantize import VectorQuantizer2 as VectorQuantizer
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


class _FirstStageMixin:
    """What the KL and VQ first stages share: deferred loss construction and checkpoint hook."""

    lossconfig: Mapping[str, Any] | None

    def init_loss(self) -> nn.Module:
        """Build the training loss named by ``lossconfig`` and register it as ``self.loss``.

        Deferred from ``__init__`` because inference never uses it (the LDM configs name
        ``torch.nn.Identity`` or ``DummyLoss``; the autoencoder training configs name
        ``LPIPSWithDiscriminator``, which needs pretrained LPIPS weights). A loss with parameters
        adds ``loss.*`` keys to the state_dict, as in the reference's training checkpoints.
        """
        if self.lossconfig is None:
            raise ValueError(f"{type(self).__name__} was built with lossconfig=None; pass a lossconfig to train it")
        self.loss = instantiate_from_config(self.lossconfig)
        return self.loss

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = ()) -> None:
        """Load a first-stage checkpoint (keys ``encoder.*``, ``decoder.*``, ... without prefix)
        through the project's checkpoint loader, strictly: any mismatch raises ``CheckpointError``.

        :param ignore_keys: key prefixes to drop from the file first. ``loss.*`` (LPIPS and
            discriminator weights of the released autoencoder checkpoints) is dropped too unless
            :meth:`init_loss` has built a loss to receive it.
        """
        from ldm.checkpoint import load_weights_into  # lazy: the loader imports model code

        ignore = tuple(ignore_keys) + (() if "loss" in self._modules else ("loss.",))
        on_meta = any(t.is_meta for t in self.state_dict().values())
        if on_meta and not Path(path).is_file():
            # Built on meta to receive a full LDM checkpoint, which holds first_stage_model.* itself:
            # the LDM configs name a training-time file here (bsr_sr, CelebA-HQ; FFHQ and LSUN
            # bedrooms even a .yaml), usually absent. A strict load still reports missing weights.
            logger.info("first-stage checkpoint %s not found: its weights must come from the model checkpoint", path)
            return
        load_weights_into(self, path, ignore_keys=ignore, assign=on_meta)
        logger.info("Restored %s from %s", type(self).__name__, path)

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's last conv weight (the adaptive GAN weight of the training loss uses it)."""
        return self.decoder.conv_out.weight


def _check_colorize(colorize_nlabels: Any) -> None:
    if colorize_nlabels is not None and not isinstance(colorize_nlabels, int):
        raise ValueError(f"colorize_nlabels must be an int (number of segmentation labels) or None, got {colorize_nlabels!r}")


class AutoencoderKL(_FirstStageMixin, nn.Module):
    """KL-regularised autoencoder (SD's VAE, f=8, 4 latent channels).

    :param ddconfig: Encoder/Decoder arguments (``ch``, ``ch_mult``, ``z_channels``, ``double_z``
        (must be true), ...).
    :param lossconfig: training loss ``{target, params}``; stored, built only by :meth:`init_loss`.
    :param embed_dim: latent channels after ``quant_conv``.
    :param ckpt_path: a first-stage checkpoint to load strictly, see :meth:`init_from_ckpt`.
    :param image_key, monitor: training bookkeeping, stored.
    :param colorize_nlabels: registers the ``colorize`` buffer (3, n, 1, 1) of segmentation models.
    """

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any] | None,
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
    ):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (the encoder outputs mean and log-variance)")
        _check_colorize(colorize_nlabels)
        self.image_key = image_key
        self.lossconfig = lossconfig
        self.embed_dim = embed_dim
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent position along each axis (8 for SD)."""
        return self.decoder.downsample_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """:param x: (B, 3, H, W) in [-1, 1]. :return: the posterior over (B, embed_dim, H/f, W/f)."""
        moments = self.quant_conv(self.encoder(x))  # (B, 2*embed_dim, H/f, W/f)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """:param z: (B, embed_dim, h, w) unscaled latent. :return: (B, 3, h*f, w*f), roughly [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, input: torch.Tensor, sample_posterior: bool = True, generator: Generator = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct ``input`` through a posterior sample (or its mode). :return: (dec, posterior)."""
        posterior = self.encode(input)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    # -- tiled inference for large images -------------------------------------------------------

    def decode_tiled(self, z: torch.Tensor, tile_latent: int = 64, overlap: int = 16) -> torch.Tensor:
        """Decode a large latent tile by tile.

        Overlapping ``tile_latent`` x ``tile_latent`` latent tiles (the fewest that overlap by at
        least ``overlap``, spread evenly over the latent) are decoded separately and
        blended in pixel space with linear ramps across every overlap, so seams fade out. Each
        tile's GroupNorm sees only its own statistics, so the result is close to, not equal to,
        :meth:`decode`; latents no larger than one tile are decoded in one piece (exact).

        :param z: (B, embed_dim, h, w) unscaled latent.
        :param tile_latent: tile side in latent positions (64 -> 512 px tiles for SD).
        :param overlap: overlap between neighbouring tiles in latent positions (< tile_latent).
        :return: (B, 3, h*f, w*f) in float32 accumulated, cast back to ``z``'s dtype.
        """
        f = self.downsample_factor
        return tiled_map(self.decode, z, tile=tile_latent, overlap=overlap, in_per_unit=1, out_per_unit=f)

    def encode_tiled(self, x: torch.Tensor, tile_latent: int = 64, overlap: int = 16) -> DiagonalGaussianDistribution:
        """Encode a large image tile by tile; the moments of overlapping tiles are blended with
        linear ramps (see :meth:`decode_tiled`; same approximation).

        :param x: (B, 3, H, W) with H, W multiples of the downsample factor f.
        :param tile_latent: tile side in latent positions (image tiles are ``tile_latent*f`` px).
        :param overlap: overlap in latent positions.
        :return: posterior over (B, embed_dim, H/f, W/f).
        """
        f = self.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"encode_tiled needs H and W divisible by {f}, got {tuple(x.shape[-2:])}; crop or pad the image")

        def moments(tile: torch.Tensor) -> torch.Tensor:
            return self.quant_conv(self.encoder(tile))

        return DiagonalGaussianDistribution(tiled_map(moments, x, tile=tile_latent, overlap=overlap, in_per_unit=f, out_per_unit=1))


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start positions of the fewest tiles of length ``tile`` that cover ``[0, size)`` with at
    least ``overlap`` shared positions between neighbours, spread evenly from 0 to ``size - tile``
    (so every overlap is about the same and only neighbours overlap when ``tile >= 2*overlap``)."""
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    # Consecutive gaps are floor/ceil of (size - tile)/(n - 1) <= tile - overlap.
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _ramp_weights(starts: list[int], tile: int, size: int, scale: int) -> list[torch.Tensor]:
    """1-D blending weight of each tile in output units (``scale`` outputs per unit): 1 inside,
    rising linearly over the overlap with the previous tile and falling over the overlap with the
    next one, so neighbouring weights sum to 1 across each overlap."""
    ends = [min(s + tile, size) for s in starts]
    weights = []
    for k, (s, e) in enumerate(zip(starts, ends)):
        w = torch.ones((e - s) * scale, dtype=torch.float32)
        if k > 0:
            n = (ends[k - 1] - s) * scale  # overlap with the previous tile
            w[:n] *= (torch.arange(n, dtype=torch.float32) + 0.5) / n
        if k + 1 < len(starts):
            n = (e - starts[k + 1]) * scale  # overlap with the next tile
            w[len(w) - n:] *= (n - 0.5 - torch.arange(n, dtype=torch.float32)) / n
        weights.append(w)
    return weights


def tiled_map(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    in_per_unit: int,
    out_per_unit: int,
) -> torch.Tensor:
    """Apply a spatial map ``fn`` to overlapping tiles of ``x`` and blend the outputs.

    The tile grid is laid out in "units" (latent positions): a unit is ``in_per_unit`` input and
    ``out_per_unit`` output pixels per axis (decode: 1 -> f; encode: f -> 1).

    :param fn: (B, C, th*in_per_unit, tw*in_per_unit) -> (B, C', th*out_per_unit, tw*out_per_unit).
    :param x: (B, C, H, W) with H, W multiples of ``in_per_unit``.
    :param tile: tile side in units; ``overlap``: shared units between neighbours (0 <= overlap < tile).
    :return: (B, C', H/in*out, W/in*out) with ``x``'s dtype.
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    hu, wu = x.shape[-2] // in_per_unit, x.shape[-1] // in_per_unit
    if hu <= tile and wu <= tile:
        return fn(x)
    ys, xs = _tile_starts(hu, tile, overlap), _tile_starts(wu, tile, overlap)
    wy, wx = _ramp_weights(ys, tile, hu, out_per_unit), _ramp_weights(xs, tile, wu, out_per_unit)

    out = None
    weight_sum = torch.zeros(hu * out_per_unit, wu * out_per_unit, dtype=torch.float32, device=x.device)
    for iy, y0 in enumerate(ys):
        y1 = min(y0 + tile, hu)
        for ix, x0 in enumerate(xs):
            x1 = min(x0 + tile, wu)
            piece = fn(x[..., y0 * in_per_unit:y1 * in_per_unit, x0 * in_per_unit:x1 * in_per_unit])
            if out is None:
                out = torch.zeros(
                    (*piece.shape[:-2], hu * out_per_unit, wu * out_per_unit), dtype=torch.float32, device=piece.device
                )
            w = wy[iy].to(piece.device)[:, None] * wx[ix].to(piece.device)[None, :]  # (th*out, tw*out)
            oy, ox = slice(y0 * out_per_unit, y1 * out_per_unit), slice(x0 * out_per_unit, x1 * out_per_unit)
            out[..., oy, ox] += piece.float() * w
            weight_sum[oy, ox] += w
    return (out / weight_sum).to(x.dtype)


class VQModel(_FirstStageMixin, nn.Module):
    """Vector-quantised autoencoder (taming's VQGAN architecture), e.g. the f=4 first stage of
    LDM inpainting_big.

    ``encode`` returns the quantised latent; see :class:`VQModelInterface` for the interface the
    diffusion model uses (encode without quantising, quantise in decode).

    :param n_embed: codebook size; ``embed_dim``: codebook vector size.
    :param use_ema: EMA of the first stage (training only): not supported yet.
    :param remap, sane_index_shape: passed to :class:`VectorQuantizer2`.
    Other parameters as :class:`AutoencoderKL`; ``batch_resize_range``, ``scheduler_config`` and
    ``lr_g_factor`` are training settings, stored.
    """

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any] | None,
        n_embed: int,
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        batch_resize_range: Sequence[int] | None = None,
        scheduler_config: Mapping[str, Any] | None = None,
        lr_g_factor: float = 1.0,
        remap: str | None = None,
        sane_index_shape: bool = False,
        use_ema: bool = False,
    ):
        super().__init__()
        if use_ema:
            raise NotImplementedError("VQModel(use_ema=True) keeps EMA weights for training; not supported yet, use use_ema: false")
        _check_colorize(colorize_nlabels)
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.image_key = image_key
        self.lossconfig = lossconfig
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25, remap=remap, sane_index_shape=sane_index_shape)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        self.batch_resize_range = batch_resize_range
        self.scheduler_config = scheduler_config
        self.lr_g_factor = lr_g_factor
        self.use_ema = use_ema
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent position along each axis (4 for VQ-f4)."""
        return self.decoder.downsample_factor

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: (B, 3, H, W). :return: (B, embed_dim, H/f, W/f) before quantisation."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor):
        """:return: ``(quant, emb_loss, (perplexity, min_encodings, indices))`` as the quantiser."""
        return self.quantize(self.encode_to_prequant(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """:param quant: (B, embed_dim, h, w) quantised latent. :return: (B, 3, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b: torch.Tensor) -> torch.Tensor:
        """Decode codebook indices (B, h, w) int64."""
        b, h, w = code_b.shape
        quant = self.quantize.get_codebook_entry(code_b.reshape(-1), (b, h, w, self.embed_dim))
        return self.decode(quant)

    def forward(self, input: torch.Tensor, return_pred_indices: bool = False):
        """Reconstruct ``input``. :return: ``(dec, emb_loss)`` or ``(dec, emb_loss, indices)``."""
        quant, diff, (_, _, ind) = self.encode(input)
        dec = self.decode(quant)
        if return_pred_indices:
            return dec, diff, ind
        return dec, diff


class VQModelInterface(VQModel):
    """The VQ first stage as the diffusion model uses it: ``encode`` stops before quantisation
    (the LDM inpainting UNet is conditioned on the continuous ``quant_conv`` output), ``decode``
    quantises to the nearest codebook entries first (unless ``force_not_quantize``)."""

    def __init__(self, embed_dim: int, *args, **kwargs):
        super().__init__(*args, embed_dim=embed_dim, **kwargs)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: (B, 3, H, W). :return: (B, embed_dim, H/f, W/f), not quantised."""
        return self.encode_to_prequant(x)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """:param h: (B, embed_dim, h, w). :return: (B, 3, h*f, w*f)."""
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))


class IdentityFirstStage(nn.Module):
    """No first stage (diffusion in pixel space): encode/decode/forward return their input.

    :param vq_interface: make ``quantize(x)`` return ``(x, None, [None, None, None])`` like a VQ model.
    """

    def __init__(self, *args, vq_interface: bool = False, **kwargs):
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x, *args, **kwargs):
        return x

    def decode(self, x, *args, **kwargs):
        return x

    def quantize(self, x, *args, **kwargs):
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x, *args, **kwargs):
        return x
