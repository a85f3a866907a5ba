"""nn.Conv1d/2d/3d: per-example weight gradients of a convolution.

After unfolding, a_i is (T, d) with T output positions and d = C_in / groups * prod(kernel), delta_i is (T, p),
and G_i = delta_i^T a_i as for a linear layer. Strategies (T' = K * T with augmult K; objects in ``CONV_STRATEGIES``:
name, cost, contribution):

- ``keep``   per-example gradients from one grouped convolution-backward that treats every example as its
             own group (batch -> channels), views summed by putting them in the batch dimension; kept until
             the clip step (memory B * p * d), then a weighted reduction over B. At high resolution this costs
             about the ordinary weight gradient, which it replaces.
- ``unfold`` the same kept gradients from unfold + bmm (2D/1D, groups = 1): better at low resolution where the
             grouped kernels are slow.
- ``instantiate_bk`` / ``unfold_bk``  per-example gradients (grouped / unfold + bmm) only for the norm, then
             the clipped sum as one weight-gradient convolution with delta scaled per example (book-keeping):
             one more GEMM than keep, without holding B * p * d.
- ``ghost``  ||G_i||^2 from the Gram matrices of unfolded a and delta (2 T'^2 (d + p) per example, chunked),
             then one ordinary weight-gradient convolution with delta scaled per example (book-keeping).
             Cheaper than instantiating when 2 T'^2 < p d: the late, low-resolution layers.
- ``shifted_ghost``  (stride 1) the same norm from the Gram matrix of the padded input summed along the
             kernel's shifted diagonals, no unfold (rules/conv_ghost.py), then book-keeping. At 16x16 and
             8x8 it costs about one weight gradient or less where instantiating costs 2-4.

Where the engine's backend has the layer kernels (fastdp/backends/; Conv2d, groups 1):
``fused_keep`` (the implicit-GEMM norm kernel also writes G_i, the norm costs no extra pass), ``fused_bk``
(the norm kernel, then the book-keeping sum by the backend's kernel, else the scaled weight-gradient convolution)
and ``fused_ghost`` (the ghost norm by implicit GEMM, patch Grams in registers, then the same book-keeping: the
low-resolution layers, where 2 T'^2 < p d).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.engine import costs
from fastdp.engine.contributions import Kept, accum_dtype, views_summed, zero_dropped
from fastdp.engine.interface import Contribution, LayerKernels
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
from fastdp.rules.conv_ghost import shifted_ghost, unfolded_ghost

_convolution_backward = torch.ops.aten.convolution_backward


def resolve_padding(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Turn any padding configuration into explicit zero padding of the convolution itself.

    Non-zero padding modes and asymmetric 'same' padding are applied to the input with F.pad (under
    autograd, outside the layer), so the layer is always a plain convolution with symmetric zero padding.
    """
    n = len(module.kernel_size)
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0,) * n
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return x, (0,) * n
        # 'same': total padding d * (k - 1) per dim, the extra element (if odd) goes to the end, as torch does
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        left = tuple(t // 2 for t in totals)
        if all(t % 2 == 0 for t in totals):
            return x, left
        pad: list[int] = []
        for t, lo in zip(reversed(totals), reversed(left), strict=True):
            pad += [lo, t - lo]
        return F.pad(x, pad), (0,) * n
    return x, tuple(module.padding)


class ConvGeometry:
    """stride / padding / dilation / groups of one call, in the form aten's convolution ops take."""

    def __init__(self, module: nn.modules.conv._ConvNd, padding: tuple[int, ...]) -> None:
        self.stride = list(module.stride)
        self.padding = list(padding)
        self.dilation = list(module.dilation)
        self.groups = module.groups
        self.kernel = tuple(module.kernel_size)
        self.weight_shape = tuple(module.weight.shape)

    def conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        zeros = [0] * len(self.stride)
        return torch.convolution(x, w, b, self.stride, self.padding, self.dilation, False, zeros, self.groups)

    def grad_input(self, grad_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._backward(grad_out, x, w, self.groups, (True, False, False))[0]

    def grad_weight(self, grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The ordinary (summed over the batch) weight gradient."""
        fake_w = x.new_empty(1).expand(self.weight_shape)
        return self._backward(grad_out, x, fake_w, self.groups, (False, True, False))[1]

    def per_example_grad_weight(self, x: torch.Tensor, d: torch.Tensor, augmult: int) -> torch.Tensor:
        """(B, *weight_shape) per-example weight gradients, the K views of an example summed.

        Example i becomes its own group (channels B * C_in, groups B * groups); its K views go in the batch
        dimension, over which the weight gradient sums: (K, B * C_in, *S).
        """
        N, cin = x.shape[:2]
        cout = d.shape[1]
        B, K = N // augmult, augmult
        xs = x.view(B, K, cin, *x.shape[2:]).transpose(0, 1).reshape(K, B * cin, *x.shape[2:])
        ds = d.view(B, K, cout, *d.shape[2:]).transpose(0, 1).reshape(K, B * cout, *d.shape[2:])
        fake_w = x.new_empty(1).expand(B * cout, *self.weight_shape[1:])
        gw = self._backward(ds, xs, fake_w, B * self.groups, (False, True, False))[1]
        return gw.view(B, *self.weight_shape)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d, T) patches of a 1D or 2D input (groups = 1)."""
        if x.dim() == 3:
            x = x.unsqueeze(2)
            k, dil, pad, st = (1, *self.kernel), (1, *self.dilation), (0, *self.padding), (1, *self.stride)
        else:
            k, dil, pad, st = self.kernel, self.dilation, self.padding, self.stride
        return F.unfold(x, k, dilation=dil, padding=pad, stride=st)

    def _backward(self, grad_out, x, w, groups, mask):
        zeros = [0] * len(self.stride)
        return _convolution_backward(
            grad_out, x, w, None, self.stride, self.padding, self.dilation, False, zeros, groups, list(mask)
        )


#: the strategies whose norm runs in the backend's kernels
FUSED = frozenset({"fused_keep", "fused_bk", "fused_ghost"})

#: strategies that never form per-example gradients (their clipped sum is book-keeping)
GHOST_STRATEGIES = frozenset({"ghost", "shifted_ghost"})


def views_as_positions(t: torch.Tensor, augmult: int) -> torch.Tensor:
    """(N, c, T) -> (B, c, K * T): an example's K views become extra positions."""
    N, c, T = t.shape
    if augmult == 1:
        return t
    return t.view(N // augmult, augmult, c, T).transpose(1, 2).reshape(N // augmult, c, augmult * T)


class ConvBookKeeping(Contribution):
    """Holds x and delta until the clip factors are known; the clipped sum is one weight-gradient
    convolution with delta scaled per example, or ``kernel(x, delta, w, geom, augmult)`` when the plan is fused."""

    def __init__(
        self,
        geom: ConvGeometry,
        x: torch.Tensor,
        d: torch.Tensor,
        sq: torch.Tensor,
        augmult: int,
        kernel: Callable | None = None,
    ) -> None:
        self.geom, self.x, self.d, self.sq, self.augmult, self.kernel = geom, x, d, sq, augmult, kernel

    def sq_norm(self) -> torch.Tensor:
        return self.sq

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        # zero-weight (dropped) examples are read as exact zeros on both sides of the product: their rows may be NaN
        K = self.augmult
        if self.kernel is not None:
            return self.kernel(self.x, self.d, w, self.geom, K)  # skips zero-weight rows (LayerKernels contract)
        x, d = self._accum()
        d, x = zero_dropped(w, d, x, scaled=1)
        return self.geom.grad_weight(d, x)

    def instantiate(self) -> torch.Tensor:
        return self.geom.per_example_grad_weight(*self._accum(), self.augmult)

    def _accum(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x and delta in the accumulation dtype: a fused norm holds them as 16-bit tensors under autocast, and the
        torch weight gradient would otherwise round in 16 bits."""
        acc = accum_dtype(self.d.dtype)
        return self.x.to(acc), self.d.to(acc)


@dataclass(frozen=True)
class ConvShape:
    """What the strategies' costs and offers depend on (sizes of one input; FLOP-equivalents and bytes)."""

    B: int
    Tk: int  # K * T output positions per example
    wgrad: float  # the ordinary weight gradient each strategy replaces
    kept: float  # bytes of the per-example gradients
    held: float  # bytes of x and delta kept for book-keeping
    grouped: float  # per-example gradients by grouped convolutions, and a pass over them
    unfold: float | None  # the same by unfold + bmm (2D/1D, groups 1), None where not offered
    ghost: float | None  # the ghost norm of unfolded x and delta, None where not offered
    shifted: float | None  # the shifted-diagonal ghost norm (stride 1), None where not offered
    fused_norm: bool  # the backend's implicit-GEMM norm takes the layer
    fused_ghost: float | None  # the backend's implicit-GEMM ghost norm (2 B T'^2 (d + p)), None where not offered
    per_row: bool  # the rule needs per-output-row norms (WS convs): the fused norm gives none without G_i


def conv_shape(
    module: nn.modules.conv._ConvNd, x: torch.Tensor, augmult: int, kernels: LayerKernels | None, per_row: bool
) -> ConvShape:
    N = x.shape[0]
    B = N // augmult
    p = module.out_channels
    d = module.weight[0].numel()
    # output positions of this input (stride/dilation/padding as configured; 'same' keeps the size)
    T = 1
    for i, size in enumerate(x.shape[2:]):
        k, s, dil = module.kernel_size[i], module.stride[i], module.dilation[i]
        pad = module.padding[i] if not isinstance(module.padding, str) else (0 if module.padding == "valid" else None)
        T *= size if pad is None else (size + 2 * pad - dil * (k - 1) - 1) // s + 1
    Tk = T * augmult
    esize = 4
    wgrad = costs.gemm(p, d, N * T)
    x_bytes = x[0].numel() * N * esize
    # grouped per-example convolutions lose efficiency as the per-example GEMM shrinks (fit: ~1x at T = 1024,
    # ~3x at T = 256, ~8x at T = 64 on the WRN-16-4 layers)
    grouped_eff = max(1.0, 8.0 * math.sqrt(64.0 / T))
    kept = B * p * d * esize
    held = x_bytes + N * T * p * esize
    unfold = ghost = shifted = None
    if len(module.kernel_size) <= 2 and module.groups == 1:
        unfold_bytes = N * d * T * esize
        unfold = costs.BMM * wgrad + costs.stream(2 * unfold_bytes + kept)
        ghost = costs.GHOST * 2.0 * B * Tk * Tk * (d + p) + costs.stream(2 * unfold_bytes + N * T * p * esize)
    if all(s == 1 for s in module.stride):
        # Gram matrices of the input (K I positions) and of delta (K T), and k^n box additions of (K T)^2
        Ik = x[0, 0].numel() * augmult
        grams = costs.GHOST * 2.0 * B * (Ik * Ik * x.shape[1] + Tk * Tk * p)
        shifted = grams + costs.stream(2 * math.prod(module.kernel_size) * B * module.groups * Tk * Tk * esize)
    fused = kernels is not None and kernels.conv2d_norm is not None and len(module.kernel_size) == 2
    fused = fused and module.groups == 1 and kernels.takes(x, accum_dtype(module.weight.dtype))
    # the ghost norm's Grams in registers: no unfold traffic, the book-keeping GEMM replaces the weight gradient
    fused_ghost = 2.0 * B * Tk * Tk * (d + p) if fused and kernels.conv2d_ghost_norm is not None else None
    return ConvShape(
        B=B, Tk=Tk, wgrad=wgrad, kept=kept, held=held, grouped=grouped_eff * wgrad + costs.stream(kept),
        unfold=unfold, ghost=ghost, shifted=shifted, fused_norm=fused, fused_ghost=fused_ghost, per_row=per_row,
    )  # fmt: skip


#: what a conv strategy leaves: the weight's contribution, its per-example squared norm ((B,) or per output row
#: (B, p)) and the per-example gradients if it formed them (None for the ghost norms)
ConvWeight = tuple[Contribution, torch.Tensor, "torch.Tensor | None"]


def _sq(g: torch.Tensor, kept: Kept, per_row: bool) -> torch.Tensor:
    return torch.linalg.vector_norm(g.flatten(2), dim=2).square() if per_row else kept.sq_norm()


def _book_keeping(geom, x, d, sq, augmult, per_row, kernel=None) -> ConvBookKeeping:
    return ConvBookKeeping(geom, x, d, sq.sum(1) if per_row else sq, augmult, kernel)


def _instantiated(by_unfold: bool, book_keeping: bool) -> Callable[..., ConvWeight]:
    """keep / unfold / instantiate_bk / unfold_bk: G_i by grouped convolutions or unfold + bmm; kept for a weighted
    reduction, or (book-keeping) only for the norm, the clipped sum being one scaled GEMM later."""

    def contribute(call: LayerCall, x: torch.Tensor, d: torch.Tensor, augmult: int, per_row: bool) -> ConvWeight:
        geom: ConvGeometry = call.info["geom"]
        if by_unfold:
            a = views_as_positions(geom.unfold(x), augmult)
            dd = views_as_positions(d.flatten(2), augmult)
            g = torch.bmm(dd, a.transpose(1, 2)).view(x.shape[0] // augmult, *geom.weight_shape)
        else:
            g = geom.per_example_grad_weight(x, d, augmult)
        kept = Kept(g)
        sq = _sq(g, kept, per_row)
        return (_book_keeping(geom, x, d, sq, augmult, per_row), sq, g) if book_keeping else (kept, sq, g)

    return contribute


def _ghost(call: LayerCall, x: torch.Tensor, d: torch.Tensor, augmult: int, per_row: bool) -> ConvWeight:
    geom: ConvGeometry = call.info["geom"]
    a = views_as_positions(geom.unfold(x), augmult)
    sq = unfolded_ghost(a, views_as_positions(d.flatten(2), augmult), per_row)
    return _book_keeping(geom, x, d, sq, augmult, per_row), sq, None


def _shifted_ghost(call: LayerCall, x: torch.Tensor, d: torch.Tensor, augmult: int, per_row: bool) -> ConvWeight:
    geom: ConvGeometry = call.info["geom"]
    kernels = call.engine.kernels
    shift = kernels.shifted_gram if kernels is not None and kernels.takes(x, x.dtype) else None
    sq = shifted_ghost(x, d, geom.kernel, geom.dilation, geom.padding, geom.groups, augmult, per_row, shift)
    return _book_keeping(geom, x, d, sq, augmult, per_row), sq, None


def _fused_keep(call: LayerCall, x: torch.Tensor, d: torch.Tensor, augmult: int, per_row: bool) -> ConvWeight:
    geom: ConvGeometry = call.info["geom"]
    # G_i in the accumulation dtype whatever the operands' (16-bit under autocast): the norm is that of what is kept
    g = x.new_empty(x.shape[0] // augmult, *geom.weight_shape, dtype=accum_dtype(x.dtype))
    kept = Kept(g, call.engine.kernels.conv2d_norm(x, d, geom, augmult, g))
    return kept, _sq(g, kept, per_row), g


def _fused_bk(call: LayerCall, x: torch.Tensor, d: torch.Tensor, augmult: int, per_row: bool) -> ConvWeight:
    geom, kernels = call.info["geom"], call.engine.kernels
    sq = kernels.conv2d_norm(x, d, geom, augmult)
    return ConvBookKeeping(geom, x, d, sq, augmult, kernels.conv2d_bookkeeping), sq, None


def _fused_ghost(call: LayerCall, x: torch.Tensor, d: torch.Tensor, augmult: int, per_row: bool) -> ConvWeight:
    geom, kernels = call.info["geom"], call.engine.kernels
    sq = kernels.conv2d_ghost_norm(x, d, geom, augmult)
    return ConvBookKeeping(geom, x, d, sq, augmult, kernels.conv2d_bookkeeping), sq, None


#: the weight's strategies; costs are FLOP-equivalents minus the ordinary weight gradient each replaces (book-keeping
#: strategies pay their scaled GEMM, which replaces it). The implicit-GEMM norm runs the weight gradient's FLOPs per
#: example, no unfold; writing G_i replaces the weight gradient.
CONV_STRATEGIES = Strategies(
    Strategy("keep", cost=lambda s: Cost(s.grouped - s.wgrad, s.kept), contribute=_instantiated(False, False)),
    Strategy("instantiate_bk", cost=lambda s: Cost(s.grouped, s.held), contribute=_instantiated(False, True)),
    Strategy(
        "unfold",
        offered=lambda s: s.unfold is not None,
        cost=lambda s: Cost(s.unfold - s.wgrad, s.kept),
        contribute=_instantiated(True, False),
    ),
    Strategy(
        "unfold_bk",
        offered=lambda s: s.unfold is not None,
        cost=lambda s: Cost(s.unfold, s.held),
        contribute=_instantiated(True, True),
    ),
    Strategy("ghost", offered=lambda s: s.ghost is not None, cost=lambda s: Cost(s.ghost, s.held), contribute=_ghost),
    Strategy(
        "shifted_ghost",
        offered=lambda s: s.shifted is not None,
        cost=lambda s: Cost(s.shifted, s.held),
        contribute=_shifted_ghost,
    ),
    Strategy(
        "fused_keep",
        offered=lambda s: s.fused_norm,
        cost=lambda s: Cost(costs.stream(s.kept), s.kept),
        contribute=_fused_keep,
    ),
    # per-row norms (WS convs) need G_i: the fused norm alone gives the example's total only
    Strategy(
        "fused_bk",
        offered=lambda s: s.fused_norm and not s.per_row,
        cost=lambda s: Cost(s.wgrad, s.held),
        contribute=_fused_bk,
    ),
    # the ghost norm in the backend's kernel (low resolution: 2 T'^2 < p d), then book-keeping; total norms only
    Strategy(
        "fused_ghost",
        offered=lambda s: s.fused_ghost is not None and not s.per_row,
        cost=lambda s: Cost(s.fused_ghost, s.held),
        contribute=_fused_ghost,
    ),  # fmt: skip
)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(Rule):
    strategy_names = CONV_STRATEGIES.names

    frozen_methods = ("forward", "_conv_forward")
    #: whether contributions take per-output-row norms (weight_contribution's per_row)
    per_row_norms = False

    def prepare(self, call: LayerCall, x: torch.Tensor) -> torch.Tensor:
        m = call.module
        n = len(m.kernel_size)
        if x.dim() != n + 2:
            raise ValueError(
                f"fastdp needs batched inputs: {type(m).__name__} expects (N, C, {n} spatial dims), "
                f"got shape {tuple(x.shape)}"
            )
        x, padding = resolve_padding(m, x)
        call.info["geom"] = ConvGeometry(m, padding)
        return x

    def strategies(self, module, x, augmult, kernels=None):
        return CONV_STRATEGIES.offer(conv_shape(module, x, augmult, kernels, self.per_row_norms))

    def compute(self, call: LayerCall, x: torch.Tensor):
        m = call.module
        cdt = compute_dtype(x, m.weight)
        call.info["in_dtype"] = x.dtype
        xc = x.to(cdt)
        bias = None if m.bias is None else m.bias.to(cdt)
        return call.info["geom"].conv(xc, m.weight.to(cdt), bias), (xc,)

    def grad_input(self, call: LayerCall, saved, grad_out: torch.Tensor) -> torch.Tensor:
        (x,) = saved
        w = call.module.weight.to(grad_out.dtype)
        return call.info["geom"].grad_input(grad_out, x, w).to(call.info["in_dtype"])

    def weight_contribution(
        self, call: LayerCall, x: torch.Tensor, d: torch.Tensor, augmult: int, per_row: bool = False
    ) -> ConvWeight:
        """The weight's contribution, its per-example squared norm ((B,) or per output row (B, p)) and the
        per-example gradients if the strategy formed them (None for the ghost norms)."""
        return CONV_STRATEGIES[call.strategy].contribute(call, x, d, augmult, per_row)

    def contributions(self, call: LayerCall, saved: Sequence[torch.Tensor], grad_out: torch.Tensor, augmult: int):
        m = call.module
        (x,) = saved
        acc = accum_dtype(m.weight.dtype)
        # fused strategies take 16-bit operands as they are (tensor cores, fp32 accumulation), the others fp32
        if call.strategy in FUSED:
            x, d = kernel_operands(call.engine.kernels, acc, x, grad_out)
        else:
            x, d = x.to(acc), grad_out.to(acc)
        out: list = []
        for name, p in trainable(m, "weight", "bias"):
            if name == "bias":
                out.append((p, Kept(bias_grads(d, augmult, acc).to(p.dtype))))
            else:
                contribution, _, _ = self.weight_contribution(call, x, d, augmult)
                out.append((p, contribution))
        return out


def bias_grads(d: torch.Tensor, augmult: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-example bias gradient: delta summed over positions and views, (B, C_out), accumulated in ``dtype``
    (default: delta's)."""
    return views_summed(d.flatten(2).sum(2, dtype=dtype), augmult)
