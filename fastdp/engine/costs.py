"""A coarse machine model for choosing per-layer plans: time in FLOP-equivalents.

Large GEMMs run near peak (factor 1); batched small GEMMs, grouped convolutions and memory-bound passes
cost more per useful FLOP. The factors were fitted to the per-shape timings in DESIGN.md section 3 and
bench/bench_plan.py on a 2-core AVX-512 CPU; they only need to rank the strategies of one layer correctly.
"""

from __future__ import annotations

#: FLOP-equivalents per byte moved by a memory-bound pass (~100 GFLOP/s against ~10 GB/s)
BYTE = 10.0
#: a batch of per-example GEMMs (bmm), relative to one large GEMM
BMM = 2.5
#: the Gram-matrix products of the ghost norm (bmm of T x T outputs)
GHOST = 2.0


def gemm(m: int, n: int, k: int) -> float:
    """One large GEMM."""
    return 2.0 * m * n * k


def stream(num_bytes: float) -> float:
    """A memory-bound pass over ``num_bytes``."""
    return BYTE * num_bytes
