"""The compiled extension fastdp._C (csrc/) against pure-torch references.

CPU kernels always (skipped only when the extension is not built); CUDA kernels under ``@pytest.mark.gpu``. Every
output is poisoned (NaN-filled) before the call, inputs are fresh random tensors, sizes are not multiples of the
vector widths (4 / 8 / 16 lanes) nor of the kernels' chunk sizes.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tail_groups

from fastdp import _ext
from fastdp.philox import philox4x32, philox_normal

pytestmark = pytest.mark.skipif(not _ext.cpu_available(), reason=f"fastdp._C is not built: {_ext.IMPORT_ERROR}")
ops = torch.ops.fastdp

HAS_GPU = torch.cuda.is_available() and _ext.cpu_available() and _ext.cuda_compiled()


def gpu_test(fn):
    """Marked ``gpu`` and skipped without a CUDA device or without the extension's CUDA kernels."""
    fn = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and fastdp._C with CUDA kernels")(fn)
    return pytest.mark.gpu(fn)


SEED = 2**40 + 12345  # the key's high word matters


def poisoned(shape, dtype, device="cpu") -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def ulps(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|x - ref| in float32 units in the last place of ref."""
    ref = ref.float()
    ulp = torch.nextafter(ref.abs(), torch.tensor(math.inf)) - ref.abs()
    return (x.float() - ref).abs().double() / ulp.double()


# ---- clip-and-reduce ------------------------------------------------------------------------------------------------

# the last two split the rows over blocks on a GPU (a bias over a large batch; P not a multiple of 4)
CLIP_SHAPES = [(1, (1,)), (3, (7,)), (5, (2049,)), (32, (4099,)), (6, (3, 5, 7)), (9, (2, 2048 + 13))]
CLIP_SHAPES += [(4096, (16,)), (1000, (130,))]


def clip_reference(g: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """S in float64 and the a-priori bound sum_i |w_i g_ij| of the summation error."""
    g64, w64 = g.double().reshape(g.shape[0], -1), w.double()
    return (w64 @ g64).view(g.shape[1:]), (w64.abs() @ g64.abs()).view(g.shape[1:])


@pytest.mark.parametrize("b, shape", CLIP_SHAPES)
@pytest.mark.parametrize(
    "g_dtype, out_dtype",
    [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
     (torch.bfloat16, torch.float32)],
)  # fmt: skip
def test_clip_reduce_cpu(b, shape, g_dtype, out_dtype):
    torch.manual_seed(b * 1000 + len(shape))
    g = torch.randn(b, *shape, dtype=torch.float64).to(g_dtype)
    w = torch.rand(b, dtype=torch.float64) * 2 - 0.5  # the clip factors c_i (some negative: a harder sum)
    out = poisoned(shape, out_dtype)
    res = ops.clip_reduce.out(g, w.to(torch.float32 if g_dtype != torch.float64 else torch.float64), out=out)
    assert res.data_ptr() == out.data_ptr() and torch.isfinite(out).all()
    ref, bound = clip_reference(g, w.to(torch.float32 if g_dtype != torch.float64 else torch.float64))
    # a-priori bound of a sequential sum of b terms in the accumulator (unit roundoff u = 2^-24 in float32,
    # 2^-53 in float64), plus the final rounding to the output dtype
    u_acc = 2.0**-53 if g_dtype == torch.float64 else 2.0**-24
    u_out = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.bfloat16: 2.0**-8}[out_dtype]
    err = (out.double() - ref).abs()
    assert (err <= (b + 1) * u_acc * bound + u_out * ref.abs() + 1e-300).all(), err.max()
    # low precision: at most 2x the error of plain torch in the same dtype (or inside the a-priori bound above)
    if g_dtype != torch.float64:
        torch_out = (w.to(g_dtype) @ g.reshape(b, -1)).view(shape).to(out_dtype)
        torch_err = (torch_out.double() - ref).abs().max()
        assert err.max() <= max(2 * torch_err, ((b + 1) * u_acc * bound + u_out * ref.abs()).max())
    # the functional form: fresh output of grads' dtype and per-example shape
    fresh = ops.clip_reduce(g, w)
    assert fresh.shape == shape and fresh.dtype == g_dtype


def test_clip_reduce_independent_of_threads():
    g, w = torch.randn(7, 70001), torch.rand(7)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.clip_reduce(g, w)
        torch.set_num_threads(2)
        two = ops.clip_reduce(g, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_clip_reduce_skips_zero_weight_rows(dtype):
    """A dropped example has weight 0 and may hold NaN/inf (0 * nan = nan): its row is not read."""
    torch.manual_seed(41)
    g = torch.randn(9, 2049, dtype=torch.float64).to(dtype)
    w = torch.rand(9, dtype=torch.float64) + 0.5
    dropped = [0, 3, 4, 8]  # around the 4-row unrolling and the tail
    w[dropped] = 0.0
    g[dropped[:2]] = float("nan")
    g[dropped[2:]] = float("inf")
    wa = w.to(torch.float64 if dtype == torch.float64 else torch.float32)
    out = ops.clip_reduce(g, wa)
    kept = [i for i in range(9) if i not in dropped]
    ref, bound = clip_reference(g[kept], wa[kept])
    assert torch.isfinite(out).all()
    u = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}[dtype]
    assert ((out.double() - ref).abs() <= (len(kept) + 1) * u * (bound + ref.abs()) + 1e-300).all()


def test_clip_reduce_empty_batch_is_zero():
    out = poisoned((5, 3), torch.float32)
    ops.clip_reduce.out(torch.zeros(0, 5, 3), torch.zeros(0), out=out)
    assert torch.equal(out, torch.zeros(5, 3))


def test_clip_reduce_checks_inputs():
    g, w = torch.randn(4, 6), torch.rand(4)
    with pytest.raises(RuntimeError, match="grads must be contiguous"):
        ops.clip_reduce(g.t().contiguous().t(), w)
    with pytest.raises(RuntimeError, match=r"weights must be \(B,\) = \(4,\)"):
        ops.clip_reduce(g, torch.rand(5))
    with pytest.raises(RuntimeError, match="out must have grads' dtype"):
        ops.clip_reduce.out(g, w, out=torch.empty(6, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="out must have grads' per-example shape"):
        ops.clip_reduce.out(g, w, out=torch.empty(7))
    with pytest.raises(RuntimeError, match="grads must be float32, float64 or bfloat16"):
        ops.clip_reduce(g.half(), w)


# ---- the noise stream -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed, step, group_offset", [(0, 0, 0), (SEED, 3, 7), (2**63 - 1, 2**33 + 5, 2**32 - 3), (-5, 1, 11)]
)
def test_philox_words_bit_exact(seed, step, group_offset):
    n = 1001
    words = ops.philox_words(n, seed, step, group_offset)
    g = torch.arange(group_offset, group_offset + n, dtype=torch.int64)
    counter = (g & 0xFFFFFFFF, g >> 32, torch.full_like(g, step & 0xFFFFFFFF), torch.full_like(g, step >> 32))
    ref = philox4x32(counter, (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF))
    assert torch.equal(words, torch.stack(ref, 1))


# The normals use Cephes log/sin/cos (csrc/philox.h) where the reference uses torch's (SLEEF/libm): each is within
# ~1 ulp of the exact value, and through sqrt(-2 ln u) * cos(t) the difference stays within a few ulp of the result
# (3 ulp measured over 2^22 draws). Allowed: 4 ulp.
NOISE_ULPS = 4


@pytest.mark.parametrize("n, offset", [(1, 0), (5, 2), (1003, 1), (70001, 2**32 + 3)])
def test_philox_normal_matches_reference(n, offset):
    out = poisoned((n,), torch.float32)
    ops.philox_normal_(out, SEED, 17, offset)
    ref = philox_normal(n, SEED, 17, offset)
    assert torch.isfinite(out).all()
    assert ulps(out, ref).max() <= NOISE_ULPS


def test_philox_normal_takes_the_radius_low_words():
    """At the groups whose radius word is small (conftest.tail_groups) a one-word radius is tens of ulps off."""
    for g in tail_groups(SEED, 17):
        out = ops.philox_normal_(poisoned((4,), torch.float32), SEED, 17, 4 * g)
        assert ulps(out, philox_normal(4, SEED, 17, 4 * g)).max() <= NOISE_ULPS, g


def test_philox_normal_does_not_depend_on_chunking():
    whole = ops.philox_normal_(torch.empty(50001), SEED, 2, 3)
    parts = [ops.philox_normal_(torch.empty(n), SEED, 2, 3 + o) for o, n in ((0, 1), (1, 30000), (30001, 20000))]
    assert torch.equal(whole, torch.cat(parts))


# ---- the noisy optimizer step ---------------------------------------------------------------------------------------

SHAPES = [(3, 5), (7,), (4, 3, 3, 3), (1,), (1037,), (2, 2049)]  # 60 + 7 + 108 + 1 + 1037 + 4098 elements


def model_tensors(dtype, start_offset=0, seed=0):
    """Parameters, clipped sums (one None: no contribution) and their noise offsets, laid end to end."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    sums = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) * 3 for s in SHAPES]
    sums[3] = None
    offsets, o = [], start_offset
    for p in params:
        offsets.append(o)
        o += p.numel()
    return params, sums, offsets


def ext_noise(numel: int, step: int, offset: int) -> torch.Tensor:
    return ops.philox_normal_(torch.empty(numel), SEED, step, offset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noisy_step_exposes_the_noise(dtype):
    """p = 0, S = 0, lr = 1, B = 1, sigma*C = 1: the update is exactly -z, element e of the stream."""
    params, _, offsets = model_tensors(dtype, start_offset=5)
    params = [torch.zeros_like(p) for p in params]
    ops.noisy_sgd_step_(params, [None] * len(params), [], offsets, 1.0, 1.0, SEED, 9, 1.0, 0.0, 0.0, 0.0, False, True)
    z = -torch.cat([p.flatten() for p in params])
    ref = philox_normal(z.numel(), SEED, 9, offset=5)
    assert ulps(z, ref).max() <= NOISE_ULPS
    # and exactly the extension's own stream (which the other kernels share)
    assert torch.equal(z.float(), ext_noise(z.numel(), 9, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "momentum, nesterov, dampening, weight_decay",
    [(0.0, False, 0.0, 0.0), (0.9, False, 0.0, 0.0), (0.9, True, 0.0, 5e-3), (0.5, False, 0.1, 1e-2),
     (0.0, False, 0.0, 1e-2)],
)  # fmt: skip
def test_noisy_sgd_step_matches_torch_optim(dtype, momentum, nesterov, dampening, weight_decay):
    std, batch, lr, steps = 1.7, 24.0, 0.3, 4
    params, sums, offsets = model_tensors(dtype)
    ref_params = [p.clone().requires_grad_(True) for p in params]
    opt = torch.optim.SGD(
        ref_params, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
        foreach=False,
    )  # fmt: skip
    bufs = [poisoned(p.shape, dtype) for p in params] if momentum else []
    for step in range(steps):
        for rp, s, off in zip(ref_params, sums, offsets, strict=True):
            z = ext_noise(rp.numel(), step, off).view(rp.shape).to(dtype)
            g = torch.zeros_like(rp) if s is None else s.clone()
            rp.grad = g.add_(z, alpha=std).div_(batch)  # DPOptimizer's noise-and-scale
        opt.step()
        ops.noisy_sgd_step_(
            params, sums, bufs, offsets, std, batch, SEED, step, lr, momentum, dampening, weight_decay, nesterov,
            step == 0,
        )  # fmt: skip
        sums = [None if s is None else s * 0.5 + 0.1 for s in sums]  # a new clipped sum every step
    tol = {"rtol": 2e-6, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for p, rp in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, rp.detach(), **tol)
    for b, rp in zip(bufs, ref_params, strict=False):  # no buffers without momentum
        torch.testing.assert_close(b, opt.state[rp]["momentum_buffer"], **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("decoupled, weight_decay", [(False, 0.0), (False, 1e-2), (True, 1e-2), (True, 0.0)])
def test_noisy_adam_step_matches_torch_optim(dtype, decoupled, weight_decay):
    std, batch, lr, betas, eps, steps = 0.8, 16.0, 1e-2, (0.9, 0.99), 1e-8, 4
    params, sums, offsets = model_tensors(dtype, start_offset=3, seed=1)
    ref_params = [p.clone().requires_grad_(True) for p in params]
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls(ref_params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for step in range(steps):
        for rp, s, off in zip(ref_params, sums, offsets, strict=True):
            z = ext_noise(rp.numel(), 100 + step, off).view(rp.shape).to(dtype)
            g = torch.zeros_like(rp) if s is None else s.clone()
            rp.grad = g.add_(z, alpha=std).div_(batch)
        opt.step()
        ops.noisy_adam_step_(
            params, sums, m, v, offsets, std, batch, SEED, 100 + step, lr, betas[0], betas[1], eps, weight_decay,
            decoupled, step + 1,
        )  # fmt: skip
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-11, "atol": 1e-12}
    for p, rp, mk, vk in zip(params, ref_params, m, v, strict=True):
        torch.testing.assert_close(p, rp.detach(), **tol)
        torch.testing.assert_close(mk, opt.state[rp]["exp_avg"], **tol)
        torch.testing.assert_close(vk, opt.state[rp]["exp_avg_sq"], **tol)


def test_noisy_step_independent_of_threads():
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            params, sums, offsets = model_tensors(torch.float32)
            bufs = [torch.zeros_like(p) for p in params]
            ops.noisy_sgd_step_(params, sums, bufs, offsets, 1.0, 8.0, SEED, 4, 0.1, 0.9, 0.0, 0.0, False, True)
            results.append(torch.cat([p.flatten() for p in params] + [b.flatten() for b in bufs]))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])


def test_noisy_step_checks_inputs():
    params, sums, offsets = model_tensors(torch.float32)
    args = (1.0, 8.0, SEED, 0, 0.1, 0.0, 0.0, 0.0, False, True)
    with pytest.raises(RuntimeError, match="noise ranges .* overlap"):
        ops.noisy_sgd_step_(params, sums, [], [0] * len(params), *args)
    with pytest.raises(RuntimeError, match="one entry .* per parameter"):
        ops.noisy_sgd_step_(params, sums[:-1], [], offsets, *args)
    with pytest.raises(RuntimeError, match="must have its parameter's dtype"):
        ops.noisy_sgd_step_(params, [None if s is None else s.double() for s in sums], [], offsets, *args)
    with pytest.raises(RuntimeError, match="parameters must be float32 or float64"):
        ops.noisy_sgd_step_([p.bfloat16() for p in params], [None] * len(params), [], offsets, *args)
    with pytest.raises(RuntimeError, match="parameter 0 must be contiguous"):
        ops.noisy_sgd_step_([params[0].t()] + params[1:], [None] * len(params), [], offsets, *args)
    with pytest.raises(RuntimeError, match="Nesterov momentum requires"):
        ops.noisy_sgd_step_(params, sums, [], offsets, 1.0, 8.0, SEED, 0, 0.1, 0.0, 0.0, 0.0, True, True)
    with pytest.raises(RuntimeError, match="momentum_buffers must have one tensor per parameter"):
        ops.noisy_sgd_step_(params, sums, [], offsets, 1.0, 8.0, SEED, 0, 0.1, 0.9, 0.0, 0.0, False, True)
    with pytest.raises(RuntimeError, match="noise_std .* must be finite and >= 0"):
        ops.noisy_sgd_step_(params, sums, [], offsets, -1.0, 8.0, SEED, 0, 0.1, 0.0, 0.0, 0.0, False, True)


def test_linear_sq_norms_is_cuda_only():
    with pytest.raises(RuntimeError, match="CUDA kernel only"):
        ops.linear_sq_norms(torch.randn(2, 3, 4), torch.randn(2, 3, 5))


# ---- CUDA -----------------------------------------------------------------------------------------------------------


@gpu_test
@pytest.mark.parametrize("b, shape", CLIP_SHAPES)
@pytest.mark.parametrize(
    "g_dtype, out_dtype",
    [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.float32)],
)
def test_clip_reduce_cuda(b, shape, g_dtype, out_dtype):
    torch.manual_seed(b)
    g = torch.randn(b, *shape, dtype=torch.float64).to(g_dtype)
    w = torch.rand(b, dtype=torch.float64).to(torch.float64 if g_dtype == torch.float64 else torch.float32)
    out = poisoned(shape, out_dtype, "cuda")
    ops.clip_reduce.out(g.cuda(), w.cuda(), out=out)
    ref, bound = clip_reference(g, w)
    u_acc = 2.0**-53 if g_dtype == torch.float64 else 2.0**-24
    u_out = 2.0**-53 if out_dtype == torch.float64 else 2.0**-24
    err = (out.cpu().double() - ref).abs()
    assert (err <= (b + 1) * u_acc * bound + u_out * ref.abs() + 1e-300).all()


@gpu_test
def test_philox_normal_cuda_is_bit_identical_to_cpu():
    n, offset = 100003, 2**32 + 1
    out = poisoned((n,), torch.float32, "cuda")
    ops.philox_normal_(out, SEED, 5, offset)
    assert torch.equal(out.cpu(), ext_noise(n, 5, offset))


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opt", ["sgd", "sgd_momentum", "adam", "adamw"])
def test_noisy_step_cuda_matches_cpu(dtype, opt):
    cpu_params, sums, offsets = model_tensors(dtype, start_offset=1)
    gpu_params = [p.cuda() for p in cpu_params]
    gpu_sums = [None if s is None else s.cuda() for s in sums]
    cpu_state = [[torch.zeros_like(p) for p in cpu_params] for _ in range(2)]
    gpu_state = [[s.cuda() for s in state] for state in cpu_state]
    for step in range(3):
        for dev_params, dev_sums, state in ((cpu_params, sums, cpu_state), (gpu_params, gpu_sums, gpu_state)):
            if opt.startswith("sgd"):
                mom = 0.9 if opt == "sgd_momentum" else 0.0
                bufs = state[0] if mom else []
                ops.noisy_sgd_step_(dev_params, dev_sums, bufs, offsets, 1.3, 8.0, SEED, step, 0.1, mom, 0.0, 1e-3,
                                    False, step == 0)  # fmt: skip
            else:
                ops.noisy_adam_step_(dev_params, dev_sums, state[0], state[1], offsets, 1.3, 8.0, SEED, step, 1e-2,
                                     0.9, 0.999, 1e-8, 1e-2, opt == "adamw", step + 1)  # fmt: skip
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for c, g in zip(cpu_params, gpu_params, strict=True):
        torch.testing.assert_close(g.cpu(), c, **tol)


@gpu_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("b, t, d, p", [(3, 1, 5, 7), (4, 37, 65, 130), (2, 200, 64, 64), (1, 3, 1, 1)])
@pytest.mark.parametrize("write_grads", [False, True])
def test_linear_sq_norms_cuda(dtype, b, t, d, p, write_grads):
    torch.manual_seed(t)
    a = torch.randn(b, t, d, dtype=torch.float64).to(dtype)
    delta = torch.randn(b, t, p, dtype=torch.float64).to(dtype)
    ref_g = torch.einsum("btp,btd->bpd", delta.double(), a.double())
    ref = ref_g.square().sum((1, 2))
    grads = poisoned((b, p, d), dtype, "cuda") if write_grads else None
    norms = ops.linear_sq_norms(a.cuda(), delta.cuda(), grads)
    rtol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(norms.cpu().double(), ref, rtol=rtol, atol=1e-9)
    if write_grads:
        grtol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
        torch.testing.assert_close(grads.cpu().double(), ref_g, rtol=grtol, atol=grtol * t)
