"""Splitting Poisson logical batches into physical micro-batches.

A logical batch (what one optimizer step sees, Binomial(N, q) examples) may not fit in memory; the optimizer
accumulates clipped per-example gradients over any number of micro-batches, including zero, and adds the noise
once at ``step()``. Clipping is per example, so the split never changes the result as long as an example's rows
(its augmult views) stay together in one micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from fastdp.data.poisson import PoissonSampler

__all__ = ["logical_batches", "micro_batches"]


def micro_batches(
    *tensors: torch.Tensor, max_physical_batch: int, augmult: int = 1
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Splits a logical batch into consecutive micro-batches of at most ``max_physical_batch`` rows.

    With ``augmult = K`` the rows are example-major (rows ``i*K .. i*K+K-1`` are example i's views) and a chunk
    always holds whole examples: ``max(1, max_physical_batch // K)`` of them, i.e. ``K`` times that many rows. If
    ``max_physical_batch < K`` a chunk still holds one whole example, so it has ``K > max_physical_batch`` rows;
    splitting an example's views would make its clipping wrong, so the limit gives way instead.

    Chunks are views (slices along dim 0), not copies. Validation happens at call time, before iteration.

    Args:
        *tensors: one or more tensors sharing dim 0 (e.g. inputs and labels).
        max_physical_batch: the largest number of rows per chunk, >= 1.
        augmult: views per example K, >= 1; dim 0 must be divisible by it.

    Returns:
        An iterator of tuples, one tensor per input tensor, also when a single tensor is given (unpack with
        ``for (x,) in micro_batches(x, ...)``). An empty logical batch (0 rows) yields nothing.
    """
    if not tensors:
        raise ValueError("micro_batches needs at least one tensor, got none.")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            what = "a 0-d tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"micro_batches needs tensors with a batch dimension; argument {i} is {what}.")
    if isinstance(max_physical_batch, bool) or int(max_physical_batch) != max_physical_batch or max_physical_batch < 1:
        raise ValueError(f"max_physical_batch must be an integer >= 1, got {max_physical_batch!r}.")
    if isinstance(augmult, bool) or int(augmult) != augmult or augmult < 1:
        raise ValueError(f"augmult must be an integer >= 1, got {augmult!r}.")
    rows = tensors[0].shape[0]
    sizes = [t.shape[0] for t in tensors]
    if any(s != rows for s in sizes):
        raise ValueError(f"all tensors must have the same size in dim 0 (the batch), got sizes {sizes}.")
    if rows % augmult != 0:
        raise ValueError(
            f"the batch has {rows} rows, not divisible by augmult={augmult}; with augmult views every example "
            "must bring exactly augmult rows, example-major."
        )
    chunk = max(1, int(max_physical_batch) // int(augmult)) * int(augmult)
    return _chunks(tensors, rows, chunk)


def _chunks(tensors: tuple[torch.Tensor, ...], rows: int, chunk: int) -> Iterator[tuple[torch.Tensor, ...]]:
    for start in range(0, rows, chunk):
        yield tuple(t[start : start + chunk] for t in tensors)


def logical_batches(
    dataset_tensors: Sequence[torch.Tensor], sampler: PoissonSampler
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Logical batches of in-memory tensors, one per step of ``sampler``.

    Args:
        dataset_tensors: tensors holding the whole dataset along dim 0 (e.g. ``(x, y)``), each with
            ``sampler.num_samples`` rows.
        sampler: the Poisson sampler giving the index list of each step.

    Returns:
        An iterator of tuples ``tuple(t[indices] for t in dataset_tensors)``; a step that sampled no example
        gives tensors with 0 rows (and the other dims intact), which must still reach the optimizer.
    """
    tensors = tuple(dataset_tensors)
    if not tensors:
        raise ValueError("logical_batches needs at least one dataset tensor, got none.")
    sizes = [t.shape[0] if isinstance(t, torch.Tensor) and t.dim() > 0 else None for t in tensors]
    if any(s != sampler.num_samples for s in sizes):
        raise ValueError(
            f"every dataset tensor must have sampler.num_samples={sampler.num_samples} rows, got sizes {sizes} "
            "(None = not a tensor with a batch dimension)."
        )
    return _gather(tensors, sampler)


def _gather(tensors: tuple[torch.Tensor, ...], sampler: PoissonSampler) -> Iterator[tuple[torch.Tensor, ...]]:
    for indices in sampler:
        # dtype given explicitly: torch.as_tensor([]) would be float32, which cannot index.
        idx = torch.as_tensor(indices, dtype=torch.long)
        yield tuple(t[idx.to(t.device)] for t in tensors)
