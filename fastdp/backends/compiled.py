"""``cpp`` and ``cuda``: the compiled extension fastdp._C (csrc/), the same ops dispatched by the tensors' device.

On CPU parameters the optimizer step is one multi-threaded pass over all parameters of a launch; on GPU parameters
one multi-tensor launch. The clip-and-reduce reads the kept per-example gradients once with wide loads. Both sum the
shifted ghost norm's Gram matrix in one launch (``shifted_gram``); ``cuda`` also has the per-example norm of Linear
layers (its book-keeping GEMMs are cuBLAS's / cuDNN's through torch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastdp.backends.base import Backend
from fastdp.engine.interface import LayerKernels, Reducer
from fastdp.fused_step import Launch, decoupled

_REDUCE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_NORM_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
#: the shifted Gram matrix is summed in the rule's accumulation dtype
_SHIFT_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class CompiledBackend(Backend):
    step_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)

    def reducer(self) -> Reducer:
        device_type = self.device_type

        def reduce(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
            if g.device.type != device_type or g.dtype not in _REDUCE_DTYPES or not g.is_contiguous():
                return None
            return torch.ops.fastdp.clip_reduce(g, w.to(torch.promote_types(g.dtype, torch.float32)))

        return reduce

    def layer_kernels(self) -> LayerKernels:
        shifted_gram = torch.ops.fastdp.shifted_gram
        if self.name != "cuda":
            return LayerKernels(device_type="cpu", dtypes=_SHIFT_DTYPES, shifted_gram=shifted_gram)

        def linear_norm(a, d, out=None):
            # the CUDA kernel reads dense rows; the rules' a and delta are views of contiguous activations already.
            # It writes G_i in the operands' dtype: fp32 G_i (kept under autocast) needs fp32 operands, so that the
            # norm is the one of what is kept
            if out is not None and out.dtype != a.dtype:
                a, d = a.to(out.dtype), d.to(out.dtype)
            return torch.ops.fastdp.linear_sq_norms(a.contiguous(), d.contiguous(), out)

        return LayerKernels(device_type="cuda", dtypes=_NORM_DTYPES, linear_norm=linear_norm, shifted_gram=shifted_gram)

    def noisy_step(self, launch: Launch, std: float, batch: float, seed: int, step: int) -> None:
        g, ops = launch.group, torch.ops.fastdp
        if launch.kind == "sgd":
            ops.noisy_sgd_step_(
                launch.params, launch.sums, launch.momentum_buffers, launch.offsets, std, batch, seed, step, g["lr"],
                g["momentum"], g["dampening"], g["weight_decay"], g["nesterov"], launch.first,
            )  # fmt: skip
            return
        beta1, beta2 = g["betas"]
        ops.noisy_adam_step_(
            launch.params, launch.sums, launch.exp_avgs, launch.exp_avg_sqs, launch.offsets, std, batch, seed, step,
            g["lr"], beta1, beta2, g["eps"], g["weight_decay"], decoupled(launch), launch.adam_step,
        )  # fmt: skip
