"""The noise of one DP step for a million parameters: ``secure_rng=True`` (os.urandom + Box-Muller in float64 on the
host, ``fastdp-train --secure-rng``) against the default seeded Philox stream (fastdp._C's kernel, else the pure-torch
reference), float32 on the CPU.

extra_info holds the median in ms per million parameters and the ratio secure / philox of this run. Times are never
asserted; the figures and the load they were taken under are in bench/RESULTS.md. Run:

    python -m pytest bench/bench_secure_rng.py -q -p no:cacheprovider --benchmark-columns=median,min,rounds
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch

from fastdp import _ext
from fastdp.noise import GaussianNoise

NUMEL = 1 << 20  # about a million parameters
THREADS = int(os.environ.get("FASTDP_BENCH_THREADS", "2"))
MEDIANS: dict[str, float] = {}


@pytest.mark.parametrize("provider", ["philox", "secure"])
def test_noise_of_one_step_per_million_parameters(benchmark, provider):
    torch.set_num_threads(THREADS)
    noise = GaussianNoise(seed=1234, secure=provider == "secure")
    step = iter(range(1 << 30))

    def draw():
        # what DPOptimizer's torch path does per step: the draw, then the float32 noise added to the sums
        return noise.sample(NUMEL, next(step), 0, torch.device("cpu")).to(torch.float32)

    benchmark.pedantic(draw, rounds=20, warmup_rounds=2, iterations=1)
    median = statistics.median(benchmark.stats.stats.data)
    MEDIANS[provider] = median
    benchmark.extra_info.update(
        device="cpu",
        threads=torch.get_num_threads(),
        philox_kernel="fastdp._C" if _ext.cpu_available() else "pure-torch reference",
        ms_per_million_parameters=median * 1e3 * 1e6 / NUMEL,
        load_average=os.getloadavg(),
    )
    if "philox" in MEDIANS and provider == "secure":
        benchmark.extra_info["secure_over_philox"] = median / MEDIANS["philox"]
