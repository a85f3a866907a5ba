"""The fake kernels of fastdp._C's ops (fastdp/_fake_ops.py): what torch.compile traces the ops with.

Each op goes through ``torch.library.opcheck`` on fresh random CPU inputs (schema, fake kernel against the real one,
autograd registration, AOTAutograd); each input check that needs no data raises the same RuntimeError in the fake
kernel (under FakeTensorMode) as in the real one; and ``torch.compile(fullgraph=True)`` of functions calling the ops
gives the eager result bit for bit. ``linear_sq_norms`` has a CUDA kernel only: its fake kernel is checked on fake
CUDA tensors (FakeTensorMode makes them without a GPU), and against the real kernel under ``@pytest.mark.gpu``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map_only

from fastdp import _ext

if not _ext.cpu_available():  # the parameter lists below name the ops, which exist only once fastdp._C has loaded
    pytest.skip(f"fastdp._C is not built: {_ext.IMPORT_ERROR}", allow_module_level=True)

from fastdp import _fake_ops  # noqa: E402 - needs the ops

ops = torch.ops.fastdp
HAS_GPU = torch.cuda.is_available() and _ext.cuda_compiled()

SEED = 2**40 + 12345


def qualname(op: torch._ops.OpOverload) -> str:
    name = op._schema.name
    return name if op._overloadname == "default" else f"{name}.{op._overloadname}"


def opcheck_case(op_name: str, make_args):
    return pytest.param(op_name, make_args, id=op_name.removeprefix("fastdp::"))


def fake_call(op: torch._ops.OpOverload, *args, **kwargs):
    """The op under FakeTensorMode on fake copies of the arguments (same shapes, dtypes, devices, strides).
    Returns the result and the fake arguments."""
    with FakeTensorMode() as mode:
        fargs, fkwargs = tree_map_only(torch.Tensor, mode.from_tensor, (args, kwargs))
        return op(*fargs, **fkwargs), fargs, fkwargs


def assert_meta_equal(fake: torch.Tensor, real: torch.Tensor) -> None:
    assert (fake.shape, fake.dtype, fake.device, fake.stride()) == (real.shape, real.dtype, real.device, real.stride())


# ---- inputs (fresh random tensors; sizes not multiples of the kernels' vector widths) -------------------------------


def clip_args(dtype=torch.float32, shape=(3, 5)):
    return (torch.randn(7, *shape, dtype=dtype), torch.rand(7)), {}


def clip_out_args(dtype=torch.float32, out_dtype=None):
    (g, w), _ = clip_args(dtype)
    return (g, w), {"out": torch.full(g.shape[1:], float("nan"), dtype=out_dtype or dtype)}


def step_tensors(dtype=torch.float32):
    params = [torch.randn(4, 3, dtype=dtype), torch.randn(5, dtype=dtype), torch.randn(2, 2, dtype=dtype)]
    sums = [torch.randn_like(params[0]), None, torch.randn_like(params[2])]  # parameter 1 has no gradient
    offsets = [0, 12, 17]
    return params, sums, offsets


def sgd_args(dtype=torch.float32, momentum=0.9, nesterov=False, first_step=False):
    params, sums, offsets = step_tensors(dtype)
    bufs = [torch.randn_like(p) for p in params] if momentum else []
    return (params, sums, bufs, offsets, 1.3, 8.0, SEED, 3, 0.1, momentum, 0.0, 1e-3, nesterov, first_step), {}


def adam_args(dtype=torch.float32, decoupled=True):
    params, sums, offsets = step_tensors(dtype)
    exp_avgs = [torch.randn_like(p) for p in params]
    exp_avg_sqs = [torch.rand_like(p) for p in params]
    args = (params, sums, exp_avgs, exp_avg_sqs, offsets, 1.3, 8.0, SEED, 3, 1e-3, 0.9, 0.999, 1e-8, 1e-2, decoupled, 4)
    return args, {}


def philox_normal_args():
    return (torch.full((37,), float("nan")), SEED, 5, 11), {}


def philox_words_args():
    return (9, SEED, 5, 3), {}


def shifted_gram_args(dtype=torch.float32, in_shape=(5, 6), kernel=(3, 3), dilation=(1, 1), padding=(1, 1), views=1):
    out_shape = [i + 2 * p - d * (k - 1) for i, k, d, p in zip(in_shape, kernel, dilation, padding, strict=True)]
    side = views * math.prod(in_shape)
    args = (torch.randn(3, side, side, dtype=dtype), list(in_shape), out_shape, list(kernel), list(dilation),
            list(padding), views)  # fmt: skip
    return args, {}


# ---- opcheck ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op_name, make_args",
    [
        opcheck_case("fastdp::clip_reduce", clip_args),
        opcheck_case("fastdp::clip_reduce", lambda: clip_args(torch.float64, (2, 3, 4))),
        opcheck_case("fastdp::clip_reduce", lambda: clip_args(torch.bfloat16, (9,))),
        opcheck_case("fastdp::clip_reduce.out", clip_out_args),
        opcheck_case("fastdp::clip_reduce.out", lambda: clip_out_args(torch.bfloat16, torch.float32)),
        opcheck_case("fastdp::noisy_sgd_step_", sgd_args),
        opcheck_case("fastdp::noisy_sgd_step_", lambda: sgd_args(torch.float64, momentum=0.0)),
        opcheck_case("fastdp::noisy_sgd_step_", lambda: sgd_args(momentum=0.5, nesterov=True, first_step=True)),
        opcheck_case("fastdp::noisy_adam_step_", adam_args),
        opcheck_case("fastdp::noisy_adam_step_", lambda: adam_args(torch.float64, decoupled=False)),
        opcheck_case("fastdp::philox_normal_", philox_normal_args),
        opcheck_case("fastdp::philox_words", philox_words_args),
        opcheck_case("fastdp::shifted_gram", shifted_gram_args),
        opcheck_case("fastdp::shifted_gram", lambda: shifted_gram_args(torch.float64, (11,), (3,), (2,), (0,), 2)),
        opcheck_case(
            "fastdp::shifted_gram",
            lambda: shifted_gram_args(in_shape=(3, 4, 2), kernel=(3, 1, 2), dilation=(1, 1, 1), padding=(1, 0, 0)),
        ),
    ],
)
def test_opcheck(op_name, make_args):
    name, _, overload = op_name.removeprefix("fastdp::").partition(".")
    args, kwargs = make_args()
    torch.library.opcheck(getattr(getattr(ops, name), overload or "default"), args, kwargs)


def test_every_op_has_a_fake_kernel():
    """Every op of the library with tensors in its schema has one, registered."""
    with_tensors = set()
    for packet_name in dir(ops):
        packet = getattr(ops, packet_name)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload in packet.overloads():
            op = getattr(packet, overload)
            if any("Tensor" in str(a.type) for a in [*op._schema.arguments, *op._schema.returns]):
                with_tensors.add(qualname(op))
    assert with_tensors == set(_fake_ops.FAKES)
    for name in with_tensors:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta"), name


# ---- input checks: the fake kernel raises what the real one raises ---------------------------------------------------


def _bad_step(make_args, index, value):
    def make():
        args, kwargs = make_args()
        args = list(args)
        args[index] = value(args[index]) if callable(value) else value
        return tuple(args), kwargs

    return make


def _set_item(k, value):
    def change(items):
        items = list(items)
        items[k] = value(items[k])
        return items

    return change


def _bad_shift(index, value):
    """shifted_gram's arguments with argument ``index`` (or each of a tuple of indices) replaced by ``value``."""
    args, kwargs = shifted_gram_args()
    args = list(args)
    for i in index if isinstance(index, tuple) else (index,):
        args[i] = value(args[i]) if callable(value) else value
    return tuple(args), kwargs


def _nesterov_damped():
    def make():
        args, kwargs = sgd_args(momentum=0.9, nesterov=True)
        args = list(args)
        args[10] = 0.1  # dampening
        return tuple(args), kwargs

    return make


BAD_CALLS = [
    # clip_reduce
    (ops.clip_reduce.default, lambda: ((torch.randn(5, 4).t(), torch.rand(4)), {}), "grads must be contiguous"),
    (ops.clip_reduce.default, lambda: ((torch.randn(5, 4), torch.rand(6)), {}), r"weights must be \(B,\) = \(5,\)"),
    (ops.clip_reduce.default, lambda: ((torch.randn(5, 4), torch.rand(5, 1)), {}), r"weights must be \(B,\)"),
    (ops.clip_reduce.default, lambda: ((torch.randn(5, 4).half(), torch.rand(5)), {}), "float32, float64 or bfloat16"),
    (ops.clip_reduce.default, lambda: ((torch.randn(5, 4), torch.ones(5, dtype=torch.long)), {}), "floating point"),
    (ops.clip_reduce.default, lambda: ((torch.tensor(1.0), torch.rand(1)), {}), "per-example gradients"),
    # clip_reduce.out
    (ops.clip_reduce.out, lambda: ((torch.randn(5, 4), torch.rand(5)), {"out": torch.empty(5)}), "per-example shape"),
    (
        ops.clip_reduce.out,
        lambda: ((torch.randn(5, 4), torch.rand(5)), {"out": torch.empty(4, dtype=torch.float64)}),
        "out must have grads' dtype",
    ),
    (
        ops.clip_reduce.out,
        lambda: ((torch.randn(5, 4, 2), torch.rand(5)), {"out": torch.empty(2, 4).t()}),
        "out must be contiguous",
    ),
    # noisy_sgd_step_
    (ops.noisy_sgd_step_.default, _bad_step(sgd_args, 3, [0, 11, 17]), "noise ranges .* overlap"),
    (ops.noisy_sgd_step_.default, _bad_step(sgd_args, 3, [0, 12]), "offsets must have one entry per parameter"),
    (ops.noisy_sgd_step_.default, _bad_step(sgd_args, 3, [0, -1, 17]), "offsets must be >= 0"),
    (ops.noisy_sgd_step_.default, _bad_step(sgd_args, 1, lambda s: s[:2]), "sums must have one entry"),
    (
        ops.noisy_sgd_step_.default,
        _bad_step(sgd_args, 1, _set_item(0, lambda s: s.t())),
        r"sum 0 must have its parameter's shape \[4, 3\], got \[3, 4\]",
    ),
    (
        ops.noisy_sgd_step_.default,
        _bad_step(sgd_args, 2, _set_item(2, lambda b: b.double())),
        "momentum_buffers 2 must have its parameter's dtype",
    ),
    (ops.noisy_sgd_step_.default, _bad_step(sgd_args, 2, lambda b: b[:1]), "momentum_buffers must have one tensor"),
    (
        ops.noisy_sgd_step_.default,
        _bad_step(sgd_args, 0, _set_item(1, lambda p: p.double())),
        "all parameters of one call must share a dtype",
    ),
    (
        ops.noisy_sgd_step_.default,
        _bad_step(sgd_args, 0, _set_item(0, lambda p: torch.randn(3, 4).t())),
        "parameter 0 must be contiguous",
    ),
    (ops.noisy_sgd_step_.default, _bad_step(sgd_args, 0, lambda ps: [p.half() for p in ps]), "float32 or float64"),
    (ops.noisy_sgd_step_.default, _bad_step(sgd_args, 4, -1.0), "noise_std"),
    (ops.noisy_sgd_step_.default, _bad_step(sgd_args, 5, 0.0), "expected_batch_size must be finite and > 0"),
    (ops.noisy_sgd_step_.default, _bad_step(sgd_args, 7, -2), "step must be >= 0"),
    (ops.noisy_sgd_step_.default, _bad_step(sgd_args, 8, float("nan")), "lr must be finite"),
    (ops.noisy_sgd_step_.default, _bad_step(sgd_args, 9, -0.5), "momentum must be >= 0"),
    (ops.noisy_sgd_step_.default, _nesterov_damped(), "Nesterov"),
    # noisy_adam_step_
    (ops.noisy_adam_step_.default, _bad_step(adam_args, 11, 1.0), r"betas must be in \[0, 1\)"),
    (ops.noisy_adam_step_.default, _bad_step(adam_args, 15, 0), "adam_step is the 1-based step count"),
    (ops.noisy_adam_step_.default, _bad_step(adam_args, 12, float("inf")), "eps must be finite"),
    (
        ops.noisy_adam_step_.default,
        _bad_step(adam_args, 3, _set_item(1, lambda v: v[:4])),
        r"exp_avg_sqs 1 must have its parameter's shape \[5\], got \[4\]",
    ),
    # the noise stream
    (ops.philox_normal_.default, lambda: ((torch.empty(5, dtype=torch.float64), 1, 2, 3), {}), "out must be float32"),
    (ops.philox_normal_.default, lambda: ((torch.empty(4, 3).t(), 1, 2, 3), {}), "out must be contiguous"),
    (ops.philox_normal_.default, lambda: ((torch.empty(5), 1, -2, 3), {}), "step and offset must be >= 0"),
    (ops.philox_words.default, lambda: ((-1, 1, 2, 3), {}), "ngroups, step and group_offset must be >= 0"),
    # shifted_gram
    (ops.shifted_gram.default, lambda: _bad_shift(0, lambda g: g.half()), "gram must be float32 or float64"),
    (ops.shifted_gram.default, lambda: _bad_shift(0, lambda g: g[:, :-1]), r"gram must be \(n, views \* I"),
    (ops.shifted_gram.default, lambda: _bad_shift(0, lambda g: g.transpose(1, 2)), "gram must be contiguous"),
    (ops.shifted_gram.default, lambda: _bad_shift(2, [5, 5]), "not the stride-1 convolution's output size"),
    (ops.shifted_gram.default, lambda: _bad_shift(3, [3]), "one entry per spatial axis"),
    (ops.shifted_gram.default, lambda: _bad_shift(5, [-1, 1]), "padding >= 0"),
    (ops.shifted_gram.default, lambda: _bad_shift(6, 0), r"views must be in \[1, 2\^31\)"),
    # sizes whose products would wrap around in 64 bits: refused before any product is formed
    (ops.shifted_gram.default, lambda: _bad_shift(6, 2**62 + 1), r"views must be in \[1, 2\^31\)"),
    (ops.shifted_gram.default, lambda: _bad_shift(1, [2**62 + 1, 6]), "must be below 2\\^24"),
    (ops.shifted_gram.default, lambda: _bad_shift((1, 2), [2**20, 2**20]), r"views \* prod\(in_shape\), must be"),
    # the CPU kernel of linear_sq_norms only says that there is none
    (ops.linear_sq_norms.default, lambda: ((torch.randn(2, 3, 4), torch.randn(2, 3, 5)), {}), "CUDA kernel only"),
]


@pytest.mark.parametrize("op, make_args, match", BAD_CALLS, ids=[f"{c[0]._schema.name[8:]}-{c[2]}" for c in BAD_CALLS])
def test_fake_raises_like_real(op, make_args, match):
    args, kwargs = make_args()
    with pytest.raises(RuntimeError, match=match):
        op(*args, **kwargs)
    with pytest.raises(RuntimeError, match=match):
        fake_call(op, *args, **kwargs)


# ---- linear_sq_norms (CUDA only) -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, acc", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)]
)
@pytest.mark.parametrize("with_grads", [False, True])
def test_linear_sq_norms_fake_cuda(dtype, acc, with_grads):
    """On fake CUDA tensors: (B,) in the accumulation dtype, on a's device; grads (written in place) untouched."""
    with FakeTensorMode():
        a = torch.empty(6, 5, 7, dtype=dtype, device="cuda")
        delta = torch.empty(6, 5, 3, dtype=dtype, device="cuda")
        grads = torch.empty(6, 3, 7, dtype=dtype, device="cuda") if with_grads else None
        out = ops.linear_sq_norms(a, delta, grads)
    assert (out.shape, out.dtype, out.device.type, out.stride()) == ((6,), acc, "cuda", (1,))
    if with_grads:
        assert grads.shape == (6, 3, 7) and grads.dtype == dtype


@pytest.mark.parametrize(
    "shapes, dtypes, match",
    [
        (((6, 5, 7), (6, 5), None), (torch.float32,) * 3, r"a must be \(B, T, d\) and delta \(B, T, p\)"),
        (((6, 5, 7), (6, 4, 3), None), (torch.float32,) * 3, "a and delta must agree in B and T"),
        (((6, 5, 7), (6, 5, 3), None), (torch.float32, torch.float64, None), "a and delta must share a dtype"),
        (((6, 5, 7), (6, 5, 3), None), (torch.float16,) * 3, "float32, float64 or bfloat16"),
        (((6, 5, 7), (6, 5, 3), (6, 7, 3)), (torch.float32,) * 3, r"grads must be \(B, p, d\) = \(6, 3, 7\)"),
        (((6, 5, 7), (6, 5, 3), (6, 3, 7)), (torch.float32, torch.float32, torch.float64), "grads must have a's dtype"),
    ],
)
def test_linear_sq_norms_fake_checks(shapes, dtypes, match):
    with FakeTensorMode():
        a, delta, grads = (
            None if s is None else torch.empty(s, dtype=d, device="cuda") for s, d in zip(shapes, dtypes, strict=True)
        )
        with pytest.raises(RuntimeError, match=match):
            ops.linear_sq_norms(a, delta, grads)


def test_linear_sq_norms_fake_contiguity():
    with FakeTensorMode():
        a = torch.empty(6, 7, 5, device="cuda").transpose(1, 2)
        with pytest.raises(RuntimeError, match="a must be contiguous"):
            ops.linear_sq_norms(a, torch.empty(6, 5, 3, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and fastdp._C with CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_grads", [False, True])
def test_linear_sq_norms_opcheck_gpu(dtype, with_grads):
    a = torch.randn(6, 5, 7, dtype=dtype, device="cuda")
    delta = torch.randn(6, 5, 3, dtype=dtype, device="cuda")
    grads = torch.full((6, 3, 7), float("nan"), dtype=dtype, device="cuda") if with_grads else None
    torch.library.opcheck(ops.linear_sq_norms.default, (a, delta, grads))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and fastdp._C with CUDA kernels")
def test_clip_reduce_and_steps_opcheck_gpu():
    (g, w), _ = clip_args()
    torch.library.opcheck(ops.clip_reduce.default, (g.cuda(), w.cuda()))
    args, _ = sgd_args()
    torch.library.opcheck(ops.noisy_sgd_step_.default, tree_map_only(torch.Tensor, lambda t: t.cuda(), args))
    args, _ = adam_args()
    torch.library.opcheck(ops.noisy_adam_step_.default, tree_map_only(torch.Tensor, lambda t: t.cuda(), args))


# ---- end to end: torch.compile(fullgraph=True) gives the eager result -----------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_clip_reduce(fresh_dynamo, dynamic):
    def clip_and_scale(grads, norms, c):
        weights = torch.clamp(c / (norms + 1e-6), max=1.0)
        return ops.clip_reduce(grads * 2, weights).sin()

    compiled = torch.compile(clip_and_scale, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for b, shape in [(7, (3, 5)), (9, (4, 6))]:  # a second shape: recompiled, or reused symbolically
        grads = torch.randn(b, *shape)
        norms = grads.flatten(1).norm(dim=1)
        assert torch.equal(compiled(grads, norms, 0.5), clip_and_scale(grads, norms, 0.5))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_compile_noisy_step(fresh_dynamo, kind):
    make = sgd_args if kind == "sgd" else adam_args
    op = ops.noisy_sgd_step_ if kind == "sgd" else ops.noisy_adam_step_

    def step(params, sums, *rest):
        op([p for p in params], [None if s is None else s * 1.0 for s in sums], *rest)
        return sum(p.sum() for p in params)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args, _ = make()
    before = tree_map_only(torch.Tensor, torch.clone, args)
    eager_args = tree_map_only(torch.Tensor, torch.clone, args)
    assert torch.equal(compiled(*args), step(*eager_args))
    # the parameters and the optimizer state are updated in place, as eagerly; the sums are read only
    n_lists = 3 if kind == "sgd" else 4
    for k in range(n_lists):
        for got, want, old in zip(args[k], eager_args[k], before[k], strict=True):
            if got is None:
                continue
            assert torch.equal(got, want)
            assert torch.equal(got, old) == (k == 1)


def test_compile_noise_stream_and_out_variant(fresh_dynamo):
    """The ops returning their mutated argument (philox_normal_, clip_reduce.out) and philox_words (no tensor
    input) trace under fullgraph, and give the eager result."""

    def noise_and_sum(buf, grads, weights, out):
        z = ops.philox_normal_(buf, SEED, 3, 8)
        s = ops.clip_reduce.out(grads, weights, out=out)
        return z * 2, s + 1, ops.philox_words(5, SEED, 3, 2)

    compiled = torch.compile(noise_and_sum, fullgraph=True, backend="aot_eager")
    (grads, weights), _ = clip_args()
    args = [torch.empty(37), grads, weights, torch.empty(grads.shape[1:])]
    eager_args = [t.clone() for t in args]
    for got, want in zip(compiled(*args), noise_and_sum(*eager_args), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(args[0], eager_args[0]) and torch.equal(args[3], eager_args[3])  # written in place
