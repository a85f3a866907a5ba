"""Triton, or a stand-in without it, plus the launch checks the four kernel files share.

The kernel files import ``triton`` and ``tl`` from here. Without Triton installed they still import (their
pure-torch ``*_ref`` functions are what the torch backend runs): ``triton.jit`` then returns a placeholder whose
launch raises the original ImportError with install instructions. The interpreter switch (``TRITON_INTERPRET=1``)
is read by ``triton.jit`` when a kernel file is imported, so set it before the first import.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    TRITON_IMPORT_ERROR: ImportError | None = None
except ImportError as _e:  # pragma: no cover - exercised only where triton is absent
    TRITON_IMPORT_ERROR = _e

    class _Unavailable:
        """What ``triton.jit`` returns without Triton: indexing it (``kernel[grid]``) raises."""

        def __init__(self, fn) -> None:
            self.fn = fn

        def __getitem__(self, grid):
            raise _missing()

    class _TritonStub:
        @staticmethod
        def jit(fn=None, **_kwargs):
            return _Unavailable(fn) if fn is not None else _Unavailable

    class _LanguageStub:
        constexpr = object  # only used in annotations of the kernel signatures

    triton = _TritonStub()  # type: ignore[assignment]
    tl = _LanguageStub()  # type: ignore[assignment]
    libdevice = None  # type: ignore[assignment]


def _missing() -> ImportError:
    return ImportError(
        "fastdp's Triton kernels need the `triton` package, which failed to import "
        f"({TRITON_IMPORT_ERROR}); install it with `pip install triton` (or `pip install fastdp[triton]`), "
        "or use backend='torch'."
    )


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4 reads the switch through its knobs
    if TRITON_IMPORT_ERROR is None and knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_launchable(op: str, *tensors: torch.Tensor) -> torch.device:
    """Raise unless ``tensors`` share one device the kernels can run on; return that device."""
    if TRITON_IMPORT_ERROR is not None:
        raise _missing()
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    (device,) = devices
    if device.type == "cpu" and not interpreting():
        raise ValueError(
            f"{op}: the Triton kernels need GPU tensors, got tensors on {device}; set TRITON_INTERPRET=1 before "
            "importing fastdp.kernels to run them (slowly) on the CPU, or use the torch backend."
        )
    return device


def on_tensor_device(fn: Callable) -> Callable:
    """Run a host wrapper with its tensors' GPU as the current device: Triton launches on the current device's
    stream, so a tensor on cuda:1 while cuda:0 is current would be read from the wrong device. The device is that of
    the first tensor among the arguments (lists of tensors included), or the ``device`` argument."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        device = _first_device(args, kwargs)
        if device is None or device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    return wrapper


def _first_device(args: tuple, kwargs: dict) -> torch.device | None:
    for value in (*args, *kwargs.values()):
        for item in value if isinstance(value, list | tuple) else (value,):
            if isinstance(item, torch.Tensor):
                return item.device
    device = kwargs.get("device")
    return None if device is None else torch.device(device)


def check_float(op: str, name: str, t: torch.Tensor, dtypes=(torch.float32, torch.bfloat16, torch.float16)) -> None:
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must be one of {allowed}, got {t.dtype}")


def check_dim(op: str, name: str, t: torch.Tensor, dim: int, layout: str) -> None:
    if t.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D {layout}, got shape {tuple(t.shape)}")


def check_layer_pair(op: str, a: torch.Tensor, delta: torch.Tensor) -> None:
    """a (B, T, d) and delta (B, T, p) of one linear layer: float, one dtype, the same B and T."""
    check_dim(op, "a", a, 3, "(B, T, d)")
    check_dim(op, "delta", delta, 3, "(B, T, p)")
    check_float(op, "a", a)
    if delta.dtype != a.dtype:
        raise TypeError(f"{op}: a and delta must have the same dtype, got {a.dtype} and {delta.dtype}")
    if a.shape[:2] != delta.shape[:2]:
        raise ValueError(
            f"{op}: a (B, T, d) and delta (B, T, p) must agree in B and T, got {tuple(a.shape)} and "
            f"{tuple(delta.shape)}"
        )


class Conv2dGeometry(NamedTuple):
    """A Conv2d call as the implicit-GEMM kernels take it: every field an int, padding explicit zeros."""

    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int
    dw: int
    ho: int
    wo: int
    augmult: int


def _pair(v: int | Sequence[int], name: str, op: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"{op}: {name} must be an int or a pair, got {v}")
    return v


def check_conv2d(
    op: str, x: torch.Tensor, delta: torch.Tensor, kernel_size, stride, padding, dilation, augmult: int
) -> Conv2dGeometry:
    """x (N, C, H, W) and delta (N, p, Ho, Wo) of one Conv2d (groups 1): float, one dtype, a valid geometry whose
    output size is delta's, and augmult dividing N. Ints or pairs in, the normalised geometry out."""
    check_dim(op, "x", x, 4, "(N, C, H, W)")
    check_dim(op, "delta", delta, 4, "(N, p, Ho, Wo)")
    check_float(op, "x", x)
    if delta.dtype != x.dtype:
        raise TypeError(f"{op}: x and delta must have the same dtype, got {x.dtype} and {delta.dtype}")
    kh, kw = _pair(kernel_size, "kernel_size", op)
    sh, sw = _pair(stride, "stride", op)
    ph, pw = _pair(padding, "padding", op)
    dh, dw = _pair(dilation, "dilation", op)
    if min(kh, kw, sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(
            f"{op}: kernel_size, stride, dilation must be >= 1 and padding >= 0, got kernel_size={(kh, kw)}, "
            f"stride={(sh, sw)}, padding={(ph, pw)}, dilation={(dh, dw)}"
        )
    N, _, H, W = x.shape
    K = int(augmult)
    if K < 1 or N % K:
        raise ValueError(f"{op}: augmult must be >= 1 and divide the {N} rows of x, got {augmult}")
    ho, wo = conv2d_output_size((H, W), (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    if ho < 1 or wo < 1:
        raise ValueError(f"{op}: the kernel {(kh, kw)} (dilation {(dh, dw)}) is larger than the padded input {(H, W)}")
    if delta.shape[0] != N or delta.shape[2:] != (ho, wo):
        raise ValueError(
            f"{op}: delta must be (N={N}, p, {ho}, {wo}) for x {tuple(x.shape)} with kernel {(kh, kw)}, stride "
            f"{(sh, sw)}, padding {(ph, pw)}, dilation {(dh, dw)}; got {tuple(delta.shape)}"
        )
    return Conv2dGeometry(kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, K)


def conv2d_output_size(size: Sequence[int], kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """(Ho, Wo) of a 2D convolution with explicit zero padding (all geometry as pairs)."""
    return tuple((size[i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1 for i in range(2))


def dot_precision(dtype: torch.dtype) -> str | None:
    """tl.dot input precision for operands of ``dtype``: "tf32x3" for fp32, the native tensor-core product otherwise.

    bf16/fp16 operands: their products are exact in fp32 (8 x 8 or 11 x 11 significant bits fit in 24), so the
    tensor cores lose nothing but the fp32 accumulation's rounding. fp32 operands: "tf32x3" (Triton's F32DotTC
    pass, the 3xTF32 scheme of CUTLASS) splits each operand into a head x_hi = tf32(x) (rounded to nearest) and a
    tail x - x_hi, which the TF32 MMA reads truncated to its 10-bit mantissa (x_lo), and forms
    x_lo y_hi + x_hi y_lo + x_hi y_hi as three TF32 MMAs (each product exact in fp32). ``dot_error_bound`` derives
    the error; per product it is below 5.01 * 2^-22 relative, against 2^-11 for plain "tf32". "ieee" would run on
    the FMA units at a small fraction of the tensor-core rate.
    """
    return "tf32x3" if dtype == torch.float32 else None


#: unit roundoff assumed for the fp32 accumulation: 2^-23, one ulp, twice round-to-nearest's 2^-24. NVIDIA tensor
#: cores align a step's addends to the largest and truncate (Fasi, Higham, Mikaitis, Pranesh 2021, "Numerical
#: behavior of NVIDIA tensor cores"), so an addition errs by up to one ulp of the larger operand, not half of one.
#: This is a model of the hardware, to be checked on a GPU against float64 (bench/gpu_validate.sh), not a proof.
U_ACC = 2.0**-23
#: the TF32 unit roundoff (10 stored mantissa bits)
U_TF32 = 2.0**-11


def dot_error_bound(dtype: torch.dtype, n: int) -> float:
    """epsilon(dtype, n) with |fl(x . y) - x . y| <= epsilon * (|x| . |y|) for a dot product of length n as ``mma``
    forms it from operands of ``dtype`` (any summation order: tensor-core trees, the loop over steps, split-K).

    Higham's bound for a sum of m terms in any order (Accuracy and Stability of Numerical Algorithms, 2nd ed.,
    eq. 3.5 and Lemma 3.1), with gamma_m = m u / (1 - m u), u = U_ACC:
      |fl(sum t_k) - sum t_k| <= gamma_m sum |t_k|.
    - bf16/fp16: the n products are exact, so epsilon = gamma_n.
    - fp32 by tf32x3: with u = U_TF32, x = x_hi + x_lo + e_x where |x - x_hi| <= u |x|, |x_lo| <= u |x| and
      |e_x| <= 2 u^2 |x| (the tail's truncation to TF32 errs by less than one TF32 ulp of a number <= u |x|), and
      |x_hi| <= (1 + u) |x|. The three products leave out
          x y - (x_hi y_hi + x_hi y_lo + x_lo y_hi) = x_hi e_y + x_lo y_lo + x_lo e_y + e_x y,
      at most u^2 (5 + 4 u) |x y|; the 3n computed terms sum to at most (1 + u)(1 + 3 u) |x| . |y| in magnitude
      and are added with gamma_{3n}. So epsilon = u^2 (5 + 4 u) + (1 + u)(1 + 3 u) gamma_{3n}.
    """
    if dtype in (torch.bfloat16, torch.float16):
        return _gamma(n)
    if dtype == torch.float32:
        u = U_TF32
        return u * u * (5 + 4 * u) + (1 + u) * (1 + 3 * u) * _gamma(3 * n)
    raise TypeError(f"dot_error_bound: no tensor-core path for {dtype}")


def _gamma(m: int) -> float:
    if m * U_ACC >= 1:
        raise ValueError(f"dot_error_bound: {m} fp32 additions leave no error bound")
    return m * U_ACC / (1 - m * U_ACC)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_at_least(n: int, lo: int, hi: int) -> int:
    """The smallest power of two >= n, clamped to [lo, hi]."""
    p = 1 << max(0, int(n) - 1).bit_length()
    return max(lo, min(hi, p))


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere: the interpreter runs one program at a time)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


#: grid axes 1 and 2 are limited to 65535 programs on CUDA
MAX_GRID_YZ = 65535


@triton.jit
def mma(x, y, acc, PRECISION: tl.constexpr, INTERP: tl.constexpr):
    """acc + x @ y. Under the interpreter (INTERP), whose tl.dot multiplies the raw 16-bit patterns of bf16, the
    operands are widened to fp32 first: bf16/fp16 products are exact in fp32, so this is what the tensor cores
    compute, up to the order of the fp32 additions."""
    if INTERP and x.dtype != tl.float32:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(x, y, acc, input_precision=PRECISION)


@triton.jit
def cast(x, DTYPE: tl.constexpr, INTERP: tl.constexpr):
    """fp32 x -> DTYPE, rounded to nearest even as on the GPU. The interpreter's fp32 -> bf16 conversion truncates,
    so there the rounding is done on the bit pattern (add 0x7FFF plus the lowest kept bit, drop 16 bits; inf and
    NaN stay what they are)."""
    if INTERP and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


def dot_flags(dtype: torch.dtype) -> dict:
    """The PRECISION / INTERP constexprs of ``mma`` for operands of ``dtype``."""
    return {"PRECISION": dot_precision(dtype), "INTERP": interpreting()}
