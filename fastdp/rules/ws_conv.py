"""Weight-standardised convs (fastdp.nn.WSConv2d, ScaledStdConv2d): exact per-example norms through the
Jacobian of the standardisation, without materialising per-example gradients.

Per output row r (fan-in n): u = (W - mean) / std with std = sqrt(var + eps), W_hat = s u. For g = dL/dW_hat[r]
(one example), differentiating u gives

    dL/dW[r] = (s / std) * (g - mean(g) - u (g . u) / n)                                    (J^T g)

which holds with or without eps because u is defined with the same std (then ||u||^2 = n var / (var + eps)).
Expanding the square with sum(u) = 0:

    ||dL/dW[r]||^2 = (s / std)^2 * ( ||g||^2 - (sum g)^2 / n - (g . u)^2 / n * (2 - ||u||^2 / n) ).

The three per-row terms are cheap per example: ||g||^2 per row comes from the conv strategy (ghost or
instantiated); sum_j G[r, j] = sum_t delta_t[r] * (sum of input patch t), a one-channel convolution;
g . u = sum_t delta_t[r] * conv(x, u)_t[r], i.e. the layer's own pre-scale output. That same g . u is the
per-example gradient of the gain (times the constant scale). The clipped sum is J^T (sum_i c_i g_i): the
Jacobian applied once. Ghost norms of W_hat alone would be wrong for these layers.

The identity subtracts terms, so a row whose gradient lies almost in span(1, u) loses relative precision;
the result is clamped at 0. Those rows have tiny norms next to the others, so the total is unaffected.
"""

from __future__ import annotations

import functools

import torch

from fastdp.engine.contributions import Kept, accum_dtype, views_summed
from fastdp.engine.interface import Contribution
from fastdp.nn.ws_conv import ScaledStdConv2d, WSConv2d, standardize_weight
from fastdp.rules.base import LayerCall, compute_dtype, kernel_operands, register_rule, trainable
from fastdp.rules.conv import FUSED, GHOST_STRATEGIES, ConvRule, bias_grads


class StandardizationJacobian:
    """J^T for W_hat = s * standardize(W), applied to gradients shaped (..., C_out, *fan_in)."""

    def __init__(self, u: torch.Tensor, std: torch.Tensor, s: torch.Tensor, eps: float) -> None:
        self.u = u.flatten(1)  # (p, n)
        self.n = self.u.shape[1]
        self.std, self.eps = std, float(eps)
        self.factor = s / std  # (p,)

    def apply(self, g: torch.Tensor) -> torch.Tensor:
        shape = g.shape  # (..., C_out, C_in / groups, kh, kw): the weight is 4-D
        g = g.reshape(*shape[:-3], -1)
        gu = torch.linalg.vecdot(g, self.u).unsqueeze(-1)
        # f * (g - mean(g) - u (g . u) / n), as (g - mean(g)) + (-1/n) u (g . u), then the row factor
        out = torch.addcmul(g - g.mean(-1, keepdim=True), self.u, gu, value=-1.0 / self.n)
        return out.mul_(self.factor.unsqueeze(-1)).reshape(shape)


def _row_constants(rows: tuple[tuple[int, int, float], ...], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1/n, eps) of every row of the layers ``rows`` ((C_out, n, eps) each), end to end, on ``like``'s device and in
    its dtype: made once per model and device. Not kept for the fake tensors of a dry run (fastdp.engine.dry_run):
    they belong to the mode that made them."""
    if type(like) is not torch.Tensor:
        return _make_row_constants(rows, like.device, like.dtype)
    return _cached_row_constants(rows, like.device, like.dtype)


def _make_row_constants(rows, device, dtype):
    inv_n = [1.0 / n for p, n, _ in rows for _ in range(p)]
    eps = [e for p, _, e in rows for _ in range(p)]
    return torch.tensor(inv_n, dtype=dtype, device=device), torch.tensor(eps, dtype=dtype, device=device)


_cached_row_constants = functools.cache(_make_row_constants)


class WSWeight(Contribution):
    """The raw weight's contribution: the conv contribution w.r.t. W_hat seen through J^T.

    Its squared norm (module docstring), with ||u||^2 / n = var / (var + eps) = 1 - eps / std^2 (u is defined with
    the same std):

        ||J^T g||^2 = sum_r f_r^2 max(0, ||g_r||^2 - ((sum g_r)^2 + (g_r . u_r)^2 (1 + eps / std_r^2)) / n),

    f = s / std, from the per-row terms ``row_sq``, ``row_sum``, ``gu`` (B, C_out). The layers' terms side by side
    give every WS layer's norm in one pass (fastdp.engine.norm_groups).
    """

    def __init__(self, inner: Contribution, jac: StandardizationJacobian, row_sq, row_sum, gu) -> None:
        self.inner, self.jac = inner, jac
        self.row_sq, self.row_sum, self.gu = row_sq, row_sum, gu

    def sq_norm(self) -> torch.Tensor:
        return WSWeight.sq_norms_together([self])

    def norm_key(self) -> tuple:
        return self.row_sq.device, self.row_sq.dtype

    @staticmethod
    def sq_norms_together(members: list[WSWeight]) -> torch.Tensor:
        def joined(ts: list[torch.Tensor]) -> torch.Tensor:
            return ts[0] if len(ts) == 1 else torch.cat(ts, dim=-1)

        row_sq, row_sum, gu = (joined([getattr(m, k) for m in members]) for k in ("row_sq", "row_sum", "gu"))
        std, factor = joined([m.jac.std for m in members]), joined([m.jac.factor for m in members])
        rows = tuple((m.jac.std.shape[0], m.jac.n, m.jac.eps) for m in members)
        inv_n, eps = _row_constants(rows, row_sq)
        # ((sum g)^2 + (g . u)^2 (1 + eps / std^2)) / n per row, subtracted from ||g||^2
        sub = gu.square().mul_((eps / std.square()).add_(1.0)).addcmul_(row_sum, row_sum)
        inner = torch.addcmul(row_sq, sub, inv_n, value=-1.0).clamp_min_(0.0)
        return inner @ factor.square()

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        return self.jac.apply(self.inner.weighted_sum(w))

    def instantiate(self) -> torch.Tensor:
        return self.jac.apply(self.inner.instantiate())


@register_rule(WSConv2d, ScaledStdConv2d)
class WSConvRule(ConvRule):
    frozen_methods = ("forward", "_conv_forward", "standardized_weight", "row_scale")
    per_row_norms = True
    # the ghost strategies take g . u from the pre-scale output conv(x, u) of the forward
    norm_reads_forward = True

    def compute(self, call: LayerCall, x: torch.Tensor):
        m = call.module
        geom = call.info["geom"]
        cdt = compute_dtype(x, m.weight)
        call.info["in_dtype"] = x.dtype
        u, std = standardize_weight(m.weight.detach(), m.eps)
        s = m.row_scale().detach()
        w_hat = u * s.view(-1, 1, 1, 1)
        call.info.update(u=u, std=std, s=s, w_hat=w_hat)
        xc = x.to(cdt)
        bias = None if m.bias is None else m.bias.to(cdt)
        if call.strategy in GHOST_STRATEGIES:
            # g . u comes from the pre-scale output, so keep it: conv(x, u) then scale per channel
            out_u = geom.conv(xc, u.to(cdt))
            out = out_u * s.to(cdt).view(1, -1, 1, 1)
            if bias is not None:
                out = out + bias.view(1, -1, 1, 1)
            return out, (xc, out_u)
        return geom.conv(xc, w_hat.to(cdt), bias), (xc,)

    def grad_input(self, call: LayerCall, saved, grad_out: torch.Tensor) -> torch.Tensor:
        w_hat = call.info["w_hat"].to(grad_out.dtype)
        return call.info["geom"].grad_input(grad_out, saved[0], w_hat).to(call.info["in_dtype"])

    def contributions(self, call: LayerCall, saved, grad_out: torch.Tensor, augmult: int):
        m = call.module
        acc = accum_dtype(m.weight.dtype)
        # fused_keep hands 16-bit operands to the kernel as they are (G_i comes back in acc); the ghost strategies'
        # per-row terms are torch products in acc
        if call.strategy in FUSED:
            x, d = kernel_operands(call.engine.kernels, acc, saved[0], grad_out)
        else:
            x, d = saved[0].to(acc), grad_out.to(acc)
        N, p = d.shape[:2]
        B = N // augmult
        info = call.info
        u = info["u"].to(acc)
        jac = StandardizationJacobian(u, info["std"].to(acc), info["s"].to(acc), m.eps)
        inner, row_sq, per_example = self.weight_contribution(call, x, d, augmult, per_row=True)
        if per_example is not None:
            g = per_example.flatten(2)
            row_sum, gu = g.sum(2), torch.linalg.vecdot(g, jac.u)
        else:
            gu = views_summed(torch.linalg.vecdot(d.flatten(2), saved[1].to(acc).flatten(2)), augmult)
            row_sum = views_summed(self._row_sums(call, x, d), augmult)
        out: list = []
        for name, param in trainable(m, "weight", "gain", "bias"):
            if name == "weight":
                out.append((param, WSWeight(inner, jac, row_sq, row_sum, gu)))
            elif name == "gain":
                out.append((param, Kept((gu * m.scale).view(B, *param.shape).to(param.dtype))))
            else:
                out.append((param, Kept(bias_grads(d, augmult, acc).to(param.dtype))))
        return out

    @staticmethod
    def _row_sums(call: LayerCall, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Per-row sum_j G[r, j] = sum_t delta_t[r] * (sum of input patch t over its group's channels), (N, p)."""
        geom = call.info["geom"]
        g = geom.groups
        N, cin = x.shape[:2]
        p = d.shape[1]
        xs = x.view(N, g, cin // g, *x.shape[2:]).sum(2)
        ones = x.new_ones(g, 1, *geom.kernel)
        zeros = [0] * len(geom.stride)
        ps = torch.convolution(xs, ones, None, geom.stride, geom.padding, geom.dilation, False, zeros, g)
        # per (example, group): its rows of delta (p / g, T) times its patch sums (T,), one batched GEMV
        return torch.bmm(d.reshape(N * g, p // g, -1), ps.reshape(N * g, -1, 1)).view(N, p)
