"""Data-parallel scaling of the DP step on CPU: 1 process x 2 threads against 2 processes x 1 thread (gloo).

Same global logical batch (64 examples of 32x32x3, WRN-10-2 with GroupNorm) and sigma, timed inside the workers
after 2 warm-up steps (autotuning included there): median seconds per step over 6 steps, and examples/s. The
pytest-benchmark time is the whole launch (process start included); the ratio to read is in extra_info and in
the printed line. On 2 cores the two layouts use the same cores, so this measures the cost of the all-reduce
and of splitting the batch, not added hardware.

Run: python -m pytest bench/bench_distributed.py -q -p no:cacheprovider -s
"""

from __future__ import annotations

import datetime
import socket
import statistics
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

GLOBAL_BATCH, STEPS, WARMUP = 64, 6, 2
RESULTS: dict[int, float] = {}


def _worker(rank: int, world: int, address: str, q) -> None:
    import fastdp
    from fastdp.data import micro_batches
    from fastdp.models import wrn

    torch.set_num_threads(2 // world)
    if world > 1:
        dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))  # fmt: skip
    torch.manual_seed(0)
    model = wrn(10, 2, 10, ws=False)
    opt = fastdp.DPSGD(model, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=GLOBAL_BATCH)
    share = GLOBAL_BATCH // world
    x, y = torch.randn(share, 3, 32, 32), torch.randint(0, 10, (share,))
    times = []
    for i in range(WARMUP + STEPS):
        start = time.perf_counter()
        for xb, yb in micro_batches(x, y, max_physical_batch=32):
            F.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    if rank == 0:
        q.put(statistics.median(times))
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    address = f"tcp://127.0.0.1:{_free_port()}"
    procs = [ctx.Process(target=_worker, args=(r, world, address, q)) for r in range(world)]
    for p in procs:
        p.start()
    step_s = q.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    return step_s


@pytest.mark.parametrize("world", [1, 2])
def test_dp_step_scaling(benchmark, world):
    step_s = benchmark.pedantic(_launch, args=(world,), rounds=1, iterations=1)
    RESULTS[world] = step_s
    benchmark.extra_info.update(
        processes=world, threads_per_process=2 // world, step_s=round(step_s, 4),
        examples_per_s=round(GLOBAL_BATCH / step_s, 1),
    )  # fmt: skip
    if 1 in RESULTS and world != 1:
        benchmark.extra_info["throughput_vs_1_process"] = round(RESULTS[1] / step_s, 3)
    ratio = f", {RESULTS[1] / step_s:.2f}x the 1-process throughput" if 1 in RESULTS and world != 1 else ""
    print(f"\n{world} process(es): {step_s * 1e3:.1f} ms/step, {GLOBAL_BATCH / step_s:.1f} examples/s{ratio}")
