"""nn.Linear: per-example gradient G_i = delta_i^T a_i over the T positions of example i.

With augmentation multiplicity K the K views of an example are rows i*K..i*K+K-1; their gradients are summed
per example (the 1/K of the mean is applied by the engine), which is the same as treating the views as
K*T positions of one example: a_i is (K*T, d), delta_i is (K*T, p).

Strategies (T' = K*T):
- ``ghost``: ||G_i||^2 = sum_{t,s} (a_t . a_s)(delta_t . delta_s), 2 T'^2 (d + p) per example; for T' = 1 it is
  ||a_i||^2 ||delta_i||^2. The clipped sum is one GEMM with the output grads scaled per example (book-keeping).
- ``keep``: G_i by bmm (2 T' d p per example), kept until the clip step; the clipped sum is a weighted
  reduction over B. Memory B * p * d.
- ``instantiate_bk``: G_i by bmm only for the norm, then the book-keeping GEMM; holds a and delta instead.

Where the engine's backend has the layer kernels (fastdp/backends/), the same three plans with the
fused kernels: ``fused_keep`` (the norm kernel also writes G_i, so the norm costs no extra pass), ``fused_bk`` (the
norm by implicit GEMM, tile by tile in registers, then the book-keeping kernel) and ``fused_ghost`` (T' > 1: the
ghost norm without the T' x T' Grams in memory, then the book-keeping kernel).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.engine import costs
from fastdp.engine.contributions import Kept, accum_dtype, mask_rows, sq_norms
from fastdp.engine.interface import Contribution, LayerKernels
from fastdp.rules.base import Cost, LayerCall, Rule, compute_dtype, register_rule, trainable


def ghost_sq_norms(a: torch.Tensor, d: torch.Tensor, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """sum_{t,s} (a_t . a_s)(d_t . d_s) per example for a (B, T, da), d (B, T, dd), never holding more than
    ``chunk_elems`` Gram entries at once."""
    B, T = a.shape[:2]
    if T == 1:
        return a.square().sum((1, 2)) * d.square().sum((1, 2))
    step = max(1, chunk_elems // (T * T))
    out = []
    for s in range(0, B, step):
        ga = torch.bmm(a[s : s + step], a[s : s + step].transpose(1, 2))
        gd = torch.bmm(d[s : s + step], d[s : s + step].transpose(1, 2))
        out.append((ga * gd).sum((1, 2)))
    return torch.cat(out)


class LinearBookKeeping(Contribution):
    """Holds a (B, T', d) and delta (B, T', p) until the clip factors are known; S_W = A^T diag(w) Delta, by
    ``kernel(a, delta, w)`` when the plan is fused, else one torch GEMM on the scaled delta."""

    def __init__(self, a: torch.Tensor, d: torch.Tensor, sq: torch.Tensor, kernel: Callable | None = None) -> None:
        self.a, self.d, self.sq, self.kernel = a, d, sq, kernel

    def sq_norm(self) -> torch.Tensor:
        return self.sq

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(self.a, self.d, w)
        d = self.d * w.to(self.d.dtype).view(-1, 1, 1)
        return d.flatten(0, 1).t() @ self.a.flatten(0, 1)

    def instantiate(self) -> torch.Tensor:
        return torch.bmm(self.d.transpose(1, 2), self.a)

    def drop(self, keep: torch.Tensor) -> None:
        self.a, self.d = mask_rows(self.a, keep), mask_rows(self.d, keep)


@register_rule(nn.Linear)
class LinearRule(Rule):
    strategy_names = frozenset({"ghost", "keep", "instantiate_bk", "fused_keep", "fused_bk", "fused_ghost"})

    def check(self, module: nn.Linear) -> None:
        pass

    def strategies(
        self, module: nn.Linear, x: torch.Tensor, augmult: int, kernels: LayerKernels | None = None
    ) -> dict[str, Cost]:
        d, p = module.in_features, module.out_features
        N = x.shape[0]
        T = x[0].numel() // d if N else 1
        B, Tk = N // augmult, T * augmult
        esize = 4
        ghost_time = (
            costs.GHOST * 2.0 * B * Tk * Tk * (d + p) + costs.gemm(p, d, N * T) + costs.stream(N * T * p * esize)
        )
        keep_time = costs.BMM * 2.0 * B * Tk * d * p + costs.stream(B * p * d * esize)
        wgrad = costs.gemm(p, d, N * T)
        held = N * T * (d + p) * esize
        out = {
            "ghost": Cost(ghost_time - wgrad, held),
            "keep": Cost(keep_time - wgrad, B * p * d * esize),
            "instantiate_bk": Cost(keep_time, held),
        }
        if kernels is not None and kernels.takes(x, accum_dtype(module.weight.dtype)):
            if kernels.linear_norm is not None:
                # the norm kernel runs the weight gradient's FLOPs as one GEMM per example; writing G_i replaces the
                # weight gradient, the book-keeping GEMM replaces it otherwise
                out["fused_keep"] = Cost(costs.stream(B * p * d * esize), B * p * d * esize)
                out["fused_bk"] = Cost(wgrad, held)
            if kernels.linear_ghost_norm is not None and Tk > 1:
                out["fused_ghost"] = Cost(2.0 * B * Tk * Tk * (d + p), held)
        return out

    def compute(self, call: LayerCall, x: torch.Tensor):
        m = call.module
        if x.dim() < 2:
            raise ValueError(
                f"fastdp needs a batch dimension: {type(m).__name__} got an input of shape {tuple(x.shape)}"
            )
        cdt = compute_dtype(x, m.weight)
        call.info["in_dtype"] = x.dtype
        xc = x.to(cdt)
        bias = None if m.bias is None else m.bias.to(cdt)
        return F.linear(xc, m.weight.to(cdt), bias), (xc,)

    def grad_input(self, call: LayerCall, saved, grad_out: torch.Tensor) -> torch.Tensor:
        return (grad_out @ call.module.weight.to(grad_out.dtype)).to(call.info["in_dtype"])

    def contributions(self, call: LayerCall, saved: Sequence[torch.Tensor], grad_out: torch.Tensor, augmult: int):
        m = call.module
        (x,) = saved
        acc = accum_dtype(m.weight.dtype)
        B = x.shape[0] // augmult
        a = x.reshape(B, -1, m.in_features).to(acc)
        d = grad_out.reshape(B, -1, m.out_features).to(acc)
        kernels = call.engine.kernels
        out: list = []
        for name, p in trainable(m, "weight", "bias"):
            if name == "bias":
                out.append((p, Kept(d.sum(1).to(p.dtype))))
            elif call.strategy == "fused_keep":
                g = a.new_empty(B, m.out_features, m.in_features)
                sq = kernels.linear_norm(a, d, g)
                out.append((p, Kept(g.to(p.dtype), sq)))
            elif call.strategy == "fused_bk":
                out.append((p, LinearBookKeeping(a, d, kernels.linear_norm(a, d), kernels.linear_bookkeeping)))
            elif call.strategy == "fused_ghost":
                out.append((p, LinearBookKeeping(a, d, kernels.linear_ghost_norm(a, d), kernels.linear_bookkeeping)))
            elif call.strategy == "keep":
                out.append((p, Kept(torch.bmm(d.transpose(1, 2), a).to(p.dtype))))
            elif call.strategy == "instantiate_bk":
                sq = sq_norms(torch.bmm(d.transpose(1, 2), a))
                out.append((p, LinearBookKeeping(a, d, sq)))
            else:
                out.append((p, LinearBookKeeping(a, d, ghost_sq_norms(a, d))))
        return out
