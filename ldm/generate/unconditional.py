"""Unconditional sampling (CelebA-HQ, FFHQ, LSUN LDMs): the method behind ``scripts/sample_diffusion.py``."""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import torch

from ldm.errors import UserInputError
from ldm.generate.batching import PaddedPerImageModel
from ldm.generate.inputs import generators_for
from ldm.generate.records import GenerationResult

__all__ = ["UnconditionalMixin", "VANILLA"]

log = logging.getLogger(__name__)

#: The sampler name recorded for ``vanilla=True`` (DDPM ancestral over every timestep).
VANILLA = "DDPM"


class UnconditionalMixin:
    """The ``sample_diffusion`` method of :class:`ldm.generate.StableDiffusion`."""

    @property
    def latent_size(self) -> int:
        """Side of the square latent the model was trained at (the UNet's ``image_size``)."""
        return int(self.model.model.diffusion_model.image_size)

    @torch.no_grad()
    def sample_diffusion(self, seeds: Union[int, Sequence[int]] = 42, *, n: Optional[int] = None,
                         steps: Optional[int] = None, eta: Optional[float] = 1.0, sampler: Optional[str] = None,
                         vanilla: bool = False) -> GenerationResult:
        """Images from noise alone, as the reference's ``scripts/sample_diffusion.py``.

        Latents ``[C, image_size, image_size]`` (the UNet's ``in_channels`` and ``image_size``),
        sampled inside ``model.ema_scope()`` (the EMA weights of models trained with them), then
        decoded (a VQ first stage quantises on decode). The reference drew every image of a batch
        from the global generator; here image ``k`` has its own seed (``seeds[k]``), so it does not
        depend on the batch it was made in.

        :param seeds: one seed (image ``k`` gets ``seed + k``) or one per image.
        :param n: number of images (default: one per seed; 1 for a single seed).
        :param steps: DDIM steps (the reference's ``-c``, default 50).
        :param eta: DDIM eta, default 1.0 as the reference's ``-e``.
        :param sampler: any registry sampler (default DDIM); ``eta`` must suit it.
        :param vanilla: DDPM ancestral sampling over all timesteps (``-v``); ``steps``, ``eta``
            and ``sampler`` are then not used.
        :returns: :class:`GenerationResult`, square RGB images of ``image_size · f`` pixels.
        """
        self._require("sample_diffusion")
        if isinstance(seeds, int):
            seeds = [seeds + k for k in range(1 if n is None else n)]
        seeds = [int(s) for s in seeds]
        if n is not None and n != len(seeds):
            raise UserInputError(f"got {len(seeds)} seeds for {n} images; pass one seed or one per image")
        if not seeds:
            raise UserInputError("no images requested; pass n >= 1")
        generators = generators_for(seeds)
        shape = (int(self.model.model.diffusion_model.in_channels), self.latent_size, self.latent_size)
        if vanilla:
            steps, sampler, eta = int(self.model.num_timesteps), VANILLA, 1.0
            z = self._sample_vanilla(shape, generators)
        else:
            steps, sampler, _, eta = self._settings("sample_diffusion", steps, sampler, 1.0, eta)
            z = self._sample(sampler, steps, shape, None, None, 1.0, eta, generators)
        side = self.latent_size * self.factor
        records = self._records("sample_diffusion", [""] * len(seeds), [""] * len(seeds), seeds, sampler, steps,
                                1.0, eta, side, side)
        return self._finish(self.decode(z), records)

    def _sample_vanilla(self, shape, generators) -> torch.Tensor:
        from ldm.models.diffusion.vanilla import VanillaDDPMSampler

        engine = VanillaDDPMSampler(PaddedPerImageModel(self.model, 1, len(generators) if self.exact_batches else None))
        with self.model.ema_scope():
            z, _ = engine.sample(S=int(self.model.num_timesteps), batch_size=len(generators), shape=tuple(shape),
                                 generator=generators, verbose=self.progress)
        return z
