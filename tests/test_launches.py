"""The launch budget of a DP step (issue 12): kernel-launching ops at most 2x the non-private step, 1.5x (the goal)
for the issue's models, no host syncs.

Counted with fastdp.launches.LaunchCounter over one steady-state step (forward, backward, step, zero_grad) after two
warm-up steps, on the CPU path of each backend, as bench/bench_launches.py prints them. The counts are a property of
the code, not of the machine: the same on every run for a given plan (the cost model's, autotune=False).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

import fastdp
from fastdp.host_read import HostRead
from fastdp.launches import LaunchCounter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_launches import count  # noqa: E402

#: at most this many launching ops per DP step, per non-private step's (the issue's bound)
BUDGET = 2.0
#: the issue's goal, held by its models (WRN-16-4 and WRN-40-4 1.30-1.34x, NF-ResNet-50 1.13-1.14x, ViT-S
#: 1.42-1.45x at the batch below; vit-mini, a smaller ViT, 1.59-1.64x)
GOAL = 1.5
AT_GOAL = {"wrn-16-4", "wrn-40-4", "nf_resnet50", "vit-s"}
MODELS = ["wrn-16-4", "wrn-40-4", "nf_resnet50", "vit-s", "vit-mini"]
BACKENDS = ["torch"] + [b for b in ("cpp",) if b in fastdp.available_backends()]


BATCH = 4


@functools.cache
def non_private(model: str):
    return count(model, private=False, batch=BATCH)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", MODELS)
def test_dp_step_launches_within_budget_and_never_syncs(model, backend):
    plain = non_private(model)
    dp = count(model, private=True, backend=backend, batch=BATCH)
    assert dp.total_syncs == 0, f"host syncs in the DP step: {dict(dp.syncs)}"
    ratio, bound = dp.total / plain.total, GOAL if model in AT_GOAL else BUDGET
    assert ratio <= bound, (
        f"{model} ({backend}): {dp.total} launching ops per DP step against {plain.total} non-private ({ratio:.2f}x > "
        f"{bound}x); most frequent: {dp.launches.most_common(8)}"
    )


@pytest.mark.skipif("cpp" not in BACKENDS, reason="fastdp._C is not built")
def test_default_cpu_path_holds_the_goal_at_the_benches_batch():
    """At batch 32 the CPU splits work a GPU would not (the shifted ghost norms' Gram matrices in chunks): with
    fastdp._C's shifted_gram, WRN-40-4's step still issues at most GOAL x the non-private step's launches (1.22x;
    1.55x with the box additions' 2 MB chunks; WRN-16-4 1.25x and 1.46x, under the goal either way, so not run
    here)."""
    plain, dp = count("wrn-40-4", private=False, batch=32), count("wrn-40-4", private=True, backend="cpp", batch=32)
    assert dp.total / plain.total <= GOAL, (dp.total, plain.total, dp.launches.most_common(8))


def test_counter_sees_launches_and_syncs():
    x = torch.ones(4)
    with LaunchCounter() as c:
        y = (x * 2).view(2, 2).sum()  # mul and sum launch; view does not
        bool(y > 0)  # gt launches; bool reads the value on the host
    assert dict(c.launches) == {"mul": 1, "sum": 1, "gt": 1} and c.total_syncs == 1


def test_nonfinite_batch_counts_without_a_sync():
    """A batch with a non-finite example: the step still issues no host read (the count stays on the device)."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.GroupNorm(1, 3), torch.nn.Linear(3, 2))
    opt = fastdp.DPSGD(model, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, seed=0)
    x = torch.randn(4, 4)
    x[2] = float("nan")
    for _ in range(2):
        model(x).square().sum().backward()
        opt.step()
    with LaunchCounter() as c:
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert c.total_syncs == 0
    assert opt.nonfinite_last_batch == 1 and opt.nonfinite_examples == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_host_read_reads_without_a_sync():
    t = torch.tensor([3.0, 4.5])
    with LaunchCounter() as c:
        read = HostRead(t * 2)
        assert read.ready() and read.value() == [6.0, 9.0]
    assert c.total_syncs == 0
