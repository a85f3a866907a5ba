"""What a backend is: the kernels it lends the engine and the optimizer step, and the tensors they take.

``Backend`` itself is the ``torch`` reference: no kernel of its own, every strategy and the step in plain torch, on
any device and dtype. A backend with kernels overrides what it has:

- ``reducer()``        the clip-and-reduce S = sum_i w_i G_i over kept per-example gradients (fastdp.engine.interface),
- ``layer_kernels()``  per-layer norm and book-keeping kernels, which the rules offer the plan as ``fused_*``,
- ``step_takes()`` and ``noisy_step()``  the fused optimizer step, one ``fastdp.fused_step.Launch`` at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastdp.engine.interface import LayerKernels, Reducer
from fastdp.fused_step import FusedStep, Launch, step_kind


@dataclass(frozen=True)
class Backend:
    name: str = "torch"
    #: the device type its kernels take (None: any, the torch reference)
    device_type: str | None = None
    #: Triton's CPU interpreter (tests only; never chosen by ``auto``)
    interpreted: bool = False
    #: parameter dtypes its fused step updates
    step_dtypes: tuple[torch.dtype, ...] = ()

    def reducer(self) -> Reducer | None:
        """The clip-and-reduce kernel (None: torch's ``w @ G``)."""
        return None

    def layer_kernels(self) -> LayerKernels | None:
        """The per-layer kernels the plan may use (None: the torch strategies only)."""
        return None

    def step_takes(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> bool:
        """Whether the fused step runs ``optimizer``'s update on ``params`` (their device and dtype, its flags)."""
        return bool(self.step_dtypes) and all(
            p.device.type == self.device_type and p.dtype in self.step_dtypes for p in params
        )

    def fused_step(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> FusedStep | None:
        """The one-call step of ``optimizer`` on ``params``, or None where this backend cannot run it."""
        kind = step_kind(optimizer)
        if kind is None or not self.step_takes(optimizer, params):
            return None
        return FusedStep(optimizer, kind, self)

    def noisy_step(self, launch: Launch, std: float, batch: float, seed: int, step: int) -> None:
        """(S + std * z) / batch and the update of one launch, z the Philox noise of (seed, step)."""
        raise NotImplementedError(f"backend {self.name!r} has no fused step")
