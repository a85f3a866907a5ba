"""DP optimizers: replace your optimizer, keep your training loop.

Each ``loss.backward()`` adds its micro-batch's clipped per-example sum (accumulating micro-batches is virtual
batching). ``step()`` is the end of a logical batch: it adds N(0, sigma^2 C^2) once to the sum, divides by
the *expected* batch size (Poisson batches vary; dividing by the realised size would leak it), hands the
result to the wrapped optimizer as ``.grad`` and records the step with the accountant. A ``step()`` with no
backward since the last one is an empty Poisson batch: noise only, and it is accounted. Under torch.distributed
the ranks' clipped sums are added up with one all-reduce and the noise is added once (fastdp.distributed).
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastdp.accounting import PrivacyAccountant, calibrate_noise_multiplier, steps_for_epochs
from fastdp.backends import resolve_backend
from fastdp.distributed import active_group, all_reduce_sum, broadcast_int, broadcast_module
from fastdp.engine import GradSampleEngine
from fastdp.engine.clipping import get_clipping
from fastdp.fused_step import FusedStep
from fastdp.host_read import HostRead
from fastdp.noise import GaussianNoise


class DPOptimizer(torch.optim.Optimizer):
    """Wrap any torch optimizer so that it trains ``model`` with DP-SGD's clipped, noised gradients.

    Args:
        optimizer: the optimizer to wrap (SGD, Adam, ...), built over ``model``'s parameters.
        model: the model; its layers are wrapped for exact per-example clipping.
        noise_multiplier: sigma; the noise std is sigma * max_grad_norm. 0 disables privacy (with a warning).
        max_grad_norm: the clipping bound C.
        expected_batch_size: B, the expected logical batch size (sample_rate * sample_size with Poisson sampling).
        sample_size: the number of training examples N; needed for accounting (q = B / N).
        target_epsilon, target_delta: calibrate sigma instead of giving it (needs sample_size and steps or epochs).
        steps, epochs: the training length used by the calibration.
        augmult: augmentation multiplicity K (rows i*K..i*K+K-1 are example i's views; its gradient is their mean).
        clipping: "flat" or "automatic".
        clip_gamma: the stabiliser of automatic clipping.
        loss_reduction: "mean" or "sum", how the loss reduces over the rows of a micro-batch.
        backend: "auto", "torch", "triton", "cuda" or "cpp" (env FASTDP_BACKEND overrides "auto").
        accountant: "pld" (default) or "rdp".
        secure_rng: draw the noise from OS entropy (see fastdp.noise for its cost).
        seed: seed of the noise generator (ignored with secure_rng).
        memory_budget: what the per-layer plan may hold for the clip step: "auto" (each layer at most twice
            its input), a total in bytes, or None for no limit.
        strategy: force one per-layer strategy everywhere it exists ("keep", "unfold", "instantiate_bk",
            "unfold_bk", "ghost"); None to plan.
        autotune: plan each layer by timing its strategies once per input shape (default) or, if False, by
            the analytic cost model.
        process_group: the torch.distributed group to train over; default: the default group when
            torch.distributed is initialised with several ranks (fastdp.distributed explains the step), else
            a single process. Every rank builds the optimizer (parameters are broadcast from rank 0) and calls
            step() for every logical batch, also when its share of the batch is empty.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        max_grad_norm: float,
        expected_batch_size: int,
        noise_multiplier: float | None = None,
        sample_size: int | None = None,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        steps: int | None = None,
        epochs: float | None = None,
        augmult: int = 1,
        clipping: str = "flat",
        clip_gamma: float = 0.01,
        loss_reduction: str = "mean",
        backend: str = "auto",
        accountant: str = "pld",
        secure_rng: bool = False,
        seed: int | None = None,
        memory_budget: float | str | None = "auto",
        strategy: str | None = None,
        autotune: bool = True,
        process_group=None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if int(expected_batch_size) != expected_batch_size or expected_batch_size < 1:
            raise ValueError(f"expected_batch_size must be a positive integer, got {expected_batch_size}")
        if sample_size is not None and (int(sample_size) != sample_size or sample_size < expected_batch_size):
            raise ValueError(
                f"sample_size must be an integer >= expected_batch_size ({expected_batch_size}), got {sample_size}"
            )
        # refused before anything slow (calibrating sigma): each breaks the sensitivity bound or the update
        get_clipping(clipping, float(max_grad_norm), float(clip_gamma))
        _check_learning_rates(optimizer)
        self.inner = optimizer
        self.model = model
        self.expected_batch_size = int(expected_batch_size)
        self.sample_size = None if sample_size is None else int(sample_size)
        self.backend = resolve_backend(backend, device=next((p.device for p in model.parameters()), None))
        self._backend_requested = backend != "auto"
        self.accountant = PrivacyAccountant(accountant)
        #: the steps sigma was calibrated for (ceil(epochs N / B) with epochs); None when sigma was given.
        #: Draw the sampler's steps from it: more steps spend more than target_epsilon (step() warns once)
        self.calibrated_steps: int | None = None
        self.target_epsilon = target_epsilon
        self.noise_multiplier = self._noise_multiplier(
            noise_multiplier, target_epsilon, target_delta, steps, epochs, accountant
        )
        self.max_grad_norm = float(max_grad_norm)
        self.noise = GaussianNoise(seed=seed, secure=secure_rng)
        self.engine = GradSampleEngine(
            model,
            max_grad_norm=max_grad_norm,
            augmult=augmult,
            loss_reduction=loss_reduction,
            clipping=clipping,
            clip_gamma=clip_gamma,
            memory_budget=memory_budget,
            strategy=strategy,
            autotune=autotune,
            backend=self.backend.name,
        )
        for group in optimizer.param_groups:
            self._check_clipped(group["params"])
        self.group = active_group(process_group)
        if self.group is not None:
            broadcast_module(model, self.group)
            if not secure_rng:  # a fused step draws the same noise on every rank from the same seed
                self.noise.seed = broadcast_int(self.noise.seed, self.group)
        self._fused: FusedStep | None | bool = None  # decided at the first step (parameters may move before it)
        self.steps_taken = 0
        self.per_sample_norms = torch.zeros(0)
        self.examples_last_batch = 0
        #: the non-finite counts of past steps on their way to the host: (step, examples, HostRead), oldest first
        self._nonfinite_reads: deque[tuple[int, int, HostRead]] = deque()

    def _check_clipped(self, params) -> None:
        """Every trainable parameter the optimizer updates must be one whose per-example gradients the engine clips."""
        clipped = {id(p) for p in self.engine.params}
        for p in params:
            if p.requires_grad and id(p) not in clipped:
                raise ValueError(
                    "the optimizer has a parameter that is not a trainable parameter of `model` as the DP optimizer "
                    f"was built (shape {tuple(p.shape)}): its gradient would not be clipped. Build the optimizer "
                    "over model.parameters(), with the parameters to train already unfrozen and the layers added."
                )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """The wrapped optimizer's ``add_param_group``, for parameters the engine clips (see ``_check_clipped``)."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        self._check_clipped(params)
        self.inner.add_param_group({**param_group, "params": params})
        self._fused = None  # the fused step is chosen again for the new parameters

    # the wrapped optimizer's state is this optimizer's state (LR schedulers read and write param_groups)
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.inner.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.inner.state

    @property
    def defaults(self):  # type: ignore[override]
        return self.inner.defaults

    @property
    def sample_rate(self) -> float | None:
        """q = expected_batch_size / sample_size (None without sample_size)."""
        return None if self.sample_size is None else self.expected_batch_size / self.sample_size

    @property
    def nonfinite_examples(self) -> int:
        """Examples whose gradient was non-finite and contributed zero, since the start (reads the device)."""
        return self.engine.nonfinite_examples

    @property
    def nonfinite_last_batch(self) -> int:
        """Examples of the last logical batch whose gradient was non-finite and contributed exactly zero (reads the
        device: on a GPU, read it once per log interval rather than per step, or ``nonfinite_last_batch_tensor``)."""
        return int(self.engine.nonfinite_last)

    @property
    def nonfinite_last_batch_tensor(self) -> torch.Tensor | int:
        """``nonfinite_last_batch`` where it was counted (a device tensor after the first step): no host read."""
        return self.engine.nonfinite_last

    def _noise_multiplier(self, sigma, target_epsilon, target_delta, steps, epochs, mechanism) -> float:
        if (sigma is None) == (target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier or target_epsilon (with target_delta)")
        if sigma is not None:
            if not sigma >= 0 or not math.isfinite(sigma):
                raise ValueError(f"noise_multiplier must be a finite number >= 0, got {sigma}")
            if sigma == 0:
                warnings.warn("fastdp: noise_multiplier=0: no privacy (epsilon is infinite).", stacklevel=3)
            return float(sigma)
        if target_delta is None or self.sample_size is None or (steps is None and epochs is None):
            raise ValueError(
                "calibrating to target_epsilon needs target_delta, sample_size and steps or epochs; got "
                f"target_delta={target_delta}, sample_size={self.sample_size}, steps={steps}, epochs={epochs}"
            )
        q = self.expected_batch_size / self.sample_size
        total = steps if steps is not None else steps_for_epochs(epochs, q)
        self.calibrated_steps = int(total)
        return calibrate_noise_multiplier(target_epsilon, target_delta, q, total, mechanism=mechanism)

    @torch.no_grad()
    def step(self, closure=None):
        """End the logical batch: noise once, divide by the expected batch size, update, account."""
        if closure is not None:
            raise ValueError(
                "DPOptimizer.step does not take a closure: re-evaluating the loss would add a second clipped "
                "sum for the same examples. Call loss.backward() yourself, then step()."
            )
        summed, norms = self.engine.pop()
        std = self.noise_multiplier * self.max_grad_norm
        fused = self._fused_step()
        if fused is not None:
            # one call: noise (the Philox stream of (seed, step), the same on every rank), / B and the update
            if self.group is not None:
                sums = [summed.get(p, None) for p in self.engine.params]
                sums = [torch.zeros_like(p) if g is None else g for p, g in zip(self.engine.params, sums, strict=True)]
                all_reduce_sum(sums, self.group, what=f"the clipped sums of step {self.steps_taken + 1}")
                summed = dict(zip(self.engine.params, sums, strict=True))
            fused(summed, std, self.expected_batch_size, self.noise.seed, self.steps_taken)
        else:
            self._torch_step(summed, std)
        self.per_sample_norms = norms
        self.examples_last_batch = norms.numel()
        self.steps_taken += 1
        if self.examples_last_batch:
            read = HostRead(self.engine.nonfinite_last)
            self._nonfinite_reads.append((self.steps_taken, self.examples_last_batch, read))
        self._warn_noise_only_steps()
        if self.sample_rate is not None:
            self.accountant.step(self.sample_rate, self.noise_multiplier)
        if self.calibrated_steps is not None and self.steps_taken == self.calibrated_steps + 1:
            warnings.warn(
                f"fastdp: step {self.steps_taken} is past the {self.calibrated_steps} steps sigma was calibrated for: "
                f"epsilon now exceeds target_epsilon={self.target_epsilon} (opt.epsilon(delta) says how far). Take "
                "the sampler's steps from opt.calibrated_steps.",
                stacklevel=3,  # the caller of step(), past torch.no_grad's wrapper
            )

    def _warn_noise_only_steps(self) -> None:
        """Warn about the past steps whose examples were all non-finite, as their counts reach the host: without
        waiting for them, so on a GPU the warning may come a step or two after the step it names."""
        while self._nonfinite_reads and self._nonfinite_reads[0][2].ready():
            step, examples, read = self._nonfinite_reads.popleft()
            if read.value() == examples:
                warnings.warn(
                    # without the count: the size of a Poisson batch is private (it is in no released output),
                    # and run logs keep warnings
                    f"fastdp: step {step}: every example of the logical batch had a non-finite gradient (NaN/inf "
                    "data or an overflow) and contributed zero: the step was noise only. Check the data and the loss "
                    "scale (e.g. bf16/fp16 overflow, a learning rate that diverged).",
                    stacklevel=4,  # the caller of step(), past torch.no_grad's wrapper
                )

    def _torch_step(self, summed: dict[nn.Parameter, torch.Tensor], std: float) -> None:
        # with several ranks only rank 0 adds noise, before the sums are added up: the total carries it once
        noisy = std > 0 and (self.group is None or dist.get_rank(self.group) == 0)
        offsets = self._noise_offsets()
        # the others are not updated by the optimizer, or frozen since it was built (as on the fused path)
        params = [p for p in self.engine.params if p in offsets and p.requires_grad]
        # the engine's sums are fresh tensors owned by this step, so noise and scaling can go in place
        grads = [summed[p] if p in summed else torch.zeros_like(p) for p in params]
        if noisy:
            torch._foreach_add_(grads, self._noise(params, offsets), alpha=std)
        if self.group is not None:
            all_reduce_sum(grads, self.group, what=f"the clipped sums of step {self.steps_taken + 1}")
        torch._foreach_div_(grads, float(self.expected_batch_size))
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        self.inner.step()
        # the noisy gradient is consumed, as on the fused path (which never writes p.grad): a user who skips
        # zero_grad() must not meet it at the next backward, where it would look like an ordinary leaked gradient
        for p in params:
            p.grad = None

    def _noise_offsets(self) -> dict[nn.Parameter, int]:
        """Where each parameter's noise starts in the step's stream: elements are numbered over the optimizer's
        parameters in its order (groups concatenated, frozen ones numbered too), as in the fused steps."""
        offsets, at = {}, 0
        for group in self.inner.param_groups:
            for p in group["params"]:
                offsets.setdefault(p, at)
                at += p.numel()
        return offsets

    def _noise(self, params: list[nn.Parameter], offsets: dict[nn.Parameter, int]) -> list[torch.Tensor]:
        """This step's N(0, 1) noise for each parameter: elements offsets[p] .. of the stream of (seed, step)."""
        step = self.steps_taken
        devices = {p.device for p in params}
        if len(devices) == 1:  # one draw covering them all (on a GPU: one launch), cut into views
            end = max(offsets[p] + p.numel() for p in params)
            z = self.noise.sample(end, step, 0, devices.pop())
            return [z[offsets[p] : offsets[p] + p.numel()].view(p.shape) for p in params]
        return [self.noise.sample(p.numel(), step, offsets[p], p.device).view(p.shape) for p in params]

    def _fused_step(self) -> FusedStep | None:
        """The backend's one-call step when it can run this optimizer on these parameters (fastdp.fused_step)."""
        if self._fused is None:
            self._fused = False
            if not self.noise.secure:  # OS-entropy noise is drawn on the host, by the torch path
                self._fused = self.backend.fused_step(self.inner, self.engine.params) or False
                if not self._fused and self._backend_requested and self.backend.step_dtypes:
                    warnings.warn(
                        f"fastdp: backend {self.backend.name!r} has no fused step for {type(self.inner).__name__} on "
                        "these parameters (fastdp.fused_step says what it runs); the step takes the torch path.",
                        stacklevel=3,
                    )
        return self._fused or None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the parameters' gradients and any clipped sums not yet consumed by step()."""
        self.inner.zero_grad(set_to_none=set_to_none)
        self.engine.discard()

    def epsilon(self, delta: float) -> float:
        """Privacy spent so far, (epsilon, delta)-DP, from the accountant (PLD by default)."""
        if self.sample_size is None:
            raise ValueError("epsilon needs sample_size (the training set size) to know the sampling rate")
        return self.accountant.epsilon(delta)

    def detach(self) -> None:
        """Restore the model's layers (the optimizer can no longer step)."""
        self.engine.detach()

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.inner.state_dict(),
            "accountant": self.accountant.state_dict(),
            "noise": self.noise.state_dict(),
            "steps_taken": self.steps_taken,
            "noise_multiplier": self.noise_multiplier,
            "nonfinite_examples": self.engine.nonfinite_examples,
            "plans": self.engine.plan_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _check_state_shapes(self.inner, state_dict["optimizer"])
        self.inner.load_state_dict(state_dict["optimizer"])
        self.accountant.load_state_dict(state_dict["accountant"])
        self.noise.load_state_dict(state_dict["noise"])
        self.steps_taken = int(state_dict["steps_taken"])
        self.noise_multiplier = float(state_dict["noise_multiplier"])
        self.engine.nonfinite_examples = int(state_dict["nonfinite_examples"])
        self.engine.load_plan_state(state_dict["plans"])

    def __repr__(self) -> str:
        return (
            f"DPOptimizer({type(self.inner).__name__}, sigma={self.noise_multiplier:.4g}, C={self.max_grad_norm}, "
            f"B={self.expected_batch_size}, N={self.sample_size}, clipping={self.engine.clipping!r})"
        )


def _check_learning_rates(optimizer: torch.optim.Optimizer) -> None:
    for i, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        if lr is not None and not math.isfinite(float(lr)):
            raise ValueError(
                f"the optimizer's learning rate must be finite, got lr={float(lr)} in param group {i}; a NaN or "
                "infinite step would overwrite every parameter"
            )


#: per-parameter optimizer state that is elementwise (the parameter's shape): torch.optim's SGD, Adam(W), NAdam,
#: RAdam, Adamax, RMSprop, Adagrad, Adadelta, ASGD, Rprop. Factored states (Adafactor's row/column) are not listed.
_ELEMENTWISE_STATE = frozenset(
    {"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "square_avg", "grad_avg",
     "acc_delta", "sum", "ax", "prev", "step_size"}
)  # fmt: skip


def _check_state_shapes(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Refuse an optimizer state_dict written for parameters of other shapes. torch checks only the number of
    parameters per group, so such a state would load and fail later inside a fused kernel (or silently broadcast)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for group in state.get("param_groups", ()) for i in group.get("params", ())]
    position = {pid: k for k, pid in enumerate(saved_ids)}
    for pid, per_param in state.get("state", {}).items():
        k = position.get(pid)
        if k is None or k >= len(params):
            continue  # torch's own check reports a mismatch in the number of parameters
        for key, value in per_param.items():
            if key in _ELEMENTWISE_STATE and isinstance(value, torch.Tensor) and value.shape != params[k].shape:
                raise ValueError(
                    f"the optimizer state_dict does not fit this model: parameter {k} has shape "
                    f"{tuple(params[k].shape)}, its saved {key!r} has shape {tuple(value.shape)}. It was saved from "
                    "a model with other shapes; load the state_dict of the same model (or start the optimizer anew)."
                )


class DPSGD(DPOptimizer):
    """DP-SGD: ``torch.optim.SGD`` (momentum, Nesterov, weight decay) under DPOptimizer.

    Args:
        model: the model to train (all its trainable parameters are optimised).
        lr, momentum, nesterov, weight_decay: as torch.optim.SGD.
        **dp: the DPOptimizer arguments (max_grad_norm, expected_batch_size, noise_multiplier, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        **dp: Any,
    ) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        # foreach: one launch per update op for all parameters on the torch path (torch picks it on a GPU, not on
        # the CPU); the fused backends never call this optimizer's step
        sgd = torch.optim.SGD(
            params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, foreach=True
        )
        super().__init__(sgd, model, **dp)
