"""First-stage training losses.

Only what configs name for inference exists yet:

- ``DummyLoss``: the parameter-free placeholder named by the LDM inpainting_big config's
  ``lossconfig`` (in the reference it is taming's ``DummyLoss``, reached through a star import).
- ``LPIPSWithDiscriminator``: named by the autoencoder training configs; it needs LPIPS weights
  and a PatchGAN discriminator and comes with the training task. Until then constructing it
  raises ``NotImplementedError``. The first-stage models only build their loss when training asks
  for it (``init_loss()``), so configs naming it still build for inference.
"""
from __future__ import annotations

from torch import nn


class DummyLoss(nn.Module):
    """A loss module with no parameters and no computation (placeholder for frozen first stages)."""

    def __init__(self, *args, **kwargs):
        super().__init__()


class LPIPSWithDiscriminator(nn.Module):
    """KL-autoencoder training loss (reconstruction + LPIPS + KL + PatchGAN). Not implemented yet."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        raise NotImplementedError(
            "LPIPSWithDiscriminator (autoencoder training loss) is not implemented yet; it is only "
            "needed to train a first stage. For inference, build the model without calling init_loss()."
        )
