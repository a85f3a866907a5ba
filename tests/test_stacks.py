"""Same-shape book-keeping layers finished as one stack (fastdp.engine.stacks) against the float64 per-example loop:
both torch book-keeping plans, augmult, micro-batches (of growing and shrinking sizes, so that the workspace's
buffers are grown and reused), both reductions, dropped (non-finite) examples, and stacks split by their byte cap;
the workspace (fastdp.engine.workspace) keeps the copies in the same memory and nothing handed out aliases it."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from conftest import assert_exact, reference, row_loss, seed_of
from torch import nn

import fastdp.engine.engine as engine_module
import fastdp.engine.stacks as stacks_module
from fastdp.engine import GradSampleEngine
from fastdp.engine.workspace import Workspace
from fastdp.rules.linear import LinearBookKeeping, LinearStack


class Tower(nn.Module):
    """Tokens through three 6 -> 6 Linear layers (one stackable shape), a 6 -> 5 one and a 6 -> 6 one called twice
    (its two calls are summed per example: never stacked)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(6, 6) for _ in range(3))
        self.twice = nn.Linear(6, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b(x)) + x
        x = self.twice(torch.tanh(self.twice(x)))
        return self.head(x)

    @staticmethod
    def inputs(n: int, tokens: int = 4):
        return torch.randn(n, tokens, 6), torch.randn(n, tokens, 5)


@pytest.fixture
def stacked(monkeypatch):
    """The stacks each backward finished: a list of (class, number of layers) per backward."""
    seen: list[list[tuple[str, int]]] = []
    gather = engine_module.gather_stacks

    def spy(contributions, buffers):
        out = gather(contributions, buffers)
        seen.append([(type(s).__name__, len(s.params)) for s in out])
        return out

    monkeypatch.setattr(engine_module, "gather_stacks", spy)
    return seen


@pytest.mark.parametrize("sizes", [(6,), (2, 4), (4, 2, 6)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("augmult", [1, 2])
@pytest.mark.parametrize("strategy", ["ghost", "instantiate_bk"])
def test_stacked_layers_match_the_loop(strategy, augmult, reduction, sizes, stacked):
    torch.manual_seed(seed_of(strategy, augmult, reduction, sizes))
    model = Tower()
    x, t = Tower.inputs(sum(sizes))  # sizes are rows: augmult views per example
    plans = assert_exact(model, x, t, sizes, augmult=augmult, reduction=reduction, strategy=strategy)
    assert set(plans.values()) == {strategy}
    # the three blocks are stacked in every backward; the layer called twice and the head are not
    assert stacked == [[("LinearStack", 3)]] * len(sizes)


def test_stacks_split_at_their_byte_cap(monkeypatch, stacked):
    torch.manual_seed(7)
    model = Tower()
    x, t = Tower.inputs(6)
    one = 6 * 4 * (6 + 6) * 4  # a block's a and delta in float32
    monkeypatch.setattr(stacks_module, "STACK_MAX_BYTES", 2 * one)
    assert_exact(model, x, t, (6,), strategy="ghost")
    assert stacked == [[("LinearStack", 2)]]  # the third block alone: finished as a layer


@pytest.mark.parametrize("strategy", ["ghost", "instantiate_bk"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_stacked_dropped_example_contributes_zero(strategy, value, stacked):
    """A non-finite example (NaN or inf in its input: its rows of every stacked layer's operands are non-finite) is
    selected away from the stacks: the clipped sums are the loop's over the finite examples."""
    torch.manual_seed(seed_of(strategy, value))
    model = Tower()
    x, t = Tower.inputs(5)
    keep = [0, 1, 3, 4]
    ref, _ = reference(model, x[keep], t[keep], max_grad_norm=0.3)
    bad = x.clone()
    bad[2, 1, 0] = value
    eng = GradSampleEngine(model, max_grad_norm=0.3, loss_reduction="sum", strategy=strategy, backend="torch")
    row_loss(model(bad), t).sum().backward()
    summed, norms = eng.pop()
    assert stacked == [[("LinearStack", 3)]]
    assert not torch.isfinite(norms[2]) and torch.isfinite(norms[keep]).all()
    for n, p in model.named_parameters():
        assert torch.isfinite(summed[p]).all(), n
        torch.testing.assert_close(summed[p].double(), ref[n], rtol=2e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")


def test_a_stack_is_each_layers_sum_and_norm_and_leaves_the_operands_alone():
    """Against float64 einsums, one dropped example (weight 0) holding NaN; the layers' own a and delta (which the
    stack copied, then scaled and masked in place) are unchanged."""
    torch.manual_seed(3)
    layers = [nn.Linear(6, 6) for _ in range(2)]
    a, d = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4, 6)
    a[:, 1, 2, 3] = float("nan")
    before = a.clone(), d.clone()
    members = [(layers[i].weight, LinearBookKeeping(a[i], d[i], None)) for i in range(2)]
    stack = LinearStack(members)
    w = torch.tensor([0.5, 0.0, 2.0])
    sq = stack.sq_norm()
    total = stack.weighted_sum(w)
    keep = [0, 2]
    for i, (p, _) in enumerate(members):
        g = torch.einsum("btp,btd->bpd", d[i, keep].double(), a[i, keep].double())
        got = stack.split(total)[p]
        assert got.shape == p.shape
        torch.testing.assert_close(got.double(), torch.einsum("b,bpd->pd", w[keep].double(), g), rtol=1e-5, atol=1e-6)
    ref_sq = sum(torch.einsum("btp,btd->bpd", d[i].double(), a[i].double()).square().sum((1, 2)) for i in range(2))
    torch.testing.assert_close(sq.double()[keep], ref_sq[keep], rtol=1e-5, atol=1e-6)
    assert sq[1].isnan()
    torch.testing.assert_close((a, d), before, equal_nan=True, rtol=0, atol=0)


def test_the_stacks_copy_into_the_same_memory_every_backward_and_nothing_handed_out_aliases_it(stacked):
    """On the CPU the second backward's stacks are views of the first one's buffers (no new allocation, no page
    faults), and the clipped sums of the first, handed out before the second ran, are unchanged by it."""
    torch.manual_seed(11)
    model = Tower()
    eng = GradSampleEngine(model, max_grad_norm=0.3, loss_reduction="sum", strategy="ghost", backend="torch")
    seen = []
    stack_init = LinearStack.__init__

    def spy(self, members, buffers):
        stack_init(self, members, buffers)
        seen.append((self.a.untyped_storage().data_ptr(), self.d.untyped_storage().data_ptr()))

    with pytest.MonkeyPatch.context() as m:
        m.setattr(LinearStack, "__init__", spy)
        x, t = Tower.inputs(5)
        row_loss(model(x), t).sum().backward()
        first, _ = eng.pop()
        first = {p: s.clone() for p, s in first.items()} | {"views": first}
        held = eng.workspace.nbytes
        x2, t2 = Tower.inputs(5)
        row_loss(model(x2), t2).sum().backward()
        second, _ = eng.pop()
    assert stacked == [[("LinearStack", 3)]] * 2
    held_at = {b.data_ptr() for b in eng.workspace._buffers.values()}
    assert seen[0] == seen[1] and set(seen[0]) <= held_at  # the workspace's own buffers, not a recycled block
    assert held == eng.workspace.nbytes == 3 * 5 * 4 * (6 + 6) * 4  # a and delta of the 3 blocks, float32
    for p, s in first["views"].items():
        torch.testing.assert_close(s, first[p], rtol=0, atol=0)
        assert not torch.equal(s, second[p])


def test_a_workspace_slot_grows_by_an_eighth_and_is_reused_for_smaller_requests():
    ws = Workspace()
    like = torch.empty(0)
    a = ws.take("s", (4, 100), like)
    assert ws.nbytes == 400 * 4
    b = ws.take("s", (3, 100), like)  # smaller: a view of the same buffer
    assert b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr() and b.shape == (3, 100)
    ws.take("s", (401,), like)  # one more element: the buffer grows by an eighth
    assert ws.nbytes == 450 * 4
    ws.take("s", (1000,), like)  # more than an eighth: to the request
    assert ws.nbytes == 1000 * 4
    ws.take("s", (10,), like.double())  # another dtype: its own buffer in that slot
    assert ws.nbytes == 10 * 8
    # where the device caches (here: meta, and anything not in HELD) nothing is held
    assert ws.take("m", (7,), torch.empty(0, device="meta")).shape == (7,)
    assert ws.nbytes == 10 * 8
    take = ws.buffers("t")  # one clip step's allocator: slots in the order asked
    assert take((2,), like).untyped_storage().data_ptr() != take((2,), like).untyped_storage().data_ptr()
    assert ws.buffers("t")((2,), like).untyped_storage().data_ptr() == ws.take(("t", 0), (2,), like).data_ptr()


def test_stacked_layers_release_their_operands_once_copied(monkeypatch):
    """After the stacks are formed, the clip step holds one copy of the stacked layers' operands, not two: each member
    dropped its a and delta, and no other reference kept those tensors alive (the output gradients are freed)."""
    torch.manual_seed(13)
    model = Tower()
    GradSampleEngine(model, max_grad_norm=0.3, loss_reduction="sum", strategy="ghost", backend="torch")
    gather, seen = engine_module.gather_stacks, {}

    def spy(contributions, buffers):
        before = {p: (c, weakref.ref(c.d)) for p, c in contributions.items() if isinstance(c, LinearBookKeeping)}
        out = gather(contributions, buffers)
        gc.collect()
        seen.update({p: (c.a is None and c.d is None, ref() is None) for p, (c, ref) in before.items()})
        return out

    monkeypatch.setattr(engine_module, "gather_stacks", spy)
    x, t = Tower.inputs(5)
    row_loss(model(x), t).sum().backward()
    stacked = {b.weight for b in model.blocks}
    assert {p for p, (released, freed) in seen.items() if released and freed} == stacked


def test_stacks_under_create_graph_record_autograd_and_match_the_loop():
    """``backward(create_graph=True)``: the operands require grad, and a copy into a workspace buffer (``out=``)
    cannot record autograd; the stacks are then new tensors, and the sums are the loop's."""
    torch.manual_seed(17)
    model = Tower()
    x, t = Tower.inputs(5)
    ref, _ = reference(model, x, t, max_grad_norm=0.3)
    eng = GradSampleEngine(model, max_grad_norm=0.3, loss_reduction="sum", strategy="ghost", backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on backward(create_graph=True) and .grad cycles
        row_loss(model(x), t).sum().backward(create_graph=True)
    summed, _ = eng.pop()
    for n, p in model.named_parameters():
        torch.testing.assert_close(summed[p].double(), ref[n], rtol=2e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
