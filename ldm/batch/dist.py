"""The processes of a run: :class:`DistContext` reads what ``torchrun`` (or
``python -m torch.distributed.run``) puts in the environment and, with more than one process,
starts ``torch.distributed`` (gloo on the CPU, NCCL on CUDA with a gloo group beside it for the
small messages this package sends) and gives each process its own GPU (``cuda:LOCAL_RANK``).

Without those variables (or with ``WORLD_SIZE=1``) it is a single process and nothing is started.
Only small Python objects travel: the run's plan from rank 0, and the per-rank counts at the end;
images go to the shared output folder directly.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ldm.errors import UserInputError

__all__ = ["DistContext", "RankError", "TIMEOUT"]

log = logging.getLogger("ldm.scripts")

#: How long a rank waits for the others at a collective: the end-of-run exchange waits for the
#: slowest rank's share, which on mixed GPUs can be far behind.
TIMEOUT = datetime.timedelta(hours=12)


class RankError(UserInputError):
    """A user error that only this rank may see (its GPU, its view of the output folder): printed by
    every rank, where errors all ranks share are printed by one process per machine."""

    every_rank = True


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started: bool = False
    _group: Any = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ=None) -> "DistContext":
        """Rank, world size and local rank from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``."""
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            world = int(env["WORLD_SIZE"])
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", "0"))
        except ValueError:
            raise UserInputError("WORLD_SIZE, RANK and LOCAL_RANK must be integers; start the script with torchrun "
                                 "(it sets them)") from None
        if world < 1 or not 0 <= rank < world:
            raise UserInputError(f"RANK {rank} / WORLD_SIZE {world} are not valid; start the script with torchrun")
        return cls(rank=rank, world_size=world, local_rank=local)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        """``"[rank r/W] "`` for log lines of a distributed run, else ``""``."""
        return f"[rank {self.rank}/{self.world_size}] " if self.distributed else ""

    def device_for(self, device):
        """The device of this rank: ``cuda:LOCAL_RANK`` when the run is on CUDA, else ``device``."""
        import torch

        if not self.distributed or device.type != "cuda":
            return device
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise RankError(f"rank {self.rank}: LOCAL_RANK {self.local_rank} but this machine has {count} GPU(s); "
                            f"pass --nproc_per_node {count} or fewer to torchrun")
        if device.index is not None and device.index != self.local_rank:
            log.warning("%s--device %s ignored under torchrun: each process uses its own GPU, cuda:%d",
                        self.tag, device, self.local_rank)
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def start(self, device) -> None:
        """Join the process group (a no-op for a single process)."""
        if not self.distributed or self.started:
            return
        import torch.distributed as dist

        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
        self._group = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend != "gloo" else None
        self.started = True
        log.info("%sjoined the process group (%s, %d processes)", self.tag, backend, self.world_size)

    def broadcast(self, obj: Optional[Any]) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.started:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.started:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def barrier(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.barrier(group=self._group)

    def close(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.started = False
