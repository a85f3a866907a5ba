"""Per-example squared Frobenius norm of G_i = delta_i^T a_i, never holding G_i or the unfolded input in memory.

Linear layers: a (B, T, d), delta (B, T, p), ||G_i||_F^2 = sum_{r, j} (sum_t delta_i[t, r] a_i[t, j])^2.
Conv2d (groups 1): a_i[t, j] is the input patch of output position t, read from x (N, C, H, W) with the conv
geometry inside the kernel (implicit GEMM: j = (c, ki, kj) in the weight's (C, kh, kw) order; no unfold), and
delta_i is (p, Ho, Wo); with augmentation multiplicity K, example i's K views (rows i*K .. i*K + K - 1) are K*Ho*Wo
positions of one example, so G_i is the sum of the views' gradients.

One flat grid of B * n_tiles programs, example-major: program (i, tile) accumulates one (BLOCK_P, BLOCK_D) tile of
G_i in fp32 registers with tl.dot over T in BLOCK_T steps, then squares and sums it. The per-tile partial sums go to
a (B, n_tiles) fp32 buffer that a second pass (torch .sum(1)) reduces: deterministic, no atomics and no
zero-initialised output, at n_tiles * 4 bytes per example (a few hundred bytes). Optionally the tile is also stored
to ``out`` (B, p, d): the per-example gradients of the instantiate+keep plan, at no extra FLOPs.

Memory traffic. Each program reads its p-rows of delta_i and its d-columns of a_i over all T: delta_i is read once
per d-tile and a_i once per p-tile, T (p ceil(d / BLOCK_D) + d ceil(p / BLOCK_P)) elements per example. Because
an example's tiles are consecutive programs (tile = p-tile-major, d-tile-minor), they are resident together (an
H100/H200 runs 132 SMs x 1-2 such programs; a layer has ~4-150 tiles per example) and all but the first read of
each row come from L2: the DRAM traffic is T (p + d) elements per example, the size of the inputs, as for the
ordinary weight gradient. (With the example on the slow grid axis, as before, tile 0 of every example ran first and
the inputs passed through L2 once per tile.) This is by design and by the launch order; L2 hit rates wait for a GPU.

Cost per example: 2 T p d FLOPs (the ordinary weight gradient's) on the tensor cores, writing p d elements only
with ``out``. bf16/fp16 inputs: exact products, fp32 accumulation. fp32 inputs: tf32x3, three TF32 MMAs on split
operands (3x the bf16 MMA count at half its rate; ``fastdp.kernels._triton.dot_precision``).

Precision (the clip bound's tolerance; README "Precision of the per-example norms"). With M_i = |delta_i|^T |a_i|
(entrywise absolute values) and epsilon = ``dot_error_bound(dtype, T)``, every entry of the computed tile obeys
|G^_rj - G_rj| <= epsilon M_rj, so ||G^_i - G_i||_F <= epsilon ||M_i||_F <= epsilon ||delta_i||_F ||a_i||_F
(Cauchy-Schwarz per entry). The squares are summed by fp32 reductions of depth at most BLOCK_P + BLOCK_D + n_tiles
(the tile's sums along each axis, then the partials), so the returned s_i = ||G^_i||^2 (1 + theta),
|theta| <= gamma_h with u = 2^-24. ``norm_error_bound`` returns (epsilon, gamma_h); the tests check
|sqrt(s_i) - ||G_i||| <= epsilon ||M_i||_F + gamma_h (||G_i|| + epsilon ||M_i||_F) against float64. So the norm's
relative error is e_i <= epsilon kappa_i + gamma_h, kappa_i = ||M_i||_F / ||G_i||_F, and an example clipped by it
contributes at most C (1 + e) / (1 - e) when its summed gradient carries a relative error e too (book-keeping), at
most C (1 + gamma_h) when the summed gradient is the G^_i written here (``out``, instantiate+keep). epsilon is
gamma_T (u = 2^-23) for bf16/fp16, 2^-22 (5 + 2^-9) + (1 + 2^-11)(1 + 3 2^-11) gamma_3T for fp32: 1.2e-4 and
3.7e-4 at T = 1024, worst case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastdp.kernels._triton import (
    cast,
    cdiv,
    check_conv2d,
    check_float,
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
def _per_sample_norm_linear_kernel(
    A_ptr,
    D_ptr,
    PART_ptr,
    G_ptr,
    T,
    DA,
    DP,
    stride_ab,
    stride_at,
    stride_ad,
    stride_db,
    stride_dt,
    stride_dp,
    stride_gb,
    stride_gp,
    stride_gd,
    n_tiles_d,
    n_tiles,
    WRITE_G: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # one flat grid, example-major: the n_tiles programs of example b are consecutive, so they run side by side and
    # a_b and delta_b come from DRAM once, the re-reads of other tiles hitting L2 (see the module docstring)
    pid = tl.program_id(0)
    b = (pid // n_tiles).to(tl.int64)
    tile = pid % n_tiles
    rp = (tile // n_tiles_d) * BLOCK_P + tl.arange(0, BLOCK_P)
    rd = (tile % n_tiles_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    rt = tl.arange(0, BLOCK_T)
    a_base = A_ptr + b * stride_ab
    d_base = D_ptr + b * stride_db
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + rt
        d_t = tl.load(
            d_base + rp[:, None] * stride_dp + t[None, :] * stride_dt,
            mask=(rp[:, None] < DP) & (t[None, :] < T),
            other=0.0,
        )
        a = tl.load(
            a_base + t[:, None] * stride_at + rd[None, :] * stride_ad,
            mask=(t[:, None] < T) & (rd[None, :] < DA),
            other=0.0,
        )
        acc = mma(d_t, a, acc, PRECISION, INTERP)
    # masked rows/columns of the tile are exact zeros, so they add nothing
    tl.store(PART_ptr + b * n_tiles + tile, tl.sum(tl.sum(acc * acc, axis=1), axis=0))
    if WRITE_G:
        tl.store(
            G_ptr + b * stride_gb + rp[:, None] * stride_gp + rd[None, :] * stride_gd,
            cast(acc, G_ptr.dtype.element_ty, INTERP),
            mask=(rp[:, None] < DP) & (rd[None, :] < DA),
        )


@triton.jit
def _per_sample_norm_conv2d_kernel(
    X_ptr,
    D_ptr,
    PART_ptr,
    G_ptr,
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
    stride_gb,
    stride_gp,
    stride_gd,
    n_tiles_d,
    n_tiles,
    WRITE_G: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # one flat grid, example-major: the n_tiles programs of example b are consecutive, so they run side by side and
    # a_b and delta_b come from DRAM once, the re-reads of other tiles hitting L2 (see the module docstring)
    pid = tl.program_id(0)
    b = (pid // n_tiles).to(tl.int64)
    tile = pid % n_tiles
    rp = (tile // n_tiles_d) * BLOCK_P + tl.arange(0, BLOCK_P)
    rd = (tile % n_tiles_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    rt = tl.arange(0, BLOCK_T)
    DA = C * KH * KW
    L = HO * WO
    T = VIEWS * L
    # the tile's patch coordinates, decoded once: j = (c * KH + ki) * KW + kj
    kk = rd % (KH * KW)
    c = rd // (KH * KW)
    ki = kk // KW
    kj = kk % KW
    col_ok = rd < DA
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + rt
        row = b * VIEWS + t // L  # the view's row of the micro-batch
        l_ = t % L
        oh = l_ // WO
        ow = l_ % WO
        ih = oh[:, None] * conv_sh - pad_h + ki[None, :] * dil_h
        iw = ow[:, None] * conv_sw - pad_w + kj[None, :] * dil_w
        # zero padding is the mask: out-of-image taps read nothing and count 0
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(
            X_ptr + row[:, None] * stride_xn + c[None, :] * stride_xc + ih * stride_xh + iw * stride_xw,
            mask=inside & (t[:, None] < T) & col_ok[None, :],
            other=0.0,
        )
        d_t = tl.load(
            D_ptr
            + row[None, :] * stride_dn
            + rp[:, None] * stride_dc
            + oh[None, :] * stride_dh
            + ow[None, :] * stride_dw,
            mask=(rp[:, None] < DP) & (t[None, :] < T),
            other=0.0,
        )
        acc = mma(d_t, a, acc, PRECISION, INTERP)
    tl.store(PART_ptr + b * n_tiles + tile, tl.sum(tl.sum(acc * acc, axis=1), axis=0))
    if WRITE_G:
        tl.store(
            G_ptr + b * stride_gb + rp[:, None] * stride_gp + rd[None, :] * stride_gd,
            cast(acc, G_ptr.dtype.element_ty, INTERP),
            mask=(rp[:, None] < DP) & col_ok[None, :],
        )


# ------------------------------------------------------------------------------------------------ host wrappers


def _settings(t: int, p: int, d: int, dtype: torch.dtype, device: torch.device, conv: bool = False) -> dict:
    """Tile sizes: the G tile (BLOCK_P x BLOCK_D) lives in fp32 registers across the T loop.

    bf16/fp16: up to 128 x 128 (linear) or 128 x 64 (conv, whose gathered patch tile needs index arithmetic per
    element) with a T step of 32; a 128 x 128 tile takes 8 warps (64 accumulators a thread), and so does a 128 x 64
    conv tile (its index arithmetic spilled at 4 warps under Triton 3.6, 76-412 bytes on WRN and NF-ResNet layers).
    A p of 128 or less is then one p-tile, so delta_i is read once per d-tile, from L2 after the first. fp32
    (tf32x3: three TF32 MMAs on split operands, twice the operand registers): 64 x 64 at 4 warps with a T step of
    16. Small p or d shrink their tile to the next power of two (>= 16, tl.dot's minimum). The interpreter uses the
    minimum tiles, so small test shapes cross tile boundaries in every dimension.
    """
    if device.type != "cuda":
        return {"BLOCK_T": 16, "BLOCK_P": 16, "BLOCK_D": 16, "num_warps": 1}
    half = dtype != torch.float32
    block_p = pow2_at_least(p, 16, 128 if half else 64)
    block_d = pow2_at_least(d, 16, 128 if half and not conv else 64)
    return {
        "BLOCK_T": 32 if half else 16,
        "BLOCK_P": block_p,
        "BLOCK_D": block_d,
        "num_warps": 8 if block_p * block_d >= (128 * 64 if conv else 128 * 128) else 4,
        "num_stages": 3 if half else 2,
    }


def _check_out(op: str, out: torch.Tensor | None, shape: tuple[int, int, int], device: torch.device):
    """``out`` as a (B, p, d) view sharing its memory (any strides), or None."""
    if out is None:
        return None
    check_float(op, "out", out)
    if out.device != device:
        raise ValueError(f"{op}: out is on {out.device}, the inputs on {device}")
    B, p, d = shape
    if out.dim() < 3 or out.shape[:2] != (B, p) or math.prod(out.shape[2:]) != d:
        raise ValueError(f"{op}: out must have shape ({B}, {p}, {d}) or ({B}, {p}, *patch), got {tuple(out.shape)}")
    try:
        return out.view(B, p, d)
    except RuntimeError as e:
        raise ValueError(
            f"{op}: out (strides {out.stride()}) cannot be viewed as ({B}, {p}, {d}) without a copy"
        ) from e


def _finish(partials: torch.Tensor, B: int) -> torch.Tensor:
    return partials.sum(1) if partials.numel() else partials.new_zeros(B)


def norm_error_bound(
    dtype: torch.dtype, t: int, p: int, d: int, device: torch.device, conv: bool = False
) -> tuple[float, float]:
    """(epsilon, eta) of the module docstring's bound for one layer's shapes as the host wrappers tile them: the
    returned squared norm s_i obeys |sqrt(s_i) - ||G_i||_F| <= epsilon K_i + eta (||G_i||_F + epsilon K_i), with
    K_i = || |delta_i|^T |a_i| ||_F <= ||delta_i||_F ||a_i||_F and t the positions per example (K Ho Wo for a conv).

    epsilon = dot_error_bound(dtype, t) (the tile's dot products); eta = gamma_h, u = 2^-24, for the fp32 sum of
    squares of depth h = BLOCK_P + BLOCK_D + n_tiles (each reduction axis of the tile in any order, then the tiles'
    partials), which bounds sqrt(1 + theta) - 1 as well.
    """
    cfg = _settings(t, p, d, dtype, device, conv)
    n_tiles = cdiv(p, cfg["BLOCK_P"]) * cdiv(d, cfg["BLOCK_D"])
    h = cfg["BLOCK_P"] + cfg["BLOCK_D"] + n_tiles
    u = 2.0**-24
    return dot_error_bound(dtype, t), h * u / (1 - h * u)


@on_tensor_device
def per_sample_norm(a: torch.Tensor, delta: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """||delta_i^T a_i||_F^2 per example for a linear layer, fp32.

    Args:
        a: (B, T, d) layer inputs (fp32, bf16 or fp16; any strides).
        delta: (B, T, p) gradients w.r.t. the layer outputs, same dtype as ``a``.
        out: optional (B, p, d) tensor that receives G_i = delta_i^T a_i (instantiate+keep), any float dtype.

    Returns:
        (B,) float32 squared norms.
    """
    op = "per_sample_norm"
    check_layer_pair(op, a, delta)
    device = check_launchable(op, a, delta)
    B, T, d = a.shape
    p = delta.shape[2]
    g = _check_out(op, out, (B, p, d), device)
    if B == 0 or p == 0 or d == 0 or T == 0:
        if g is not None:
            g.zero_()
        return torch.zeros(B, dtype=torch.float32, device=device)
    cfg = _settings(T, p, d, a.dtype, device)
    n_d = cdiv(d, cfg["BLOCK_D"])
    n_tiles = cdiv(p, cfg["BLOCK_P"]) * n_d
    partials = torch.empty(B, n_tiles, dtype=torch.float32, device=device)
    gs = g.stride() if g is not None else (0, 0, 0)
    _per_sample_norm_linear_kernel[(B * n_tiles,)](
        a, delta, partials, g if g is not None else partials,
        T, d, p,
        *a.stride(), *delta.stride(), *gs,
        n_d, n_tiles,
        WRITE_G=g is not None, **dot_flags(a.dtype),
        **cfg,
    )  # fmt: skip
    return _finish(partials, B)


@on_tensor_device
def per_sample_norm_conv2d(
    x: torch.Tensor,
    delta: torch.Tensor,
    kernel_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    augmult: int = 1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """||G_i||_F^2 per example for a Conv2d (groups = 1, zero padding) by implicit GEMM, fp32.

    Args:
        x: (N, C, H, W) layer input, N = B * augmult (any strides, e.g. channels_last).
        delta: (N, p, Ho, Wo) gradient w.r.t. the layer output (same dtype as ``x``).
        kernel_size, stride, padding, dilation: the convolution's (ints or pairs; padding explicit zeros).
        augmult: K; rows i*K .. i*K + K - 1 are example i's views and their gradients are summed.
        out: optional (B, p, C, kh, kw) or (B, p, C*kh*kw) tensor that receives G_i.

    Returns:
        (B,) float32 squared norms.
    """
    op = "per_sample_norm_conv2d"
    geo = check_conv2d(op, x, delta, kernel_size, stride, padding, dilation, augmult)
    N, C, H, W = x.shape
    K, ho, wo, kh, kw = geo.augmult, geo.ho, geo.wo, geo.kh, geo.kw
    device = check_launchable(op, x, delta)
    B, p, d = N // K, delta.shape[1], C * kh * kw
    g = _check_out(op, out, (B, p, d), device)
    if B == 0 or p == 0 or d == 0:
        if g is not None:
            g.zero_()
        return torch.zeros(B, dtype=torch.float32, device=device)
    cfg = _settings(K * ho * wo, p, d, x.dtype, device, conv=True)
    n_d = cdiv(d, cfg["BLOCK_D"])
    n_tiles = cdiv(p, cfg["BLOCK_P"]) * n_d
    partials = torch.empty(B, n_tiles, dtype=torch.float32, device=device)
    gs = g.stride() if g is not None else (0, 0, 0)
    _per_sample_norm_conv2d_kernel[(B * n_tiles,)](
        x, delta, partials, g if g is not None else partials,
        C, H, W, ho, wo, kh, kw, K, p,
        geo.sh, geo.sw, geo.ph, geo.pw, geo.dh, geo.dw,
        *x.stride(), *delta.stride(), *gs,
        n_d, n_tiles,
        WRITE_G=g is not None, **dot_flags(x.dtype),
        **cfg,
    )  # fmt: skip
    return _finish(partials, B)


# --------------------------------------------------------------------------------------------------- references


def per_sample_grad_ref(a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(B, p, d) G_i = delta_i^T a_i, computed in the inputs' dtype (pass float64 for an oracle)."""
    return torch.bmm(delta.transpose(1, 2), a)


def per_sample_norm_ref(a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(B,) ||delta_i^T a_i||_F^2 in the inputs' dtype."""
    return torch.linalg.vector_norm(per_sample_grad_ref(a, delta).flatten(1), dim=1).square()


def unfold_conv2d(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1, augmult: int = 1) -> torch.Tensor:
    """(B, K * Ho * Wo, C * kh * kw) patches of x (N, C, H, W), example i's K views as extra positions."""
    u = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)  # (N, d, L)
    N, d, L = u.shape
    return u.view(N // augmult, augmult, d, L).permute(0, 1, 3, 2).reshape(N // augmult, augmult * L, d)


def per_sample_grad_conv2d_ref(
    x: torch.Tensor, delta: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1, augmult: int = 1
) -> torch.Tensor:
    """(B, p, C * kh * kw) per-example conv weight gradients by unfold + bmm, in the inputs' dtype."""
    a = unfold_conv2d(x, kernel_size, stride, padding, dilation, augmult)
    N, p = delta.shape[:2]
    d = delta.reshape(N // augmult, augmult, p, -1).permute(0, 1, 3, 2).reshape(N // augmult, -1, p)
    return per_sample_grad_ref(a, d)


def per_sample_norm_conv2d_ref(
    x: torch.Tensor, delta: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1, augmult: int = 1
) -> torch.Tensor:
    """(B,) squared norms of the per-example conv weight gradients (unfold + bmm), in the inputs' dtype."""
    g = per_sample_grad_conv2d_ref(x, delta, kernel_size, stride, padding, dilation, augmult)
    return torch.linalg.vector_norm(g.flatten(1), dim=1).square()
