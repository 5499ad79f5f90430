"""A training loss for ``AutoencoderKL`` that needs no downloaded network.

The reference trains its KL autoencoders with ``LPIPSWithDiscriminator``: pixel L1 + LPIPS
(perceptual distance through a pretrained VGG16, whose weights are downloaded) + KL + a PatchGAN
adversarial term. :class:`ReconstructionKLLoss` keeps the reconstruction and KL parts, with the
reference's normalisation, and drops LPIPS and the discriminator:

    loss = sum_pixels(l1_weight·|x − x̂| + l2_weight·(x − x̂)²) / B  +  kl_weight · sum(KL) / B

where ``KL`` is ``KL(q(z|x) || N(0, I))`` summed over the latent (``posterior.kl()``), and B is the
batch size. The reference divides a per-pixel NLL by ``exp(logvar)`` with a ``logvar`` parameter
that its optimiser never updates (it stays at ``logvar_init = 0``), so that factor is 1 and is
left out here; the module has no parameters and adds no ``loss.*`` keys to a checkpoint.

Without the perceptual and adversarial terms reconstructions are somewhat blurrier than the
reference's; for flat-coloured images (the demo's shapes dataset) that does not matter.
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.errors import UserInputError
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

__all__ = ["ReconstructionKLLoss"]


class ReconstructionKLLoss(nn.Module):
    """Pixel reconstruction (L1, optionally + L2) plus a weighted KL term.

    :param kl_weight: weight of the summed KL (the reference's kl-f8 configs use 1e-6).
    :param l1_weight: weight of the per-pixel absolute error.
    :param l2_weight: weight of the per-pixel squared error (0 in the reference).
    """

    def __init__(self, kl_weight: float = 1.0e-6, l1_weight: float = 1.0, l2_weight: float = 0.0):
        super().__init__()
        for name, value in (("kl_weight", kl_weight), ("l1_weight", l1_weight), ("l2_weight", l2_weight)):
            if value < 0:
                raise UserInputError(f"{name} must be >= 0, got {value}")
        if l1_weight == 0 and l2_weight == 0:
            raise UserInputError("l1_weight and l2_weight are both 0; give the reconstruction term a weight")
        self.kl_weight = float(kl_weight)
        self.l1_weight = float(l1_weight)
        self.l2_weight = float(l2_weight)

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                posteriors: DiagonalGaussianDistribution, split: str = "train"):
        """:param inputs: images (B, 3, H, W) in [-1, 1].
        :param reconstructions: decoder output, same shape.
        :param posteriors: the encoder's posterior over (B, C, h, w).
        :param split: prefix of the logged names (``train`` / ``val``).
        :return: ``(loss, logs)``; logs hold detached scalars ``{split}/total_loss``, ``rec_loss``
            (mean absolute error per pixel, the reference's monitored value), ``l2_loss`` (mean
            squared error per pixel), ``nll_loss`` (the weighted reconstruction sum per image) and
            ``kl_loss`` (summed KL per image).
        """
        if inputs.shape != reconstructions.shape:
            raise ValueError(f"inputs {tuple(inputs.shape)} and reconstructions {tuple(reconstructions.shape)} differ")
        batch = inputs.shape[0]
        diff = inputs.float() - reconstructions.float()
        abs_err, sq_err = diff.abs(), diff.square()
        per_pixel = self.l1_weight * abs_err
        if self.l2_weight:
            per_pixel = per_pixel + self.l2_weight * sq_err
        nll = per_pixel.sum() / batch
        kl = posteriors.kl().sum() / batch
        loss = nll + self.kl_weight * kl
        logs = {
            f"{split}/total_loss": loss.detach(),
            f"{split}/rec_loss": abs_err.mean().detach(),
            f"{split}/l2_loss": sq_err.mean().detach(),
            f"{split}/nll_loss": nll.detach(),
            f"{split}/kl_loss": kl.detach(),
        }
        return loss, logs
