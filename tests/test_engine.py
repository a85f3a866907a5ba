"""Every rule and plan strategy against the float64 per-example loop (tests/conftest.py::reference)."""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import pytest
import torch
from conftest import BACKENDS, reference, row_loss, run_engine, seed_of, split
from models import MODELS, Conv2dNet, SharedNet

from fastdp.engine import GradSampleEngine
from fastdp.rules import rule_for

#: the layers each strategy runs on when forced, by model, in model order: those whose rule offers it. Every other
#: layer must not offer it (conftest.forced_strategy_layers checks that a layer that offers it ran it). A model that
#: offers a strategy nowhere is not run with it forced: that run would be the planned one (strategy=None) by another
#: name; test_strategy_table_is_what_the_rules_offer checks those models too.
STRATEGY_LAYERS = {
    "keep": {  # every rule, the torch.func fallback (shared.scale) included
        "seq": ["emb", "ln", "fc1", "fc2"],
        "conv1d": ["c1", "c2", "gn", "fc"],
        "conv2d": ["c1", "c2", "c3", "gn", "fc"],
        "conv3d": ["c", "c2", "fc"],
        "ws": ["c1", "c2", "c3", "fc"],
        "shared": ["emb", "mix", "gain.inner", "out", "scale"],
    },
    # Conv1d and Conv2d (WS ones too) with groups=1; not Conv3d
    "unfold": {"conv1d": ["c1", "c2"], "conv2d": ["c1", "c3"], "ws": ["c1"]},
    "unfold_bk": {"conv1d": ["c1", "c2"], "conv2d": ["c1", "c3"], "ws": ["c1"]},
    # Linear and every conv
    "instantiate_bk": {
        "seq": ["fc1", "fc2"],
        "conv1d": ["c1", "c2", "fc"],
        "conv2d": ["c1", "c2", "c3", "fc"],
        "conv3d": ["c", "c2", "fc"],
        "ws": ["c1", "c2", "c3", "fc"],
        "shared": ["mix", "gain.inner", "out"],
    },
    # Linear, and Conv1d and Conv2d (WS ones too) with groups=1
    "ghost": {
        "seq": ["fc1", "fc2"],
        "conv1d": ["c1", "c2", "fc"],
        "conv2d": ["c1", "c3", "fc"],
        "conv3d": ["fc"],
        "ws": ["c1", "fc"],
        "shared": ["mix", "gain.inner", "out"],
    },
    # convs with stride 1, any dimension and groups
    "shifted_ghost": {"conv1d": ["c2"], "conv2d": ["c1", "c2"], "conv3d": ["c2"], "ws": ["c1", "c3"]},
}
#: (model, forced strategy): planned for every model, each strategy on the models that offer it somewhere
CASES = [(name, None) for name in sorted(MODELS)] + [
    (name, strategy) for strategy, by_model in STRATEGY_LAYERS.items() for name in sorted(by_model)
]


@pytest.mark.parametrize("name, strategy", CASES)
@pytest.mark.parametrize("augmult", [1, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rules_match_float64_loop(name, strategy, augmult, reduction, backend):
    torch.manual_seed(seed_of(name, strategy, augmult, reduction))
    model = MODELS[name]()
    examples = 5
    x, t = MODELS[name].inputs(examples * augmult)
    ref, ref_norms = reference(model, x, t, max_grad_norm=float("inf"), augmult=augmult)
    # clip about half of the examples: C at the median norm
    C = ref_norms.median().item()
    ref, _ = reference(model, x, t, max_grad_norm=C, augmult=augmult)
    sizes = [2 * augmult, 3 * augmult]  # two micro-batches in one logical batch
    got, norms, plans = run_engine(
        model,
        split(x, t, sizes),
        max_grad_norm=C,
        augmult=augmult,
        reduction=reduction,
        strategy=strategy,
        backend=backend,
    )
    if strategy is not None:
        assert [n for n, s in plans.items() if s == strategy] == STRATEGY_LAYERS[strategy][name]
    assert (ref_norms > C).any() and (ref_norms < C).any()
    torch.testing.assert_close(norms.double(), ref_norms, rtol=2e-5, atol=1e-7)
    assert set(got) == set(ref), "every trainable parameter gets a clipped sum"
    # each clipped term has norm <= C and float32 rounds it at ~1e-7 relative, so the sum over `examples` terms
    # is good to ~examples * C * 1e-7 absolutely, however much the terms cancel
    for n in ref:
        torch.testing.assert_close(
            got[n].double(), ref[n], rtol=2e-5, atol=2e-6 * examples * C, msg=lambda m, n=n: f"{n}: {m}"
        )


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("augmult", [1, 3])
def test_strategy_table_is_what_the_rules_offer(name, augmult):
    """STRATEGY_LAYERS lists, for every model, exactly the layers whose plan candidates include each strategy."""
    torch.manual_seed(seed_of(name, augmult))
    model = MODELS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning (shared.scale)
        eng = GradSampleEngine(model, max_grad_norm=1.0, augmult=augmult, autotune=False)
    x, t = MODELS[name].inputs(2 * augmult)
    row_loss(model(x), t).mean().backward()
    eng.pop()
    for strategy, by_model in STRATEGY_LAYERS.items():
        offered = [n for n, m in model.named_modules() if m in eng.plans and strategy in eng.plan_costs[m]]
        assert offered == by_model.get(name, []), strategy


@pytest.mark.parametrize("strategy", ["unfold", "no_such_strategy"])
def test_forced_strategy_that_no_layer_offers_is_reported(strategy):
    """Seq has no conv, so no layer offers "unfold"; no layer anywhere offers a misspelt name. Either way the caller
    asked for something that will not run and must be told, not given the planned result under that name."""
    torch.manual_seed(7)
    model = MODELS["seq"]()
    x, t = MODELS["seq"].inputs(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            eng = GradSampleEngine(model, max_grad_norm=1.0, strategy=strategy)
            row_loss(model(x), t).mean().backward()
            eng.pop()
        except ValueError as e:
            assert strategy in str(e), e
            return
    assert strategy != "no_such_strategy", "an unknown strategy name must be a ValueError"
    assert any(strategy in str(w.message) for w in caught), [str(w.message) for w in caught]


@pytest.mark.parametrize("name", ["conv2d", "ws", "seq"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_model_is_exact(name, backend):
    torch.manual_seed(1)
    model = MODELS[name]().double()
    x, t = MODELS[name].inputs(4)
    x = x.double() if x.is_floating_point() else x
    ref, ref_norms = reference(model, x, t.double(), max_grad_norm=0.3)
    got, norms, _ = run_engine(model, [(x, t.double())], max_grad_norm=0.3, backend=backend)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=1e-12)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12)


def test_automatic_clipping():
    torch.manual_seed(2)
    model = Conv2dNet()
    x, t = Conv2dNet.inputs(4)
    ref, _ = reference(model, x, t, max_grad_norm=0.5, clipping="automatic", gamma=0.01)
    got, _, _ = run_engine(model, [(x, t)], max_grad_norm=0.5, clipping="automatic")
    for n in ref:
        torch.testing.assert_close(got[n].double(), ref[n], rtol=2e-5, atol=1e-7)


def test_bf16_autocast_error_within_twice_plain_torch():
    """Under bf16 autocast our norms are as close to float64 as plain torch's bf16 per-example gradients."""
    torch.manual_seed(3)
    model = Conv2dNet()
    x, t = Conv2dNet.inputs(4)
    _, ref_norms = reference(model, x, t, max_grad_norm=float("inf"))
    plain = copy.deepcopy(model)
    torch_norms = []
    for i in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = row_loss(plain(x[i : i + 1]), t[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, list(plain.parameters()))
        torch_norms.append(torch.sqrt(sum(g.double().square().sum() for g in grads)))
    torch_err = (torch.stack(torch_norms) - ref_norms).abs().max().item()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eng = GradSampleEngine(model, max_grad_norm=1e9, loss_reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = row_loss(model(x), t).sum()
    loss.backward()
    _, norms = eng.pop()
    assert norms.dtype == torch.float32
    ours = (norms.double() - ref_norms).abs().max().item()
    assert ours <= 2 * torch_err + 1e-6 * ref_norms.max().item(), (ours, torch_err)


def test_nonfinite_example_contributes_zero():
    torch.manual_seed(4)
    model = Conv2dNet()
    x, t = Conv2dNet.inputs(4)
    x_bad = x.clone()
    x_bad[2, 0, 0, 0] = float("nan")
    keep = [0, 1, 3]
    ref, _ = reference(model, x[keep], t[keep], max_grad_norm=0.5)
    eng = GradSampleEngine(model, max_grad_norm=0.5, loss_reduction="sum")
    row_loss(model(x_bad), t).sum().backward()
    summed, norms = eng.pop()
    assert eng.nonfinite_examples == 1 and not torch.isfinite(norms[2])
    for n, p in model.named_parameters():
        assert torch.isfinite(summed[p]).all()
        torch.testing.assert_close(summed[p].double(), ref[n], rtol=2e-5, atol=1e-7)


def test_example_whose_norm_overflows_is_dropped_and_counted():
    """An input of 1e20 gives gradients of ~1e40: inf in float32, and an inf norm without any NaN. The example is
    dropped (weight 0, counted as non-finite) like a NaN one, and the others are clipped as without it."""
    torch.manual_seed(4)
    model = torch.nn.Linear(5, 3)
    x, t = torch.randn(4, 5), torch.randn(4, 3)
    x_bad = x.clone()
    x_bad[2, 0] = 1e20
    keep = [0, 1, 3]
    ref, _ = reference(model, x[keep], t[keep], max_grad_norm=0.5)
    eng = GradSampleEngine(model, max_grad_norm=0.5, loss_reduction="sum")
    row_loss(model(x_bad), t).sum().backward()
    summed, norms = eng.pop()
    assert torch.isinf(norms[2]) and eng.nonfinite_examples == 1
    for n, p in model.named_parameters():
        torch.testing.assert_close(summed[p].double(), ref[n], rtol=2e-5, atol=1e-7)


def test_fallback_warns_once_and_names_module():
    with pytest.warns(UserWarning, match=r"scale \(Scale\).*torch.func"):
        GradSampleEngine(SharedNet(), max_grad_norm=1.0)


def test_batchnorm_is_refused_with_the_fix():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"1 is a BatchNorm2d.*replace_batchnorm"):
        GradSampleEngine(model, max_grad_norm=1.0)
    from fastdp.nn import replace_batchnorm

    GradSampleEngine(replace_batchnorm(model), max_grad_norm=1.0)


def test_backward_twice_through_one_forward_is_refused():
    model = Conv2dNet()
    GradSampleEngine(model, max_grad_norm=1.0)
    x, t = Conv2dNet.inputs(2)
    loss = row_loss(model(x), t).mean()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_parameter_used_outside_its_module_is_refused():
    class Leaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3)
            self.b = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.b(x) + torch.nn.functional.linear(x, self.a.weight)

    model = Leaky()
    GradSampleEngine(model, max_grad_norm=1.0)
    with pytest.raises(RuntimeError, match=r"'a.weight' received an ordinary"):
        model(torch.randn(2, 3)).sum().backward()


def test_empty_micro_batch_is_refused_with_what_to_do():
    model = Conv2dNet()
    GradSampleEngine(model, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="empty micro-batch"):
        model(Conv2dNet.inputs(0)[0])
    with torch.no_grad():
        assert model(Conv2dNet.inputs(0)[0]).shape[0] == 0  # evaluation of nothing is fine


def test_augmult_rows_must_divide():
    model = Conv2dNet()
    GradSampleEngine(model, max_grad_norm=1.0, augmult=2)
    x, t = Conv2dNet.inputs(3)
    with pytest.raises(ValueError, match="augmult=2"):
        row_loss(model(x), t).mean().backward()


def test_no_grad_forward_and_detach_restore_plain_model():
    torch.manual_seed(5)
    model = Conv2dNet()
    plain = copy.deepcopy(model)
    eng = GradSampleEngine(model, max_grad_norm=1.0)
    x, _ = Conv2dNet.inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))
    torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-6)
    eng.detach()
    assert "forward" not in vars(model.c1)


def test_memory_budget_steers_the_plan():
    """With no budget the plan may keep per-example gradients; with a zero budget every layer takes the
    strategy that holds the least memory (and the result stays exact)."""
    torch.manual_seed(6)
    model = Conv2dNet()
    x, t = Conv2dNet.inputs(4)
    ref, _ = reference(model, x, t, max_grad_norm=0.5)
    eng = GradSampleEngine(model, max_grad_norm=0.5, memory_budget=0, autotune=False)
    row_loss(model(x), t).mean().backward()
    summed, _ = eng.pop()
    assert any(len(c) > 1 for c in eng.plan_costs.values())
    for module, (_, choice) in eng.plans.items():
        costs = eng.plan_costs[module]
        assert costs[choice].memory == min(c.memory for c in costs.values()), (module, choice)
    for n, p in model.named_parameters():
        torch.testing.assert_close(summed[p].double(), ref[n], rtol=2e-5, atol=2e-6 * ref[n].abs().max().item())


class _Raises(torch.autograd.Function):
    """Identity forward; its backward raises (a failing node of the user's, midway through the backward)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("a node of the user's failed")


def test_a_backward_that_raises_midway_leaves_nothing_behind():
    """The layers after the failing node (in backward order) recorded their contributions, but the backward ended
    before its finalize: the next backward starts a pass of its own (with a warning) and its sums are the loop's
    over its own examples, not added to the stale ones (nor, as before this was handled, lost in them)."""
    torch.manual_seed(8)
    model = Conv2dNet()
    eng = GradSampleEngine(model, max_grad_norm=0.5, loss_reduction="sum", backend="torch")
    x, t = Conv2dNet.inputs(4)
    hook = model.c2.register_forward_hook(lambda mod, inp, out: _Raises.apply(out))
    with pytest.raises(RuntimeError, match="a node of the user's failed"):
        row_loss(model(x), t).sum().backward()  # c3, gn and fc recorded before it raised
    hook.remove()
    x2, t2 = Conv2dNet.inputs(5)
    ref, _ = reference(model, x2, t2, max_grad_norm=0.5)
    with pytest.warns(UserWarning, match="an earlier backward raised before it finished"):
        row_loss(model(x2), t2).sum().backward()
    summed, norms = eng.pop()
    assert norms.shape == (5,)
    for n, p in model.named_parameters():
        torch.testing.assert_close(summed[p].double(), ref[n], rtol=2e-5, atol=2e-6 * ref[n].abs().max().item())


def test_a_restored_plan_drops_the_candidates_of_an_earlier_one():
    """A plan restored over one this engine made for another input keeps none of that plan's candidates (they need
    not include the restored choice): a later plan under a numeric budget, which sums the other layers' chosen
    costs, would look it up among them."""
    torch.manual_seed(9)
    net = lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(1))  # noqa: E731
    model = net()
    eng = GradSampleEngine(model, max_grad_norm=1.0, autotune=False, memory_budget=1 << 30)
    model(torch.randn(4, 3, 8, 8)).square().sum().backward()
    eng.pop()
    offered = set(eng.plan_costs[model[0]])
    absent = sorted(set(rule_for(model[0]).strategy_names) - offered)[0]  # a choice those candidates lack
    shape, dtype, _, rows = eng.plan_state()["0"]
    eng.load_plan_state({"0": ([3, 12, 12], dtype, absent, rows)})
    assert model[0] not in eng.plan_costs and eng.plans[model[0]][1] == absent


def test_running_statistics_of_the_private_batch_are_refused():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
    )
    with pytest.raises(
        ValueError, match=r"1 \(InstanceNorm2d\) has track_running_stats=True.*track_running_stats=False"
    ):
        GradSampleEngine(model, max_grad_norm=1.0)
    model[1] = torch.nn.InstanceNorm2d(4, affine=True)
    GradSampleEngine(model, max_grad_norm=1.0)


def test_buffer_updated_from_the_batch_is_refused_and_put_back():
    class RunningMean(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)
            self.register_buffer("mean", torch.zeros(4))

        def forward(self, x):
            if self.training:
                self.mean.mul_(0.9).add_(0.1 * x.mean(0))
            return self.fc(x - self.mean)

    model = RunningMean()
    GradSampleEngine(model, max_grad_norm=1.0)
    with pytest.raises(RuntimeError, match=r"updated the buffer\(s\) mean from the private batch"):
        model(torch.randn(5, 4) + 3)
    assert torch.equal(model.mean, torch.zeros(4)), "the first forward's statistics are put back"
    model.eval()
    model(torch.randn(5, 4)).sum().backward()  # eval mode does not update it


def test_norms_and_clipped_sums_use_full_fp32_whatever_tf32_allows(monkeypatch):
    """cuDNN's TF32 default (and a user's set_float32_matmul_precision("high")) must not reach the norms or the
    clipped sums: their inputs would be rounded to 10 bits, and C enforced only to ~1e-3."""
    from fastdp.engine import precision

    # what the user (or cuDNN's default) chose; set and restored by hand: these are not plain attributes, which
    # pytest's monkeypatch (9.2) cannot restore
    chosen = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in precision._KNOBS]
    for mod, attr, _ in chosen:
        setattr(mod, attr, "tf32" if attr == "fp32_precision" else True)
    try:
        _run_and_check_precision(monkeypatch, precision)
    finally:
        for mod, attr, value in chosen:
            setattr(mod, attr, value)


def _run_and_check_precision(monkeypatch, precision):
    from fastdp.engine import contributions
    from fastdp.rules.ws_conv import WSConvRule

    seen = []

    def spy(fn, what):
        def wrapped(*a, **k):
            seen.append((what, tuple(getattr(mod, attr) for mod, attr, _ in precision._KNOBS)))
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(WSConvRule, "contributions", spy(WSConvRule.contributions, "norm"))
    monkeypatch.setattr(WSConvRule, "compute", spy(WSConvRule.compute, "ws forward"))
    monkeypatch.setattr(contributions.Kept, "weighted_sum", spy(contributions.Kept.weighted_sum, "clipped sum"))
    torch.manual_seed(4)
    model = MODELS["ws"]()
    x, t = MODELS["ws"].inputs(4)
    _, _, plans = run_engine(model, [(x, t)], max_grad_norm=1.0, strategy="ghost")
    assert [n for n, s in plans.items() if s == "ghost"] == STRATEGY_LAYERS["ghost"]["ws"]
    full = tuple(value for _, _, value in precision._KNOBS)
    assert {what for what, _ in seen} == {"norm", "ws forward", "clipped sum"}
    assert all(flags == full for _, flags in seen), seen
    assert all(getattr(mod, attr) in ("tf32", True) for mod, attr, _ in precision._KNOBS), "restored afterwards"


def test_autotuning_times_the_backward_outside_autocast(monkeypatch):
    """The plan is made inside the forward, under the user's autocast; the strategies it times must run as the backward
    will, outside it (else a bf16 forward times bf16 per-example gradients that the backward never forms)."""
    from fastdp.rules.conv import ConvRule

    seen = []
    contributions = ConvRule.contributions

    def spy(self, call, saved, grad_out, augmult):
        seen.append(torch.is_autocast_enabled("cpu"))
        return contributions(self, call, saved, grad_out, augmult)

    monkeypatch.setattr(ConvRule, "contributions", spy)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(12, 2))
    engine = GradSampleEngine(model, max_grad_norm=1.0, autotune=True, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(4, 2, 4, 4)).float().square().sum()
    loss.backward()
    assert len(seen) > 1 and not any(seen), seen  # the timed candidates, then the backward itself
    engine.detach()


@pytest.mark.parametrize("kind", ["weight_norm_linear", "orthogonal_linear", "weight_norm_conv"])
def test_parametrized_layers_are_exact_through_the_fallback(kind):
    """A weight computed from other parameters (torch.nn.utils.parametrizations) crashed the engine with a bare
    IndexError; the parametrized layer now runs through the torch.func fallback, exact against the float64 loop."""
    from torch.nn.utils.parametrizations import orthogonal, weight_norm

    torch.manual_seed(31)
    if kind == "weight_norm_conv":
        model = torch.nn.Sequential(
            torch.nn.Conv2d(2, 3, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(12, 2)
        )
        x = torch.randn(5, 2, 4, 4)
    else:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        x = torch.randn(5, 4)
    (orthogonal if kind == "orthogonal_linear" else weight_norm)(model[0])
    t = torch.randn(5, 2)
    ref, _ = reference(model, x, t, max_grad_norm=0.3)
    with pytest.warns(UserWarning, match=r"0 \(.*\) has a parametrized weight"):
        eng = GradSampleEngine(model, max_grad_norm=0.3)
    row_loss(model(x), t).mean().backward()
    summed, _ = eng.pop()
    assert set(summed) == set(model.parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(summed[p].double(), ref[n], rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("hook", ["weight_norm", "spectral_norm"])
def test_hook_reparametrizations_are_refused_by_name(hook):
    """torch.nn.utils.weight_norm / spectral_norm (forward pre-hooks recomputing the weight): the rule would read the
    weight as a plain tensor and weight_g/weight_v (weight_orig) would silently never train."""
    layer = getattr(torch.nn.utils, hook)(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"fc \(Linear\) has a (WeightNorm|SpectralNorm) forward pre-hook"):
        GradSampleEngine(torch.nn.Sequential(OrderedDict(fc=layer)), max_grad_norm=1.0)


def test_a_parameter_its_rule_does_not_know_is_refused_by_name():
    """torch.nn.utils.prune reparametrizes a Linear's weight as weight_orig * weight_mask in a forward pre-hook: the
    Linear rule reads the weight as a tensor and weight_orig would get no per-example gradient (noise only, silently).
    Every trainable parameter a rule takes must leave a contribution: checked once per layer, refused by name."""
    from torch.nn.utils import prune

    torch.manual_seed(32)
    model = torch.nn.Sequential(OrderedDict(fc=torch.nn.Linear(4, 3), out=torch.nn.Linear(3, 2)))
    prune.l1_unstructured(model.fc, "weight", amount=0.5)
    GradSampleEngine(model, max_grad_norm=1.0)
    with pytest.raises(RuntimeError, match=r"fc \(Linear\): its rule \(LinearRule\) .* parameter\(s\) 'weight_orig'"):
        row_loss(model(torch.randn(4, 4)), torch.randn(4, 2)).sum().backward()
