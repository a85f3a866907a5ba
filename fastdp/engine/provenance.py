"""Which rows of each wrapped layer's input belong to which example: decided by provenance, not by shape.

The engine attributes the rows of a wrapped layer's input to examples. A tensor built inside the forward
(``self.wpe(torch.arange(t))``), or the batch flattened into rows ((B, T, D) -> (B*T, D)), breaks the naive rule
"row r is example r // K" silently whenever the row count happens to fit (t == rows). So the model's input fixes N,
the examples of the micro-batch (dim 0 of its first tensor argument holds N*K rows, K the augmentation multiplicity),
and once per input signature a *probe* finds out where each wrapped call's input comes from. It runs the model
without gradients, in eval mode (no dropout), on three versions of the micro-batch, every tensor argument with N*K
rows changed alike:

- A: the batch as given;
- R: the examples rolled by one (example j takes example j-1's place);
- D: example 0 replaced by a copy of example 1.

Input X of a call with n = N*m rows is *batched*, m rows per example, example-major, when R moves its rows with the
examples (X_R = roll(X_A, m)) and D changes exactly example 0's block into example 1's (X_D = X_A with block 0 :=
block 1). Each example's gradient then arrives in its own m rows, which the rule sums per example (m = K for an
ordinary layer, m = K*T for tokens flattened into rows). It is *shared* when neither R nor D changes it: it does not
come from the batch at all (positions, a constant), so autograd sums its gradient over the examples before the
layer sees it. The engine then feeds the layer its input expanded to N*K rows, so the output carries a batch
dimension and each example's output gradient arrives in its own rows; a fourth probe forward checks that the
expansion leaves the model's output unchanged (shape and values), i.e. that the output was only ever broadcast over
the batch. Anything else, an input that changes with several examples (batch statistics, a mean over the batch) or
rows in an order the engine cannot attribute, is refused with the module's name.

An input that is identical for every example under both changes (rows that are copies of one tensor, e.g.
``torch.arange(t).expand(B, t)``) is batched or shared depending on how its output is used, which the input cannot
tell: a fifth kind of forward adds a perturbation to example 0's rows of that call's output and checks that no other
example's model output moves.

A layer may take several tensors (fastdp.engine.binding): each is classified on its own, in the dimension its rule
says holds the batch (dim 1 for ``nn.LSTM(batch_first=False)``), so a call's provenance is one entry per tensor. A
mask without a batch dimension is shared and broadcast by the layer; only a call none of whose inputs is batched has
its data inputs expanded (its output would otherwise carry no batch dimension).

The probe runs in eval mode, where dropout draws no masks that would tell its runs apart. A model may mix the
examples only in training mode, though (batch statistics taken only then, mixup or a shuffle inside the forward):
``mixing_in_training_mode`` runs the training forward on altered copies of the batch, every run from the same RNG
state, and refuses any mixing it sees there.

With one example (N = 1) every row belongs to it, so every call is exact with m = all of its rows; no probe is needed.
Every probe forward starts from the caller's RNG states (torch's, Python's, numpy's; a generator the model owns is
not reset); the probe restores them, the modules' training flags, every buffer (the tensor a name holds and its
value) and the plain numbers a module keeps (a step counter), so it changes nothing a run computes.
Its cost is a few forwards without gradients per new input signature (shapes apart from the batch size), plus
7 in training mode on 8 examples.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from fastdp.engine.binding import Binding

#: relative tolerance of "unchanged" between probe forwards: the same rows through the same kernels, so only a
#: kernel whose reduction order depends on a row's position could differ, by a few ulp
_RTOL = 1e-5


@dataclass(frozen=True)
class Batched:
    """The input holds ``rows_per_example`` consecutive rows of every example (example-major) in its batch dimension,
    or in dimension ``dim`` when that is another (a position-wise layer fed a sequence-first tensor)."""

    rows_per_example: int
    dim: int | None = None


@dataclass(frozen=True)
class Shared:
    """The input is the same for every example (it does not come from the batch): expand it to N*K rows."""


Provenance = Batched | Shared
#: a wrapped call of one forward: the module and how many times it was called before in that forward
CallKey = tuple[nn.Module, int]
#: the provenance of each tensor input of one call, in call order (fastdp.engine.binding)
CallLayout = tuple[Provenance, ...]


#: examples the training-mode check runs on (the first ones of the micro-batch): 1 + 2 log2 of it forwards
TRAINING_CHECK_EXAMPLES = 8


class ProvenanceError(ValueError):
    """A wrapped layer whose rows cannot be attributed to examples exactly."""


def _of_batch(t: Any, rows: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == rows


def batch_tensors(args: Any, rows: int) -> list[torch.Tensor]:
    """The tensor leaves of ``args`` with ``rows`` rows in dim 0 (the ones the probe changes)."""
    leaves, _ = tree_flatten(args)
    return [t for t in leaves if _of_batch(t, rows)]


def map_batch(args: Any, rows: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``args`` with ``fn`` applied to every tensor of ``rows`` rows in dim 0 (``batch_tensors``): the probe's
    alterations of the micro-batch, every such argument altered alike."""
    return tree_map(lambda t: fn(t) if _of_batch(t, rows) else t, args)


def first_batch_tensor(args: Any) -> torch.Tensor | None:
    """The model input's first tensor with a dim 0: its rows are the micro-batch's rows."""
    leaves, _ = tree_flatten(args)
    return next((t for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 0), None)


def signature(args: Any, rows: int) -> tuple:
    """What decides the probe's result, apart from the batch size: shapes (dim 0 of batch tensors left out), dtypes
    and the values of plain Python arguments."""
    leaves, _ = tree_flatten(args)
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            batched = leaf.dim() > 0 and leaf.shape[0] == rows
            out.append((batched, tuple(leaf.shape[1:] if batched else leaf.shape), leaf.dtype, leaf.device.type))
        elif leaf is None or isinstance(leaf, bool | int | float | str):
            out.append(leaf)
        else:
            out.append(type(leaf).__qualname__)
    return tuple(out)


class Recorder:
    """What the wrapped forwards do during a probe forward: note each call's tensor inputs (batch dimension first),
    optionally feed shared inputs expanded as the engine will (``layout``) and perturb one call's output rows
    (``perturb``: its key)."""

    def __init__(
        self, examples: int, rows: int, layout: dict[CallKey, CallLayout] | None = None, perturb: CallKey | None = None
    ) -> None:
        self.examples, self.rows, self.layout, self.perturb = examples, rows, layout, perturb
        self.calls: list[tuple[CallKey, list[torch.Tensor], list[str]]] = []
        self.positionwise: dict[CallKey, bool] = {}
        self.data: dict[CallKey, list[bool]] = {}
        self._count: dict[nn.Module, int] = {}

    def __call__(
        self,
        module: nn.Module,
        binding: Binding,
        forward: Callable[[list[torch.Tensor]], Any],
        out_dims: Callable[[list[torch.Tensor]], list[int]],
    ) -> Any:
        key = (module, self._count.get(module, 0))
        self._count[module] = key[1] + 1
        inputs = [_batch_first(t, d) for t, d in zip(binding.tensors, binding.dims, strict=True)]
        self.calls.append((key, inputs, binding.names))
        self.positionwise[key] = binding.positionwise
        self.data[key] = binding.data
        tensors = binding.tensors
        if self.layout is not None and key in self.layout:
            tensors, _ = feed(self.layout[key], binding, self.rows, self.rows // self.examples)
        out = forward(tensors)
        if self.perturb == key:
            leaves, spec = tree_flatten(out)
            slots = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.is_floating_point()]
            for i, d in zip(slots, out_dims([leaves[i] for i in slots]), strict=True):
                t = leaves[i].clone()
                if t.dim() > d and t.shape[d] % self.examples == 0:
                    rows = t.narrow(d, 0, t.shape[d] // self.examples)
                    rows += 1.0 + rows.abs()  # moves every entry of example 0's rows
                leaves[i] = t
            out = tree_unflatten(leaves, spec)
        return out


def _batch_first(t: torch.Tensor, d: int) -> torch.Tensor:
    t = t.detach()
    return (t.movedim(d, 0) if t.dim() > d else t).clone()


def feed(layout: CallLayout, binding: Binding, rows: int, augmult: int) -> tuple[list[torch.Tensor], list[int | None]]:
    """The tensors a call's layer runs on, and each one's rows per example (None: shared, broadcast over the batch).

    When no input is batched the output would have no batch dimension and autograd would sum the examples' output
    gradients before the layer sees them: the data inputs are then expanded to ``rows`` identical rows (a stride-0
    view, no copy) in their batch dimension, ``augmult`` per example. Otherwise shared inputs stay as they are and
    the layer broadcasts them (its rule forms each example's gradient from its own output rows).
    """
    expand = not any(isinstance(p, Batched) for p in layout)
    tensors, per_example = [], []
    for t, p, d, data in zip(binding.tensors, layout, binding.dims, binding.data, strict=True):
        if isinstance(p, Batched):
            tensors.append(t)
            per_example.append(p.rows_per_example)
        elif expand and data:
            tensors.append(expand_shared(t, rows, d))
            per_example.append(augmult)
        else:
            tensors.append(t)
            per_example.append(None)
    return tensors, per_example


def expand_shared(x: torch.Tensor, rows: int, dim: int = 0) -> torch.Tensor:
    """A shared input as ``rows`` identical rows in dimension ``dim`` (a stride-0 view: no copy)."""
    x = x.unsqueeze(dim)
    shape = list(x.shape)
    shape[dim] = rows
    return x.expand(shape)


def probe(
    run: Callable[[Any, Recorder], Any], args: Any, examples: int, augmult: int, names: dict[nn.Module, str]
) -> tuple[dict[CallKey, CallLayout], list[Batched | None], str | None]:
    """The provenance of the tensor inputs of every wrapped call of the forward ``run(args, recorder)`` (see the
    module docstring), that of the forward's tensor outputs (``_output_layout``), and why the forward cannot be
    trained on when its outputs mix the examples (else None).

    Args:
        run: runs the model's forward on ``args`` with the wrapped layers reporting to ``recorder``.
        args: the model's (args, kwargs) of this micro-batch.
        examples: N >= 2, the examples of the micro-batch.
        augmult: K, rows per example of the model's input.
        names: module -> qualified name, for the error messages.
    """
    rows = examples * augmult

    def rolled(t: torch.Tensor) -> torch.Tensor:
        return t.roll(augmult, 0)

    def duplicated(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[:augmult] = t[augmult : 2 * augmult]
        return t

    recs = {}
    outs = {}
    for kind, a in (("A", args), ("R", map_batch(args, rows, rolled)), ("D", map_batch(args, rows, duplicated))):
        recs[kind] = Recorder(examples, rows)
        outs[kind] = run(a, recs[kind])
    keys = [k for k, _, _ in recs["A"].calls]
    for kind in ("R", "D"):
        if [k for k, _, _ in recs[kind].calls] != keys:
            raise ProvenanceError(
                "fastdp: the model called its layers in a different order when the examples of the micro-batch were "
                "reordered (data-dependent control flow), so the engine cannot tell which rows of each layer belong to "
                "which example. Make the sequence of layer calls independent of the data."
            )
    layout: dict[CallKey, CallLayout] = {}
    ambiguous = []
    positionwise = recs["A"].positionwise
    for (key, xas, labels), (_, xrs, _), (_, xds, _) in zip(recs["A"].calls, recs["R"].calls, recs["D"].calls,
                                                            strict=True):  # fmt: skip
        entry = []
        for j, (xa, xr, xd) in enumerate(zip(xas, xrs, xds, strict=True)):
            m = _rows_per_example(xa, xr, xd, examples)
            invariant = _close(xr, xa) and _close(xd, xa)
            if m and invariant and not recs["A"].data[key][j]:
                entry.append(Shared())  # a mask the same for every example: the layer uses it as given, whole
            elif m and invariant:
                ambiguous.append((key, j, m))
                entry.append(Batched(m))
            elif m:
                entry.append(Batched(m))
            elif invariant:
                entry.append(Shared())
            elif positionwise[key] and xa.dim() >= 3 and (m := _rows_per_example(*_seq_first(xa, xr, xd), examples)):
                entry.append(Batched(m, dim=1))  # sequence-first: (T, N, ...) into a layer that acts per position
            else:
                raise ProvenanceError(
                    f"fastdp: {_describe(key, names)} gets an input{_which(labels, j)} of shape {tuple(xa.shape)} "
                    f"whose rows cannot be attributed to the {examples} examples of the "
                    f"micro-batch (model input: {rows} rows, {augmult} per example): changing one example moved rows "
                    "of others, or moved rows that are not example-major. Per-example gradients do not exist for it: "
                    "keep each example's rows together and separate from the others (no statistics over the batch, no "
                    "reordering of rows across examples)."
                )
        layout[key] = tuple(entry)
    for key in dict.fromkeys(k for k, _, _ in ambiguous):
        # the same input for every example: batched (a per-example copy) if each copy only reaches its own example
        rec = Recorder(examples, rows, perturb=key)
        if not _only_example_zero_moved(outs["A"], run(args, rec), examples):
            j, m = next((j, m) for k, j, m in ambiguous if k == key)
            _, xas, labels = recs["A"].calls[keys.index(key)]
            raise ProvenanceError(
                f"fastdp: {_describe(key, names)} gets an input{_which(labels, j)} of shape {tuple(xas[j].shape)} "
                f"with {examples} identical blocks of rows (the same for every example), and its output rows reach "
                "other examples than their own: the engine cannot tell whose gradient each row carries. Feed it a "
                "tensor without a batch dimension (e.g. torch.arange(t), shared by all examples), or rows that belong "
                "to one example each."
            )
    # the model's outputs: where their rows move with the examples, example 0's change must stay in its rows
    # (engine: refused after the forward)
    outputs, moved = _output_layout(outs["A"], outs["R"], outs["D"], examples)
    shared = [key for key, entry in layout.items() if entry and not any(isinstance(p, Batched) for p in entry)]
    if shared:
        try:
            same, failure = _same_output(outs["A"], run(args, Recorder(examples, rows, layout=layout))), None
        except Exception as e:  # noqa: BLE001 - the copies broke the user's forward: that is the answer
            same, failure = False, e
        if not same:
            raise ProvenanceError(
                f"fastdp: {', '.join(_describe(k, names) for k in shared)} get an input that does not come from the "
                "batch (the same for every example), so their gradient arrives summed over the examples. fastdp "
                "handles that by giving the layer one copy of its input per example, which works when the output is "
                "only broadcast over the batch; here it changed the model's output. Feed the layer a batched input "
                f"(e.g. positions expanded to the batch: torch.arange(t).expand({rows}, t))."
                + (f" (With the copies the forward failed: {type(failure).__name__}: {failure}.)" if failure else "")
            ) from failure
    return layout, outputs, output_mixing() if moved else None


def _rows_per_example(xa: torch.Tensor, xr: torch.Tensor, xd: torch.Tensor, examples: int) -> int:
    """m when the rows of dim 0 are example-major blocks of m that move with the examples (0 when they are not)."""
    n = xa.shape[0] if xa.dim() > 0 else 0
    m = n // examples if n and n % examples == 0 else 0
    return m if m and _close(xr, xa.roll(m, 0)) and _close(xd, _copy_block(xa, m)) else 0


def _seq_first(*views: torch.Tensor) -> list[torch.Tensor]:
    return [t.movedim(1, 0) for t in views]


def _which(labels: list[str], j: int) -> str:
    return f" (argument {labels[j]!r})" if len(labels) > 1 else ""


def _describe(key: CallKey, names: dict[nn.Module, str]) -> str:
    module, index = key
    call = f", call {index + 1} in the forward" if index else ""
    return f"{names.get(module, 'model') or 'model'} ({type(module).__name__}{call})"


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to _RTOL of the largest entry (NaN equal to NaN). torch.allclose(equal_nan=True) was ~10x slower than
    the forward itself on a WRN's activations."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b) or a.numel() == 0:
        return True
    if not a.is_floating_point():
        return False
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fa, fb) or not torch.equal(a[~fa].nan_to_num(nan=0.0), b[~fb].nan_to_num(nan=0.0)):
        return False  # non-finite entries must match exactly (NaN with NaN, inf with the same inf)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    a, b = torch.where(fa, a, zero), torch.where(fb, b, zero)
    scale = max(float(a.abs().max()), 1e-30)
    return float((a - b).abs().max()) <= _RTOL * scale


def _copy_block(x: torch.Tensor, m: int) -> torch.Tensor:
    x = x.clone()
    x[:m] = x[m : 2 * m]
    return x


def mixing_in_training_mode(
    run: Callable[[Any, Recorder], Any],
    args: Any,
    examples: int,
    augmult: int,
    layout: dict[CallKey, CallLayout],
    names: dict[nn.Module, str],
    outputs: list[Batched | None],
) -> str | None:
    """Why the training forward (the modules' training flags as the forward found them) cannot be trained on because
    it mixes the examples where the eval-mode probe saw no mixing (or None).

    The probe runs in eval mode (dropout masks do not roll with the examples), but a module may mix examples only in
    training mode: batch statistics taken only then, mixup or a shuffle inside the model. Per-example gradients do
    not exist for such a forward and DP-SGD's bound on one example's influence would not hold, so it is refused (by
    the engine, after the forward: a layer's own, more specific refusal comes first). The outputs are compared where
    the probe found their rows per example (``_output_layout``): an output laid out otherwise (time-major, a
    statistic, a loss) has nothing to compare, so mixing there, and mixing gated by a random draw that said "no" in
    these forwards, is not seen.

    The forwards run in the training flags the forward found, each from the same RNG state (``run`` resets the
    generators), so their random draws, dropout masks included, are the same. After one on the batch as given, each
    of the others changes the examples whose bit k (k < ceil(log2 N)) is 1, or those whose bit k is 0, to a copy of
    example i + 2^k (mod N); the examples it leaves as they are must keep their rows in every batched input of a
    wrapped call and in every per-example output. Any two examples i != j differ in some bit, so some forward
    changes i and not j: whatever mixing makes j's rows depend on i is seen there. Identical examples only make
    fewer rows change, which is never refused. The forwards take the first ``TRAINING_CHECK_EXAMPLES`` examples of
    the batch (the layout does not depend on the batch size): 7 forwards of 8 examples, whatever N; the whole batch
    where those fail (a tensor argument sized by the batch elsewhere than in dim 0: an attention mask of N * heads
    rows, an RNN's first state).
    """
    pairwise = (run, augmult, layout, names, outputs)
    if examples > TRAINING_CHECK_EXAMPLES:
        rows = TRAINING_CHECK_EXAMPLES * augmult
        first = map_batch(args, examples * augmult, lambda t: t[:rows])
        try:
            return _pairwise(first, TRAINING_CHECK_EXAMPLES, *pairwise)
        except Exception:  # noqa: BLE001 - the model cannot run on the first examples alone: the whole batch
            pass
    return _pairwise(args, examples, *pairwise)


def _pairwise(
    args: Any,
    examples: int,
    run: Callable[[Any, Recorder], Any],
    augmult: int,
    layout: dict[CallKey, CallLayout],
    names: dict[nn.Module, str],
    outputs: list[Batched | None],
) -> str | None:
    """``mixing_in_training_mode`` on ``args``, a micro-batch of ``examples`` examples."""
    rows = examples * augmult
    idx = torch.arange(examples)

    def changed(k: int, side: int) -> tuple[torch.Tensor, Any]:
        """The examples kept as they are, and the batch with the others replaced (bit k of their index == side)."""
        moves = (idx >> k) & 1 == side
        src = torch.where(moves, (idx + (1 << k)) % examples, idx)

        def change(t: torch.Tensor) -> torch.Tensor:
            return t.view(examples, augmult, *t.shape[1:])[src.to(t.device)].reshape(t.shape)

        return ~moves, map_batch(args, rows, change)

    def forward(a: Any) -> tuple[Recorder, Any]:
        rec = Recorder(examples, rows)
        return rec, run(a, rec)

    rec_a, out_a = forward(args)
    keys = [k for k, _, _ in rec_a.calls]
    for k, side in ((k, side) for k in range((examples - 1).bit_length()) for side in (1, 0)):
        kept, altered = changed(k, side)
        rec, out = forward(altered)
        if [c for c, _, _ in rec.calls] != keys or any(c not in layout for c in keys):
            return (
                "fastdp: in training mode the model calls its layers in another order than in eval mode, or in "
                "another order when examples of the micro-batch change, so the engine cannot tell which rows of each "
                "layer belong to which example. Make the sequence of layer calls independent of the data and of "
                "train/eval mode."
            )
        for (key, xas, labels), (_, xds, _) in zip(rec_a.calls, rec.calls, strict=True):
            for j, (xa, xd, prov) in enumerate(zip(xas, xds, layout[key], strict=True)):
                if not isinstance(prov, Batched):
                    continue
                if prov.dim is not None:
                    xa, xd = _seq_first(xa, xd)
                if not _unchanged(xa, xd, kept):
                    return (
                        f"fastdp: in training mode, the input{_which(labels, j)} of {_describe(key, names)} changes "
                        "for examples that did not change when others did (in eval mode it does not): the forward "
                        "mixes the examples (batch statistics taken in training mode, mixup or a shuffle inside the "
                        "model, random draws that depend on the data or come from a generator of the model's own). "
                        "Per-example gradients do not exist for it, and DP-SGD's guarantee would not hold. Make the "
                        "training forward treat every example on its own."
                    )
        ta, tb = _tensors(out_a), _tensors(out)
        if len(ta) == len(tb) == len(outputs):
            for xa, xd, prov in zip(ta, tb, outputs, strict=True):
                if prov is not None and xa.shape == xd.shape and xa.dim() > (prov.dim or 0):
                    if not _unchanged(xa.movedim(prov.dim or 0, 0), xd.movedim(prov.dim or 0, 0), kept):
                        return output_mixing("in training mode")
    return None


def _output_layout(a: Any, r: Any, d: Any, examples: int) -> tuple[list[Batched | None], bool]:
    """Per tensor output of the probe's forwards A, R (examples rolled) and D (example 0 replaced by example 1):
    ``Batched(m, dim)`` where its rows (in dim 0, else dim 1: a sequence-first output, an RNN's h_n) are m per
    example, example-major, and only example 0's change, None where its rows do not move with the examples (a
    time-major flattening, a statistic for logging, a loss: nothing to compare). And whether some output's rows move
    with the examples but example 0's change reaches other examples' rows: the forward mixes them."""
    ta, tr, td = _tensors(a), _tensors(r), _tensors(d)
    if not len(ta) == len(tr) == len(td):
        return [None] * len(ta), False
    layout: list[Batched | None] = []
    mixed = False
    for xa, xr, xd in zip(ta, tr, td, strict=True):
        found = None
        for dim in (0, 1):
            if xa.dim() <= dim or not xa.shape == xr.shape == xd.shape or xa.shape[dim] % examples:
                continue
            va, vr, vd = (t.movedim(dim, 0) for t in (xa, xr, xd))
            m = va.shape[0] // examples
            if not _close(vr, va.roll(m, 0)):
                continue
            if _close(vd, _copy_block(va, m)):
                found = Batched(m, dim if dim else None)
            else:
                mixed = True
            break
        layout.append(found)
    return layout, mixed


def output_mixing(mode: str = "") -> str:
    """The refusal of a forward whose per-example outputs move for examples that did not change."""
    when = f" {mode}" if mode else ""
    return (
        f"fastdp:{when} the model's output changes for examples that did not change when others did: the forward "
        "mixes the examples after its last layer with parameters or inside a layer (batch statistics, mixup, a "
        "shuffle, bags or windows that cross examples). Each example's loss would then reach the other examples' "
        "gradients, and DP-SGD's guarantee would not hold. Make the forward treat every example on its own."
    )


def _unchanged(a: torch.Tensor, b: torch.Tensor, kept: torch.Tensor) -> bool:
    """Whether ``b`` equals ``a`` in the rows of the ``kept`` examples, for a tensor of N * m rows (per example,
    example-major); a tensor that is not per example (a loss over the batch) has nothing to compare."""
    examples = kept.shape[0]
    if a.dim() == 0 or a.shape[0] % examples or a.shape != b.shape:
        return True
    rows = kept.to(a.device).repeat_interleave(a.shape[0] // examples)
    return _close(a[rows], b[rows])


def _tensors(out: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _same_output(a: Any, b: Any) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return len(ta) == len(tb) and all(_close(x, y) for x, y in zip(ta, tb, strict=True))


def _only_example_zero_moved(a: Any, b: Any, examples: int) -> bool:
    """Whether the model output ``b`` equals ``a`` outside example 0's rows (every output must be per example)."""
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb) or not ta:
        return False
    for x, y in zip(ta, tb, strict=True):
        if x.dim() == 0 or x.shape[0] % examples or x.shape != y.shape:
            return False  # an output that is not per example (a loss over the batch): nothing to read per example
        m = x.shape[0] // examples
        if not _close(x[m:], y[m:]):
            return False
    return True


class Quiet:
    """What ``quiet_model`` hands its block: the modules' training flags as the forward found them, and a way back
    to the RNG states it found."""

    def __init__(self, training: dict[nn.Module, bool]) -> None:
        self.training = training
        self._cpu_rng = torch.get_rng_state()
        self._cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self._py_rng = random.getstate()
        numpy = sys.modules.get("numpy")  # its global RNG, where the model's code may draw (not imported for it)
        self._np_rng = (numpy, numpy.random.get_state()) if numpy is not None else None

    @property
    def trains(self) -> bool:
        return any(self.training.values())

    def reset_rng(self) -> None:
        """torch's CPU and CUDA generators, Python's and numpy's global ones as they were (a generator the model owns
        is not reset: its draws differ between the probe's forwards, as data-dependent ones would)."""
        torch.set_rng_state(self._cpu_rng)
        if self._cuda_rng is not None:
            torch.cuda.set_rng_state_all(self._cuda_rng)
        random.setstate(self._py_rng)
        if self._np_rng is not None:
            self._np_rng[0].random.set_state(self._np_rng[1])

    @contextmanager
    def as_found(self) -> Iterator[None]:
        """The modules' training flags as the forward found them (still no gradients), eval mode again after."""
        for m, flag in self.training.items():
            m.training = flag
        try:
            yield
        finally:
            for m in self.training:
                m.training = False


@contextmanager
def quiet_model(model: nn.Module) -> Iterator[Quiet]:
    """Eval mode, no gradients, and the RNG states, training flags, buffers and modules' plain numbers restored
    afterwards.

    torch's fused transformer kernels (``nn.TransformerEncoderLayer``'s fast path) are off meanwhile: they run in eval
    mode without gradients and bypass the submodules' forwards, so the probe would not see the calls that training
    makes.
    """
    quiet = Quiet({m: m.training for m in model.modules()})
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    # plain numbers and flags a forward may keep on its modules (a step counter): put back, like the buffers
    scalars = [(m, k, v) for m in model.modules() for k, v in vars(m).items() if type(v) in (int, float, bool)]
    # by module: the tensor each name holds and its value (a forward may rebind a buffer, not only update it)
    buffers = [
        (m, name, b, b.detach().clone()) for m in model.modules() for name, b in m._buffers.items() if b is not None
    ]
    model.eval()
    try:
        with torch.no_grad():
            yield quiet
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, flag in quiet.training.items():
            m.training = flag
        with torch.no_grad():
            for m, name, b, saved in buffers:
                m._buffers[name] = b
                b.copy_(saved)
        for m, k, v in scalars:
            setattr(m, k, v)
        quiet.reset_rng()
