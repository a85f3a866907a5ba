"""Exponential moving average (Polyak averaging) of a model's parameters, as De et al. 2022 evaluate.

After step t (counting from 1) the average moves towards the parameters with

    avg <- mu_t * avg + (1 - mu_t) * param,   mu_t = min(decay, (1 + t) / (10 + t)) with warm-up, else decay.

The warm-up keeps the first steps from being dominated by the random initialisation (mu_1 = 2/11). The average is
computed from the released (noised) parameters only, so it is post-processing: it costs no privacy. Buffers are
copied, not averaged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    """Moving average of ``model``'s floating-point parameters.

    Args:
        model: the model being trained; the average starts as a copy of its parameters.
        decay: mu in [0, 1); De et al. use 0.9999.
        warmup: use mu_t = min(decay, (1 + t) / (10 + t)).

    Call :meth:`update` after every optimizer step; evaluate with ``with ema.applied(model): ...``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.steps = 0
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype.is_floating_point}

    def rate(self) -> float:
        """mu of the next update."""
        t = self.steps + 1
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        mu = self.rate()
        for n, p in model.named_parameters():
            avg = self.shadow.get(n)
            if avg is not None:
                avg.lerp_(p.detach().to(avg.dtype), 1.0 - mu)
        self.steps += 1

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged parameters into ``model`` (restored on exit)."""
        saved = {}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in self.shadow:
                    saved[n] = p.detach().clone()
                    p.copy_(self.shadow[n])
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in saved:
                        p.copy_(saved[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "steps": self.steps, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state has no average for {sorted(missing)[:5]}; was it saved for another model?")
        self.decay, self.warmup, self.steps = float(state["decay"]), bool(state["warmup"]), int(state["steps"])
        for n, avg in self.shadow.items():
            avg.copy_(state["shadow"][n])
