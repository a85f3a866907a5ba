"""WRN-16-4 (GroupNorm, plain convs) full training step on a CUDA device, batch 256, CIFAR-shaped input.

The kernels issue's target T3: the DP step at most 1.25x the non-private step. Modes: ``fp32`` (float32 weights and
inputs, torch's default precision flags, which let cuDNN use TF32 for fp32 convolutions: the same for every
provider, recorded in extra_info) and ``bf16-autocast`` (the forward under torch.autocast(bfloat16)).

Providers (each builds the model of bench/peak_memory.py from the same seed and steps on the same random batch;
plain SGD, lr and noise as bench_wrn_step.py):

- ``non-private``    torch.optim.SGD;
- ``opacus``         Opacus hooks (GradSampleModule + DPOptimizer);
- ``fastdp``         fastdp.DPSGD with backend "auto" (on a GPU triton, else cuda; FASTDP_BACKEND overrides);
- ``fastdp-triton``, ``fastdp-cuda``  that backend, when available and not the one "auto" picked (skipped else);
- ``fastdp-torch``   backend "torch" (the torch strategies only).

Each timed call is one step (forward, backward, optimizer step, zero_grad) with a torch.cuda.synchronize at its
end. The untimed first step and warm-up rounds hold fastdp's one-time per-layer autotuning and Triton's
compilation (a provider that fails in its first step, e.g. out of memory, is reported as skipped). After timing, one
more step runs between torch.cuda.reset_peak_memory_stats and max_memory_allocated: ``peak_mb`` is that peak over
the memory allocated right before the provider's first step (model, data; what the steps keep, such as plans, is
counted). extra_info and the printed summary hold the median, samples/s, the ratio to non-private (T3) and the
speedup vs opacus of the same mode, from this run only; ``test_wrn16_4_interleaved`` also times the fp32 providers
taking turns step by step (medians of per-round ratios). Times are never asserted.

Run (GPU; about a minute on an H100 plus compilation):

    python -m pytest bench/bench_wrn_step_gpu.py -q -p no:cacheprovider --benchmark-columns=median,min,rounds

Without CUDA the module is skipped. FASTDP_BENCH_CPU=1 runs it on the CPU instead, at batch 8 (FASTDP_BENCH_BATCH
overrides) with 2 rounds: a smoke test of this file (the numbers mean nothing).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import re
import statistics

import pytest
import torch
import torch.nn.functional as F

CPU_SMOKE = os.environ.get("FASTDP_BENCH_CPU", "0") == "1"
if not torch.cuda.is_available() and not CPU_SMOKE:
    pytest.skip("needs a CUDA device (FASTDP_BENCH_CPU=1 for a CPU smoke run)", allow_module_level=True)
pytest.importorskip("pytest_benchmark")

import peak_memory as pm  # noqa: E402  (bench/, on sys.path under pytest as for bench_wrn_step.py)
from interleaved import median_ratios, run_rounds  # noqa: E402

CUDA = not CPU_SMOKE
DEVICE = torch.device("cuda" if CUDA else "cpu")
BATCH = int(os.environ.get("FASTDP_BENCH_BATCH", "256" if CUDA else "8"))
THREADS = int(os.environ.get("FASTDP_BENCH_THREADS", "2"))
ROUNDS, WARMUP_ROUNDS = (20, 3) if CUDA else (2, 1)
MODES = ["fp32", "bf16-autocast"]
# non-private and opacus first: every later provider's extra_info can then hold its ratios
PROVIDERS = ["non-private", "opacus", "fastdp", "fastdp-triton", "fastdp-cuda", "fastdp-torch"]
BACKENDS = {"fastdp": "auto", "fastdp-triton": "triton", "fastdp-cuda": "cuda", "fastdp-torch": "torch"}

# (mode, provider) -> result; printed at the end of the module
RESULTS: dict[tuple[str, str], dict] = {}
SKIPPED: dict[tuple[str, str], str] = {}
INTERLEAVED: dict = {}


def _device_name() -> str:
    return torch.cuda.get_device_name(DEVICE) if CUDA else "cpu (smoke run of the GPU bench)"


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize(DEVICE)


def _allocated() -> int:
    return torch.cuda.memory_allocated(DEVICE) if CUDA else 0


def _flags() -> str:
    return (
        f"cudnn.conv.fp32_precision={torch.backends.cudnn.conv.fp32_precision} "
        f"cuda.matmul.fp32_precision={torch.backends.cuda.matmul.fp32_precision} "
        f"cudnn.benchmark={torch.backends.cudnn.benchmark}"
    )


def _free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


class Skip(Exception):
    """The provider cannot run here (the reason is the message)."""


def build_step(provider: str, mode: str):
    """(step, info): ``step()`` is one full training step of ``provider`` ending in a device synchronisation."""
    if not CUDA:
        torch.set_num_threads(THREADS)
    g = torch.Generator().manual_seed(pm.SEED + 1)
    x = torch.randn(BATCH, 3, 32, 32, generator=g).to(DEVICE)
    y = torch.randint(0, 10, (BATCH,), generator=g).to(DEVICE)
    model = pm._model(pm.SEED).to(DEVICE)  # WRN-16-4, GroupNorm, plain convs, as bench_wrn_step.py
    model.train()
    info: dict = {}

    def autocast():
        if mode == "bf16-autocast":
            return torch.autocast(DEVICE.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    if provider == "non-private":
        net, opt = model, torch.optim.SGD(model.parameters(), lr=pm.LR)
    elif provider == "opacus":
        try:
            import opacus
            from opacus.optimizers import DPOptimizer
        except ImportError as e:
            raise Skip(f"opacus is not installed: {e}") from e
        net = opacus.GradSampleModule(model)
        opt = DPOptimizer(
            torch.optim.SGD(net.parameters(), lr=pm.LR),
            noise_multiplier=pm.NOISE_MULTIPLIER,
            max_grad_norm=pm.MAX_GRAD_NORM,
            expected_batch_size=BATCH,
        )
        info["opacus_mode"] = "hooks (GradSampleModule + DPOptimizer)"
    elif provider in BACKENDS:
        import fastdp
        from fastdp.backends import resolve_backend

        backend = BACKENDS[provider]
        if backend in ("triton", "cuda"):
            if backend not in fastdp.available_backends():
                raise Skip(f"the {backend} backend is not available here")
            if resolve_backend("auto").name == backend:
                raise Skip(f"backend 'auto' is {backend} here: the fastdp row is this provider")
        net = model
        opt = fastdp.DPSGD(
            model,
            lr=pm.LR,
            noise_multiplier=pm.NOISE_MULTIPLIER,
            max_grad_norm=pm.MAX_GRAD_NORM,
            expected_batch_size=BATCH,
            seed=pm.SEED,
            backend=backend,
        )
        info["backend"] = opt.backend.name
        info["plan"] = lambda: pm.plan_summary(opt)
    else:
        raise ValueError(f"unknown provider {provider!r}; one of {PROVIDERS}")

    def step():
        with autocast():
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()

    return step, info


def _first_step(provider: str, mode: str):
    """Build and run the first step; a provider that fails there (unsupported mode, out of memory) is a skip."""
    _free()
    try:
        step, info = build_step(provider, mode)
        alloc0 = _allocated()
        step()
    except Skip:
        raise
    except Exception as e:  # noqa: BLE001  (a bench reports what could not run instead of stopping the session)
        _free()
        raise Skip(f"failed in its first step: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return step, info, alloc0


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
def test_wrn16_4_step(benchmark, mode, provider):
    try:
        step, info, alloc0 = _first_step(provider, mode)
    except Skip as e:
        SKIPPED[(mode, provider)] = str(e)
        pytest.skip(str(e))

    benchmark.group = f"wrn16-4 step, batch {BATCH}, {mode}, {DEVICE.type}"
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
    data = benchmark.stats.stats.data
    median = statistics.median(data)

    # one more step for the peak memory, over what was allocated before the first step
    if CUDA:
        gc.collect()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        step()
        peak_mb = (torch.cuda.max_memory_allocated(DEVICE) - alloc0) / 2**20
        kept_mb = (_allocated() - alloc0) / 2**20
    else:
        peak_mb = kept_mb = math.nan

    result = {
        "device": _device_name(),
        "mode": mode,
        "batch": BATCH,
        "rounds": ROUNDS,
        "median_s": median,
        "min_s": min(data),
        "samples_per_s": BATCH / median,
        "peak_mb": peak_mb,
        "kept_mb": kept_mb,
        "flags": _flags() if CUDA else None,
        **{k: v() if callable(v) else v for k, v in info.items()},
    }
    base, ref = RESULTS.get((mode, "non-private")), RESULTS.get((mode, "opacus"))
    if base is not None:
        result["ratio_to_non_private"] = median / base["median_s"]
        if CUDA and base["peak_mb"] > 0:
            result["memory_ratio_to_non_private"] = peak_mb / base["peak_mb"]
    if ref is not None:
        result["speedup_vs_opacus"] = ref["median_s"] / median
    RESULTS[(mode, provider)] = result
    benchmark.extra_info.update(
        {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items() if v is not None}
    )
    del step
    _free()


def test_wrn16_4_interleaved(benchmark):
    """The fp32 providers in one process, taking turns step by step (a different order every round); the ratios
    are taken within a round and their medians reported, which drift of the device's speed cannot bias."""
    steps = {}
    for provider in PROVIDERS:
        try:
            steps[provider] = _first_step(provider, "fp32")[0]
        except Skip:
            continue
    if "non-private" not in steps:
        pytest.skip("the non-private step could not run")
    for step in steps.values():
        for _ in range(WARMUP_ROUNDS):
            step()
    # each step ends with a synchronisation
    times = run_rounds(benchmark, steps, ROUNDS, f"wrn16-4 interleaved rounds, batch {BATCH}, fp32, {DEVICE.type}")
    out = {
        "rounds": ROUNDS,
        "median_ms": {p: statistics.median(t) * 1e3 for p, t in times.items()},
        "x_non_private": median_ratios(times, "non-private"),
    }
    if "opacus" in times:
        ref = times["opacus"]
        out["speedup_vs_opacus"] = {
            p: statistics.median(r / a for a, r in zip(t, ref, strict=True)) for p, t in times.items()
        }
    INTERLEAVED.update(out)
    benchmark.extra_info.update({k: v for k, v in out.items() if k != "rounds"})
    steps.clear()
    _free()


# ------------------------------------------------------------------------------------------------------ summary
@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is None or capman is None or not (RESULTS or SKIPPED):
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
    la = os.getloadavg()
    lines = [
        "",
        "=" * 30 + f" WRN-16-4 DP step on {DEVICE.type} (batch {BATCH}; ratios from this run) " + "=" * 30,
        f"device: {_device_name()}  torch {torch.__version__}  rounds {ROUNDS} (+{WARMUP_ROUNDS} warm-up)"
        + (f"  {_flags()}" if CUDA else ""),
        f"load average (1/5/15 min): {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}",
        "peak MB = CUDA max_memory_allocated of a steady-state step over the memory allocated before the first step",
    ]
    head = (
        f"{'mode':<14} {'provider':<14} {'median ms':>10} {'min ms':>8} {'samples/s':>10} {'x non-private':>14} "
        f"{'vs opacus':>10} {'peak MB':>9} {'mem x np':>9}  backend / plan"
    )
    lines += [head, "-" * len(head)]
    for mode in MODES:
        for p in PROVIDERS:
            r = RESULTS.get((mode, p))
            if r is None:
                if (mode, p) in SKIPPED:
                    lines.append(f"{mode:<14} {p:<14} skipped: {SKIPPED[(mode, p)]}")
                continue
            extra = " / ".join(str(r[k]) for k in ("backend", "plan", "opacus_mode") if k in r)
            lines.append(
                f"{mode:<14} {p:<14} {r['median_s'] * 1e3:>10.2f} {r['min_s'] * 1e3:>8.2f} {r['samples_per_s']:>10.1f} "
                f"{_f(r.get('ratio_to_non_private'), '>14.3f')} {_f(r.get('speedup_vs_opacus'), '>10.2f')} "
                f"{_f(r['peak_mb'], '>9.1f')} {_f(r.get('memory_ratio_to_non_private'), '>9.2f')}  {extra}"
            )
    if INTERLEAVED:
        lines.append(f"interleaved fp32 ({INTERLEAVED['rounds']} rounds, medians of per-round ratios):")
        for p, ms in INTERLEAVED["median_ms"].items():
            ratio = INTERLEAVED["x_non_private"].get(p)
            speedup = INTERLEAVED.get("speedup_vs_opacus", {}).get(p)
            lines.append(f"  {p:<14} {ms:>9.2f} ms  x non-private {_f(ratio, '.3f')}  vs opacus {_f(speedup, '.2f')}")
    return lines
