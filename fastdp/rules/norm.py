"""GroupNorm / LayerNorm affine parameters.

The normalisation has no parameters and runs under ordinary autograd; only the affine y = x_hat * w + b goes
through the engine. Per-example gradients are tiny (B x C): dw_i = sum over positions of delta * x_hat,
db_i = sum of delta, so they are always instantiated and kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.engine.contributions import Kept, accum_dtype
from fastdp.rules.base import LayerCall, Rule, register_rule, trainable


class _AffineRule(Rule):
    def affine_shape(self, module: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
        """Shape that broadcasts the affine parameters against x."""
        raise NotImplementedError

    def compute(self, call: LayerCall, x: torch.Tensor):
        m = call.module
        shape = self.affine_shape(m, x)
        call.info["shape"] = shape
        out = x
        if m.weight is not None:
            out = out * m.weight.to(x.dtype).view(shape)
        if m.bias is not None:
            out = out + m.bias.to(x.dtype).view(shape)
        return out, (x,)

    def grad_input(self, call: LayerCall, saved, grad_out: torch.Tensor) -> torch.Tensor:
        m = call.module
        if m.weight is None:
            return grad_out
        return grad_out * m.weight.to(grad_out.dtype).view(call.info["shape"])

    def per_row(self, module: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over everything but the batch and the parameter's dims: (N, *param.shape)."""
        raise NotImplementedError

    def contributions(self, call: LayerCall, saved, grad_out: torch.Tensor, augmult: int):
        m = call.module
        (x_hat,) = saved
        acc = accum_dtype(grad_out.dtype)
        d = grad_out.to(acc)
        out = []
        for name, p in trainable(m, "weight", "bias"):
            rows = self.per_row(m, d * x_hat.to(acc) if name == "weight" else d)
            per_ex = rows.view(-1, augmult, *rows.shape[1:]).sum(1)
            out.append((p, Kept(per_ex.to(p.dtype))))
        return out


@register_rule(nn.GroupNorm)
class GroupNormRule(_AffineRule):
    def prepare(self, call: LayerCall, x: torch.Tensor) -> torch.Tensor:
        m = call.module
        return F.group_norm(x, m.num_groups, None, None, m.eps)

    def affine_shape(self, module, x):
        return (1, -1) + (1,) * (x.dim() - 2)

    def per_row(self, module, t):
        return t.flatten(2).sum(2)


@register_rule(nn.LayerNorm)
class LayerNormRule(_AffineRule):
    def prepare(self, call: LayerCall, x: torch.Tensor) -> torch.Tensor:
        m = call.module
        if x.dim() <= len(m.normalized_shape):
            raise ValueError(
                f"fastdp needs a batch dimension: LayerNorm{tuple(m.normalized_shape)} got shape {tuple(x.shape)}"
            )
        return F.layer_norm(x, m.normalized_shape, None, None, m.eps)

    def affine_shape(self, module, x):
        return tuple(module.normalized_shape)

    def per_row(self, module, t):
        n = len(module.normalized_shape)
        middle = tuple(range(1, t.dim() - n))
        return t.sum(middle) if middle else t
