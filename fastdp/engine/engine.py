"""The per-example clipping engine: wraps a model's layers, plans them, and clips at the end of each backward.

Each ``loss.backward()`` is one micro-batch. While autograd runs, every wrapped layer's backward returns its
input gradient and leaves per-parameter ``Contribution``s; when the backward is over (an autograd
end-of-pass callback) the engine sums the per-example squared norms over all layers, computes the clip
factors, finishes every layer's clipped sum and adds it to ``summed``. Noise and the division by the expected
batch size belong to the optimizer step.
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.utils._pytree import tree_flatten

from fastdp.backends import resolve_backend
from fastdp.engine.binding import Binding, CallError
from fastdp.engine.clipping import get_clipping
from fastdp.engine.contributions import Summed, reducing_with
from fastdp.engine.flat import Flat
from fastdp.engine.interface import Contribution, LayerCall, LayerFunction, unflatten_outputs
from fastdp.engine.norm_groups import grouped_sq_norms
from fastdp.engine.owned_params import OwnedParams
from fastdp.engine.planning import Planner
from fastdp.engine.precision import full_fp32
from fastdp.engine.provenance import (
    Batched,
    CallLayout,
    ProvenanceError,
    Recorder,
    Shared,
    feed,
    first_batch_tensor,
    mixing_in_training_mode,
    probe,
    quiet_model,
    signature,
)
from fastdp.engine.stacks import gather_stacks
from fastdp.engine.workspace import Workspace
from fastdp.engine.wrapping import Forward, Hook
from fastdp.rules import fallback_rule, known_strategies, rule_for
from fastdp.rules.base import Rule

#: modules that mix the examples of a batch: per-example gradients do not exist for them
_EXAMPLE_MIXING = (nn.modules.batchnorm._BatchNorm,)
#: modules that can keep running statistics of the batches they see in training mode
_RUNNING_STATS = (nn.modules.batchnorm._NormBase,)

_REDUCTIONS = ("mean", "sum")

#: autotuning times only the strategies whose modelled cost is within this factor of the cheapest one's
_PRUNE = 5.0


class GradSampleEngine:
    """Attach exact per-example clipping to ``model``.

    Args:
        model: the model; its layers are wrapped in place (``detach()`` restores them).
        max_grad_norm: the clipping bound C.
        augmult: augmentation multiplicity K: rows i*K..i*K+K-1 are example i's views; its gradient is their mean.
        loss_reduction: "mean" if the loss is the mean over the rows of the micro-batch, "sum" if it is their sum.
        clipping: "flat" (min(1, C/||g||)) or "automatic" (C / (||g|| + clip_gamma)).
        clip_gamma: the stabiliser of automatic clipping.
        memory_budget: what the plan may hold for the clip step (per-example gradients, or layer inputs and
            output grads): "auto" (default) lets each layer hold twice its own input; a number is a total in
            bytes at the micro-batch size the plan is made for; None is no limit.
        strategy: force one strategy on every layer that offers it (testing and benchmarking); None to plan.
        autotune: plan by timing every candidate once per layer and input shape (on the real input and a
            random output gradient); False ranks them by the analytic cost model of fastdp.engine.costs.
        backend: whose kernels the plan may use ("auto", "torch", "cpp", ...; fastdp.backends): its per-layer norm
            and book-keeping kernels become ``fused_*`` strategies (fastdp.backends), its
            clip-and-reduce finishes the kept per-example gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_grad_norm: float,
        augmult: int = 1,
        loss_reduction: str = "mean",
        clipping: str = "flat",
        clip_gamma: float = 0.01,
        memory_budget: float | str | None = "auto",
        strategy: str | None = None,
        autotune: bool = True,
        backend: str = "auto",
    ) -> None:
        if int(augmult) != augmult or augmult < 1:
            raise ValueError(f"augmult must be a positive integer, got {augmult}")
        if loss_reduction not in _REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {_REDUCTIONS}, got {loss_reduction!r}")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.augmult = int(augmult)
        self.loss_reduction = loss_reduction
        self.clip_fn = get_clipping(clipping, float(max_grad_norm), float(clip_gamma))
        self.clipping = clipping
        self.clip_gamma = float(clip_gamma)
        if strategy is not None and strategy not in known_strategies():
            raise ValueError(
                f"unknown strategy {strategy!r}; the rules offer {', '.join(sorted(known_strategies()))} (None plans "
                "each layer)"
            )
        self.strategy = strategy
        self.backend = resolve_backend(backend, device=_device_of(model))
        self.reducer = self.backend.reducer()
        self.kernels = self.backend.layer_kernels()
        self.planner = Planner(
            self, self.kernels, self.reducer, memory_budget, strategy, autotune, backend_name=self.backend.name
        )

        self.summed: dict[nn.Parameter, torch.Tensor] = {}
        self.norms: list[torch.Tensor] = []
        #: non-finite examples: of the last logical batch (a device tensor once a batch was popped) and in all
        self.nonfinite_last: torch.Tensor | int = 0
        self._nonfinite_total: torch.Tensor | int = 0
        #: the running clipped sums of this logical batch's groups (flat buffers, stacks), with the views ``summed``
        #: holds of them
        self._group_sums: dict[tuple, tuple[torch.Tensor, dict[nn.Parameter, torch.Tensor]]] = {}
        #: the clip step's copies, in the same memory every backward where the device does not cache (the CPU)
        self.workspace = Workspace()
        #: the provenance of every wrapped call, by the model input's signature (fastdp.engine.provenance), and why a
        #: forward of that signature mixes the examples (None when it does not: see ``_exit``)
        self.layouts: dict[tuple, dict[tuple[nn.Module, int], CallLayout]] = {}
        self.refusals: dict[tuple, str | None] = {}
        self._pass: dict[nn.Parameter, list[Contribution]] | None = None
        self._pass_examples = 0
        self._pass_task = -1  # the autograd graph task (one backward call) that began the pass
        self._pass_forward = None  # the model forward its layer calls belong to
        self._complete: set[nn.Module] = set()  # layers whose rule was seen to cover all their trainable parameters
        self._bypass = False
        self._micro: _MicroBatch | None = None
        self._depth = 0
        self._recorder: Recorder | None = None
        self._buffers_checked = False
        self._strategy_checked = False
        self._buffer_versions: dict[str, tuple[int, int]] = {}
        self._buffer_copies: list[torch.Tensor] | None = None
        self._wrapped: list[nn.Module] = []
        self._hooks: list = []
        self._names = {m: n for n, m in model.named_modules()}
        self.params = [p for p in model.parameters() if p.requires_grad]
        _refuse_running_statistics(model)
        #: containers' own parameters (a ViT's cls_token): split per example where the container uses them
        self.owned = OwnedParams(self)
        self._attach(model, prefix="")
        self._hooks += self.owned.guard([m for m in self._wrapped if m not in self.owned.markers])
        for name, p in model.named_parameters():
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(_leak_guard(name)))
        self._hooks.append(model.register_forward_pre_hook(Hook(self._enter), with_kwargs=True))
        self._hooks.append(model.register_forward_hook(Hook(self._exit), always_call=True))

    # ------------------------------------------------------------------ wrapping
    def _attach(self, module: nn.Module, prefix: str) -> None:
        if isinstance(module, _EXAMPLE_MIXING):
            raise ValueError(
                f"{prefix or 'model'} is a {type(module).__name__}, which mixes the examples of a batch, so "
                "per-example gradients (and DP-SGD's guarantee) do not exist for it. Replace it, e.g. with "
                "fastdp.nn.replace_batchnorm(model), which swaps every BatchNorm for a GroupNorm."
            )
        _refuse_hook_reparametrization(module, prefix)
        if parametrize.is_parametrized(module) and any(p.requires_grad for p in module.parameters()):
            # a weight computed from other parameters on every access (weight_norm, orthogonal, ...): the rules read
            # the weight as a tensor, torch.func differentiates through the parametrization
            warnings.warn(
                f"fastdp: {prefix or 'model'} ({type(module).__name__}) has a parametrized weight "
                "(torch.nn.utils.parametrize); its subtree goes through the exact but slow torch.func fallback.",
                stacklevel=3,
            )
            self._wrap(module, fallback_rule)
            return
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own:
            rule = rule_for(module)
            if rule is None and any(p.requires_grad for c in module.children() for p in c.parameters()):
                self.owned.adopt(module, prefix)  # its children keep their own rules (fastdp.engine.owned_params)
            elif rule is None:
                rule = fallback_rule
                warnings.warn(
                    f"fastdp: {prefix or 'model'} ({type(module).__name__}) has no fast per-example rule; its "
                    "subtree goes through the exact but slow torch.func fallback.",
                    stacklevel=3,
                )
                self._wrap(module, rule)
                return
            else:
                self._wrap(module, rule)
                if rule.covers_children:
                    return
        for name, child in module.named_children():
            self._attach(child, f"{prefix}.{name}" if prefix else name)

    def _wrap(self, module: nn.Module, rule: Rule) -> None:
        rule.check(module)
        module.forward = Forward(module, partial(self._run, rule))
        self._wrapped.append(module)

    def detach(self) -> None:
        """Restore the model's original forwards and remove the engine's hooks."""
        for m in self._wrapped:
            del m.forward
        for h in self._hooks:
            h.remove()
        self._wrapped, self._hooks = [], []
        self.workspace.clear()

    # ------------------------------------------------------------------ the micro-batch of a forward
    def _enter(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the model: how many examples the micro-batch holds, and where each wrapped call's
        input comes from (probed once per input signature)."""
        if self._recorder is not None or self._bypass:
            return  # a probe forward, or the fallback's recomputation
        self._depth += 1
        if self._depth > 1 or not torch.is_grad_enabled():
            return
        try:
            self._micro = self._micro_batch(args, kwargs)
            self._buffer_versions = _buffer_versions(model)
            if not self._buffers_checked and model.training:
                self._buffer_copies = [b.detach().clone() for _, b in model.named_buffers()]
        except BaseException:
            self._depth -= 1
            raise

    def _exit(self, model: nn.Module, args: tuple, output) -> None:
        if self._recorder is not None or self._bypass:
            return
        self._depth = max(0, self._depth - 1)
        if self._depth or self._micro is None:
            return
        micro, self._micro = self._micro, None
        self._check_forced_strategy()
        changed = [n for n, v in _buffer_versions(model).items() if self._buffer_versions.get(n) != v]
        copies, self._buffer_copies = self._buffer_copies, None
        if changed and model.training:
            if copies is not None:  # the first forward: put back what it computed from the private batch
                with torch.no_grad():
                    for (_, b), saved in zip(model.named_buffers(), copies, strict=True):
                        b.copy_(saved)
            raise RuntimeError(
                f"fastdp: the forward updated the buffer(s) {', '.join(changed)} from the private batch. Buffers are "
                "not noised: their values (running statistics, say) would reach state_dict() and every checkpoint "
                "without any privacy guarantee. Compute them without the private data (from public data, or "
                "fixed), or do not keep them (e.g. track_running_stats=False)."
            )
        self._buffers_checked = self._buffers_checked or model.training
        if micro.refusal is not None:
            # raised here, after the forward, so that a layer's own refusal (more specific) and the buffers' come
            # first; the output never reaches a loss
            raise ProvenanceError(micro.refusal)

    def _check_forced_strategy(self) -> None:
        """After the first planned forward: a forced strategy that no layer offers is said once, not silently planned
        around (layers that offer it run it; the others are planned)."""
        if self.strategy is None or self._strategy_checked or not self.planner.plans:
            return
        self._strategy_checked = True
        if not any(choice == self.strategy for _, choice in self.planner.plans.values()):
            offered = sorted({k for costs in self.planner.costs.values() for k in costs})
            warnings.warn(
                f"fastdp: strategy={self.strategy!r} was forced, but no layer of this model offers it for these inputs "
                f"and backend {self.backend.name!r} (they offer: {', '.join(offered)}); every layer was planned. "
                "Force one of those, or pass strategy=None.",
                stacklevel=3,
            )

    def _micro_batch(self, args: tuple, kwargs: dict) -> _MicroBatch:
        x = first_batch_tensor((args, kwargs))
        if x is None:
            raise ValueError(
                "fastdp: the model was called without a tensor argument that has a batch dimension, so the engine "
                "cannot tell how many examples the micro-batch holds. Pass the batch (examples in dim 0) as a tensor "
                "argument of the model."
            )
        rows = x.shape[0]
        if rows == 0:
            raise ValueError(
                "fastdp: an empty micro-batch (0 rows) reached the model with gradients enabled. An empty Poisson "
                "batch needs no forward or backward: call only opt.step() for it (it adds the noise)."
            )
        if rows % self.augmult:
            raise ValueError(
                f"fastdp: a micro-batch of {rows} rows is not a whole number of examples with augmult={self.augmult}; "
                "pass the K views of every example as consecutive rows."
            )
        examples = rows // self.augmult
        if examples == 1:
            if not self.layouts:  # no forward of several examples has shown the first argument to hold the batch
                _refuse_larger_argument(x, (args, kwargs))
            return _MicroBatch(examples, None)  # every row belongs to the one example: nothing to attribute
        # with whether any module trains: the probe checks the training forward only then (a refusal of it says
        # nothing of an evaluation with gradients of the same shapes)
        key = (signature((args, kwargs), rows), any(m.training for m in self.model.modules()))
        layout = self.layouts.get(key)
        if layout is None:
            layout, self.refusals[key] = self._probe(args, kwargs, examples)
            self.layouts[key] = layout
        return _MicroBatch(examples, layout, self.refusals[key])

    def _probe(self, args: tuple, kwargs: dict, examples: int) -> tuple[dict, str | None]:
        with quiet_model(self.model) as quiet:

            def run(a, recorder: Recorder):
                quiet.reset_rng()  # every probe forward draws what the others draw (dropout masks, say)
                self._recorder = recorder
                try:
                    return self.model(*a[0], **a[1])
                finally:
                    self._recorder = None

            layout, outputs, refusal = probe(run, (args, kwargs), examples, self.augmult, self._names)
            if refusal is None and quiet.trains:  # in eval mode the probe's own runs saw what there is to see
                with quiet.as_found():
                    refusal = mixing_in_training_mode(run, (args, kwargs), examples, self.augmult, layout, self._names,
                                                      outputs)  # fmt: skip
        return layout, refusal

    def _run(self, rule: Rule, module: nn.Module, args: tuple, kwargs: dict):
        # frozen layers need no attribution (the probe skips them too); without gradients there is nothing to clip
        if self._bypass or not rule.params(module) or (self._recorder is None and not torch.is_grad_enabled()):
            return type(module).forward(module, *args, **kwargs)
        try:
            binding = rule.bind(module, args, kwargs)
        except CallError as e:
            raise ValueError(f"fastdp: {self._names.get(module) or 'model'} ({type(module).__name__}): {e}") from None

        def original(tensors: list[torch.Tensor]):
            a, k = binding.arguments(tensors)
            return type(module).forward(module, *a, **k)

        if self._recorder is not None:
            return self._recorder(module, binding, original, lambda out: rule.out_dims(module, out))
        micro = self._micro
        if micro is None and torch._C._current_graph_task_id() != -1:
            raise ValueError(
                f"fastdp: {self._names.get(module) or 'model'} ({type(module).__name__}) was called during a backward: "
                "activation checkpointing (torch.utils.checkpoint) recomputes layers there, which fastdp does not "
                "support (the recomputed calls belong to no forward of the model). Remove the checkpointing around "
                "layers with trainable parameters."
            )
        if micro is None:
            raise ValueError(
                f"fastdp: {self._names.get(module) or 'model'} ({type(module).__name__}) was called with gradients "
                "enabled outside a forward of the model the optimizer wraps. Call the model itself (model(x)): its "
                "input tells the engine how many examples the micro-batch holds."
            )
        tensors, rows, moved = micro.rows_of(module, binding, self)
        m = next((r for r, data in zip(rows, binding.data, strict=True) if r is not None and data), self.augmult)
        call = LayerCall(
            self, rule, module, strategy="", examples=micro.examples, forward=micro, rows_per_example=m,
            input_rows=tuple(rows), binding=binding,
        )  # fmt: skip
        if moved:  # a position-wise layer fed (T, N, ...): run it on (N, T, ...)
            tensors = [tensors[0].movedim(moved, 0)]
        try:
            if len(tensors) == 1:
                tensors = [rule.prepare(call, tensors[0])]
            call.strategy = self.planner.plan(call, tensors)
            out = LayerFunction.apply(call, len(tensors), *tensors, *rule.params(module))
        except CallError as e:
            raise ValueError(f"fastdp: {self._names.get(module) or 'model'} ({type(module).__name__}): {e}") from None
        # moved back as the layer would have returned it, contiguous: a .view() of it must work as on the layer's own
        return out.movedim(0, moved).contiguous() if moved else unflatten_outputs(call, out)

    # ------------------------------------------------------------------ planning (fastdp.engine.planning)
    @property
    def plans(self) -> dict[nn.Module, tuple[tuple, str]]:
        """The strategy each planned layer runs, with the input key it was planned for."""
        return self.planner.plans

    @property
    def plan_costs(self) -> dict[nn.Module, dict]:
        """The candidates each plan was chosen from, with their modelled cost (for inspection)."""
        return self.planner.costs

    def plan_state(self) -> dict[str, tuple]:
        """The chosen strategies by module name, so that a resumed run computes exactly the same way."""
        return self.planner.state(self._names)

    def load_plan_state(self, state: dict[str, tuple]) -> None:
        self.planner.load_state(state, dict(self.model.named_modules()), self.augmult)

    # ------------------------------------------------------------------ backward
    def record(self, call: LayerCall, saved, grad_out: torch.Tensor) -> None:
        """Called from a wrapped layer's backward: collect its contributions for this micro-batch."""
        try:
            if call.consumed:
                raise RuntimeError(
                    "fastdp: a backward ran twice through the same forward (retain_graph=True?). Each example "
                    "would be counted twice and the privacy guarantee would be wrong; run a new forward per backward."
                )
            call.consumed = True
            task = torch._C._current_graph_task_id()
            if self._pass is not None and task != self._pass_task:
                # the backward that began this pass raised before its end, so its _finalize never ran: what it
                # recorded is dropped (it clipped nothing and reached no gradient), else this backward would add to
                # it and queue no finalize of its own
                warnings.warn(
                    "fastdp: an earlier backward raised before it finished; the per-example gradients it had "
                    "recorded are discarded (that micro-batch contributes nothing).",
                    stacklevel=2,
                )
                self._pass = None
            if self._pass is None:
                self._pass, self._pass_examples, self._pass_task = {}, call.examples, task
                self._pass_forward = call.forward
                torch.autograd.Variable._execution_engine.queue_callback(self._finalize)
            elif not _same_forward(call, self._pass_forward, self._pass_examples):
                # row i of one forward and row i of another need not be the same example: clipped together they
                # would share one bound (two examples in one clip), clipped apart one example could count twice
                raise ValueError(
                    f"fastdp: one backward went through two forwards of the model, micro-batches of "
                    f"{self._pass_examples} and {call.examples} examples ({self._names.get(call.module) or 'model'} "
                    "was in the second). Run one backward per forward (sum the losses of one micro-batch only), or "
                    "pass the batches as one forward; several views of one example go in one forward with augmult."
                )
            self._pass_forward = self._pass_forward or call.forward
            with full_fp32():
                contributions = call.rule.contributions(call, saved, grad_out, call.rows_per_example)
            if call.module not in self._complete:
                self._check_complete(call, contributions)
            for p, c in contributions:
                self._pass.setdefault(p, []).append(c)
        except BaseException:
            self._pass = None
            raise

    def _check_complete(self, call: LayerCall, contributions: list) -> None:
        """Once per layer: its rule left a contribution for every trainable parameter it took (a parameter the rule
        does not know, added to the module by other code, would otherwise get noise only, silently)."""
        if isinstance(call.rule, Rule):
            got = {id(p) for p, _ in contributions}
            missing = [p for p in call.rule.params(call.module) if id(p) not in got]
            if missing:
                names = {id(p): n for n, p in call.module.named_parameters()}
                raise RuntimeError(
                    f"fastdp: {self._names.get(call.module) or 'model'} ({type(call.module).__name__}): its rule "
                    f"({type(call.rule).__name__}) computed no per-example gradient for its trainable parameter(s) "
                    f"{', '.join(repr(names.get(id(p), '?')) for p in missing)}; they would never be trained. Freeze "
                    "them, or give the module a rule that knows them (fastdp.rules.register_rule)."
                )
        self._complete.add(call.module)

    def _finalize(self) -> None:
        contributions, examples = self._pass, self._pass_examples
        self._pass = None
        if not contributions:
            return
        # per-row gradients -> per-example: g_i = scale * sum of example i's row gradients; the mean over its K
        # views and the loss reduction's 1/rows (rows = N*K model-input rows) are folded into one scale applied to
        # norms and clip weights
        scale = examples if self.loss_reduction == "mean" else 1.0 / self.augmult
        with full_fp32():
            merged = {p: cs[0] if len(cs) == 1 else Summed(cs) for p, cs in contributions.items()}
            # small kept gradients side by side in one buffer, same-shape book-keeping layers stacked: each group
            # costs the launches of one
            groups = Flat.gather(merged)
            grouped = {p for g in groups for p in g.params}
            stackable = {p: c for p, c in merged.items() if p not in grouped}
            groups += gather_stacks(stackable, self.workspace.buffers("stack"))
            grouped = {p for g in groups for p in g.params}
            rest = {p: c for p, c in merged.items() if p not in grouped}
            sqs = [g.sq_norm() for g in groups] + grouped_sq_norms(rest.values())
            sq = sqs[0] if len(sqs) == 1 else torch.stack(sqs).sum(0)
            norms = sq.sqrt() * scale
            # branch-free: a non-finite example gets weight 0, and every contribution reads a zero-weight example's
            # rows as exact zeros (the Contribution contract); nothing here asks the host whether one occurred
            factors = self.clip_fn(norms, self.max_grad_norm, self.clip_gamma)
            weights = torch.where(_finite(norms), factors * scale, 0.0)
            with reducing_with(self.reducer, weights):
                for g in groups:
                    self._add_group(g, g.weighted_sum(weights))
                for p, c in rest.items():
                    self._add(p, c.weighted_sum(weights).to(p.dtype).view_as(p))
        self.norms.append(norms.detach())

    def _add(self, p: nn.Parameter, s: torch.Tensor) -> None:
        prev = self.summed.get(p)
        self.summed[p] = s if prev is None else prev + s

    def _add_group(self, group, total: torch.Tensor) -> None:
        """Add the clipped sums of a group of parameters (a flat buffer, a stack) computed as one tensor: in place,
        one launch, when the previous micro-batch's sums of the same parameters are still views of one tensor (the
        usual case), else parameter by parameter."""
        views = group.split(total)
        acc = self._group_sums.get(group.params)
        if acc is not None and all(self.summed.get(p) is v for p, v in acc[1].items()):
            acc[0].add_(total)
            return
        fresh = all(p not in self.summed and p.dtype == v.dtype for p, v in views.items())
        for p, v in views.items():
            self._add(p, v.to(p.dtype))
        if fresh:
            self._group_sums[group.params] = (total, views)

    # ------------------------------------------------------------------ logical batch
    def pop(self) -> tuple[dict[nn.Parameter, torch.Tensor], torch.Tensor]:
        """Hand the clipped sums and norms of the logical batch to the optimizer and start a new one."""
        self._refuse_new_trainable()
        summed, self.summed, self._group_sums = self.summed, {}, {}
        norms = torch.cat(self.norms) if self.norms else torch.zeros(0)
        self.norms = []
        # counted on the device: reading it is the caller's choice (a host read of a GPU tensor drains the queue)
        self.nonfinite_last = _count_nonfinite(norms)
        self._nonfinite_total = self._nonfinite_total + self.nonfinite_last
        return summed, norms

    def _refuse_new_trainable(self) -> None:
        """The parameters clipped are those trainable when the engine was built (their layers wrapped, their ordinary
        gradients guarded): one unfrozen since would train on its raw gradient, unclipped. Freezing is fine (the
        rules and the steps read ``requires_grad`` when they run)."""
        managed = {id(p) for p in self.params}
        new = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in managed]
        if new:
            name, p = new[0]
            raise RuntimeError(
                f"fastdp: parameter {name!r} (shape {tuple(p.shape)}) is trainable, but was frozen when the DP "
                f"optimizer was built{f' (and {len(new) - 1} more)' if len(new) > 1 else ''}: its layer was not "
                "prepared for per-example gradients, so its gradient would reach the update unclipped. Set "
                "requires_grad before building the optimizer (freezing parameters later is fine; unfreezing is not)."
            )

    @property
    def nonfinite_examples(self) -> int:
        """Examples whose gradient was non-finite (they contributed zero) since the start; reads the device."""
        pending = sum(int(_count_nonfinite(n)) for n in self.norms)
        return int(self._nonfinite_total) + pending

    @nonfinite_examples.setter
    def nonfinite_examples(self, value: int) -> None:
        self._nonfinite_total = int(value)

    def discard(self) -> None:
        """Forget the clipped sums of the current logical batch (what zero_grad does to ordinary grads)."""
        self.summed, self.norms, self._group_sums = {}, [], {}


class _MicroBatch:
    """One forward's micro-batch: N examples, the probed provenance of each wrapped call (None when N == 1), why
    the probe found it mixes the examples (None: it does not), and how many times each module has been called so
    far."""

    def __init__(self, examples: int, layout: dict | None, refusal: str | None = None) -> None:
        self.examples, self.layout, self.refusal = examples, layout, refusal
        self.count: dict[nn.Module, int] = {}

    def rows_of(
        self, module: nn.Module, binding: Binding, engine: GradSampleEngine
    ) -> tuple[list[torch.Tensor], list[int | None], int]:
        """The layer's inputs as the engine feeds them (fastdp.engine.provenance.feed: shared ones expanded to N*K
        rows when nothing else is batched), each one's rows per example (None: shared and broadcast), and the
        dimension a position-wise layer's one input holds the batch in when that is not dim 0 (else 0)."""
        index = self.count.get(module, 0)
        self.count[module] = index + 1
        K, name = engine.augmult, engine._names.get(module) or "model"
        if self.layout is None:  # one example owns every row
            pairs = zip(binding.tensors, binding.dims, strict=True)
            layout = tuple(Batched(t.shape[d]) if t.dim() > d else Shared() for t, d in pairs)
            return (*feed(layout, binding, K, K), 0)
        layout = self.layout.get((module, index))
        if layout is None or len(layout) != len(binding.tensors):
            raise ProvenanceError(
                f"fastdp: {name} ({type(module).__name__}) was called {index + 1} time(s) in this forward, more than "
                "when the engine probed the model for this input shape (in eval mode), or with other tensor "
                "arguments. Make the layer calls independent of the data and of train/eval mode."
            )
        for j, (x, prov, d) in enumerate(zip(binding.tensors, layout, binding.dims, strict=True)):
            if not isinstance(prov, Batched):
                continue
            d = d if prov.dim is None else prov.dim
            m = prov.rows_per_example
            if x.dim() <= d or x.shape[d] != self.examples * m:
                which = f" ({binding.describe(j)})" if len(binding.tensors) > 1 else ""
                raise ProvenanceError(
                    f"fastdp: {name} ({type(module).__name__}) got an input{which} of shape {tuple(x.shape)}; for this "
                    f"input shape it had {m} rows per example in dim {d}, {self.examples * m} for the {self.examples} "
                    "examples of this micro-batch. Keep the examples in the batch dimension of every layer's input."
                )
        moved = next((p.dim for p in layout if isinstance(p, Batched) and p.dim), 0)
        return (*feed(layout, binding, self.examples * K, K), moved)


def _refuse_larger_argument(first: torch.Tensor, call: Any) -> None:
    """A one-example micro-batch attributes every row of every layer to its example, unprobed. If another tensor
    argument has more rows than the first (``f(t, x)`` with t of one row and the batch in x), the batch would be
    clipped as one example: refused until a forward of several examples has been probed (it shows where the batch
    is: a larger argument then is a shared one, and a Poisson batch of one example must not fail)."""
    for t in tree_flatten(call)[0]:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] > first.shape[0]:
            raise ValueError(
                f"fastdp: the model's first tensor argument has {first.shape[0]} row(s) in dim 0, one example, but "
                f"another has {t.shape[0]} (shape {tuple(t.shape)}). The engine takes the examples from dim 0 of the "
                "first tensor argument with one; if the batch is in the other, it would be clipped as one example. "
                "Pass the batch first (forward(x, t), not forward(t, x)), or give a single example's auxiliary "
                "tensors to the model another way (an attribute or buffer)."
            )


def _same_forward(call: LayerCall, forward: _MicroBatch | None, examples: int) -> bool:
    """Whether ``call`` belongs to the model forward a backward's pass began with: by identity where both are known
    (the leaf hook of a container's parameter in a one-example forward knows only the size)."""
    if call.forward is None or forward is None:
        return call.examples == examples
    return call.forward is forward


def _finite(norms: torch.Tensor) -> torch.Tensor:
    """Which per-example norms are finite, as one comparison: a norm is >= 0, inf or NaN, and NaN < inf is false
    (``torch.isfinite`` is four ops: abs, ne, eq and their product)."""
    return norms < math.inf


def _count_nonfinite(norms: torch.Tensor) -> torch.Tensor:
    return _finite(norms).logical_not_().sum()


def _device_of(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (where "auto" looks for a backend), None without parameters."""
    p = next(model.parameters(), None)
    return None if p is None else p.device


def _refuse_running_statistics(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, _RUNNING_STATS) and m.track_running_stats and not isinstance(m, _EXAMPLE_MIXING):
            raise ValueError(
                f"fastdp: {name or 'model'} ({type(m).__name__}) has track_running_stats=True: in training mode "
                "it updates running_mean/running_var from the private batch, statistics without noise that "
                "state_dict() and every checkpoint would publish. Build it with track_running_stats=False (it then "
                "normalises each example by its own statistics in eval mode too)."
            )


#: forward pre-hooks that recompute a module's weight from other parameters (the pre-parametrize API): a rule reads
#: the recomputed weight as a plain tensor, so the parameters behind it would never get a gradient
_HOOK_REPARAMETRIZATIONS = (WeightNorm, SpectralNorm)


def _refuse_hook_reparametrization(module: nn.Module, name: str) -> None:
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, _HOOK_REPARAMETRIZATIONS):
            raise ValueError(
                f"fastdp: {name or 'model'} ({type(module).__name__}) has a {type(hook).__name__} forward pre-hook "
                f"(torch.nn.utils.weight_norm / spectral_norm), which recomputes {hook.name!r} from other parameters: "
                "they would never be trained. Use the same function from torch.nn.utils.parametrizations (handled "
                "exactly), or remove it."
            )


def _buffer_versions(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Each buffer's identity and version counter: an in-place update bumps the counter, a reassignment the id."""
    return {n: (id(b), b._version) for n, b in model.named_buffers()}


def _leak_guard(name: str):
    def hook(p: torch.Tensor) -> None:
        # autograd also runs this hook for the None gradients our layers return: only a real one is a leak
        if p.grad is None:
            return
        raise RuntimeError(
            f"fastdp: parameter {name!r} received an ordinary (non-private) gradient from autograd. It is used "
            "outside the module that owns it (e.g. F.linear(x, other.weight)); its per-example gradients cannot be "
            "clipped. Use it through its module, or freeze it (requires_grad=False)."
        )

    return hook
