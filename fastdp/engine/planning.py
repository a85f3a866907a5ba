"""The per-layer plan: which exact strategy each wrapped layer runs, chosen once per input shape.

A rule offers its strategies with a modelled ``Cost`` (time, and memory held until the clip step). The planner
keeps those within the layer's memory allowance and, with autotuning, times the shortlisted ones on the real input
(its backward-side work: norm and clipped sum, in the precision and through the backend's clip-and-reduce the step
will use); without, it takes the cheapest by the model. A forced ``strategy`` runs wherever a layer offers it.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from fastdp.engine.contributions import reducing_with
from fastdp.engine.interface import Cost, LayerCall, LayerKernels, Reducer
from fastdp.engine.precision import full_fp32

#: autotuning times only the strategies whose modelled cost is within this factor of the cheapest one's
_PRUNE = 5.0

#: a plan's key: the layer input's shape after dim 0, its dtype, and the rows per example
PlanKey = tuple[tuple[int, ...], torch.dtype, int]


class Planner:
    """Plans and remembers each layer's strategy.

    Args:
        owner: the engine the timing calls report to (fastdp.engine.interface.CallOwner).
        kernels, reducer: the backend's layer kernels (offered by the rules as ``fused_*``) and clip-and-reduce.
        memory_budget: "auto" (each layer at most twice its input), a total in bytes, or None (no limit).
        strategy: a strategy to force wherever a layer offers it, or None.
        autotune: time the shortlisted candidates (True) or rank them by the cost model (False).
        backend_name: for messages.
    """

    def __init__(
        self,
        owner: Any,
        kernels: LayerKernels | None,
        reducer: Reducer | None,
        memory_budget: float | str | None,
        strategy: str | None,
        autotune: bool,
        backend_name: str,
    ) -> None:
        self.owner, self.kernels, self.reducer = owner, kernels, reducer
        self.memory_budget, self.strategy, self.autotune = memory_budget, strategy, autotune
        self.backend_name = backend_name
        self.plans: dict[nn.Module, tuple[PlanKey, str]] = {}
        self.costs: dict[nn.Module, dict[str, Cost]] = {}

    def plan(self, call: LayerCall, inputs: Sequence[torch.Tensor]) -> str:
        """The strategy ``call``'s layer runs on ``inputs`` (planned on the first call with this key)."""
        rule, module, m = call.rule, call.module, call.rows_per_example
        x = inputs[0]
        if len(inputs) == 1:
            key = (tuple(x.shape[1:]), x.dtype, m)
        else:  # every input's shape without its batch dimension (fastdp.engine.binding)
            dims = call.binding.dims
            key = (tuple(t.shape[:d] + t.shape[d + 1 :] for t, d in zip(inputs, dims, strict=True)), x.dtype, m)
        cached = self.plans.get(module)
        if cached is not None and cached[0] == key:
            return cached[1]
        candidates = rule.strategies(module, x if len(inputs) == 1 else tuple(inputs), m, self.kernels)
        unknown = set(candidates) - rule.strategy_names
        if unknown:
            raise RuntimeError(f"fastdp: {type(rule).__name__} offered {sorted(unknown)}, not in its strategy_names")
        if self.strategy is not None and self.strategy in candidates:
            choice = self.strategy
        else:
            fits = {k: c for k, c in candidates.items() if c.memory <= self._allowance(module, inputs)}
            if len(fits) > 1 and self.autotune:
                times = self._time(call, inputs, shortlist(fits))
                if times:
                    choice = min(times, key=times.get)
                else:  # only fused strategies fit, and each failed here: the torch one holding the least
                    plain = [k for k in candidates if not k.startswith("fused_")]
                    choice = min(plain, key=lambda k: candidates[k].memory)
            elif fits:
                choice = min(fits, key=lambda k: fits[k].time)
            else:
                choice = min(candidates, key=lambda k: candidates[k].memory)
        self.costs[module] = candidates
        self.plans[module] = (key, choice)
        return choice

    def _allowance(self, module: nn.Module, inputs: Sequence[torch.Tensor]) -> float:
        """Bytes this layer's plan may hold for the clip step.

        "auto": twice the layer's own input. Holding a layer's input and output grad (book-keeping) or
        per-example gradients of that order keeps the DP step's extra memory of the order of the activations
        the ordinary backward holds anyway; the large per-example gradients of low-resolution, wide layers
        (B * p * d >> B * T * (C_in + p)) are what it rules out. A number is a total over all layers, spent
        greedily in forward order; None is no limit.
        """
        if self.memory_budget == "auto":
            return 2.0 * sum(x.numel() * x.element_size() for x in inputs)
        if self.memory_budget is None:
            return float("inf")
        # plans restored from a state_dict carry no cost; they were within budget when first made
        used = sum(
            self.costs[mod][c].memory for mod, (_, c) in self.plans.items() if mod is not module and mod in self.costs
        )
        return self.memory_budget - used

    def _time(
        self, planned: LayerCall, inputs: Sequence[torch.Tensor], strategies: list[str], rounds: int = 4
    ) -> dict[str, float]:
        """Seconds of each strategy's backward-side work (norm and clipped sum) on this input.

        The candidates take turns (one warm-up round, then ``rounds`` timed ones, best kept): a drift of the
        machine's state during tuning then hits all of them alike instead of deciding the ranking.
        """
        rule = planned.rule
        calls = {
            k: LayerCall(
                self.owner, rule, planned.module, strategy=k, info=dict(planned.info), examples=planned.examples,
                rows_per_example=planned.rows_per_example, input_rows=planned.input_rows, binding=planned.binding,
            )
            for k in strategies
        }  # fmt: skip
        best = dict.fromkeys(strategies, float("inf"))
        # in the precision and through the reducer the step uses (fastdp.engine.precision), so that the timings rank
        # what will run
        with torch.no_grad(), full_fp32(), reducing_with(self.reducer):
            grad_out = None
            for r in range(rounds + 1):
                for k, call in list(calls.items()):
                    out, saved = rule.compute(call, *inputs)
                    if grad_out is None:
                        grad_out = _random_like(out)
                    _synchronize(inputs[0].device)
                    start = time.perf_counter()
                    try:
                        # the plan is made inside the forward, under the user's autocast; the backward that runs the
                        # strategy is outside it (``loss.backward()`` follows the autocast block)
                        with _outside_autocast(inputs[0].device.type):
                            merged = [c for _, c in rule.contributions(call, saved, grad_out, call.rows_per_example)]
                            sq = sum(c.sq_norm() for c in merged)
                            for c in merged:
                                c.weighted_sum(torch.ones_like(sq))
                        _synchronize(inputs[0].device)
                    except Exception as e:  # noqa: BLE001 - a kernel that does not build or run here
                        if not k.startswith("fused_"):
                            raise
                        # a backend kernel failing on this machine (a Triton version or GPU it was not built for)
                        # loses the layer a candidate, not the run; the torch strategies are exact all the same
                        warnings.warn(
                            f"fastdp: strategy {k!r} of backend {self.backend_name!r} failed on "
                            f"{type(planned.module).__name__} ({type(e).__name__}: {e}); planning without it",
                            stacklevel=2,
                        )
                        del calls[k], best[k]
                        continue
                    if r > 0:
                        best[k] = min(best[k], time.perf_counter() - start)
        return best

    def state(self, names: dict[nn.Module, str]) -> dict[str, tuple]:
        """The chosen strategies by module name, so that a resumed run computes exactly the same way."""
        return {names[m]: (list(key[0]), str(key[1]), choice, key[2]) for m, (key, choice) in self.plans.items()}

    def load_state(self, state: dict[str, tuple], modules: dict[str, nn.Module], augmult: int) -> None:
        for name, (shape, dtype, choice, *rest) in state.items():
            if name not in modules:
                raise KeyError(f"saved plan names module {name!r}, which this model does not have")
            m = rest[0] if rest else augmult  # plans saved before rows per example were part of the key
            module = modules[name]
            self.plans[module] = ((tuple(shape), getattr(torch, dtype.removeprefix("torch.")), m), choice)
            # candidates of an earlier plan of this engine's need not include the restored choice
            self.costs.pop(module, None)


def shortlist(fits: dict[str, Cost]) -> list[str]:
    """The strategies worth timing. The cost model ranks a layer's strategies to within ~3x of their measured times
    on the CPU it was fitted on; one it puts beyond _PRUNE x the cheapest is not worth timing (nor the transient
    memory of trying it). The cheapest torch strategy is always timed too: the model has not been fitted to the fused
    kernels (a GPU's), so it must not rule out the alternative they are measured against."""
    cheapest = min(c.time for c in fits.values())
    out = [k for k, c in fits.items() if c.time <= _PRUNE * cheapest]
    plain = [k for k in fits if not k.startswith("fused_")]
    if plain and not set(plain) & set(out):
        out.append(min(plain, key=lambda k: fits[k].time))
    return out


def _random_like(out: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A random output gradient: one tensor for one output, else one per tensor leaf (fastdp.engine.interface).

    Drawn from a generator of its own: planning must not advance the caller's RNG, or a run that plans (the first
    step, a new input shape) would draw other dropout masks and augmentations than one that restored its plan.
    """
    leaves = (
        [out] if isinstance(out, torch.Tensor) else [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    )
    gen = torch.Generator(device=leaves[0].device).manual_seed(0)
    draws = tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype, device=t.device) for t in leaves)
    return draws[0] if isinstance(out, torch.Tensor) else draws


def _outside_autocast(device_type: str):
    """Autocast off for ``device_type`` (a no-op where torch has no autocast for it)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
