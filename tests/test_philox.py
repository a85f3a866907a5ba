"""The counter-based noise stream: Random123's known answers, chunking independence, the normal distribution."""

from __future__ import annotations

import pytest
import torch

from fastdp.philox import philox4x32, philox_normal

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
