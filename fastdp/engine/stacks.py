"""Same-shape layers finished as one: one batched norm, one drop mask and one batched GEMM for L layers.

A ViT-S has 48 Linear layers in four shapes (qkv, proj, fc1, fc2 of its 12 blocks). Finished one by one, each
book-keeping layer costs ~8 launches after its backward (three batched products for the ghost norm, a scale and
two selections for the dropped examples, the GEMM): ~400 per step, as many as the whole non-private step. Stacked,
a shape costs ~10 launches whatever L: the stack copies of the operands replace the masked copies each layer made.

Exactness is unaffected: each layer's norm and sum are computed from its own operands exactly as alone, only in one
batched launch; the squared norms of the layers add as they would one by one.

A contribution opts in with ``stack_key()`` (fastdp.engine.interface.Contribution), ``held_bytes``, ``release()``
and ``stacked(members, buffers)``, which returns an object with ``params``, ``sq_norm()``, ``weighted_sum(w)`` and
``split(total)`` (as fastdp.engine.flat.Flat) and copies into tensors from ``buffers`` (the engine's workspace,
fastdp.engine.workspace: on the CPU the same memory every backward). Once a stack has copied its members' operands
they ``release()`` theirs, so that the clip step holds one copy of each, not two: at most one stack's worth more than
the backward held (ViT-S at batch 32: the operands are ~600 MB). A stack copies at most ``STACK_MAX_BYTES`` of
operands; larger groups of one shape are split into several stacks.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fastdp.engine.workspace import Buffers, fresh

#: the most bytes of operands one stack copies. It bounds one allocation, not the clip step's memory (all stacks are
#: alive at once). The CPU had its own cap, 32 MiB (glibc's largest mmap threshold), while the stacks were allocated
#: every backward (a larger block was mapped afresh and faulted page by page); the workspace now keeps them mapped.
STACK_MAX_BYTES = 1 << 28


def gather_stacks(contributions: dict[nn.Parameter, Any], buffers: Buffers = fresh) -> list[Any]:
    """The stacks of the contributions that have same-shape partners (two or more per stack), copied into tensors
    from ``buffers``."""
    groups: dict[tuple, list] = {}
    for p, c in contributions.items():
        key = c.stack_key()
        if key is not None:
            groups.setdefault((type(c), key), []).append((p, c))
    stacks = []
    for (cls, _), members in groups.items():
        chunk, held = [], 0
        for p, c in members:
            if chunk and held + c.held_bytes > STACK_MAX_BYTES:
                stacks.extend(_stack(cls, chunk, buffers))
                chunk, held = [], 0
            chunk.append((p, c))
            held += c.held_bytes
        stacks.extend(_stack(cls, chunk, buffers))
    return stacks


def _stack(cls: type, chunk: list, buffers: Buffers) -> list[Any]:
    if len(chunk) < 2:
        return []
    stack = cls.stacked(chunk, buffers)
    for _, c in chunk:
        c.release()
    return [stack]
