"""Training: LightningModule wrappers around the plain ``ldm`` models, the config-driven data
module, and what ``main.py`` runs (see :mod:`ldm.training.run`).

Nothing here is imported by inference code; importing this package imports pytorch_lightning.
"""
from ldm.training.data import DataModuleFromConfig, WrappedDataset
from ldm.training.modules import (AutoencoderTrainer, DiffusionTrainer, images_to_nchw, instantiate_model,
                                  latent_scale_factor, wrap_model)

__all__ = ["AutoencoderTrainer", "DiffusionTrainer", "DataModuleFromConfig", "WrappedDataset", "images_to_nchw",
           "instantiate_model", "latent_scale_factor", "wrap_model"]
