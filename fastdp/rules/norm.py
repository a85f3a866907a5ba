"""GroupNorm / LayerNorm / RMSNorm affine parameters.

The layer runs as one node that saves exactly what torch's own backward saves (input, mean, rstd), so DP
costs no extra activation memory. Per-example gradients are tiny (B x C) and always kept:

    GroupNorm: dw_i[c] = rstd_i[g(c)] * sum_t delta * (x - mean_i[g(c)]),   db_i[c] = sum_t delta
               (channels viewed as (groups, C / groups): mean and rstd broadcast over a group's channels)
    LayerNorm: dw_i = sum over the non-normalised dims of delta * x_hat,                db_i = sum of delta
    RMSNorm:   dw_i = sum over the non-normalised dims of delta * x_hat, x_hat = x * r, r = (mean(x^2) + eps)^-1/2
               (mean over the normalised dims; eps=None is the dtype's machine epsilon, as in torch)

RMSNorm's input gradient, from dr/dx_j = -r^3 x_j / n with g = delta * w: dx = r * (g - x_hat * mean(g * x_hat)).
"""

from __future__ import annotations

import torch
from torch import nn

from fastdp.engine.contributions import Kept, accum_dtype, views_summed
from fastdp.rules.base import LayerCall, Rule, register_rule, trainable


def _norm_dtype(x: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
    # autocast runs normalisations in float32; without it they run in the parameters' dtype
    if torch.is_autocast_enabled(x.device.type):
        return torch.float32
    return x.dtype if weight is None else weight.dtype


@register_rule(nn.GroupNorm)
class GroupNormRule(Rule):
    def compute(self, call: LayerCall, x: torch.Tensor):
        m = call.module
        if x.dim() < 2:
            raise ValueError(f"fastdp needs a batch dimension: GroupNorm got shape {tuple(x.shape)}")
        call.info["in_dtype"] = x.dtype
        xc = x.to(_norm_dtype(x, m.weight)).contiguous()
        N, C = xc.shape[:2]
        w = None if m.weight is None else m.weight.to(xc.dtype)
        b = None if m.bias is None else m.bias.to(xc.dtype)
        out, mean, rstd = torch.ops.aten.native_group_norm(xc, w, b, N, C, xc[0, 0].numel(), m.num_groups, m.eps)
        return out, (xc, mean, rstd)

    def grad_input(self, call: LayerCall, saved, grad_out: torch.Tensor) -> torch.Tensor:
        m = call.module
        x, mean, rstd = saved
        N, C = x.shape[:2]
        w = None if m.weight is None else m.weight.to(x.dtype)
        gx = torch.ops.aten.native_group_norm_backward(
            grad_out.to(x.dtype).contiguous(), x, mean, rstd, w, N, C, x[0, 0].numel(), m.num_groups,
            [True, False, False],
        )[0]  # fmt: skip
        return gx.to(call.info["in_dtype"])

    def contributions(self, call: LayerCall, saved, grad_out: torch.Tensor, augmult: int):
        m = call.module
        x, mean, rstd = saved
        acc = accum_dtype(x.dtype)
        N, C = x.shape[:2]
        G = m.num_groups
        d = grad_out.to(acc).reshape(N, C, -1)
        db = d.sum(2)  # sum_t delta, (N, C)
        out = []
        for name, p in trainable(m, "weight", "bias"):
            if name == "weight":
                # rstd * sum_t delta (x - mean) as rstd * (sum_t delta x - mean sum_t delta): two reductions of the
                # activation and no centred copy of it; the decomposition torch's own GroupNorm backward sums
                # its weight gradient from
                ds = torch.linalg.vecdot(d, x.to(acc).reshape(N, C, -1))
                rows = torch.addcmul(ds.view(N, G, -1), db.view(N, G, -1), mean.to(acc).view(N, G, 1), value=-1.0)
                rows = rows.mul_(rstd.to(acc).view(N, G, 1)).view(N, C)
            else:
                rows = db
            out.append((p, Kept(views_summed(rows, augmult).to(p.dtype))))
        return out


@register_rule(nn.LayerNorm)
class LayerNormRule(Rule):
    positionwise = True

    def compute(self, call: LayerCall, x: torch.Tensor):
        m = call.module
        shape = tuple(m.normalized_shape)
        if x.dim() <= len(shape):
            raise ValueError(f"fastdp needs a batch dimension: LayerNorm{shape} got shape {tuple(x.shape)}")
        call.info["in_dtype"] = x.dtype
        xc = x.to(_norm_dtype(x, m.weight)).contiguous()
        w = None if m.weight is None else m.weight.to(xc.dtype)
        b = None if m.bias is None else m.bias.to(xc.dtype)
        out, mean, rstd = torch.ops.aten.native_layer_norm(xc, shape, w, b, m.eps)
        return out, (xc, mean, rstd)

    def grad_input(self, call: LayerCall, saved, grad_out: torch.Tensor) -> torch.Tensor:
        m = call.module
        x, mean, rstd = saved
        w = None if m.weight is None else m.weight.to(x.dtype)
        b = None if m.bias is None else m.bias.to(x.dtype)
        gx = torch.ops.aten.native_layer_norm_backward(
            grad_out.to(x.dtype).contiguous(), x, tuple(m.normalized_shape), mean, rstd, w, b, [True, False, False]
        )[0]
        return gx.to(call.info["in_dtype"])

    def contributions(self, call: LayerCall, saved, grad_out: torch.Tensor, augmult: int):
        m = call.module
        x, mean, rstd = saved
        acc = accum_dtype(x.dtype)
        d = grad_out.to(acc)
        middle = tuple(range(1, x.dim() - len(m.normalized_shape)))

        def per_row(t: torch.Tensor) -> torch.Tensor:
            return t.sum(middle) if middle else t

        out = []
        for name, p in trainable(m, "weight", "bias"):
            if name == "weight":
                rows = per_row(d * ((x.to(acc) - mean.to(acc)) * rstd.to(acc)))
            else:
                rows = per_row(d)
            out.append((p, Kept(views_summed(rows.reshape(-1, *p.shape), augmult).to(p.dtype))))
        return out


@register_rule(nn.RMSNorm)
class RMSNormRule(Rule):
    positionwise = True

    def compute(self, call: LayerCall, x: torch.Tensor):
        m = call.module
        dims = tuple(range(-len(m.normalized_shape), 0))
        if x.dim() <= len(dims):
            raise ValueError(f"fastdp needs a batch dimension: RMSNorm{tuple(m.normalized_shape)} got {tuple(x.shape)}")
        call.info["in_dtype"] = x.dtype
        xc = x.to(_norm_dtype(x, m.weight))
        eps = torch.finfo(xc.dtype).eps if m.eps is None else m.eps
        r = torch.rsqrt(xc.square().mean(dims, keepdim=True) + eps)
        x_hat = xc * r
        return (x_hat if m.weight is None else x_hat * m.weight.to(xc.dtype)), (x_hat, r)

    def grad_input(self, call: LayerCall, saved, grad_out: torch.Tensor) -> torch.Tensor:
        m = call.module
        x_hat, r = saved
        dims = tuple(range(-len(m.normalized_shape), 0))
        g = grad_out.to(x_hat.dtype)
        if m.weight is not None:
            g = g * m.weight.to(x_hat.dtype)
        return (r * (g - x_hat * (g * x_hat).mean(dims, keepdim=True))).to(call.info["in_dtype"])

    def contributions(self, call: LayerCall, saved, grad_out: torch.Tensor, augmult: int):
        m = call.module
        (x_hat, _) = saved
        acc = accum_dtype(x_hat.dtype)
        middle = tuple(range(1, x_hat.dim() - len(m.normalized_shape)))
        out = []
        for _, p in trainable(m, "weight"):
            rows = grad_out.to(acc) * x_hat.to(acc)
            rows = rows.sum(middle) if middle else rows
            out.append((p, Kept(views_summed(rows.reshape(-1, *p.shape), augmult).to(p.dtype))))
        return out
