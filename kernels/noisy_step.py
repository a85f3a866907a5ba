"""Noise + scale + optimizer update over all parameters in one launch (multi-tensor apply).

For element k of parameter tensor j, with global noise index e = offset_j + k (tensors laid end to end in the
optimizer's order) and z the counter-based stream of ``fastdp.philox`` (Philox4x32-10 + Box-Muller, fp32):

    g = (S[k] + std * z[e]) / B                     std = sigma * C, B = expected batch size
    SGD   d = g + wd * p;  buf = d (first step) or mu * buf + d;  d = d + mu * buf (nesterov) or buf;
          p = p - lr * d                            (torch.optim.SGD, dampening = 0)
    Adam  g = g + wd * p (Adam) or p = p * (1 - lr * wd) (AdamW);  m = lerp(m, g, 1 - b1);
          v = b2 * v + (1 - b2) * g^2;  p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
                                                    (torch.optim.Adam / AdamW, amsgrad = False)

All arithmetic is fp32 whatever the parameter dtype; the state buffers have the parameter's dtype, as in torch.

Cost: memory-bound. Bytes per element (fp32): 12 (read p, S; write p) for plain SGD, 20 with momentum, 28 for
Adam. Compute per element: half a Philox4x32-10 (a group of 4 takes two: its words and the low words of its 64-bit
radius uniforms; 10 rounds of 2 mul-hi/lo pairs and 4 xors: ~50 integer ops), a few fp64 adds and muls for the exact
uniforms, half a log/sqrt/sin/cos: ~70-90 ops, below the memory bound on any recent GPU, so the step costs about one
pass over the optimizer state.

The multi-tensor launch. A parameter list is many tensors of any sizes; one program per BLOCK elements of one
tensor, all tensors in one grid:
- a pointer table, int64 (n_tensors, 8), of what persists across steps: addresses of p and the one or two state
  buffers, numel, the noise offset, flags (bit 1: the state exists, else it starts as torch starts it). Built once
  per set of tensors and cached on the device (keyed by the addresses, so a replaced parameter or a newly created
  state rebuilds it); in steady state no step builds or copies it.
- a sums vector, int64 (n_tensors,): this step's clipped-sum addresses (0: no sum, S = 0). The sums are fresh
  tensors each step; the vector is cached by value (the caching allocator tends to return the same blocks, so it
  hits too) and otherwise copied from pinned memory without a host sync.
- a block map, (n_blocks,) tensor index and (n_blocks,) start element, built once per (sizes, offsets, BLOCK)
  and cached on the device. Program q reads its row of the table and handles elements start .. start + BLOCK - 1.
Block starts are aligned to the noise stream's groups of 4 (a tensor whose offset is not a multiple of 4 starts
with a partly masked block), so each program computes two Philox calls per 4 elements and interleaves the 4
normals with tl.join, instead of one call per element. This beats one flat view because the parameters of an
nn.Module are separate allocations (a flat view would need a copy in and out, 2x the traffic) and beats a launch
per tensor (a ResNet has ~150 parameter tensors, most of them tiny). One launch per distinct (param dtype, sum
dtype) pair; mixed dtypes are rare. A block that lies wholly inside its tensor runs with a constant all-true mask
and, when every pointer is 16-byte aligned and every offset a multiple of 4, with alignment hints, so its loads
and stores are 16-byte vectors (sm_90 PTX: ld.global.v4); first and last blocks of a tensor run masked.
"""

from __future__ import annotations

import math
from collections.abc import MutableSequence, Sequence

import torch

from fastdp.kernels._triton import (
    cast,
    check_launchable,
    interpreting,
    libdevice,
    on_tensor_device,
    tl,
    triton,
)
from fastdp.philox import philox_normal as _philox_normal_torch

_MASK = 0xFFFFFFFF
_SGD, _ADAM, _ADAMW = 0, 1, 2
_OPTIMIZERS = {"sgd": _SGD, "adam": _ADAM, "adamw": _ADAMW}
_FLAG_HAS_STATE = 2


# ----------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors (Salmon et al. 2011), the round structure of fastdp.philox.philox4x32."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _philox_words(g, seed_lo, seed_hi, step_lo, step_hi, EXTENSION: tl.constexpr = False):
    """The four uint32 words of noise group(s) g (int64 tensor) of one (seed, step); with EXTENSION those at counter
    g + 2^63 (the top bit of the counter's high word: g < 2^61), whose words 0 and 2 extend the radius uniforms."""
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    if EXTENSION:
        c1 = c1 | 0x80000000
    zero = tl.zeros_like(c0)
    c2 = zero + step_lo.to(tl.uint32)
    c3 = zero + step_hi.to(tl.uint32)
    return _philox4x32_10(c0, c1, c2, c3, seed_lo.to(tl.uint32), seed_hi.to(tl.uint32))


@triton.jit
def _uniform64(x, y):
    # ((y + 0.5) 2^-32 + x) 2^-32 in fp64, rounded to fp32: the reference's operations (fastdp.philox.uniforms64)
    return (((y.to(tl.float64) + 0.5) * 2.3283064365386963e-10 + x.to(tl.float64)) * 2.3283064365386963e-10).to(
        tl.float32
    )


@triton.jit
def _uniform(x):
    # (x + 0.5) 2^-32 rounded once to fp32, exactly as the reference: x + 0.5 is exact in fp64, the scaling is a
    # power of two, so the only rounding is the final conversion (fp32 arithmetic would round x first).
    return ((x.to(tl.float64) + 0.5) * 2.3283064365386963e-10).to(tl.float32)


@triton.jit
def _box_muller(u0, u1, INTERP: tl.constexpr):
    # libdevice on the GPU: logf is correctly rounded to 1 ulp, sinf/cosf 2 ulp over the full range; tl.log /
    # tl.sin may lower to the approximate PTX instructions. The interpreter has no libdevice (numpy fp32 maths).
    t = u1 * 6.283185307179586  # fp32(2 pi) * u1, rounded to fp32 as torch does with a Python-float scalar
    if INTERP:
        r = tl.sqrt_rn(-2.0 * tl.log(u0))
        return r * tl.cos(t), r * tl.sin(t)
    else:
        r = libdevice.sqrt_rn(-2.0 * libdevice.log(u0))
        return r * libdevice.cos(t), r * libdevice.sin(t)


@triton.jit
def _philox_normal_block(e0, seed_lo, seed_hi, step_lo, step_hi, INTERP: tl.constexpr, BLOCK: tl.constexpr):
    """Noise elements e0 .. e0 + BLOCK - 1 (e0 a multiple of 4): two Philox calls per group of 4 (its words and
    its radii's low words, at counter g + 2^63), interleaved."""
    g = (e0 >> 2) + tl.arange(0, BLOCK // 4).to(tl.int64)
    x0, x1, x2, x3 = _philox_words(g, seed_lo, seed_hi, step_lo, step_hi)
    y0, _, y2, _ = _philox_words(g, seed_lo, seed_hi, step_lo, step_hi, EXTENSION=True)
    z0, z1 = _box_muller(_uniform64(x0, y0), _uniform(x1), INTERP)
    z2, z3 = _box_muller(_uniform64(x2, y2), _uniform(x3), INTERP)
    # join appends a last axis: [g, i, j] = (z0, z2)[i] if j == 0 else (z1, z3)[i], row-major z0 z1 z2 z3
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [BLOCK])


# seed and step words change every step: specialising on their values (== 1, divisible by 16) would recompile
_NOISE_KEY = ["seed_lo", "seed_hi", "step_lo", "step_hi"]


@triton.jit(do_not_specialize=_NOISE_KEY)
def _philox_normal_kernel(
    Z_ptr, numel, first, seed_lo, seed_hi, step_lo, step_hi, INTERP: tl.constexpr, BLOCK: tl.constexpr
):
    # element k of the output is noise element first + k; blocks start at k = q * BLOCK - first % 4 so that every
    # block starts on a group boundary
    q = tl.program_id(0).to(tl.int64)
    start = q * BLOCK - first % 4
    k = start + tl.arange(0, BLOCK)
    z = _philox_normal_block(first + start, seed_lo, seed_hi, step_lo, step_hi, INTERP, BLOCK)
    tl.store(Z_ptr + k, z, mask=(k >= 0) & (k < numel))


@triton.jit(do_not_specialize=_NOISE_KEY)
def _philox_words_kernel(W_ptr, n_groups, first_group, seed_lo, seed_hi, step_lo, step_hi, BLOCK: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = j < n_groups
    x0, x1, x2, x3 = _philox_words(first_group + j, seed_lo, seed_hi, step_lo, step_hi)
    tl.store(W_ptr + 4 * j, x0.to(tl.int64), mask=mask)
    tl.store(W_ptr + 4 * j + 1, x1.to(tl.int64), mask=mask)
    tl.store(W_ptr + 4 * j + 2, x2.to(tl.int64), mask=mask)
    tl.store(W_ptr + 4 * j + 3, x3.to(tl.int64), mask=mask)


@triton.jit
def _update_block(
    p_ptr,
    s_ptr,
    st1_ptr,
    st2_ptr,
    k,
    mask,
    has_sum,
    has_state,
    z,
    std,
    batch,
    lr,
    weight_decay,
    momentum,
    lerp_weight,
    beta2,
    eps,
    step_size,
    bias_correction2_sqrt,
    P_DTYPE: tl.constexpr,
    OPTIMIZER: tl.constexpr,
    MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    INTERP: tl.constexpr,
):
    """One block of the update; ``mask`` is a constant all-true block for full blocks (vectorised accesses)."""
    p = tl.load(p_ptr + k, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + k, mask=mask & has_sum, other=0.0).to(tl.float32)
    if HAS_NOISE:
        s = s + std * z
    g = tl.div_rn(s, batch)
    if OPTIMIZER == 0:  # SGD
        if WEIGHT_DECAY:
            g = g + weight_decay * p
        if MOMENTUM:
            buf = tl.load(st1_ptr + k, mask=mask & has_state, other=0.0).to(tl.float32)
            buf = tl.where(has_state, momentum * buf + g, g)
            tl.store(st1_ptr + k, cast(buf, P_DTYPE, INTERP), mask=mask)
            if NESTEROV:
                g = g + momentum * buf
            else:
                g = buf
        p = p - lr * g
    else:  # Adam (1) / AdamW (2); a missing state starts at m = v = 0, as torch's zeros
        if WEIGHT_DECAY:
            if OPTIMIZER == 2:
                p = p * (1.0 - lr * weight_decay)
            else:
                g = g + weight_decay * p
        m = tl.load(st1_ptr + k, mask=mask & has_state, other=0.0).to(tl.float32)
        v = tl.load(st2_ptr + k, mask=mask & has_state, other=0.0).to(tl.float32)
        # torch's lerp: a + w (b - a) for w < 0.5, else b - (b - a)(1 - w)
        if lerp_weight < 0.5:
            m = m + lerp_weight * (g - m)
        else:
            m = g - (g - m) * (1.0 - lerp_weight)
        v = v * beta2 + (1.0 - beta2) * (g * g)
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
        p = p - step_size * tl.div_rn(m, denom)
        tl.store(st1_ptr + k, cast(m, P_DTYPE, INTERP), mask=mask)
        tl.store(st2_ptr + k, cast(v, P_DTYPE, INTERP), mask=mask)
    tl.store(p_ptr + k, cast(p, P_DTYPE, INTERP), mask=mask)


@triton.jit(do_not_specialize=_NOISE_KEY)
def _noisy_step_kernel(
    TABLE_ptr,
    SUMS_ptr,
    BLOCK_TENSOR_ptr,
    BLOCK_START_ptr,
    std,
    batch,
    lr,
    weight_decay,
    momentum,
    lerp_weight,
    beta2,
    eps,
    step_size,
    bias_correction2_sqrt,
    seed_lo,
    seed_hi,
    step_lo,
    step_hi,
    P_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    OPTIMIZER: tl.constexpr,
    MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    INTERP: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    tensor = tl.load(BLOCK_TENSOR_ptr + pid).to(tl.int64)
    row = TABLE_ptr + tensor * 8
    start = tl.load(BLOCK_START_ptr + pid)  # int64, < 0 for a first block aligned to the noise groups
    p_ptr = tl.load(row).to(tl.pointer_type(P_DTYPE))
    s_addr = tl.load(SUMS_ptr + tensor)  # 0: no clipped sum (noise only)
    s_ptr = s_addr.to(tl.pointer_type(S_DTYPE))
    st1_ptr = tl.load(row + 2).to(tl.pointer_type(P_DTYPE))
    st2_ptr = tl.load(row + 3).to(tl.pointer_type(P_DTYPE))
    numel = tl.load(row + 4)
    noise_offset = tl.load(row + 5)
    flags = tl.load(row + 6)
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        s_ptr = tl.multiple_of(s_ptr, 16)
        st1_ptr = tl.multiple_of(st1_ptr, 16)
        st2_ptr = tl.multiple_of(st2_ptr, 16)
        start = tl.multiple_of(start, BLOCK)
    k = start + tl.arange(0, BLOCK)
    # per-tensor flags as blocks that are constant by construction (a scalar-by-block mask also trips the
    # interpreter)
    flags_b = tl.zeros([BLOCK], dtype=tl.int64) + flags
    has_sum = (tl.zeros([BLOCK], dtype=tl.int64) + s_addr) != 0
    has_state = (flags_b & 2) != 0
    if HAS_NOISE:
        z = _philox_normal_block(noise_offset + start, seed_lo, seed_hi, step_lo, step_hi, INTERP, BLOCK)
    else:
        z = tl.zeros([BLOCK], dtype=tl.float32)
    hyper = (std, batch, lr, weight_decay, momentum, lerp_weight, beta2, eps, step_size, bias_correction2_sqrt)
    if (start >= 0) & (start + BLOCK <= numel):
        # an all-true mask of known constancy lets the compiler use 16-byte accesses
        full = tl.full([BLOCK], 1, dtype=tl.int1)
        _update_block(
            p_ptr, s_ptr, st1_ptr, st2_ptr, k, full, has_sum, has_state, z, *hyper,
            P_DTYPE, OPTIMIZER, MOMENTUM, NESTEROV, WEIGHT_DECAY, HAS_NOISE, INTERP,
        )  # fmt: skip
    else:
        _update_block(
            p_ptr, s_ptr, st1_ptr, st2_ptr, k, (k >= 0) & (k < numel), has_sum, has_state, z, *hyper,
            P_DTYPE, OPTIMIZER, MOMENTUM, NESTEROV, WEIGHT_DECAY, HAS_NOISE, INTERP,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------ host wrappers

_TL_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _tl_dtype(dtype: torch.dtype):
    return getattr(tl, _TL_DTYPES[str(dtype).replace("torch.", "")])


def _settings(total_numel: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps). 1024 elements per program keeps 8 fp32 per thread in flight (two 16-byte loads) at 4
    warps; the interpreter runs programs one by one, so small blocks there only serve to cross block boundaries
    in small tests."""
    if device.type != "cuda":
        return (64, 1) if total_numel <= 4096 else (1024, 1)
    return (1024, 4) if total_numel >= 1 << 16 else (256, 2)


def _key_words(seed: int, step: int) -> tuple[int, int, int, int]:
    seed, step = int(seed), int(step)
    return seed & _MASK, (seed >> 32) & _MASK, step & _MASK, (step >> 32) & _MASK


_LAYOUT_CACHE: dict = {}
_TABLE_CACHE: dict = {}
_SUMS_CACHE: dict = {}
_CACHE_SIZE = 16


def _cached(cache: dict, key, build):
    hit = cache.get(key)
    if hit is None:
        if len(cache) >= _CACHE_SIZE:
            cache.pop(next(iter(cache)))
        hit = cache[key] = build()
    return hit


def _block_map(numels: tuple[int, ...], offsets: tuple[int, ...], block: int, device: torch.device):
    """(tensor index int32, start int64) per program; a tensor's first block starts offset % 4 elements early."""

    def build():
        idx, starts = [], []
        for j, (n, o) in enumerate(zip(numels, offsets, strict=True)):
            r = o % 4
            for q in range(-(-(n + r) // block)):
                idx.append(j)
                starts.append(q * block - r)
        return (
            torch.tensor(idx, dtype=torch.int32).to(device),
            torch.tensor(starts, dtype=torch.int64).to(device),
        )

    return _cached(_LAYOUT_CACHE, (numels, offsets, block, str(device)), build)


def _pointer_table(rows: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    """The static part of the table, (n, 8) int64 on the device: what persists across steps (parameters, optimizer
    state, sizes, offsets, flags). Built once per set of tensors; in steady state every step hits the cache."""
    return _cached(_TABLE_CACHE, (rows, str(device)), lambda: _to_device(rows, device))


def _sum_pointers(addresses: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(n,) int64 addresses of this step's clipped sums (0: none). The sums are fresh tensors each step, so this is
    the part that may change; cached by value (the caching allocator tends to hand out the same blocks), and on a
    miss copied without a host sync."""
    return _cached(_SUMS_CACHE, (addresses, str(device)), lambda: _to_device(addresses, device))


def _to_device(values: tuple, device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return t.to(device)
    # pinned staging + non_blocking: the copy is queued on the stream, the host does not wait (a pageable copy would
    # drain the queue); torch's caching host allocator keeps the pinned block until the copy has run
    return t.pin_memory().to(device, non_blocking=True)


@on_tensor_device
def noisy_step(
    params: Sequence[torch.Tensor],
    sums: Sequence[torch.Tensor | None],
    *,
    std: float,
    expected_batch_size: int,
    seed: int,
    step: int,
    offsets: Sequence[int] | None = None,
    optimizer: str = "sgd",
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    nesterov: bool = False,
    momentum_buffers: MutableSequence[torch.Tensor | None] | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    exp_avgs: MutableSequence[torch.Tensor | None] | None = None,
    exp_avg_sqs: MutableSequence[torch.Tensor | None] | None = None,
    adam_step: int = 1,
) -> None:
    """Noise, divide by B and apply one optimizer update to every tensor of ``params``, in place, in one launch
    per distinct (param dtype, sum dtype) pair.

    Args:
        params: contiguous parameter tensors (fp32, bf16 or fp16), updated in place.
        sums: the clipped per-example gradient sums, one per parameter with its shape (None: zero, noise only).
        std: noise standard deviation sigma * C (0: no noise).
        expected_batch_size: B; the gradient is (S + std z) / B.
        seed, step: the noise stream's key and step (fastdp.philox).
        offsets: global noise index of each tensor's first element; default: the tensors laid end to end from 0.
        optimizer: "sgd", "adam" or "adamw".
        lr, weight_decay: as torch.optim (L2 for SGD and Adam, decoupled for AdamW).
        momentum, nesterov, momentum_buffers: SGD (dampening 0). With momentum > 0, ``momentum_buffers`` holds one
            buffer per parameter; None entries start a buffer (buf = d_p, as torch's first step) and are replaced
            in the list by the new tensor.
        betas, eps, exp_avgs, exp_avg_sqs, adam_step: Adam/AdamW; ``adam_step`` is the step count t >= 1 of the
            bias corrections (the value after torch's ``step += 1``); None entries of the state lists start from
            zero and are replaced in the lists by the new tensors.
    """
    op = "noisy_step"
    params, sums = list(params), list(sums)
    n = len(params)
    if len(sums) != n:
        raise ValueError(f"{op}: got {n} params and {len(sums)} sums; give one sum (or None) per parameter")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"{op}: optimizer must be one of {sorted(_OPTIMIZERS)}, got {optimizer!r}")
    kind = _OPTIMIZERS[optimizer]
    if int(expected_batch_size) != expected_batch_size or expected_batch_size < 1:
        raise ValueError(f"{op}: expected_batch_size must be a positive integer, got {expected_batch_size}")
    if not (std >= 0 and math.isfinite(std)):
        raise ValueError(f"{op}: std must be a finite number >= 0, got {std}")
    if kind != _SGD and int(adam_step) < 1:
        raise ValueError(f"{op}: adam_step is the bias-correction step count (>= 1), got {adam_step}")
    if kind == _SGD and (nesterov and momentum <= 0):
        raise ValueError(f"{op}: nesterov needs momentum > 0, got momentum={momentum}")
    if offsets is None:
        offsets, o = [], 0
        for p in params:
            offsets.append(o)
            o += p.numel()
    offsets = [int(o) for o in offsets]
    if len(offsets) != n or any(o < 0 for o in offsets):
        raise ValueError(f"{op}: offsets must be {n} non-negative integers, got {offsets}")
    if n == 0:
        return
    device = check_launchable(op, *params, *(s for s in sums if s is not None))

    # state lists: validate, then allocate the missing entries
    states: list[MutableSequence] = []
    if kind == _SGD and momentum > 0:
        states = [momentum_buffers if momentum_buffers is not None else [None] * n]
    elif kind != _SGD:
        states = [
            exp_avgs if exp_avgs is not None else [None] * n,
            exp_avg_sqs if exp_avg_sqs is not None else [None] * n,
        ]
    for name, lst in zip(("momentum_buffers/exp_avgs", "exp_avg_sqs"), states, strict=False):
        if len(lst) != n:
            raise ValueError(f"{op}: {name} must have one entry per parameter ({n}), got {len(lst)}")
    has_state = [all(lst[j] is not None for lst in states) if states else False for j in range(n)]

    groups: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for j, (p, s) in enumerate(zip(params, sums, strict=True)):
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{op}: params[{j}] must be float32, bfloat16 or float16, got {p.dtype}")
        if not p.is_contiguous():
            raise ValueError(
                f"{op}: params[{j}] (shape {tuple(p.shape)}, strides {p.stride()}) is not contiguous; the noise "
                "index follows the row-major element order, so make the parameter contiguous"
            )
        if s is not None:
            if s.shape != p.shape:
                raise ValueError(f"{op}: sums[{j}] has shape {tuple(s.shape)}, params[{j}] has {tuple(p.shape)}")
            if s.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise TypeError(f"{op}: sums[{j}] must be float32, bfloat16 or float16, got {s.dtype}")
            if not s.is_contiguous():
                sums[j] = s.contiguous()
        for lst in states:
            t = lst[j]
            if t is None:
                continue
            if t.shape != p.shape or t.dtype != p.dtype or t.device != p.device or not t.is_contiguous():
                raise ValueError(
                    f"{op}: optimizer state for params[{j}] must be a contiguous {p.dtype} tensor of shape "
                    f"{tuple(p.shape)} on {p.device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
                )
        for lst in states:
            if lst[j] is None:
                lst[j] = torch.empty_like(p, memory_format=torch.contiguous_format)
        if p.numel():
            groups.setdefault((p.dtype, p.dtype if sums[j] is None else sums[j].dtype), []).append(j)

    seed_lo, seed_hi, step_lo, step_hi = _key_words(seed, step)
    b1, b2 = float(betas[0]), float(betas[1])
    t = int(adam_step)
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    step_size = lr / bc1 if kind != _SGD else 0.0
    bc2_sqrt = math.sqrt(bc2) if kind != _SGD else 1.0
    for (p_dtype, s_dtype), idx in groups.items():
        total = sum(params[j].numel() for j in idx)
        block, num_warps = _settings(total, device)
        rows, sum_ptrs, aligned = [], [], True
        for j in idx:
            p, s = params[j], sums[j]
            st1 = states[0][j] if states else None
            st2 = states[1][j] if len(states) > 1 else None
            ptrs = [p.data_ptr(), 0 if s is None else s.data_ptr()]
            ptrs += [0 if st is None else st.data_ptr() for st in (st1, st2)]
            aligned &= all(a % 16 == 0 for a in ptrs) and offsets[j] % 4 == 0
            rows.append((ptrs[0], 0, ptrs[2], ptrs[3], p.numel(), offsets[j], _FLAG_HAS_STATE * has_state[j], 0))
            sum_ptrs.append(ptrs[1])
        table = _pointer_table(tuple(rows), device)
        sums_table = _sum_pointers(tuple(sum_ptrs), device)
        blk_tensor, blk_start = _block_map(
            tuple(params[j].numel() for j in idx), tuple(offsets[j] for j in idx), block, device
        )
        _noisy_step_kernel[(blk_tensor.numel(),)](
            table,
            sums_table,
            blk_tensor,
            blk_start,
            float(std),
            float(expected_batch_size),
            float(lr),
            float(weight_decay),
            float(momentum),
            1.0 - b1,
            b2,
            float(eps),
            float(step_size),
            float(bc2_sqrt),
            seed_lo,
            seed_hi,
            step_lo,
            step_hi,
            P_DTYPE=_tl_dtype(p_dtype),
            S_DTYPE=_tl_dtype(s_dtype),
            OPTIMIZER=kind,
            MOMENTUM=kind == _SGD and momentum > 0,
            NESTEROV=bool(nesterov),
            WEIGHT_DECAY=weight_decay != 0,
            HAS_NOISE=std > 0,
            INTERP=interpreting(),
            ALIGNED=aligned,
            BLOCK=block,
            num_warps=num_warps,
        )


@on_tensor_device
def philox_normal(numel: int, seed: int, step: int, offset: int = 0, device=None) -> torch.Tensor:
    """Noise elements ``offset .. offset + numel - 1`` of step ``step`` (fp32), from the Triton kernel; the same
    stream as fastdp.philox.philox_normal."""
    device = torch.device("cuda" if device is None else device)
    z = torch.empty(int(numel), dtype=torch.float32, device=device)
    check_launchable("philox_normal", z)
    if numel == 0:
        return z
    block, _ = _settings(numel, device)
    # one Philox group (4 elements) per thread: at 8 elements per thread ptxas spilled 4 bytes (sm_80 and sm_90)
    num_warps = max(1, block // 128)
    seed_lo, seed_hi, step_lo, step_hi = _key_words(seed, step)
    grid = (-(-(numel + offset % 4) // block),)
    _philox_normal_kernel[grid](
        z, numel, int(offset), seed_lo, seed_hi, step_lo, step_hi, interpreting(), block, num_warps=num_warps
    )
    return z


@on_tensor_device
def philox_words(n_groups: int, seed: int, step: int, first_group: int = 0, device=None) -> torch.Tensor:
    """(n_groups, 4) int64: the uint32 Philox words of groups ``first_group ..`` (for bit-exact tests)."""
    device = torch.device("cuda" if device is None else device)
    w = torch.empty(int(n_groups), 4, dtype=torch.int64, device=device)
    check_launchable("philox_words", w)
    if n_groups == 0:
        return w
    block = 64
    seed_lo, seed_hi, step_lo, step_hi = _key_words(seed, step)
    grid = (-(-n_groups // block),)
    _philox_words_kernel[grid](w, n_groups, int(first_group), seed_lo, seed_hi, step_lo, step_hi, block)
    return w


def noisy_optimizer_step(
    optimizer: torch.optim.Optimizer,
    sums: Sequence[torch.Tensor | None],
    *,
    std: float,
    expected_batch_size: int,
    seed: int,
    step: int,
    offset: int = 0,
) -> None:
    """``noisy_step`` driven by a torch.optim SGD / Adam / AdamW: reads its param groups and keeps its state
    (momentum_buffer; exp_avg, exp_avg_sq, step) exactly as its own ``step()`` would, through the optimizer-state
    adapter every fused backend shares (fastdp.fused_step).

    Args:
        optimizer: a torch.optim.SGD, Adam or AdamW (dampening 0, amsgrad and maximize off).
        sums: one clipped sum (or None) per parameter, in the optimizer's order (groups concatenated).
        std, expected_batch_size, seed, step: as ``noisy_step``.
        offset: the noise index of the optimizer's first element; tensors are laid end to end from there.
    """
    from fastdp.backends.triton import TritonBackend
    from fastdp.fused_step import finish, launches, step_kind

    op = "noisy_optimizer_step"
    kind = step_kind(optimizer)
    if kind is None:
        raise TypeError(
            f"{op}: supports torch.optim.SGD, Adam and AdamW without maximize/amsgrad/capturable/differentiable, "
            f"got {type(optimizer).__name__}"
        )
    if any(g.get("dampening", 0) != 0 for g in optimizer.param_groups):
        raise ValueError(f"{op}: SGD dampening must be 0, got {[g.get('dampening') for g in optimizer.param_groups]}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sums = list(sums)
    if len(sums) != len(params):
        raise ValueError(f"{op}: the optimizer has {len(params)} parameters, got {len(sums)} sums")
    backend = TritonBackend(device_type=params[0].device.type if params else "cuda")
    by_param = {p: s for p, s in zip(params, sums, strict=True) if s is not None}
    for launch in launches(optimizer, by_param, kind, updated=lambda p: True):  # every tensor, as torch.optim
        launch.offsets = [o + int(offset) for o in launch.offsets]
        backend.noisy_step(launch, std, expected_batch_size, seed, step)
        finish(optimizer, launch)


# ---------------------------------------------------------------------------------------------------- reference


def noisy_step_ref(
    optimizer: torch.optim.Optimizer,
    sums: Sequence[torch.Tensor | None],
    *,
    std: float,
    expected_batch_size: int,
    seed: int,
    step: int,
    offset: int = 0,
) -> None:
    """The same update in plain torch: g = (S + std * philox_normal) / B as each parameter's ``.grad``, then the
    optimizer's own ``step()``."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    o = int(offset)
    for p, s in zip(params, sums, strict=True):
        g = torch.zeros_like(p, dtype=torch.float32) if s is None else s.to(torch.float32, copy=True)
        if std > 0:
            g.add_(_philox_normal_torch(p.numel(), seed, step, o, device=p.device).view(p.shape), alpha=std)
        p.grad = g.div_(expected_batch_size).to(p.dtype)
        o += p.numel()
    optimizer.step()
