"""Exact fallback for any other module that owns parameters: torch.func per-example gradients.

The module (with its whole subtree) runs as one unit, on any call: several tensor arguments, keyword arguments,
flags, nested outputs (fastdp.engine.binding). Its backward recomputes the forward of each example (its rows
together) under ``torch.func.vmap(torch.func.grad(...))``:

    g_i = d/d theta  sum_leaves < f(inputs_i; theta), delta_i >

where inputs_i are example i's rows of every batched input (shared inputs are the same for every example) and
delta_i its rows of every output's gradient. Exact, and slow, so the engine warns once when it attaches it. The
module must be deterministic (randomness inside the unit, e.g. dropout, would differ between the forward and the
recomputation and is refused) and must keep each example's rows in its outputs' batch dimension.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten

from fastdp.engine.binding import Binding, CallError, bind_call
from fastdp.engine.contributions import Kept, accum_dtype
from fastdp.rules.base import LayerCall, Rule


class FallbackRule(Rule):
    covers_children = True

    def bind(self, module: nn.Module, args: tuple, kwargs: dict) -> Binding:
        return bind_call(module, args, kwargs)

    def params(self, module: nn.Module) -> list[nn.Parameter]:
        return [p for p in module.parameters() if p.requires_grad]

    def compute(self, call: LayerCall, *inputs: torch.Tensor):
        m = call.module
        out = self._forward(call, m, inputs, None)
        leaves = _tensor_leaves(out)
        dims = self.out_dims(m, leaves)
        for t, d in zip(leaves, dims, strict=True):
            if t.is_floating_point() and (t.dim() <= d or t.shape[d] % call.examples):
                raise CallError(
                    f"it returned a tensor of shape {tuple(t.shape)} without the {call.examples} examples of the "
                    f"micro-batch in dim {d}, so the torch.func fallback cannot attribute its gradient to examples. "
                    "Return per-example outputs (the batch in dim 0), or give the module a rule with "
                    "fastdp.rules.register_rule."
                )
        return out, inputs

    def arguments(self, call: LayerCall, inputs: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
        """The module's call with ``inputs`` (all rows, or one example's under vmap) in place of its tensors."""
        return call.binding.arguments(list(inputs))

    def _forward(self, call: LayerCall, m: nn.Module, inputs: Sequence[torch.Tensor], params: dict | None):
        args, kwargs = self.arguments(call, inputs)
        if params is None:
            return type(m).forward(m, *args, **kwargs)
        return functional_call(m, params, args, kwargs)

    def _named(self, m: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}

    def grad_input(self, call: LayerCall, saved, grad_out):
        m, engine = call.module, call.engine
        grads = _as_tuple(grad_out)
        engine._bypass = True
        try:
            with torch.enable_grad():
                xs = [x.detach().requires_grad_(x.is_floating_point()) for x in saved]
                outs = _tensor_leaves(self._forward(call, m, xs, self._named(m)))
                diff = [(o, g) for o, g in zip(outs, grads, strict=True) if o.requires_grad]
                wrt = [x for x in xs if x.requires_grad]
                gx = torch.autograd.grad([o for o, _ in diff], wrt, [g for _, g in diff], allow_unused=True)
        finally:
            engine._bypass = False
        it = iter(gx)
        return tuple(next(it) if x.requires_grad else None for x in xs)

    def contributions(self, call: LayerCall, saved, grad_out, augmult: int):
        m, engine = call.module, call.engine
        B = call.examples
        grads = _as_tuple(grad_out)
        params = self._named(m)
        rows = call.input_rows or (augmult,)
        dims = call.binding.dims
        # example-major views: batch dim d of N*m rows -> (B, m) at d, mapped over by vmap; shared inputs unmapped
        xs, x_dims = [], []
        for x, r, d in zip(saved, rows, dims, strict=True):
            xs.append(x if r is None else x.unflatten(d, (B, r)))
            x_dims.append(None if r is None else d)
        g_dims = self.out_dims(m, list(grads))
        gs = [g.unflatten(d, (B, g.shape[d] // B)) for g, d in zip(grads, g_dims, strict=True)]

        def example_loss(p: dict[str, torch.Tensor], xi: list[torch.Tensor], gi: list[torch.Tensor]) -> torch.Tensor:
            outs = _tensor_leaves(self._forward(call, m, xi, p))
            for o, g in zip(outs, gi, strict=True):
                if o.is_floating_point() and o.shape != g.shape:  # never let a broadcast pair other examples' rows
                    raise ValueError(
                        f"fastdp fallback: {type(m).__name__} run on one example returned an output of shape "
                        f"{tuple(o.shape)} where its rows of the batch's output have shape {tuple(g.shape)}: its "
                        "outputs do not hold the batch in the dimension the engine reads (dim 0, or what its rule's "
                        "out_dims says). Return per-example outputs with the batch in dim 0."
                    )
            return sum((o * g).sum() for o, g in zip(outs, gi, strict=True) if o.is_floating_point())

        engine._bypass = True
        try:
            per_ex = vmap(grad(example_loss), in_dims=(None, x_dims, g_dims))(params, xs, gs)
        except RuntimeError as e:
            raise RuntimeError(
                f"fastdp fallback could not compute per-example gradients of {type(m).__name__} with torch.func "
                f"({e}). Make the module deterministic and per-example (no dropout, no batch statistics), or give "
                "it a rule with fastdp.rules.register_rule."
            ) from e
        finally:
            engine._bypass = False
        named = dict(m.named_parameters())
        return [(named[n], Kept(g.to(accum_dtype(g.dtype)))) for n, g in per_ex.items()]


def _tensor_leaves(out) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _as_tuple(grad_out) -> tuple[torch.Tensor, ...]:
    return (grad_out,) if isinstance(grad_out, torch.Tensor) else tuple(grad_out)


fallback_rule = FallbackRule()

__all__ = ["CallError", "FallbackRule", "fallback_rule"]
