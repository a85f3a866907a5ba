"""Benchmark session plumbing: collect per-provider medians and peak memory, print ratios at the end.

The ratios (to non-private, speedup vs opacus) are computed from the medians of THIS run only.
"""

from __future__ import annotations

import math
import os

import pytest

# provider -> {"median_s", "peak_mb", "device", ...}; filled by the benchmarks, read by the terminal summary
RESULTS: dict[str, dict] = {}
SKIPPED: dict[str, str] = {}
# the interleaved run: {"median_ms": {...}, "x_non_private": {...}, "speedup_vs_opacus": {...}}
INTERLEAVED: dict = {}
ORDER = ("non-private", "fastdp", "fastdp-nobudget", "opacus", "opacus-ghost")


@pytest.fixture(scope="session")
def bench_results() -> dict[str, dict]:
    return RESULTS


@pytest.fixture(scope="session")
def bench_interleaved() -> dict:
    return INTERLEAVED


@pytest.fixture(scope="session")
def bench_skipped() -> dict[str, str]:
    return SKIPPED


def _fmt(v: float | None, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return format(v, spec)


def summary_lines(results: dict[str, dict], skipped: dict[str, str]) -> list[str]:
    base = results.get("non-private")
    ref = results.get("opacus")
    header = (
        f"{'provider':<14} {'median ms':>10} {'min ms':>8} {'samples/s':>10} {'x non-private':>14} "
        f"{'speedup vs opacus':>18} {'peak MB':>9} {'mem x non-private':>18} {'1st-step MB':>12}"
    )
    lines = [header, "-" * len(header)]
    names = [p for p in ORDER if p in results] + [p for p in results if p not in ORDER]
    for p in names:
        r = results[p]
        med = r["median_s"]
        ratio = med / base["median_s"] if base else None
        speedup = ref["median_s"] / med if ref else None
        peak = r.get("peak_mb")
        mem_ratio = peak / base["peak_mb"] if (base and peak is not None and base.get("peak_mb")) else None
        min_ms = r.get("min_s", float("nan")) * 1e3
        lines.append(
            f"{p:<14} {med * 1e3:>10.1f} {_fmt(min_ms, '>8.1f')} {r['samples_per_s']:>10.1f} {_fmt(ratio, '>14.2f')} "
            f"{_fmt(speedup, '>18.2f')} {_fmt(peak, '>9.1f')} {_fmt(mem_ratio, '>18.2f')} "
            f"{_fmt(r.get('peak_first_step_mb'), '>12.1f')}"
        )
    for p, why in skipped.items():
        lines.append(f"{p:<14} skipped: {why}")
    for p in names:
        if "plan" in results[p]:
            lines.append(f"{p} plan (timed, and loaded by the memory subprocess): {results[p]['plan']}")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not RESULTS and not SKIPPED and not INTERLEAVED:
        return
    tr = terminalreporter
    any_r = next(iter(RESULTS.values()), {})
    tr.write_sep("=", "WRN-16-4 DP step summary (ratios from this run)")
    if any_r:
        tr.write_line(
            f"device: {any_r.get('device')}  threads: {any_r.get('threads')}  batch: {any_r.get('batch')}  "
            f"float32  rounds: {any_r.get('rounds')}  fastdp API: "
            f"{RESULTS.get('fastdp', {}).get('fastdp_api', 'n/a')}"
        )
        tr.write_line(
            "peak MB = steady-state step's peak RSS (VmHWM, reset via clear_refs) over RSS right before the first "
            "step, fresh subprocess, 3 steps; 1st-step MB = same for the first step (one-time work; fastdp loads the "
            "plan timed here instead of tuning)"
        )
        la = os.getloadavg()
        tr.write_line(
            f"load average at end (1/5/15 min): {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} on {os.cpu_count()} CPUs "
            "(timings are only comparable on an otherwise idle machine)"
        )
    for line in summary_lines(RESULTS, SKIPPED):
        tr.write_line(line)
    if INTERLEAVED:
        tr.write_line("")
        tr.write_line(
            f"interleaved ({INTERLEAVED['rounds']} rounds, one step of each provider per round, medians of the "
            "per-round ratios):"
        )
        for p, ms in INTERLEAVED["median_ms"].items():
            ratio = INTERLEAVED.get("x_non_private", {}).get(p)
            speedup = INTERLEAVED.get("speedup_vs_opacus", {}).get(p)
            tr.write_line(
                f"{p:<16} {ms:>8.1f} ms  x non-private {_fmt(ratio, '.2f'):>5}  vs opacus {_fmt(speedup, '.2f')}"
            )
