"""Buffers the clip step reuses from one backward to the next, on devices whose allocator does not cache.

The stacks (fastdp.engine.stacks) copy the book-keeping layers' operands in every backward: ~600 MB for ViT-S at
batch 32. On a GPU, torch's caching allocator hands the previous backward's blocks out again. On the CPU, glibc
serves a block above its mmap threshold (dynamic, at most 32 MiB) with a fresh mapping and unmaps it when it is
freed, so every page of the copies faults on its first touch, in every step: 30-38 thousand faults per ViT-S
backward. What a fault costs is the machine's: on this project's VM the same copies took 120 ms in one session and
370 ms to 1.2 s in another (bench/RESULTS.md, session 10). From a workspace they take ~45 ms: its pages stay mapped.

The price is memory: each slot's largest request, held between steps. It raises the step's peak where the stacks
were not alive at it before: ViT-S at batch 32 peaks at 1831 MB RSS with the workspace and 1604 MB without, 1080 MB
non-private (high-water marks taken as bench/peak_memory.py takes them; the stacked layers release their own
operands once copied). Where memory matters more than the copies' time, ``HELD`` can be emptied
(``fastdp.engine.workspace.HELD = frozenset()``; an engine's ``workspace.clear()`` drops what it holds already).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable

import torch

#: device types whose freed memory goes back to the system, so that the workspace holds its buffers there
HELD = frozenset({"cpu"})

#: an allocator for one clip step: (shape, like) -> an uninitialised tensor of that shape, like's dtype and device
Buffers = Callable[[tuple[int, ...], torch.Tensor], torch.Tensor]


def fresh(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """The allocator that holds nothing."""
    return like.new_empty(shape)


class Workspace:
    """One buffer per slot, grown to the largest request and kept.

    A slot's buffer is overwritten by the next request for it: a result taken from the workspace must not outlive the
    clip step that took it (the stacks' copies do not: the clipped sums are new tensors).
    """

    def __init__(self) -> None:
        self._buffers: dict[Hashable, torch.Tensor] = {}

    def buffers(self, tag: str) -> Buffers:
        """The allocator for one clip step's uses of ``tag``: its n-th call returns slot (tag, n). The clip step
        asks in the same order every backward (the model's layers), so the same use gets the same buffer."""
        count = itertools.count()
        return lambda shape, like: self.take((tag, next(count)), shape, like)

    def take(self, slot: Hashable, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device: a view of the slot's buffer where
        the device's memory is held, else a new tensor (also for a fake or subclassed ``like``: a dry run's fake
        tensors belong to the mode that made them)."""
        if like.device.type not in HELD or type(like) is not torch.Tensor:
            return fresh(shape, like)
        n = math.prod(shape)
        buf = self._buffers.get(slot)
        if buf is None or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[slot] = like.new_empty(n)
        elif buf.numel() < n:
            # Poisson-sampled batches vary in size: grow by an eighth at least, not at every new maximum
            buf = self._buffers[slot] = like.new_empty(max(n, buf.numel() + buf.numel() // 8))
        return buf[:n].view(shape)

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(b.nbytes for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers = {}
