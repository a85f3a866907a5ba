"""Exact fallback for any other module that owns parameters: torch.func per-example gradients.

The module (with its whole subtree) runs as one unit. Its backward recomputes the forward of each example
(its K views together) under ``torch.func.vmap(torch.func.grad(...))``: exact, and slow, so the engine warns
once when it attaches it. The module must take one batched tensor and be deterministic (randomness inside
the unit, e.g. dropout, would differ between the forward and the recomputation and is refused).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fastdp.engine.contributions import Kept, accum_dtype
from fastdp.rules.base import LayerCall, Rule


class FallbackRule(Rule):
    def params(self, module: nn.Module) -> list[nn.Parameter]:
        return [p for p in module.parameters() if p.requires_grad]

    def compute(self, call: LayerCall, x: torch.Tensor):
        m = call.module
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ValueError(f"fastdp fallback: {type(m).__name__} must take one batched tensor, got {type(x)}")
        out = type(m).forward(m, x)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"fastdp fallback: {type(m).__name__} must return one tensor, got {type(out).__name__}")
        return out, (x,)

    def _named(self, m: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}

    def grad_input(self, call: LayerCall, saved, grad_out: torch.Tensor) -> torch.Tensor:
        m, engine = call.module, call.engine
        (x,) = saved
        engine._bypass = True
        try:
            with torch.enable_grad():
                xr = x.detach().requires_grad_(True)
                out = functional_call(m, self._named(m), (xr,))
                (gx,) = torch.autograd.grad(out, xr, grad_out)
        finally:
            engine._bypass = False
        return gx

    def contributions(self, call: LayerCall, saved, grad_out: torch.Tensor, augmult: int):
        m, engine = call.module, call.engine
        (x,) = saved
        B = x.shape[0] // augmult
        params = self._named(m)

        def example_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, di: torch.Tensor) -> torch.Tensor:
            return (functional_call(m, p, (xi,)) * di).sum()

        engine._bypass = True
        try:
            xs = x.view(B, augmult, *x.shape[1:])
            ds = grad_out.view(B, augmult, *grad_out.shape[1:])
            per_ex = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, xs, ds)
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


fallback_rule = FallbackRule()
