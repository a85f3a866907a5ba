"""fastdp.nn.ScalarGain (y = g * x with one scalar g): the skip-init gain of NF-ResNets and NFNets.

The per-row gradient of g is sum over the row's elements of delta * x, so example i (rows i*K .. i*K+K-1 with
augmult K) gets

    dg_i = sum_{k < K} sum_j delta[iK + k, j] * x[iK + k, j]

one dot product per row, kept (B scalars). The input gradient is g * delta.
"""

from __future__ import annotations

import torch

from fastdp.engine.contributions import Kept, accum_dtype, views_summed
from fastdp.nn.gain import ScalarGain
from fastdp.rules.base import LayerCall, Rule, register_rule


@register_rule(ScalarGain)
class ScalarGainRule(Rule):
    def compute(self, call: LayerCall, x: torch.Tensor):
        m = call.module
        if x.dim() < 1:
            raise ValueError("fastdp needs a batch dimension: ScalarGain got a 0-dimensional input")
        return x * m.gain.to(x.dtype), (x,)

    def grad_input(self, call: LayerCall, saved, grad_out: torch.Tensor) -> torch.Tensor:
        return grad_out * call.module.gain.to(grad_out.dtype)

    def contributions(self, call: LayerCall, saved, grad_out: torch.Tensor, augmult: int):
        p = call.module.gain
        if not p.requires_grad:
            return []
        (x,) = saved
        acc = accum_dtype(p.dtype)
        N = x.shape[0]
        per_row = torch.linalg.vecdot(grad_out.reshape(N, -1).to(acc), x.reshape(N, -1).to(acc), dim=1)
        return [(p, Kept(views_summed(per_row, augmult).to(p.dtype)))]
