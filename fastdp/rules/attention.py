"""nn.MultiheadAttention: its projections are linear layers, so their per-example gradients are too.

For R = N*K rows (batch first inside the rule), query (R, L, E), key (R, S, kdim), value (R, S, vdim):

    q = x_q W_q^T + b_q,  k = x_k W_k^T + b_k,  v = x_v W_v^T + b_v      (W_q, W_k, W_v: rows of in_proj_weight, or
                                                                         q/k/v_proj_weight when kdim/vdim != E)
    k, v <- [k; bias_k], [v; bias_v]  (one more key, same for every row), then [k; 0], [v; 0] with add_zero_attn
    o_h = dropout(softmax(q_h k_h^T / sqrt(E/H) + mask)) v_h              (per head h; mask: attn_mask and
                                                                         key_padding_mask as torch merges them)
    y = o W_o^T + b_o                                                    (out_proj)

The attention core has no parameters and mixes nothing across rows, so with delta_y the output gradient, one
backward through the core gives delta_q, delta_k, delta_v per row, exactly. Every weight's per-example gradient is
then the linear layer's, G_i = delta_i^T a_i over example i's K*L (or K*S) rows, and runs through the Linear rule's
strategies (fastdp.rules.linear.LINEAR_STRATEGIES: ghost norm with book-keeping, instantiation, fused kernels), one
strategy per attention layer, planned on the summed cost of its GEMMs. Biases are sums of delta over the rows;
bias_k / bias_v the gradient of the appended key/value row. A packed in_proj_weight fed the same tensor three times
(self-attention) is one GEMM of width 3E; fed different tensors it is a stack of row blocks whose per-example
gradients are disjoint rows, so their squared norms add (``Stacked``).

The core runs under its own small autograd graph (built in the forward, used once in the backward), so dropout on
the attention weights is the forward's own mask and the gradient is exact in training mode too. torch's fused fast
path is not used here: it only runs without gradients, where the engine calls torch's own forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.engine.binding import Binding, CallError, bind_call
from fastdp.engine.contributions import Kept, accum_dtype
from fastdp.engine.interface import Contribution, LayerKernels
from fastdp.rules.base import Cost, LayerCall, Rule, compute_dtype, register_rule
from fastdp.rules.linear import LINEAR_STRATEGIES, LinearShape, linear_shape

_MASKS = ("key_padding_mask", "attn_mask")
#: the module's own parameters (whichever exist), out_proj's come after them
_PARAMETERS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k", "bias_v")


class Stacked(Contribution):
    """A parameter whose per-example gradient is a stack of row blocks, each another contribution: the blocks are
    disjoint, so the squared norm is the sum of theirs and the clipped sum is their clipped sums stacked."""

    def __init__(self, parts: list[Contribution]) -> None:
        self.parts = parts

    def sq_norm(self) -> torch.Tensor:
        return torch.stack([p.sq_norm() for p in self.parts]).sum(0)

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.weighted_sum(w) for p in self.parts], 0)

    def instantiate(self) -> torch.Tensor:
        return torch.cat([p.instantiate() for p in self.parts], 1)


@dataclass
class _Projection:
    """One input GEMM: the input slot it reads, the rows [start, stop) of the 3E outputs q|k|v it makes, its weight
    (a slice of in_proj_weight, or a separate q/k/v_proj_weight) and the parameter that weight belongs to."""

    slot: int
    start: int
    stop: int
    weight: nn.Parameter


@dataclass
class _Core:
    """What the forward keeps for the backward: the core's graph from its leaves (projection outputs, bias_k/bias_v
    rows, float masks by input slot) to o and the returned weights, and the projections' inputs."""

    o: torch.Tensor
    returned: torch.Tensor | None
    leaves: list[torch.Tensor]
    bias_kv: list[torch.Tensor]
    masks: dict[int, torch.Tensor]
    projections: list[_Projection]
    inputs: dict[str, torch.Tensor]
    o_detached: torch.Tensor


@dataclass
class _Grads:
    """delta of every projection output, of the bias_k/bias_v rows, of each float mask (by input slot) and of the
    layer's output (batch first)."""

    projections: list[torch.Tensor]
    bias_kv: list[torch.Tensor]
    masks: dict[int, torch.Tensor]
    out: torch.Tensor
    core: _Core


@register_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(Rule):
    covers_children = True
    strategy_names = LINEAR_STRATEGIES.names

    def params(self, module: nn.MultiheadAttention) -> list[nn.Parameter]:
        own = [getattr(module, n) for n in _PARAMETERS] + [module.out_proj.weight, module.out_proj.bias]
        return [p for p in own if isinstance(p, nn.Parameter) and p.requires_grad]

    def bind(self, module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> Binding:
        d = 0 if module.batch_first else 1
        b = bind_call(module, args, kwargs, dims={"query": d, "key": d, "value": d}, not_data=_MASKS)
        values = b.values(module, b.tensors)
        for name in ("query", "key", "value"):
            t = values[name]
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise CallError(
                    f"its {name} has shape {shape}; fastdp's MultiheadAttention rule takes batched 3-D query, key and "
                    "value. Pass a batch (a single example as a batch of one)."
                )
        if values["is_causal"] and values["attn_mask"] is None:
            raise CallError(
                "is_causal=True is a hint that attn_mask is the causal mask, and no attn_mask was given (torch's "
                "MultiheadAttention refuses this too). Pass the causal mask as well "
                "(nn.Transformer.generate_square_subsequent_mask(L))."
            )
        return b

    def out_dims(self, module: nn.MultiheadAttention, outputs: Sequence[torch.Tensor]) -> list[int]:
        # (attn_output, attn_weights): the weights are (N, L, S) or (N, H, L, S) whatever batch_first says
        return [0 if module.batch_first else 1] + [0] * (len(outputs) - 1)

    # ------------------------------------------------------------------ plan
    def strategies(
        self, module: nn.MultiheadAttention, x: tuple, augmult: int, kernels: LayerKernels | None = None
    ) -> dict[str, Cost]:
        q, k, v = x[:3]  # bind puts query, key and value first, in this order
        E = module.embed_dim
        bd = 0 if module.batch_first else 1
        acc = accum_dtype(module.out_proj.weight.dtype)

        def gemm(t: torch.Tensor, p: int) -> LinearShape:  # a projection of t's rows to p features
            rows, T = t.shape[bd], t.shape[1 - bd]
            return linear_shape(rows // augmult, T * augmult, t.shape[2], p, rows * T, t, acc, kernels)

        # the input projections and out_proj (its input o has the query's rows)
        offers = [LINEAR_STRATEGIES.offer(s) for s in (gemm(q, E), gemm(k, E), gemm(v, E), gemm(q, E))]
        common = set.intersection(*(set(o) for o in offers))
        return {s: Cost(sum(o[s].time for o in offers), sum(o[s].memory for o in offers)) for s in sorted(common)}

    # ------------------------------------------------------------------ forward
    def compute(self, call: LayerCall, *inputs: torch.Tensor):
        m: nn.MultiheadAttention = call.module
        values = call.binding.values(m, inputs)
        slots = {n: call.binding.names.index(n) for n in ("query", "key", "value")}
        for n, j in slots.items():
            if call.input_rows[j] != call.rows_per_example:
                raise CallError(
                    f"its {n} does not hold the micro-batch's examples in its batch dimension like the query does "
                    f"(rows per example: {call.input_rows[j]} against {call.rows_per_example}). Feed query, key and "
                    "value batched alike (a tensor shared by every example expanded to the batch)."
                )
        bf = m.batch_first
        cdt = compute_dtype(inputs[0], m.out_proj.weight)
        call.info["in_dtype"] = [t.dtype for t in inputs]
        call.info.pop("grads", None)
        # batch-first operands in the compute dtype, the same object for a tensor given several times
        seen: dict[int, torch.Tensor] = {}

        def operand(name: str) -> torch.Tensor:
            t = values[name]
            if id(t) not in seen:
                seen[id(t)] = (t if bf else t.transpose(0, 1)).to(cdt)
            return seen[id(t)]

        xs = {n: operand(n) for n in slots}
        E, H = m.embed_dim, m.num_heads
        projections = _projections(m, slots, values)
        leaves = []
        with torch.no_grad():
            bias = None if m.in_proj_bias is None else m.in_proj_bias.to(cdt)
            for p in projections:
                w = p.weight if p.weight is not m.in_proj_weight else p.weight[p.start : p.stop]
                b = None if bias is None else bias[p.start : p.stop]
                leaves.append(F.linear(xs[call.binding.names[p.slot]], w.to(cdt), b))
        R, L = xs["query"].shape[:2]
        with torch.enable_grad():
            leaves = [y.detach().requires_grad_() for y in leaves]
            parts = _split_blocks(projections, leaves, E)
            q, k, v = parts
            bias_kv = []
            if m.bias_k is not None:
                bk = m.bias_k.detach().to(cdt).reshape(1, 1, E).repeat(R, 1, 1).requires_grad_()
                bv = m.bias_v.detach().to(cdt).reshape(1, 1, E).repeat(R, 1, 1).requires_grad_()
                k, v = torch.cat([k, bk], 1), torch.cat([v, bv], 1)
                bias_kv = [bk, bv]
            if m.add_zero_attn:
                k = torch.cat([k, k.new_zeros(R, 1, E)], 1)
                v = torch.cat([v, v.new_zeros(R, 1, E)], 1)
            S = k.shape[1]
            # a float mask computed from the data carries a gradient back to it (torch's module passes it on too)
            masks = {n: values[n].detach().requires_grad_() for n in _MASKS if _float(values[n])}
            mask = _merged_mask({**values, **masks}, R, H, L, S, cdt)
            hd = E // H
            qh = q.reshape(R, L, H, hd).transpose(1, 2)
            kh = k.reshape(R, S, H, hd).transpose(1, 2)
            vh = v.reshape(R, S, H, hd).transpose(1, 2)
            p = m.dropout if m.training else 0.0
            returned = None
            if values["need_weights"]:  # the weights are an output: the explicit product, as torch's module does
                scores = (qh * math.sqrt(1.0 / hd)) @ kh.transpose(-2, -1)
                weights = torch.softmax(scores if mask is None else scores + mask, -1)
                weights = F.dropout(weights, p=p) if p > 0 else weights
                oh = weights @ vh
                returned = weights.mean(1) if values["average_attn_weights"] else weights
            else:  # the fused kernel, with its own backward (no L x S weights kept where it can avoid them)
                oh = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=p)
            o = oh.transpose(1, 2).reshape(R, L, E)
        o_detached = o.detach()
        out = F.linear(
            o_detached, m.out_proj.weight.to(cdt), None if m.out_proj.bias is None else m.out_proj.bias.to(cdt)
        )
        call.info["core"] = _Core(
            o, returned, leaves, bias_kv, {call.binding.names.index(n): t for n, t in masks.items()}, projections, xs,
            o_detached,
        )  # fmt: skip
        out = out if bf else out.transpose(0, 1)
        return (out, None if returned is None else returned.detach()), ()

    # ------------------------------------------------------------------ backward
    def _grads(self, call: LayerCall, grad_out) -> _Grads:
        """One backward through the attention core, shared by the input and the weight gradients."""
        done = call.info.get("grads")
        if done is not None:
            return done
        m = call.module
        core: _Core = call.info.pop("core")
        d_out = (grad_out[0] if m.batch_first else grad_out[0].transpose(0, 1)).to(core.o.dtype)
        outputs, seeds = [core.o], [d_out @ m.out_proj.weight.to(core.o.dtype)]
        if core.returned is not None:
            outputs.append(core.returned)
            seeds.append(grad_out[1].to(core.returned.dtype))
        masks = list(core.masks.values())
        wrt = core.leaves + core.bias_kv + masks
        grads = torch.autograd.grad(outputs, wrt, seeds, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt, strict=True)]
        n, b = len(core.leaves), len(core.bias_kv)
        done = _Grads(
            projections=grads[:n], bias_kv=grads[n : n + b], masks=dict(zip(core.masks, grads[n + b :], strict=True)),
            out=d_out, core=core,
        )  # fmt: skip
        call.info["grads"] = done
        return done

    def grad_input(self, call: LayerCall, saved, grad_out):
        m = call.module
        grads = self._grads(call, grad_out)
        out: list[torch.Tensor | None] = [None] * len(call.binding.tensors)
        for p, d in zip(grads.core.projections, grads.projections, strict=True):
            w = p.weight if p.weight is not m.in_proj_weight else p.weight[p.start : p.stop]
            g = d @ w.to(d.dtype)
            out[p.slot] = g if out[p.slot] is None else out[p.slot] + g
        for j, g in enumerate(out):
            if g is not None:  # back to the caller's layout
                out[j] = g if m.batch_first else g.transpose(0, 1)
        for j, g in grads.masks.items():
            out[j] = g
        return tuple(None if g is None else g.to(call.info["in_dtype"][j]) for j, g in enumerate(out))

    def contributions(self, call: LayerCall, saved, grad_out, augmult: int):
        m: nn.MultiheadAttention = call.module
        grads = self._grads(call, grad_out)
        projections, xs, o = grads.core.projections, grads.core.inputs, grads.core.o_detached
        B = call.examples
        weight_of = LINEAR_STRATEGIES[call.strategy].contribute

        def per_example(t: torch.Tensor) -> torch.Tensor:  # (R, T, f) -> (B, K*T, f)
            return t.reshape(B, -1, t.shape[-1])

        acc = accum_dtype(m.out_proj.weight.dtype)
        out: list = []
        blocks: dict[nn.Parameter, list[Contribution]] = {}
        bias_rows = []
        for p, d in zip(projections, grads.projections, strict=True):
            x = xs[call.binding.names[p.slot]]
            a, dd = per_example(x).to(acc), per_example(d).to(acc)
            if p.weight.requires_grad:
                blocks.setdefault(p.weight, []).append(weight_of(call, a, dd, p.weight.dtype))
            bias_rows.append(dd.sum(1))
        for w, parts in blocks.items():
            out.append((w, parts[0] if len(parts) == 1 else Stacked(parts)))
        if m.in_proj_bias is not None and m.in_proj_bias.requires_grad:
            out.append((m.in_proj_bias, Kept(torch.cat(bias_rows, -1).to(m.in_proj_bias.dtype))))
        for param, d in zip((m.bias_k, m.bias_v), grads.bias_kv, strict=False):
            if param.requires_grad:
                out.append((param, Kept(d.reshape(B, -1, d.shape[-1]).sum(1).view(B, *param.shape).to(param.dtype))))
        d_out = per_example(grads.out).to(acc)
        if m.out_proj.weight.requires_grad:
            out.append((m.out_proj.weight, weight_of(call, per_example(o).to(acc), d_out, m.out_proj.weight.dtype)))
        if m.out_proj.bias is not None and m.out_proj.bias.requires_grad:
            out.append((m.out_proj.bias, Kept(d_out.sum(1).to(m.out_proj.bias.dtype))))
        return out


def _projections(m: nn.MultiheadAttention, slots: dict[str, int], values: dict) -> list[_Projection]:
    """The input GEMMs. With a packed in_proj_weight, consecutive blocks fed the same tensor are one GEMM (self-
    attention: one of width 3E); separate q/k/v_proj_weight are one GEMM each."""
    E = m.embed_dim
    names = ("query", "key", "value")
    if not m._qkv_same_embed_dim:
        weights = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
        return [
            _Projection(slots[n], i * E, (i + 1) * E, w) for i, (n, w) in enumerate(zip(names, weights, strict=True))
        ]
    out: list[_Projection] = []
    for i, n in enumerate(names):
        if out and values[names[i - 1]] is values[n]:
            out[-1].stop += E
        else:
            out.append(_Projection(slots[n], i * E, (i + 1) * E, m.in_proj_weight))
    return out


def _split_blocks(projections: list[_Projection], leaves: list[torch.Tensor], E: int) -> list[torch.Tensor]:
    """q, k, v from the projection outputs (a GEMM of width 2E or 3E holds consecutive blocks)."""
    out = []
    for p, y in zip(projections, leaves, strict=True):
        out += list(y.split(E, -1)) if p.stop - p.start > E else [y]
    return out


def _float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _merged_mask(values: dict, R: int, H: int, L: int, S: int, dtype: torch.dtype) -> torch.Tensor | None:
    """attn_mask and key_padding_mask as one additive float mask broadcastable to (R, H, L, S), as torch merges
    them (a True entry of a bool mask is -inf); padded with zero columns for bias_k and add_zero_attn's keys."""

    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
        return mask.to(dtype)

    def padded(mask: torch.Tensor) -> torch.Tensor:
        return F.pad(mask, (0, S - mask.shape[-1])) if mask.shape[-1] < S else mask

    total = None
    attn, kpm = values["attn_mask"], values["key_padding_mask"]
    if attn is not None:
        a = padded(additive(attn))
        total = a.view(1, 1, L, S) if a.dim() == 2 else a.view(R, H, L, S)
    if kpm is not None:
        k = padded(additive(kpm)).view(R, 1, 1, S)
        total = k if total is None else total + k
    return total
