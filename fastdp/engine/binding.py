"""A wrapped module's call taken apart: the tensors whose rows the engine attributes to examples, and the rest.

The engine replaces a wrapped module's forward with ``forward(*args, **kwargs)``, so a layer may take any call:
several tensors, keyword arguments, flags, nested tuples (an LSTM's ``(h0, c0)``). Its rule's ``bind`` turns the
call into a ``Binding``: every tensor leaf of the arguments, in call order, with

- the dimension that holds the batch (dim 0 unless the rule says otherwise: ``nn.LSTM(batch_first=False)`` has the
  examples in dim 1 of its input and of ``hx``), so that the provenance probe and the row checks look at the right
  dimension, never at the sequence;
- whether it is *data*: when no data input of a call is batched (all of them do not come from the batch), the
  engine expands the data inputs to one copy per example, so that the output carries the batch and each example's
  output gradient arrives in its own rows. Masks are not data: a copy per example would change their meaning.

Everything that is not a tensor (flags, ``None``) rides along unchanged; ``arguments(tensors)`` puts the tensors the
engine feeds the layer (checked, possibly expanded) back into the call.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten


class CallError(ValueError):
    """A call a rule cannot handle exactly; the engine prefixes the module's name and type."""


@dataclass
class Binding:
    """One call of a wrapped module: its tensor arguments, their batch dimensions, and how to rebuild the call."""

    tensors: list[torch.Tensor]
    #: the dimension of each tensor that holds the batch
    dims: list[int]
    #: whether each tensor is data (expanded to the batch when no data input is batched) or not (a mask)
    data: list[bool]
    #: the argument each tensor comes from ("query", "hx[1]"), for messages
    names: list[str]
    _rebuild: Callable[[list[Any]], tuple[tuple, dict]]
    _leaves: list[Any]
    _slots: list[int]
    #: the layer acts on each position of its one input alone (Linear, LayerNorm): a sequence-first input (T, N, ...)
    #: may hold the batch in dim 1, and the engine then runs the layer on it batch first
    positionwise: bool = False

    def arguments(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
        """The call's (args, kwargs) with ``tensors`` in place of the original tensor arguments."""
        leaves = list(self._leaves)
        for slot, t in zip(self._slots, tensors, strict=True):
            leaves[slot] = t
        return self._rebuild(leaves)

    def describe(self, index: int) -> str:
        return f"argument {self.names[index]!r}"

    def values(self, module: nn.Module, tensors: Sequence[torch.Tensor]) -> dict[str, Any]:
        """Every argument of the call by its forward's parameter names, defaults filled in, with ``tensors`` in place
        of the tensors (for rules that read flags such as ``need_weights``)."""
        args, kwargs = self.arguments(tensors)
        bound = _signature(type(module).forward).bind(module, *args, **kwargs)
        bound.apply_defaults()
        return dict(list(bound.arguments.items())[1:])


@functools.cache
def _signature(forward: Callable) -> inspect.Signature:
    return inspect.signature(forward)


def bind_call(
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    dims: Mapping[str, int] | None = None,
    not_data: Container[str] = (),
) -> Binding:
    """Take ``module``'s call apart by the names of its forward's parameters.

    Args:
        module: the wrapped module (its class's forward names the arguments).
        args, kwargs: the call.
        dims: the batch dimension of the tensors of an argument, by name (others: 0).
        not_data: arguments whose tensors are never expanded to the batch (masks).
    """
    dims = dims or {}
    sig = _signature(type(module).forward)
    try:
        bound = sig.bind(module, *args, **kwargs)
    except TypeError as e:
        raise CallError(f"its forward does not take this call ({e})") from None
    first, *names = list(bound.arguments)  # the first is the module itself (``self``, by any name)
    leaves, spec = tree_flatten([bound.arguments[n] for n in names])
    owner: list[str] = []
    for n in names:
        count = len(tree_flatten(bound.arguments[n])[0])
        owner += [n] * count
    slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    tensors = [leaves[i] for i in slots]

    def rebuild(new_leaves: list[Any]) -> tuple[tuple, dict]:
        values = tree_unflatten(new_leaves, spec)
        new = inspect.BoundArguments(sig, {first: module, **dict(zip(names, values, strict=True))})
        return new.args[1:], new.kwargs

    labels = []
    for i in slots:
        same = [j for j in slots if owner[j] == owner[i]]
        labels.append(owner[i] if len(same) == 1 else f"{owner[i]}[{same.index(i)}]")
    return Binding(
        tensors=tensors,
        dims=[dims.get(owner[i], 0) for i in slots],
        data=[owner[i] not in not_data for i in slots],
        names=labels,
        _rebuild=rebuild,
        _leaves=leaves,
        _slots=slots,
    )


def one_tensor(module: nn.Module, args: tuple, kwargs: dict, positionwise: bool = False) -> Binding:
    """The binding of a layer that takes exactly one tensor, its input (Linear, conv, norms)."""
    if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
        x = args[0]
        return Binding([x], [0], [True], ["input"], lambda leaves: ((leaves[0],), {}), [x], [0], positionwise)
    b = bind_call(module, args, kwargs)
    b.positionwise = positionwise
    if len(b.tensors) != 1:
        raise CallError(
            f"its rule takes exactly one tensor argument (the input), got {len(b.tensors)} "
            f"({', '.join(b.names) or 'none'}). Call it with one tensor."
        )
    return b
