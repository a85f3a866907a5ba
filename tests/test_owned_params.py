"""Parameters owned by a module with children (fastdp.engine.owned_params): exact against the float64 per-example loop
(tests/conftest.py::reference) with the children on their fast rules, or refused with an error naming the parameter.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import reduce_rows, reference, row_loss, seed_of, split
from torch import nn

from fastdp.engine import GradSampleEngine
from fastdp.engine.owned_params import OwnedParameters
from fastdp.engine.provenance import Batched, ProvenanceError


class TokenNet(nn.Module):
    """A ViT's root: ``cls_token`` concatenated after ``expand``, ``pos_embed`` added, a temperature used through
    ``exp`` (a derivation before the use)."""

    def __init__(self, dim: int = 4, tokens: int = 3) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim))
        self.log_temperature = nn.Parameter(torch.tensor(0.3))
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        h = h + torch.tanh(self.fc(h))
        return self.head(h[:, 0]) / self.log_temperature.exp()

    @staticmethod
    def inputs(n):
        return torch.randn(n, 3, 4), torch.randn(n, 3)


class ScaledBlock(nn.Module):
    """Layer scale: a residual branch times a per-channel gamma (CaiT, ConvNeXt), on flattened tokens too."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(0.5 + torch.rand(dim))

    def forward(self, x):
        return x + self.gamma * F.gelu(self.fc(self.norm(x)))


class LayerScaleNet(nn.Module):
    """Nested containers with own parameters, one block called twice, a bias added in place, a frozen own parameter."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.block = ScaledBlock(dim)
        self.other = ScaledBlock(dim)
        self.shift = nn.Parameter(torch.randn(dim))
        self.frozen = nn.Parameter(torch.randn(dim), requires_grad=False)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.block(self.other(self.block(x)))
        b, t, d = h.shape
        h = h.reshape(b * t, d)  # tokens flattened into rows: t rows per example
        h += self.shift * self.frozen
        return self.head(h).view(b, t, 3).mean(1)

    @staticmethod
    def inputs(n):
        return torch.randn(n, 5, 4), torch.randn(n, 3)


MODELS = {"tokens": TokenNet, "layer_scale": LayerScaleNet}


def _engine(model, **kw) -> GradSampleEngine:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the children keep their fast rules
        return GradSampleEngine(model, **kw)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("augmult", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("sizes", [(5,), (1, 4), (3, 2)])
def test_owned_parameters_match_float64_loop(name, augmult, reduction, sizes):
    torch.manual_seed(seed_of(name, augmult, reduction, sizes))
    model = MODELS[name]().double()
    x, t = MODELS[name].inputs(5 * augmult)
    x, t = x.double(), t.double()
    _, ref_norms = reference(model, x, t, max_grad_norm=float("inf"), augmult=augmult)
    C = ref_norms.median().item()  # clips about half of the examples
    ref, _ = reference(model, x, t, max_grad_norm=C, augmult=augmult)
    eng = _engine(model, max_grad_norm=C, augmult=augmult, loss_reduction=reduction)
    for xb, tb in split(x, t, [s * augmult for s in sizes]):  # (1, 4): a micro-batch of one example
        reduce_rows(row_loss(model(xb), tb), reduction).backward()
    summed, norms = eng.pop()
    assert (ref_norms > C).any() and (ref_norms < C).any()
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=1e-12)
    named = dict(model.named_parameters())
    assert {n for n, p in named.items() if p in summed} == set(ref)
    for n in ref:
        assert ref[n].abs().max() > 0, f"{n} has no gradient: the test would not see it"
        torch.testing.assert_close(summed[named[n]], ref[n], rtol=1e-9, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")
    assert all(p.grad is None for p in model.parameters()), "autograd never accumulates into the parameters"
    # every Linear and LayerNorm ran its own rule (planned), none went through the fallback
    layers = {n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.LayerNorm)}
    assert layers == {n for n, m in model.named_modules() if m in eng.plans}


def test_uses_are_found_by_provenance():
    torch.manual_seed(31)
    model = TokenNet()
    eng = _engine(model, max_grad_norm=1.0, augmult=2)
    x, t = TokenNet.inputs(6)
    row_loss(model(x), t).mean().backward()
    (layout,) = eng.layouts.values()
    uses = {key[1]: prov for key, (prov,) in layout.items() if isinstance(key[0], OwnedParameters)}
    # cls_token.expand (identical rows, checked by perturbing example 0's), + pos_embed, / temperature.exp()
    assert uses == {0: Batched(2), 1: Batched(2), 2: Batched(2)}


def test_float32_and_plain_forwards_use_the_real_parameters():
    torch.manual_seed(32)
    model = TokenNet()
    x, t = TokenNet.inputs(4)
    ref, _ = reference(model, x, t, max_grad_norm=0.5)
    with torch.no_grad():
        before = model(x)
    eng = _engine(model, max_grad_norm=0.5, loss_reduction="sum")
    row_loss(model(x), t).sum().backward()
    summed, _ = eng.pop()
    for n, p in model.named_parameters():
        torch.testing.assert_close(summed[p].double(), ref[n], rtol=2e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
        assert isinstance(model.cls_token, nn.Parameter)
    eng.detach()
    assert "forward" not in vars(model)


class MatmulToLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x @ self.w)


class QueryToLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.query) + x[:, :3]


class MatmulToOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) + F.linear(x, self.w.t())


class TableTimesParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.randn(4))
        self.register_buffer("table", torch.randn(5, 4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x + (self.table * self.p).mean(0))


@pytest.mark.parametrize(
    ("model", "error", "match"),
    [
        (MatmulToLayer, ProvenanceError, r"fc \(Linear\) gets a tensor computed from .*parameter\(s\) w .*matmul"),
        (QueryToLayer, ProvenanceError, r"fc \(Linear\) gets a tensor computed from model's own parameter\(s\) query"),
        (MatmulToOutput, RuntimeError, r"parameter 'w' of model \(MatmulToOutput.*cannot split per example"),
        (TableTimesParameter, ProvenanceError, r"parameter\(s\) p \(use 1 .*5 rows of a tensor that does not come"),
    ],
)  # fmt: skip
def test_uses_that_cannot_be_split_are_refused_by_name(model, error, match):
    torch.manual_seed(33)
    model = model()
    x, t = torch.randn(1, 4), torch.randn(1, 3)
    ref, _ = reference(model, x, t, max_grad_norm=0.5)
    eng = _engine(model, max_grad_norm=1.0)
    with pytest.raises(error, match=match):
        model(torch.randn(5, 4)).sum().backward()
    eng.pop()
    # with one example every row is its own: the same models are exact there
    eng.max_grad_norm = 0.5
    row_loss(model(x), t).mean().backward()
    summed, _ = eng.pop()
    for n, p in model.named_parameters():
        torch.testing.assert_close(summed[p].double(), ref[n], rtol=2e-5, atol=1e-6)


class MatmulWithActivation(nn.Module):
    """Own parameters and a child without parameters: nothing to keep on a rule, so the whole module is a leaf for the
    engine and goes through the torch.func fallback, which takes x @ w (refused above where children have rules)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))
        self.act = nn.Tanh()

    def forward(self, x):
        return self.act(x @ self.w)


def test_module_whose_children_have_no_parameters_stays_on_the_fallback():
    torch.manual_seed(34)
    model = nn.Sequential(nn.Linear(4, 4), MatmulWithActivation())
    x, t = torch.randn(5, 4), torch.randn(5, 3)
    _, ref_norms = reference(model, x, t, max_grad_norm=float("inf"))
    ref, _ = reference(model, x, t, max_grad_norm=ref_norms.median().item())
    with pytest.warns(UserWarning, match=r"1 \(MatmulWithActivation\).*torch.func fallback"):
        eng = GradSampleEngine(model, max_grad_norm=ref_norms.median().item())
    row_loss(model(x), t).mean().backward()
    summed, _ = eng.pop()
    for n, p in model.named_parameters():
        torch.testing.assert_close(summed[p].double(), ref[n], rtol=2e-5, atol=1e-6)
