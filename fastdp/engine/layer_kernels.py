"""The fused per-layer kernels a backend offers the plan, registered by backend name.

A rule offers its ``fused_*`` strategies (rules/linear.py, rules/conv.py) only where the engine's backend has the
kernel and the kernel takes the layer's tensors (device, dtype); everywhere else the torch strategies run. The
kernels compute exactly what the torch strategies compute, in fp32 with fp32 accumulation:

- ``linear_norm(a, delta, out)``        ||delta_i^T a_i||_F^2 for a (B, T, d), delta (B, T, p); ``out`` (B, p, d) or
                                        None receives G_i (the fused_keep plan),
- ``linear_ghost_norm(a, delta)``       the same norm from tiles of the two Gram matrices (T > 1),
- ``linear_bookkeeping(a, delta, w)``   sum_i w_i delta_i^T a_i, (p, d),
- ``conv2d_norm(x, delta, geom, K, out)``        the per-example norm of a Conv2d (groups 1) by implicit GEMM,
- ``conv2d_bookkeeping(x, delta, w, geom, K)``   its clipped sum, (p, C, kh, kw).

A missing entry (None) means the torch strategy does that part (e.g. ``cuda`` has the linear norm only; its
book-keeping GEMMs are cuBLAS's / cuDNN's through torch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastdp.backends import Backend


@dataclass(frozen=True)
class LayerKernels:
    #: the device type the kernels take tensors on ('cuda'; 'cpu' only in Triton's interpreter, for tests)
    device_type: str
    dtypes: tuple[torch.dtype, ...]
    linear_norm: Callable | None = None
    linear_ghost_norm: Callable | None = None
    linear_bookkeeping: Callable | None = None
    conv2d_norm: Callable | None = None
    conv2d_bookkeeping: Callable | None = None

    def takes(self, t: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether the kernels run on ``t``'s device for operands of ``dtype`` (the rule's accumulation dtype)."""
        return t.device.type == self.device_type and dtype in self.dtypes


def _triton(device_type: str) -> LayerKernels:
    from fastdp.kernels import clip_reduce as cr
    from fastdp.kernels import ghost_norm as gn
    from fastdp.kernels import per_sample_norm as psn

    def conv2d_norm(x, delta, geom, augmult, out=None):
        return psn.per_sample_norm_conv2d(
            x, delta, geom.kernel, stride=geom.stride, padding=geom.padding, dilation=geom.dilation,
            augmult=augmult, out=out,
        )  # fmt: skip

    def conv2d_bookkeeping(x, delta, w, geom, augmult):
        return cr.clip_reduce_bookkeeping_conv2d(
            x, delta, w, geom.kernel, stride=geom.stride, padding=geom.padding, dilation=geom.dilation,
            augmult=augmult,
        )  # fmt: skip

    return LayerKernels(
        device_type=device_type,
        dtypes=(torch.float32, torch.bfloat16, torch.float16),
        linear_norm=lambda a, d, out=None: psn.per_sample_norm(a, d, out=out),
        linear_ghost_norm=gn.ghost_norm,
        linear_bookkeeping=cr.clip_reduce_bookkeeping,
        conv2d_norm=conv2d_norm,
        conv2d_bookkeeping=conv2d_bookkeeping,
    )


def _cuda(device_type: str) -> LayerKernels:
    def linear_norm(a, d, out=None):
        # the CUDA kernel reads dense rows; the rules' a and delta are views of contiguous activations already
        return torch.ops.fastdp.linear_sq_norms(a.contiguous(), d.contiguous(), out)

    dtypes = (torch.float32, torch.float64, torch.bfloat16)
    return LayerKernels(device_type=device_type, dtypes=dtypes, linear_norm=linear_norm)


_REGISTRY: dict[str, Callable[[str], LayerKernels]] = {"triton": _triton, "cuda": _cuda}
_CACHE: dict[tuple[str, str], LayerKernels] = {}


def layer_kernels(backend: Backend) -> LayerKernels | None:
    """The fused layer kernels of ``backend`` (None for backends without any: torch, cpp)."""
    make = _REGISTRY.get(backend.name)
    if make is None or backend.device_type is None:
        return None
    key = (backend.name, backend.device_type)
    if key not in _CACHE:
        _CACHE[key] = make(backend.device_type)
    return _CACHE[key]
