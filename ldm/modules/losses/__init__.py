"""First-stage training losses (``ldm.modules.losses.LPIPSWithDiscriminator`` is the name the
autoencoder configs use)."""
from ldm.modules.losses.contperceptual import DummyLoss, LPIPSWithDiscriminator

__all__ = ["DummyLoss", "LPIPSWithDiscriminator"]
