"""Clip-and-reduce: the clipped sum S = sum_i c_i G_i, from kept per-example gradients or by book-keeping.

(a) ``clip_reduce``: G (B, *shape) kept per-example gradients, c (B,) clip factors -> S (*shape).
    Memory-bound: reads G once (B P elements for P = prod(shape)), 2 B P FLOPs. Grid (P-tiles, B-splits): a
    program owns BLOCK_P consecutive columns and walks BLOCK_B rows at a time, accumulating c_b G[b] in fp32.
    Few columns and many rows (a bias over a large batch) would leave most of the GPU idle, so the rows are split
    over more programs when the P-tiles alone cannot fill it; the splits' fp32 partials (split, P) are then summed
    by a second pass (deterministic, no atomics).
(b) ``clip_reduce_bookkeeping``: the book-keeping GEMM S = A^T diag(c) Delta = sum_i c_i delta_i^T a_i for
    a (B, T, d), delta (B, T, p) -> (p, d): the ordinary weight gradient with delta's rows scaled by their example's
    factor inside the kernel (no scaled copy of delta in memory). 2 B T p d FLOPs; reads B T (d + p) elements once
    per tile row/column. Grid (p-tiles x d-tiles, splits of the B*T rows): split-K when the output tiles alone
    cannot fill the GPU (a 16 x 27 first conv over 10^6 rows has one tile); fp32 partials summed by a second pass.
    c_b delta[b, t] is rounded to the input dtype before the dot, as the torch book-keeping does.
"""

from __future__ import annotations

import math

import torch

from fastdp.kernels._triton import (
    MAX_GRID_YZ,
    cast,
    cdiv,
    check_float,
    check_launchable,
    check_layer_pair,
    dot_flags,
    interpreting,
    mma,
    num_sms,
    pow2_at_least,
    tl,
    triton,
)

# ----------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _clip_reduce_kernel(
    G_ptr,
    C_ptr,
    OUT_ptr,
    B,
    P,
    stride_gb,
    rows_per_split,
    INTERP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    split = tl.program_id(1)
    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, B)
    rb = tl.arange(0, BLOCK_B)
    acc = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)
    for b0 in range(lo, hi, BLOCK_B):
        rows = b0 + rb
        ok = rows < hi
        c = tl.load(C_ptr + rows, mask=ok, other=0.0)
        g = tl.load(
            G_ptr + rows.to(tl.int64)[:, None] * stride_gb + cols[None, :],
            mask=ok[:, None] & (cols[None, :] < P),
            other=0.0,
        )
        acc += c[:, None] * g.to(tl.float32)
    s = cast(tl.sum(acc, axis=0), OUT_ptr.dtype.element_ty, INTERP)
    tl.store(OUT_ptr + split.to(tl.int64) * P + cols, s, mask=cols < P)


@triton.jit
def _clip_reduce_bookkeeping_kernel(
    A_ptr,
    D_ptr,
    C_ptr,
    OUT_ptr,
    T,
    DA,
    DP,
    N,
    stride_ab,
    stride_at,
    stride_ad,
    stride_db,
    stride_dt,
    stride_dp,
    rows_per_split,
    n_tiles_d,
    PRECISION: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    rp = (tile // n_tiles_d) * BLOCK_P + tl.arange(0, BLOCK_P)
    rd = (tile % n_tiles_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    lo = split.to(tl.int64) * rows_per_split
    hi = tl.minimum(lo + rows_per_split, N)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_R):
        r = r0 + rr  # flat row b * T + t of the micro-batch
        ok = r < hi
        b = r // T
        t = r % T
        c = tl.load(C_ptr + b, mask=ok, other=0.0)
        d_t = tl.load(
            D_ptr + b[None, :] * stride_db + t[None, :] * stride_dt + rp[:, None] * stride_dp,
            mask=ok[None, :] & (rp[:, None] < DP),
            other=0.0,
        )
        d_t = cast(d_t.to(tl.float32) * c[None, :], D_ptr.dtype.element_ty, INTERP)
        a = tl.load(
            A_ptr + b[:, None] * stride_ab + t[:, None] * stride_at + rd[None, :] * stride_ad,
            mask=ok[:, None] & (rd[None, :] < DA),
            other=0.0,
        )
        acc = mma(d_t, a, acc, PRECISION, INTERP)
    out = OUT_ptr + split.to(tl.int64) * DP * DA + rp[:, None] * DA + rd[None, :]
    tl.store(out, cast(acc, OUT_ptr.dtype.element_ty, INTERP), mask=(rp[:, None] < DP) & (rd[None, :] < DA))


# ------------------------------------------------------------------------------------------------ host wrappers


def _settings(B: int, P: int, device: torch.device) -> dict:
    """(a): BLOCK_P columns x BLOCK_B rows in flight per program (16 fp32 per thread at 4 warps); the B-split
    makes at least ~4 programs per SM when P alone does not. Interpreter: small tiles, no split, unless B is
    large, so tests cover both paths."""
    if device.type != "cuda":
        block_b, block_p = 4, 32
        split = 2 if B > 2 * block_b else 1
        return {"BLOCK_B": block_b, "BLOCK_P": block_p, "split": split, "num_warps": 1}
    block_b, block_p = 16, 256
    want = 4 * num_sms(device)
    split = max(1, min(cdiv(want, cdiv(P, block_p)), cdiv(B, 4 * block_b), MAX_GRID_YZ))
    return {"BLOCK_B": block_b, "BLOCK_P": block_p, "split": split, "num_warps": 4}


def _settings_bookkeeping(n_rows: int, p: int, d: int, dtype: torch.dtype, device: torch.device) -> dict:
    """(b): a 64 x 64 fp32 output tile (64 x 128 for bf16/fp16) and BLOCK_R rows per step; split-K over the rows
    up to ~2 programs per SM, keeping at least 8 row steps per split so the partials stay a small fraction of the
    traffic. Interpreter: minimum tiles; two splits when there are enough rows, so tests cover the partials."""
    if device.type != "cuda":
        block_r = 16
        split = 2 if n_rows > 2 * block_r else 1
        return {"BLOCK_R": block_r, "BLOCK_P": 16, "BLOCK_D": 16, "split": split, "num_warps": 1}
    half = dtype != torch.float32
    block_r = 32 if half else 16
    block_p = pow2_at_least(p, 16, 64)
    block_d = pow2_at_least(d, 16, 128 if half else 64)
    tiles = cdiv(p, block_p) * cdiv(d, block_d)
    split = max(1, min(cdiv(2 * num_sms(device), tiles), cdiv(n_rows, 8 * block_r), MAX_GRID_YZ))
    return {
        "BLOCK_R": block_r,
        "BLOCK_P": block_p,
        "BLOCK_D": block_d,
        "split": split,
        "num_warps": 4,
        "num_stages": 3 if half else 2,
    }


def _weights(op: str, c: torch.Tensor, B: int, device: torch.device) -> torch.Tensor:
    if c.dim() != 1 or c.shape[0] != B:
        raise ValueError(f"{op}: the clip factors must be a ({B},) vector, one per example, got {tuple(c.shape)}")
    if not c.is_floating_point():
        raise TypeError(f"{op}: the clip factors must be floating point, got {c.dtype}")
    if c.device != device:
        raise ValueError(f"{op}: the clip factors are on {c.device}, the gradients on {device}")
    return c.to(torch.float32).contiguous()


def clip_reduce(grads: torch.Tensor, c: torch.Tensor, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """S = sum_i c_i G_i over kept per-example gradients.

    Args:
        grads: (B, *shape) per-example gradients (fp32, bf16 or fp16); rows may be strided, each row's elements
            must be one dense block (else it is copied once).
        c: (B,) clip factors.
        out_dtype: dtype of S (default: the gradients'); accumulation is fp32 either way.

    Returns:
        S of shape ``grads.shape[1:]``.
    """
    op = "clip_reduce"
    if grads.dim() < 1:
        raise ValueError(f"{op}: grads must be (B, *shape), got a 0-d tensor")
    check_float(op, "grads", grads)
    B, shape = grads.shape[0], grads.shape[1:]
    device = check_launchable(op, grads)
    w = _weights(op, c, B, device)
    out_dtype = grads.dtype if out_dtype is None else out_dtype
    g = grads.reshape(B, math.prod(shape))
    if g.shape[1] > 1 and g.stride(1) != 1:
        g = g.contiguous()
    P = g.shape[1]
    if B == 0 or P == 0:
        return torch.zeros(shape, dtype=out_dtype, device=device)
    cfg = _settings(B, P, device)
    split = min(cfg.pop("split"), cdiv(B, cfg["BLOCK_B"]))
    rows = cdiv(cdiv(B, split), cfg["BLOCK_B"]) * cfg["BLOCK_B"]
    split = cdiv(B, rows)
    buf = torch.empty(P, dtype=out_dtype, device=device) if split == 1 else torch.empty(split, P, device=device)
    _clip_reduce_kernel[(cdiv(P, cfg["BLOCK_P"]), split)](
        g, w, buf, B, P, g.stride(0), rows, INTERP=interpreting(), **cfg
    )
    s = buf if split == 1 else buf.sum(0).to(out_dtype)
    return s.view(shape)


def clip_reduce_bookkeeping(
    a: torch.Tensor, delta: torch.Tensor, c: torch.Tensor, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """S = sum_i c_i delta_i^T a_i = A^T diag(c) Delta, the book-keeping clipped sum of a linear layer.

    Args:
        a: (B, T, d) layer inputs (fp32, bf16 or fp16; any strides).
        delta: (B, T, p) gradients w.r.t. the layer outputs, same dtype.
        c: (B,) clip factors.
        out_dtype: dtype of S (default: the inputs'); accumulation is fp32 either way.

    Returns:
        (p, d) clipped weight-gradient sum.
    """
    op = "clip_reduce_bookkeeping"
    check_layer_pair(op, a, delta)
    device = check_launchable(op, a, delta)
    B, T, d = a.shape
    p = delta.shape[2]
    w = _weights(op, c, B, device)
    out_dtype = a.dtype if out_dtype is None else out_dtype
    n_rows = B * T
    if n_rows == 0 or p == 0 or d == 0:
        return torch.zeros(p, d, dtype=out_dtype, device=device)
    cfg = _settings_bookkeeping(n_rows, p, d, a.dtype, device)
    split = cfg.pop("split")
    rows = cdiv(cdiv(n_rows, split), cfg["BLOCK_R"]) * cfg["BLOCK_R"]
    split = cdiv(n_rows, rows)
    n_d = cdiv(d, cfg["BLOCK_D"])
    tiles = cdiv(p, cfg["BLOCK_P"]) * n_d
    buf = torch.empty(p, d, dtype=out_dtype, device=device) if split == 1 else torch.empty(split, p, d, device=device)
    _clip_reduce_bookkeeping_kernel[(tiles, split)](
        a, delta, w, buf, T, d, p, n_rows, *a.stride(), *delta.stride(), rows, n_d,
        **dot_flags(a.dtype), **cfg,
    )  # fmt: skip
    return buf if split == 1 else buf.sum(0).to(out_dtype)


# --------------------------------------------------------------------------------------------------- references


def clip_reduce_ref(grads: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_i c_i G_i in the gradients' dtype."""
    return (c.to(grads.dtype) @ grads.reshape(grads.shape[0], math.prod(grads.shape[1:]))).view(grads.shape[1:])


def clip_reduce_bookkeeping_ref(a: torch.Tensor, delta: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """A^T diag(c) Delta as one GEMM over the B * T rows, in the inputs' dtype."""
    d = delta * c.to(delta.dtype).view(-1, 1, 1)
    return d.flatten(0, 1).t() @ a.flatten(0, 1)
