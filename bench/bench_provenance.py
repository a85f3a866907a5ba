"""What the batch-provenance probe costs (fastdp/engine/provenance.py): once per input signature, against one forward.

The probe runs the model without gradients on the batch as given, with its examples rolled and with one example
replaced (three forwards), and compares every wrapped layer's input across them. It runs once per input signature
(shapes apart from the batch size), like the per-layer plan, so a run pays it on its first micro-batch (and once
more per new sequence length). ``forward`` is one forward of the same model and batch without gradients;
extra_info holds ``x_forward``, the probe's median over the forward's. Times are never asserted. Run:

    python -m pytest bench/bench_provenance.py -q -p no:cacheprovider --benchmark-columns=median,min,rounds
"""

from __future__ import annotations

import os
import statistics
import warnings

import pytest
import torch

from fastdp.engine import GradSampleEngine
from fastdp.models import build_model

THREADS = int(os.environ.get("FASTDP_BENCH_THREADS", "2"))
CASES = {"wrn-16-4": ((3, 32, 32), 32), "digits_cnn": ((1, 8, 8), 64)}
MEDIANS: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module", autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


@pytest.mark.parametrize("provider", ["forward", "probe"])
@pytest.mark.parametrize("model_name", list(CASES))
def test_probe_cost(benchmark, model_name, provider):
    shape, batch = CASES[model_name]
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10, in_channels=shape[0])
    x = torch.randn(batch, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eng = GradSampleEngine(model, max_grad_norm=1.0, autotune=False)

    def forward():
        with torch.no_grad():
            model(x)

    def probe():
        eng._probe((x,), {}, batch)

    benchmark.pedantic(forward if provider == "forward" else probe, rounds=5, warmup_rounds=1)
    median = statistics.median(benchmark.stats.stats.data)
    MEDIANS[(model_name, provider)] = median
    benchmark.extra_info.update(device="cpu", threads=THREADS, median_ms=median * 1e3, load=os.getloadavg()[0])
    if provider == "probe" and (model_name, "forward") in MEDIANS:
        benchmark.extra_info["x_forward"] = median / MEDIANS[(model_name, "forward")]
