"""nn.Bilinear: y_k = a^T W_k b + bias_k over two inputs a (*, d1) and b (*, d2).

Per row t the weight gradient is the outer product delta_t (x) a_t (x) b_t (p x d1 x d2); example i sums its T'
rows (K views times any positions). Strategies (objects in ``BILINEAR_STRATEGIES``):

- ``ghost``: ||G_i||^2 = sum_{t,s} (delta_t . delta_s)(a_t . a_s)(b_t . b_s), three T' x T' Grams per example
  (for T' = 1: ||delta||^2 ||a||^2 ||b||^2); the clipped sum is one contraction of the per-example-scaled delta
  with a and b (book-keeping), the ordinary weight gradient's cost.
- ``keep``: G_i by one contraction per example, kept; the clipped sum is a weighted reduction. Memory B p d1 d2.

The input gradients are the two other contractions: da = delta W b, db = delta W^T a (per row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.engine import costs
from fastdp.engine.binding import Binding, CallError, bind_call
from fastdp.engine.contributions import Kept, accum_dtype, zero_dropped
from fastdp.engine.interface import Contribution, LayerKernels
from fastdp.rules.base import Cost, LayerCall, Rule, Strategies, Strategy, compute_dtype, register_rule, trainable


class BilinearBookKeeping(Contribution):
    """Holds a (B, T', d1), b (B, T', d2), delta (B, T', p) until the clip factors are known."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, sq: torch.Tensor) -> None:
        self.a, self.b, self.d, self.sq = a, b, d, sq

    def sq_norm(self) -> torch.Tensor:
        return self.sq

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        # zero-weight (dropped) examples are read as exact zeros in every factor: their rows may be NaN
        d, a, b = zero_dropped(w, self.d, self.a, self.b, scaled=1)
        return torch.einsum("nk,na,nb->kab", d.flatten(0, 1), a.flatten(0, 1), b.flatten(0, 1))

    def instantiate(self) -> torch.Tensor:
        return torch.einsum("itk,ita,itb->ikab", self.d, self.a, self.b)


def bilinear_ghost_sq_norms(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """sum_{t,s} (d_t . d_s)(a_t . a_s)(b_t . b_s) per example."""
    if a.shape[1] == 1:
        return a.square().sum((1, 2)) * b.square().sum((1, 2)) * d.square().sum((1, 2))
    grams = [torch.bmm(t, t.transpose(1, 2)) for t in (a, b, d)]
    return (grams[0] * grams[1] * grams[2]).sum((1, 2))


@dataclass(frozen=True)
class BilinearShape:
    B: int
    Tk: int
    d1: int
    d2: int
    p: int
    esize: int = 4

    @property
    def wgrad(self) -> float:
        return 2.0 * self.B * self.Tk * self.p * self.d1 * self.d2

    @property
    def held(self) -> float:  # bytes of a, b and delta kept for book-keeping
        return self.B * self.Tk * (self.d1 + self.d2 + self.p) * self.esize

    @property
    def kept(self) -> float:
        return self.B * self.p * self.d1 * self.d2 * self.esize


BILINEAR_STRATEGIES = Strategies(
    Strategy(
        "ghost",
        cost=lambda s: Cost(costs.GHOST * 2.0 * s.B * s.Tk * s.Tk * (s.d1 + s.d2 + s.p), s.held),
        contribute=lambda a, b, d, dtype: BilinearBookKeeping(a, b, d, bilinear_ghost_sq_norms(a, b, d)),
    ),
    Strategy(
        "keep",
        cost=lambda s: Cost(costs.BMM * s.wgrad - s.wgrad + costs.stream(s.kept), s.kept),
        contribute=lambda a, b, d, dtype: Kept(torch.einsum("itk,ita,itb->ikab", d, a, b).to(dtype)),
    ),
)


@register_rule(nn.Bilinear)
class BilinearRule(Rule):
    strategy_names = BILINEAR_STRATEGIES.names

    def bind(self, module: nn.Bilinear, args: tuple, kwargs: dict) -> Binding:
        b = bind_call(module, args, kwargs)
        if len(b.tensors) != 2:
            raise CallError(f"it takes two tensors (input1, input2), got {len(b.tensors)}.")
        return b

    def strategies(
        self, module: nn.Bilinear, x: tuple, augmult: int, kernels: LayerKernels | None = None
    ) -> dict[str, Cost]:
        a = x[0]
        T = a[0].numel() // module.in1_features if a.shape[0] else 1
        shape = BilinearShape(a.shape[0] // augmult, T * augmult, module.in1_features, module.in2_features,
                              module.out_features)  # fmt: skip
        return BILINEAR_STRATEGIES.offer(shape)

    def compute(self, call: LayerCall, a: torch.Tensor, b: torch.Tensor):
        m = call.module
        if call.input_rows[0] != call.input_rows[1] or a.shape[:-1] != b.shape[:-1]:
            raise CallError(
                f"its inputs of shapes {tuple(a.shape)} and {tuple(b.shape)} do not hold the micro-batch's rows "
                "alike. Feed both inputs batched (the batch in dim 0), with the same leading shape."
            )
        cdt = compute_dtype(a, m.weight)
        call.info["in_dtype"] = (a.dtype, b.dtype)
        a, b = a.to(cdt), b.to(cdt)
        bias = None if m.bias is None else m.bias.to(cdt)
        return F.bilinear(a, b, m.weight.to(cdt), bias), (a, b)

    def grad_input(self, call: LayerCall, saved, grad_out: torch.Tensor):
        a, b = saved
        w = call.module.weight.to(grad_out.dtype)
        da = torch.einsum("...k,kij,...j->...i", grad_out, w, b)
        db = torch.einsum("...k,kij,...i->...j", grad_out, w, a)
        return da.to(call.info["in_dtype"][0]), db.to(call.info["in_dtype"][1])

    def contributions(self, call: LayerCall, saved, grad_out: torch.Tensor, augmult: int):
        m = call.module
        a, b = saved
        acc = accum_dtype(m.weight.dtype)
        B = call.examples
        a = a.reshape(B, -1, m.in1_features).to(acc)
        b = b.reshape(B, -1, m.in2_features).to(acc)
        d = grad_out.reshape(B, -1, m.out_features).to(acc)
        out = []
        for name, p in trainable(m, "weight", "bias"):
            if name == "bias":
                out.append((p, Kept(d.sum(1).to(p.dtype))))
            else:
                out.append((p, BILINEAR_STRATEGIES[call.strategy].contribute(a, b, d, p.dtype)))
        return out
