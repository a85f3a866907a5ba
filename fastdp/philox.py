"""Counter-based Gaussian noise (Philox4x32-10 + Box-Muller): the stream every fused backend reproduces.

Noise element ``e`` of a step (``e`` counts over all noised parameters laid end to end, in the optimizer's order)
is a pure function of (seed, step, e), so it does not depend on how a backend chunks the parameters, on the number
of threads or launches, or on the device:

    group g = e // 4, lane = e % 4
    (x0, x1, x2, x3) = Philox4x32-10(counter = (g mod 2^32, g >> 32, step mod 2^32, step >> 32),
                                     key = (seed mod 2^32, (seed >> 32) mod 2^32))
    u_j = (x_j + 0.5) * 2^-32                       in (0, 1): log(u) is finite
    r = sqrt(-2 ln u0), s = sqrt(-2 ln u2)
    z = (r cos(2 pi u1), r sin(2 pi u1), s cos(2 pi u3), s sin(2 pi u3))
    noise[e] = z[lane]

The uint32 words are bit-exact on every backend; the normals agree to the rounding of each backend's float32
log/sqrt/sin/cos (a few ulp). This module is the pure-torch reference (int64 arithmetic on any device), which the
Triton, CUDA and C++ kernels are tested against.

Philox4x32-10 is Salmon et al. 2011 ("Parallel random numbers: as easy as 1, 2, 3"); the known-answer vector
in tests/test_philox.py is Random123's.
"""

from __future__ import annotations

import math

import torch

M0, M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # key schedule (golden ratio, sqrt(3) - 1)
ROUNDS = 10
_MASK = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for a 32-bit constant a and uint32 values b held in int64.

    a * b needs 64 bits, which int64 cannot hold unsigned; b is split in 16-bit halves so every partial product
    stays below 2^49.
    """
    p_lo = a * (b & 0xFFFF)  # < 2^48
    p_hi = a * (b >> 16)  # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    return (p_hi >> 16) + (mid >> 32), mid & _MASK


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of uint32 counters (four int64 tensors of values < 2^32) under a 64-bit key."""
    c0, c1, c2, c3 = (c & _MASK for c in counter)
    k0, k1 = key[0] & _MASK, key[1] & _MASK
    for r in range(ROUNDS):
        hi0, lo0 = _mulhilo(M0, c0)
        hi1, lo1 = _mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r < ROUNDS - 1:
            k0, k1 = (k0 + W0) & _MASK, (k1 + W1) & _MASK
    return c0, c1, c2, c3


def uniforms(x: torch.Tensor) -> torch.Tensor:
    """uint32 words (int64) -> float32 uniforms in (0, 1)."""
    return (x.to(torch.float64) + 0.5).mul_(2.0**-32).to(torch.float32)


def philox_normal(numel: int, seed: int, step: int, offset: int = 0, device=None) -> torch.Tensor:
    """Noise elements ``offset .. offset + numel - 1`` of step ``step`` (float32, see the module docstring)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    e = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    g, lane = e >> 2, e & 3
    step = int(step)
    counter = (g & _MASK, g >> 32, torch.full_like(g, step & _MASK), torch.full_like(g, (step >> 32) & _MASK))
    x0, x1, x2, x3 = philox4x32(counter, (int(seed) & _MASK, (int(seed) >> 32) & _MASK))
    u0, u1, u2, u3 = (uniforms(x) for x in (x0, x1, x2, x3))
    r01, r23 = torch.sqrt(-2.0 * torch.log(u0)), torch.sqrt(-2.0 * torch.log(u2))
    t01, t23 = (2.0 * math.pi) * u1, (2.0 * math.pi) * u3
    z = torch.stack((r01 * torch.cos(t01), r01 * torch.sin(t01), r23 * torch.cos(t23), r23 * torch.sin(t23)), 1)
    return z.gather(1, lane.unsqueeze(1)).squeeze(1)
