"""Small per-example gradients side by side in one buffer: one norm and one weighted sum for all of them.

A WRN-16-4 has ~60 parameters whose per-example gradients are a few hundred numbers each (GroupNorm affines, biases,
gains). Taken one by one, each costs a norm, a square, an addition to the total and a clip-and-reduce: ~300 launches
per step, more than the non-private step's whole backward, for a negligible amount of data. Concatenated into one
(B, sum P) buffer (one launch, a few KB per example) they cost one norm and one reduction. Exactness is unaffected:
the squared norm of a concatenation is the sum of its parts' squared norms, and the weighted sum of the buffer's
columns is, slice by slice, each parameter's weighted sum.

Each part starts at a 16-byte boundary (zero columns pad the one before it): the clipped sums handed to the
optimizer are views of the buffer's sum, and the fused steps take their vector loads only from aligned pointers.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdp.engine.contributions import Kept, reduce_rows, sq_norms

#: a kept per-example gradient of at most this many elements per example goes into the flat buffer (larger ones
#: would cost a copy of real size for the launches they save)
FLAT_MAX_ELEMENTS = 1 << 14


class Flat:
    """The small kept contributions of one backward (of one dtype), concatenated per example."""

    def __init__(self, parts: dict[nn.Parameter, Kept]) -> None:
        self.params = tuple(parts)
        grads = [c.grads.reshape(c.grads.shape[0], -1) for c in parts.values()]
        align = max(1, 16 // grads[0].element_size())
        pieces, self.spans, at, zeros = [], [], 0, None
        for g in grads:
            pieces.append(g)
            self.spans.append((at, g.shape[1]))
            at += g.shape[1]
            pad = -at % align
            if pad:
                zeros = g.new_zeros(g.shape[0], align - 1) if zeros is None else zeros  # one for every pad
                pieces.append(zeros[:, :pad])
                at += pad
        self.buffer = torch.cat(pieces, dim=1)

    @staticmethod
    def gather(contributions: dict[nn.Parameter, object]) -> list[Flat]:
        """One ``Flat`` per dtype of the small ``Kept`` contributions whose norm is not known yet (a kernel that
        computed a norm with the gradients made them large ones)."""
        by_dtype: dict[torch.dtype, dict[nn.Parameter, Kept]] = {}
        for p, c in contributions.items():
            if isinstance(c, Kept) and c.sq is None and c.grads[0].numel() <= FLAT_MAX_ELEMENTS:
                by_dtype.setdefault(c.grads.dtype, {})[p] = c
        return [Flat(parts) for parts in by_dtype.values() if len(parts) > 1]

    def sq_norm(self) -> torch.Tensor:
        return sq_norms(self.buffer)

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        """sum_i w_i g_i of every part, end to end (sum P,)."""
        return reduce_rows(self.buffer, w)

    def split(self, total: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        """Each parameter's slice of a flat sum, as a view shaped like the parameter."""
        return {p: total[at : at + n].view_as(p) for p, (at, n) in zip(self.params, self.spans, strict=True)}
