"""The types the engine, the rules and the backends share; this module imports none of them.

Data flow of one micro-batch: a wrapped layer's forward makes a ``LayerCall`` and runs ``LayerFunction``, whose
backward returns the input gradient and hands the call to its owner (the engine), which asks the call's rule for
one ``Contribution`` per parameter. Once the backward is over, the engine sums the contributions' per-example
squared norms, draws the clip factors and asks each contribution for its weighted sum, through the backend's
``Reducer`` where one applies. A rule ranks its plan candidates by ``Cost`` and may offer a backend's
``LayerKernels`` as ``fused_*`` strategies.

Contracts of a ``Contribution`` (one layer call's share of one parameter's per-example gradients):

- ``sq_norm()``        the per-example squared norm of its gradient, (B,) in float32 or better,
- ``weighted_sum(w)``  sum_i w_i g_i once the weights w_i = c_i * scale are known; an example of weight exactly 0
                       contributes exact zeros whatever its data holds (a non-finite example is dropped by giving it
                       weight 0, and 0 * nan = nan: its rows must be selected away, not multiplied),
- ``instantiate()``    the per-example gradients (B, *param.shape), needed only when a parameter receives
                       several contributions in one backward (shared weights, a module called twice): the
                       norm of a sum is not the sum of norms, so those are summed per example first.

Dropping by weight keeps the engine free of host decisions: whether any example is non-finite is never asked on the
host (on a GPU that question is a queue-draining sync), every backward runs the same kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from fastdp.engine.precision import full_fp32

#: a backend's clip-and-reduce over kept per-example gradients: (G (B, P), w (B,)) -> (P,), or None where it does
#: not take the input (device, dtype, layout) and the torch reduction runs. Rows of weight exactly 0 are skipped, not
#: multiplied: they may hold NaN or inf (the Contribution contract)
Reducer = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True)
class Cost:
    """A plan candidate's estimated cost: seconds-like time units and bytes held until the clip step."""

    time: float
    memory: float


class Contribution:
    """One layer call's share of one parameter's per-example gradients (see the module docstring)."""

    def sq_norm(self) -> torch.Tensor:
        raise NotImplementedError

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def instantiate(self) -> torch.Tensor:
        raise NotImplementedError

    def stack_key(self) -> Any:
        """Contributions of one class and equal keys (not None) are finished together by that class's
        ``stacked(members, buffers)``: one batched norm and one batched sum for same-shape layers
        (fastdp.engine.stacks)."""
        return None

    def release(self) -> None:
        """Drop what a stack has copied (fastdp.engine.stacks): the stack finishes this contribution."""

    def norm_key(self) -> Any:
        """Contributions of one class and equal keys (not None) have their squared norms taken together by that
        class's ``sq_norms_together(members)``, which returns the per-example sum of the members' squared norms
        (fastdp.engine.norm_groups); each is still summed on its own."""
        return None


@dataclass(frozen=True)
class LayerKernels:
    """The fused per-layer kernels a backend offers the plan (None: the torch strategy does that part). They compute
    what the torch strategies compute, with fp32 accumulation, within the error each precision states (bf16/fp16
    operands as given, fp32 by tf32x3 on tensor cores: fastdp.kernels._triton.dot_error_bound, README "How exactly C
    is enforced"):

    - ``linear_norm(a, delta, out)``        ||delta_i^T a_i||_F^2 for a (B, T, d), delta (B, T, p); ``out``
                                            (B, p, d) or None receives G_i (the fused_keep plan),
    - ``linear_ghost_norm(a, delta)``       the same norm from tiles of the two Gram matrices (T > 1),
    - ``linear_bookkeeping(a, delta, w)``   sum_i w_i delta_i^T a_i, (p, d),
    - ``conv2d_norm(x, delta, geom, K, out)``        the per-example norm of a Conv2d (groups 1) by implicit GEMM,
    - ``conv2d_bookkeeping(x, delta, w, geom, K)``   its clipped sum, (p, C, kh, kw),
    - ``conv2d_ghost_norm(x, delta, geom, K)``       its norm by the ghost norm over the K Ho Wo positions (the
                                                     low-resolution layers),
    - ``shifted_gram(X, in_shape, out_shape, kernel, dilation, padding, K)``  a part of the torch strategy
      ``shifted_ghost``, not a strategy of its own: the input's Gram matrix X (n, K I, K I) summed over a stride-1
      convolution's kernel offsets into S (n, K T, K T), one launch (fastdp.rules.conv_ghost).

    The book-keeping kernels do not read the rows of an example of weight exactly 0, on either side of the product:
    a dropped example's rows may hold NaN or inf (the Contribution contract).
    """

    #: the device type the kernels take tensors on ('cuda'; 'cpu' for the compiled CPU kernels and Triton's
    #: interpreter)
    device_type: str
    dtypes: tuple[torch.dtype, ...]
    linear_norm: Callable | None = None
    linear_ghost_norm: Callable | None = None
    linear_bookkeeping: Callable | None = None
    conv2d_norm: Callable | None = None
    conv2d_bookkeeping: Callable | None = None
    conv2d_ghost_norm: Callable | None = None
    shifted_gram: Callable | None = None

    def takes(self, t: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether the kernels run on ``t``'s device for operands of ``dtype`` (the rule's accumulation dtype)."""
        return t.device.type == self.device_type and dtype in self.dtypes


class CallOwner(Protocol):
    """What a layer call needs of the engine that made it."""

    kernels: LayerKernels | None

    def record(self, call: LayerCall, saved: Sequence[torch.Tensor], grad_out: torch.Tensor) -> None: ...


class LayerRule(Protocol):
    """What a layer call needs of its rule (fastdp.rules.base.Rule implements it)."""

    norm_reads_forward: bool

    def compute(self, call: LayerCall, *inputs: torch.Tensor) -> tuple[Any, Sequence[torch.Tensor]]: ...

    def grad_input(self, call: LayerCall, saved: Sequence[torch.Tensor], grad_out: Any) -> Any: ...


@dataclass(eq=False)
class LayerCall:
    """One forward call of a wrapped layer, carried from its forward to its backward."""

    engine: CallOwner
    rule: LayerRule
    module: nn.Module
    strategy: str
    info: dict[str, Any] = field(default_factory=dict)
    consumed: bool = False
    #: N, the examples of the micro-batch this call belongs to
    examples: int = 1
    #: the model forward this call was part of (the engine's record of it): one backward must not mix two
    forward: Any = None
    #: m, the consecutive rows of the layer's input that belong to each example (K, or K*T for flattened tokens)
    rows_per_example: int = 1
    #: a layer with several tensor inputs: each one's rows per example in its batch dimension (None: shared, the
    #: layer broadcasts it over the batch) and the call's Binding (fastdp.engine.binding), which rebuilds the call
    input_rows: tuple[int | None, ...] = ()
    binding: Any = None


class LayerFunction(torch.autograd.Function):
    """Autograd node of a wrapped layer: parameters are inputs (so the output requires grad even when the
    data does not), but their gradient slots return None, so autograd never computes or accumulates them.

    ``apply(call, n, *inputs, *params)``: the first ``n`` tensors after ``n`` are the layer's inputs. A rule's output
    is one tensor or any tuple/list/dict nesting of them (with non-tensor leaves such as None): the node returns its
    tensor leaves and leaves the structure in ``call.info["outputs"]`` for ``unflatten_outputs``. The rule's
    backward then gets the gradient of the one output, or a tuple with one per tensor leaf, and returns the input
    gradient, or a tuple with one per input (None where there is none).
    """

    @staticmethod
    def forward(ctx, call: LayerCall, n: int, *tensors: torch.Tensor):  # noqa: D102
        with full_fp32() if call.rule.norm_reads_forward else nullcontext():
            out, saved = call.rule.compute(call, *tensors[:n])
        ctx.call, ctx.n = call, n
        ctx.save_for_backward(*saved)
        if isinstance(out, torch.Tensor):
            ctx.single = True
            return out
        ctx.single = False
        leaves, spec = tree_flatten(out)
        slots = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
        call.info["outputs"] = ([None if i in slots else t for i, t in enumerate(leaves)], spec, slots)
        return tuple(leaves[i] for i in slots)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor):  # noqa: D102
        call: LayerCall = ctx.call
        saved = ctx.saved_tensors
        grad_out = grads[0] if ctx.single else grads
        n = ctx.n
        grad_in = call.rule.grad_input(call, saved, grad_out) if any(ctx.needs_input_grad[2 : 2 + n]) else None
        if not isinstance(grad_in, tuple | list):
            grad_in = (grad_in,) + (None,) * (n - 1)
        call.engine.record(call, saved, grad_out)
        return (None, None, *grad_in) + (None,) * (len(ctx.needs_input_grad) - 2 - n)


def unflatten_outputs(call: LayerCall, out: torch.Tensor | tuple[torch.Tensor, ...]) -> Any:
    """The rule's output structure around what ``LayerFunction.apply`` returned."""
    if isinstance(out, torch.Tensor):
        return out
    leaves, spec, slots = call.info["outputs"]
    leaves = list(leaves)
    for i, t in zip(slots, out, strict=True):
        leaves[i] = t
    return tree_unflatten(leaves, spec)
