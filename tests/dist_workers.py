"""Worker processes for tests/test_distributed.py (top-level functions, so that spawned processes can import them)."""

from __future__ import annotations

import datetime
import os
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fastdp
from fastdp.data import DistributedPoissonSampler, PoissonSampler, micro_batches

N, STEPS, B, C = 40, 3, 12, 0.5


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g)


def model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 36, 3)
    ).double()  # fmt: skip


def train(world: int, rank: int) -> dict[str, torch.Tensor]:
    """STEPS DP-SGD steps with sigma 0 on the same global Poisson batches, whatever the number of ranks."""
    x, y = data()
    m = model()
    if world > 1:
        with torch.no_grad():  # a different start on rank 1: the optimizer must broadcast rank 0's parameters
            for p in m.parameters():
                p.add_(rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sigma 0
        opt = fastdp.DPSGD(m, lr=0.3, momentum=0.9, noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=B)
    if world > 1:
        sampler = DistributedPoissonSampler(N, expected_batch_size=B, steps=STEPS, seed=7)
    else:
        sampler = PoissonSampler(N, expected_batch_size=B, steps=STEPS, seed=7)
    for idx in sampler:
        for xb, yb in micro_batches(x[idx], y[idx], max_physical_batch=3):
            F.cross_entropy(m(xb), yb).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def noise_update(world: int, rank: int, sigma: float, n: int) -> torch.Tensor:
    """One empty-batch step of plain SGD (lr 1) on n parameters: the update is minus the noise over B."""
    m = nn.Linear(n, 1, bias=False)
    with torch.no_grad():
        m.weight.zero_()
    opt = fastdp.DPSGD(m, lr=1.0, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=B, seed=11 + rank)
    opt.step()
    return -m.weight.detach().flatten().clone()


def failing(world: int, rank: int) -> None:
    """Rank 1 dies before its first step; rank 0 must get a clear error, not hang."""
    m = nn.Linear(3, 2)
    opt = fastdp.DPSGD(m, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    if rank == 1:
        raise SystemExit("rank 1 fails on purpose")
    opt.step()


def run(fn_name: str, world: int, rank: int, store: str, queue, args: tuple, timeout_s: float) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )  # fmt: skip
        out = globals()[fn_name](world, rank, *args)
        # as numpy: tensors would travel through shared memory that dies with this process
        if isinstance(out, dict):
            out = {k: v.numpy() for k, v in out.items()}
        elif isinstance(out, torch.Tensor):
            out = out.numpy()
        queue.put((rank, "ok", out))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
