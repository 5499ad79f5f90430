"""``sgm.models.autoencoder.AutoencoderKL``: the one VAE (:class:`ldm.models.autoencoder.AutoencoderKL`,
the same keys as SD's ``first_stage_model.*``) with sgm's constructor.

Difference kept from ldm: ``encode`` returns the posterior (a ``DiagonalGaussianDistribution``),
so that callers draw its sample with their own generator; sgm's ``encode`` returned a sample.
``attn_type: vanilla-xformers`` is the same attention as ``vanilla`` here.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from ldm.models.autoencoder import AutoencoderKL as _AutoencoderKL

__all__ = ["AutoencoderKL", "AutoencoderKLInferenceWrapper"]


class AutoencoderKL(_AutoencoderKL):
    def __init__(self, embed_dim: int, ddconfig: Mapping[str, Any], lossconfig: Optional[Mapping[str, Any]] = None,
                 ckpt_path: Optional[str] = None, ignore_keys=(), monitor: Optional[str] = None,
                 input_key: str = "jpg", **training_options: Any):
        super().__init__(dict(ddconfig), lossconfig, embed_dim, ckpt_path=ckpt_path, ignore_keys=ignore_keys,
                         monitor=monitor)
        self.input_key = input_key
        self.training_options = training_options  # regularizer/optimizer settings of sgm's trainer; unused


AutoencoderKLInferenceWrapper = AutoencoderKL
