"""Counter-based Gaussian noise (Philox4x32-10 + Box-Muller): the stream every fused backend reproduces.

Noise element ``e`` of a step (``e`` counts over all noised parameters laid end to end, in the optimizer's order)
is a pure function of (seed, step, e), so it does not depend on how a backend chunks the parameters, on the number
of threads or launches, or on the device:

    group g = e // 4, lane = e % 4
    Philox(n) = Philox4x32-10(counter = (n mod 2^32, n >> 32, step mod 2^32, step >> 32),
                              key = (seed mod 2^32, (seed >> 32) mod 2^32))
    (x0, x1, x2, x3) = Philox(g),  (y0, _, y2, _) = Philox(g + 2^63)      (the radii's low words)
    v_j = fl32(((y_j + 0.5) 2^-32 + x_j) 2^-32)      in (0, 1], 64 random bits: radius uniforms, down to 2^-65
    u_j = fl32((x_j + 0.5) 2^-32)                    in (0, 1]: angle uniforms
    r = sqrt(-2 ln v0), s = sqrt(-2 ln v2)
    z = (r cos(2 pi u1), r sin(2 pi u1), s cos(2 pi u3), s sin(2 pi u3))
    noise[e] = z[lane]

Why the radii take 64 bits: from one 32-bit word, v >= 2^-33 and |z| <= sqrt(66 ln 2) = 6.77, a Gaussian truncated
at 6.77 sigma. The Gaussian mechanism's guarantee assumes no truncation: where two neighbouring batches' sums differ
by Delta_j in coordinate j, an output beyond the truncation of one is impossible under it, an event of probability
~2 phi(6.77) Delta_j / sigma = 9e-11 Delta_j / sigma per coordinate, ~9e-11 sqrt(d) C / sigma per step over d
coordinates when the difference is spread evenly: ~5e-8 per step for a 25M-parameter model at sigma = 3 C, 1e-5 over
200 steps an example takes part in, the size of the delta it is trained for. From 64 bits the radius reaches
sqrt(130 ln 2) = 9.49 (phi(9.49) ~ 1e-20): the truncation's share of delta is below 1e-13 over any training.

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


#: added to a group's counter for the words that extend its radius uniforms to 64 bits (groups stay below 2^61)
EXTENSION = 1 << 63


def uniforms(x: torch.Tensor) -> torch.Tensor:
    """uint32 words (int64) -> float32 uniforms in (0, 1]."""
    return (x.to(torch.float64) + 0.5).mul_(2.0**-32).to(torch.float32)


def uniforms64(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """High words ``x`` and low words ``y`` (int64 holding uint32) -> float32 uniforms in (0, 1], as small as 2^-65.

    ((y + 0.5) 2^-32 + x) 2^-32 in float64 arithmetic (one rounding, at the addition; the scalings are exact), then
    rounded to float32: every backend computes it with these float64 operations, so the uniforms are bit-identical.
    """
    return ((y.to(torch.float64) + 0.5).mul_(2.0**-32).add_(x.to(torch.float64))).mul_(2.0**-32).to(torch.float32)


def philox_normal(numel: int, seed: int, step: int, offset: int = 0, device=None) -> torch.Tensor:
    """Noise elements ``offset .. offset + numel - 1`` of step ``step`` (float32, see the module docstring)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    e = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    g, lane = e >> 2, e & 3
    step, key = int(step), (int(seed) & _MASK, (int(seed) >> 32) & _MASK)
    tail = (torch.full_like(g, step & _MASK), torch.full_like(g, (step >> 32) & _MASK))
    x0, x1, x2, x3 = philox4x32((g & _MASK, g >> 32, *tail), key)
    # g + 2^63: the counter's high word with its top bit set (g < 2^61, so no carry)
    y0, _, y2, _ = philox4x32((g & _MASK, (g >> 32) + (EXTENSION >> 32), *tail), key)
    v0, v2 = uniforms64(x0, y0), uniforms64(x2, y2)
    u1, u3 = uniforms(x1), uniforms(x3)
    r01, r23 = torch.sqrt(-2.0 * torch.log(v0)), torch.sqrt(-2.0 * torch.log(v2))
    t01, t23 = (2.0 * math.pi) * u1, (2.0 * math.pi) * u3
    z = torch.stack((r01 * torch.cos(t01), r01 * torch.sin(t01), r23 * torch.cos(t23), r23 * torch.sin(t23)), 1)
    return z.gather(1, lane.unsqueeze(1)).squeeze(1)
