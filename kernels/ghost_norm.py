"""Ghost norm: ||delta_i^T a_i||_F^2 = sum_{t,s} (a_t . a_s)(delta_t . delta_s) per example, without the T x T Grams.

For a (B, T, d), delta (B, T, p): the two Gram matrices A_i A_i^T and D_i D_i^T are formed one (BLOCK_T x BLOCK_T)
tile at a time, in fp32 registers, multiplied elementwise and summed; nothing of size T^2 touches memory. Both
Grams are symmetric, so only tile pairs (t-tile, s-tile) with s-tile >= t-tile are visited and the off-diagonal
ones count twice: n (n + 1) / 2 tile pairs for n = ceil(T / BLOCK_T).

Grid (B, tile pairs): one program per (example, pair); the pair list is a small host-built table (cached per n),
which keeps every program's work equal (a program per t-tile looping over s-tiles would leave the last ones with
one pair while the first has n). Each program loops over d and then p in BLOCK_K steps (tl.dot of two row tiles),
and writes one fp32 partial to a (B, n_pairs) buffer that a second pass (torch .sum(1)) reduces: deterministic,
no atomics. Cost per example: ~T^2 (d + p) FLOPs for the upper triangle (the full double sum is 2 T^2 (d + p)), and
reads of (n + 1) T (d + p) elements: each row tile is re-read for every pair it belongs to (L2-resident in
practice for the T of the layers where ghost norms pay, 2 T^2 < p d). Cheaper than instantiating G_i (2 T p d)
exactly when T^2 (d + p) < 2 T p d.
"""

from __future__ import annotations

import torch

from fastdp.kernels._triton import (
    MAX_GRID_YZ,
    cdiv,
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
    b = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1)
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


# ------------------------------------------------------------------------------------------------ host wrappers


def _settings(t: int, d: int, p: int, dtype: torch.dtype, device: torch.device) -> dict:
    """BLOCK_T x BLOCK_T for the two Gram tiles held at once (2 x 64 x 64 fp32 = 32 registers a thread at 8
    warps), BLOCK_K the reduction step over d and p. Short sequences shrink BLOCK_T to limit masked work. The
    interpreter uses tl.dot's minimum of 16 so small tests have several tiles and both kinds of pairs."""
    if device.type != "cuda":
        return {"BLOCK_T": 16, "BLOCK_K": 16, "num_warps": 1}
    half = dtype != torch.float32
    return {
        "BLOCK_T": pow2_at_least(t, 16, 64),
        "BLOCK_K": pow2_at_least(min(d, p), 16, 64 if half else 32),
        "num_warps": 8 if t >= 64 else 4,
        "num_stages": 3 if half else 2,
    }


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
    if n_pairs > MAX_GRID_YZ:
        raise ValueError(f"{op}: T={T} needs {n_pairs} tile pairs per example, more than the grid allows")
    partials = torch.empty(B, n_pairs, dtype=torch.float32, device=device)
    _ghost_norm_kernel[(B, n_pairs)](
        a, delta, pairs, partials, T, d, p, *a.stride(), *delta.stride(), n_pairs,
        **dot_flags(a.dtype), **cfg,
    )  # fmt: skip
    return partials.sum(1)


# ---------------------------------------------------------------------------------------------------- reference


def ghost_norm_ref(a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(B,) sum_{t,s} (a_t . a_s)(delta_t . delta_s) from the full Gram matrices, in the inputs' dtype."""
    ga = torch.bmm(a, a.transpose(1, 2))
    gd = torch.bmm(delta, delta.transpose(1, 2))
    return (ga * gd).sum((1, 2))
