"""micro_batches and logical_batches: exact partition of the logical batch, augmult groups kept whole."""

from __future__ import annotations

import pytest
import torch

from fastdp.data import PoissonSampler, logical_batches, micro_batches


@pytest.mark.parametrize("augmult", [1, 2, 3])
@pytest.mark.parametrize("max_physical_batch", [1, 2, 5, 7, 64])
@pytest.mark.parametrize("examples", [1, 4, 13])
def test_chunks_partition_the_batch(augmult: int, max_physical_batch: int, examples: int) -> None:
    g = torch.Generator().manual_seed(examples * 100 + max_physical_batch * 10 + augmult)
    rows = examples * augmult
    x = torch.randn(rows, 3, 4, generator=g)
    y = torch.randint(0, 10, (rows,), generator=g)
    owner = torch.arange(examples).repeat_interleave(augmult)  # example id of each row (example-major)

    chunks = list(micro_batches(x, y, owner, max_physical_batch=max_physical_batch, augmult=augmult))
    assert all(isinstance(c, tuple) and len(c) == 3 for c in chunks)
    # Concatenating the chunks gives back the input exactly, in order.
    torch.testing.assert_close(torch.cat([c[0] for c in chunks]), x, rtol=0, atol=0)
    assert torch.equal(torch.cat([c[1] for c in chunks]), y)

    per_chunk = max(1, max_physical_batch // augmult)  # whole examples per chunk
    for i, (cx, cy, co) in enumerate(chunks):
        assert cx.shape[0] == cy.shape[0] == co.shape[0]
        assert cx.shape[0] <= max(max_physical_batch, augmult)  # exceeds the limit only when K > limit
        assert cx.shape[0] % augmult == 0
        if i < len(chunks) - 1:
            assert cx.shape[0] == per_chunk * augmult  # only the last chunk may be short
        # No example's views are split across chunks: each id present appears exactly K times here.
        ids, counts = co.unique(return_counts=True)
        assert (counts == augmult).all()
        assert (owner == ids[:, None]).sum() == augmult * ids.numel()
    assert len(chunks) == -(-examples // per_chunk)


def test_empty_batch_yields_nothing() -> None:
    x = torch.empty(0, 3, 32, 32)
    y = torch.empty(0, dtype=torch.long)
    assert list(micro_batches(x, y, max_physical_batch=8)) == []
    assert list(micro_batches(x, y, max_physical_batch=8, augmult=4)) == []


def test_single_tensor_yields_tuples_of_views() -> None:
    x = torch.randn(10, 2)
    chunks = list(micro_batches(x, max_physical_batch=4))
    assert [c[0].shape[0] for c in chunks] == [4, 4, 2]
    assert all(isinstance(c, tuple) and len(c) == 1 for c in chunks)
    assert chunks[1][0].data_ptr() == x[4:].data_ptr()  # a view, no copy


def test_micro_batches_errors_at_call_time() -> None:
    x, y = torch.randn(6, 2), torch.zeros(5)
    # Errors are raised by the call itself, before anyone iterates.
    with pytest.raises(ValueError, match="same size in dim 0.*\\[6, 5\\]"):
        micro_batches(x, y, max_physical_batch=2)
    with pytest.raises(ValueError, match="not divisible by augmult=4"):
        micro_batches(x, max_physical_batch=8, augmult=4)
    with pytest.raises(ValueError, match="max_physical_batch must be an integer >= 1, got 0"):
        micro_batches(x, max_physical_batch=0)
    with pytest.raises(ValueError, match="augmult must be an integer >= 1, got 0"):
        micro_batches(x, max_physical_batch=2, augmult=0)
    with pytest.raises(ValueError, match="at least one tensor"):
        micro_batches(max_physical_batch=2)
    with pytest.raises(TypeError, match="argument 1 is a 0-d tensor"):
        micro_batches(x, torch.tensor(1.0), max_physical_batch=2)


def test_logical_batches_index_the_dataset() -> None:
    n = 12
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 5, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    sampler = PoissonSampler(n, sample_rate=0.1, steps=60, seed=4)
    expected = list(PoissonSampler(n, sample_rate=0.1, steps=60, seed=4))

    batches = list(logical_batches((x, y), sampler))
    assert len(batches) == 60
    empty = 0
    for (bx, by), idx in zip(batches, expected, strict=True):
        assert torch.equal(bx, x[idx]) and torch.equal(by, y[idx])
        if not idx:
            # P(empty) = 0.9^12 = 0.28 per step, so ~17 of 60 are empty; they keep their trailing shape.
            empty += 1
            assert bx.shape == (0, 3, 5) and by.shape == (0,) and by.dtype == y.dtype
            assert list(micro_batches(bx, by, max_physical_batch=4)) == []
    assert empty > 0


def test_logical_batches_errors() -> None:
    sampler = PoissonSampler(10, sample_rate=0.5, seed=0)
    with pytest.raises(ValueError, match="sampler.num_samples=10 rows, got sizes \\[10, 9\\]"):
        logical_batches((torch.zeros(10), torch.zeros(9)), sampler)
    with pytest.raises(ValueError, match="at least one dataset tensor"):
        logical_batches((), sampler)
