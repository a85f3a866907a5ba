"""What the engine leaves on the model it wraps, and what a copy of the model keeps of it: nothing.

The engine gives each wrapped module a ``forward`` of its own (an instance attribute over the class's) and
registers forward hooks on the model and on some layers. A deep copy of the model (``copy.deepcopy``;
``torch.optim.swa_utils.AveragedModel`` and other weight averages make one) would copy those as well: a forward
bound to the copy that still calls the original engine, which does not know the copy's modules, and hooks bound to a
deep copy of the engine with all its state. The objects here copy (and pickle) as the plain thing instead: a forward
as the module class's own, a hook as a no-op. The copy is then a plain model with parameters of its own
(``nn.Parameter`` deep-copies without its hooks, so the engine's leak guards stay on the original), and the original
stays wrapped and private.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MethodType
from typing import Any

from torch import nn


class Forward:
    """A wrapped module's ``forward``: ``run(module, args, kwargs)``, where ``run`` is the engine's."""

    __slots__ = ("module", "run")

    def __init__(self, module: nn.Module, run: Callable[[nn.Module, tuple, dict], Any]) -> None:
        self.module, self.run = module, run

    def __call__(self, *args, **kwargs):
        return self.run(self.module, args, kwargs)

    def __deepcopy__(self, memo: dict) -> Any:
        # the module being copied is in the memo already (deepcopy registers an object before copying its state)
        twin = memo.get(id(self.module))
        return self if twin is None else class_forward(twin)

    def __reduce__(self):
        return class_forward, (self.module,)


def class_forward(module: nn.Module) -> MethodType:
    """``module``'s class's own forward, bound to it (what a copy of a wrapped module gets)."""
    return MethodType(type(module).forward, module)


class Hook:
    """A hook of the engine's on the model: ``fn``; in a copy of the model, a no-op."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Callable:
        return inert

    def __reduce__(self):
        return _inert, ()


def inert(*args, **kwargs) -> None:
    """A copied hook: returns None, which every kind of module hook reads as "change nothing"."""
    return None


def _inert() -> Callable:
    return inert
