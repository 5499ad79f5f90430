"""The work of a run as a list of :class:`WorkItem`: one per image (prompt x iteration x sample),
each with its seed and settings fixed before the list is split over processes, so image ``k`` is
the same whichever process makes it and in whatever batch."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Iterator, Optional, Sequence

from ldm.errors import UserInputError

__all__ = ["WorkItem", "items_from_batches", "group_batches", "items_digest", "check_item_seeds", "MAX_SEED"]

MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes (ldm.devices.seed_generators checks the same)


@dataclass(frozen=True)
class WorkItem:
    """One image of a run: its index ``k`` (which also names its file), prompt, seed and the
    settings it is rendered with (``width``/``height`` None: the script's, e.g. the init image's)."""

    index: int
    prompt: str
    seed: int
    negative_prompt: str
    steps: int
    sampler: str
    scale: float
    eta: Optional[float]
    width: Optional[int] = None
    height: Optional[int] = None

    def group_key(self) -> tuple:
        """Items with the same key can share a batch (the negative prompt may differ per image)."""
        return self.steps, self.sampler, self.scale, self.eta, self.width, self.height


def items_from_batches(opt, data: Sequence[Sequence[str]], *, sampler: str, eta: Optional[float],
                       width: Optional[int] = None, height: Optional[int] = None) -> list:
    """The items of a plain run, in the order the scripts always made them: for each iteration,
    the batches of ``data`` (one prompt ``n_samples`` times, or the file's prompts ``n_samples`` at
    a time; a class per batch for sample_class). Image ``k`` gets ``seed + k``; with
    ``--fixed_code`` image ``j`` of every batch gets ``seed + j`` (what the scripts did before items
    existed). A script without ``--negative_prompt`` gives its items ``""``."""
    negative = getattr(opt, "negative_prompt", "")
    items, k = [], 0
    for _ in range(opt.n_iter):
        for batch in data:
            for j, prompt in enumerate(batch):
                seed = opt.seed + j if opt.fixed_code else opt.seed + k
                items.append(WorkItem(k, prompt, seed, negative, int(opt.steps), sampler, float(opt.scale), eta,
                                      width, height))
                k += 1
    return items


def check_item_seeds(items: Sequence[WorkItem]) -> None:
    """:raises UserInputError: for a seed outside ``0 .. 2**64 - 1``."""
    for item in items:
        if not 0 <= item.seed <= MAX_SEED:
            raise UserInputError(f"seed {item.seed} of image {item.index} is out of range; use seeds from 0 to "
                                 f"{MAX_SEED}")


def group_batches(items: Sequence[WorkItem], size: int) -> Iterator[list]:
    """Consecutive items, at most ``size`` at a time, with equal :meth:`WorkItem.group_key`."""
    batch: list = []
    for item in items:
        if batch and (len(batch) >= size or item.group_key() != batch[0].group_key()):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def items_digest(items: Sequence[WorkItem]) -> str:
    """SHA-256 of every item's index, prompt, seed and settings (part of the run's settings hash)."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps(asdict(item), sort_keys=True).encode())
        digest.update(b"\n")
    return digest.hexdigest()
