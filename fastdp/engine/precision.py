"""Full float32 precision for what decides and forms the clipped sum.

cuBLAS and cuDNN may run float32 matmuls and convolutions in TF32 (10-bit mantissa inputs, fp32 accumulation):
cuDNN does by default on Ampere and Hopper, and users switch cuBLAS on with
``torch.set_float32_matmul_precision("high")``; oneDNN has the same switches on CPUs with bf16/TF32 units. A
per-example norm computed so carries ~1e-3 relative error, so the clip bound C would hold only to ~1e-3: the
sensitivity, and with it the guarantee, would be larger than the one accounted for.

fastdp therefore computes every per-example norm, and the clipped sums weighted by the factors drawn from them,
with the inputs at their storage precision and fp32 (or wider) accumulation: inside ``full_fp32()`` the torch
strategies' float32 operands are never rounded to TF32 or bf16. The Triton kernels keep fp32 operands on the tensor
cores by tf32x3 (each operand split into two TF32 parts, three exact products: 5.01 * 2^-22 per product instead of
TF32's 2^-11; ``fastdp.kernels._triton.dot_error_bound``). Under bf16/fp16 autocast the operands already are 16-bit
tensors, which tensor cores multiply exactly and accumulate in fp32, so nothing is lost there. README "How exactly C
is enforced" states the resulting bound for each precision. The forward and the input gradient
(what autograd passes on) keep the user's setting: they define the gradient, not its clipping, and the norm and the
clipped sum are computed from the same tensors, so ||c_i g_i|| <= C holds for the g_i that is summed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# torch >= 2.9: per-backend "fp32_precision" ("ieee": never reduced). Older: the allow_tf32 flags. The two APIs must
# not be mixed (torch raises when it reads legacy flags set inconsistently through the new API), so one is chosen.
_NEW_API = [
    (mod, "fp32_precision")
    for mod in (
        getattr(torch.backends.cuda, "matmul", None),
        getattr(getattr(torch.backends, "cudnn", None), "conv", None),
        getattr(getattr(torch.backends, "mkldnn", None), "matmul", None),
        getattr(getattr(torch.backends, "mkldnn", None), "conv", None),
    )
    if mod is not None and hasattr(mod, "fp32_precision")
]
_KNOBS = (
    [(mod, attr, "ieee") for mod, attr in _NEW_API]
    if _NEW_API
    else [(torch.backends.cuda.matmul, "allow_tf32", False), (torch.backends.cudnn, "allow_tf32", False)]
)


@contextmanager
def full_fp32() -> Iterator[None]:
    """Float32 matmuls and convolutions at full precision (no TF32/bf16 operand rounding) inside the block."""
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in _KNOBS]
    try:
        for mod, attr, value in _KNOBS:
            setattr(mod, attr, value)
        yield
    finally:
        for mod, attr, value in saved:
            setattr(mod, attr, value)
