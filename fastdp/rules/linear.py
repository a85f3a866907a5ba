"""nn.Linear: per-example gradient G_i = delta_i^T a_i over the T positions of example i.

With augmentation multiplicity K the K views of an example are rows i*K..i*K+K-1; their gradients are summed
per example (the 1/K of the mean is applied by the engine), which is the same as treating the views as
K*T positions of one example: a_i is (K*T, d), delta_i is (K*T, p).

Strategies (T' = K*T; objects in ``LINEAR_STRATEGIES``: name, cost, contribution):
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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.engine import costs
from fastdp.engine.contributions import Kept, accum_dtype, sq_norms, zero_dropped
from fastdp.engine.interface import Contribution, LayerKernels
from fastdp.engine.workspace import Buffers, fresh
from fastdp.rules.base import (
    Cost,
    LayerCall,
    Rule,
    Strategies,
    Strategy,
    compute_dtype,
    kernel_operands,
    register_rule,
    trainable,
)

_INF = float("inf")


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
        n = ga.shape[0]
        # <ga, gd> per example as one batched dot product: one launch instead of a product and a sum
        out.append(torch.bmm(ga.view(n, 1, T * T), gd.view(n, T * T, 1)).view(n))
    return out[0] if len(out) == 1 else torch.cat(out)


class LinearBookKeeping(Contribution):
    """Holds a (B, T', d) and delta (B, T', p) until the clip factors are known; S_W = A^T diag(w) Delta, by
    ``kernel(a, delta, w)`` when the plan is fused, else one torch GEMM on the scaled delta. ``sq`` None: the ghost
    norm, taken when asked (at the end of the backward, for all same-shape layers at once: ``LinearStack``)."""

    def __init__(
        self, a: torch.Tensor, d: torch.Tensor, sq: torch.Tensor | None, kernel: Callable | None = None
    ) -> None:
        self.a, self.d, self.sq, self.kernel = a, d, sq, kernel

    def sq_norm(self) -> torch.Tensor:
        if self.sq is None:
            self.sq = ghost_sq_norms(*self._accum())
        return self.sq

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        # zero-weight (dropped) examples are read as exact zeros on both sides of the product: their rows may be NaN.
        # The backend's kernel does not read them (the LayerKernels contract)
        if self.kernel is not None:
            return self.kernel(self.a, self.d, w)
        d, a = zero_dropped(w, *reversed(self._accum()), scaled=1)
        return d.flatten(0, 1).t() @ a.flatten(0, 1)

    def instantiate(self) -> torch.Tensor:
        a, d = self._accum()
        return torch.bmm(d.transpose(1, 2), a)

    def stack_key(self) -> tuple | None:
        # the torch GEMM only: a kernel takes one layer's operands
        if self.kernel is not None:
            return None
        return (self.a.shape, self.d.shape, self.a.dtype, self.d.dtype, self.a.device, self.sq is None)

    @property
    def held_bytes(self) -> int:
        return self.a.nbytes + self.d.nbytes

    def release(self) -> None:
        """Drop a and delta: a stack has copied them (fastdp.engine.stacks), and finishes this layer."""
        self.a = self.d = None

    @staticmethod
    def stacked(members: Sequence[tuple[nn.Parameter, LinearBookKeeping]], buffers: Buffers) -> LinearStack:
        return LinearStack(members, buffers)

    def _accum(self) -> tuple[torch.Tensor, torch.Tensor]:
        """a and delta in the accumulation dtype: a fused norm holds them as 16-bit tensors under autocast, and a
        backend without the book-keeping kernel sums them in torch, which would otherwise round in 16 bits."""
        acc = accum_dtype(self.d.dtype)
        return self.a.to(acc), self.d.to(acc)


class LinearStack:
    """L book-keeping Linear layers of one shape finished together (fastdp.engine.stacks): a (L, B, T', d) and delta
    (L, B, T', p) stacked once, then one ghost norm over the L*B examples, one drop mask and one batched GEMM
    S_l = A_l^T diag(w) Delta_l for all of them (~10 launches instead of ~8 per layer). Each layer's sum is computed
    as it would be alone; only the launches are shared."""

    def __init__(self, members: Sequence[tuple[nn.Parameter, LinearBookKeeping]], buffers: Buffers = fresh) -> None:
        self.params = tuple(p for p, _ in members)
        operands = [c._accum() for _, c in members]
        self.a = _stacked([a for a, _ in operands], buffers)
        self.d = _stacked([d for _, d in operands], buffers)
        self.sqs = [c.sq for _, c in members]  # all None (ghost, taken here) or all known: part of the stack key

    def sq_norm(self) -> torch.Tensor:
        if self.sqs[0] is not None:
            return torch.stack(self.sqs).sum(0)
        L, B = self.a.shape[:2]
        return ghost_sq_norms(self.a.flatten(0, 1), self.d.flatten(0, 1)).view(L, B).sum(0)

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        """(L, p, d): each layer's clipped sum. Called once: the stacks are the engine's own copies, scaled and
        cleaned in place (two passes of ~1/3 the cost of a masked selection on the CPU, three launches for all):

        - the smaller operand is multiplied by w, then its NaN set to 0 (infinities kept): a dropped example
          (w = 0 exactly) has rows 0 * x in {0, NaN}, so they become exact zeros; a kept one's rows are x * w;
        - the other operand's non-finite entries are set to 0: a dropped example's rows become finite, which is all
          the product needs (they meet exact zeros). A kept example's entries are all finite (an inf or NaN in its
          operands makes its norm, computed from the same operands, non-finite: it would have been dropped), so
          they are unchanged bit for bit.

        The result equals the product of the operands with dropped examples' rows selected away (``zero_dropped``).
        """
        B = w.shape[0]
        scaled, other = (self.d, self.a) if self.d[0, 0].numel() <= self.a[0, 0].numel() else (self.a, self.d)
        scaled.mul_(w.view(1, B, 1, 1).to(scaled.dtype)).nan_to_num_(0.0, _INF, -_INF)
        other.nan_to_num_(0.0, 0.0, 0.0)
        return torch.bmm(self.d.flatten(1, 2).transpose(1, 2), self.a.flatten(1, 2))

    def split(self, total: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        return dict(zip(self.params, total.unbind(0), strict=True))


def _stacked(tensors: list[torch.Tensor], buffers: Buffers) -> torch.Tensor:
    """``torch.stack(tensors)`` into a tensor from ``buffers``; a new one where the copy must record autograd
    (``backward(create_graph=True)``: operands that require grad, which ``out=`` refuses)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return torch.stack(tensors)
    return torch.stack(tensors, out=buffers((len(tensors), *tensors[0].shape), tensors[0]))


@dataclass(frozen=True)
class LinearShape:
    """What the strategies' costs and offers depend on: B examples of T' = K*T rows, d inputs, p outputs, and
    which of the backend's kernels take the input."""

    B: int
    Tk: int
    d: int
    p: int
    rows: int  # N*T, the rows of the ordinary weight-gradient GEMM
    norm_kernel: bool
    ghost_kernel: bool
    esize: int = 4

    @property
    def wgrad(self) -> float:
        return costs.gemm(self.p, self.d, self.rows)

    @property
    def held(self) -> float:  # bytes of a and delta kept for book-keeping
        return self.rows * (self.d + self.p) * self.esize

    @property
    def kept(self) -> float:  # bytes of the per-example gradients
        return self.B * self.p * self.d * self.esize

    @property
    def bmm(self) -> float:  # G_i by bmm, then a pass over them
        return costs.BMM * 2.0 * self.B * self.Tk * self.d * self.p + costs.stream(self.kept)

    @property
    def ghost(self) -> float:
        return (
            costs.GHOST * 2.0 * self.B * self.Tk * self.Tk * (self.d + self.p)
            + self.wgrad
            + costs.stream(self.rows * self.p * self.esize)
        )


def linear_shape(
    B: int, Tk: int, d: int, p: int, rows: int, x: torch.Tensor, acc: torch.dtype, kernels: LayerKernels | None
) -> LinearShape:
    """The summary of a GEMM of ``rows`` rows, d -> p features (B examples of Tk rows) the strategies are offered and
    costed on; the fused ones where the backend's ``kernels`` take ``x`` with accumulation dtype ``acc``."""
    takes = kernels is not None and kernels.takes(x, acc)
    return LinearShape(
        B=B, Tk=Tk, d=d, p=p, rows=rows,
        norm_kernel=takes and kernels.linear_norm is not None,
        ghost_kernel=takes and kernels.linear_ghost_norm is not None,
    )  # fmt: skip


def _fused_keep(call: LayerCall, a: torch.Tensor, d: torch.Tensor, dtype: torch.dtype) -> Contribution:
    # G_i in the accumulation dtype whatever the operands' (16-bit under autocast): the norm is that of what is kept
    g = a.new_empty(a.shape[0], d.shape[2], a.shape[2], dtype=accum_dtype(dtype))
    sq = call.engine.kernels.linear_norm(a, d, g)
    return Kept(g.to(dtype), sq)


def _fused_bk(norm: str) -> Callable:
    def contribute(call: LayerCall, a: torch.Tensor, d: torch.Tensor, dtype: torch.dtype) -> Contribution:
        kernels = call.engine.kernels
        return LinearBookKeeping(a, d, getattr(kernels, norm)(a, d), kernels.linear_bookkeeping)

    return contribute


#: the weight's strategies; costs are FLOP-equivalents minus the ordinary weight gradient each replaces. The fused
#: norm kernel runs the weight gradient's FLOPs as one GEMM per example: writing G_i replaces the weight gradient, the
#: book-keeping GEMM replaces it otherwise.
LINEAR_STRATEGIES = Strategies(
    Strategy(
        "ghost",
        cost=lambda s: Cost(s.ghost - s.wgrad, s.held),
        contribute=lambda call, a, d, dtype: LinearBookKeeping(a, d, None),
    ),
    Strategy(
        "keep",
        cost=lambda s: Cost(s.bmm - s.wgrad, s.kept),
        contribute=lambda call, a, d, dtype: Kept(torch.bmm(d.transpose(1, 2), a).to(dtype)),
    ),
    Strategy(
        "instantiate_bk",
        cost=lambda s: Cost(s.bmm, s.held),
        contribute=lambda call, a, d, dtype: LinearBookKeeping(a, d, sq_norms(torch.bmm(d.transpose(1, 2), a))),
    ),
    Strategy(
        "fused_keep",
        offered=lambda s: s.norm_kernel,
        cost=lambda s: Cost(costs.stream(s.kept), s.kept),
        contribute=_fused_keep,
    ),
    Strategy(
        "fused_bk",
        offered=lambda s: s.norm_kernel,
        cost=lambda s: Cost(s.wgrad, s.held),
        contribute=_fused_bk("linear_norm"),
    ),  # fmt: skip
    Strategy(
        "fused_ghost",
        offered=lambda s: s.ghost_kernel and s.Tk > 1,
        cost=lambda s: Cost(2.0 * s.B * s.Tk * s.Tk * (s.d + s.p), s.held),
        contribute=_fused_bk("linear_ghost_norm"),
    ),
)


#: the strategies whose norm runs in the backend's kernels
FUSED = frozenset({"fused_keep", "fused_bk", "fused_ghost"})


@register_rule(nn.Linear)
class LinearRule(Rule):
    strategy_names = LINEAR_STRATEGIES.names
    positionwise = True

    def check(self, module: nn.Linear) -> None:
        pass

    def strategies(
        self, module: nn.Linear, x: torch.Tensor, augmult: int, kernels: LayerKernels | None = None
    ) -> dict[str, Cost]:
        d, p = module.in_features, module.out_features
        N = x.shape[0]
        T = x[0].numel() // d if N else 1
        shape = linear_shape(N // augmult, T * augmult, d, p, N * T, x, accum_dtype(module.weight.dtype), kernels)
        return LINEAR_STRATEGIES.offer(shape)

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
        a, d = x.reshape(B, -1, m.in_features), grad_out.reshape(B, -1, m.out_features)
        # fused strategies take 16-bit operands as they are (tensor cores, fp32 accumulation), the others fp32
        a, d = kernel_operands(call.engine.kernels, acc, a, d) if call.strategy in FUSED else (a.to(acc), d.to(acc))
        weight = LINEAR_STRATEGIES[call.strategy].contribute
        out: list = []
        for name, p in trainable(m, "weight", "bias"):
            if name == "bias":
                out.append((p, Kept(d.sum(1, dtype=acc).to(p.dtype))))
            else:
                out.append((p, weight(call, a, d, p.dtype)))
        return out
