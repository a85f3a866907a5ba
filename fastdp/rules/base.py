"""The per-layer rule interface and its registry (one dict keyed by module type, as in opacus).

A rule owns one layer family. Its layers run through ``LayerFunction``: the forward computes the output
with the weights held out of autograd, and the backward returns only the input gradient and leaves the
rule's ``Contribution`` per parameter. The autograd weight gradient is therefore never computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastdp.engine.binding import Binding, CallError, one_tensor
from fastdp.engine.interface import Contribution, Cost, LayerCall, LayerFunction, LayerKernels

__all__ = [
    "CallError", "Cost", "LayerCall", "LayerFunction", "Rule", "Strategies", "Strategy", "compute_dtype",
    "known_strategies", "register_rule", "rule_for", "trainable",
]  # fmt: skip


@dataclass(frozen=True)
class Strategy:
    """One exact way for a rule to form a parameter's contribution.

    ``offered(shape)`` says whether the layer can run it on an input (``shape`` is the rule's summary of the input:
    sizes, and which backend kernels take it), ``cost(shape)`` is its modelled cost for the plan, and ``contribute``
    forms the contribution in the backward (its arguments are the rule's).
    """

    name: str
    cost: Callable[[Any], Cost]
    contribute: Callable[..., Any]
    offered: Callable[[Any], bool] = lambda shape: True


class Strategies:
    """A rule's strategies by name; an unknown name is an error."""

    def __init__(self, *strategies: Strategy) -> None:
        self._by_name = {s.name: s for s in strategies}

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._by_name)

    def offer(self, shape: Any) -> dict[str, Cost]:
        """The candidates of an input, with their costs."""
        return {n: s.cost(shape) for n, s in self._by_name.items() if s.offered(shape)}

    def __getitem__(self, name: str) -> Strategy:
        try:
            return self._by_name[name]
        except KeyError:
            raise ValueError(f"unknown strategy {name!r}; this rule has {', '.join(self._by_name)}") from None


class Rule:
    """Exact per-example gradients for one layer family.

    Subclasses implement ``compute`` (the forward), ``grad_input`` and ``contributions`` (the backward), and
    may offer several plan ``strategies`` with a cost each; the engine picks one per input shape.
    """

    #: methods a subclass of the registered type must not override for this rule to stay exact
    frozen_methods: tuple[str, ...] = ("forward",)
    #: whether the per-example norm reads a tensor the forward computed (then the forward runs in full fp32 too)
    norm_reads_forward: bool = False
    #: every strategy ``strategies`` may offer (what ``strategy=`` is checked against)
    strategy_names: frozenset[str] = frozenset({"keep"})
    #: whether the rule computes the module's whole subtree (the children's parameters included in ``params``), so
    #: that the engine wraps none of its children
    covers_children: bool = False
    #: whether the layer acts on each position of its input alone, so that a sequence-first input (T, N, ...) can be
    #: run batch first (fastdp.engine.binding.Binding.positionwise)
    positionwise: bool = False

    def bind(self, module: nn.Module, args: tuple, kwargs: dict) -> Binding:
        """Take a call apart (fastdp.engine.binding): the default rule takes exactly one tensor, its batch in dim 0.
        Raise ``CallError`` (what is wrong and what to do) for a call the rule cannot handle exactly."""
        return one_tensor(module, args, kwargs, self.positionwise)

    def out_dims(self, module: nn.Module, outputs: Sequence[torch.Tensor]) -> list[int]:
        """The batch dimension of each tensor output (in the order of the output's tensor leaves)."""
        return [0] * len(outputs)

    def check(self, module: nn.Module) -> None:
        """Raise a clear error if this module's configuration is not supported."""

    def params(self, module: nn.Module) -> list[nn.Parameter]:
        """The trainable parameters this rule produces per-example gradients for."""
        return [p for p in module.parameters(recurse=False) if p.requires_grad]

    def prepare(self, call: LayerCall, x: torch.Tensor) -> torch.Tensor:
        """Parameter-free preprocessing done under ordinary autograd (padding, normalisation); rules with one input."""
        return x

    def strategies(
        self, module: nn.Module, x: torch.Tensor, augmult: int, kernels: LayerKernels | None = None
    ) -> dict[str, Cost]:
        """Plan candidates for this input (a tuple of them for a rule with several; ``fused_*`` ones where the
        backend's ``kernels`` take it); the default rule has one."""
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


_RULES: dict[type[nn.Module] | str, Rule] = {}


def register_rule(*module_types: type[nn.Module] | str) -> Callable[[type[Rule]], type[Rule]]:
    """Class decorator: ``@register_rule(nn.Conv2d)`` makes the rule handle that exact module type. A type given by
    its qualified name (``"transformers.pytorch_utils.Conv1D"``) is matched by name, so that a rule for an optional
    dependency's module neither imports it nor needs it installed."""

    def deco(cls: type[Rule]) -> type[Rule]:
        rule = cls()
        for t in module_types:
            _RULES[t] = rule
        return cls

    return deco


def known_strategies() -> frozenset[str]:
    """Every strategy some registered rule offers."""
    return frozenset().union(Rule.strategy_names, *(r.strategy_names for r in _RULES.values()))


def _registered(t: type) -> Rule | None:
    return _RULES.get(t) or _RULES.get(f"{t.__module__}.{t.__qualname__}")


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for this module: its exact type, or a registered base whose behaviour it does not override."""
    t = type(module)
    rule = _registered(t)
    if rule is not None:
        return rule
    for base in t.__mro__[1:]:
        rule = _registered(base)
        if rule is not None:
            same = all(getattr(t, m, None) is getattr(base, m, None) for m in rule.frozen_methods)
            return rule if same else None
    return None


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


def kernel_operands(
    kernels: LayerKernels | None, acc: torch.dtype, x: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's input and output gradient as a fused-kernel strategy hands them to the backend's kernels.

    Under bf16/fp16 autocast both are 16-bit tensors: they go to the kernels as they are (tensor-core products are
    exact, accumulation is fp32 inside the kernels), with no fp32 copy. Anything the kernels do not take in its own
    dtype (mixed dtypes, float64, a dtype the backend lacks) is cast to ``acc``, as the torch strategies cast it.
    """
    if kernels is not None and x.dtype == grad_out.dtype and kernels.takes(x, x.dtype):
        return x, grad_out
    return x.to(acc), grad_out.to(acc)
