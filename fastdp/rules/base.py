"""The per-layer rule interface and its registry (one dict keyed by module type, as in opacus).

A rule owns one layer family. Its layers run through ``LayerFunction``: the forward computes the output
with the weights held out of autograd, and the backward returns only the input gradient and leaves the
rule's ``Contribution`` per parameter. The autograd weight gradient is therefore never computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fastdp.engine.contributions import Contribution
from fastdp.engine.precision import full_fp32

if TYPE_CHECKING:
    from fastdp.engine.engine import GradSampleEngine
    from fastdp.engine.layer_kernels import LayerKernels


@dataclass(frozen=True)
class Cost:
    """A plan candidate's estimated cost: seconds-like time units and bytes held until the clip step."""

    time: float
    memory: float


@dataclass(eq=False)
class LayerCall:
    """One forward call of a wrapped layer, carried from its forward to its backward."""

    engine: GradSampleEngine
    rule: Rule
    module: nn.Module
    strategy: str
    info: dict[str, Any] = field(default_factory=dict)
    consumed: bool = False
    #: N, the examples of the micro-batch this call belongs to
    examples: int = 1
    #: m, the consecutive rows of the layer's input that belong to each example (K, or K*T for flattened tokens)
    rows_per_example: int = 1


class Rule:
    """Exact per-example gradients for one layer family.

    Subclasses implement ``compute`` (the forward), ``grad_input`` and ``contributions`` (the backward), and
    may offer several plan ``strategies`` with a cost each; the engine picks one per input shape.
    """

    #: methods a subclass of the registered type must not override for this rule to stay exact
    frozen_methods: tuple[str, ...] = ("forward",)
    #: whether the per-example norm reads a tensor the forward computed (then the forward runs in full fp32 too)
    norm_reads_forward: bool = False

    def check(self, module: nn.Module) -> None:
        """Raise a clear error if this module's configuration is not supported."""

    def params(self, module: nn.Module) -> list[nn.Parameter]:
        """The trainable parameters this rule produces per-example gradients for."""
        return [p for p in module.parameters(recurse=False) if p.requires_grad]

    def prepare(self, call: LayerCall, x: torch.Tensor) -> torch.Tensor:
        """Parameter-free preprocessing done under ordinary autograd (padding, normalisation)."""
        return x

    def strategies(
        self, module: nn.Module, x: torch.Tensor, augmult: int, kernels: LayerKernels | None = None
    ) -> dict[str, Cost]:
        """Plan candidates for this input (``fused_*`` ones where the backend's ``kernels`` take it); the default
        rule has one."""
        return {"keep": Cost(0.0, 0.0)}

    def compute(self, call: LayerCall, x: torch.Tensor) -> tuple[torch.Tensor, Sequence[torch.Tensor]]:
        """Forward without autograd: (output, tensors to save for the backward)."""
        raise NotImplementedError

    def grad_input(self, call: LayerCall, saved: Sequence[torch.Tensor], grad_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def contributions(
        self, call: LayerCall, saved: Sequence[torch.Tensor], grad_out: torch.Tensor, augmult: int
    ) -> list[tuple[nn.Parameter, Contribution]]:
        """Per-example (views summed over ``augmult``) contributions of this call, per trainable parameter."""
        raise NotImplementedError


_RULES: dict[type[nn.Module], Rule] = {}


def register_rule(*module_types: type[nn.Module]) -> Callable[[type[Rule]], type[Rule]]:
    """Class decorator: ``@register_rule(nn.Conv2d)`` makes the rule handle that exact module type."""

    def deco(cls: type[Rule]) -> type[Rule]:
        rule = cls()
        for t in module_types:
            _RULES[t] = rule
        return cls

    return deco


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for this module: its exact type, or a registered base whose behaviour it does not override."""
    t = type(module)
    if t in _RULES:
        return _RULES[t]
    for base in t.__mro__[1:]:
        rule = _RULES.get(base)
        if rule is not None:
            same = all(getattr(t, m, None) is getattr(base, m, None) for m in rule.frozen_methods)
            return rule if same else None
    return None


class LayerFunction(torch.autograd.Function):
    """Autograd node of a wrapped layer: parameters are inputs (so the output requires grad even when the
    data does not), but their gradient slots return None, so autograd never computes or accumulates them."""

    @staticmethod
    def forward(ctx, call: LayerCall, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:  # noqa: D102
        with full_fp32() if call.rule.norm_reads_forward else nullcontext():
            out, saved = call.rule.compute(call, x)
        ctx.call = call
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # noqa: D102
        call: LayerCall = ctx.call
        saved = ctx.saved_tensors
        grad_x = call.rule.grad_input(call, saved, grad_out) if ctx.needs_input_grad[1] else None
        call.engine.record(call, saved, grad_out)
        return (None, grad_x) + (None,) * (len(ctx.needs_input_grad) - 2)


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the layer runs in: the autocast dtype when autocast is on, else the weight's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def trainable(module: nn.Module, *names: str) -> list[tuple[str, nn.Parameter]]:
    """The module's own parameters among ``names`` that require grad."""
    out = []
    for n in names:
        p = getattr(module, n, None)
        if isinstance(p, nn.Parameter) and p.requires_grad:
            out.append((n, p))
    return out
