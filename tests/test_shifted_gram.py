"""fastdp::shifted_gram (csrc/shifted_gram_cpu.cpp): the shifted ghost norm's Gram matrix summed over a stride-1
convolution's kernel offsets, in one launch, against an independent oracle: the Gram matrix of the layer's input
patches, formed explicitly (zero padding, one slice per kernel offset) in float64.

The engine's exactness with it (every conv dimension, WS convs' per-row norms, augmult, the cpp backend against the
float64 loop) is tests/test_engine.py's; here the op itself, that the backend really uses it, and that what the flat
loop's masks skip stays out of the sums (a dropped example's Gram may hold NaN)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import reference, row_loss, run_engine, seed_of, split

from fastdp import _ext

if not _ext.cpu_available():
    pytest.skip(f"fastdp._C is not built: {_ext.IMPORT_ERROR}", allow_module_level=True)

from fastdp.launches import LaunchCounter  # noqa: E402

shifted_gram = torch.ops.fastdp.shifted_gram

#: (spatial input shape, kernel, dilation, padding, views): 'same' padding (the flat masked loop, offsets with and
#: without a shift along the last axis) and not (a loop per line), 1 to 3 spatial axes, augmult views
GEOMETRIES = [
    ((6, 7), (3, 3), (1, 1), (1, 1), 1),
    ((5, 5), (3, 3), (1, 1), (1, 1), 3),
    ((9, 6), (5, 3), (2, 1), (4, 1), 2),  # 'same' with dilation
    ((9, 7), (3, 5), (2, 1), (1, 3), 1),  # not 'same': the output is (7, 9)
    ((8, 8), (3, 3), (1, 1), (0, 0), 1),  # 'valid'
    ((13,), (5,), (1,), (2,), 2),
    ((12,), (3,), (3,), (0,), 1),
    ((4, 3, 5), (3, 3, 3), (1, 1, 1), (1, 1, 1), 1),
    ((4, 5, 3), (3, 1, 2), (1, 1, 1), (1, 0, 0), 2),
]


def out_shape_of(in_shape, kernel, dilation, padding):
    return [i + 2 * p - d * (k - 1) for i, k, d, p in zip(in_shape, kernel, dilation, padding, strict=True)]


def patches(x: torch.Tensor, kernel, dilation, padding) -> torch.Tensor:
    """The stride-1 convolution's input patches of x (n, C, *S): (n, C * k^n, O positions), one slice of the
    zero-padded input per kernel offset."""
    nd = len(kernel)
    pad = [p for p in reversed(padding) for _ in (0, 1)]
    xp = F.pad(x, pad)
    out = out_shape_of(x.shape[2:], kernel, dilation, padding)
    slices = []
    for o in itertools.product(*(range(k) for k in kernel)):
        index = [slice(None), slice(None)] + [slice(o[j] * dilation[j], o[j] * dilation[j] + out[j]) for j in range(nd)]
        slices.append(xp[tuple(index)].flatten(2))
    return torch.cat(slices, 1)


def oracle(x: torch.Tensor, views: int, kernel, dilation, padding) -> torch.Tensor:
    """S from x (n * views, C, *S) in float64: the Gram matrix of the patches of an example's views end to end."""
    n = x.shape[0] // views
    a = patches(x.double(), kernel, dilation, padding)  # (n K, C k^n, O)
    a = a.view(n, views, a.shape[1], a.shape[2]).permute(0, 2, 1, 3).flatten(2)  # (n, C k^n, K O)
    return a.transpose(1, 2) @ a


def input_gram(x: torch.Tensor, views: int, dtype: torch.dtype) -> torch.Tensor:
    """X (n, K I, K I): the Gram matrix of the unpadded input over channels, an example's views end to end."""
    n, c = x.shape[0] // views, x.shape[1]
    xs = x.to(dtype).reshape(n, views, c, -1).permute(0, 2, 1, 3).flatten(2)  # (n, C, K I)
    return (xs.transpose(1, 2) @ xs).contiguous()


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[str(g) for g in GEOMETRIES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_gram_of_patches(geometry, dtype):
    in_shape, kernel, dilation, padding, views = geometry
    torch.manual_seed(seed_of("shifted_gram", geometry, dtype))
    x = torch.randn(3 * views, 4, *in_shape, dtype=torch.float64)
    out_shape = out_shape_of(in_shape, kernel, dilation, padding)
    got = shifted_gram(input_gram(x, views, dtype), list(in_shape), out_shape, list(kernel), list(dilation),
                       list(padding), views)  # fmt: skip
    want = oracle(x, views, kernel, dilation, padding)
    assert got.dtype == dtype and got.shape == want.shape
    # each entry is a sum of at most k^n entries of X, each a float-rounded dot product over C channels
    eps = torch.finfo(dtype).eps
    scale = want.abs().max().item()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=8 * math.prod(kernel) * 4 * eps * scale)


@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[3], GEOMETRIES[7]], ids=["same", "lines", "3d"])
def test_same_bits_whatever_the_threads(geometry):
    in_shape, kernel, dilation, padding, views = geometry
    torch.manual_seed(seed_of("threads", geometry))
    gram = input_gram(torch.randn(40 * views, 3, *in_shape), views, torch.float32)
    args = (list(in_shape), out_shape_of(in_shape, kernel, dilation, padding), list(kernel), list(dilation),
            list(padding), views)  # fmt: skip
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = shifted_gram(gram, *args)
        torch.set_num_threads(max(2, threads))
        many = shifted_gram(gram, *args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[str(g) for g in GEOMETRIES])
def test_non_finite_entries_reach_only_their_sums(geometry):
    """A NaN in X reaches exactly the entries of S whose sum holds it, and no other example's: the flat loop's
    positions that wrap around a line are selected away, not multiplied by 0 (0 * nan = nan)."""
    in_shape, kernel, dilation, padding, views = geometry
    torch.manual_seed(seed_of("nan", geometry))
    positions, out_shape = math.prod(in_shape), out_shape_of(in_shape, kernel, dilation, padding)
    args = (list(in_shape), out_shape, list(kernel), list(dilation), list(padding), views)
    gram = input_gram(torch.randn(3 * views, 2, *in_shape), views, torch.float32)
    # one input position of example 1 (view 0) is NaN in every dot product it enters: its row and column of X
    u = int(torch.randint(0, positions, ()).item())
    gram[1, u, :] = float("nan")
    gram[1, :, u] = float("nan")
    got = shifted_gram(gram, *args)
    # where it lands: S of an indicator Gram matrix (1 in that row and column) counts the NaN terms of each entry
    hit = torch.zeros(1, views * positions, views * positions, dtype=torch.float64)
    hit[0, u, :] = 1.0
    hit[0, :, u] = 1.0
    reached = shifted_gram(hit, *args)[0] > 0
    assert torch.equal(got[1].isnan(), reached)
    assert reached.any() and not reached.all()
    clean = shifted_gram(gram[[0, 2]].contiguous(), *args)
    assert torch.equal(got[[0, 2]], clean)


@pytest.mark.skipif(not (torch.cuda.is_available() and _ext.cuda_compiled()), reason="needs a GPU and fastdp._C's CUDA")
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[str(g) for g in GEOMETRIES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_gives_the_cpu_bits(geometry, dtype):
    """The CUDA kernel adds the offsets in the CPU kernel's order (additions only, nothing to contract): the same
    bits (a masked position adds +0 on the CPU and is skipped on the GPU: equal values)."""
    in_shape, kernel, dilation, padding, views = geometry
    torch.manual_seed(seed_of("cuda", geometry, dtype))
    gram = input_gram(torch.randn(37 * views, 3, *in_shape), views, dtype)
    args = (list(in_shape), out_shape_of(in_shape, kernel, dilation, padding), list(kernel), list(dilation),
            list(padding), views)  # fmt: skip
    assert torch.equal(shifted_gram(gram.cuda(), *args).cpu(), shifted_gram(gram, *args))


@pytest.mark.parametrize("per_row", [False, True], ids=["conv", "ws-conv"])
def test_cpp_backend_sums_the_shifts_with_it(per_row):
    """A forced shifted_ghost plan on the cpp backend sums the shifts with the kernel, no box additions, the batch in
    one chunk at this size; the clipped sums and norms are the torch backend's (whose box additions the float64
    loop checks in tests/test_engine.py)."""
    from fastdp.nn import WSConv2d

    torch.manual_seed(seed_of("cpp backend", per_row))
    conv = WSConv2d(3, 4, 3, padding=1) if per_row else torch.nn.Conv2d(3, 4, 3, padding=1)
    model = torch.nn.Sequential(conv, torch.nn.Flatten(), torch.nn.Linear(4 * 64, 2))
    x, y = torch.randn(6, 3, 8, 8), torch.randn(6, 2)
    got = {}
    for backend in ("torch", "cpp"):
        with LaunchCounter() as counter:
            got[backend] = run_engine(copy.deepcopy(model), split(x, y, [2, 4]), max_grad_norm=0.05,
                                      strategy="shifted_ghost", backend=backend)  # fmt: skip
        assert got[backend][2]["0"] == "shifted_ghost"
        # one chunk per micro-batch (the plan's own trial runs are outside the counted backward only in part: at
        # least the two micro-batches' calls, and the box additions' add_ only without the kernel)
        assert (counter.launches["shifted_gram"] >= 2) == (backend == "cpp")
    sums, norms, _ = got["cpp"]
    torch.testing.assert_close(norms, got["torch"][1], rtol=1e-5, atol=0)
    for name in sums:
        torch.testing.assert_close(sums[name], got["torch"][0][name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("net", ["conv2d", "ws"])
def test_a_nonfinite_example_drops_only_itself(net, value):
    """Through the kernel, an example with a non-finite input is dropped alone: the others' clipped sums are the
    float64 loop's over them (Conv2dNet: 'same' with an even kernel and groups; WSNet: per-row norms)."""
    from models import Conv2dNet, WSNet

    from fastdp.engine import GradSampleEngine

    torch.manual_seed(seed_of("nonfinite", net))
    model = {"conv2d": Conv2dNet, "ws": WSNet}[net]()
    x, t = type(model).inputs(6)
    bad = x.clone()
    bad[2, 1, 3, 3] = value
    keep = [0, 1, 3, 4, 5]
    ref, _ = reference(model, x[keep], t[keep], max_grad_norm=0.5)
    eng = GradSampleEngine(model, max_grad_norm=0.5, loss_reduction="sum", backend="cpp", strategy="shifted_ghost")
    with LaunchCounter() as counter:
        row_loss(model(bad), t).sum().backward()
    summed, norms = eng.pop()
    eng.detach()
    assert counter.launches["shifted_gram"] >= 1
    assert not torch.isfinite(norms[2]) and torch.isfinite(norms[keep]).all()
    for n, p in model.named_parameters():
        torch.testing.assert_close(summed[p].double(), ref[n], rtol=2e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
