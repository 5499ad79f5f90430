"""Every fact about each sampler, in one place: its name, description, metadata name, eta rule and
step-count rule. Read through :mod:`ldm.models.diffusion.registry`, which also builds the samplers;
the sampler classes read their own facts from here."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional

from ldm.errors import UserInputError

__all__ = ["SamplerInfo", "SAMPLERS", "SAMPLER_NAMES", "SAMPLER_DESCRIPTIONS", "sampler_info", "resolve_eta",
           "check_steps"]


@dataclass(frozen=True)
class SamplerInfo:
    """What the scripts, the pipeline and the docs need to know about one sampler.

    :ivar name: registry name (``--sampler NAME``), e.g. ``"euler_a"``.
    :ivar description: one line for ``--help`` and the docs (the published method it follows).
    :ivar display_name: the AUTOMATIC1111 ``Sampler:`` metadata name, e.g. ``"Euler a"``.
    :ivar default_eta: None for a deterministic sampler (eta must be None or 0); else the eta used
        when none is given.
    """

    name: str
    description: str
    display_name: str
    default_eta: Optional[float]


_ALL = (
    SamplerInfo("ddim", "DDIM (Song et al. 2021), the reference default", "DDIM", 0.0),
    SamplerInfo("plms", "PLMS / PNDM (Liu et al. 2022), the reference's --plms", "PLMS", None),
    SamplerInfo("dpm_solver", "DPM-Solver++(2M) on the time-uniform grid, the reference's --dpm_solver",
                "DPM-Solver++ 2M (time uniform)", None),
    SamplerInfo("euler", "Euler on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn)", "Euler",
                None),
    SamplerInfo("euler_a", "Euler ancestral (k-diffusion), stochastic", "Euler a", 1.0),
    SamplerInfo("heun", "Heun (Karras et al. 2022, Alg. 1), 2 model calls per step", "Heun", None),
    SamplerInfo("dpmpp_2m", "DPM-Solver++(2M) (Lu et al. 2022) on the model's own noise levels", "DPM++ 2M", None),
    SamplerInfo("dpmpp_2m_karras", "DPM-Solver++(2M) on Karras et al. 2022 noise levels (rho 7)",
                "DPM++ 2M Karras", None),
    SamplerInfo("lms", "linear multistep, order 4 (k-diffusion)", "LMS", None),
)

#: name -> :class:`SamplerInfo`, in the order of ``--help``
SAMPLERS: Mapping[str, SamplerInfo] = MappingProxyType({info.name: info for info in _ALL})
#: the names, in order
SAMPLER_NAMES = tuple(SAMPLERS)
#: name -> one-line description
SAMPLER_DESCRIPTIONS = {name: info.description for name, info in SAMPLERS.items()}
#: samplers that run on the reference's DDIM timesteps (``range(0, N, N // S) + 1``)
_DDIM_GRID = ("ddim", "plms")

def sampler_info(name: str) -> SamplerInfo:
    """:raises UserInputError: for an unknown name, listing the known ones."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise UserInputError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLER_NAMES)}") from None


def resolve_eta(name: str, eta: Optional[float]) -> Optional[float]:
    """The eta sampler ``name`` runs with (what the image metadata records).

    :returns: ``default_eta`` when ``eta`` is None; ``float(eta)`` for a stochastic sampler; None
        for a deterministic sampler given None or 0.
    :raises UserInputError: unknown sampler, negative eta, or non-zero eta for a deterministic sampler.
    """
    info = sampler_info(name)
    if eta is not None:
        if not isinstance(eta, numbers.Real) or isinstance(eta, bool):
            raise UserInputError(f"eta must be a number, got {eta!r}")
        if eta < 0:
            raise UserInputError(f"eta must be >= 0, got {eta}; use 0 for deterministic sampling")
    if info.default_eta is None:
        if eta:
            raise UserInputError(f"{name} is deterministic: eta must be 0 (got {eta}); use ddim (eta > 0) "
                                 "or euler_a for stochastic sampling")
        return None
    return info.default_eta if eta is None else float(eta)


def check_steps(name: str, steps: int, num_timesteps: int = 1000) -> None:
    """:raises UserInputError: when ``steps`` gives no valid schedule for sampler ``name``: not a
    positive int, or (DDIM, PLMS) more steps than timesteps, or the reference's uniform
    discretisation reaching past the last timestep (e.g. 3 steps -> timestep 1000)."""
    sampler_info(name)
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
        raise UserInputError(f"the number of steps must be a positive int, got {steps!r}")
    if name in _DDIM_GRID:
        from ldm.models.diffusion.discretization import ddim_timesteps  # torch: not at import (--help)

        ddim_timesteps("uniform", int(steps), int(num_timesteps))
