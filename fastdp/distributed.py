"""Data-parallel DP-SGD over torch.distributed (NCCL on GPUs, gloo on CPUs).

The unit of privacy is the example and the logical batch is one global Poisson draw (what the accountant
assumes), split over the ranks. Each rank clips its own examples exactly as a single process would; the step then

1. adds the Gaussian noise N(0, sigma^2 C^2) on rank 0 only, to rank 0's clipped sum,
2. sums the clipped sums of all ranks with one bucketed all-reduce,

so the global sum carries the noise exactly once: variance sigma^2 C^2, not world_size times that, and not
divided by the world size. Every rank then divides by the same expected batch size and applies the same update
to the same parameters (broadcast from rank 0 when the optimizer is built), so all ranks stay identical.

Why not all-reduce during the backward, as DDP does: an example's clip factor needs its norm over *all* layers,
known only when its backward is over, and summing a logical batch's micro-batches locally first means one
all-reduce per logical batch instead of one per micro-batch. The buckets are launched asynchronously, so their
transfers overlap each other and the flattening of the next bucket.

A rank that fails or stops responding makes the collective on the other ranks raise (gloo: immediately when the
peer's connection closes; NCCL and gloo: after the process group's timeout) with a message naming the step,
instead of hanging.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

#: bytes per all-reduce bucket (DDP's default is 25 MiB)
BUCKET_BYTES = 25 << 20


def active_group(process_group=None):
    """The process group to use: the given one, else the default group if torch.distributed is initialised
    with more than one rank, else None (single process)."""
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def all_reduce_sum(tensors: list[torch.Tensor], group, what: str = "the clipped sums") -> None:
    """Sum ``tensors`` in place over the ranks of ``group``, in buckets of at most BUCKET_BYTES per dtype/device."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        same = buckets and buckets[-1][0].dtype == t.dtype and buckets[-1][0].device == t.device
        if not same or size + t.numel() * t.element_size() > BUCKET_BYTES:
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += t.numel() * t.element_size()
    try:
        pending = []
        for bucket in buckets:
            flat = _flatten_dense_tensors(bucket)
            pending.append((bucket, flat, dist.all_reduce(flat, group=group, async_op=True)))
        for bucket, flat, work in pending:
            work.wait()
            for t, s in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                t.copy_(s)
    except RuntimeError as err:
        raise RuntimeError(
            f"fastdp: the all-reduce of {what} failed on rank {dist.get_rank(group)} of "
            f"{dist.get_world_size(group)}: another rank failed or did not reach this step within the process "
            f"group's timeout. Every rank must run the same number of optimizer steps. ({err})"
        ) from err


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, group) -> None:
    """Give every rank rank 0's parameters and buffers (the ranks must start identical)."""
    tensors = [t for t in list(module.parameters()) + list(module.buffers())]
    for t in tensors:
        dist.broadcast(t.data, src=dist.get_global_rank(group, 0), group=group)


def broadcast_int(value: int | None, group) -> int:
    """Rank 0's ``value`` on every rank (e.g. a seed drawn on rank 0)."""
    obj = [value]
    dist.broadcast_object_list(obj, src=dist.get_global_rank(group, 0), group=group)
    return int(obj[0])


def init_from_env(device: str, timeout_s: float) -> tuple[int, int, str, bool]:
    """Join the job torchrun describes (WORLD_SIZE > 1 in the environment), else run as a single process.

    Returns (rank, world_size, device, created): NCCL for CUDA devices (each rank on cuda:LOCAL_RANK), gloo
    otherwise; ``timeout_s`` bounds how long a collective waits for a rank that failed or stalled. ``created``
    says whether this call initialised the process group (and so should destroy it).
    """
    import datetime
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device, False
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(
            "nccl" if device.startswith("cuda") else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
    return dist.get_rank(), dist.get_world_size(), device, created


def gather_objects(obj, group=None) -> list:
    """``obj`` of every rank, in rank order, on every rank (a single-element list without a process group)."""
    group = active_group(group)
    if group is None:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
