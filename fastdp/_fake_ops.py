"""Fake (meta) kernels of the ops ``torch.ops.fastdp.*`` that fastdp._C registers, so they trace under torch.compile.

torch.compile (Dynamo, AOTAutograd), torch.export and ``make_fx(tracing_mode="fake"|"symbolic")`` never run an op's
real kernel while tracing: they call it on FakeTensors (tensors with a shape, dtype, device and strides but no data)
to learn what it returns. csrc/bindings.cpp registers CPU and CUDA kernels only, which read ``data_ptr()``: without a
fake kernel Dynamo graph-breaks at the op (an error under ``fullgraph=True``: "Operator does not support running
with fake tensors"), and the ops returning nothing get a fake that torch generates and that checks nothing. The
kernels here compute the outputs' metadata as the C++ does (shape, dtype, device; contiguous outputs), return the
mutated argument (or nothing) where the schema says so, and repeat the C++ input checks that need no data, with the
same kind of error (a RuntimeError saying what was wrong and what was given), so a bad call fails while tracing
rather than inside the compiled code.

Keep them in step with csrc/bindings.cpp: tests/test_fake_ops.py runs ``torch.library.opcheck`` (schema, fake kernel
against the real one, autograd registration, AOTAutograd) on every op. fastdp._ext imports this module only once
fastdp._C has loaded (the ops must exist); ``compiled_with_cuda`` takes and returns no tensor and needs none.
What makes the ops traceable on the C++ side (csrc/bindings.cpp): ``philox_words`` has its kernel under
CompositeExplicitAutograd (a catch-all kernel would be run on the fakes), and the ops returning their mutated
argument carry the ``out`` / ``inplace`` tag so that AOTAutograd can functionalize them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

_FLOAT_GRADS = (torch.float32, torch.float64, torch.bfloat16)
_FLOAT_PARAMS = (torch.float32, torch.float64)


def _check(cond: bool, op: str, message: str) -> None:
    """TORCH_CHECK: a RuntimeError prefixed with the op's name (torch._check keeps symbolic sizes traceable)."""
    torch._check(cond, lambda: f"{op}: {message}")


def _acc_type(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the C++ kernels (bindings.cpp acc_type): float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sizes(t: torch.Tensor) -> list:
    return list(t.shape)


# ---- clip-and-reduce ------------------------------------------------------------------------------------------------


def _check_clip_reduce(grads: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None, op: str) -> None:
    """bindings.cpp check_clip_reduce (``out`` None: the functional op, whose out is made to pass them)."""
    _check(grads.dim() >= 1, op, "grads must be (B, ...) per-example gradients, got a 0-dim tensor")
    _check(grads.dtype in _FLOAT_GRADS, op, f"grads must be float32, float64 or bfloat16, got {grads.dtype}")
    _check(grads.is_contiguous(), op, f"grads must be contiguous, got sizes {_sizes(grads)} strides {grads.stride()}")
    batch = grads.shape[0]
    _check(
        weights.dim() == 1 and weights.shape[0] == batch,
        op,
        f"weights must be (B,) = ({batch},) like grads' first dimension, got sizes {_sizes(weights)}",
    )
    _check(weights.is_floating_point(), op, f"weights must be floating point, got {weights.dtype}")
    _check(
        weights.device == grads.device,
        op,
        f"weights must be on {grads.device} (the device of the first input), got {weights.device}",
    )
    if out is None:
        return
    _check(
        out.device == grads.device,
        op,
        f"out must be on {grads.device} (the device of the first input), got {out.device}",
    )
    _check(out.is_contiguous(), op, f"out must be contiguous, got sizes {_sizes(out)} strides {out.stride()}")
    _check(
        out.shape == grads.shape[1:],
        op,
        f"out must have grads' per-example shape {_sizes(grads)[1:]}, got {_sizes(out)}",
    )
    widened = grads.dtype == torch.bfloat16 and out.dtype == torch.float32
    _check(
        out.dtype == grads.dtype or widened,
        op,
        f"out must have grads' dtype {grads.dtype} (or float32 for bfloat16 grads), got {out.dtype}",
    )


def _clip_reduce_fake(grads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    _check_clip_reduce(grads, weights, None, "fastdp::clip_reduce")
    # at::empty(grads.sizes().slice(1), grads.options()): grads' dtype and device, contiguous
    return grads.new_empty(grads.shape[1:])


def _clip_reduce_out_fake(grads: torch.Tensor, weights: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    _check_clip_reduce(grads, weights, out, "fastdp::clip_reduce")
    return out


# ---- noisy optimizer step -------------------------------------------------------------------------------------------


def _check_finite(x: float, op: str, name: str) -> None:
    _check(math.isfinite(x), op, f"{name} must be finite, got {x}")


def _check_step(
    op: str,
    params: Sequence[torch.Tensor],
    sums: Sequence[torch.Tensor | None],
    states: Sequence[tuple[str, Sequence[torch.Tensor]]],
    offsets: Sequence[int],
    noise_std: float,
    batch_size: float,
    step: int,
) -> None:
    """bindings.cpp check_step; ``states`` holds (name, tensors) for each per-parameter state list the op uses."""
    n = len(params)
    _check(
        len(sums) == n,
        op,
        f"sums must have one entry (a tensor or None) per parameter: {n} parameters, got {len(sums)} sums",
    )
    _check(len(offsets) == n, op, f"offsets must have one entry per parameter: {n} parameters, got {len(offsets)}")
    for name, tensors in states:
        _check(len(tensors) == n, op, f"{name} must have one tensor per parameter: {n} parameters, got {len(tensors)}")
    _check(
        noise_std >= 0 and math.isfinite(noise_std),
        op,
        f"noise_std (sigma * C) must be finite and >= 0, got {noise_std}",
    )
    _check(
        batch_size > 0 and math.isfinite(batch_size),
        op,
        f"expected_batch_size must be finite and > 0, got {batch_size}",
    )
    _check(step >= 0, op, f"step must be >= 0, got {step}")
    if n == 0:
        return
    device, dtype = params[0].device, params[0].dtype
    _check(dtype in _FLOAT_PARAMS, op, f"parameters must be float32 or float64, got {dtype}")
    ranges = []
    for k, p in enumerate(params):
        _check(
            p.dtype == dtype,
            op,
            f"all parameters of one call must share a dtype: parameter 0 is {dtype}, parameter {k} is {p.dtype} "
            "(call once per dtype)",
        )
        _check(
            p.device == device,
            op,
            f"every parameter must be on {device} (the device of the first input), got {p.device}",
        )
        _check(p.is_contiguous(), op, f"parameter {k} must be contiguous, got sizes {_sizes(p)} strides {p.stride()}")

        def check_like(x: torch.Tensor, what: str, k: int = k, p: torch.Tensor = p) -> None:
            _check(x.shape == p.shape, op, f"{what} {k} must have its parameter's shape {_sizes(p)}, got {_sizes(x)}")
            _check(x.dtype == dtype, op, f"{what} {k} must have its parameter's dtype {dtype}, got {x.dtype}")
            _check(x.device == device, op, f"{what} {k} must be on {device}, got {x.device}")
            _check(x.is_contiguous(), op, f"{what} {k} must be contiguous, got strides {x.stride()}")

        if sums[k] is not None:
            check_like(sums[k], "sum")
        for name, tensors in states:
            check_like(tensors[k], name)
        _check(offsets[k] >= 0, op, f"offsets must be >= 0, got {offsets[k]} for parameter {k}")
        if p.numel() > 0:
            ranges.append((offsets[k], offsets[k] + p.numel()))
    # overlapping ranges would give two parameters the same noise: correlated noise breaks the privacy analysis
    ranges.sort()
    for (lo0, hi0), (lo1, hi1) in zip(ranges, ranges[1:], strict=False):
        _check(
            lo1 >= hi0,
            op,
            f"the parameters' noise ranges [offset, offset + numel) overlap: [{lo0}, {hi0}) and [{lo1}, {hi1}); lay "
            "the tensors end to end (offset of tensor k = sum of the numels before it)",
        )


def _noisy_sgd_step_fake(
    params: Sequence[torch.Tensor],
    sums: Sequence[torch.Tensor | None],
    momentum_buffers: Sequence[torch.Tensor],
    offsets: Sequence[int],
    noise_std: float,
    expected_batch_size: float,
    seed: int,
    step: int,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    first_step: bool,
) -> None:
    op = "fastdp::noisy_sgd_step_"
    for name, x in (("lr", lr), ("momentum", momentum), ("dampening", dampening), ("weight_decay", weight_decay)):
        _check_finite(x, op, name)
    _check(momentum >= 0, op, f"momentum must be >= 0, got {momentum}")
    _check(
        not nesterov or (momentum > 0 and dampening == 0),
        op,
        f"Nesterov momentum requires a momentum > 0 and zero dampening, got momentum {momentum}, dampening {dampening}",
    )
    states = [("momentum_buffers", momentum_buffers)] if momentum != 0 else []
    _check_step(op, params, sums, states, offsets, noise_std, expected_batch_size, step)


def _noisy_adam_step_fake(
    params: Sequence[torch.Tensor],
    sums: Sequence[torch.Tensor | None],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    offsets: Sequence[int],
    noise_std: float,
    expected_batch_size: float,
    seed: int,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    adam_step: int,
) -> None:
    op = "fastdp::noisy_adam_step_"
    for name, x in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        _check_finite(x, op, name)
    _check(0 <= beta1 < 1 and 0 <= beta2 < 1, op, f"betas must be in [0, 1), got ({beta1}, {beta2})")
    _check(adam_step >= 1, op, f"adam_step is the 1-based step count after this step's increment, got {adam_step}")
    states = [("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)]
    _check_step(op, params, sums, states, offsets, noise_std, expected_batch_size, step)


# ---- the noise stream -----------------------------------------------------------------------------------------------


def _philox_normal_fake(out: torch.Tensor, seed: int, step: int, offset: int) -> torch.Tensor:
    op = "fastdp::philox_normal_"
    _check(out.dtype == torch.float32, op, f"out must be float32, got {out.dtype}")
    _check(out.is_contiguous(), op, f"out must be contiguous, got sizes {_sizes(out)} strides {out.stride()}")
    _check(step >= 0 and offset >= 0, op, f"step and offset must be >= 0, got step {step}, offset {offset}")
    return out


def _philox_words_fake(ngroups: int, seed: int, step: int, group_offset: int) -> torch.Tensor:
    _check(
        ngroups >= 0 and step >= 0 and group_offset >= 0,
        "fastdp::philox_words",
        f"ngroups, step and group_offset must be >= 0, got {ngroups}, {step}, {group_offset}",
    )
    # at::empty({ngroups, 4}, kLong): the uint32 words held in int64, on the CPU (the op has no CUDA kernel)
    return torch.empty((ngroups, 4), dtype=torch.int64, device="cpu")


# ---- per-example squared norms of a linear layer --------------------------------------------------------------------


def _linear_sq_norms_fake(a: torch.Tensor, delta: torch.Tensor, grads: torch.Tensor | None = None) -> torch.Tensor:
    op = "fastdp::linear_sq_norms"
    # the CPU kernel only raises: fail while tracing rather than in the compiled code
    _check(
        a.device.type != "cpu",
        op,
        "fastdp::linear_sq_norms has a CUDA kernel only; on the CPU the engine's torch rules compute these norms "
        "(got CPU tensors)",
    )
    _check(
        a.dim() == 3 and delta.dim() == 3,
        op,
        f"a must be (B, T, d) and delta (B, T, p), got sizes {_sizes(a)} and {_sizes(delta)}",
    )
    _check(
        a.shape[0] == delta.shape[0] and a.shape[1] == delta.shape[1],
        op,
        f"a and delta must agree in B and T, got sizes {_sizes(a)} and {_sizes(delta)}",
    )
    _check(a.dtype == delta.dtype, op, f"a and delta must share a dtype, got {a.dtype} and {delta.dtype}")
    _check(a.dtype in _FLOAT_GRADS, op, f"a and delta must be float32, float64 or bfloat16, got {a.dtype}")
    _check(
        delta.device == a.device, op, f"delta must be on {a.device} (the device of the first input), got {delta.device}"
    )
    _check(a.is_contiguous(), op, f"a must be contiguous, got sizes {_sizes(a)} strides {a.stride()}")
    _check(delta.is_contiguous(), op, f"delta must be contiguous, got sizes {_sizes(delta)} strides {delta.stride()}")
    batch, d, p = a.shape[0], a.shape[2], delta.shape[2]
    if grads is not None:
        _check(
            grads.dim() == 3 and grads.shape[0] == batch and grads.shape[1] == p and grads.shape[2] == d,
            op,
            f"grads must be (B, p, d) = ({batch}, {p}, {d}), got sizes {_sizes(grads)}",
        )
        _check(grads.dtype == a.dtype, op, f"grads must have a's dtype {a.dtype}, got {grads.dtype}")
        _check(
            grads.device == a.device,
            op,
            f"grads must be on {a.device} (the device of the first input), got {grads.device}",
        )
        _check(
            grads.is_contiguous(), op, f"grads must be contiguous, got sizes {_sizes(grads)} strides {grads.stride()}"
        )
    # at::empty({B}, a.options().dtype(acc_type(a))): float64 for float64 inputs, float32 for float32 and bfloat16
    return a.new_empty((batch,), dtype=_acc_type(a.dtype))


# ---- the shifted ghost norm's summed Gram matrix ---------------------------------------------------------------------


#: bindings.cpp kMaxShiftAxis and kMaxShiftSide
_MAX_SHIFT_AXIS = 1 << 24
_MAX_SHIFT_SIDE = 2**31 - 1


def _shifted_gram_fake(
    gram: torch.Tensor,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    kernel: Sequence[int],
    dilation: Sequence[int],
    padding: Sequence[int],
    views: int,
) -> torch.Tensor:
    """bindings.cpp check_shifted_gram; at::empty({n, K O, K O}, gram.options())."""
    op = "fastdp::shifted_gram"
    nd = len(in_shape)
    _check(1 <= nd <= 3, op, f"in_shape must have 1 to 3 spatial sizes, got {list(in_shape)}")
    _check(
        len(out_shape) == nd and len(kernel) == nd and len(dilation) == nd and len(padding) == nd,
        op,
        f"out_shape, kernel, dilation and padding must have one entry per spatial axis of in_shape {list(in_shape)}, "
        f"got {list(out_shape)}, {list(kernel)}, {list(dilation)}, {list(padding)}",
    )
    _check(1 <= views <= _MAX_SHIFT_SIDE, op, f"views must be in [1, 2^31), got {views}")
    geometry = f"kernel {list(kernel)}, dilation {list(dilation)}, padding {list(padding)}"
    positions = 1
    for i, o, k, dil, pad in zip(in_shape, out_shape, kernel, dilation, padding, strict=True):
        _check(
            i >= 1 and k >= 1 and dil >= 1 and pad >= 0,
            op,
            f"sizes, kernel and dilation must be >= 1 and padding >= 0, got in_shape {list(in_shape)}, {geometry}",
        )
        _check(
            max(i, k, dil, pad) < _MAX_SHIFT_AXIS,
            op,
            f"sizes, kernel, dilation and padding must be below 2^24, got in_shape {list(in_shape)}, {geometry}",
        )
        expect = i + 2 * pad - dil * (k - 1)
        _check(
            o == expect and expect >= 1,
            op,
            f"out_shape {list(out_shape)} is not the stride-1 convolution's output size of in_shape "
            f"{list(in_shape)} ({geometry})",
        )
        positions *= i
        _check(
            views * positions <= _MAX_SHIFT_SIDE,
            op,
            f"a side of gram, views * prod(in_shape), must be below 2^31, got views {views} and in_shape "
            f"{list(in_shape)}",
        )
    _check(gram.dtype in _FLOAT_PARAMS, op, f"gram must be float32 or float64, got {gram.dtype}")
    side_in, side_out = views * math.prod(in_shape), views * math.prod(out_shape)
    _check(
        gram.dim() == 3 and gram.shape[1] == side_in and gram.shape[2] == side_in,
        op,
        f"gram must be (n, views * I, views * I) = (n, {side_in}, {side_in}) for in_shape {list(in_shape)} and "
        f"views {views}, got sizes {_sizes(gram)}",
    )
    _check(gram.is_contiguous(), op, f"gram must be contiguous, got sizes {_sizes(gram)} strides {gram.stride()}")
    return gram.new_empty((gram.shape[0], side_out, side_out))


# ---- registration ---------------------------------------------------------------------------------------------------

#: the fake kernel of every op of the fastdp library that takes or returns tensors (compiled_with_cuda needs none)
FAKES: dict[str, Callable[..., Any]] = {
    "fastdp::clip_reduce": _clip_reduce_fake,
    "fastdp::clip_reduce.out": _clip_reduce_out_fake,
    "fastdp::noisy_sgd_step_": _noisy_sgd_step_fake,
    "fastdp::noisy_adam_step_": _noisy_adam_step_fake,
    "fastdp::philox_normal_": _philox_normal_fake,
    "fastdp::philox_words": _philox_words_fake,
    "fastdp::linear_sq_norms": _linear_sq_norms_fake,
    "fastdp::shifted_gram": _shifted_gram_fake,
}


for _qualname, _fake in FAKES.items():
    torch.library.register_fake(_qualname, _fake)
