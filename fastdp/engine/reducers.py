"""Clip-and-reduce kernels by backend: S = sum_i w_i G_i over kept per-example gradients G (B, P).

Memory-bound (one read of G): the compiled kernels beat torch's ``w @ G`` by reading G once with wide loads on all
threads (bench/bench_cpp.py). A reducer returns None for inputs it does not take, and the torch reduction runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastdp.backends import Backend
from fastdp.engine.contributions import Reducer

_COMPILED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _compiled(device_type: str) -> Reducer:
    def reduce(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
        if g.device.type != device_type or g.dtype not in _COMPILED_DTYPES or not g.is_contiguous():
            return None
        return torch.ops.fastdp.clip_reduce(g, w.to(torch.promote_types(g.dtype, torch.float32)))

    return reduce


def _triton(device_type: str) -> Reducer:
    def reduce(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
        if g.device.type != device_type or g.dtype not in _TRITON_DTYPES:
            return None
        from fastdp.kernels.clip_reduce import clip_reduce

        return clip_reduce(g, w)

    return reduce


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: backend name -> reducer for the backend's device type (Triton's is 'cpu' in its interpreter)
_REDUCERS: dict[str, Callable[[str], Reducer]] = {"cpp": _compiled, "cuda": _compiled, "triton": _triton}


def reducer_for(backend: Backend) -> Reducer | None:
    make = _REDUCERS.get(backend.name)
    return None if make is None else make(backend.device_type)
