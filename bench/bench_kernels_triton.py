"""Per-op throughput of fastdp's Triton kernels against the pure-torch references they replace.

One benchmark per (op, shape, dtype, provider). Providers: ``torch`` (the op's ``*_ref``, what the torch backend
runs), ``triton`` (fastdp.kernels); the noisy step also has ``torch-randn`` (torch.randn noise and the optimizer's
own foreach step: the fastest unfused torch step, but not the reproducible Philox stream) and ``copy``, the
bandwidth ceiling: ``dst.copy_(src)`` of one flat fp32 tensor moving the step's compulsory bytes (half read, half
written). ``extra_info`` holds the device, the shape, the median, the throughput (TFLOP/s for the GEMM-like ops,
counted with the same FLOP model for both providers, GB/s of compulsory traffic for the memory-bound ones), the
peak CUDA memory of the call and, for the noisy step, ``fraction_of_copy`` (step GB/s / copy GB/s in this run: the
issue's target T2 is >= 0.8 for the triton step). A summary is printed at the end. Times are never asserted;
compare providers within one run.

Run (GPU): python -m pytest bench/bench_kernels_triton.py -q -p no:cacheprovider --benchmark-group-by=group
Without a GPU the module is skipped, unless TRITON_INTERPRET=1 is set: then tiny shapes run once on the CPU
interpreter, a smoke test of this file (the numbers mean nothing).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

SMOKE = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") == "1"
if not torch.cuda.is_available() and not SMOKE:
    pytest.skip("needs a CUDA device (or TRITON_INTERPRET=1 for a CPU smoke run)", allow_module_level=True)
pytest.importorskip("triton")
pytest.importorskip("pytest_benchmark")


from fastdp.kernels import clip_reduce as cr  # noqa: E402
from fastdp.kernels import ghost_norm as gn  # noqa: E402
from fastdp.kernels import noisy_step as ns  # noqa: E402
from fastdp.kernels import per_sample_norm as psn  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS, WARMUP = (1, 0) if SMOKE else (20, 3)
DTYPES = [torch.float32] if SMOKE else [torch.float32, torch.bfloat16]
PROVIDERS = ["torch", "triton"]


def _device_name() -> str:
    return torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu (Triton interpreter, smoke run)"


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


# (group, provider) -> {"median_ms", "unit", "throughput", ...}; printed at the end of the module
RESULTS: dict[tuple[str, str], dict] = {}


def _run(benchmark, fn, group: str, work: float, unit: str, provider: str, **info) -> None:
    """Time fn (synchronised inside the timed call), then record throughput = work / median in extra_info."""

    def timed():
        fn()
        _sync()

    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
    benchmark.group = group
    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    median = benchmark.stats.stats.median
    scale = 1e12 if unit == "TFLOP/s" else 1e9
    throughput = work / median / scale if median > 0 else math.nan
    RESULTS[(group, provider)] = {"median_ms": median * 1e3, "unit": unit, "throughput": throughput}
    copy = RESULTS.get((group, "copy"))
    if copy is not None and provider != "copy":
        info["fraction_of_copy"] = throughput / copy["throughput"]
        RESULTS[(group, provider)]["fraction_of_copy"] = info["fraction_of_copy"]
    benchmark.extra_info.update(
        device=_device_name(),
        median_ms=median * 1e3,
        **{unit: throughput},
        peak_mb=torch.cuda.max_memory_allocated(DEVICE) / 2**20 if DEVICE.type == "cuda" else None,
        **info,
    )


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is None or capman is None or not RESULTS:
        return
    with capman.global_and_fixture_disabled():  # teardown output is captured otherwise
        tr.write_line("")
        tr.write_sep("=", f"fastdp Triton kernels vs torch ({_device_name()})")
        for group in dict.fromkeys(g for g, _ in RESULTS):
            rows = {p: r for (g, p), r in RESULTS.items() if g == group}
            cells = [f"{p} {r['median_ms']:.3f} ms {r['throughput']:.2f} {r['unit']}" for p, r in rows.items()]
            if "torch" in rows and "triton" in rows:
                cells.append(f"triton speedup {rows['torch']['median_ms'] / rows['triton']['median_ms']:.2f}x")
            fractions = [f"{p} {r['fraction_of_copy']:.2f}" for p, r in rows.items() if "fraction_of_copy" in r]
            if fractions:
                cells.append("fraction of copy: " + ", ".join(fractions))
            tr.write_line(f"{group:<44} " + "   ".join(cells))


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


# (B, T, d, p): a ViT-B/16 MLP input at 197 tokens, and a sequence layer where the ghost norm pays (2 T^2 < p d)
LINEAR = [(4, 20, 24, 18)] if SMOKE else [(32, 197, 768, 3072), (64, 64, 1024, 1024)]
# (B, C_in, C_out, H, stride): WRN-16-4 layers at 32x32, 16x16 and 8x8
CONV = [(2, 3, 5, 6, 1)] if SMOKE else [(32, 64, 64, 32, 1), (32, 128, 128, 16, 1), (32, 256, 256, 8, 1)]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR, ids=str)
def test_per_sample_norm_linear(benchmark, provider, dtype, shape):
    B, T, d, p = shape
    a, delta = _randn(B, T, d, dtype=dtype), _randn(B, T, p, dtype=dtype)
    fn = (lambda: psn.per_sample_norm_ref(a, delta)) if provider == "torch" else lambda: psn.per_sample_norm(a, delta)
    _run(
        benchmark, fn, f"per_sample_norm linear {shape} {dtype}", 2.0 * B * T * d * p, "TFLOP/s", provider, shape=shape
    )


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CONV, ids=str)
def test_per_sample_norm_conv2d(benchmark, provider, dtype, shape):
    B, cin, cout, H, s = shape
    x = _randn(B, cin, H, H, dtype=dtype)
    ho = (H + 2 - 3) // s + 1
    delta = _randn(B, cout, ho, ho, dtype=dtype)
    if provider == "torch":
        fn = lambda: psn.per_sample_norm_conv2d_ref(x, delta, 3, s, 1)
    else:
        fn = lambda: psn.per_sample_norm_conv2d(x, delta, 3, stride=s, padding=1)
    flops = 2.0 * B * ho * ho * cout * cin * 9
    _run(benchmark, fn, f"per_sample_norm conv3x3 {shape} {dtype}", flops, "TFLOP/s", provider, shape=shape)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR, ids=str)
def test_ghost_norm(benchmark, provider, dtype, shape):
    B, T, d, p = shape
    a, delta = _randn(B, T, d, dtype=dtype), _randn(B, T, p, dtype=dtype)
    fn = (lambda: gn.ghost_norm_ref(a, delta)) if provider == "torch" else lambda: gn.ghost_norm(a, delta)
    # the design model's 2 T^2 (d + p) for both providers (the kernel does about half: symmetric tiles)
    _run(benchmark, fn, f"ghost_norm {shape} {dtype}", 2.0 * B * T * T * (d + p), "TFLOP/s", provider, shape=shape)


# (B, C_in, C_out, H): the WRN-16-4 8x8 and 16x16 stages, where the ghost norm (T^2 (d + p)) may beat
# instantiating G_i (2 T p d); "triton-instantiate" is the implicit-GEMM norm on the same layer, for that comparison
GHOST_CONV = [(2, 3, 5, 6)] if SMOKE else [(32, 256, 256, 8), (32, 128, 128, 16)]


@pytest.mark.parametrize("provider", ["torch", "triton", "triton-instantiate"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GHOST_CONV, ids=str)
def test_ghost_norm_conv2d(benchmark, provider, dtype, shape):
    B, cin, cout, H = shape
    x, delta = _randn(B, cin, H, H, dtype=dtype), _randn(B, cout, H, H, dtype=dtype)
    if provider == "torch":  # unfold, then the two Gram matrices in memory
        fn = lambda: gn.ghost_norm_ref(psn.unfold_conv2d(x, 3, 1, 1), delta.flatten(2).transpose(1, 2))  # noqa: E731
    elif provider == "triton":
        fn = lambda: gn.ghost_norm_conv2d(x, delta, 3, padding=1)  # noqa: E731
    else:
        fn = lambda: psn.per_sample_norm_conv2d(x, delta, 3, padding=1)  # noqa: E731
    T, d = H * H, cin * 9
    # the same FLOP model for every provider: the full double sum of the ghost norm
    _run(
        benchmark, fn, f"ghost_norm conv3x3 {shape} {dtype}", 2.0 * B * T * T * (d + cout), "TFLOP/s", provider,
        shape=shape, instantiate_flops=2.0 * B * T * cout * d,
    )  # fmt: skip


KEPT = [(4, 1000)] if SMOKE else [(256, 64 * 64 * 9), (64, 1 << 20)]  # (B, P): a WRN 3x3 conv, a 1M-param layer


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", KEPT, ids=str)
def test_clip_reduce(benchmark, provider, dtype, shape):
    B, P = shape
    g, c = _randn(B, P, dtype=dtype), torch.rand(B, device=DEVICE)
    fn = (lambda: cr.clip_reduce_ref(g, c)) if provider == "torch" else lambda: cr.clip_reduce(g, c)
    nbytes = g.numel() * g.element_size() + P * g.element_size()
    _run(benchmark, fn, f"clip_reduce {shape} {dtype}", nbytes, "GB/s", provider, shape=shape)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR, ids=str)
def test_clip_reduce_bookkeeping(benchmark, provider, dtype, shape):
    B, T, d, p = shape
    a, delta, c = _randn(B, T, d, dtype=dtype), _randn(B, T, p, dtype=dtype), torch.rand(B, device=DEVICE)
    if provider == "torch":
        fn = lambda: cr.clip_reduce_bookkeeping_ref(a, delta, c)
    else:
        fn = lambda: cr.clip_reduce_bookkeeping(a, delta, c)
    _run(benchmark, fn, f"bookkeeping {shape} {dtype}", 2.0 * B * T * d * p, "TFLOP/s", provider, shape=shape)


def _model_shapes(total: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a ResNet-like model with about ``total`` elements: convs with their biases."""
    shapes, n, c = [], 0, 16
    while n < total:
        for s in ((c, c, 3, 3), (c,), (c,)):
            shapes.append(s)
            n += math.prod(s)
        c = min(2 * c, 512) if len(shapes) % 12 == 0 else c
    return shapes


STEP_SIZES = [20_000] if SMOKE else [11_000_000]  # WRN-16-4 has 2.7M parameters, ResNet-18 11M


# copy first: the steps' fraction_of_copy needs its median (the provider is the innermost parametrisation)
@pytest.mark.parametrize("provider", ["copy", "torch", "torch-randn", "triton"])
@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adam"])
@pytest.mark.parametrize("total", STEP_SIZES)
def test_noisy_step(benchmark, provider, optimizer, total):
    shapes = _model_shapes(total)
    params = [_randn(*s) for s in shapes]
    sums = [_randn(*s) for s in shapes]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=1e-3, foreach=DEVICE.type == "cuda" or None)
        nbytes = 28
    else:
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=DEVICE.type == "cuda" or None)
        nbytes = 20
    numel = sum(p.numel() for p in params)
    work = nbytes * numel  # compulsory bytes of the step
    kw = dict(std=1.0, expected_batch_size=256, seed=0, step=0)
    if provider == "copy":
        # the bandwidth ceiling: one flat fp32 copy moving the step's bytes (half read, half written)
        src = _randn(work // 8)
        dst = torch.empty_like(src)
        work = 2 * src.numel() * src.element_size()
        fn = lambda: dst.copy_(src)
    elif provider == "triton":
        fn = lambda: ns.noisy_optimizer_step(opt, sums, **kw)
    elif provider == "torch":
        fn = lambda: ns.noisy_step_ref(opt, sums, **kw)
    else:

        def fn():
            for p, s in zip(params, sums, strict=True):
                p.grad = (s + torch.randn_like(s)).div_(256)
            opt.step()

    info = dict(tensors=len(shapes), numel=numel)
    _run(benchmark, fn, f"noisy_step {optimizer} {numel / 1e6:.1f}M", work, "GB/s", provider, **info)
