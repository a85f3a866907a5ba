"""Counting what a training step asks of the device: kernel launches and host syncs.

On a GPU every aten op that computes something is a kernel launch costing ~5-10 us of host time, and every host read
of a device value (``.item()``, ``bool(t)``, ``int(t)``) drains the device's queue. A DP step should issue about as
many launches as the non-private step and never sync. ``LaunchCounter`` counts both over any code it wraps, by aten op
(a ``TorchDispatchMode``: it sees what torch would dispatch to the device, whatever device the tensors are on, so the
counts are taken on the CPU as well).

Views, metadata and allocations without initialisation launch nothing and are not counted; neither is
``scalar_tensor``: the 0-d host tensor that wraps a Python number operand (``torch.where(c, t, 0.0)``), which a kernel
takes as an argument.
"""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

#: aten ops that only make views, read metadata or allocate: no kernel
NO_LAUNCH = frozenset({
    "view", "_unsafe_view", "reshape", "as_strided", "t", "transpose", "permute", "expand", "squeeze", "unsqueeze",
    "detach", "alias", "slice", "select", "unbind", "split", "split_with_sizes", "chunk", "narrow", "flatten",
    "unflatten", "view_as", "expand_as", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    "_reshape_alias", "lift_fresh", "set_", "is_same_size", "_to_copy_noop", "resolve_conj", "resolve_neg",
    "_has_compatible_shallow_copy_type", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "dim", "size",
    "stride", "numel", "promote_types", "result_type", "can_cast", "scalar_tensor",
})  # fmt: skip
#: aten ops that read a device value on the host
SYNC = frozenset({"_local_scalar_dense", "item", "is_nonzero"})


class LaunchCounter(TorchDispatchMode):
    """``with LaunchCounter() as c: step()``; then ``c.launches`` and ``c.syncs`` count by aten op name."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: Counter = Counter()
        self.syncs: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC:
            self.syncs[name] += 1
        elif name not in NO_LAUNCH:
            self.launches[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.launches.values())

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())
