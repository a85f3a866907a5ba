"""Per-example squared Frobenius norm of G_i = delta_i^T a_i, never holding G_i or the unfolded input in memory.

Linear layers: a (B, T, d), delta (B, T, p), ||G_i||_F^2 = sum_{r, j} (sum_t delta_i[t, r] a_i[t, j])^2.
Conv2d (groups 1): a_i[t, j] is the input patch of output position t, read from x (N, C, H, W) with the conv
geometry inside the kernel (implicit GEMM: j = (c, ki, kj) in the weight's (C, kh, kw) order; no unfold), and
delta_i is (p, Ho, Wo); with augmentation multiplicity K, example i's K views (rows i*K .. i*K + K - 1) are K*Ho*Wo
positions of one example, so G_i is the sum of the views' gradients.

Grid (B, p-tiles x d-tiles): program (i, tile) accumulates one (BLOCK_P, BLOCK_D) tile of G_i in fp32 registers
with tl.dot over T in BLOCK_T steps, then squares and sums it. The per-tile partial sums go to a (B, n_tiles)
fp32 buffer that a second pass (torch .sum(1)) reduces: deterministic, no atomics and no zero-initialised output,
at n_tiles * 4 bytes per example (a few hundred bytes). Optionally the tile is also stored to ``out`` (B, p, d):
the per-example gradients of the instantiate+keep plan, at no extra FLOPs.

Cost per example: 2 T p d FLOPs (the ordinary weight gradient's), reading a_i once per p-tile and delta_i once
per d-tile: T (d ceil(p / BLOCK_P) + p ceil(d / BLOCK_D)) elements, and writing p d elements only with ``out``.
fp32 inputs use exact fp32 products (input_precision "ieee", not TF32); bf16/fp16 inputs use the tensor cores
with fp32 accumulation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastdp.kernels._triton import (
    MAX_GRID_YZ,
    cast,
    cdiv,
    check_conv2d,
    check_float,
    check_launchable,
    check_layer_pair,
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
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
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
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
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
    """Tile sizes: the G tile (BLOCK_P x BLOCK_D) lives in registers across the T loop.

    On the GPU 64 x 64 fp32 accumulators at 4 warps (32 registers a thread); bf16/fp16 linear layers take 64 x 128
    with a T step of 32 for the tensor cores. fp32 "ieee" dots run on the FMA units, where a T step of 16, 8 warps and
    one stage keep the operand fragments in registers. The conv kernel's gathered operand tile needs its own index
    arithmetic per element, so its d tile stays at 64 (sm_90: up to ~170 registers, no spills:
    kernels/_compile_check.py). Small p or d shrink their tile to the next power of two (>= 16, tl.dot's minimum).
    The interpreter uses the minimum tiles, so small test shapes cross tile boundaries in every dimension.
    """
    if device.type != "cuda":
        return {"BLOCK_T": 16, "BLOCK_P": 16, "BLOCK_D": 16, "num_warps": 1}
    half = dtype != torch.float32
    return {
        "BLOCK_T": 32 if half else 16,
        "BLOCK_P": pow2_at_least(p, 16, 64),
        "BLOCK_D": pow2_at_least(d, 16, 128 if half and not conv else 64),
        # fp32 "ieee" dots run on the FMA units with both operand fragments in registers: at 4 warps, or with a
        # second stage of prefetched tiles, the conv kernel writing G_i of 1x1 convs spilled on sm_90 for some of the
        # presets' signatures (kernels/_compile_check.py); 8 warps and one stage leave them at 64-110 registers
        "num_warps": 4 if half else 8,
        "num_stages": 3 if half else 1,
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
    if n_tiles > MAX_GRID_YZ:
        raise ValueError(f"{op}: p={p}, d={d} needs {n_tiles} tiles per example, more than the grid allows")
    partials = torch.empty(B, n_tiles, dtype=torch.float32, device=device)
    gs = g.stride() if g is not None else (0, 0, 0)
    _per_sample_norm_linear_kernel[(B, n_tiles)](
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
    if n_tiles > MAX_GRID_YZ:
        raise ValueError(f"{op}: p={p}, d={d} needs {n_tiles} tiles per example, more than the grid allows")
    partials = torch.empty(B, n_tiles, dtype=torch.float32, device=device)
    gs = g.stride() if g is not None else (0, 0, 0)
    _per_sample_norm_conv2d_kernel[(B, n_tiles)](
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
