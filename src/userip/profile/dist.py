"""torch.distributed in one small object, so the EM loop reads the same with 1 or N processes.

Users are sharded by rank; each rank keeps only its users' rows and optimiser state. What crosses ranks is
small: the shared prompt's gradient, per-code sums and counts, and a few scalars for the metrics.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class Dist:
    def __init__(self) -> None:
        self.enabled = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce (sum or max) on a CPU tensor; a no-op in one process."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (pickled: for small or one-off payloads only)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shard(self, users: list[int]) -> list[int]:
        """This rank's users: every world-th of the sorted list (balanced to within one user)."""
        return sorted(users)[self.rank :: self.world]
