"""Interleaved rounds: every provider takes one step per round, in an order rotated each round, and ratios are taken
within a round. A shared machine's speed drifts between blocks of rounds (its neighbours come and go); within a round
the drift moves all providers alike, so the median of the per-round ratios is what it cannot bias."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def run_rounds(benchmark, steps: dict[str, Callable[[], None]], rounds: int, group: str) -> dict[str, list[float]]:
    """Seconds of each provider's step in each of ``rounds`` rounds (pytest-benchmark times the rounds as a whole).

    A step that runs on a GPU must end with a synchronisation for its time to be the step's.
    """
    names = list(steps)
    times: dict[str, list[float]] = {p: [] for p in names}

    def one_round():
        k = len(times[names[0]]) % len(names)
        for p in names[k:] + names[:k]:
            start = time.perf_counter()
            steps[p]()
            times[p].append(time.perf_counter() - start)

    benchmark.group = group
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    return times


def median_ratios(times: dict[str, list[float]], to: str) -> dict[str, float]:
    """Each provider's median over the rounds of its step time over ``to``'s in the same round."""
    base = times[to]
    return {p: statistics.median(a / b for a, b in zip(t, base, strict=True)) for p, t in times.items()}
