"""Learning-rate multipliers named by the ldm configs (``scheduler_config``).

Each object is a callable ``step -> multiplier`` for ``torch.optim.lr_scheduler.LambdaLR``, so the
optimizer's base learning rate is multiplied by the value; the values equal the reference's for
every step it accepts.

Quirks of the reference, kept and pinned by tests:

* Cycle boundaries (``LambdaWarmUpCosineScheduler2``, ``LambdaLinearScheduler``): a global step
  equal to the end of cycle ``k`` (``sum(cycle_lengths[:k+1])``) still belongs to cycle ``k``, at
  local step ``cycle_lengths[k]``; cycle ``k+1`` is first seen at its local step 1.
* ``LambdaLinearScheduler`` decays over the whole cycle, not over the part after warm-up:
  after warm-up ``f = f_min + (f_max - f_min) * (L - n) / L``. With ``f_min != f_max`` the value
  therefore drops at the end of warm-up (to ``f_min + (f_max - f_min) * (L - w) / L``) instead of
  starting the decay from ``f_max``. The v1 configs use ``f_min == f_max == 1``, so there it is a
  plain warm-up to 1.

One deliberate difference: the reference fails with a ``TypeError`` on a step past the last
cycle; here the multiplier holds the last cycle's end value (``f_min[-1]``) instead.
"""
from __future__ import annotations

import logging
import math
from bisect import bisect_left
from itertools import accumulate
from typing import Sequence

from ldm.errors import UserInputError

__all__ = ["LambdaWarmUpCosineScheduler", "LambdaWarmUpCosineScheduler2", "LambdaLinearScheduler"]

logger = logging.getLogger(__name__)


def _warm_up(n: float, steps: float, start: float, peak: float) -> float:
    """Straight line from ``start`` at step 0 to ``peak`` at step ``steps``."""
    return (peak - start) / steps * n + start  # the reference's operation order: same float bits


def _cosine(t: float, lo: float, hi: float) -> float:
    """Half cosine from ``hi`` (t=0) to ``lo`` (t>=1): lo + (hi - lo) * (1 + cos(pi t)) / 2."""
    t = min(t, 1.0)
    return lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * t))


class LambdaWarmUpCosineScheduler:
    """Linear warm-up from ``lr_start`` to ``lr_max`` over ``warm_up_steps``, then a half cosine
    down to ``lr_min`` at ``max_decay_steps``, flat after that. Use with a base learning rate of 1
    (the values are the learning rate itself) or read them as multipliers.

    :param warm_up_steps: steps of linear warm-up (0 for none).
    :param lr_min: value from ``max_decay_steps`` on.
    :param lr_max: value at the end of warm-up.
    :param lr_start: value at step 0.
    :param max_decay_steps: global step where the cosine reaches ``lr_min``; > ``warm_up_steps``.
    :param verbosity_interval: log the last value every this many steps (0: never).
    """

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float,
                 max_decay_steps: int, verbosity_interval: int = 0):
        if warm_up_steps < 0:
            raise UserInputError(f"warm_up_steps must be >= 0, got {warm_up_steps}")
        if max_decay_steps <= warm_up_steps:
            raise UserInputError(
                f"max_decay_steps ({max_decay_steps}) must exceed warm_up_steps ({warm_up_steps}): "
                "the cosine decays between the two"
            )
        self.lr_warm_up_steps = warm_up_steps
        self.lr_start = lr_start
        self.lr_min = lr_min
        self.lr_max = lr_max
        self.lr_max_decay_steps = max_decay_steps
        self.last_lr = 0.0
        self.verbosity_interval = verbosity_interval

    def schedule(self, n: int, **kwargs) -> float:
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            logger.info("current step: %d, recent lr-multiplier: %g", n, self.last_lr)
        if n < self.lr_warm_up_steps:
            lr = _warm_up(n, self.lr_warm_up_steps, self.lr_start, self.lr_max)
        else:
            t = (n - self.lr_warm_up_steps) / (self.lr_max_decay_steps - self.lr_warm_up_steps)
            lr = _cosine(t, self.lr_min, self.lr_max)
        self.last_lr = lr
        return lr

    def __call__(self, n: int, **kwargs) -> float:
        return self.schedule(n, **kwargs)


class LambdaWarmUpCosineScheduler2:
    """Repeated cycles, each a linear warm-up then a half cosine. All list parameters hold one
    entry per cycle. In cycle ``k`` (local step ``n``, see the module notes for boundaries):
    ``n < warm_up_steps[k]``: line from ``f_start[k]`` to ``f_max[k]``; afterwards a half cosine
    from ``f_max[k]`` to ``f_min[k]`` reached at the cycle's end.

    :param warm_up_steps: warm-up steps per cycle, each < its cycle length.
    :param f_min: value at the end of each cycle.
    :param f_max: value at the end of each warm-up.
    :param f_start: value at the start of each cycle.
    :param cycle_lengths: steps per cycle, each > 0.
    :param verbosity_interval: log the last value every this many local steps (0: never).
    """

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[int], verbosity_interval: int = 0):
        lists = dict(warm_up_steps=warm_up_steps, f_min=f_min, f_max=f_max, f_start=f_start,
                     cycle_lengths=cycle_lengths)
        for name, value in lists.items():
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise UserInputError(f"{name} must be a list with one entry per cycle, e.g. [10000]; got {value!r}")
        lengths = {name: len(value) for name, value in lists.items()}
        if len(set(lengths.values())) != 1 or not cycle_lengths:
            raise UserInputError(f"all lists need the same, non-zero number of cycles; got lengths {lengths}")
        if any(c <= 0 for c in cycle_lengths) or any(w < 0 for w in warm_up_steps):
            raise UserInputError(f"need cycle_lengths > 0 and warm_up_steps >= 0; got {list(cycle_lengths)}, "
                             f"{list(warm_up_steps)}")
        self._check_warm_up(list(warm_up_steps), list(cycle_lengths))
        self.lr_warm_up_steps = list(warm_up_steps)
        self.f_start = list(f_start)
        self.f_min = list(f_min)
        self.f_max = list(f_max)
        self.cycle_lengths = list(cycle_lengths)
        self.cum_cycles = [0, *accumulate(self.cycle_lengths)]
        self.last_f = 0.0
        self.verbosity_interval = verbosity_interval

    @staticmethod
    def _check_warm_up(warm_up_steps: list[int], cycle_lengths: list[int]) -> None:
        # the cosine part divides by (cycle length - warm-up)
        if any(w >= c for w, c in zip(warm_up_steps, cycle_lengths)):
            raise UserInputError(f"each warm_up_steps entry must be shorter than its cycle; got {warm_up_steps} "
                             f"for cycle_lengths {cycle_lengths}")

    def find_in_interval(self, n: int) -> int:
        """Index of the cycle holding global step ``n`` (the last cycle for steps past the end)."""
        return min(max(bisect_left(self.cum_cycles, n, lo=1) - 1, 0), len(self.cycle_lengths) - 1)

    def _local_step(self, n: int) -> tuple[int, int]:
        cycle = self.find_in_interval(n)
        local = min(n - self.cum_cycles[cycle], self.cycle_lengths[cycle])  # held past the end
        if self.verbosity_interval > 0 and local % self.verbosity_interval == 0:
            logger.info("current step: %d, recent lr-multiplier: %g, current cycle %d", local, self.last_f, cycle)
        return cycle, local

    def _after_warm_up(self, cycle: int, n: int) -> float:
        w, length = self.lr_warm_up_steps[cycle], self.cycle_lengths[cycle]
        return _cosine((n - w) / (length - w), self.f_min[cycle], self.f_max[cycle])

    def schedule(self, n: int, **kwargs) -> float:
        cycle, n = self._local_step(n)
        if n < self.lr_warm_up_steps[cycle]:
            f = _warm_up(n, self.lr_warm_up_steps[cycle], self.f_start[cycle], self.f_max[cycle])
        else:
            f = self._after_warm_up(cycle, n)
        self.last_f = f
        return f

    def __call__(self, n: int, **kwargs) -> float:
        return self.schedule(n, **kwargs)


class LambdaLinearScheduler(LambdaWarmUpCosineScheduler2):
    """Like :class:`LambdaWarmUpCosineScheduler2` but after warm-up the value falls on a straight
    line ``f_min + (f_max - f_min) * (L - n) / L`` over the whole cycle length ``L`` (see the
    module notes). The SD v1 configs use it as a 10000-step warm-up from 1e-6 to 1.
    """

    @staticmethod
    def _check_warm_up(warm_up_steps: list[int], cycle_lengths: list[int]) -> None:
        pass  # the line divides by the cycle length only

    def _after_warm_up(self, cycle: int, n: int) -> float:
        length = self.cycle_lengths[cycle]
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * (length - n) / length
