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
#: the weights of the backward being finished and which of them are exactly 0: one mask for every contribution
_DROPPED: contextvars.ContextVar[tuple[torch.Tensor, torch.Tensor] | None] = contextvars.ContextVar(
    "fastdp_dropped", default=None
)


@contextmanager
def reducing_with(reducer: Reducer | None, weights: torch.Tensor | None = None) -> Iterator[None]:
    """Run the weighted sums of kept per-example gradients through ``reducer`` (the engine's backend); with the
    backward's ``weights``, compare them with 0 once for all of its contributions (``dropped``)."""
    token = _REDUCER.set(reducer)
    mask = _DROPPED.set(None if weights is None else (weights, weights == 0))
    try:
        yield
    finally:
        _DROPPED.reset(mask)
        _REDUCER.reset(token)


def dropped(w: torch.Tensor) -> torch.Tensor:
    """``w == 0`` per example: the examples a weighted sum must select away (computed once per backward)."""
    memo = _DROPPED.get()
    return memo[1] if memo is not None and memo[0] is w else w == 0


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


def zero_dropped(w: torch.Tensor, *tensors: torch.Tensor, scaled: int = 0) -> list[torch.Tensor]:
    """``tensors`` (each B examples' rows, consecutive per example) with the rows of zero-weight examples exact
    zeros, the first ``scaled`` of them also multiplied by their example's weight.

    A dropped (non-finite) example has weight 0, but its rows may hold NaN or inf and 0 * nan = nan: a weighted sum
    must not read them. ``torch.where`` selects instead of multiplying, so the other rows are unchanged bit for bit.
    """
    drop, B = dropped(w), w.shape[0]
    out = []
    for i, t in enumerate(tensors):
        rows = t.unflatten(0, (B, -1))  # (B, rows per example, ...): a view, the mask broadcasts over it
        shape = (B, *[1] * (rows.dim() - 1))
        v = rows * w.view(shape).to(t.dtype) if i < scaled else rows
        out.append(torch.where(drop.view(shape), 0.0, v).flatten(0, 1))
    return out


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
    return (w.to(g.dtype) @ zero_dropped(w, g)[0]) if out is None else out


class Summed(Kept):
    """Several contributions to one parameter, added per example before the norm is taken."""

    def __init__(self, parts: list[Contribution]) -> None:
        grads = parts[0].instantiate()
        for part in parts[1:]:
            grads = grads + part.instantiate()
        super().__init__(grads)
