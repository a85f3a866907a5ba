"""DPSGD / DPOptimizer: clipped sum against the float64 loop, noise statistics, accounting, state, errors."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from conftest import BACKENDS, reference, row_loss
from models import Conv2dNet, WSNet

import fastdp
from fastdp.accounting import compute_epsilon
from fastdp.backends import available_backends


def stepped_gradient(model, opt, lr):
    """The gradient the step applied, read off the update (plain SGD: p <- p - lr * g): the fused step does not
    write p.grad."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return {n: (before[n] - p.detach()) / lr for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("micro", [1, 3])
@pytest.mark.parametrize("augmult", [1, 2])
def test_dpsgd_gradient_is_clipped_sum_over_expected_batch(micro, augmult, backend):
    torch.manual_seed(10 + micro + augmult)
    model = WSNet()
    B, expected = 6, 8
    x, t = WSNet.inputs(B * augmult)
    _, norms = reference(model, x, t, float("inf"), augmult)
    C = norms.median().item()
    ref, _ = reference(model, x, t, C, augmult)
    with pytest.warns(UserWarning, match="noise_multiplier=0"):
        opt = fastdp.DPSGD(
            model,
            lr=1.0,
            momentum=0.9,  # the first step of momentum SGD applies the gradient itself
            noise_multiplier=0.0,
            max_grad_norm=C,
            expected_batch_size=expected,
            augmult=augmult,
            backend=backend,
        )
    rows = B * augmult // micro
    for i in range(micro):
        sl = slice(i * rows, (i + 1) * rows)
        row_loss(model(x[sl]), t[sl]).mean().backward()
    grads = stepped_gradient(model, opt, 1.0)
    for n, g in grads.items():
        r = ref[n] / expected  # float32 summation order: errors scale with the tensor's largest entry
        # the update is read back from float32 parameters of size ~1: 1e-7 absolute on top
        torch.testing.assert_close(g.double(), r, rtol=2e-5, atol=2e-6 * r.abs().max().item() + 2e-7)
    torch.testing.assert_close(opt.per_sample_norms.double(), norms, rtol=2e-5, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpoptimizer_wraps_adam_and_matches_manual_update(backend):
    torch.manual_seed(11)
    model = Conv2dNet()
    twin = copy.deepcopy(model)
    x, t = Conv2dNet.inputs(4)
    ref, _ = reference(model, x, t, 0.7)
    with pytest.warns(UserWarning):
        opt = fastdp.DPOptimizer(
            torch.optim.Adam(model.parameters(), lr=1e-2),
            model,
            noise_multiplier=0.0,
            max_grad_norm=0.7,
            expected_batch_size=4,
            backend=backend,
        )
    row_loss(model(x), t).mean().backward()
    opt.step()
    adam = torch.optim.Adam(twin.parameters(), lr=1e-2)
    for n, p in twin.named_parameters():
        p.grad = (ref[n] / 4).float()
    adam.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _noise_model():
    # 1000 x 1000 weights with zero inputs: every per-example gradient is exactly 0, so the update is noise only
    return torch.nn.Linear(1000, 1000, bias=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("micro_batches", [0, 1, 4])
def test_noise_once_per_logical_batch(micro_batches, backend):
    """Empirical std of grad over 1e6 coordinates is sigma*C/B whatever the number of micro-batches.

    Bounds: the sample mean of n=1e6 N(0, s^2) has std s/1e3, we allow 5 of those; the sample std has relative
    std 1/sqrt(2n) = 7.1e-4, we allow 5x (3.5e-3). Noise drawn once per micro-batch would give sqrt(4)x.
    """
    model = _noise_model()
    sigma, C, B = 2.0, 0.5, 10
    opt = fastdp.DPSGD(
        model, lr=1.0, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=B, sample_size=1000, seed=123,
        backend=backend,
    )  # fmt: skip
    for _ in range(micro_batches):
        model(torch.zeros(3, 1000)).sum().backward()
    g = stepped_gradient(model, opt, 1.0)["weight"].double().flatten()
    s = sigma * C / B
    assert g.numel() >= 1_000_000
    assert abs(g.mean().item()) < 5 * s / math.sqrt(g.numel())
    assert abs(g.std().item() / s - 1) < 5 / math.sqrt(2 * g.numel())
    assert opt.accountant.steps == 1  # an empty batch is a step for the accountant too


def test_epsilon_goes_through_the_accountant_and_calibration_meets_target():
    model = Conv2dNet()
    opt = fastdp.DPSGD(
        model,
        lr=0.1,
        target_epsilon=2.0,
        target_delta=1e-5,
        sample_size=1000,
        expected_batch_size=50,
        steps=20,
        max_grad_norm=1.0,
    )
    sigma = opt.noise_multiplier
    for _ in range(20):
        opt.step()
    eps = opt.epsilon(1e-5)
    assert eps == pytest.approx(compute_epsilon(sigma, 0.05, 20, 1e-5), rel=1e-9)
    assert eps <= 2.0


def test_nonfinite_example_never_reaches_parameters():
    torch.manual_seed(12)
    model = Conv2dNet()
    opt = fastdp.DPSGD(model, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, seed=0)
    x, t = Conv2dNet.inputs(4)
    x[1] = float("inf")
    row_loss(model(x), t).mean().backward()
    opt.step()
    assert opt.nonfinite_examples == 1 and opt.nonfinite_last_batch == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_nonfinite_batch_warns_without_the_batch_size(backend):
    """The warning names the step, not how many examples the batch held: a Poisson batch's size is private, and run
    logs keep warnings (a review found fastdp-train's logs publishing it). The count stays readable on request."""
    torch.manual_seed(13)
    model = Conv2dNet()
    opt = fastdp.DPSGD(
        model, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, seed=0, backend=backend
    )
    x, t = Conv2dNet.inputs(3)
    row_loss(model(x), t).mean().backward()
    opt.step()  # a finite batch: no warning, nothing counted
    assert opt.nonfinite_last_batch == 0
    opt.zero_grad()
    x[:] = float("nan")
    for half in (x[:2], x[2:]):  # over two micro-batches
        row_loss(model(half), t[: len(half)]).mean().backward()
    with pytest.warns(UserWarning, match="step 2: every example of the logical batch had a non-finite") as caught:
        opt.step()
    assert not any("3" in str(w.message).replace("step 2", "") for w in caught)
    assert opt.nonfinite_last_batch == 3 and opt.nonfinite_examples == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=g)
        t = torch.randn(4, 3, generator=g)
        row_loss(model(x), t).mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_continues_identically(backend):
    torch.manual_seed(13)
    kw = dict(
        lr=0.1, momentum=0.9, noise_multiplier=1.3, max_grad_norm=1.0, expected_batch_size=4, sample_size=100, seed=7,
        backend=backend,
    )  # fmt: skip
    model = Conv2dNet()
    opt = fastdp.DPSGD(model, **kw)
    _train(model, opt, 2, seed=0)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 3, seed=1)

    resumed = Conv2dNet()
    resumed.load_state_dict(saved_model)
    opt2 = fastdp.DPSGD(resumed, **{**kw, "seed": 999})
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, 3, seed=1)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert opt2.epsilon(1e-5) == opt.epsilon(1e-5)


def test_secure_rng_noise_statistics():
    """OS-entropy noise: same bounds as above on 1e6 coordinates."""
    model = _noise_model()
    opt = fastdp.DPSGD(model, lr=1.0, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1, secure_rng=True)
    g = stepped_gradient(model, opt, 1.0)["weight"].double().flatten()
    assert abs(g.mean().item()) < 5 / math.sqrt(g.numel())
    assert abs(g.std().item() - 1) < 5 / math.sqrt(2 * g.numel())


def test_argument_errors_are_clear():
    model = Conv2dNet()
    with pytest.raises(ValueError, match="exactly one of noise_multiplier or target_epsilon"):
        fastdp.DPSGD(model, lr=0.1, max_grad_norm=1.0, expected_batch_size=4)
    with pytest.raises(ValueError, match="needs target_delta, sample_size"):
        fastdp.DPSGD(model, lr=0.1, max_grad_norm=1.0, expected_batch_size=4, target_epsilon=1.0)
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0"):
        fastdp.DPSGD(Conv2dNet(), lr=0.1, max_grad_norm=0.0, expected_batch_size=4, noise_multiplier=1.0)
    if "cuda" not in available_backends():  # a GPU machine with the CUDA kernels built has it
        with pytest.raises(ValueError, match="backend 'cuda' was requested but is not available"):
            fastdp.DPSGD(
                Conv2dNet(), lr=0.1, max_grad_norm=1.0, expected_batch_size=4, noise_multiplier=1.0, backend="cuda"
            )
    opt = fastdp.DPSGD(Conv2dNet(), lr=0.1, max_grad_norm=1.0, expected_batch_size=4, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="does not take a closure"):
        opt.step(lambda: 0.0)
    with pytest.raises(ValueError, match="needs sample_size"):
        opt.epsilon(1e-5)
    other = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not a trainable parameter of `model`"):
        fastdp.DPOptimizer(
            torch.optim.SGD(other.parameters(), lr=0.1),
            Conv2dNet(),
            max_grad_norm=1.0,
            expected_batch_size=4,
            noise_multiplier=1.0,
        )


def test_lr_scheduler_works_with_dp_optimizer():
    model = Conv2dNet()
    opt = fastdp.DPSGD(model, lr=1.0, max_grad_norm=1.0, expected_batch_size=4, noise_multiplier=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_is_the_philox_stream_of_seed_step_and_element(backend):
    """On every path element e of step t's noise is Philox(seed, t, e), numbered over the optimizer's parameters in
    its order (groups concatenated, a frozen parameter numbered and left alone): no generator state that a restore, a
    device move or a rank could restart."""
    from fastdp.philox import philox_normal

    model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Linear(20, 5), torch.nn.Linear(5, 3))
    model[1].bias.requires_grad_(False)
    sigma, C, B, seed = 1.5, 2.0, 8, 2**40 + 3
    groups = [{"params": list(model[2].parameters())}, {"params": list(model[:2].parameters())}]
    opt = fastdp.DPOptimizer(
        torch.optim.SGD(groups, lr=1.0), model, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=B,
        seed=seed, backend=backend,
    )  # fmt: skip
    order = [p for g in groups for p in g["params"]]
    for step in range(2):  # empty batches: the update is the noise alone
        before = [p.detach().clone() for p in order]
        opt.step()
        flat = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, order, strict=True)]).double()
        z = philox_normal(flat.numel(), seed, step).double()
        z[sum(p.numel() for p in order[:5]) :][: model[1].bias.numel()] = 0  # the frozen bias: numbered, not noised
        torch.testing.assert_close(flat, sigma * C / B * z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_restored_noise_continues_the_stream_never_replays_it(backend):
    """A checkpoint restored where the old per-device generators had no state (cuda:0 -> cuda:1, cpu -> cpu:0;
    simulated by renaming the device keys of any saved generator state) continues with the uninterrupted run's
    noise: an observer of two updates must never see the same draw twice."""
    kw = dict(lr=1.0, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1, seed=5, backend=backend)

    def noise(opt, model):
        before = model.weight.detach().clone()
        opt.step()
        return before - model.weight.detach()

    model = torch.nn.Linear(50, 40, bias=False)
    opt = fastdp.DPSGD(model, **kw)
    first = noise(opt, model)
    state, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    uninterrupted = noise(opt, model)
    saved = state["noise"].get("states", {})
    state["noise"]["states"] = {k.replace("cpu", "cpu:0"): v for k, v in saved.items()}  # another device name
    resumed_model = torch.nn.Linear(50, 40, bias=False)
    resumed_model.load_state_dict(weights)
    resumed = fastdp.DPSGD(resumed_model, **kw | dict(seed=None))
    resumed.load_state_dict(state)
    again = noise(resumed, resumed_model)
    torch.testing.assert_close(again, uninterrupted, rtol=0, atol=0)
    assert (again - first).abs().min() > 0  # no coordinate repeats step 1's draw


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(clipping="automatic", clip_gamma=0.0), "clip_gamma must be a finite number > 0"),
        (dict(clipping="automatic", clip_gamma=-1.0), "clip_gamma must be a finite number > 0"),
        (dict(clipping="automatic", clip_gamma=float("nan")), "clip_gamma must be a finite number > 0"),
        (dict(max_grad_norm=float("inf")), "max_grad_norm must be a finite number > 0"),
        (dict(max_grad_norm=float("nan")), "max_grad_norm must be a finite number > 0"),
        (dict(max_grad_norm=0.0), "max_grad_norm must be a finite number > 0"),
        (dict(lr=float("nan")), "learning rate must be finite, got lr=nan"),
        (dict(lr=float("inf")), "learning rate must be finite, got lr=inf"),
    ],
)
def test_arguments_that_break_the_sensitivity_bound_are_refused(kwargs, match):
    args = dict(lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4) | kwargs
    with pytest.raises(ValueError, match=match):
        fastdp.DPSGD(Conv2dNet(), **args)
    # the calibration (slow) is not reached first
    with pytest.raises(ValueError, match=match):
        fastdp.DPSGD(Conv2dNet(), **(args | dict(noise_multiplier=None, target_epsilon=1.0, target_delta=1e-5,
                                                sample_size=10**9, steps=10**7)))  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clear", ["none", "zero_grad(set_to_none=False)"])
def test_no_zero_grad_between_steps_is_not_a_leak(backend, clear):
    """The step consumes the noisy gradient on every backend: skipping zero_grad(), or zeroing instead of clearing,
    never makes the next backward look like an ordinary (leaked) gradient, and p.grad is None after a step."""
    torch.manual_seed(14)
    model = Conv2dNet()
    opt = fastdp.DPSGD(
        model, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, seed=0, backend=backend
    )
    for _ in range(3):
        x, t = Conv2dNet.inputs(4)
        row_loss(model(x), t).mean().backward()
        opt.step()
        assert all(p.grad is None for p in model.parameters())
        if clear != "none":
            opt.zero_grad(set_to_none=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_of_other_shapes_is_refused_at_load(backend):
    class Wide(torch.nn.Module):  # as many parameters as Narrow, other shapes
        def __init__(self, d):
            super().__init__()
            self.fc = torch.nn.Linear(d, 2)

        def forward(self, x):
            return self.fc(x)

    def trained(d):
        torch.manual_seed(15)
        model = Wide(d)
        opt = fastdp.DPSGD(
            model, lr=0.1, momentum=0.9, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4,
            seed=0, backend=backend,
        )  # fmt: skip
        row_loss(model(torch.randn(4, d)), torch.randn(4, 2)).mean().backward()
        opt.step()
        return opt

    saved = trained(3).state_dict()
    target = trained(5)
    before = copy.deepcopy(target.state_dict())
    match = r"parameter 0 has shape \(2, 5\), its saved 'momentum_buffer' has shape \(2, 3\)"
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(saved)
    torch.testing.assert_close(target.state_dict()["optimizer"], before["optimizer"])  # nothing half-loaded


@pytest.mark.skipif("cpp" not in BACKENDS, reason="fastdp._C is not built")
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_step_keeps_state_of_mixed_phases_as_torch_does(name):
    """Parameters whose optimizer state is at different phases (Adam step counts 5 and 2 and none; a momentum buffer
    for some only) step as torch.optim steps each one: the fused step's launches follow each parameter's own state
    (one adapter for every backend; the compiled step once used the first parameter's count for its whole group)."""
    torch.manual_seed(16)
    base = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    x, t = torch.randn(6, 5), torch.randn(6, 3)
    models, opts = {}, {}
    for backend in ("torch", "cpp"):
        model = copy.deepcopy(base)
        params = list(model.parameters())
        if name == "adamw":
            inner = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
            for p, steps in zip(params, (5, 2, 5), strict=False):  # the last bias has no state yet
                inner.state[p] = {"step": torch.tensor(float(steps)), "exp_avg": torch.full_like(p, 0.01 * steps),
                                  "exp_avg_sq": torch.full_like(p, 1e-3 * steps)}  # fmt: skip
        else:
            inner = torch.optim.SGD(params, lr=0.3, momentum=0.9, nesterov=True)
            inner.state[params[0]] = {"momentum_buffer": torch.full_like(params[0], 0.2)}
        opts[backend] = fastdp.DPOptimizer(
            inner, model, noise_multiplier=0.7, max_grad_norm=0.5, expected_batch_size=6, seed=9, backend=backend
        )
        models[backend] = model
        for _ in range(2):
            row_loss(model(x), t).mean().backward()
            opts[backend].step()
    assert opts["cpp"]._fused_step() is not None and opts["torch"]._fused_step() is None
    for p, q in zip(models["torch"].parameters(), models["cpp"].parameters(), strict=True):
        # the same Philox noise on both paths, to a few float32 ulp
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        for key, value in opts["torch"].inner.state[p].items():
            torch.testing.assert_close(opts["cpp"].inner.state[q][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length", [{"steps": 7}, {"epochs": 0.5}])
def test_calibrated_steps_is_the_calibration_length_and_one_step_more_warns_once(length):
    # epochs 0.5 of N = 1000 at B = 30: ceil(0.5 * 1000 / 30) = 17 steps (a sampler's len(...) gives none of them)
    model = Conv2dNet()
    dp = dict(max_grad_norm=1.0, expected_batch_size=30, sample_size=1000, target_delta=1e-5, **length)
    opt = fastdp.DPSGD(model, lr=0.1, target_epsilon=4.0, **dp)
    expected = length.get("steps", 17)
    assert opt.calibrated_steps == expected
    assert compute_epsilon(opt.noise_multiplier, 0.03, expected, 1e-5) <= 4.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(expected):
            opt.step()
    with pytest.warns(UserWarning, match=f"step {expected + 1} is past the {expected} steps sigma was calibrated for"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        opt.step()
    assert opt.epsilon(1e-5) > 4.0
    # a given sigma has no calibrated length and never warns
    given = fastdp.DPSGD(Conv2dNet(), lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=30)
    assert given.calibrated_steps is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_unfrozen_after_the_optimizer_is_refused(backend):
    """A layer frozen when the DP optimizer is built is not prepared for per-example gradients: once unfrozen its
    gradient would be unclipped (on the torch path it reached the update as it was). The step refuses, naming it,
    and leaves the parameters as they were."""
    torch.manual_seed(21)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    opt = fastdp.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, noise_multiplier=1.0, max_grad_norm=1.0,
        expected_batch_size=4, seed=0, backend=backend,
    )  # fmt: skip
    x, t = torch.randn(4, 4), torch.randn(4, 2)
    row_loss(model(x), t).mean().backward()
    opt.step()
    model[0].requires_grad_(True)
    before = [p.detach().clone() for p in model.parameters()]
    row_loss(model(x * 1000), t).mean().backward()
    with pytest.raises(RuntimeError, match=r"parameter '0.weight' \(shape \(4, 4\)\) is trainable, but was frozen"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_a_parameter_frozen_after_the_optimizer_is_not_updated(backend, sigma):
    """Freezing part of the model later is fine on every path: the frozen parameters get neither noise nor update
    (the torch path used to add noise to them), the others are clipped as without them."""
    torch.manual_seed(22)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise_multiplier=0
        opt = fastdp.DPSGD(
            model, lr=0.1, noise_multiplier=sigma, max_grad_norm=0.5, expected_batch_size=4, seed=0, backend=backend
        )
    model[0].requires_grad_(False)
    x, t = torch.randn(4, 4), torch.randn(4, 2)
    ref, _ = reference(model, x, t, max_grad_norm=0.5)  # over the trainable parameters only
    frozen = [p.detach().clone() for p in model[0].parameters()]
    row_loss(model(x), t).mean().backward()
    g = stepped_gradient(model, opt, lr=0.1)
    assert all(torch.equal(a, p) for a, p in zip(frozen, model[0].parameters(), strict=True))
    if sigma == 0:
        for n in ("2.weight", "2.bias"):
            torch.testing.assert_close(g[n].double(), ref[n] / 4, rtol=1e-4, atol=1e-6)


def test_add_param_group_takes_only_clipped_parameters():
    """add_param_group adds parameters whose per-example gradients the engine clips; a layer added to the model
    after the optimizer (never wrapped) is refused instead of training on its raw gradient."""
    torch.manual_seed(23)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = fastdp.DPOptimizer(
        torch.optim.SGD(model[0].parameters(), lr=0.1), model, noise_multiplier=1.0, max_grad_norm=1.0,
        expected_batch_size=4, seed=0,
    )  # fmt: skip
    opt.add_param_group({"params": model[1].parameters(), "lr": 0.05})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.05
    model.add_module("head", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"not a trainable parameter of `model` as the DP optimizer was built"):
        opt.add_param_group({"params": model.head.parameters()})
    before = model[1].weight.detach().clone()
    row_loss(model(torch.randn(4, 4)), torch.randn(4, 2)).mean().backward()
    with pytest.raises(RuntimeError, match=r"parameter 'head.weight' .* is trainable, but was frozen"):
        opt.step()  # the head is in the model, trainable, and not clipped
    assert torch.equal(before, model[1].weight)
