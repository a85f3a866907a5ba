"""The counter-based noise stream: Random123's known answers, chunking independence, the normal distribution."""

from __future__ import annotations

import math

import pytest
import torch

from fastdp.philox import philox4x32, philox_normal, uniforms, uniforms64

# Random123 kat_vectors, philox4x32_10: counter, key -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_known_answers(counter, key, expected):
    out = philox4x32(tuple(torch.tensor([c], dtype=torch.int64) for c in counter), key)
    assert tuple(int(x) for x in out) == expected


def test_elements_do_not_depend_on_chunking_and_steps_differ():
    whole = philox_normal(1003, seed=2**40 + 5, step=3)
    parts = torch.cat([philox_normal(n, seed=2**40 + 5, step=3, offset=o) for o, n in ((0, 7), (7, 500), (507, 496))])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, philox_normal(1003, seed=2**40 + 5, step=4))
    assert not torch.equal(whole, philox_normal(1003, seed=5, step=3))  # the seed's high word is part of the key


def test_standard_normal_moments():
    n = 1 << 20
    z = philox_normal(n, seed=1, step=0).double()
    # 5 standard errors: mean 1/sqrt(n), std 1/sqrt(2n), fourth moment sqrt(96/n) (kurtosis 3 of a normal)
    assert abs(z.mean().item()) < 5 / n**0.5
    assert abs(z.std().item() - 1) < 5 / (2 * n) ** 0.5
    assert abs(z.pow(4).mean().item() - 3) < 5 * (96 / n) ** 0.5
    assert torch.isfinite(z).all()


def test_radius_uniforms_take_64_bits_and_reach_the_gaussian_tail():
    """The radius uniforms come from two words, so the smallest is 2^-65 and |z| reaches sqrt(130 ln 2) = 9.49: from
    one 32-bit word it would stop at 2^-33 and 6.77, a Gaussian truncated at 6.77 sigma (fastdp.philox docstring)."""
    word = lambda *v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    v = uniforms64(word(0, 0, 1, 2**24, 2**32 - 1), word(0, 2**32 - 1, 2**31, 5, 2**32 - 1)).double()
    exact = [2.0**-65, (2.0**32 - 0.5) * 2.0**-64, 1.5 * 2.0**-32 + 2.0**-65, 2.0**-8, 1.0]
    torch.testing.assert_close(v, torch.tensor(exact, dtype=torch.float64), rtol=2.0**-24, atol=0)
    assert (v > 0).all() and (v <= 1).all()  # 1 - 2^-65 rounds to 1 in float32: r = 0, as with one word
    assert math.sqrt(-2 * math.log(v[0])) > 9.49 > 6.78 > math.sqrt(-2 * math.log(uniforms(word(0))[0]))
    # the high word alone decides the uniform to float32 precision where it is at least 2^24
    high = word(2**24, 2**30 + 7, 2**32 - 2)
    for low in (0, 2**32 - 1):
        torch.testing.assert_close(uniforms64(high, word(low, low, low)), uniforms(high), rtol=2.0**-23, atol=0)


def test_tail_groups_tell_one_word_radii_from_two():
    """Where a group's radius word is small, the normals from a one-word radius differ from the stream's by tens to
    hundreds of ulps: the backends' tests at these groups (tests/conftest.py::tail_groups) would catch a backend that
    dropped the extension words (elsewhere the low word is below float32's resolution and changes nothing)."""
    from conftest import tail_groups

    seed, step = 2**40 + 12345, 17
    groups = tail_groups(seed, step)
    assert len(groups) >= 4
    g = torch.tensor(groups, dtype=torch.int64)
    x = philox4x32((g & 0xFFFFFFFF, g >> 32, torch.full_like(g, step), torch.zeros_like(g)), (12345, 2**8))
    one_word = torch.stack([torch.sqrt(-2.0 * torch.log(uniforms(x[j]))) for j in (0, 2)], 1)  # r01, r23
    z = torch.stack([philox_normal(4, seed, step, offset=4 * int(k)) for k in groups]).view(-1, 2, 2)
    two_words = z.norm(dim=2)  # |(r cos t, r sin t)| = r
    small = torch.stack([x[0] < 1 << 12, x[2] < 1 << 12], 1)
    # 20 float32 ulps of r ~ 5.3 are 1.8e-6 relative; how far one group moves depends on its low word
    assert ((two_words - one_word).abs()[small] / one_word[small] > 1.8e-6).sum() >= 3
