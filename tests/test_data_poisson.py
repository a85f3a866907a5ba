"""PoissonSampler: the distribution it samples, empty batches, exact resume, validation.

Statistical checks use fixed seeds and 5-sigma bounds derived from the sampling distribution (stated per test);
a correct sampler fails one of them with probability well below 1e-4.
"""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch

from fastdp.data import PoissonSampler


def test_batch_size_mean_and_variance_are_binomial() -> None:
    n, q, steps = 1000, 0.05, 2000
    sizes = torch.tensor([len(b) for b in PoissonSampler(n, sample_rate=q, steps=steps, seed=0)], dtype=torch.float64)
    assert sizes.numel() == steps
    # |B| ~ Binomial(n, q): mean n q = 50, variance n q (1-q) = 47.5.
    mean, var = n * q, n * q * (1 - q)
    # Sample mean of `steps` iid draws: sd = sqrt(var / steps) = 0.154.
    assert abs(sizes.mean().item() - mean) <= 5 * math.sqrt(var / steps)
    # Sample variance: sd ~= var * sqrt(2/(steps-1) + kappa/steps), kappa = (1 - 6q(1-q)) / var the binomial's
    # excess kurtosis (0.015 here) -> sd = 1.51.
    kappa = (1 - 6 * q * (1 - q)) / var
    assert abs(sizes.var().item() - var) <= 5 * var * math.sqrt(2 / (steps - 1) + kappa / steps)


def test_each_index_is_included_with_probability_q() -> None:
    n, q, steps = 500, 0.1, 2000
    counts = torch.zeros(n, dtype=torch.float64)
    for batch in PoissonSampler(n, sample_rate=q, steps=steps, seed=1):
        assert batch == sorted(set(batch)), "indices must be unique and increasing"
        assert all(0 <= i < n for i in batch)
        counts[batch] += 1
    # Each count ~ Binomial(steps, q): mean 200, sd sqrt(steps q (1-q)) = 13.4. A 5.5-sd bound holds for all
    # n = 500 indices at once with probability > 1 - 500 * 3.8e-8 (union bound).
    sd = math.sqrt(steps * q * (1 - q))
    assert (counts - steps * q).abs().max().item() <= 5.5 * sd


def test_empty_batches_are_yielded() -> None:
    n, q, steps = 10, 0.05, 200
    batches = list(PoissonSampler(n, sample_rate=q, steps=steps, seed=2))
    assert len(batches) == steps  # nothing skipped
    empty = sum(1 for b in batches if b == [])
    # P(empty) = (1-q)^n = 0.599; #empty ~ Binomial(200, 0.599): mean 119.7, sd 6.93.
    p = (1 - q) ** n
    assert empty > 0
    assert abs(empty - steps * p) <= 5 * math.sqrt(steps * p * (1 - p))


def test_attributes_and_defaults() -> None:
    s = PoissonSampler(50000, expected_batch_size=4096, seed=0)
    assert s.sample_rate == 4096 / 50000
    assert s.expected_batch_size == 4096
    assert len(s) == s.steps == round(50000 / 4096)  # one epoch in expectation
    t = PoissonSampler(1000, sample_rate=0.25, seed=0)
    assert t.expected_batch_size == 250.0 and len(t) == 4
    # q = 1 includes everyone, every step.
    assert list(PoissonSampler(7, sample_rate=1.0, steps=3, seed=0)) == [list(range(7))] * 3


def test_seeding_and_generators() -> None:
    def run(**kw: object) -> list[list[int]]:
        return list(PoissonSampler(100, sample_rate=0.1, steps=20, **kw))

    assert run(seed=5) == run(seed=5)
    assert run(seed=5) != run(seed=6)
    assert run(generator=torch.Generator().manual_seed(3)) == run(generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    a = run()
    torch.manual_seed(11)
    assert run() != a  # without seed/generator, OS entropy decides: torch.manual_seed does not make it predictable
    # Successive passes continue the stream instead of repeating it.
    s = PoissonSampler(100, sample_rate=0.1, steps=20, seed=5)
    assert list(s) != list(s)


@pytest.mark.parametrize("stop_at", [0, 1, 7, 12])
def test_resume_reproduces_the_uninterrupted_stream(stop_at: int) -> None:
    n, q, steps = 300, 0.03, 12
    reference = PoissonSampler(n, sample_rate=q, steps=steps, seed=123)
    expected = list(reference) + list(reference)  # two full passes, uninterrupted

    sampler = PoissonSampler(n, sample_rate=q, steps=steps, seed=123)
    it = iter(sampler)
    head = [next(it) for _ in range(stop_at)]
    buf = io.BytesIO()
    torch.save(sampler.state_dict(), buf)  # must survive serialisation
    buf.seek(0)

    resumed = PoissonSampler(n, sample_rate=q, steps=steps, seed=999)  # different seed: state must override it
    resumed.load_state_dict(torch.load(buf))
    rest_of_pass = list(resumed)
    assert len(rest_of_pass) == steps - stop_at if stop_at < steps else steps
    got = head + rest_of_pass + ([] if stop_at == steps else list(resumed))
    assert got == expected


def test_state_dict_after_a_completed_pass_starts_a_new_pass() -> None:
    s = PoissonSampler(100, sample_rate=0.2, steps=5, seed=0)
    list(itertools.islice(iter(s), 5))  # all 5 batches taken, generator epilogue never ran
    state = s.state_dict()
    assert state["position"] == 0
    r = PoissonSampler(100, sample_rate=0.2, steps=5, seed=1)
    r.load_state_dict(state)
    assert list(r) == list(s)


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        PoissonSampler(0, sample_rate=0.1)
    with pytest.raises(ValueError, match="exactly one of sample_rate and expected_batch_size"):
        PoissonSampler(10)
    with pytest.raises(ValueError, match="exactly one of sample_rate and expected_batch_size"):
        PoissonSampler(10, sample_rate=0.1, expected_batch_size=1)
    for q in (0.0, 1.5, -0.2, math.nan):
        with pytest.raises(ValueError, match="sample_rate must be in \\(0, 1\\]"):
            PoissonSampler(10, sample_rate=q)
    for b in (0, 11, 2.5):
        with pytest.raises(ValueError, match="expected_batch_size must be an integer in \\[1, num_samples=10\\]"):
            PoissonSampler(10, expected_batch_size=b)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        PoissonSampler(10, sample_rate=0.5, steps=0)
    with pytest.raises(ValueError, match="generator or a seed, not both"):
        PoissonSampler(10, sample_rate=0.5, seed=1, generator=torch.Generator())

    s = PoissonSampler(10, sample_rate=0.5, steps=4, seed=0)
    with pytest.raises(ValueError, match="\\(num_samples, sample_rate, steps\\)"):
        PoissonSampler(10, sample_rate=0.5, steps=3, seed=0).load_state_dict(s.state_dict())
    with pytest.raises(KeyError, match="missing \\['position'\\]"):
        s.load_state_dict({k: v for k, v in s.state_dict().items() if k != "position"})
