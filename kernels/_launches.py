"""Triton kernel launches without a GPU: run the host wrappers down their GPU path and record what they launch.

Inside ``recording()``:

- every ``*_kernel`` (a ``@triton.jit`` function that a host wrapper launches) of the op modules is replaced by a
  recorder: ``kernel[grid](*args, **kwargs)`` appends a ``Launch`` and runs nothing;
- the wrappers take their GPU settings (block sizes, warps, stages, the split over an H100/H200's 132 SMs) and
  skip the device check, so they run on CPU, meta or fake tensors whose memory is never read.

A ``Launch`` keeps what decides the compiled kernel: the kernel, the grid, the integer and float arguments, the
constexprs and, per tensor, its dtype and whether its data pointer is 16-byte aligned (``TensorSpec``; shape and
strides are kept for the report, strides also reach the kernel as integers). ``Launch.compile()`` builds it for a
CUDA architecture through Triton's own ``warmup``, so the recorded launch and the compiled one cannot disagree.

Users: kernels/_compile_check.py (compile every launch, report registers and spills) and fastdp/engine/dry_run.py
(the launches a training step of a model would make, recorded on fake tensors).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

#: the op modules whose ``*_kernel`` functions are launched by host wrappers (a new op module goes here)
OP_MODULES = ("per_sample_norm", "ghost_norm", "clip_reduce", "noisy_step")

#: multiprocessors of the GPU the settings are chosen for (H100 SXM and H200: 132)
NUM_SMS = 132


@dataclass(frozen=True)
class TensorSpec:
    """What a launch's tensor argument contributes to the compiled kernel (dtype, pointer alignment), plus its
    shape and strides for the report."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    aligned: bool

    @staticmethod
    def of(t: torch.Tensor) -> TensorSpec:
        # on the GPU a tensor's storage starts 512-byte aligned (the caching allocator): a view is 16-byte aligned
        # iff its offset into the storage is
        aligned = t.storage_offset() * t.element_size() % 16 == 0
        return TensorSpec(t.dtype, tuple(t.shape), tuple(t.stride()), aligned)

    def stand_in(self) -> torch.Tensor:
        """A two-element CPU tensor with the same dtype and alignment: all Triton reads of a tensor argument."""
        base = torch.empty(2, dtype=self.dtype)
        return base if self.aligned else base[1:]

    def __str__(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"{dt}{list(self.shape)}" + ("" if self.aligned else "@unaligned")


def _spec(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorSpec.of(value)
    if isinstance(value, list | tuple):
        return tuple(_spec(v) for v in value)
    return value


def _signature(value: Any, dns: bool) -> Any:
    if isinstance(value, TensorSpec):
        return value.dtype, value.aligned
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    if isinstance(value, float):
        return "fp32"
    width = "i32" if -(2**31) <= value < 2**31 else "i64"
    return width if dns else (width, 1 if value == 1 else 16 if value % 16 == 0 else 0)


def _real(value: Any) -> Any:
    return value.stand_in() if isinstance(value, TensorSpec) else value


@dataclass(frozen=True)
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``; equal launches compile to the same kernel."""

    module: str
    kernel: str
    grid: tuple
    args: tuple
    kwargs: tuple[tuple[str, Any], ...]

    def compile(self) -> Any:
        """The compiled kernel (Triton's ``CompiledKernel``: ``asm["ptx"]``, ``hash``) for the active target."""
        return self.jit_function().warmup(
            *map(_real, self.args), grid=self.grid, **{k: _real(v) for k, v in self.kwargs}
        )

    def jit_function(self) -> Any:
        fn = getattr(importlib.import_module(f"fastdp.kernels.{self.module}"), self.kernel)
        return getattr(fn, "jit_function", fn)  # inside recording() the module holds the recorder

    def signature(self) -> tuple:
        """What Triton compiles a distinct kernel for, as far as it can be read off the launch without compiling:
        per tensor its dtype and alignment; per integer its width and, unless the kernel opts out, whether it is 1 or
        divisible by 16; floats only by type; constexprs and launch options by value. Values and shapes that reach
        the kernel only at run time are left out, so two launches with equal signatures share one compiled kernel."""
        params = self.jit_function().params
        args = tuple(_signature(a, params[i].do_not_specialize) for i, a in enumerate(self.args))
        return (self.kernel, args, tuple((k, _signature(v, False)) for k, v in self.kwargs))

    def describe(self) -> str:
        tensors = ", ".join(str(a) for a in self.args if isinstance(a, TensorSpec))
        flags = ", ".join(f"{k}={v}" for k, v in self.kwargs if k.isupper() and k not in ("INTERP",))
        return f"{self.kernel}({tensors}; {flags})"


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``rec[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, module: str, name: str, jit_function: Any, sink: Callable[[Launch], None]) -> None:
        self.module, self.name, self.jit_function, self.sink = module, name, jit_function, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            grid_ = tuple(grid) if isinstance(grid, list | tuple) else grid
            items = tuple(sorted((k, _spec(v)) for k, v in kwargs.items()))
            self.sink(Launch(self.module, self.name, grid_, tuple(_spec(a) for a in args), items))

        return launch


def _on_gpu(fn: Callable) -> Callable:
    """A ``_settings`` helper called with a CUDA device in place of the tensors' own."""
    gpu = torch.device("cuda")

    def settings(*args, **kwargs):
        args = [gpu if isinstance(a, torch.device) else a for a in args]
        return fn(*args, **{k: gpu if isinstance(v, torch.device) else v for k, v in kwargs.items()})

    return settings


def _tensors_device(op: str, *tensors: torch.Tensor) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


@contextlib.contextmanager
def recording(sink: Callable[[Launch], None]) -> Iterator[None]:
    """Run the op modules' host wrappers as on a GPU, handing every kernel launch to ``sink`` instead of running it.

    Needs Triton installed (its ``jit`` objects are what gets replaced), not a GPU. Not thread-safe: the patches
    are module attributes, undone on exit.
    """
    from fastdp.kernels import _triton

    if _triton.TRITON_IMPORT_ERROR is not None:
        raise _triton.TRITON_IMPORT_ERROR
    saved: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    try:
        patch(_triton, "interpreting", lambda: False)
        for short in OP_MODULES:
            mod = importlib.import_module(f"fastdp.kernels.{short}")
            for name in dir(mod):
                obj = getattr(mod, name)
                if name.endswith("_kernel") and hasattr(obj, "warmup"):
                    patch(mod, name, _Recorder(short, name, obj, sink))
                elif name.startswith("_settings") and callable(obj):
                    patch(mod, name, _on_gpu(obj))
            for name, value in (
                ("check_launchable", _tensors_device),
                ("interpreting", lambda: False),
                ("num_sms", lambda device: NUM_SMS),
            ):
                if hasattr(mod, name):
                    patch(mod, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
