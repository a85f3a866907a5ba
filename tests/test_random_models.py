"""Random compositions of the supported layers (tests/random_models.py) against the float64 per-example loop."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import reduce_rows, reference, row_loss, seed_of, split
from random_models import FEATURES, RandomNet

from fastdp.engine import GradSampleEngine

SEEDS = list(range(20))


def _setting(seed: int) -> tuple[int, str, list[int]]:
    """augmult, loss reduction and micro-batch sizes (in examples) of a seed: every combination is drawn."""
    augmult = 1 + seed % 2
    reduction = ("mean", "sum")[(seed // 2) % 2]
    sizes = ([5], [1, 4], [2, 3])[seed % 3]
    return augmult, reduction, sizes


def test_the_seeds_cover_every_feature_and_setting():
    drawn = set().union(*(RandomNet(seed).features for seed in SEEDS))
    assert drawn == FEATURES, sorted(FEATURES - drawn)
    assert {_setting(s)[:2] for s in SEEDS} == {(k, r) for k in (1, 2) for r in ("mean", "sum")}


@pytest.mark.parametrize("seed", SEEDS)
def test_random_model_matches_float64_loop(seed):
    torch.manual_seed(seed_of("random_model", seed))
    model = RandomNet(seed).double()
    augmult, reduction, sizes = _setting(seed)
    x, t = RandomNet.inputs(5 * augmult)
    x, t = x.double(), t.double()
    _, ref_norms = reference(model, x, t, max_grad_norm=float("inf"), augmult=augmult)
    C = ref_norms.median().item()  # clips about half of the examples
    ref, _ = reference(model, x, t, max_grad_norm=C, augmult=augmult)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer has a fast rule: a fallback warning fails the test
        eng = GradSampleEngine(model, max_grad_norm=C, augmult=augmult, loss_reduction=reduction, autotune=False)
    for xb, tb in split(x, t, [s * augmult for s in sizes]):
        reduce_rows(row_loss(model(xb), tb), reduction).backward()
    summed, norms = eng.pop()
    assert (ref_norms > C).any() and (ref_norms < C).any()
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=1e-12)
    named = dict(model.named_parameters())
    assert {n for n, p in named.items() if p in summed} == set(ref), "every trainable parameter gets a clipped sum"
    for n in ref:
        torch.testing.assert_close(summed[named[n]], ref[n], rtol=1e-9, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(named[n] not in summed for n in frozen)
