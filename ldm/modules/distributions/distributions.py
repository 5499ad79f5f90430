"""Distributions returned by the first stage, and the Gaussian KL used by the diffusion losses."""
from __future__ import annotations

import math
from typing import Sequence

import torch


class AbstractDistribution:
    """Interface: ``sample()`` and ``mode()``."""

    def sample(self):
        raise NotImplementedError

    def mode(self):
        raise NotImplementedError


class DiracDistribution(AbstractDistribution):
    """A point mass: sampling and the mode both return ``value``."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def sample(self) -> torch.Tensor:
        return self.value

    def mode(self) -> torch.Tensor:
        return self.value


Generator = torch.Generator | Sequence[torch.Generator] | None


def _randn_like_cpu_first(like: torch.Tensor, generator: Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, drawn in float32 on the generator's device
    (the CPU when there is no generator, as in the reference), then moved to ``like``'s device
    and dtype, so a seeded CPU generator gives the same latents on any device.

    :param generator: one generator for the whole batch, or one per batch element (then element
        ``i`` only depends on ``generator[i]``, whatever the batch size).
    """
    shape = tuple(like.shape)
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    else:
        if len(generator) != shape[0]:
            raise ValueError(
                f"got {len(generator)} generators for a batch of {shape[0]}; pass one generator per "
                "batch element, or a single generator"
            )
        noise = torch.cat(
            [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32).cpu() for g in generator]
        )
    return noise.to(device=like.device, dtype=like.dtype)


class DiagonalGaussianDistribution:
    """The KL autoencoder's posterior ``N(mean, diag(exp(logvar)))``.

    :param parameters: (B, 2*C, h, w) moments = ``quant_conv`` output; the first C channels are the
        mean, the last C the log-variance (clamped to [-30, 20]).
    :param deterministic: zero variance: ``sample()`` returns the mean, ``kl()``/``nll()`` are 0.

    Attributes ``mean``, ``logvar``, ``std = exp(logvar/2)``, ``var = exp(logvar)``, each (B, C, h, w).
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: Generator = None) -> torch.Tensor:
        """``mean + std * n`` with ``n ~ N(0, I)`` drawn on the CPU (or the generator's device) in
        float32 and then moved to the parameters' device and dtype.

        :param generator: a ``torch.Generator``, a list with one per batch element, or None (the
            global CPU RNG, as the reference).
        :return: (B, C, h, w).
        """
        return self.mean + self.std * _randn_like_cpu_first(self.mean, generator)

    def kl(self, other: "DiagonalGaussianDistribution | None" = None) -> torch.Tensor:
        """KL(self || other) summed over C, h, w; ``other`` defaults to N(0, I). :return: (B,)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * torch.sum(terms, dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample``, summed over ``dims``:
        ``0.5 * sum(log(2 pi) + logvar + (x - mean)^2 / var)``."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        terms = math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var
        return 0.5 * torch.sum(terms, dim=list(dims))

    def mode(self) -> torch.Tensor:
        """The mean (B, C, h, w)."""
        return self.mean


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))); arguments broadcast and
    may be Python floats as long as one is a tensor.

    ``0.5 * (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 * exp(-logvar2))``
    """
    ref = next((t for t in (mean1, logvar1, mean2, logvar2) if isinstance(t, torch.Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (x if isinstance(x, torch.Tensor) else torch.tensor(x).to(ref) for x in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))
