"""Ghost norm: ||delta_i^T a_i||_F^2 = sum_{t,s} (a_t . a_s)(delta_t . delta_s) per example, without the T x T Grams.

For a (B, T, d), delta (B, T, p): the two Gram matrices A_i A_i^T and D_i D_i^T are formed one (BLOCK_T x BLOCK_T)
tile at a time, in fp32 registers, multiplied elementwise and summed; nothing of size T^2 touches memory. Both
Grams are symmetric, so only tile pairs (t-tile, s-tile) with s-tile >= t-tile are visited and the off-diagonal
ones count twice: n (n + 1) / 2 tile pairs for n = ceil(T / BLOCK_T).

Grid: one program per (example, pair), example-major in one flat axis (an example's pairs run side by side, so
its rows are read from DRAM once and re-read from L2); the pair list is a small host-built table (cached per n),
which keeps every program's work equal (a program per t-tile looping over s-tiles would leave the last ones with
one pair while the first has n). Each program loops over d and then p in BLOCK_K steps (tl.dot of two row tiles),
and writes one fp32 partial to a (B, n_pairs) buffer that a second pass (torch .sum(1)) reduces: deterministic,
no atomics. Cost per example: ~T^2 (d + p) FLOPs for the upper triangle (the full double sum is 2 T^2 (d + p)), and
reads of (n + 1) T (d + p) elements: each row tile is re-read for every pair it belongs to (L2-resident in
practice for the T of the layers where ghost norms pay, 2 T^2 < p d). Cheaper than instantiating G_i (2 T p d)
exactly when T^2 (d + p) < 2 T p d.

``ghost_norm_conv2d``: the same for a Conv2d (groups 1), the rows of the first Gram being input patches gathered
from x inside the kernel (implicit GEMM, no unfold: the unfolded input of a 3x3 conv is 9x the input) and the K
views of an example extra positions. This is the plan for the low-resolution layers (8x8: T = 64 per view), where
instantiating G_i costs 2 T p d and the ghost norm T^2 (d + p).

Precision: with epsilon = max(dot_error_bound(dtype, d), dot_error_bound(dtype, p)) each Gram entry errs by at
most epsilon times the Gram of the absolute values, and sum_{t,s} |a_t|.|a_s| |delta_t|.|delta_s| = ||M_i||_F^2
(M_i = |delta_i|^T |a_i|), so |s^_i - ||G_i||^2| <= (2 epsilon + epsilon^2 + eta (1 + epsilon)^2) ||M_i||_F^2,
eta = gamma_h (u = 2^-24) for the fp32 sum of the T^2 Gram products (depth h = 2 BLOCK_T + pairs). The norm's
relative error is at most that factor times kappa_i^2, kappa_i = ||M_i||_F / ||G_i||_F: the ghost norm squares
the condition of the example's gradient (README, "How exactly C is enforced"). ``ghost_error_bound`` returns
(epsilon, eta) for a layer's shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastdp.kernels._triton import (
    cdiv,
    check_conv2d,
    check_launchable,
    check_layer_pair,
    dot_error_bound,
    dot_flags,
    mma,
    on_tensor_device,
    pow2_at_least,
    tl,
    triton,
)

# ----------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _gram_tile(
    X_ptr,
    stride_t,
    stride_k,
    t_rows,
    s_rows,
    T,
    DK,
    PRECISION: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(BLOCK_T, BLOCK_T) tile X[t_rows] X[s_rows]^T of one example's (T, DK) matrix, fp32."""
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, DK, BLOCK_K):
        k = k0 + rk
        xt = tl.load(
            X_ptr + t_rows[:, None] * stride_t + k[None, :] * stride_k,
            mask=(t_rows[:, None] < T) & (k[None, :] < DK),
            other=0.0,
        )
        xs_t = tl.load(
            X_ptr + s_rows[None, :] * stride_t + k[:, None] * stride_k,
            mask=(s_rows[None, :] < T) & (k[:, None] < DK),
            other=0.0,
        )
        acc = mma(xt, xs_t, acc, PRECISION, INTERP)
    return acc


@triton.jit
def _ghost_norm_kernel(
    A_ptr,
    D_ptr,
    PAIRS_ptr,
    PART_ptr,
    T,
    DA,
    DP,
    stride_ab,
    stride_at,
    stride_ad,
    stride_db,
    stride_dt,
    stride_dp,
    n_pairs,
    PRECISION: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # flat grid, example-major: an example's tile pairs are consecutive programs, so its a and delta stay in L2
    pid = tl.program_id(0)
    b = (pid // n_pairs).to(tl.int64)
    q = pid % n_pairs
    ti = tl.load(PAIRS_ptr + 2 * q)
    si = tl.load(PAIRS_ptr + 2 * q + 1)
    t_rows = ti * BLOCK_T + tl.arange(0, BLOCK_T)
    s_rows = si * BLOCK_T + tl.arange(0, BLOCK_T)
    ga = _gram_tile(
        A_ptr + b * stride_ab, stride_at, stride_ad, t_rows, s_rows, T, DA, PRECISION, INTERP, BLOCK_T, BLOCK_K
    )
    gd = _gram_tile(
        D_ptr + b * stride_db, stride_dt, stride_dp, t_rows, s_rows, T, DP, PRECISION, INTERP, BLOCK_T, BLOCK_K
    )
    # rows/columns past T are zero in both Grams; an off-diagonal tile stands for its mirror image too
    part = tl.sum(tl.sum(ga * gd, axis=1), axis=0)
    part = tl.where(si > ti, 2.0 * part, part)
    tl.store(PART_ptr + b * n_pairs + q, part)


@triton.jit
def _patch_gram_tile(
    X_ptr,
    b,
    t_rows,
    s_rows,
    T,
    C,
    H,
    W,
    WO,
    KH,
    KW,
    L,
    VIEWS,
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
    PRECISION: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(BLOCK_T, BLOCK_T) tile U[t_rows] U[s_rows]^T of example b's unfolded input U (T, C KH KW), fp32, the patch
    rows gathered from x with the conv geometry (implicit GEMM, as in per_sample_norm_conv2d; no unfold)."""
    DK = C * KH * KW
    rk = tl.arange(0, BLOCK_K)
    # the rows' output positions, decoded once: t = view * L + oh * WO + ow
    t_view = b * VIEWS + t_rows // L
    t_h0 = ((t_rows % L) // WO) * conv_sh - pad_h
    t_w0 = ((t_rows % L) % WO) * conv_sw - pad_w
    s_view = b * VIEWS + s_rows // L
    s_h0 = ((s_rows % L) // WO) * conv_sh - pad_h
    s_w0 = ((s_rows % L) % WO) * conv_sw - pad_w
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, DK, BLOCK_K):
        k = k0 + rk  # patch column j = (c * KH + ki) * KW + kj
        c = k // (KH * KW)
        ki = (k % (KH * KW)) // KW
        kj = k % KW
        k_ok = k < DK
        ih = t_h0[:, None] + ki[None, :] * dil_h
        iw = t_w0[:, None] + kj[None, :] * dil_w
        # zero padding is the mask: out-of-image taps read nothing and count 0
        ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & (t_rows[:, None] < T) & k_ok[None, :]
        ut = tl.load(
            X_ptr + t_view[:, None] * stride_xn + c[None, :] * stride_xc + ih * stride_xh + iw * stride_xw,
            mask=ok,
            other=0.0,
        )
        ih = s_h0[None, :] + ki[:, None] * dil_h
        iw = s_w0[None, :] + kj[:, None] * dil_w
        ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & (s_rows[None, :] < T) & k_ok[:, None]
        us_t = tl.load(
            X_ptr + s_view[None, :] * stride_xn + c[:, None] * stride_xc + ih * stride_xh + iw * stride_xw,
            mask=ok,
            other=0.0,
        )
        acc = mma(ut, us_t, acc, PRECISION, INTERP)
    return acc


@triton.jit
def _ghost_norm_conv2d_kernel(
    X_ptr,
    D_ptr,
    PAIRS_ptr,
    PART_ptr,
    C,
    H,
    W,
    HO,
    WO,
    KH,
    KW,
    VIEWS,
    DP,
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
    n_pairs,
    PRECISION: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # flat grid, example-major: an example's tile pairs are consecutive programs, so its x and delta stay in L2
    pid = tl.program_id(0)
    b = (pid // n_pairs).to(tl.int64)
    q = pid % n_pairs
    ti = tl.load(PAIRS_ptr + 2 * q)
    si = tl.load(PAIRS_ptr + 2 * q + 1)
    t_rows = ti * BLOCK_T + tl.arange(0, BLOCK_T)
    s_rows = si * BLOCK_T + tl.arange(0, BLOCK_T)
    L = HO * WO
    T = VIEWS * L
    ga = _patch_gram_tile(
        X_ptr, b, t_rows, s_rows, T, C, H, W, WO, KH, KW, L, VIEWS, conv_sh, conv_sw, pad_h, pad_w, dil_h, dil_w,
        stride_xn, stride_xc, stride_xh, stride_xw, PRECISION, INTERP, BLOCK_T, BLOCK_K,
    )  # fmt: skip
    # delta's Gram over the p channels; delta_n[t] is the column (oh, ow) of view n across channels
    t_off = (b * VIEWS + t_rows // L) * stride_dn + ((t_rows % L) // WO) * stride_dh + ((t_rows % L) % WO) * stride_dw
    s_off = (b * VIEWS + s_rows // L) * stride_dn + ((s_rows % L) // WO) * stride_dh + ((s_rows % L) % WO) * stride_dw
    rk = tl.arange(0, BLOCK_K)
    gd = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, DP, BLOCK_K):
        k = k0 + rk
        dt = tl.load(
            D_ptr + t_off[:, None] + k[None, :] * stride_dc, mask=(t_rows[:, None] < T) & (k[None, :] < DP), other=0.0
        )
        ds_t = tl.load(
            D_ptr + s_off[None, :] + k[:, None] * stride_dc, mask=(s_rows[None, :] < T) & (k[:, None] < DP), other=0.0
        )
        gd = mma(dt, ds_t, gd, PRECISION, INTERP)
    part = tl.sum(tl.sum(ga * gd, axis=1), axis=0)
    part = tl.where(si > ti, 2.0 * part, part)
    tl.store(PART_ptr + b * n_pairs + q, part)


# ------------------------------------------------------------------------------------------------ host wrappers


def _settings(t: int, d: int, p: int, dtype: torch.dtype, device: torch.device, conv: bool = False) -> dict:
    """BLOCK_T x BLOCK_T for the two Gram tiles held at once (2 x 64 x 64 fp32 = 32 registers a thread at 8
    warps), BLOCK_K the reduction step over d and p. Short sequences shrink BLOCK_T to limit masked work. The conv
    kernel gathers both patch tiles with index arithmetic and a mask per element: its step stays at 32 (at 64 and 3
    stages, bf16 spilled on sm_90). The interpreter uses tl.dot's minimum of 16 so small tests have several tiles and
    both kinds of pairs."""
    if device.type != "cuda":
        return {"BLOCK_T": 16, "BLOCK_K": 16, "num_warps": 1}
    half = dtype != torch.float32
    return {
        "BLOCK_T": pow2_at_least(t, 16, 64),
        "BLOCK_K": pow2_at_least(min(d, p), 16, 64 if half and not conv else 32),
        "num_warps": 8 if t >= 64 else 4,
        "num_stages": 3 if half else 2,
    }


def ghost_error_bound(
    dtype: torch.dtype, t: int, d: int, p: int, device: torch.device, conv: bool = False
) -> tuple[float, float]:
    """(epsilon, eta) of the module docstring's bound for a (B, t, d), delta (B, t, p) as the wrappers tile them
    (for a conv: t = K Ho Wo, d = C kh kw)."""
    cfg = _settings(t, d, p, dtype, device, conv)
    n = cdiv(t, cfg["BLOCK_T"])
    h = 2 * cfg["BLOCK_T"] + n * (n + 1) // 2
    u = 2.0**-24
    return max(dot_error_bound(dtype, d), dot_error_bound(dtype, p)), h * u / (1 - h * u)


_PAIRS: dict = {}


def _pairs(n: int, device: torch.device) -> torch.Tensor:
    """(n (n + 1) / 2, 2) int32 tile pairs (i, j), j >= i, cached per (n, device)."""
    key = (n, str(device))
    if key not in _PAIRS:
        ij = [(i, j) for i in range(n) for j in range(i, n)]
        _PAIRS[key] = torch.tensor(ij, dtype=torch.int32).to(device)
    return _PAIRS[key]


@on_tensor_device
def ghost_norm(a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """sum_{t,s} (a_t . a_s)(delta_t . delta_s) per example (= ||delta_i^T a_i||_F^2), fp32.

    Args:
        a: (B, T, d) layer inputs (fp32, bf16 or fp16; any strides).
        delta: (B, T, p) gradients w.r.t. the layer outputs, same dtype.

    Returns:
        (B,) float32.
    """
    op = "ghost_norm"
    check_layer_pair(op, a, delta)
    device = check_launchable(op, a, delta)
    B, T, d = a.shape
    p = delta.shape[2]
    if B == 0 or T == 0 or d == 0 or p == 0:
        return torch.zeros(B, dtype=torch.float32, device=device)
    cfg = _settings(T, d, p, a.dtype, device)
    pairs = _pairs(cdiv(T, cfg["BLOCK_T"]), device)
    n_pairs = pairs.shape[0]
    partials = torch.empty(B, n_pairs, dtype=torch.float32, device=device)
    _ghost_norm_kernel[(B * n_pairs,)](
        a, delta, pairs, partials, T, d, p, *a.stride(), *delta.stride(), n_pairs,
        **dot_flags(a.dtype), **cfg,
    )  # fmt: skip
    return partials.sum(1)


@on_tensor_device
def ghost_norm_conv2d(
    x: torch.Tensor,
    delta: torch.Tensor,
    kernel_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    augmult: int = 1,
) -> torch.Tensor:
    """||G_i||_F^2 per example for a Conv2d (groups 1, zero padding) by the ghost norm, without unfolding x and
    without the T x T Grams in memory: sum_{t,s} (u_t . u_s)(delta_t . delta_s) over example i's T = K Ho Wo output
    positions (its K views as extra positions), u_t the input patch of position t read from x inside the kernel.

    Cost per example: T^2 (C kh kw + p) FLOPs for the upper triangle of tile pairs, against 2 T p C kh kw for
    instantiating G_i (per_sample_norm_conv2d): cheaper when T < 2 p C kh kw / (C kh kw + p), i.e. the low-
    resolution layers (WRN's 8x8 stage, T = 64: 8.4 MFLOP an example against 75 for 256 -> 256 channels).

    Args:
        x: (N, C, H, W) layer input, N = B * augmult (fp32, bf16 or fp16; any strides).
        delta: (N, p, Ho, Wo) gradient w.r.t. the layer output, same dtype.
        kernel_size, stride, padding, dilation: the convolution's (ints or pairs; padding explicit zeros).
        augmult: K; rows i*K .. i*K + K - 1 are example i's views.

    Returns:
        (B,) float32 squared norms.
    """
    op = "ghost_norm_conv2d"
    geo = check_conv2d(op, x, delta, kernel_size, stride, padding, dilation, augmult)
    N, C, H, W = x.shape
    K, ho, wo = geo.augmult, geo.ho, geo.wo
    device = check_launchable(op, x, delta)
    B, p, d, T = N // K, delta.shape[1], C * geo.kh * geo.kw, K * geo.ho * geo.wo
    if B == 0 or p == 0 or d == 0:
        return torch.zeros(B, dtype=torch.float32, device=device)
    cfg = _settings(T, d, p, x.dtype, device, conv=True)
    pairs = _pairs(cdiv(T, cfg["BLOCK_T"]), device)
    n_pairs = pairs.shape[0]
    partials = torch.empty(B, n_pairs, dtype=torch.float32, device=device)
    _ghost_norm_conv2d_kernel[(B * n_pairs,)](
        x, delta, pairs, partials,
        C, H, W, ho, wo, geo.kh, geo.kw, K, p,
        geo.sh, geo.sw, geo.ph, geo.pw, geo.dh, geo.dw,
        *x.stride(), *delta.stride(), n_pairs,
        **dot_flags(x.dtype), **cfg,
    )  # fmt: skip
    return partials.sum(1)


# ---------------------------------------------------------------------------------------------------- reference


def ghost_norm_ref(a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(B,) sum_{t,s} (a_t . a_s)(delta_t . delta_s) from the full Gram matrices, in the inputs' dtype."""
    ga = torch.bmm(a, a.transpose(1, 2))
    gd = torch.bmm(delta, delta.transpose(1, 2))
    return (ga * gd).sum((1, 2))
