"""fastdp.EMA against the recurrence written out in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastdp


@pytest.mark.parametrize("warmup", [True, False])
def test_average_follows_the_warmed_up_recurrence(warmup):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = fastdp.EMA(model, decay=0.9, warmup=warmup)
    expected = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for t in range(1, 8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        mu = min(0.9, (1 + t) / (10 + t)) if warmup else 0.9
        for n, p in model.named_parameters():
            expected[n] = mu * expected[n] + (1 - mu) * p.detach().double()
    for n, avg in ema.shadow.items():
        torch.testing.assert_close(avg.double(), expected[n], rtol=1e-6, atol=1e-6)


def test_applied_swaps_in_the_average_and_restores_the_weights():
    model = nn.Linear(3, 2)
    ema = fastdp.EMA(model, decay=0.5)
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.applied(model):
        assert torch.equal(model.weight, ema.shadow["weight"]) and not torch.equal(model.weight, after["weight"])
    for n, p in model.named_parameters():
        assert torch.equal(p, after[n])
    assert not torch.equal(ema.shadow["weight"], raw["weight"])


def test_state_dict_round_trip_and_errors():
    model = nn.Linear(3, 2)
    ema = fastdp.EMA(model, decay=0.99)
    ema.update(model)
    other = fastdp.EMA(nn.Linear(3, 2), decay=0.5, warmup=False)
    other.load_state_dict(ema.state_dict())
    assert other.steps == 1 and other.decay == 0.99 and other.warmup
    for n in ema.shadow:
        assert torch.equal(other.shadow[n], ema.shadow[n])
    with pytest.raises(KeyError, match="another model"):
        fastdp.EMA(nn.Linear(3, 3, bias=False), 0.9).load_state_dict(
            {"decay": 0.9, "warmup": True, "steps": 0, "shadow": {}}
        )
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        fastdp.EMA(model, decay=1.0)
