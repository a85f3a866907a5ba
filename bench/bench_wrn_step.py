"""WRN-16-4 (GroupNorm, plain convs) full training step, batch 32, CIFAR-shaped input, float32, 2 CPU threads.

Providers: non-private SGD, fastdp DPSGD, Opacus hooks (GradSampleModule + DPOptimizer), Opacus ghost clipping.
Every provider builds a fresh model from the same seed and steps on the same random batch, in a process of its own
(bench/processes.py). Peak memory is
measured in a fresh subprocess (see peak_memory.py). Ratios are printed at the end of the session by
conftest.py. Times are never asserted.

Run: python -m pytest bench/bench_wrn_step.py -q --benchmark-disable-gc -p no:cacheprovider
"""

from __future__ import annotations

import os
import platform
import statistics

import peak_memory as pm
import pytest
from interleaved import median_ratios, run_rounds
from processes import step_processes

ROUNDS = 10
WARMUP_ROUNDS = 2


def _device_name() -> str:
    name = platform.processor() or ""
    if not name:
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return f"cpu ({name})" if name else "cpu"


# opacus before fastdp so that every provider's extra_info can hold its speedup vs opacus (the session summary
# has all ratios whatever the order)
PROVIDERS = ["non-private", "opacus", "opacus-ghost", "fastdp", "fastdp-nobudget"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_wrn16_4_step(benchmark, provider, bench_results, bench_skipped):
    # the provider's step in a process of its own (bench/processes.py); its info (the plan) read there after the steps
    with step_processes({provider: (pm.build_step, provider)}, skip=pm.Skip) as (steps, skipped):
        if skipped:
            bench_skipped[provider] = skipped[provider]
            pytest.skip(skipped[provider])
        benchmark.group = "wrn16-4 step, batch 32, cpu"
        benchmark.pedantic(steps[provider], rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
        info = steps[provider].info()

    # peak memory in a fresh process (nothing of this process' state leaks into it), running the plan timed there
    plan = info.get("plan_state")
    mem = pm.peak_step_memory_info(provider, steps=3, plan=plan)
    if "skip" in mem:
        bench_skipped[provider] = mem["skip"]
        pytest.skip(mem["skip"])

    median = statistics.median(benchmark.stats.stats.data)
    result = {
        "device": _device_name(),
        "threads": pm.THREADS,
        "batch": pm.BATCH,
        "rounds": ROUNDS,
        "median_s": median,
        "min_s": min(benchmark.stats.stats.data),
        "samples_per_s": pm.BATCH / median,
        "peak_mb": mem["peak_mb"],
        "peak_first_step_mb": mem["first_step_mb"],
        "peak_warm_step_mb": mem["warm_mb"],
        "hwm_reset": mem["hwm_reset"],
        **{k: v for k, v in info.items() if k not in ("provider", "plan", "plan_state")},
    }
    if "plan" in info:
        result["plan"] = info["plan"]
    bench_results[provider] = result

    extra = benchmark.extra_info
    extra.update(
        device=result["device"],
        threads=result["threads"],
        samples_per_s=round(result["samples_per_s"], 2),
        peak_memory_mb=round(result["peak_mb"], 1),
        peak_memory_first_step_mb=round(result["peak_first_step_mb"], 1),
        peak_memory_warm_step_mb=round(result["peak_warm_step_mb"], 1),
        loadavg_1min=round(os.getloadavg()[0], 2),
        peak_memory_hwm_reset=result["hwm_reset"],
    )
    for k in ("fastdp_api", "opacus_mode", "plan"):
        if k in result:
            extra[k] = result[k]
    base = bench_results.get("non-private")
    if base is not None:
        extra["ratio_to_non_private"] = round(median / base["median_s"], 3)
        extra["memory_ratio_to_non_private"] = round(result["peak_mb"] / base["peak_mb"], 3)
    ref = bench_results.get("opacus")
    if ref is not None:
        extra["speedup_vs_opacus"] = round(ref["median_s"] / median, 3)


def step_of(provider: str):
    """The provider's step alone (what its own process builds: bench/processes.py)."""
    return pm.build_step(provider)[0]


def test_wrn16_4_interleaved(benchmark, bench_interleaved):
    """Every provider in its own process (bench/processes.py), taking turns step by step (a different order every
    round).

    The per-provider tests above time each provider in its own block of rounds, so a drift of the machine's speed
    between blocks (a shared VM's neighbours) moves their ratios. Here every round times one step of each
    provider back to back and the ratios are taken within the round; their median is what drift cannot bias.
    """
    builds = {p: (step_of, p) for p in PROVIDERS}
    with step_processes(builds, warmup=WARMUP_ROUNDS, skip=pm.Skip) as (steps, _):
        times = run_rounds(benchmark, steps, ROUNDS, "wrn16-4 interleaved rounds, batch 32, cpu")

    out = {"rounds": ROUNDS, "median_ms": {p: statistics.median(t) * 1e3 for p, t in times.items()}}
    if "non-private" in times:
        out["x_non_private"] = median_ratios(times, "non-private")
    if "opacus" in times:
        ref = times["opacus"]
        out["speedup_vs_opacus"] = {
            p: statistics.median(r / a for a, r in zip(t, ref, strict=True)) for p, t in times.items()
        }
    bench_interleaved.update(out)
    benchmark.extra_info.update({k: v for k, v in out.items() if k != "rounds"})
