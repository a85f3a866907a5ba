"""The DP optimizer step in one fused call: noise, division by the expected batch size and the update.

With the ``cpp`` backend (fastdp._C, CPU parameters) ``DPOptimizer.step`` hands the clipped sums straight to
``torch.ops.fastdp.noisy_sgd_step_`` / ``noisy_adam_step_``: one multi-threaded pass over all parameters instead of
a noise draw, an add and a division per tensor followed by the optimizer's own loop. ``cuda`` runs the same ops on
GPU parameters (one multi-tensor launch) and ``triton`` the Triton kernel of kernels/noisy_step.py. The update is
torch.optim.SGD's or Adam(W)'s, on the optimizer's own state (``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``,
``step``), so a checkpoint can be resumed with either path.

The noise is the counter-based stream of fastdp.philox, element e of step t being a pure function of
(seed, t, e), with the elements numbered over the wrapped optimizer's parameters in its order (param groups
concatenated; a frozen parameter's elements are numbered and left alone). It is a different stream from the torch
path's ``torch.Generator`` draws: the same seed gives different (equally distributed) noise on the two paths.

Only what the kernels implement takes this path: SGD (any momentum, dampening, Nesterov, weight decay) and
Adam/AdamW without amsgrad, maximize, capturable or differentiable; float32/float64 parameters on the backend's
device (Triton: no dampening, no frozen parameters in the optimizer); noise from a seeded generator (``secure_rng``
draws on the host and keeps the torch path). Everything else uses the torch path with identical semantics.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdp.backends import Backend

_UNSUPPORTED_FLAGS = ("maximize", "amsgrad", "capturable", "differentiable")
#: the backends with a fused step; each steps on parameters of its ``Backend.device_type``
FUSED_BACKENDS = frozenset({"cpp", "cuda", "triton"})


def fused_kind(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], backend: Backend) -> str | None:
    """ "sgd" or "adam" when ``backend``'s fused step can run this optimizer's step on these parameters, else None."""
    if backend.name not in FUSED_BACKENDS:
        return None
    device = backend.device_type
    if isinstance(optimizer, torch.optim.SGD):
        kind = "sgd"
    elif isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        kind = "adam"
    else:
        return None
    groups = optimizer.param_groups
    if any(g.get(flag, False) for g in groups for flag in _UNSUPPORTED_FLAGS):
        return None
    if any(p.device.type != device or p.dtype not in (torch.float32, torch.float64) for p in params):
        return None
    if backend.name == "triton":
        # the Triton step updates every parameter of the optimizer and has no dampening
        if any(not p.requires_grad for g in groups for p in g["params"]) or any(g.get("dampening", 0) for g in groups):
            return None
    return kind


class FusedStep:
    """Runs the step of ``optimizer`` (SGD or Adam/AdamW) through a fused backend: fastdp._C's ops (``cpp`` on CPU
    tensors, ``cuda`` on GPU tensors: the same ops, dispatched by device) or the Triton kernel (``triton``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, backend: str = "cpp") -> None:
        self.optimizer, self.kind, self.backend = optimizer, kind, backend

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
        if self.backend == "triton":
            from fastdp.kernels.noisy_step import noisy_optimizer_step

            order = [p for g in self.optimizer.param_groups for p in g["params"]]
            noisy_optimizer_step(
                self.optimizer, [sums.get(p) for p in order], std=noise_std, expected_batch_size=batch, seed=seed,
                step=step,
            )  # fmt: skip
            return
        ops = torch.ops.fastdp
        offset = 0
        for group in self.optimizer.param_groups:
            # noise elements are numbered over all the optimizer's parameters; frozen ones are skipped, not noised
            params, offsets = [], []
            for p in group["params"]:
                if p.requires_grad:
                    params.append(p)
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
