"""The Triton kernels (fastdp.kernels) against their pure-torch references.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before Triton is imported),
which runs every program in Python: shapes are tiny, but chosen so that every dimension crosses a tile boundary
(the interpreter's tiles are 16 wide, noisy_step's blocks 64 elements). Every output buffer the kernels allocate,
and every ``out`` given to them, is NaN-filled first, so an element a kernel forgets to write fails the test.
Oracles are float64 (fp32 summation order alone moves results by ~1e-6 relative here). Low precision: the
kernel's error vs the fp64 oracle on the same bf16 inputs is at most twice plain torch's in bf16.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read by triton.jit when the kernel modules are imported below

pytest.importorskip("triton")

from conftest import tail_groups  # noqa: E402

from fastdp.kernels import clip_reduce as cr  # noqa: E402
from fastdp.kernels import ghost_norm as gn  # noqa: E402
from fastdp.kernels import noisy_step as ns  # noqa: E402
from fastdp.kernels import per_sample_norm as psn  # noqa: E402
from fastdp.kernels._triton import interpreting  # noqa: E402
from fastdp.philox import philox4x32, philox_normal  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():  # a kernel module was imported before TRITON_INTERPRET was set
    pytest.skip("Triton's interpreter is off in this process and there is no GPU", allow_module_level=True)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """torch.empty / empty_like return NaN-filled (float) or -1-filled (int) memory while a test runs."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


def randn(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=DEVICE, dtype=dtype)


def nan_like(shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def assert_fp32(out, ref64, rel=2e-6):
    """fp32 accumulation of a few hundred terms: relative error ~ sqrt(terms) * 2^-24, with margin."""
    scale = ref64.abs().max().item() if ref64.numel() else 1.0
    torch.testing.assert_close(out.double().cpu(), ref64.cpu(), rtol=rel, atol=rel * scale)


def assert_low_precision(out, ref64, torch_lp):
    """The kernel's max error vs the fp64 oracle is at most 2x plain torch's in the same low precision."""
    err = (out.double() - ref64).abs().max().item()
    err_torch = (torch_lp.double() - ref64).abs().max().item()
    assert err <= 2 * err_torch + 1e-7 * ref64.abs().max().item(), (err, err_torch)


# ------------------------------------------------------------------------------------------------ philox noise


def test_philox_words_bit_exact():
    # the group counter crosses 2^32 (its high word), seed and step have non-zero high words
    seed, step, first = 2**40 + 5, 2**33 + 3, 2**32 - 70
    w = ns.philox_words(150, seed, step, first, device=DEVICE).cpu()
    g = torch.arange(first, first + 150, dtype=torch.int64)
    counter = (g & 0xFFFFFFFF, g >> 32, torch.full_like(g, step & 0xFFFFFFFF), torch.full_like(g, step >> 32))
    ref = torch.stack(philox4x32(counter, (seed & 0xFFFFFFFF, seed >> 32)), 1)
    assert torch.equal(w, ref)


@pytest.mark.parametrize("offset", [0, 2**34 + 3])
def test_philox_normal_matches_reference(offset):
    # 301 elements from an offset that is not a multiple of 4: partial first and last groups
    z = ns.philox_normal(301, seed=7, step=5, offset=offset, device=DEVICE).cpu()
    ref = philox_normal(301, seed=7, step=5, offset=offset)
    assert torch.isfinite(z).all()
    assert_noise_close(z, ref)


def assert_noise_close(z: torch.Tensor, ref: torch.Tensor) -> None:
    # The uniforms are bit-exact (the words are, and both round with the same fp64 operations to fp32), so what
    # differs is the fp32 log/sqrt/sin/cos of the two libraries (<= 2 ulp each). z = r cos(2 pi u): a few ulp of z,
    # plus an absolute few ulp of 1 times r <= sqrt(-2 ln 2^-65) = 9.5 from cos/sin near their zeros.
    eps = torch.finfo(torch.float32).eps
    assert ((z - ref).abs() <= 4 * eps * ref.abs() + 4 * eps * 9.5).all()


def test_philox_normal_takes_the_radius_low_words():
    """At the groups whose radius word is small (conftest.tail_groups) a one-word radius is tens of ulps off."""
    seed, step = 2**40 + 12345, 17
    for g in tail_groups(seed, step):
        z = ns.philox_normal(4, seed=seed, step=step, offset=4 * g, device=DEVICE).cpu()
        assert_noise_close(z, philox_normal(4, seed, step, offset=4 * g))


# -------------------------------------------------------------------------------------------- per-example norm


@pytest.mark.parametrize("B, T, d, p", [(3, 21, 18, 20), (1, 1, 5, 3)])
def test_per_sample_norm_linear(B, T, d, p):
    gen = torch.Generator().manual_seed(B * 100 + T)
    # a as a transposed view: the kernel reads any strides
    a = randn(B, d, T, gen=gen).transpose(1, 2)
    delta = randn(B, T, p, gen=gen)
    out = nan_like((B, p, d))
    n = psn.per_sample_norm(a, delta, out=out)
    assert n.dtype == torch.float32 and n.shape == (B,)
    assert_fp32(n, psn.per_sample_norm_ref(a.double(), delta.double()))
    assert_fp32(out, psn.per_sample_grad_ref(a.double(), delta.double()))
    assert_fp32(psn.per_sample_norm(a, delta), psn.per_sample_norm_ref(a.double(), delta.double()))


def test_per_sample_norm_linear_bf16():
    gen = torch.Generator().manual_seed(1)
    a, delta = randn(3, 21, 18, dtype=torch.bfloat16, gen=gen), randn(3, 21, 20, dtype=torch.bfloat16, gen=gen)
    out = nan_like((3, 20, 18), torch.bfloat16)
    n = psn.per_sample_norm(a, delta, out=out)
    assert_low_precision(n, psn.per_sample_norm_ref(a.double(), delta.double()), psn.per_sample_norm_ref(a, delta))
    assert_low_precision(out, psn.per_sample_grad_ref(a.double(), delta.double()), psn.per_sample_grad_ref(a, delta))


CONV_CASES = [
    # kernel, stride, padding, dilation, augmult, channels_last
    (3, 1, 1, 1, 1, False),
    ((2, 3), (2, 1), (0, 2), (2, 1), 2, True),
]


@pytest.mark.parametrize("k, s, pad, dil, K, cl", CONV_CASES)
def test_per_sample_norm_conv2d(k, s, pad, dil, K, cl):
    gen = torch.Generator().manual_seed(2)
    N, C, H, W, p = 4, 3, 7, 6, 17
    kh, kw = (k, k) if isinstance(k, int) else k
    x = randn(N, C, H, W, gen=gen)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    w = torch.empty(p, C, kh, kw, device=DEVICE)  # only its shape matters
    ho, wo = torch.nn.functional.conv2d(x, w.zero_(), stride=s, padding=pad, dilation=dil).shape[2:]
    delta = randn(N, p, ho, wo, gen=gen)
    out = nan_like((N // K, p, C, kh, kw))
    n = psn.per_sample_norm_conv2d(x, delta, (kh, kw), stride=s, padding=pad, dilation=dil, augmult=K, out=out)
    args = ((kh, kw), s, pad, dil, K)
    assert_fp32(n, psn.per_sample_norm_conv2d_ref(x.double(), delta.double(), *args))
    assert_fp32(out.flatten(2), psn.per_sample_grad_conv2d_ref(x.double(), delta.double(), *args))


def test_per_sample_norm_conv2d_bf16():
    gen = torch.Generator().manual_seed(3)
    x, delta = randn(2, 3, 6, 5, dtype=torch.bfloat16, gen=gen), randn(2, 18, 6, 5, dtype=torch.bfloat16, gen=gen)
    n = psn.per_sample_norm_conv2d(x, delta, 3, padding=1)
    ref = psn.per_sample_norm_conv2d_ref(x.double(), delta.double(), 3, 1, 1)
    assert_low_precision(n, ref, psn.per_sample_norm_conv2d_ref(x, delta, 3, 1, 1))


def _within_stated_bound(s, g64, m64, bound):
    """|sqrt(s_i) - ||G_i||| <= epsilon K_i + eta (||G_i|| + epsilon K_i) per example, the bound of
    per_sample_norm's docstring, with G_i and M_i = |delta_i|^T |a_i| in float64."""
    eps, eta = bound
    norm = torch.linalg.vector_norm(g64.flatten(1), dim=1)
    K = torch.linalg.vector_norm(m64.flatten(1), dim=1)
    err = (s.double().cpu().sqrt() - norm.cpu()).abs()
    allowed = eps * K.cpu() + eta * (norm.cpu() + eps * K.cpu())
    assert (err <= allowed).all(), (err, allowed)
    return err / norm.cpu()


PRECISIONS = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", PRECISIONS, ids=["fp32-tf32x3", "bf16", "fp16"])
def test_per_sample_norm_error_within_stated_bound(dtype):
    """The privacy contract of each precision (README, Precision of the per-example norms): the computed norm is
    within the bound of norm_error_bound against float64 on the operands as given, linear and conv; and the norm
    is that of the G_i the kernel writes (fused_keep clips what it keeps)."""
    gen = torch.Generator().manual_seed(12)
    B, T, d, p = 3, 45, 20, 33
    # rows of very different scales: |delta|^T |a| is far above |G| for some entries, the bound is not trivial
    scale = torch.logspace(-3, 3, T, dtype=torch.float32).view(1, T, 1).to(DEVICE)
    a = (randn(B, T, d, gen=gen) * scale).to(dtype)
    delta = (randn(B, T, p, gen=gen) / scale).to(dtype)
    out = nan_like((B, p, d))
    s = psn.per_sample_norm(a, delta, out=out)
    a64, d64 = a.double(), delta.double()
    g64 = psn.per_sample_grad_ref(a64, d64)
    m64 = psn.per_sample_grad_ref(a64.abs(), d64.abs())
    rel = _within_stated_bound(s, g64, m64, psn.norm_error_bound(dtype, T, p, d, torch.device(DEVICE)))
    assert rel.max() < 1e-3
    # the kept gradients' own norm: only the sum of squares' rounding separates the two
    _, eta = psn.norm_error_bound(dtype, T, p, d, torch.device(DEVICE))
    kept = torch.linalg.vector_norm(out.double().flatten(1), dim=1).square()
    assert ((s.double() - kept).abs() <= 2 * eta * kept).all()

    x = randn(2, 3, 6, 5, gen=gen).to(dtype)
    dc = randn(2, 18, 6, 5, gen=gen).to(dtype)
    s = psn.per_sample_norm_conv2d(x, dc, 3, padding=1)
    args = (3, 1, 1)
    g64 = psn.per_sample_grad_conv2d_ref(x.double(), dc.double(), *args)
    m64 = psn.per_sample_grad_conv2d_ref(x.double().abs(), dc.double().abs(), *args)
    _within_stated_bound(s, g64, m64, psn.norm_error_bound(dtype, 30, 18, 27, torch.device(DEVICE), conv=True))


def _tf32(x: torch.Tensor, rounding: bool) -> torch.Tensor:
    """fp32 -> TF32 (10 mantissa bits) as the GPU does: cvt.rna (to nearest, ties away) or the MMA's truncation."""
    bits = x.view(torch.int32)
    if rounding:
        bits = bits + 0x1000
    return (bits & ~0x1FFF).view(torch.float32)


def test_tf32x3_product_error_bound():
    """The derivation behind dot_error_bound for fp32, checked on the arithmetic it models (the interpreter computes
    tf32x3 dots in plain fp32, so the kernels cannot show it on a CPU): Triton's F32DotTC splits x into
    x_hi = rna(x) and x - x_hi, which the TF32 MMA truncates; three exact products leave out at most
    u^2 (5 + 4 u) |x y| (u = 2^-11), and plain TF32 would not meet that bound."""
    from fastdp.kernels._triton import U_TF32

    gen = torch.Generator().manual_seed(5)
    # random significands over many binades, and the worst cases of the split: tails near half a TF32 ulp
    x = torch.randn(200_000, generator=gen) * torch.exp2(torch.randint(-30, 30, (200_000,), generator=gen).float())
    y = torch.randn(200_000, generator=gen) * torch.exp2(torch.randint(-30, 30, (200_000,), generator=gen).float())
    x[:1000] = (1 + (torch.arange(1000) % 7 + 0.5) * 2.0**-11 + 2.0**-20).float()
    y[:1000] = (1 - (torch.arange(1000) % 5 + 0.5) * 2.0**-11 - 2.0**-21).float()
    xh, yh = _tf32(x, True), _tf32(y, True)
    xl, yl = _tf32(x - xh, False), _tf32(y - yh, False)
    three = xh.double() * yh.double() + xh.double() * yl.double() + xl.double() * yh.double()
    exact = x.double() * y.double()
    u = U_TF32
    rel = ((three - exact).abs() / exact.abs()).max().item()
    assert rel <= u * u * (5 + 4 * u), rel
    assert rel > 0.1 * u * u  # the bound is approached, not vacuous
    plain = ((xh.double() * yh.double() - exact).abs() / exact.abs()).max().item()
    assert plain > 100 * u * u * (5 + 4 * u)


def test_per_sample_norm_empty():
    assert psn.per_sample_norm(randn(0, 4, 3), randn(0, 4, 2)).shape == (0,)
    out = nan_like((2, 2, 3))
    assert torch.equal(psn.per_sample_norm(randn(2, 0, 3), randn(2, 0, 2), out=out).cpu(), torch.zeros(2))
    assert torch.equal(out.cpu(), torch.zeros(2, 2, 3))
    assert psn.per_sample_norm_conv2d(randn(0, 3, 5, 5), randn(0, 4, 3, 3), 3).shape == (0,)


def test_per_sample_norm_errors():
    with pytest.raises(ValueError, match=r"agree in B and T.*\(2, 4, 3\).*\(2, 5, 2\)"):
        psn.per_sample_norm(randn(2, 4, 3), randn(2, 5, 2))
    with pytest.raises(TypeError, match="same dtype"):
        psn.per_sample_norm(randn(2, 4, 3), randn(2, 4, 2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"out must have shape \(2, 2, 3\)"):
        psn.per_sample_norm(randn(2, 4, 3), randn(2, 4, 2), out=nan_like((2, 3, 2)))
    with pytest.raises(ValueError, match=r"delta must be \(N=2, p, 3, 3\)"):
        psn.per_sample_norm_conv2d(randn(2, 3, 5, 5), randn(2, 4, 5, 5), 3)
    with pytest.raises(ValueError, match="augmult"):
        psn.per_sample_norm_conv2d(randn(3, 3, 5, 5), randn(3, 4, 3, 3), 3, augmult=2)


# ------------------------------------------------------------------------------------------------- ghost norm


@pytest.mark.parametrize("B, T, d, p", [(3, 37, 18, 20), (1, 1, 5, 3)])
def test_ghost_norm(B, T, d, p):
    # T = 37: three row tiles, so diagonal and (doubled) off-diagonal tile pairs, the last one partial
    gen = torch.Generator().manual_seed(T)
    a, delta = randn(B, T, d, gen=gen), randn(B, p, T, gen=gen).transpose(1, 2)
    n = gn.ghost_norm(a, delta)
    assert n.shape == (B,) and n.dtype == torch.float32
    assert_fp32(n, gn.ghost_norm_ref(a.double(), delta.double()))
    # it is the same quantity as the instantiated norm
    assert_fp32(n, psn.per_sample_norm_ref(a.double(), delta.double()))


def test_ghost_norm_bf16_and_empty():
    gen = torch.Generator().manual_seed(4)
    a, delta = randn(2, 37, 18, dtype=torch.bfloat16, gen=gen), randn(2, 37, 20, dtype=torch.bfloat16, gen=gen)
    assert_low_precision(
        gn.ghost_norm(a, delta), gn.ghost_norm_ref(a.double(), delta.double()), gn.ghost_norm_ref(a, delta)
    )
    assert gn.ghost_norm(randn(0, 3, 2), randn(0, 3, 4)).shape == (0,)
    assert torch.equal(gn.ghost_norm(randn(2, 0, 2), randn(2, 0, 4)).cpu(), torch.zeros(2))


GHOST_CONV_CASES = [
    # N, C, H, W, p, kernel, stride, padding, dilation, augmult, channels_last: an 8x8 layer (T = 64 > BLOCK_T), a
    # strided one with two views per example and an asymmetric geometry
    (3, 3, 8, 8, 5, 3, 1, 1, 1, 1, False),
    (4, 2, 7, 9, 6, (2, 3), (2, 1), (0, 2), (2, 1), 2, True),
]


@pytest.mark.parametrize("dtype", PRECISIONS, ids=["fp32-tf32x3", "bf16", "fp16"])
@pytest.mark.parametrize("N, C, H, W, p, k, s, pad, dil, K, cl", GHOST_CONV_CASES)
def test_ghost_norm_conv2d(N, C, H, W, p, k, s, pad, dil, K, cl, dtype):
    """The implicit-GEMM ghost norm of a conv against float64 unfold + bmm on the same operands, within the stated
    bound (2 epsilon + epsilon^2 + eta (1 + epsilon)^2) ||M_i||_F^2 of ghost_norm's docstring."""
    gen = torch.Generator().manual_seed(N * 10 + C)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = randn(N, C, H, W, gen=gen).to(dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    w = torch.zeros(p, C, kh, kw, device=DEVICE)
    ho, wo = torch.nn.functional.conv2d(x.float(), w, stride=s, padding=pad, dilation=dil).shape[2:]
    delta = randn(N, p, ho, wo, gen=gen).to(dtype)
    sq = gn.ghost_norm_conv2d(x, delta, (kh, kw), stride=s, padding=pad, dilation=dil, augmult=K)
    assert sq.dtype == torch.float32 and sq.shape == (N // K,)
    args = ((kh, kw), s, pad, dil, K)
    g64 = psn.per_sample_grad_conv2d_ref(x.double(), delta.double(), *args)
    m64 = psn.per_sample_grad_conv2d_ref(x.double().abs(), delta.double().abs(), *args)
    eps, eta = gn.ghost_error_bound(dtype, K * ho * wo, C * kh * kw, p, torch.device(DEVICE))
    ref = torch.linalg.vector_norm(g64.flatten(1), dim=1).square().cpu()
    allowed = (2 * eps + eps * eps + eta * (1 + eps) ** 2) * torch.linalg.vector_norm(m64.flatten(1), dim=1).square()
    err = (sq.double().cpu() - ref).abs()
    assert (err <= allowed.cpu()).all(), (err, allowed)
    assert (err <= 1e-4 * ref).all()  # well-conditioned random data: far inside the worst case


def test_ghost_norm_conv2d_empty_and_errors():
    x, d = randn(0, 2, 5, 5), randn(0, 3, 3, 3)
    assert gn.ghost_norm_conv2d(x, d, 3).shape == (0,)
    with pytest.raises(ValueError, match="delta must be"):
        gn.ghost_norm_conv2d(randn(2, 2, 5, 5), randn(2, 3, 4, 4), 3)


# ------------------------------------------------------------------------------------------------ clip-reduce


@pytest.mark.parametrize("B, shape", [(11, (7, 9)), (1, ()), (3, (40,))])
def test_clip_reduce(B, shape):
    # B = 11 splits the rows over two programs (partials + second pass); B = 1, () is a scalar parameter
    gen = torch.Generator().manual_seed(B)
    g = randn(B, *shape, gen=gen)
    c = torch.rand(B, generator=gen).to(DEVICE)
    s = cr.clip_reduce(g, c)
    assert s.shape == shape and s.dtype == torch.float32
    assert_fp32(s, cr.clip_reduce_ref(g.double(), c.double()))


def test_clip_reduce_skips_zero_weight_rows():
    """A dropped example has weight 0 and may hold NaN/inf (0 * nan = nan): its row is not read."""
    gen = torch.Generator().manual_seed(43)
    g = randn(11, 7, 9, gen=gen)
    c = torch.rand(11, generator=gen).to(DEVICE) + 0.5
    c[[1, 10]] = 0.0
    g[1], g[10] = float("nan"), float("inf")
    kept = [i for i in range(11) if i not in (1, 10)]
    s = cr.clip_reduce(g, c)
    assert torch.isfinite(s).all()
    assert_fp32(s, cr.clip_reduce_ref(g[kept].double(), c[kept].double()))


def test_clip_reduce_strided_bf16_empty():
    gen = torch.Generator().manual_seed(5)
    g = randn(9, 2, 40, gen=gen)[:, 1]  # rows strided by 80
    c = torch.rand(9, generator=gen).to(DEVICE)
    assert_fp32(cr.clip_reduce(g, c), cr.clip_reduce_ref(g.double(), c.double()))
    gb = g.bfloat16()
    ref = cr.clip_reduce_ref(gb.double(), c.double())
    assert_low_precision(cr.clip_reduce(gb, c, out_dtype=torch.float32), ref, cr.clip_reduce_ref(gb, c))
    assert cr.clip_reduce(gb, c).dtype == torch.bfloat16
    assert torch.equal(cr.clip_reduce(randn(0, 3, 2), torch.zeros(0, device=DEVICE)).cpu(), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\(9,\) vector.*got \(8,\)"):
        cr.clip_reduce(g, c[:8])


@pytest.mark.parametrize("B, T, d, p", [(3, 7, 18, 20), (2, 20, 16, 33), (5, 1, 17, 3)])
def test_clip_reduce_bookkeeping(B, T, d, p):
    # (2, 20, ...) has 40 rows: two row splits; (5, 1, ...) one position per example
    gen = torch.Generator().manual_seed(B * T)
    a, delta = randn(B, T, d, gen=gen), randn(B, T, p, gen=gen)
    c = torch.rand(B, generator=gen).to(DEVICE)
    s = cr.clip_reduce_bookkeeping(a, delta, c)
    assert s.shape == (p, d)
    assert_fp32(s, cr.clip_reduce_bookkeeping_ref(a.double(), delta.double(), c.double()))
    # the same sum as weighting the instantiated per-example gradients
    assert_fp32(s, cr.clip_reduce_ref(psn.per_sample_grad_ref(a.double(), delta.double()), c.double()))


def test_clip_reduce_bookkeeping_skips_zero_weight_rows():
    """Linear and conv book-keeping: an example of weight 0 may hold NaN/inf in a and in delta (a dropped example):
    neither side of its rows is read, the sum is the other examples'."""
    gen = torch.Generator().manual_seed(44)
    a, delta = randn(4, 9, 18, gen=gen), randn(4, 9, 20, gen=gen)
    c = torch.rand(4, generator=gen).to(DEVICE) + 0.5
    c[2] = 0.0
    a[2, 3, 1], delta[2, 5, 0] = float("nan"), float("inf")
    kept = [0, 1, 3]
    s = cr.clip_reduce_bookkeeping(a, delta, c)
    assert torch.isfinite(s).all()
    assert_fp32(s, cr.clip_reduce_bookkeeping_ref(a[kept].double(), delta[kept].double(), c[kept].double()))

    x, dx = randn(6, 3, 7, 6, gen=gen), randn(6, 5, 7, 6, gen=gen)  # 3 examples of 2 views
    c = torch.rand(3, generator=gen).to(DEVICE) + 0.5
    c[1] = 0.0
    x[3, 0, 2, 2], dx[2, 4, 1, 1] = float("inf"), float("nan")  # each in one view of example 1
    views = [0, 1, 4, 5]
    s = cr.clip_reduce_bookkeeping_conv2d(x, dx, c, 3, padding=1, augmult=2)
    assert torch.isfinite(s).all()
    ref = cr.clip_reduce_bookkeeping_conv2d_ref(
        x[views].double(), dx[views].double(), c[[0, 2]].double(), (3, 3), 1, 1, 1, 2
    )
    assert_fp32(s, ref)


def test_clip_reduce_bookkeeping_bf16_empty():
    gen = torch.Generator().manual_seed(6)
    a, delta = randn(2, 20, 16, dtype=torch.bfloat16, gen=gen), randn(2, 20, 33, dtype=torch.bfloat16, gen=gen)
    c = torch.rand(2, generator=gen).to(DEVICE)
    # plain torch scales delta in bf16 too; the kernel rounds c * delta to bf16 once, then accumulates in fp32
    ref = cr.clip_reduce_bookkeeping_ref(a.double(), delta.double(), c.double())
    out = cr.clip_reduce_bookkeeping(a, delta, c, out_dtype=torch.float32)
    assert_low_precision(out, ref, cr.clip_reduce_bookkeeping_ref(a, delta, c))
    empty = cr.clip_reduce_bookkeeping(randn(0, 3, 4), randn(0, 3, 2), torch.zeros(0, device=DEVICE))
    assert torch.equal(empty.cpu(), torch.zeros(2, 4))


BOOKKEEPING_CONV_CASES = [
    # N, C, H, W, p, kernel, stride, padding, dilation, augmult, channels_last
    # 168 rows: two row splits, the second partial; d = 27 and p = 17 cross the 16-wide tiles
    (4, 3, 7, 6, 17, 3, 1, 1, 1, 1, False),
    # 4 x 3 x 8 = 96 rows in two splits; two views per example; x channels_last; d = 18
    (4, 3, 7, 6, 20, (2, 3), (2, 1), (0, 2), (2, 1), 2, True),
    # 12 rows, one split, one example of two views; d = 15, p = 33 (three p-tiles)
    (2, 5, 3, 4, 33, (3, 1), 2, 1, 1, 2, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("N, C, H, W, p, k, s, pad, dil, K, cl", BOOKKEEPING_CONV_CASES)
def test_clip_reduce_bookkeeping_conv2d(N, C, H, W, p, k, s, pad, dil, K, cl, dtype):
    gen = torch.Generator().manual_seed(N * H + p)
    kh, kw = (k, k) if isinstance(k, int) else k
    # x and delta are the first N rows of buffers whose row N is NaN: a read past the last row poisons the sum
    x = randn(N + 1, C, H, W, dtype=dtype, gen=gen)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    x[N:] = float("nan")
    x = x[:N]
    w = torch.zeros(p, C, kh, kw, device=DEVICE)  # only its shape matters
    ho, wo = torch.nn.functional.conv2d(x.float(), w, stride=s, padding=pad, dilation=dil).shape[2:]
    # delta as a permuted view (strides of a (N, Ho, Wo, p) tensor): the kernel reads any strides
    delta = randn(N + 1, ho, wo, p, dtype=dtype, gen=gen).permute(0, 3, 1, 2)
    delta[N:] = float("nan")
    delta = delta[:N]
    c = torch.rand(N // K, generator=gen).to(DEVICE)
    geometry = dict(stride=s, padding=pad, dilation=dil, augmult=K)
    args = ((kh, kw), s, pad, dil, K)
    ref = cr.clip_reduce_bookkeeping_conv2d_ref(x.double(), delta.double(), c.double(), *args)
    assert ref.shape == (p, C, kh, kw)
    # the oracle is torch's conv weight gradient; it agrees with weighting the unfolded per-example gradients
    per_example = psn.per_sample_grad_conv2d_ref(x.double(), delta.double(), *args)
    torch.testing.assert_close(ref, cr.clip_reduce_ref(per_example, c.double()).view(p, C, kh, kw))
    s_default = cr.clip_reduce_bookkeeping_conv2d(x, delta, c, (kh, kw), **geometry)
    assert s_default.shape == (p, C, kh, kw) and s_default.dtype == dtype
    if dtype == torch.float32:
        assert_fp32(s_default, ref)
    else:
        # plain torch scales delta in 16 bits too; the kernel rounds c * delta to 16 bits once, accumulates in fp32
        out = cr.clip_reduce_bookkeeping_conv2d(x, delta, c, (kh, kw), **geometry, out_dtype=torch.float32)
        assert out.dtype == torch.float32
        assert_low_precision(out, ref, cr.clip_reduce_bookkeeping_conv2d_ref(x, delta, c, *args))
        assert_low_precision(s_default, ref, cr.clip_reduce_bookkeeping_conv2d_ref(x, delta, c, *args))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_clip_reduce_bookkeeping_16bit_keeps_the_clipped_contributions(dtype):
    """16-bit operands: the book-keeping sum is within (2^-17 + epsilon_2n) sum_i |c_i| |delta_i|^T |a_i| of
    float64 on the same operands, linear and conv: c_i delta_i enters the tensor cores as a 16-bit head and tail
    (2^-18 relative for bf16). Rounding it to one 16-bit number instead errs by up to 2^-9 and fails this bound."""
    from fastdp.kernels._triton import dot_error_bound

    gen = torch.Generator().manual_seed(21)
    B, T, d, p = 3, 20, 18, 20
    a, delta = randn(B, T, d, gen=gen).to(dtype), randn(B, T, p, gen=gen).to(dtype)
    c = (torch.rand(B, generator=gen) * 0.9 + 0.05).to(DEVICE)
    s = cr.clip_reduce_bookkeeping(a, delta, c, out_dtype=torch.float32)
    ref = cr.clip_reduce_bookkeeping_ref(a.double(), delta.double(), c.double())
    mag = cr.clip_reduce_bookkeeping_ref(a.double().abs(), delta.double().abs(), c.double())
    bound = (2.0**-17 + dot_error_bound(dtype, 2 * B * T + 2)) * mag
    assert ((s.double() - ref).abs() <= bound).all()

    x, dx = randn(4, 3, 7, 6, gen=gen).to(dtype), randn(4, 17, 7, 6, gen=gen).to(dtype)
    c = (torch.rand(2, generator=gen) * 0.9 + 0.05).to(DEVICE)
    s = cr.clip_reduce_bookkeeping_conv2d(x, dx, c, 3, padding=1, augmult=2, out_dtype=torch.float32)
    args = (3, 1, 1, 1, 2)
    ref = cr.clip_reduce_bookkeeping_conv2d_ref(x.double(), dx.double(), c.double(), *args)
    mag = cr.clip_reduce_bookkeeping_conv2d_ref(x.double().abs(), dx.double().abs(), c.double(), *args)
    bound = (2.0**-17 + dot_error_bound(dtype, 2 * 4 * 42 + 2)) * mag
    assert ((s.double() - ref).abs() <= bound).all()


def test_clip_reduce_bookkeeping_conv2d_empty():
    zero = torch.zeros(0, device=DEVICE)
    empty = cr.clip_reduce_bookkeeping_conv2d(randn(0, 3, 5, 5), randn(0, 4, 3, 3), zero, 3)
    assert torch.equal(empty.cpu(), torch.zeros(4, 3, 3, 3))
    no_out = cr.clip_reduce_bookkeeping_conv2d(
        randn(2, 3, 5, 5), randn(2, 0, 5, 5), torch.ones(2, device=DEVICE), 3, padding=1
    )
    assert no_out.shape == (0, 3, 3, 3)


def test_clip_reduce_bookkeeping_conv2d_errors():
    x, delta, c = randn(4, 3, 5, 5), randn(4, 2, 3, 3), torch.ones(2, device=DEVICE)
    op = cr.clip_reduce_bookkeeping_conv2d
    with pytest.raises(ValueError, match=r"\(2,\) vector, one per example, got \(4,\)"):
        op(x, delta, torch.ones(4, device=DEVICE), 3, augmult=2)
    with pytest.raises(TypeError, match="clip factors must be floating point"):
        op(x, delta, torch.ones(2, dtype=torch.int64, device=DEVICE), 3, augmult=2)
    with pytest.raises(TypeError, match="x and delta must have the same dtype, got torch.float32 and torch.bfloat16"):
        op(x, delta.bfloat16(), c, 3, augmult=2)
    with pytest.raises(TypeError, match="x must be one of float32, bfloat16, float16, got torch.float64"):
        op(x.double(), delta.double(), c, 3, augmult=2)
    with pytest.raises(ValueError, match=r"x must be 4-D \(N, C, H, W\)"):
        op(x[0], delta, c, 3)
    with pytest.raises(ValueError, match=r"delta must be \(N=4, p, 5, 5\).*padding \(1, 1\)"):
        op(x, delta, c, 3, padding=1, augmult=2)
    with pytest.raises(ValueError, match=r"stride, dilation must be >= 1 and padding >= 0.*stride=\(0, 1\)"):
        op(x, delta, c, 3, stride=(0, 1), augmult=2)
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair"):
        op(x, delta, c, (3, 3, 3), augmult=2)
    with pytest.raises(ValueError, match=r"kernel \(3, 3\) \(dilation \(3, 3\)\) is larger than the padded input"):
        op(x, delta, c, 3, dilation=3, augmult=2)
    with pytest.raises(ValueError, match="augmult must be >= 1 and divide the 4 rows of x, got 3"):
        op(x, delta, c, 3, augmult=3)


# ------------------------------------------------------------------------------------------------- noisy step

SHAPES = [(7,), (13, 11), (1,), (70,), (3, 2, 5)]  # end to end: offsets 5, 12, 155, 156, 226 (not multiples of 4)

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-momentum-wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    "nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam-l2": lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1),
    "adamw": lambda ps: torch.optim.AdamW(
        [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3}], lr=1e-2, weight_decay=0.1
    ),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_noisy_step_matches_torch_optimizer(name):
    gen = torch.Generator().manual_seed(7)
    params = [randn(*s, gen=gen) for s in SHAPES]
    ref_params = [p.clone() for p in params]
    opt, ref_opt = OPTIMIZERS[name](params), OPTIMIZERS[name](ref_params)
    for step in range(3):  # the first step starts the state, the later ones read it
        sums = [None if i == 2 else randn(*s, gen=gen) for i, s in enumerate(SHAPES)]
        std = 0.0 if step == 1 else 0.7
        kw = dict(std=std, expected_batch_size=4, seed=2**35 + 3, step=step, offset=5)
        ns.noisy_optimizer_step(opt, sums, **kw)
        ns.noisy_step_ref(ref_opt, sums, **kw)
        # the noise agrees to a few ulp (see the philox test); each update adds a few fp32 roundings
        for p, q in zip(params, ref_params, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(params, ref_params, strict=True):
        st, ref_st = opt.state[p], ref_opt.state[q]
        assert st.keys() == ref_st.keys()
        for key in st:
            if isinstance(st[key], torch.Tensor):
                torch.testing.assert_close(st[key], ref_st[key].to(st[key].device), rtol=1e-5, atol=1e-6)


def test_noisy_step_bf16_params():
    gen = torch.Generator().manual_seed(8)
    p32 = [randn(*s, gen=gen) for s in SHAPES]
    sums = [randn(*s, gen=gen).bfloat16() for s in SHAPES]
    params = [p.bfloat16() for p in p32]
    exact = [p.bfloat16().double() for p in p32]
    lp = [p.bfloat16() for p in p32]
    bufs: list = [None] * len(SHAPES)
    kw = dict(std=0.7, expected_batch_size=4, seed=1, step=0)
    ns.noisy_step(params, sums, **kw, optimizer="sgd", lr=0.1, momentum=0.9, momentum_buffers=bufs)
    ns.noisy_step_ref(torch.optim.SGD(exact, lr=0.1, momentum=0.9), [s.double() for s in sums], **kw)
    ns.noisy_step_ref(torch.optim.SGD(lp, lr=0.1, momentum=0.9), sums, **kw)
    assert all(b.dtype == torch.bfloat16 for b in bufs)
    for p, e, q in zip(params, exact, lp, strict=True):
        assert_low_precision(p, e, q)


def test_noisy_step_mixed_dtypes_and_offsets():
    # one launch per (param dtype, sum dtype): fp32 params with bf16 and fp32 sums, explicit offsets out of order
    gen = torch.Generator().manual_seed(9)
    params = [randn(37, gen=gen), randn(5, 3, gen=gen), randn(64, gen=gen)]
    sums = [randn(37, gen=gen).bfloat16(), randn(5, 3, gen=gen), None]
    offsets = [1000, 3, 2**33 + 2]
    ref = [p.clone() for p in params]
    kw = dict(std=0.5, expected_batch_size=3, seed=4, step=11)
    ns.noisy_step(params, sums, **kw, offsets=offsets, optimizer="adamw", lr=0.01, weight_decay=0.1)
    for p, s, o in zip(ref, sums, offsets, strict=True):
        ns.noisy_step_ref(torch.optim.AdamW([p], lr=0.01, weight_decay=0.1), [s], **kw, offset=o)
    for p, q in zip(params, ref, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_noisy_step_pointer_table_built_once(monkeypatch):
    """The static pointer table (parameters, state, sizes, offsets) is built once per set of tensors: fresh clipped
    sums each step, as the engine makes them, only change the sums vector. Built twice here: before and after the
    first step creates the momentum buffers."""
    static_builds = []
    real = ns._to_device

    def counting(values, device):
        if values and isinstance(values[0], tuple):
            static_builds.append(values)
        return real(values, device)

    monkeypatch.setattr(ns, "_to_device", counting)
    monkeypatch.setattr(ns, "_TABLE_CACHE", {})
    monkeypatch.setattr(ns, "_SUMS_CACHE", {})
    gen = torch.Generator().manual_seed(3)
    params, bufs = [randn(37, gen=gen), randn(5, 3, gen=gen)], [None, None]
    ref_p = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.SGD(ref_p, lr=0.1, momentum=0.9)
    for step in range(4):
        sums = [randn(37, gen=gen), None if step == 2 else randn(5, 3, gen=gen)]
        ns.noisy_step(params, sums, std=0.5, expected_batch_size=4, seed=1, step=step, lr=0.1, momentum=0.9,
                      momentum_buffers=bufs)  # fmt: skip
        ns.noisy_step_ref(opt, sums, std=0.5, expected_batch_size=4, seed=1, step=step)
    assert len(static_builds) == 2
    for p, q in zip(params, ref_p, strict=True):
        torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)


def test_noisy_step_edge_cases():
    p = randn(5)
    before = p.clone()
    ns.noisy_step([], [], std=1.0, expected_batch_size=2, seed=0, step=0, lr=0.1)  # nothing to do
    ns.noisy_step([randn(0), p], [None, None], std=0.0, expected_batch_size=2, seed=0, step=0, lr=0.1)
    assert torch.equal(p, before)  # no sum, no noise, no decay: a zero gradient
    with pytest.raises(ValueError, match="got 1 params and 2 sums"):
        ns.noisy_step([p], [None, None], std=1.0, expected_batch_size=2, seed=0, step=0, lr=0.1)
    with pytest.raises(ValueError, match=r"params\[0\].*not contiguous"):
        ns.noisy_step([randn(4, 3).t()], [None], std=1.0, expected_batch_size=2, seed=0, step=0, lr=0.1)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        ns.noisy_step([p], [None], std=1.0, expected_batch_size=2, seed=0, step=0, lr=0.1, optimizer="lion")
    with pytest.raises(ValueError, match="dampening must be 0"):
        ns.noisy_optimizer_step(
            torch.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.1), [None], std=1.0, expected_batch_size=2, seed=0,
            step=0,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------- without triton


def test_kernel_modules_import_without_triton():
    """The references stay usable (the torch backend's) and launching explains how to get Triton."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fastdp\n"
        "from fastdp.kernels import per_sample_norm as m, ghost_norm, clip_reduce, noisy_step\n"
        "one = torch.ones(1, 2, 3, dtype=torch.float64)\n"
        "n = m.per_sample_norm_ref(one, one[..., :2])\n"
        "assert abs(n.item() - 24.0) < 1e-12\n"
        "try:\n"
        "    m.per_sample_norm(torch.ones(1, 2, 3), torch.ones(1, 2, 2))\n"
        "except ImportError as e:\n"
        "    assert 'pip install triton' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr


def test_kernels_compile_for_sm90():
    """The interpreter never compiles: build kernels through PTX to a cubin for sm_90 (no GPU needed). Here the
    variants and the digits preset's launches at one batch size (quick); .ci/run compiles every preset's."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastdp.kernels._compile_check", "--arch", "90", "--preset=digits", "--batch=255"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if r.returncode == 2:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count("ok   sm_90") >= 40, r.stdout
    for variant in ("WRITE_G=True", "MOMENTUM=True", "MOMENTUM=False", "OPTIMIZER=1", "bfloat16", "float16"):
        assert variant in r.stdout, variant
    assert "0 spilling, 0 failing" in r.stdout, r.stdout[-2000:]
    # the matmul kernels (fp32 by tf32x3, bf16, fp16) were checked for tensor-core instructions in their SASS
    if "tensor cores: unchecked" not in r.stdout:
        assert r.stdout.count("tensor cores: HGMMA") >= 21, r.stdout[-2000:]


# ------------------------------------------------------------------------------------------------------- GPU


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-tf32x3", "bf16"])
def test_gpu_norms_and_reductions_realistic_shapes(dtype):
    gen = torch.Generator().manual_seed(9)
    a, delta = randn(8, 300, 257, dtype=dtype, gen=gen), randn(8, 300, 130, dtype=dtype, gen=gen)
    ref = psn.per_sample_norm_ref(a.double(), delta.double())
    # the stated bound of each precision, on the GPU's tensor cores (tf32x3 for fp32)
    g64 = psn.per_sample_grad_ref(a.double(), delta.double())
    m64 = psn.per_sample_grad_ref(a.double().abs(), delta.double().abs())
    bound = psn.norm_error_bound(dtype, 300, 130, 257, a.device)
    _within_stated_bound(psn.per_sample_norm(a, delta), g64, m64, bound)
    check = assert_fp32 if dtype == torch.float32 else None
    for n, lp in (
        (psn.per_sample_norm(a, delta), psn.per_sample_norm_ref(a, delta)),
        (gn.ghost_norm(a, delta), gn.ghost_norm_ref(a, delta)),
    ):
        if check:
            check(n, ref, rel=1e-5)
        else:
            assert_low_precision(n, ref, lp)
    x, dx = randn(8, 64, 16, 16, dtype=dtype, gen=gen), randn(8, 128, 8, 8, dtype=dtype, gen=gen)
    n = psn.per_sample_norm_conv2d(x, dx, 3, stride=2, padding=1)
    ref = psn.per_sample_norm_conv2d_ref(x.double(), dx.double(), 3, 2, 1)
    if check:
        check(n, ref, rel=1e-5)
    else:
        assert_low_precision(n, ref, psn.per_sample_norm_conv2d_ref(x, dx, 3, 2, 1))
    c = torch.rand(8, generator=gen).to(DEVICE)
    s = cr.clip_reduce_bookkeeping(a, delta, c, out_dtype=torch.float32)
    ref = cr.clip_reduce_bookkeeping_ref(a.double(), delta.double(), c.double())
    if check:
        check(s, ref, rel=1e-5)
    else:
        assert_low_precision(s, ref, cr.clip_reduce_bookkeeping_ref(a, delta, c))
    s = cr.clip_reduce_bookkeeping_conv2d(x, dx, c, 3, stride=2, padding=1, out_dtype=torch.float32)
    ref = cr.clip_reduce_bookkeeping_conv2d_ref(x.double(), dx.double(), c.double(), 3, 2, 1)
    if check:
        check(s, ref, rel=1e-5)
    else:
        assert_low_precision(s, ref, cr.clip_reduce_bookkeeping_conv2d_ref(x, dx, c, 3, 2, 1))


@gpu
@needs_cuda
def test_gpu_philox_and_step_one_million():
    n = 1 << 20
    z, ref = ns.philox_normal(n, seed=3, step=9, offset=1).cpu(), philox_normal(n, seed=3, step=9, offset=1)
    eps = torch.finfo(torch.float32).eps
    assert ((z - ref).abs() <= 4 * eps * ref.abs() + 4 * eps * 6.8).all()
    gen = torch.Generator().manual_seed(10)
    params = [randn(1000, 999, gen=gen), randn(999, gen=gen)]
    ref_params = [p.clone() for p in params]
    opt, ref_opt = torch.optim.Adam(params, lr=1e-3), torch.optim.Adam(ref_params, lr=1e-3)
    for step in range(2):
        sums = [randn(*p.shape, gen=gen) for p in params]
        ns.noisy_optimizer_step(opt, sums, std=1.0, expected_batch_size=256, seed=3, step=step)
        ns.noisy_step_ref(ref_opt, sums, std=1.0, expected_batch_size=256, seed=3, step=step)
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_wrappers_run_on_their_tensors_device():
    """Every host wrapper enters its tensors' device (Triton launches on the current device's stream)."""
    from fastdp.kernels._triton import _first_device

    a = torch.zeros(2)
    assert _first_device(([a],), {}) == a.device and _first_device((3,), {"x": a}) == a.device
    assert _first_device((3,), {"device": "cuda:1"}) == torch.device("cuda:1")
    assert _first_device((3,), {}) is None
    wrappers = (cr.clip_reduce, cr.clip_reduce_bookkeeping, cr.clip_reduce_bookkeeping_conv2d, gn.ghost_norm)
    wrappers += (ns.noisy_step, ns.philox_normal, ns.philox_words, psn.per_sample_norm, psn.per_sample_norm_conv2d)
    for fn in wrappers:
        assert getattr(fn, "__wrapped__", None) is not None, fn.__name__


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_on_the_second_gpu_while_the_first_is_current():
    gen = torch.Generator().manual_seed(9)
    a, d = randn(4, 3, 8, gen=gen).to("cuda:1"), randn(4, 3, 5, gen=gen).to("cuda:1")
    with torch.cuda.device(0):
        got = psn.per_sample_norm(a, d)
    torch.testing.assert_close(got.cpu(), psn.per_sample_norm_ref(a.cpu(), d.cpu()), rtol=1e-5, atol=1e-6)
