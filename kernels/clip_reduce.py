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
    c_b delta[b, t] is formed in fp32; for 16-bit inputs it enters the tensor cores as two 16-bit parts (head and
    tail, 2^-18 relative for bf16) rather than rounded to one (2^-9), so a clipped contribution keeps its size to
    within the accumulation error (``_scaled_mma``).
(c) ``clip_reduce_bookkeeping_conv2d``: the same for a Conv2d (groups 1, zero padding), x (N, C, H, W), delta
    (N, p, Ho, Wo), N = B K with K = augmult views per example (rows i K .. i K + K - 1 are example i's):
    S = sum_n c_{n // K} delta_n^T U(x_n) -> (p, C, kh, kw), where U(x_n) (Ho Wo, C kh kw) are the input patches,
    read from x with the conv geometry inside the kernel (implicit GEMM as in per_sample_norm_conv2d; no unfold).
    A GEMM over the N Ho Wo rows: 2 N Ho Wo p C kh kw FLOPs (the ordinary conv weight gradient's); reads delta once
    per d-tile and the patches once per p-tile, N Ho Wo (p ceil(d / BLOCK_D) + d ceil(p / BLOCK_P)) elements for
    d = C kh kw (an x element is read by up to kh kw / (stride_h stride_w) patches, mostly from cache). Same grid,
    split-K, second pass and split of c delta as (b).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fastdp.kernels._triton import (
    MAX_GRID_YZ,
    _pair,
    cast,
    cdiv,
    check_conv2d,
    check_float,
    check_launchable,
    check_layer_pair,
    dot_flags,
    interpreting,
    mma,
    num_sms,
    on_tensor_device,
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
        # a row of weight exactly 0 is not read: a dropped (non-finite) example may hold NaN, and 0 * nan = nan
        g = tl.load(
            G_ptr + rows.to(tl.int64)[:, None] * stride_gb + cols[None, :],
            mask=(ok & (c != 0.0))[:, None] & (cols[None, :] < P),
            other=0.0,
        )
        acc += c[:, None] * g.to(tl.float32)
    s = cast(tl.sum(acc, axis=0), OUT_ptr.dtype.element_ty, INTERP)
    tl.store(OUT_ptr + split.to(tl.int64) * P + cols, s, mask=cols < P)


@triton.jit
def _scaled_mma(d_t, c, a, acc, PRECISION: tl.constexpr, INTERP: tl.constexpr):
    """acc + (d_t diag(c)) @ a: delta's columns (rows of the micro-batch) scaled by their clip factors.

    c_b delta is formed in fp32. fp32 operands go to tf32x3 as they are. 16-bit operands: rounding c_b delta back to
    bf16 would move each clipped contribution by up to 2^-9 relative, so it is split into a head and a tail in the
    operands' dtype, hi = rn(c delta), lo = rn(c delta - hi), with hi + lo = c delta (1 + theta), |theta| <= 2^-18
    (bf16; 2^-22 for fp16), and both halves go through the tensor cores: two exact-product MMAs instead of one.
    """
    d32 = d_t.to(tl.float32) * c[None, :]
    if d_t.dtype == tl.float32:
        return mma(d32, a, acc, PRECISION, INTERP)
    else:
        hi = cast(d32, d_t.dtype, INTERP)
        lo = cast(d32 - hi.to(tl.float32), d_t.dtype, INTERP)
        acc = mma(hi, a, acc, PRECISION, INTERP)
        return mma(lo, a, acc, PRECISION, INTERP)


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
        # rows of weight exactly 0 are not read, on either side: a dropped (non-finite) example may hold NaN
        live = ok & (c != 0.0)
        d_t = tl.load(
            D_ptr + b[None, :] * stride_db + t[None, :] * stride_dt + rp[:, None] * stride_dp,
            mask=live[None, :] & (rp[:, None] < DP),
            other=0.0,
        )
        a = tl.load(
            A_ptr + b[:, None] * stride_ab + t[:, None] * stride_at + rd[None, :] * stride_ad,
            mask=live[:, None] & (rd[None, :] < DA),
            other=0.0,
        )
        acc = _scaled_mma(d_t, c, a, acc, PRECISION, INTERP)
    out = OUT_ptr + split.to(tl.int64) * DP * DA + rp[:, None] * DA + rd[None, :]
    tl.store(out, cast(acc, OUT_ptr.dtype.element_ty, INTERP), mask=(rp[:, None] < DP) & (rd[None, :] < DA))


@triton.jit
def _clip_reduce_bookkeeping_conv2d_kernel(
    X_ptr,
    D_ptr,
    C_ptr,
    OUT_ptr,
    C,
    H,
    W,
    WO,
    KH,
    KW,
    L,
    VIEWS,
    DP,
    NROWS,
    conv_sh,
    conv_sw,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_dn,
    stride_dc,
    stride_dh,
    stride_dw,
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
    DA = C * KH * KW
    # the tile's patch columns j = (c * KH + ki) * KW + kj, decoded once into their offsets within a view and their
    # tap offsets (ki dil_h, kj dil_w) from the top-left corner of an output position's receptive field
    kk = rd % (KH * KW)
    tap_h = (kk // KW) * dil_h
    tap_w = (kk % KW) * dil_w
    col_off = (rd // (KH * KW)) * stride_xc + tap_h * stride_xh + tap_w * stride_xw
    col_ok = rd < DA
    tap_h = tl.where(col_ok, tap_h, 1 << 30)
    # the host keeps NROWS < 2^30, so row indices (a split's end included) are int32; views' offsets are int64
    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, NROWS)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_R):
        r = r0 + rr  # flat row n * L + l: output position l = oh * WO + ow of view n
        ok = r < hi
        n = r // L
        l_ = r - n * L
        oh = l_ // WO
        ow = l_ % WO
        c = tl.load(C_ptr + n // VIEWS, mask=ok, other=0.0)
        # rows of weight exactly 0 are not read, on either side: a dropped (non-finite) example may hold NaN
        live = ok & (c != 0.0)
        n = n.to(tl.int64)
        d_row = n * stride_dn + oh * stride_dh + ow * stride_dw
        d_t = tl.load(
            D_ptr + d_row[None, :] + rp[:, None] * stride_dc, mask=live[None, :] & (rp[:, None] < DP), other=0.0
        )
        h0 = oh * conv_sh - pad_h
        w0 = ow * conv_sw - pad_w
        # zero padding is the mask: a tap reads x only where 0 <= h0 + tap_h < H and 0 <= w0 + tap_w < W. Rows past
        # the split or of weight 0 get an empty h range and columns past d a tap beyond every range: one mask
        h_end = tl.where(live, H - h0, 0)
        inside = (tap_h[None, :] >= -h0[:, None]) & (tap_h[None, :] < h_end[:, None])
        inside &= (tap_w[None, :] >= -w0[:, None]) & (tap_w[None, :] < (W - w0)[:, None])
        x_row = X_ptr + n * stride_xn
        x_off = (h0 * stride_xh + w0 * stride_xw)[:, None] + col_off[None, :]
        a = tl.load(x_row[:, None] + x_off, mask=inside, other=0.0)
        acc = _scaled_mma(d_t, c, a, acc, PRECISION, INTERP)
    out = OUT_ptr + split.to(tl.int64) * DP * DA + rp[:, None] * DA + rd[None, :]
    tl.store(out, cast(acc, OUT_ptr.dtype.element_ty, INTERP), mask=(rp[:, None] < DP) & col_ok[None, :])


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


def _settings_bookkeeping(
    n_rows: int, p: int, d: int, dtype: torch.dtype, device: torch.device, conv: bool = False
) -> dict:
    """(b), (c): a 64 x 64 fp32 output tile (64 x 128 for bf16/fp16 linear layers) and BLOCK_R rows per step;
    split-K over the rows up to ~2 programs per SM, keeping at least 8 row steps per split so the partials stay a
    small fraction of the traffic. The conv kernel's gathered patch tile needs index arithmetic and a mask per
    element, so its d tile stays at 64 in every dtype (as per_sample_norm_conv2d's). Interpreter: minimum tiles;
    two splits when there are enough rows, so tests cover the partials."""
    if device.type != "cuda":
        block_r = 16
        split = 2 if n_rows > 2 * block_r else 1
        return {"BLOCK_R": block_r, "BLOCK_P": 16, "BLOCK_D": 16, "split": split, "num_warps": 1}
    half = dtype != torch.float32
    block_r = 32 if half else 16
    block_p = pow2_at_least(p, 16, 64)
    block_d = pow2_at_least(d, 16, 128 if half and not conv else 64)
    tiles = cdiv(p, block_p) * cdiv(d, block_d)
    split = max(1, min(cdiv(2 * num_sms(device), tiles), cdiv(n_rows, 8 * block_r), MAX_GRID_YZ))
    return {
        "BLOCK_R": block_r,
        "BLOCK_P": block_p,
        "BLOCK_D": block_d,
        "split": split,
        # fp32 "ieee" dots run on the FMA units with both operand fragments in registers: at 4 warps, or with a
        # second stage of prefetched tiles, the book-keeping kernels spilled on sm_90 for some of the presets'
        # signatures (NF-ResNet and NFNet heads, SmoothNet convs; kernels/_compile_check.py); 8 warps and one stage
        # leave them at 64-110 registers
        "num_warps": 4 if half else 8,
        "num_stages": 3 if half else 1,
    }


def _weights(op: str, c: torch.Tensor, B: int, device: torch.device) -> torch.Tensor:
    if c.dim() != 1 or c.shape[0] != B:
        raise ValueError(f"{op}: the clip factors must be a ({B},) vector, one per example, got {tuple(c.shape)}")
    if not c.is_floating_point():
        raise TypeError(f"{op}: the clip factors must be floating point, got {c.dtype}")
    if c.device != device:
        raise ValueError(f"{op}: the clip factors are on {c.device}, the gradients on {device}")
    return c.to(torch.float32).contiguous()


@on_tensor_device
def clip_reduce(grads: torch.Tensor, c: torch.Tensor, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """S = sum_i c_i G_i over kept per-example gradients.

    Args:
        grads: (B, *shape) per-example gradients (fp32, bf16 or fp16); rows may be strided, each row's elements
            must be one dense block (else it is copied once).
        c: (B,) clip factors. A row whose factor is exactly 0 is not read (it may hold NaN: a dropped example).
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


@on_tensor_device
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
    rows, split = _split_rows(n_rows, cfg.pop("split"), cfg["BLOCK_R"])
    n_d = cdiv(d, cfg["BLOCK_D"])
    tiles = cdiv(p, cfg["BLOCK_P"]) * n_d
    buf = torch.empty(p, d, dtype=out_dtype, device=device) if split == 1 else torch.empty(split, p, d, device=device)
    _clip_reduce_bookkeeping_kernel[(tiles, split)](
        a, delta, w, buf, T, d, p, n_rows, *a.stride(), *delta.stride(), rows, n_d,
        **dot_flags(a.dtype), **cfg,
    )  # fmt: skip
    return buf if split == 1 else buf.sum(0).to(out_dtype)


def _split_rows(n_rows: int, split: int, block_r: int) -> tuple[int, int]:
    """(rows per split, a multiple of block_r; number of splits) for at most ``split`` splits of n_rows rows."""
    rows = cdiv(cdiv(n_rows, split), block_r) * block_r
    return rows, cdiv(n_rows, rows)


def _view_span(t: torch.Tensor) -> int:
    """Elements between the first and the last element of one row t[n] (any strides), plus one."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:], strict=True))


@on_tensor_device
def clip_reduce_bookkeeping_conv2d(
    x: torch.Tensor,
    delta: torch.Tensor,
    c: torch.Tensor,
    kernel_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    augmult: int = 1,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """S = sum_i c_i G_i for a Conv2d (groups = 1, zero padding) by book-keeping: the weight gradient with delta's
    rows scaled by their example's clip factor, as an implicit GEMM (no unfold, no scaled copy of delta).

    Args:
        x: (N, C, H, W) layer input, N = B * augmult (fp32, bf16 or fp16; any strides, e.g. channels_last).
        delta: (N, p, Ho, Wo) gradient w.r.t. the layer output, same dtype as ``x`` (any strides).
        c: (B,) clip factors; rows i*K .. i*K + K - 1 (K = augmult) are example i's views and all take c_i.
        kernel_size, stride, padding, dilation: the convolution's (ints or pairs; padding explicit zeros).
        augmult: K, the number of views per example.
        out_dtype: dtype of S (default: the inputs'); accumulation is fp32 either way.

    Returns:
        (p, C, kh, kw) clipped weight-gradient sum, in the layout of the conv weight.
    """
    op = "clip_reduce_bookkeeping_conv2d"
    geo = check_conv2d(op, x, delta, kernel_size, stride, padding, dilation, augmult)
    N, C, H, W = x.shape
    K, ho, wo, kh, kw = geo.augmult, geo.ho, geo.wo, geo.kh, geo.kw
    device = check_launchable(op, x, delta)
    p, d = delta.shape[1], C * kh * kw
    w = _weights(op, c, N // K, device)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    n_rows = N * ho * wo
    if n_rows == 0 or p == 0 or d == 0:
        return torch.zeros(p, C, kh, kw, dtype=out_dtype, device=device)
    # the kernel counts rows in int32 (a split's end, < 2 n_rows, included) and so the offsets within one view; the
    # views' own offsets are int64
    spans = {"x": _view_span(x), "delta": _view_span(delta)}
    if n_rows >= 2**30 or max(spans.values()) >= 2**31:
        raise ValueError(
            f"{op}: the kernel indexes rows (< 2^30) and the elements of one view (< 2^31) in int32; got "
            f"N*Ho*Wo = {n_rows} rows and views spanning {spans} elements; split the micro-batch or make x and "
            "delta contiguous"
        )
    cfg = _settings_bookkeeping(n_rows, p, d, x.dtype, device, conv=True)
    rows, split = _split_rows(n_rows, cfg.pop("split"), cfg["BLOCK_R"])
    n_d = cdiv(d, cfg["BLOCK_D"])
    tiles = cdiv(p, cfg["BLOCK_P"]) * n_d
    buf = torch.empty(p, d, dtype=out_dtype, device=device) if split == 1 else torch.empty(split, p, d, device=device)
    _clip_reduce_bookkeeping_conv2d_kernel[(tiles, split)](
        x, delta, w, buf,
        C, H, W, wo, kh, kw, ho * wo, K, p, n_rows,
        geo.sh, geo.sw, geo.ph, geo.pw, geo.dh, geo.dw,
        *x.stride(), *delta.stride(),
        rows, n_d,
        **dot_flags(x.dtype), **cfg,
    )  # fmt: skip
    s = buf if split == 1 else buf.sum(0).to(out_dtype)
    return s.view(p, C, kh, kw)


# --------------------------------------------------------------------------------------------------- references


def clip_reduce_ref(grads: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_i c_i G_i in the gradients' dtype."""
    return (c.to(grads.dtype) @ grads.reshape(grads.shape[0], math.prod(grads.shape[1:]))).view(grads.shape[1:])


def clip_reduce_bookkeeping_ref(a: torch.Tensor, delta: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """A^T diag(c) Delta as one GEMM over the B * T rows, in the inputs' dtype."""
    d = delta * c.to(delta.dtype).view(-1, 1, 1)
    return d.flatten(0, 1).t() @ a.flatten(0, 1)


def clip_reduce_bookkeeping_conv2d_ref(
    x: torch.Tensor,
    delta: torch.Tensor,
    c: torch.Tensor,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    augmult: int = 1,
) -> torch.Tensor:
    """(p, C, kh, kw) conv weight gradient of delta with row n scaled by c[n // augmult], in the inputs' dtype
    (torch's own convolution backward, so an oracle independent of the implicit-GEMM indexing)."""
    op = "clip_reduce_bookkeeping_conv2d_ref"
    kh, kw = _pair(kernel_size, "kernel_size", op)
    scale = c.to(delta.dtype).repeat_interleave(augmult).view(-1, 1, 1, 1)
    weight = x.new_zeros(()).expand(delta.shape[1], x.shape[1], kh, kw)  # only its shape is read
    return torch.ops.aten.convolution_backward(
        delta * scale, x, weight, None,
        list(_pair(stride, "stride", op)), list(_pair(padding, "padding", op)), list(_pair(dilation, "dilation", op)),
        False, [0, 0], 1, [False, True, False],
    )[1]  # fmt: skip
