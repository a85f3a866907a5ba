"""The DP optimizer step in one fused call per launch: noise, division by the expected batch size and the update.

``DPOptimizer.step`` hands the clipped sums to ``FusedStep``, which reads the wrapped torch optimizer once through
the one adapter below and asks the backend to run each ``Launch``: fastdp._C's ``noisy_sgd_step_`` /
``noisy_adam_step_`` (``cpp`` on CPU tensors, ``cuda`` on GPU tensors: the same ops, dispatched by device) or the
Triton kernel of kernels/noisy_step.py (``triton``). The update is torch.optim.SGD's or Adam(W)'s, on the
optimizer's own state (``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``, ``step``), so a checkpoint can be resumed
with either path, and every backend keeps that state the same way.

The noise is the counter-based stream of fastdp.philox, element e of step t being a pure function of (seed, t, e),
with the elements numbered over the wrapped optimizer's parameters in its order (param groups concatenated; a
frozen parameter's elements are numbered and left alone): the torch path draws the same stream (fastdp.noise).

What the kernels implement takes this path: SGD (any momentum, Nesterov, weight decay; dampening on the compiled
backends) and Adam/AdamW without amsgrad, maximize, capturable or differentiable, on parameters of a dtype and
device the backend takes, with noise from a seeded stream (``secure_rng`` draws on the host and keeps the torch
path). Everything else uses the torch path with identical semantics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from fastdp.backends.base import Backend

_UNSUPPORTED_FLAGS = ("maximize", "amsgrad", "capturable", "differentiable")


def step_kind(optimizer: torch.optim.Optimizer) -> str | None:
    """ "sgd", "adam" or "adamw" when a fused step can run this optimizer's update, else None."""
    if any(g.get(flag, False) for g in optimizer.param_groups for flag in _UNSUPPORTED_FLAGS):
        return None
    if isinstance(optimizer, torch.optim.AdamW):
        return "adamw"
    if isinstance(optimizer, torch.optim.Adam):
        return "adam"  # a group's decoupled_weight_decay (newer torch) makes it AdamW: decoupled() reads it
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    return None


@dataclass
class Launch:
    """One kernel call of a fused step: parameters of one param group that share their optimizer state's phase.

    SGD with momentum: ``first`` is True for parameters without a momentum buffer yet (their buffer, created here as
    zeros, is written, not read: torch's first step sets buf = d_p). Adam(W): every parameter of a launch has the
    same step count; ``adam_step`` is the count after this step. The state tensors are the optimizer's own, updated
    in place by the kernel.
    """

    kind: str
    params: list[nn.Parameter]
    sums: list[torch.Tensor | None]
    offsets: list[int]
    group: dict[str, Any]
    momentum_buffers: list[torch.Tensor] = field(default_factory=list)
    first: bool = False
    exp_avgs: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = field(default_factory=list)
    adam_step: int = 0


def launches(
    optimizer: torch.optim.Optimizer,
    sums: dict[nn.Parameter, torch.Tensor],
    kind: str,
    updated: Callable[[torch.Tensor], bool] = lambda p: p.requires_grad,
) -> list[Launch]:
    """The launches of one step of ``optimizer`` (creating its lazy state as torch's own first step would), over the
    parameters ``updated`` selects (default: the trainable ones)."""
    out, offset = [], 0
    for group in optimizer.param_groups:
        params, offsets = [], []
        for p in group["params"]:
            if updated(p):  # numbered either way, so the noise of every other element does not depend on it
                params.append(p)
                offsets.append(offset)
            offset += p.numel()
        phases: dict[Any, list[int]] = {}
        for i, p in enumerate(params):
            state = optimizer.state[p]
            if kind == "sgd":
                phase = group["momentum"] != 0 and state.get("momentum_buffer") is None
            else:
                phase = int(state["step"]) + 1 if "step" in state else 1
            phases.setdefault(phase, []).append(i)
        for phase, idx in phases.items():
            ps = [params[i] for i in idx]
            launch = Launch(kind, ps, [sums.get(p) for p in ps], [offsets[i] for i in idx], group)
            states = [optimizer.state[p] for p in ps]
            if kind == "sgd":
                if group["momentum"] != 0:
                    for s, p in zip(states, ps, strict=True):
                        if s.get("momentum_buffer") is None:
                            s["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    launch.momentum_buffers = [s["momentum_buffer"] for s in states]
                launch.first = bool(phase)
            else:
                for s, p in zip(states, ps, strict=True):
                    if "exp_avg" not in s:
                        s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                launch.exp_avgs = [s["exp_avg"] for s in states]
                launch.exp_avg_sqs = [s["exp_avg_sq"] for s in states]
                launch.adam_step = phase
            out.append(launch)
    return out


def decoupled(launch: Launch) -> bool:
    """Whether an Adam launch's weight decay is AdamW's (decoupled from the gradient)."""
    return launch.kind == "adamw" or bool(launch.group.get("decoupled_weight_decay", False))


def finish(optimizer: torch.optim.Optimizer, launch: Launch) -> None:
    """Record the step in the optimizer's state after the launch ran (Adam's step count, a float32 tensor as
    torch keeps it)."""
    if launch.kind != "sgd":
        for p in launch.params:
            optimizer.state[p]["step"] = torch.tensor(float(launch.adam_step), dtype=torch.float32)


class FusedStep:
    """Runs the step of ``optimizer`` (SGD or Adam/AdamW) through ``backend``'s fused noisy step."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, backend: Backend) -> None:
        self.optimizer, self.kind, self.backend = optimizer, kind, backend

    @torch.no_grad()
    def __call__(
        self, sums: dict[nn.Parameter, torch.Tensor], noise_std: float, batch: float, seed: int, step: int
    ) -> None:
        for launch in launches(self.optimizer, sums, self.kind):
            self.backend.noisy_step(launch, noise_std, float(batch), seed, step)
            finish(self.optimizer, launch)
