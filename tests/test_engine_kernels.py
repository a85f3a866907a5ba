"""The engine's fused strategies (the backend's layer kernels, fastdp/backends/) against the float64
per-example loop, and the ``triton`` backend end to end (engine, clip-and-reduce and the optimizer step).

Without a GPU the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before any kernel
module is imported), where ``backend="triton"`` takes CPU tensors. The models are the oracle tests' small ones
(tests/models.py); tolerances are those of tests/test_engine.py. The interpreter computes fp32 dots exactly in
fp32; on a GPU fp32 operands go through tf32x3 (each product within 5.01 * 2^-22, kernels/_triton.py), far inside
these tolerances on the test models.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import forced_strategy_layers, reduce_rows, reference, row_loss, run_engine, seed_of
from models import MODELS

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read by triton.jit when the kernel modules are imported

pytest.importorskip("triton")

import fastdp  # noqa: E402
from fastdp.backends import resolve_backend  # noqa: E402
from fastdp.engine import GradSampleEngine  # noqa: E402
from fastdp.kernels._triton import interpreting  # noqa: E402
from fastdp.launches import LaunchCounter  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():  # a kernel module was imported before TRITON_INTERPRET was set
    pytest.skip("Triton's interpreter is off in this process and there is no GPU", allow_module_level=True)

FUSED = ("fused_keep", "fused_bk", "fused_ghost")
#: layers the fused strategies apply to in each model (Linear, and Conv2d with groups 1)
FUSED_LAYERS = {
    "seq": ["fc1", "fc2"],
    "conv1d": ["fc"],
    "conv2d": ["c1", "c3", "fc"],
    "conv3d": ["fc"],
    "ws": ["c1", "fc"],
    "shared": ["mix", "gain.inner", "out"],  # gain.inner: a container's child keeps its rule (owned_params)
}

LINEAR = {"fc1", "fc2", "fc", "mix", "gain.inner", "out"}


def to_device(model, x, t):
    return model.to(DEVICE), x.to(DEVICE), t.to(DEVICE)


#: triton (interpreted without a GPU); cuda (fastdp._C's linear-norm kernel) only on a GPU
BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("strategy", FUSED)
@pytest.mark.parametrize("augmult", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_strategies_match_float64_loop(name, strategy, augmult, backend):
    if backend not in fastdp.available_backends() + ["triton"]:
        pytest.skip(f"backend {backend!r} is not available here")
    lk = resolve_backend(backend).layer_kernels()
    torch.manual_seed(seed_of(name, strategy, augmult))
    model = MODELS[name]()
    examples = 5
    x, t = MODELS[name].inputs(examples * augmult)
    ref, ref_norms = reference(model, x, t, max_grad_norm=float("inf"), augmult=augmult)
    C = ref_norms.median().item()  # clip about half of the examples
    ref, _ = reference(model, x, t, max_grad_norm=C, augmult=augmult)
    model, x, t = to_device(model, x, t)
    k = 2 * augmult  # two micro-batches in one logical batch
    batches = [(x[:k], t[:k]), (x[k:], t[k:])]
    got, norms, plans = run_engine(model, batches, strategy=strategy, max_grad_norm=C, augmult=augmult, backend=backend)

    # the strategy really ran where the backend has its kernels (ghost: linear layers over T' = K * T > 1
    # positions; bk: not WS convs)
    layers = [n for n in FUSED_LAYERS[name] if n in LINEAR or lk.conv2d_norm is not None]
    expected = {
        "fused_keep": layers,
        "fused_bk": [n for n in layers if not (name == "ws" and n == "c1")],
        "fused_ghost": [
            n
            for n in layers
            if (n in LINEAR and (name == "seq" or augmult > 1) and lk.linear_ghost_norm is not None)
            or (n not in LINEAR and lk.conv2d_ghost_norm is not None and not (name == "ws" and n == "c1"))
        ],
    }[strategy]
    assert [n for n, s in plans.items() if s == strategy] == expected
    torch.testing.assert_close(norms.double().cpu(), ref_norms, rtol=2e-5, atol=1e-7)
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(
            got[n].double().cpu(), ref[n], rtol=2e-5, atol=2e-6 * examples * C, msg=lambda m, n=n: f"{n}: {m}"
        )


@pytest.mark.parametrize("name", ["conv2d", "ws"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_ghost_sums_with_the_extension(name, backend):
    """The torch strategy shifted_ghost on a GPU backend (the WS convs' per-row norms have no fused strategy): its
    Gram sum is fastdp._C's shifted_gram where the extension has the device's kernel (borrowed by triton), one
    launch per chunk, and the result is the float64 loop's."""
    if backend not in fastdp.available_backends() + ["triton"]:
        pytest.skip(f"backend {backend!r} is not available here")
    lk = resolve_backend(backend).layer_kernels()
    from fastdp import _ext

    assert (lk.shifted_gram is not None) == (_ext.cuda_compiled() if DEVICE == "cuda" else _ext.cpu_available())
    torch.manual_seed(seed_of("shifted_gram", name, backend))
    model = MODELS[name]()
    x, t = MODELS[name].inputs(6)
    ref, ref_norms = reference(model, x, t, max_grad_norm=float("inf"))
    C = ref_norms.median().item()
    ref, _ = reference(model, x, t, max_grad_norm=C)
    model, x, t = to_device(model, x, t)
    with LaunchCounter() as counter:
        got, norms, plans = run_engine(model, [(x[:2], t[:2]), (x[2:], t[2:])], strategy="shifted_ghost",
                                       max_grad_norm=C, backend=backend)  # fmt: skip
    assert "shifted_ghost" in plans.values()
    assert (counter.launches["shifted_gram"] >= 2) == (lk.shifted_gram is not None)
    torch.testing.assert_close(norms.double().cpu(), ref_norms, rtol=2e-5, atol=1e-7)
    for n in ref:
        torch.testing.assert_close(got[n].double().cpu(), ref[n], rtol=2e-5, atol=2e-6 * 6 * C)


@pytest.mark.parametrize("strategy", ["fused_keep", "fused_bk"])
def test_fused_strategies_sum_reduction_and_nonfinite_example(strategy):
    """loss_reduction="sum", and an example whose gradient is NaN contributes exactly nothing (its rows are
    dropped before the book-keeping kernel: a zero weight alone would give 0 * NaN)."""
    torch.manual_seed(7)
    model = MODELS["conv2d"]()
    x, t = MODELS["conv2d"].inputs(4)
    ref, _ = reference(model, x[1:], t[1:], max_grad_norm=0.4)
    t = t.clone()
    t[0, 0] = float("nan")
    model, x, t = to_device(model, x, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eng = GradSampleEngine(model, max_grad_norm=0.4, loss_reduction="sum", strategy=strategy, backend="triton")
    reduce_rows(row_loss(model(x), t), "sum").backward()
    summed, _ = eng.pop()
    assert forced_strategy_layers(eng, strategy) == FUSED_LAYERS["conv2d"]
    assert eng.nonfinite_examples == 1
    for n, p in model.named_parameters():
        torch.testing.assert_close(summed[p].double().cpu(), ref[n], rtol=2e-5, atol=1e-6)


def test_fused_strategies_need_the_kernels_dtype_and_device():
    """float64 layers (the kernels take fp32/bf16/fp16) and backends without layer kernels get no fused
    strategy; WS convs get fused_keep but not fused_bk (they need per-row norms)."""
    lk = resolve_backend("triton").layer_kernels()
    conv = torch.nn.Conv2d(3, 4, 3).to(DEVICE)
    x = torch.randn(2, 3, 6, 6, device=DEVICE)
    rule = fastdp.rules.rule_for(conv)
    assert {"fused_keep", "fused_bk"} <= set(rule.strategies(conv, x, 1, lk))
    assert not {"fused_keep", "fused_bk"} & set(rule.strategies(conv.double(), x.double(), 1, lk))
    assert not {"fused_keep", "fused_bk"} & set(rule.strategies(conv.float(), x, 1, None))
    grouped = torch.nn.Conv2d(4, 4, 3, groups=2).to(DEVICE)
    assert not {"fused_keep", "fused_bk"} & set(rule.strategies(grouped, torch.randn(2, 4, 6, 6, device=DEVICE), 1, lk))
    ws = fastdp.nn.WSConv2d(3, 4, 3).to(DEVICE)
    ws_rule = fastdp.rules.rule_for(ws)
    assert "fused_keep" in ws_rule.strategies(ws, x, 1, lk) and "fused_bk" not in ws_rule.strategies(ws, x, 1, lk)
    assert resolve_backend("torch").layer_kernels() is None


def test_interpreted_triton_backend_is_explicit_only():
    if DEVICE == "cuda":
        pytest.skip("on a GPU the triton backend is a real one")
    backend = resolve_backend("triton")
    assert backend.interpreted and backend.device_type == "cpu"
    assert "triton" not in fastdp.available_backends()
    assert resolve_backend("auto").name != "triton"


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_dpoptimizer_triton_backend_matches_cpp(name):
    """DPOptimizer(backend="triton") end to end (fused norms, Triton clip-and-reduce and book-keeping, the Triton
    noisy step) against backend="cpp" (torch strategies, fastdp._C's step): the same Philox noise, the same
    update, over three steps."""
    if "cpp" not in fastdp.available_backends():
        pytest.skip("fastdp._C is not built")
    torch.manual_seed(0)
    base = MODELS["conv2d"]()
    x, y = MODELS["conv2d"].inputs(6)
    runs = {}
    for backend in ("cpp", "triton"):
        model = copy.deepcopy(base).to(DEVICE if backend == "triton" else "cpu")
        if name == "sgd":
            inner = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, nesterov=True, weight_decay=0.01)
        else:
            inner = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the cost model's plan (autotune=False): timing interpreted kernels would say nothing
            opt = fastdp.DPOptimizer(
                inner, model, noise_multiplier=1.1, max_grad_norm=0.5, expected_batch_size=4, seed=5,
                backend=backend, autotune=False,
            )  # fmt: skip
        dev = next(model.parameters()).device
        for _ in range(3):
            F.mse_loss(model(x.to(dev)), y.to(dev)).backward()
            opt.step()
            opt.zero_grad()
        if backend == "triton":
            assert opt._fused_step() is not None and opt._fused_step().backend.name == "triton"
            assert any(s.startswith("fused_") for _, s in opt.engine.plans.values())
        runs[backend] = model
    for p, q in zip(runs["cpp"].parameters(), runs["triton"].parameters(), strict=True):
        # the two backends' float32 transcendental functions differ by a few ulp in the noise
        torch.testing.assert_close(q.cpu(), p, rtol=1e-5, atol=1e-6)


def test_a_failing_kernel_loses_its_strategies_not_the_run():
    """Autotuning drops a fused strategy whose kernel raises on this machine (with a warning naming it) and plans
    the layer with the strategies that work; the result stays exact."""
    import dataclasses

    torch.manual_seed(11)
    model = MODELS["conv2d"]()
    x, t = MODELS["conv2d"].inputs(4)
    ref, _ = reference(model, x, t, max_grad_norm=0.3)
    model, x, t = to_device(model, x, t)

    def boom(*args, **kwargs):
        raise RuntimeError("no kernel image for this GPU")

    eng = GradSampleEngine(model, max_grad_norm=0.3, backend="triton")
    eng.kernels = dataclasses.replace(eng.kernels, conv2d_norm=boom)
    with pytest.warns(UserWarning, match="strategy 'fused_(keep|bk)' of backend 'triton' failed on Conv2d"):
        reduce_rows(row_loss(model(x), t), "mean").backward()
    summed, _ = eng.pop()
    assert all(s not in ("fused_keep", "fused_bk") for m, (_, s) in eng.plans.items() if isinstance(m, torch.nn.Conv2d))
    for n, p in model.named_parameters():
        torch.testing.assert_close(summed[p].double().cpu(), ref[n], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name, strategy", [("conv2d", "fused_keep"), ("conv2d", "fused_bk"), ("ws", "fused_keep")]
)  # WS convs (per-row norms) offer fused_keep alone
def test_fused_strategies_under_bf16_autocast(name, strategy):
    """Under bf16 autocast the fused plans' norms and clipped sums are as close to float64 as plain torch's bf16
    per-example gradients (at most twice their error), the kernels take the bf16 activations and output gradients
    as they are (no fp32 copies: tensor cores, fp32 accumulation; weight-standardised convs too) and the clipped sums
    leave them in fp32."""
    import dataclasses

    torch.manual_seed(5)
    model = MODELS[name]()
    x, t = MODELS[name].inputs(4)
    ref, ref_norms = reference(model, x, t, max_grad_norm=float("inf"))
    plain = copy.deepcopy(model)
    torch_norms, torch_sum = [], None
    for i in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = row_loss(plain(x[i : i + 1]), t[i : i + 1]).sum()
        grads = [g.double() for g in torch.autograd.grad(loss, list(plain.parameters()))]
        torch_norms.append(torch.sqrt(sum(g.square().sum() for g in grads)))
        torch_sum = grads if torch_sum is None else [a + b for a, b in zip(torch_sum, grads, strict=True)]
    torch_norm_err = (torch.stack(torch_norms) - ref_norms).abs().max().item()
    model, x, t = to_device(model, x, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eng = GradSampleEngine(model, max_grad_norm=1e9, loss_reduction="sum", strategy=strategy, backend="triton")
    operands = []

    def spy(fn):
        def wrapped(x, d, *args, **kwargs):
            operands.append((x.dtype, d.dtype))
            return fn(x, d, *args, **kwargs)

        return wrapped

    names = ("linear_norm", "conv2d_norm", "linear_bookkeeping", "conv2d_bookkeeping")
    eng.kernels = dataclasses.replace(eng.kernels, **{n: spy(getattr(eng.kernels, n)) for n in names})
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = row_loss(model(x), t).sum()
    loss.backward()
    summed, norms = eng.pop()
    assert forced_strategy_layers(eng, strategy) == FUSED_LAYERS[name]
    assert norms.dtype == torch.float32
    # a norm kernel per fused layer (and a book-keeping kernel for its clipped sum), all on bf16 operands
    assert len(operands) == len(FUSED_LAYERS[name]) * (1 if strategy == "fused_keep" else 2)
    assert set(operands) == {(torch.bfloat16, torch.bfloat16)}
    assert all(summed[p].dtype == torch.float32 for p in model.parameters())
    assert (norms.double().cpu() - ref_norms).abs().max().item() <= 2 * torch_norm_err + 1e-6 * ref_norms.max().item()
    for (n, p), plain_sum in zip(model.named_parameters(), torch_sum, strict=True):
        ours = (summed[p].double().cpu() - ref[n]).abs().max().item()
        theirs = (plain_sum - ref[n]).abs().max().item()
        assert ours <= 2 * theirs + 1e-6 * ref[n].abs().max().item(), (n, ours, theirs)
