"""``triton``: the Triton kernels of kernels/ (installed as fastdp.kernels), imported when first used.

Per-example norms by implicit GEMM (linear and conv2d, optionally writing G_i), the flash-style ghost norm, the
clip-and-reduce and book-keeping kernels, and the multi-tensor noisy step. On a GPU; on CPU tensors only in Triton's
interpreter (``TRITON_INTERPRET=1``, for tests). The shifted ghost norm's Gram sum (which the WS convs' per-row norms
run on: no fused strategy gives those) is fastdp._C's ``shifted_gram`` where the extension has it for the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from fastdp.backends.base import Backend
from fastdp.engine.interface import LayerKernels, Reducer
from fastdp.fused_step import Launch, decoupled

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class TritonBackend(Backend):
    name: str = "triton"
    step_dtypes: tuple[torch.dtype, ...] = _DTYPES

    def reducer(self) -> Reducer:
        device_type = self.device_type

        def reduce(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
            if g.device.type != device_type or g.dtype not in _DTYPES:
                return None
            from fastdp.kernels.clip_reduce import clip_reduce

            return clip_reduce(g, w)

        return reduce

    def layer_kernels(self) -> LayerKernels:
        return _layer_kernels(self.device_type)

    def step_takes(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> bool:
        # the kernel has no dampening
        return super().step_takes(optimizer, params) and not any(g.get("dampening", 0) for g in optimizer.param_groups)

    def noisy_step(self, launch: Launch, std: float, batch: float, seed: int, step: int) -> None:
        from fastdp.kernels.noisy_step import noisy_step

        g = launch.group
        common = dict(std=std, expected_batch_size=batch, seed=seed, step=step, offsets=launch.offsets, lr=g["lr"])
        if launch.kind == "sgd":
            # a first step's zero buffer gives torch's buf = d_p exactly, since the kernel has no dampening
            noisy_step(
                launch.params, launch.sums, optimizer="sgd", weight_decay=g["weight_decay"], momentum=g["momentum"],
                nesterov=g["nesterov"], momentum_buffers=launch.momentum_buffers or None, **common,
            )  # fmt: skip
            return
        noisy_step(
            launch.params, launch.sums, optimizer="adamw" if decoupled(launch) else "adam",
            weight_decay=g["weight_decay"], betas=tuple(g["betas"]), eps=g["eps"], exp_avgs=launch.exp_avgs,
            exp_avg_sqs=launch.exp_avg_sqs, adam_step=launch.adam_step, **common,
        )  # fmt: skip


def _accum(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@cache
def _layer_kernels(device_type: str) -> LayerKernels:
    from fastdp.kernels import clip_reduce as cr
    from fastdp.kernels import ghost_norm as gn
    from fastdp.kernels import per_sample_norm as psn

    def conv2d_norm(x, delta, geom, augmult, out=None):
        return psn.per_sample_norm_conv2d(
            x, delta, geom.kernel, stride=geom.stride, padding=geom.padding, dilation=geom.dilation,
            augmult=augmult, out=out,
        )  # fmt: skip

    # the clipped sums leave the kernels in fp32 (or wider) also for 16-bit operands, as the torch strategies' do
    def conv2d_bookkeeping(x, delta, w, geom, augmult):
        return cr.clip_reduce_bookkeeping_conv2d(
            x, delta, w, geom.kernel, stride=geom.stride, padding=geom.padding, dilation=geom.dilation,
            augmult=augmult, out_dtype=_accum(x.dtype),
        )  # fmt: skip

    def conv2d_ghost_norm(x, delta, geom, augmult):
        return gn.ghost_norm_conv2d(
            x, delta, geom.kernel, stride=geom.stride, padding=geom.padding, dilation=geom.dilation, augmult=augmult
        )

    def linear_bookkeeping(a, delta, w):
        return cr.clip_reduce_bookkeeping(a, delta, w, out_dtype=_accum(a.dtype))

    from fastdp import _ext

    borrowed = _ext.cuda_compiled() if device_type == "cuda" else _ext.cpu_available()
    return LayerKernels(
        device_type=device_type,
        dtypes=_DTYPES,
        shifted_gram=torch.ops.fastdp.shifted_gram if borrowed else None,
        linear_norm=lambda a, d, out=None: psn.per_sample_norm(a, d, out=out),
        linear_ghost_norm=gn.ghost_norm,
        linear_bookkeeping=linear_bookkeeping,
        conv2d_norm=conv2d_norm,
        conv2d_bookkeeping=conv2d_bookkeeping,
        conv2d_ghost_norm=conv2d_ghost_norm,
    )
