"""augment / normalize / to_float against per-view reference loops built on F.pad(mode="reflect").

Statistical checks use fixed seeds and 5-sigma bounds derived from the binomial distribution of the draws (stated
per test); a correct implementation fails one with probability below 1e-5 for a fresh seed.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastdp.data import AugmentParams, augment, normalize, to_float

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def images(n: int, c: int, h: int, w: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)
    return (x if dtype == torch.uint8 else x.to(dtype) / 255).to(device)


def reference_views(x: torch.Tensor, augmult: int, params: AugmentParams, pad: int) -> torch.Tensor:
    """One view at a time: reflect-pad the example, crop at (top, left), flip if drawn."""
    h, w = x.shape[-2:]
    xf = to_float(x.cpu()).double()
    views = []
    for v in range(x.shape[0] * augmult):
        img = xf[v // augmult]
        padded = F.pad(img[None], (pad, pad, pad, pad), mode="reflect")[0] if pad else img
        top, left = int(params.top[v]), int(params.left[v])
        crop = padded[:, top : top + h, left : left + w]
        views.append(crop.flip(-1) if bool(params.flip[v]) else crop)
    return torch.stack(views) if views else xf.new_empty((0, *x.shape[1:]))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
@pytest.mark.parametrize("pad", [0, 1, 4])
@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("augmult", [1, 3])
def test_views_match_reference_loop(dtype: torch.dtype, pad: int, flip: bool, augmult: int) -> None:
    x = images(4, 3, 6, 9, dtype, seed=pad * 10 + augmult)  # H != W, so rows and columns cannot be confused
    g = torch.Generator().manual_seed(1)
    out, params = augment(x, augmult, crop_padding=pad, flip=flip, generator=g, return_params=True)
    assert out.shape == (4 * augmult, 3, 6, 9)
    assert out.dtype == (torch.float32 if dtype == torch.uint8 else dtype)
    assert all(p.shape == (4 * augmult,) for p in params)
    assert ((params.top >= 0) & (params.top <= 2 * pad) & (params.left >= 0) & (params.left <= 2 * pad)).all()
    if not flip:
        assert not params.flip.any()
    # Pixels are copied, never interpolated: the match is exact (uint8 / 255 is the same op on both sides).
    torch.testing.assert_close(out.double(), reference_views(x, augmult, params, pad), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_no_crop_no_flip_repeats_each_example(dtype: torch.dtype) -> None:
    x = images(3, 2, 5, 4, dtype)
    out = augment(x, 4, crop_padding=0, flip=False)
    assert out.shape == (12, 2, 5, 4)
    for i in range(3):
        for k in range(4):
            torch.testing.assert_close(out[i * 4 + k], to_float(x[i]), rtol=0, atol=0)


def test_views_stay_with_their_example() -> None:
    # Example i is the constant image i: whatever the crop and flip, rows i*K..i*K+K-1 must hold only i.
    n, k = 5, 6
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()
    out = augment(x, k, crop_padding=3, generator=torch.Generator().manual_seed(0))
    owner = torch.arange(n).repeat_interleave(k).float() / 255
    assert torch.equal(out, owner.view(-1, 1, 1, 1).expand_as(out))


def test_offsets_are_uniform() -> None:
    # 4000 views, pad 2: each of the 5 offsets per axis ~ Binomial(4000, 1/5): mean 800, sd sqrt(4000*0.2*0.8) = 25.3.
    views, pad = 4000, 2
    x = images(views, 1, 3, 3, torch.uint8)
    _, params = augment(
        x, 1, crop_padding=pad, flip=False, generator=torch.Generator().manual_seed(2), return_params=True
    )
    sd = math.sqrt(views * 0.2 * 0.8)
    for offsets in (params.top, params.left):
        counts = torch.bincount(offsets, minlength=2 * pad + 1).double()
        assert counts.numel() == 2 * pad + 1
        assert (counts - views / 5).abs().max() <= 5 * sd, counts
    # Top and left are drawn independently: P(top == left) = 1/5, so the count ~ Binomial(4000, 1/5) too.
    assert abs((params.top == params.left).sum().item() - views / 5) <= 5 * sd


def test_flip_frequency_is_one_half() -> None:
    # 20000 views: the flip count ~ Binomial(20000, 1/2): mean 10000, sd sqrt(20000)/2 = 70.7, bound 5 sd = 354.
    # Flips of neighbouring views (the K views of one example) must be independent: #(flip[v] == flip[v+1]) over
    # 19999 pairs ~ Binomial(19999, 1/2) as well.
    n, k = 5000, 4
    x = images(n, 1, 2, 2, torch.uint8)
    out, params = augment(x, k, crop_padding=0, generator=torch.Generator().manual_seed(3), return_params=True)
    views = n * k
    sd = math.sqrt(views) / 2
    assert abs(params.flip.sum().item() - views / 2) <= 5 * sd
    assert abs((params.flip[1:] == params.flip[:-1]).sum().item() - (views - 1) / 2) <= 5 * sd
    # The flipped views are the mirrored images, the others unchanged.
    src = to_float(x).repeat_interleave(k, dim=0)
    want = torch.where(params.flip.view(-1, 1, 1, 1), src.flip(-1), src)
    assert torch.equal(out, want)


def test_seeded_generator_reproduces() -> None:
    x = images(6, 3, 8, 8, torch.uint8)
    a, pa = augment(x, 2, generator=torch.Generator().manual_seed(7), return_params=True)
    b, pb = augment(x, 2, generator=torch.Generator().manual_seed(7), return_params=True)
    assert torch.equal(a, b) and all(torch.equal(u, v) for u, v in zip(pa, pb, strict=True))
    g = torch.Generator().manual_seed(7)
    first, second = augment(x, 2, generator=g), augment(x, 2, generator=g)  # the generator advances
    assert torch.equal(first, a) and not torch.equal(second, a)
    torch.manual_seed(7)  # without a generator: the global RNG, so torch.manual_seed fixes it
    c = augment(x, 2)
    torch.manual_seed(7)
    assert torch.equal(augment(x, 2), c)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_empty_batch(dtype: torch.dtype) -> None:
    x = images(0, 3, 8, 8, dtype)
    out, params = augment(x, 3, return_params=True)
    assert out.shape == (0, 3, 8, 8) and out.is_floating_point()
    assert params.top.shape == params.left.shape == params.flip.shape == (0,)


def test_invalid_arguments() -> None:
    x = images(2, 3, 4, 4, torch.uint8)
    with pytest.raises(ValueError, match="augmult must be an integer >= 1"):
        augment(x, 0)
    with pytest.raises(ValueError, match=r"crop_padding must be an integer in \[0, min\(H, W\)\) = \[0, 4\)"):
        augment(x, 1, crop_padding=4)
    with pytest.raises(ValueError, match=r"shape \(n, C, H, W\), got \(3, 4, 4\)"):
        augment(x[0], 1)
    with pytest.raises(TypeError, match="torch.int32"):
        augment(x.int(), 1)


def test_to_float_and_normalize() -> None:
    x = images(2, 3, 4, 5, torch.uint8)
    f = to_float(x)
    assert f.dtype == torch.float32 and torch.equal(f, x.float() / 255)
    assert to_float(f) is f
    assert to_float(x, torch.float64).dtype == torch.float64
    with pytest.raises(TypeError, match="uint8"):
        to_float(x.long())
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    want = torch.stack([(f[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)
    torch.testing.assert_close(normalize(x, mean, std), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(normalize(f[0], torch.tensor(mean), torch.tensor(std)), want[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="C=3"):
        normalize(x, (0.5,), (0.5,))


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_cuda_matches_reference(dtype: torch.dtype) -> None:
    x = images(8, 3, 32, 32, dtype, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    out, params = augment(x, 4, generator=g, return_params=True)
    assert out.device.type == "cuda" and params.top.device.type == "cuda"
    params = AugmentParams(*(p.cpu() for p in params))
    torch.testing.assert_close(out.cpu().double(), reference_views(x, 4, params, 4), rtol=0, atol=0)
    with pytest.raises(ValueError, match="generator is on cpu"):
        augment(x, 1, generator=torch.Generator())
