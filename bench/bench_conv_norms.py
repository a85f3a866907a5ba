"""Per-example squared norms of every distinct WRN-40-4 conv layer against that layer's ordinary weight gradient.

The kernels issue's target T1: on the GPU, the per-example norm of each WRN-40-4 conv layer costs at most 25% of
the layer's non-private weight-gradient time. The layer shapes are read off ``fastdp.models.wrn(40, 4, ws=False)``
at a 32x32 input (stem 3->16; 3x3 stride-1 convs at widths 64/128/256; the stride-2 first conv and the 1x1
stride-2 projection of stages 2 and 3; the stride-1 projection of stage 1), one benchmark per distinct shape.

Providers (all fp32; x and delta random, batch N):

- ``wgrad``       the baseline: the ordinary weight gradient of the whole batch,
                  ``torch.ops.aten.convolution_backward`` with output_mask (False, True, False), under torch's
                  default flags (on a GPU cuDNN may use TF32 for fp32 convolutions: ``torch.backends.cudnn
                  .allow_tf32`` defaults to True, so this is what a non-private fp32 step runs);
- ``wgrad-ieee``  (GPU only) the same with cuDNN's TF32 off, the baseline at the norms' exact-fp32 precision;
- ``triton``      ``fastdp.kernels.per_sample_norm.per_sample_norm_conv2d`` (implicit GEMM, exact fp32);
- ``keep``, ``unfold``, ``ghost``, ``shifted_ghost`` (stride 1 only): the torch strategies of
                  fastdp/rules/conv.py computing the norm as ``ConvRule.weight_contribution`` does (the same
                  functions: ``ConvGeometry.per_example_grad_weight`` / unfold + bmm then ``Kept.sq_norm``,
                  ``unfolded_ghost``, ``shifted_ghost``). For keep and unfold this includes forming the per-example
                  gradients (which the keep plan then also uses for the clipped sum); the ghost strategies' later
                  book-keeping GEMM (about one ``wgrad``) is not part of the norm and not timed.

extra_info: device, shape (and how many layers of WRN-40-4 have it), median per call, ``ratio_to_wgrad`` (this
provider's median / the same shape's ``wgrad`` median in this run: the T1 figure), achieved TFLOP/s with the
weight gradient's FLOP model 2 N T p d for every provider (T output positions, p = C_out, d = C_in k^2; so it
is inverse time on a common scale), and its fraction of a GEMM ceiling measured once per session (a large square
fp32 matmul with TF32 off; the bf16 ceiling is reported beside it). A summary table is printed at the end, with
the WRN-40-4 totals (each shape's time times its number of layers). Times are never asserted.

Batch: 256 on a GPU; 32 on the CPU with 2 threads (FASTDP_BENCH_BATCH / FASTDP_BENCH_THREADS override). On a GPU a
call shorter than ~1 ms is repeated inside the timed round (``inner`` in extra_info; medians are per call) so
that the synchronisation does not dominate it.

Run (GPU, or CPU with the torch providers: about 2 min on 2 cores):

    python -m pytest bench/bench_conv_norms.py -q -p no:cacheprovider --benchmark-columns=median,min,rounds

Without a GPU the ``triton`` provider is skipped, unless TRITON_INTERPRET=1 is set: then every provider runs
once on a few tiny shapes, the Triton kernel in its CPU interpreter (a smoke test of this file; the numbers mean
nothing).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import statistics
import time
from typing import NamedTuple

import pytest
import torch
from torch import nn

pytest.importorskip("pytest_benchmark")

from fastdp.engine.contributions import Kept  # noqa: E402
from fastdp.rules.conv import ConvGeometry, views_as_positions  # noqa: E402
from fastdp.rules.conv_ghost import shifted_ghost, unfolded_ghost  # noqa: E402

CUDA = torch.cuda.is_available()
SMOKE = not CUDA and os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = torch.device("cuda" if CUDA else "cpu")
BATCH = int(os.environ.get("FASTDP_BENCH_BATCH", "2" if SMOKE else "256" if CUDA else "32"))
THREADS = int(os.environ.get("FASTDP_BENCH_THREADS", "2"))
# rounds: enough for about TARGET_S of timed calls, within [MIN_ROUNDS, MAX_ROUNDS]
WARMUP, MIN_ROUNDS, MAX_ROUNDS, TARGET_S = (0, 1, 1, 0.0) if SMOKE else (3, 10, 200, 0.3) if CUDA else (1, 3, 15, 1.0)
INNER_TARGET_S = 1e-3 if CUDA else 0.0  # GPU: repeat short calls inside a round up to ~1 ms
PROVIDERS = ["wgrad", "wgrad-ieee", "triton", "keep", "unfold", "ghost", "shifted_ghost"]
TORCH_STRATEGIES = ("keep", "unfold", "ghost", "shifted_ghost")

_convolution_backward = torch.ops.aten.convolution_backward


class ConvShape(NamedTuple):
    cin: int
    cout: int
    size: int  # input height = width
    kernel: int
    stride: int
    padding: int

    @property
    def out_size(self) -> int:
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

    def __str__(self) -> str:
        return f"{self.cin}->{self.cout} {self.kernel}x{self.kernel} s{self.stride} @{self.size}"


def wrn_conv_shapes(depth: int = 40, width: int = 4, size: int = 32) -> dict[ConvShape, int]:
    """Distinct conv layer shapes of WRN-depth-width at a size x size input, in forward order, with their counts."""
    from fastdp.models import wrn

    model = wrn(depth, width, num_classes=10, ws=False)
    seen: dict[ConvShape, int] = {}

    def hook(m: nn.Conv2d, inputs, _out) -> None:
        assert m.groups == 1 and m.dilation == (1, 1) and m.padding_mode == "zeros"
        key = ConvShape(m.in_channels, m.out_channels, inputs[0].shape[-1], m.kernel_size[0], m.stride[0], m.padding[0])
        seen[key] = seen.get(key, 0) + 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return seen


if SMOKE:  # tiny shapes that still cross the interpreter's 16-wide tiles
    SHAPES = {ConvShape(3, 5, 6, 3, 1, 1): 1, ConvShape(4, 18, 6, 3, 2, 1): 1, ConvShape(20, 6, 6, 1, 2, 0): 1}
else:
    SHAPES = wrn_conv_shapes()

# (shape, provider) -> result dict; printed at the end of the module
RESULTS: dict[tuple[ConvShape, str], dict] = {}
SKIPPED: dict[tuple[ConvShape, str], str] = {}
CEILING: dict[str, float] = {}


def _device_name() -> str:
    if CUDA:
        return torch.cuda.get_device_name(DEVICE)
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpu = f"cpu ({name})" if name else "cpu"
    return f"{cpu}, Triton interpreter smoke run" if SMOKE else cpu


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize(DEVICE)


#: cuDNN's convolutions and cuBLAS's matmuls, through the fp32_precision API fastdp.engine.precision uses (reading
#: the legacy allow_tf32 flags after it set these raises: "cuDNN conv and cuDNN RNN have different TF32 flags")
_TF32_SWITCHES = (torch.backends.cudnn.conv, torch.backends.cuda.matmul)


class _tf32:
    """Set cuDNN's and cuBLAS's TF32 switches for fp32 inside the block (restored after)."""

    def __init__(self, conv: bool, matmul: bool) -> None:
        self.want = ("tf32" if conv else "ieee", "tf32" if matmul else "ieee")

    def __enter__(self):
        self.saved = tuple(m.fp32_precision for m in _TF32_SWITCHES)
        for m, v in zip(_TF32_SWITCHES, self.want, strict=True):
            m.fp32_precision = v

    def __exit__(self, *exc):
        for m, v in zip(_TF32_SWITCHES, self.saved, strict=True):
            m.fp32_precision = v


def _tf32_flags() -> str:
    conv, matmul = (m.fp32_precision for m in _TF32_SWITCHES)
    return f"cudnn.conv.fp32_precision={conv} cuda.matmul.fp32_precision={matmul}"


# ------------------------------------------------------------------------------------------------ GEMM ceiling
def _time_matmul(n: int, dtype: torch.dtype, reps: int) -> float:
    """TFLOP/s of an n x n x n matmul (median of ``reps`` synchronised calls after two warm-ups)."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    a = torch.randn(n, n, device=DEVICE, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype, generator=g)
    out = torch.empty(n, n, device=DEVICE, dtype=dtype)
    times = []
    for r in range(reps + 2):
        _sync()
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync()
        if r >= 2:
            times.append(time.perf_counter() - start)
    return 2.0 * n**3 / statistics.median(times) / 1e12


@pytest.fixture(scope="module")
def gemm_ceiling() -> dict[str, float]:
    """TFLOP/s of a large square matmul, fp32 with TF32 off (the ceiling of exact-fp32 norms) and bf16."""
    if not CEILING:
        if not CUDA:
            torch.set_num_threads(THREADS)
        if SMOKE:
            CEILING.update(fp32=math.nan, bf16=math.nan, n_fp32=0, n_bf16=0)
        else:
            n32, n16 = (8192, 8192) if CUDA else (2048, 1024)
            with _tf32(conv=False, matmul=False):
                CEILING["fp32"] = _time_matmul(n32, torch.float32, 10 if CUDA else 5)
            CEILING["bf16"] = _time_matmul(n16, torch.bfloat16, 20 if CUDA else 3)
            CEILING.update(n_fp32=n32, n_bf16=n16)
    return CEILING


# ---------------------------------------------------------------------------------------------------- providers
def _make(provider: str, shape: ConvShape, x: torch.Tensor, d: torch.Tensor):
    """The timed function of ``provider`` on layer input x and output gradient d, or a skip reason (str)."""
    conv = nn.Conv2d(shape.cin, shape.cout, shape.kernel, stride=shape.stride, padding=shape.padding, bias=False)
    conv = conv.to(DEVICE)
    geom = ConvGeometry(conv, (shape.padding, shape.padding))
    w = conv.weight.detach()
    B = x.shape[0]

    def wgrad():
        return _convolution_backward(
            d, x, w, None, geom.stride, geom.padding, geom.dilation, False, [0, 0], geom.groups, [False, True, False]
        )[1]

    if provider == "wgrad":
        return wgrad
    if provider == "wgrad-ieee":
        if not CUDA:
            return "TF32 is a GPU setting (on the CPU this is wgrad)"

        def wgrad_ieee():
            with _tf32(conv=False, matmul=False):
                return wgrad()

        return wgrad_ieee
    if provider == "triton":
        if not (CUDA or SMOKE):
            return "needs a CUDA device (or TRITON_INTERPRET=1 for a CPU smoke run)"
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed"
        from fastdp.kernels import per_sample_norm as psn

        k, s, p = shape.kernel, shape.stride, shape.padding
        return lambda: psn.per_sample_norm_conv2d(x, d, k, stride=s, padding=p)
    # the torch strategies, as ConvRule.weight_contribution computes the norm (augmult 1, per_row False)
    if provider == "keep":
        return lambda: Kept(geom.per_example_grad_weight(x, d, 1)).sq_norm()
    if provider == "unfold":

        def unfold():
            a = views_as_positions(geom.unfold(x), 1)
            dd = views_as_positions(d.flatten(2), 1)
            return Kept(torch.bmm(dd, a.transpose(1, 2)).view(B, *geom.weight_shape)).sq_norm()

        return unfold
    if provider == "ghost":
        return lambda: unfolded_ghost(views_as_positions(geom.unfold(x), 1), views_as_positions(d.flatten(2), 1), False)
    if provider == "shifted_ghost":
        if shape.stride != 1:
            return "shifted_ghost is for stride-1 convolutions only (the rule does not offer it here)"
        return lambda: shifted_ghost(x, d, geom.kernel, geom.dilation, geom.padding, geom.groups, 1, False)
    raise ValueError(f"unknown provider {provider!r}")


# --------------------------------------------------------------------------------------------------- the bench
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
def test_conv_norm(benchmark, gemm_ceiling, shape, provider):
    if not CUDA:
        torch.set_num_threads(THREADS)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(BATCH, shape.cin, shape.size, shape.size, device=DEVICE, generator=g)
    d = torch.randn(BATCH, shape.cout, shape.out_size, shape.out_size, device=DEVICE, generator=g)
    fn = _make(provider, shape, x, d)
    if isinstance(fn, str):
        SKIPPED[(shape, provider)] = fn
        pytest.skip(fn)

    # a first call (compilation, cuDNN's algorithm choice, lazy init), then one to size the rounds
    fn()
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    probe = time.perf_counter() - start
    inner = max(1, min(50, math.ceil(INNER_TARGET_S / probe))) if INNER_TARGET_S and probe > 0 else 1
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(TARGET_S / (probe * inner)))) if probe > 0 else MAX_ROUNDS

    def timed():
        for _ in range(inner):
            fn()
        _sync()

    benchmark.group = f"conv norm {shape}, batch {BATCH}"
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=WARMUP)
    data = benchmark.stats.stats.data
    median = statistics.median(data) / inner
    T = shape.out_size**2
    flops = 2.0 * BATCH * T * shape.cout * shape.cin * shape.kernel**2
    tflops = flops / median / 1e12 if median > 0 else math.nan
    result = {
        "device": _device_name(),
        "shape": str(shape),
        "layers_in_wrn40_4": SHAPES[shape],
        "batch": BATCH,
        "threads": torch.get_num_threads() if not CUDA else None,
        "tf32_flags": _tf32_flags() if CUDA else None,
        "median_ms": median * 1e3,
        "min_ms": min(data) / inner * 1e3,
        "rounds": rounds,
        "inner": inner,
        "tflops": tflops,
        "fraction_of_fp32_gemm": tflops / gemm_ceiling["fp32"],
        "fraction_of_bf16_gemm": tflops / gemm_ceiling["bf16"],
        "gemm_ceiling_fp32_tflops": gemm_ceiling["fp32"],
        "gemm_ceiling_bf16_tflops": gemm_ceiling["bf16"],
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    for base in ("wgrad", "wgrad-ieee"):
        ref = RESULTS.get((shape, base))
        if ref is not None:
            key = "ratio_to_wgrad" if base == "wgrad" else "ratio_to_wgrad_ieee"
            result[key] = median * 1e3 / ref["median_ms"]
    RESULTS[(shape, provider)] = result
    benchmark.extra_info.update({k: v for k, v in result.items() if v is not None})


# ------------------------------------------------------------------------------------------------------ summary
@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is None or capman is None or not RESULTS:
        return
    with capman.global_and_fixture_disabled():  # teardown output is captured otherwise
        for line in summary_lines():
            tr.write_line(line)


def _f(v: float | None, spec: str) -> str:
    """format(v, spec), or "n/a" padded to the spec's width when there is no value."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a".rjust(int(re.match(r"[<>^]?(\d*)", spec).group(1) or 0))
    return format(v, spec)


def summary_lines() -> list[str]:
    shapes = list(dict.fromkeys(s for s, _ in RESULTS))
    present = [p for p in PROVIDERS if any((s, p) in RESULTS for s in shapes)]
    others = [p for p in present if p != "wgrad"]
    la = os.getloadavg()
    lines = [
        "",
        "=" * 24 + f" WRN-40-4 conv per-example norms vs the layer's weight gradient (batch {BATCH}, fp32) " + "=" * 24,
        f"device: {_device_name()}  "
        + (f"{_tf32_flags()} (wgrad runs with these; wgrad-ieee with TF32 off)" if CUDA else f"threads: {THREADS}"),
        f"GEMM ceiling (square matmul, this session): fp32 TF32-off {_f(CEILING.get('fp32'), '.3f')} TFLOP/s "
        f"(n={CEILING.get('n_fp32')}), bf16 {_f(CEILING.get('bf16'), '.3f')} TFLOP/s (n={CEILING.get('n_bf16')})"
        + ("" if CUDA else "; on a CPU torch.mm (MKL) is no ceiling for oneDNN's convolutions: fractions > 1 occur"),
        f"load average (1/5/15 min): {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} on {os.cpu_count()} CPUs "
        "(CPU timings are only comparable on an otherwise idle machine)",
        "cells: median ms (x this shape's wgrad median = the T1 figure; the target is <= 0.25 on the GPU). keep and "
        "unfold form G_i (which then also give the clipped sum); ghost and shifted_ghost pay one more wgrad-like GEMM "
        "for it (book-keeping, not timed here)",
    ]
    head = f"{'layer shape':<24}{'n':>3} {'wgrad ms':>9}" + "".join(f" {p:>20}" for p in others)
    lines += [head, "-" * len(head)]
    totals = dict.fromkeys(present + ["best torch", "best torch + BK"], 0.0)
    complete = dict.fromkeys(totals, True)
    for s in shapes:
        base = RESULTS.get((s, "wgrad"))
        n = SHAPES.get(s, 1)
        row = f"{str(s):<24}{n:>3} {_f(base and base['median_ms'], '>9.3f')}"
        for p in others:
            r = RESULTS.get((s, p))
            ratio = f"(x{r['ratio_to_wgrad']:.2f})" if r and "ratio_to_wgrad" in r else ""
            row += f" {r['median_ms']:>11.3f} {ratio:>8}" if r else f" {'-':>20}"
        lines.append(row)
        for p in present:
            r = RESULTS.get((s, p))
            if r is None:
                complete[p] = False  # no total for a provider that does not run on every shape (shifted_ghost)
            else:
                totals[p] += n * r["median_ms"]
        torch_ms = {p: RESULTS[(s, p)]["median_ms"] for p in TORCH_STRATEGIES if (s, p) in RESULTS}
        if torch_ms and base:
            totals["best torch"] += n * min(torch_ms.values())
            bk = [t + (base["median_ms"] if p in ("ghost", "shifted_ghost") else 0.0) for p, t in torch_ms.items()]
            totals["best torch + BK"] += n * min(bk)
        else:
            complete["best torch"] = complete["best torch + BK"] = False
    lines.append("-" * len(head))
    wg = totals.get("wgrad")
    if wg and complete.get("wgrad"):
        parts = [f"{p} {t:.1f} ms (x{t / wg:.2f})" for p, t in totals.items() if p != "wgrad" and complete[p]]
        lines.append(
            f"WRN-40-4 totals over its {sum(SHAPES.get(s, 1) for s in shapes)} convs (shape time x layers): "
            f"wgrad {wg:.1f} ms; " + "; ".join(parts)
        )
        lines.append(
            "best torch = the fastest torch strategy per shape; best torch + BK = the same with the ghost strategies "
            "charged one wgrad for their clipped sum (the weight side of a DP step, less keep's weighted sum)"
        )
    lines += ["", "achieved TFLOP/s (fraction of the fp32 GEMM ceiling), 2 N T p d for every provider:"]
    head = f"{'layer shape':<24}" + "".join(f" {p:>16}" for p in present)
    lines += [head, "-" * len(head)]
    for s in shapes:
        row = f"{str(s):<24}"
        for p in present:
            r = RESULTS.get((s, p))
            cell = f"{_f(r['tflops'], '.3f')} ({_f(r['fraction_of_fp32_gemm'], '.2f')})" if r else "-"
            row += f" {cell:>16}"
        lines.append(row)
    return lines
