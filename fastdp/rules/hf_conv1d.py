"""transformers' ``Conv1D`` (GPT-2 and its family): a linear layer with the weight stored transposed.

    y = x W + b,   W: (in, out) = (nx, nf)

so the per-example gradient is G_i = a_i^T delta_i (nx x nf), the Linear rule's delta_i^T a_i with the roles of a
and delta swapped. Every Linear strategy (fastdp.rules.linear.LINEAR_STRATEGIES: ghost norm, instantiation,
book-keeping, fused kernels) computes exactly that when handed (delta, a) for (a, delta): the ghost norm is
symmetric in the two, and the book-keeping sum (w a)^T delta is the clipped sum of the a_i^T delta_i.

Registered by qualified name (fastdp.rules.base.register_rule): fastdp neither imports transformers nor needs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.engine.contributions import Kept, accum_dtype
from fastdp.engine.interface import LayerKernels
from fastdp.rules.base import Cost, LayerCall, Rule, compute_dtype, register_rule, trainable
from fastdp.rules.linear import LINEAR_STRATEGIES, linear_shape

#: where transformers has defined Conv1D (pytorch_utils since 4.20; modeling_utils before)
CONV1D_NAMES = ("transformers.pytorch_utils.Conv1D", "transformers.modeling_utils.Conv1D")


@register_rule(*CONV1D_NAMES)
class Conv1DRule(Rule):
    strategy_names = LINEAR_STRATEGIES.names
    positionwise = True

    def check(self, module: nn.Module) -> None:
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"fastdp: {type(module).__name__} has no 2-D weight (nx, nf); it is not a Conv1D")

    def strategies(
        self, module: nn.Module, x: torch.Tensor, augmult: int, kernels: LayerKernels | None = None
    ) -> dict[str, Cost]:
        nx, nf = module.weight.shape
        N = x.shape[0]
        T = x[0].numel() // nx if N else 1
        # the strategies see (delta, a): "inputs" of nf features, "outputs" of nx
        shape = linear_shape(N // augmult, T * augmult, nf, nx, N * T, x, accum_dtype(module.weight.dtype), kernels)
        return LINEAR_STRATEGIES.offer(shape)

    def compute(self, call: LayerCall, x: torch.Tensor):
        m = call.module
        cdt = compute_dtype(x, m.weight)
        call.info["in_dtype"] = x.dtype
        xc = x.to(cdt)
        bias = None if m.bias is None else m.bias.to(cdt)
        return F.linear(xc, m.weight.to(cdt).t(), bias), (xc,)

    def grad_input(self, call: LayerCall, saved, grad_out: torch.Tensor) -> torch.Tensor:
        return (grad_out @ call.module.weight.to(grad_out.dtype).t()).to(call.info["in_dtype"])

    def contributions(self, call: LayerCall, saved: Sequence[torch.Tensor], grad_out: torch.Tensor, augmult: int):
        m = call.module
        (x,) = saved
        nx, nf = m.weight.shape
        acc = accum_dtype(m.weight.dtype)
        B = x.shape[0] // augmult
        a = x.reshape(B, -1, nx).to(acc)
        d = grad_out.reshape(B, -1, nf).to(acc)
        out: list = []
        for name, p in trainable(m, "weight", "bias"):
            if name == "bias":
                out.append((p, Kept(d.sum(1).to(p.dtype))))
            else:  # (delta, a) in the places of (a, delta): G_i = a_i^T delta_i, (nx, nf)
                out.append((p, LINEAR_STRATEGIES[call.strategy].contribute(call, d, a, p.dtype)))
        return out
