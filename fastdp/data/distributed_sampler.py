"""Poisson sampling for several ranks: one global draw, split over the ranks.

The accountant certifies a Poisson draw over the whole training set, so every rank makes the *same* global draw
(same generator, same seed: broadcast from rank 0 when not given) and keeps every world_size-th selected index,
starting at its rank. The ranks' shares are disjoint and together are exactly the global batch; a share may be
empty (the rank still takes part in the step).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch.distributed as dist

from fastdp.data.poisson import PoissonSampler
from fastdp.distributed import active_group, broadcast_int

__all__ = ["DistributedPoissonSampler"]


class DistributedPoissonSampler(PoissonSampler):
    """This rank's share of each global Poisson batch.

    Args:
        num_samples, sample_rate, expected_batch_size, steps: of the *global* draw, as for PoissonSampler.
        seed: the global draw's seed, the same on every rank (and secret); None: drawn from OS entropy on rank 0
            and broadcast.
        rank, world_size: this rank and the number of ranks; default: those of ``process_group``.
        process_group: default: torch.distributed's default group.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float | None = None,
        expected_batch_size: int | None = None,
        steps: int | None = None,
        seed: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        process_group=None,
    ) -> None:
        group = active_group(process_group)
        if rank is None or world_size is None:
            if group is None:
                rank, world_size = 0, 1
            else:
                rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if seed is None and group is not None:
            seed = broadcast_int(int.from_bytes(os.urandom(8), "little") >> 1, group)  # secret, as PoissonSampler
        super().__init__(num_samples, sample_rate, expected_batch_size, steps, seed=seed)
        self.rank, self.world_size = int(rank), int(world_size)

    def __iter__(self) -> Iterator[list[int]]:
        for indices in super().__iter__():
            yield indices[self.rank :: self.world_size]

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, rank={self.rank}, world_size={self.world_size})"
