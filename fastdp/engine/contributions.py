"""What one layer call leaves behind for the clipping step, per parameter.

The clip factors c_i depend on the per-example norm summed over *all* layers, so a layer's backward cannot
finish its share of S = sum_i c_i g_i on its own. It leaves a ``Contribution``: enough to give

- ``sq_norm()``        the per-example squared norm of its gradient, (B,) in float32 or better,
- ``weighted_sum(w)``  sum_i w_i g_i once the weights w_i = c_i * scale are known,
- ``instantiate()``    the per-example gradients (B, *param.shape), needed only when a parameter receives
                       several contributions in one backward (shared weights, a module called twice): the
                       norm of a sum is not the sum of norms, so those are summed per example first.

Examples whose gradient is non-finite are removed with ``drop(keep)`` before ``weighted_sum``: a zero
weight is not enough because 0 * nan = nan.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

#: the clip-and-reduce kernel of the engine's backend while it finishes a backward: (G (B, P), w (B,)) -> (P,), or
#: None where it does not apply (device, dtype, layout) and the torch reduction runs
Reducer = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]
_REDUCER: contextvars.ContextVar[Reducer | None] = contextvars.ContextVar("fastdp_clip_reduce", default=None)


@contextmanager
def reducing_with(reducer: Reducer | None) -> Iterator[None]:
    """Run the weighted sums of kept per-example gradients through ``reducer`` (the engine's backend)."""
    token = _REDUCER.set(reducer)
    try:
        yield
    finally:
        _REDUCER.reset(token)


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms accumulate in float32 or better (bf16/fp16 sums of squares lose all precision)."""
    return torch.promote_types(dtype, torch.float32)


def sq_norms(t: torch.Tensor) -> torch.Tensor:
    """Per-row squared L2 norm of ``t`` (B, ...), accumulated in float32 or better.

    ``vector_norm`` reads strided rows at full bandwidth; ``t.pow(2).sum`` on the same view was 30x slower.
    """
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1, dtype=accum_dtype(t.dtype)).square()


def mask_rows(t: torch.Tensor, keep: torch.Tensor, rows_per_example: int = 1) -> torch.Tensor:
    """Zero the rows of dropped examples (``keep`` is (B,) bool; ``t`` has B * rows_per_example rows)."""
    if rows_per_example > 1:
        keep = keep.repeat_interleave(rows_per_example)
    return torch.where(keep.view(-1, *([1] * (t.dim() - 1))), t, torch.zeros((), dtype=t.dtype, device=t.device))


class Contribution:
    """One layer call's share of one parameter's per-example gradients."""

    def sq_norm(self) -> torch.Tensor:
        raise NotImplementedError

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def instantiate(self) -> torch.Tensor:
        raise NotImplementedError

    def drop(self, keep: torch.Tensor) -> None:
        raise NotImplementedError


class Kept(Contribution):
    """Per-example gradients held in memory (B, *shape): the instantiate+keep plan and all small parameters.

    The clipped sum is a weighted reduction over B (memory-bound, no GEMM). ``sq`` is their squared norms when the
    kernel that formed them also computed those (else they are computed here).
    """

    def __init__(self, grads: torch.Tensor, sq: torch.Tensor | None = None) -> None:
        self.grads, self.sq = grads, sq

    def sq_norm(self) -> torch.Tensor:
        return sq_norms(self.grads) if self.sq is None else self.sq

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        g = self.grads.reshape(self.grads.shape[0], -1)
        reducer = _REDUCER.get()
        out = None if reducer is None else reducer(g, w)
        if out is None:
            out = w.to(g.dtype) @ g
        return out.view(self.grads.shape[1:])

    def instantiate(self) -> torch.Tensor:
        return self.grads

    def drop(self, keep: torch.Tensor) -> None:
        self.grads = mask_rows(self.grads, keep)
        self.sq = None


class Summed(Kept):
    """Several contributions to one parameter, added per example before the norm is taken."""

    def __init__(self, parts: list[Contribution]) -> None:
        grads = parts[0].instantiate()
        for part in parts[1:]:
            grads = grads + part.instantiate()
        super().__init__(grads)
