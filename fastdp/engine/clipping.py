"""Clip factors c_i from per-example norms, registered by name.

Both bound ||c_i g_i|| <= C, so the sum has sensitivity C and the noise std is sigma * C for either.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

ClipFn = Callable[[torch.Tensor, float, float], torch.Tensor]
_CLIPPERS: dict[str, ClipFn] = {}


def register_clipping(name: str) -> Callable[[ClipFn], ClipFn]:
    def deco(fn: ClipFn) -> ClipFn:
        _CLIPPERS[name] = fn
        return fn

    return deco


@register_clipping("flat")
def flat(norms: torch.Tensor, max_norm: float, gamma: float) -> torch.Tensor:
    """c_i = min(1, C / ||g_i||) (Abadi et al.); an all-zero gradient gets c_i = 1."""
    return (max_norm / norms.clamp_min(1e-30)).clamp_max(1.0)


@register_clipping("automatic")
def automatic(norms: torch.Tensor, max_norm: float, gamma: float) -> torch.Tensor:
    """c_i = C / (||g_i|| + gamma) (Bu et al. 2022, "automatic clipping"): ||c_i g_i|| < C for gamma > 0."""
    return max_norm / (norms + gamma)


def get_clipping(name: str, max_norm: float, gamma: float) -> ClipFn:
    """Look up a clipping rule by name (``flat`` or ``automatic``) after checking that its arguments bound the
    sensitivity: a finite C > 0, and for automatic clipping a finite gamma > 0 (with gamma <= 0 an example of norm
    ||g|| ~ -gamma gets an unbounded weight; with gamma = 0 a zero gradient gets C / 0)."""
    try:
        fn = _CLIPPERS[name]
    except KeyError:
        raise ValueError(f"unknown clipping {name!r}; choose one of {sorted(_CLIPPERS)}") from None
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(
            f"max_grad_norm must be a finite number > 0 (it bounds each example's contribution), got {max_norm}"
        )
    if name == "automatic" and not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(
            f"clip_gamma must be a finite number > 0 with clipping='automatic' (C / (||g|| + gamma) is bounded by C "
            f"only then), got {gamma}; the default is 0.01"
        )
    return fn
