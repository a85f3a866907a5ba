"""Reading device numbers on the host without draining the device's queue.

``t.item()``, ``bool(t)`` or ``int(t)`` of a GPU tensor wait until every kernel queued before it has run: the host
stops feeding the GPU, which then idles while the next step's launches are issued. A ``HostRead`` copies the value
asynchronously into pinned host memory behind an event; ``ready()`` asks the event without waiting, ``value()`` waits
only when the caller needs the number now. Training loops read statistics of step t during step t+1 (or later), when
the copy has long landed. On the CPU the copy is immediate and ready at once.
"""

from __future__ import annotations

import torch


class HostRead:
    """The value of ``t`` (any shape) on its way to the host."""

    def __init__(self, t: torch.Tensor) -> None:
        t = t.detach()
        cuda = t.device.type == "cuda"
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
        self.host.copy_(t, non_blocking=cuda)
        self.event = None
        if cuda:
            self.event = torch.cuda.Event()
            self.event.record()

    def ready(self) -> bool:
        """Whether the copy has landed (never waits)."""
        return self.event is None or self.event.query()

    def value(self) -> list | float | int:
        """The copied value as Python numbers (waits for the copy if it has not landed)."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy().tolist()  # a host tensor read through numpy: no device op is involved
