"""Parameters owned by a module with children: exact per-example gradients without the torch.func fallback.

A ViT's ``cls_token`` and ``pos_embed`` on the root, layer-scale gammas, a learned temperature: the parameter is used
by the container's own code (``x + self.pos_embed``, ``torch.cat([self.cls_token.expand(B, -1, -1), x], 1)``,
``x * self.gamma``, ``logits / self.temperature.exp()``), between calls of children that have fast rules. The
children stay on their rules; only the container's own parameters are handled here.

How. During the container's forward its parameter ``p`` is replaced (``module._parameters[name]``) by an alias
``p~`` of a detached leaf, a ``_Tracked`` tensor whose ``__torch_function__`` sees every op that reads it. An op is a
*use* where ``p~`` (or a tensor computed from it alone) meets the rows of the batch by broadcasting:

- an elementwise op (``+ - * / pow where maximum lerp ...``) whose output has more than one row while the tracked
  operand, right-aligned to the output, has size 1 in dim 0 (it is broadcast over the rows),
- ``expand`` / ``expand_as`` / ``broadcast_to`` to more than one row from size 1 in dim 0.

At a use, the tracked operand A is replaced by E = A broadcast to the output's shape (a stride-0 view, through
``LayerFunction``), and the op runs on E: the result is the same tensor. Autograd then delivers dL/dE in the shape of
the output, one row per output row, and since each output row only reaches the loss of its own example, example i's
gradient of A is the sum of its rows of dL/dE, summed over the dims A was broadcast along:

    dL_i/dA = sum_to_size( sum_{r in rows(i)} dL/dE[r],  A.shape )

which is exactly what autograd's own reduction of a broadcast does (``sum_to_size`` over all rows), split by example
before the sum over rows. Every other op on a tracked tensor (``p.exp()``, ``p[:, 1:]``, ``p.to(dtype)``, ``a * b`` of
two tracked tensors) is a *derivation*: it runs under ordinary autograd and its output is tracked too. For a
derived A the per-example gradients of the parameters it comes from are one batched vector-Jacobian product,
``autograd.grad(A, leaves, dL_i/dA for every i, is_grads_batched=True)``: the derivation is linearised at the same
point for every example, so this is the chain rule applied per example, exact. A parameter's uses (and a container
called twice) leave one contribution each; the engine sums them per example before the norm, as for shared weights.

A module whose children hold no trainable parameter is a leaf for the engine: it goes through the torch.func
fallback as before (nothing to keep on a fast rule, and the fallback also takes uses this module refuses).

Which rows belong to which example is decided by provenance (fastdp.engine.provenance), not by shape: each use's
output is a call the probe records (its key is the container's ``OwnedParameters`` marker and the use's index in
the forward). A use whose output moves with the examples is ``Batched(m)``: m rows per example. An expanded
parameter (``cls_token.expand(B, -1, -1)``) has identical rows for every example; the probe's perturbation
forward then checks that example 0's rows reach example 0's output only. Anything else is refused by the probe.
As for the layers' inputs, the examples must stay apart after the use (no statistic over the batch downstream):
the probe sees such mixing at the next wrapped layer, and the loss must be a sum of per-example terms.

What cannot be split is refused, never clipped wrongly. The leaf behind ``p~`` receives a gradient only through a
path that bypassed the uses above (``F.linear(x, self.w)``, ``x @ self.w``, the parameter fed to a wrapped layer):
with two or more examples that gradient is already summed over the batch, and the engine raises an error naming the
parameter. A tracked tensor passed to a wrapped layer is refused before the layer runs. With one example every row
is its own, so there the leaf's gradient *is* the per-example gradient and is used as such (no tracking at all).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from fastdp.engine.binding import Binding
from fastdp.engine.contributions import Kept, accum_dtype
from fastdp.engine.interface import LayerCall, LayerFunction
from fastdp.engine.provenance import Batched, ProvenanceError
from fastdp.engine.wrapping import Forward, Hook

_ELEMENTWISE_NAMES = (
    "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "pow", "float_power", "where",
    "maximum", "minimum", "fmax", "fmin", "lerp", "addcmul", "addcdiv", "atan2", "hypot", "clamp", "clip",
    "remainder", "fmod", "xlogy", "copysign",
)  # fmt: skip
_DUNDERS = ("add", "radd", "iadd", "sub", "rsub", "isub", "mul", "rmul", "imul", "truediv", "rtruediv", "itruediv",
            "div", "rdiv", "idiv", "pow", "rpow", "ipow")  # fmt: skip


def _functions(*candidates: Any) -> frozenset:
    return frozenset(c for c in candidates if c is not None)


#: ops whose output is the broadcast of their tensor operands, element by element
ELEMENTWISE = _functions(
    *(getattr(torch, n, None) for n in _ELEMENTWISE_NAMES),
    *(getattr(torch.Tensor, n, None) for n in _ELEMENTWISE_NAMES),
    *(getattr(torch.Tensor, n + "_", None) for n in _ELEMENTWISE_NAMES),
    *(getattr(torch.Tensor, f"__{n}__", None) for n in _DUNDERS),
    *(getattr(operator, n, None) for n in ("add", "sub", "mul", "truediv", "pow")),
)
#: ops whose output is their (first) operand broadcast to a shape
EXPAND = _functions(torch.Tensor.expand, torch.Tensor.expand_as, torch.broadcast_to, torch.Tensor.broadcast_to)


@dataclass(eq=False)
class _Source:
    """One owned parameter during one forward of its container: the real parameter and the leaf its alias reads."""

    param: nn.Parameter
    leaf: torch.Tensor
    name: str


class OwnedParameters:
    """The marker of one container's own parameters: the key of its uses in the provenance layout."""

    def __init__(self, container: nn.Module, names: Sequence[str]) -> None:
        self.container, self.names = container, tuple(names)

    def __repr__(self) -> str:
        return f"OwnedParameters({type(self.container).__name__}: {', '.join(self.names)})"


class _Tracked(torch.Tensor):
    """A tensor computed from owned parameters alone, during their container's forward (see the module docstring)."""

    _fastdp_sources: tuple[_Source, ...]
    _fastdp_owner: OwnedParams
    _fastdp_marker: OwnedParameters
    _fastdp_root: bool
    #: the ops that derived it from the parameters (for error messages)
    _fastdp_ops: tuple[str, ...]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracked = [t for t in _tensor_args(args, kwargs) if isinstance(t, _Tracked)]
        if not tracked:  # another subclass's op: run it as it is
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        return tracked[0]._fastdp_owner.dispatch(func, args, kwargs, tracked)


def _tensor_args(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    leaves, _ = tree_flatten((args, kwargs))
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _in_place(func) -> bool:
    name = getattr(func, "__name__", "")
    return name.startswith("__i") or (name.endswith("_") and not name.startswith("__"))


def _plain(t: Any) -> Any:
    """The tensor without the _Tracked class (same data, same autograd history)."""
    if isinstance(t, _Tracked):
        with torch._C.DisableTorchFunctionSubclass():
            return t.as_subclass(torch.Tensor)
    return t


class _UseRule:
    """The rule of one use: E = A broadcast to the output's shape; per-example dL/dA from dL/dE's rows."""

    norm_reads_forward = False

    def compute(self, call: LayerCall, a: torch.Tensor):
        return a.expand(call.info["shape"]), ()

    def grad_input(self, call: LayerCall, saved, grad_out: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a use's input is detached: autograd never asks for its gradient")

    def contributions(self, call: LayerCall, saved, grad_out: torch.Tensor, rows_per_example: int):
        tracked: _Tracked = call.info["tracked"]
        shape, n = call.info["shape"], call.examples
        acc = accum_dtype(grad_out.dtype)
        # the rows of each example, then the dims along which A was broadcast (A right-aligned, size 1 in dim 0)
        g = grad_out.to(acc).reshape(n, rows_per_example, *shape[1:]).sum(1)
        a_shape = (1,) * (len(shape) - tracked.dim()) + tuple(tracked.shape)
        dims = [d for d in range(1, len(shape)) if a_shape[d] == 1 and shape[d] != 1]
        if dims:
            g = g.sum(dims, keepdim=True)
        g = g.reshape(n, *tracked.shape)
        sources = tracked._fastdp_sources
        if tracked._fastdp_root:
            return [(sources[0].param, Kept(g))]
        owner: OwnedParams = tracked._fastdp_owner
        with owner.chaining(), torch._C.DisableTorchFunctionSubclass():
            grads = torch.autograd.grad(
                call.info["plain"], [s.leaf for s in sources], g.to(tracked.dtype), retain_graph=True,
                is_grads_batched=True, allow_unused=True,
            )  # fmt: skip
        return [(s.param, Kept(gp.to(acc))) for s, gp in zip(sources, grads, strict=True) if gp is not None]


class _LeafRule:
    """One example in the micro-batch: the leaf's gradient is that example's gradient of the parameter."""

    norm_reads_forward = False

    def contributions(self, call: LayerCall, saved, grad_out: torch.Tensor, rows_per_example: int):
        return [(call.info["param"], Kept(grad_out.to(accum_dtype(grad_out.dtype)).unsqueeze(0)))]


_USE_RULE, _LEAF_RULE = _UseRule(), _LeafRule()


class OwnedParams:
    """The engine's handling of containers' own parameters (see the module docstring).

    Args:
        engine: the GradSampleEngine (its micro-batch, probe recorder, names and ``record``).
    """

    def __init__(self, engine) -> None:
        self.engine = engine
        self.markers: dict[nn.Module, OwnedParameters] = {}
        self._chaining = 0

    def adopt(self, module: nn.Module, prefix: str) -> None:
        """Handle ``module``'s own trainable parameters here; its children are wrapped by the engine as usual."""
        names = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        marker = self.markers[module] = OwnedParameters(module, names)
        where = prefix or "model"
        self.engine._names[marker] = f"{where}'s own parameter(s) {', '.join(names)}"
        module.forward = Forward(module, self.run)
        self.engine._wrapped.append(module)

    def guard(self, layers: Sequence[nn.Module]) -> list:
        """Forward pre-hooks that refuse a tracked tensor as a wrapped layer's input (its rows are not per example)."""
        if not self.markers:
            return []
        return [m.register_forward_pre_hook(Hook(self._refuse_tracked_input), with_kwargs=True) for m in layers]

    # ------------------------------------------------------------------ forward
    def run(self, module: nn.Module, args: tuple, kwargs: dict):
        engine = self.engine
        forward = type(module).forward
        probing = engine._recorder is not None
        if not probing and (engine._bypass or not torch.is_grad_enabled()):
            return forward(module, *args, **kwargs)
        marker = self.markers[module]
        if not probing and engine._micro is None:
            raise ValueError(
                f"fastdp: {engine._names.get(module) or 'model'} ({type(module).__name__}) was called with gradients "
                "enabled outside a forward of the model the optimizer wraps. Call the model itself (model(x)): its "
                "input tells the engine how many examples the micro-batch holds."
            )
        examples = 0 if probing else engine._micro.examples
        saved = dict(module._parameters)
        try:
            for name in marker.names:
                module._parameters[name] = self._alias(module, marker, name, saved[name], examples, probing)
            # a tracked tensor leaving the container is an ordinary tensor again: a path through it that reaches
            # the loss without a use is caught at the leaf (the escape hook)
            return tree_map(_plain, forward(module, *args, **kwargs))
        finally:
            for name in marker.names:
                module._parameters[name] = saved[name]

    def _alias(self, module, marker, name, param, examples: int, probing: bool) -> torch.Tensor:
        leaf = param.detach().requires_grad_(not probing)
        if examples == 1:
            leaf.register_hook(self._one_example_hook(marker, param))
            return leaf
        if not probing:
            leaf.register_hook(self._escape_hook(module, name))
        with torch._C.DisableTorchFunctionSubclass():
            alias = leaf.as_subclass(_Tracked)
        alias._fastdp_sources = (_Source(param, leaf, name),)
        alias._fastdp_owner, alias._fastdp_marker, alias._fastdp_root, alias._fastdp_ops = self, marker, True, ()
        return alias

    def dispatch(self, func, args: tuple, kwargs: dict, tracked: list[_Tracked]):
        """An op that reads tracked tensors: a use (broadcast over the rows) or a derivation (see the docstring)."""
        shape = self._use_shape(func, args, kwargs, tracked)
        if shape is None:
            return self._derive(func, args, kwargs, tracked)
        marker = tracked[0]._fastdp_marker
        engine = self.engine
        if engine._recorder is not None:  # a probe forward: the use's output is the call the recorder sees
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*tree_map(_plain, args), **tree_map(_plain, kwargs))
            # the use's output is the one tensor of the "call": its rows are what the probe attributes to examples
            use = Binding(
                tensors=[out], dims=[0], data=[True], names=["use"], _rebuild=lambda leaves: ((leaves[0],), {}),
                _leaves=[out], _slots=[0],
            )  # fmt: skip
            return engine._recorder(marker, use, lambda _: out, lambda outs: [0] * len(outs))
        micro = engine._micro
        index = micro.count.get(marker, 0)
        micro.count[marker] = index + 1
        prov = micro.layout.get((marker, index))
        prov = None if prov is None else prov[0]  # one tensor per use (the layout is per tensor argument)
        name = f"{engine._names[marker]} (use {index + 1} in the forward: {_op_name(func)})"
        if prov is None:
            raise ProvenanceError(
                f"fastdp: {name} was not seen when the engine probed the model for this input shape. Make the uses of "
                "the parameter independent of the data and of train/eval mode."
            )
        if not isinstance(prov, Batched):
            raise ProvenanceError(
                f"fastdp: {name} broadcasts the parameter over the {shape[0]} rows of a tensor that does not come from "
                "the batch (fastdp reads dim 0 of such an op as the batch's rows), so its gradient could not be split "
                "per example. Give the batch-free tensor a leading dimension of size 1 (e.g. self.table[None] * p), "
                "so that only the result is broadcast over the batch."
            )
        expanded = {id(t): self._expanded(t, shape, micro, prov.rows_per_example) for t in tracked}

        def swap(a):
            return expanded.get(id(a), a) if isinstance(a, _Tracked) else a

        if func in EXPAND:
            return expanded[id(tracked[0])]
        return func(*tree_map(swap, args), **tree_map(swap, kwargs))

    def _use_shape(self, func, args, kwargs, tracked) -> tuple[int, ...] | None:
        """The output shape if the op broadcasts every tracked operand over more than one row, else None."""
        if func in EXPAND:
            if tracked[0] is not args[0]:
                return None
            with torch._C.DisableTorchFunctionSubclass():
                shape = tuple(func(*tree_map(_plain, args), **tree_map(_plain, kwargs)).shape)
        elif func in ELEMENTWISE:
            if _in_place(func) and isinstance(args[0], _Tracked):
                return None  # in place on the parameter itself: not a broadcast over the batch
            try:
                shape = tuple(torch.broadcast_shapes(*(t.shape for t in _tensor_args(args, kwargs))))
            except RuntimeError:
                return None
        else:
            return None
        if not shape or shape[0] <= 1:
            return None
        for t in tracked:
            if t.dim() == len(shape) and t.shape[0] != 1:
                return None
        return shape

    def _expanded(self, tracked: _Tracked, shape, micro, rows_per_example: int) -> torch.Tensor:
        engine = self.engine
        call = LayerCall(
            engine, _USE_RULE, tracked._fastdp_marker, strategy="", examples=micro.examples, forward=micro,
            rows_per_example=rows_per_example, info={"tracked": tracked, "shape": shape, "plain": _plain(tracked)},
        )  # fmt: skip
        if shape[0] != micro.examples * rows_per_example:
            raise ProvenanceError(
                f"fastdp: {engine._names[tracked._fastdp_marker]} is broadcast to {shape[0]} rows; for this input "
                f"shape it had {rows_per_example} rows per example, {micro.examples * rows_per_example} for the "
                f"{micro.examples} examples of this micro-batch."
            )
        with torch._C.DisableTorchFunctionSubclass():
            a = _plain(tracked).detach()
        return LayerFunction.apply(call, 1, a, *(s.param for s in tracked._fastdp_sources))

    def _derive(self, func, args, kwargs, tracked: list[_Tracked]):
        sources = tuple(dict.fromkeys(s for t in tracked for s in t._fastdp_sources))
        ops = tuple(dict.fromkeys(o for t in tracked for o in t._fastdp_ops))
        ops = ops if len(ops) >= 8 else (*ops, _op_name(func))[:8]
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)

        def track(t):
            if not isinstance(t, torch.Tensor):
                return t
            with torch._C.DisableTorchFunctionSubclass():
                t = t.as_subclass(_Tracked)
            t._fastdp_sources, t._fastdp_owner = sources, self
            t._fastdp_marker, t._fastdp_root, t._fastdp_ops = tracked[0]._fastdp_marker, False, ops
            return t

        return tree_map(track, out)

    # ------------------------------------------------------------------ backward
    @contextmanager
    def chaining(self) -> Iterator[None]:
        """Gradients reaching the leaves now come from a use's own chain rule, not from an escaped path."""
        self._chaining += 1
        try:
            yield
        finally:
            self._chaining -= 1

    def _one_example_hook(self, marker: OwnedParameters, param: nn.Parameter):
        engine = self.engine

        def hook(grad: torch.Tensor) -> None:
            call = LayerCall(engine, _LEAF_RULE, marker, strategy="", examples=1, info={"param": param})
            engine.record(call, (), grad)

        return hook

    def _escape_hook(self, module: nn.Module, name: str):
        engine = self.engine

        def hook(grad: torch.Tensor) -> None:
            if self._chaining:
                return
            engine._pass = None
            where = engine._names.get(module) or "model"
            raise RuntimeError(
                f"fastdp: parameter {name!r} of {where} ({type(module).__name__}, its own parameter) reaches the loss "
                "through an operation fastdp cannot split per example, so its gradient arrives summed over the "
                "examples. fastdp splits a container's own parameter where its forward broadcasts it over the rows "
                "of the batch: elementwise ops (x + p, x * p, x / p, torch.where(c, x, p), ...) and p.expand(B, ...), "
                "also after batch-free ops on p (p.exp(), p[:, 1:], p.to(dtype)). Move any other use (F.linear(x, p), "
                "x @ p, p passed to a layer) into a module with a rule (nn.Linear, ...) or into a leaf module of its "
                "own, which goes through the exact torch.func fallback."
            )

        return hook

    def _refuse_tracked_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        tracked = [t for t in _tensor_args(args, kwargs) if isinstance(t, _Tracked)]
        if tracked:
            names = self.engine._names
            ops = ", ".join(tracked[0]._fastdp_ops) or "none: the parameter itself"
            raise ProvenanceError(
                f"fastdp: {names.get(module) or 'model'} ({type(module).__name__}) gets a tensor computed from "
                f"{names[tracked[0]._fastdp_marker]} by ops that do not broadcast it over the batch's rows ({ops}), so "
                "the layer's input gradient could not be split per example. Broadcast the parameter over the batch "
                "before the layer (layer(x + p), layer(x * p)), or move the computation into a module with a rule "
                "(e.g. nn.Linear for x @ p) or into a leaf module of its own (the exact torch.func fallback)."
            )


def _op_name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
