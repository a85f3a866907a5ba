"""fastdp.nn.ScalarGain's rule (fastdp.rules.gain) against the float64 per-example loop."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import reduce_rows, reference, row_loss
from torch import nn

from fastdp.engine import GradSampleEngine
from fastdp.nn import ScalarGain


class GainNet(nn.Module):
    """A gain on a residual branch of (N, C, L) activations, and a second gain called twice in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.gain = ScalarGain(0.7)
        self.twice = ScalarGain(-0.4)
        self.fc = nn.Linear(3 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))
        h = h + self.gain(torch.sin(h))
        h = self.twice(torch.tanh(self.twice(h)))
        return self.fc(h.flatten(1))


def _run(model, batches, C, augmult, reduction):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        eng = GradSampleEngine(model, max_grad_norm=C, augmult=augmult, loss_reduction=reduction)
    for x, t in batches:
        reduce_rows(row_loss(model(x), t), reduction).backward()
    summed, norms = eng.pop()
    return {n: summed[p] for n, p in model.named_parameters()}, norms


@pytest.mark.parametrize("augmult", [1, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_scalar_gain_matches_float64_loop(augmult, reduction):
    torch.manual_seed(augmult + len(reduction))
    model = GainNet().double()
    n = 5 * augmult
    x, t = torch.randn(n, 2, 5, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)
    _, ref_norms = reference(model, x, t, max_grad_norm=float("inf"), augmult=augmult)
    C = ref_norms.median().item()
    ref, _ = reference(model, x, t, max_grad_norm=C, augmult=augmult)
    split = 2 * augmult  # two micro-batches
    got, norms = _run(model, [(x[:split], t[:split]), (x[split:], t[split:])], C, augmult, reduction)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=1e-12)
    assert got["gain.gain"].shape == () and ref["gain.gain"].abs() > 0 and ref["twice.gain"].abs() > 0
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def test_frozen_gain_is_a_plain_multiplication():
    model = GainNet()
    model.gain.gain.requires_grad_(False)
    model.twice.gain.requires_grad_(False)
    eng = GradSampleEngine(model, max_grad_norm=1.0)
    x, t = torch.randn(4, 2, 5), torch.randn(4, 3)
    row_loss(model(x), t).mean().backward()
    summed, _ = eng.pop()
    assert model.gain.gain not in summed and model.conv.weight in summed
