"""The DP optimizer step in one fused call: noise, division by the expected batch size and the update.

With the ``cpp`` backend (fastdp._C, CPU parameters) ``DPOptimizer.step`` hands the clipped sums straight to
``torch.ops.fastdp.noisy_sgd_step_`` / ``noisy_adam_step_``: one multi-threaded pass over all parameters instead of
a noise draw, an add and a division per tensor followed by the optimizer's own loop. The update is
torch.optim.SGD's or Adam(W)'s, on the optimizer's own state (``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``,
``step``), so a checkpoint can be resumed with either path.

The noise is the counter-based stream of fastdp.philox, element e of step t being a pure function of
(seed, t, e), with the elements numbered over the wrapped optimizer's parameters in its order (param groups
concatenated). It is a different stream from the torch path's ``torch.Generator`` draws: the same seed gives
different (equally distributed) noise on the two paths.

Only what the kernels implement takes this path: SGD (any momentum, dampening, Nesterov, weight decay) and
Adam/AdamW without amsgrad, maximize, capturable or differentiable; float32/float64 parameters on the CPU; noise
from a seeded generator (``secure_rng`` draws on the host and keeps the torch path). Everything else uses the
torch path with identical semantics.
"""

from __future__ import annotations

import torch
from torch import nn

_UNSUPPORTED_FLAGS = ("maximize", "amsgrad", "capturable", "differentiable")


def fused_kind(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> str | None:
    """ "sgd" or "adam" when the cpp kernels can run this optimizer's step on these parameters, else None."""
    if isinstance(optimizer, torch.optim.SGD):
        kind = "sgd"
    elif isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        kind = "adam"
    else:
        return None
    if any(g.get(flag, False) for g in optimizer.param_groups for flag in _UNSUPPORTED_FLAGS):
        return None
    if any(p.device.type != "cpu" or p.dtype not in (torch.float32, torch.float64) for p in params):
        return None
    return kind


class FusedStep:
    """Runs the step of ``optimizer`` (SGD or Adam/AdamW) through fastdp._C's CPU kernels."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str) -> None:
        self.optimizer, self.kind = optimizer, kind

    def ready(self) -> bool:
        """False when only some SGD parameters have a momentum buffer (state left by another path): the kernel
        takes one first-step flag per call, so that step goes through the torch path."""
        if self.kind != "sgd":
            return True
        for group in self.optimizer.param_groups:
            if group["momentum"] != 0:
                have = {"momentum_buffer" in self.optimizer.state[p] for p in group["params"] if p.requires_grad}
                if len(have) > 1:
                    return False
        return True

    @torch.no_grad()
    def __call__(
        self, sums: dict[nn.Parameter, torch.Tensor], noise_std: float, batch: float, seed: int, step: int
    ) -> None:
        ops = torch.ops.fastdp
        offset = 0
        for group in self.optimizer.param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            offsets = []
            for p in params:
                offsets.append(offset)
                offset += p.numel()
            if not params:
                continue
            group_sums = [sums.get(p) for p in params]
            state = [self.optimizer.state[p] for p in params]
            if self.kind == "sgd":
                momentum = group["momentum"]
                first = momentum != 0 and "momentum_buffer" not in state[0]  # all or none (ready())
                if first:
                    for s, p in zip(state, params, strict=True):
                        s["momentum_buffer"] = torch.zeros_like(p)  # written, not read, on the first step
                bufs = [s["momentum_buffer"] for s in state] if momentum != 0 else []
                ops.noisy_sgd_step_(
                    params, group_sums, bufs, offsets, noise_std, float(batch), seed, step, group["lr"], momentum,
                    group["dampening"], group["weight_decay"], group["nesterov"], first,
                )  # fmt: skip
            else:
                for s, p in zip(state, params, strict=True):
                    if "exp_avg" not in s:
                        s["step"] = torch.tensor(0.0)
                        s["exp_avg"] = torch.zeros_like(p)
                        s["exp_avg_sq"] = torch.zeros_like(p)
                adam_step = int(state[0]["step"]) + 1
                decoupled = isinstance(self.optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
                beta1, beta2 = group["betas"]
                ops.noisy_adam_step_(
                    params, group_sums, [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state], offsets,
                    noise_std, float(batch), seed, step, group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                    bool(decoupled), adam_step,
                )  # fmt: skip
                for s in state:
                    s["step"] = torch.tensor(float(adam_step))
