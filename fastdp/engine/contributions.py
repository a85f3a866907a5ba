"""The contributions most rules leave (fastdp.engine.interface defines the protocol): per-example gradients kept in
memory, several of them summed per example, and the clip-and-reduce of the engine's backend that finishes them.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fastdp.engine.interface import Contribution, Reducer

#: the clip-and-reduce kernel of the engine's backend while it finishes a backward (fastdp.engine.interface.Reducer)
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


def views_summed(t: torch.Tensor, augmult: int) -> torch.Tensor:
    """Per-view rows (N = B * K, ...) -> per-example sums over the K consecutive views (B, ...); no op when K = 1."""
    return t if augmult == 1 else t.view(-1, augmult, *t.shape[1:]).sum(1)


def zero_dropped(w: torch.Tensor, rows_per_example: int, *tensors: torch.Tensor, scaled: int = 0) -> list[torch.Tensor]:
    """``tensors`` (each B * rows_per_example rows) with the rows of zero-weight examples exact zeros, the first
    ``scaled`` of them also multiplied by their example's weight; one mask for all (the operands of one clipped sum).

    A dropped (non-finite) example has weight 0, but its rows may hold NaN or inf and 0 * nan = nan: a weighted sum
    must not read them. ``torch.where`` selects instead of multiplying, so the other rows are unchanged bit for bit.
    """
    keep = w != 0
    out = []
    for i, t in enumerate(tensors):
        kt = _row_view(keep, t, rows_per_example)
        v = t * _row_view(w.to(t.dtype), t, rows_per_example) if i < scaled else t
        out.append(torch.where(kt, v, 0.0))
    return out


def _row_view(v: torch.Tensor, t: torch.Tensor, rows_per_example: int) -> torch.Tensor:
    # (B,) -> (B * m, 1, ..., 1), broadcasting over t's other dims
    if rows_per_example > 1:
        v = v.repeat_interleave(rows_per_example)
    return v.view(-1, *([1] * (t.dim() - 1)))


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
        return reduce_rows(g, w).view(self.grads.shape[1:])

    def instantiate(self) -> torch.Tensor:
        return self.grads


def reduce_rows(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_i w_i g_i over the rows of ``g`` (B, P), zero-weight rows skipped: by the backend's clip-and-reduce where it
    takes ``g`` (its kernels skip them: the Reducer contract), else one masked GEMV."""
    reducer = _REDUCER.get()
    out = None if reducer is None else reducer(g, w)
    return (w.to(g.dtype) @ zero_dropped(w, 1, g)[0]) if out is None else out


class Summed(Kept):
    """Several contributions to one parameter, added per example before the norm is taken."""

    def __init__(self, parts: list[Contribution]) -> None:
        grads = parts[0].instantiate()
        for part in parts[1:]:
            grads = grads + part.instantiate()
        super().__init__(grads)
