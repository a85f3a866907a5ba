"""Squared norms of many weight-standardised layers taken together (fastdp.engine.norm_groups, WSWeight) against
float64 per-example gradients pushed through the standardisation's Jacobian; the engine's grouping against the
float64 loop with dropped examples; and the launches the group saves."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_exact, reference, row_loss, seed_of
from models import WSNet

from fastdp.engine import GradSampleEngine
from fastdp.engine.contributions import Kept
from fastdp.engine.norm_groups import grouped_sq_norms
from fastdp.launches import LaunchCounter
from fastdp.nn.ws_conv import standardize_weight
from fastdp.rules.ws_conv import StandardizationJacobian, WSWeight

#: (C_out, C_in, kernel, eps) of the layers of one group: fan-ins 27, 8 and 144; an eps near the weights' variance
#: (the 1 + eps / std^2 term matters) and one negligible next to it
LAYERS = [(5, 3, 3, 1e-2), (7, 8, 1, 1e-6), (4, 16, 3, 3e-3)]


def _member(p: int, c: int, k: int, eps: float, B: int, g: torch.Generator, dtype=torch.float32):
    """A WSWeight from random per-example gradients w.r.t. W_hat, and its float64 reference ||J^T g_i||^2."""
    w = torch.randn(p, c, k, k, generator=g, dtype=torch.float64) * 0.1
    u, std = standardize_weight(w, eps)
    s = torch.rand(p, generator=g, dtype=torch.float64) + 0.5
    grads = torch.randn(B, p, c, k, k, generator=g, dtype=torch.float64)
    grads[0, 1] = 3.0 * u[1] + 0.5  # a row in span(1, u): its norm is ~0, the identity cancels (clamped at 0)
    ref = StandardizationJacobian(u, std, s, eps).apply(grads).flatten(1).square().sum(1)
    flat = grads.flatten(2).to(dtype)
    jac = StandardizationJacobian(u.to(dtype), std.to(dtype), s.to(dtype), eps)
    row_sq, row_sum, gu = flat.square().sum(2), flat.sum(2), torch.linalg.vecdot(flat, jac.u)
    return WSWeight(Kept(flat), jac, row_sq, row_sum, gu), ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_ws_norms_match_float64_jacobian(dtype):
    g = torch.Generator().manual_seed(seed_of("ws-group", str(dtype)))
    B = 6
    members, refs = zip(*(_member(*layer, B, g, dtype) for layer in LAYERS), strict=True)
    together = WSWeight.sq_norms_together(list(members))
    alone = torch.stack([m.sq_norm() for m in members])
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(together.double(), torch.stack(refs).sum(0), rtol=rtol, atol=0.0)
    for a, r in zip(alone, refs, strict=True):
        torch.testing.assert_close(a.double(), r, rtol=rtol, atol=1e-9 * r.max().item())


def test_grouped_sq_norms_groups_by_key_and_keeps_the_rest():
    g = torch.Generator().manual_seed(seed_of("ws-group-mixed"))
    ws = [_member(*layer, 4, g)[0] for layer in LAYERS]
    kept = Kept(torch.randn(4, 3, generator=g))
    other_device_dtype = _member(*LAYERS[0], 4, g, torch.float64)[0]  # another key: its own group
    sqs = grouped_sq_norms([ws[0], kept, ws[1], other_device_dtype, ws[2]])
    assert len(sqs) == 3
    want = kept.sq_norm() + sum(m.sq_norm() for m in ws)
    got = sum(s.double() for s in sqs) - other_device_dtype.sq_norm()
    torch.testing.assert_close(got, want.double(), rtol=1e-6, atol=0.0)


def test_a_group_costs_the_launches_of_one_layer():
    """The norm of every WS layer costs a fixed number of launches (the joins aside), not that number per layer."""
    g = torch.Generator().manual_seed(seed_of("ws-group-launches"))
    members = [_member(*LAYERS[i % 3], 4, g)[0] for i in range(12)]
    with LaunchCounter() as one:
        WSWeight.sq_norms_together(members[:1])
    with LaunchCounter() as twelve:
        WSWeight.sq_norms_together(members)
    assert twelve.total <= one.total + 5, (one.launches, twelve.launches)  # five joins (three terms, std, s)


@pytest.mark.parametrize("augmult", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_engine_with_ws_groups_is_exact(augmult, reduction):
    """WSNet's three WS layers take their norms as one group, over two micro-batches."""
    g = torch.Generator().manual_seed(seed_of("ws-group-engine", augmult, reduction))
    torch.manual_seed(seed_of("ws-group-engine-init", augmult, reduction))
    model = WSNet()
    x, t = torch.randn(8 * augmult, 3, 8, 8, generator=g), torch.randn(8 * augmult, 3, generator=g)
    assert_exact(model, x, t, (5 * augmult, 3 * augmult), augmult=augmult, reduction=reduction)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nonfinite_example_in_a_ws_group_drops_only_itself(value):
    g = torch.Generator().manual_seed(seed_of("ws-group-nonfinite", value))
    torch.manual_seed(seed_of("ws-group-nonfinite-init"))
    model = WSNet()
    x, t = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, generator=g)
    bad = x.clone()
    bad[2, 1, 3, 3] = value
    keep = [0, 1, 3, 4, 5]
    ref, _ = reference(model, x[keep], t[keep], max_grad_norm=0.5)
    eng = GradSampleEngine(model, max_grad_norm=0.5, loss_reduction="sum")
    row_loss(model(bad), t).sum().backward()
    summed, norms = eng.pop()
    eng.detach()
    assert not torch.isfinite(norms[2]) and torch.isfinite(norms[keep]).all()
    for n, p in model.named_parameters():
        torch.testing.assert_close(summed[p].double(), ref[n], rtol=2e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
