"""Poisson sampling of logical batches.

The privacy accountant (:mod:`fastdp.accounting`) certifies Poisson-subsampled Gaussian steps: in every step each
example is included independently with probability q. Shuffling into fixed-size batches is a different mechanism
and the reported epsilon would not apply to it. This sampler implements the assumed one literally: one Bernoulli(q)
draw per example per step, so batch sizes are Binomial(N, q) and may be zero.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["PoissonSampler"]


class PoissonSampler(Sampler[list[int]]):
    """Yields, for each step, the list of indices included by independent Bernoulli(q) draws.

    Use it as a ``batch_sampler`` of a ``torch.utils.data.DataLoader`` or directly with
    :func:`fastdp.data.logical_batches`. Empty batches are yielded as empty lists: an empty batch is a genuine
    outcome of Poisson sampling and the optimizer must still take its (noise-only) step for the privacy
    guarantee to hold, so a training loop must not skip them. Note that torch's ``default_collate`` raises
    ``IndexError`` on an empty batch: with a ``DataLoader`` pass a ``collate_fn`` that returns 0-row tensors
    for it (tests of the loader in use should include an empty batch), or use ``logical_batches``.

    Each ``iter(sampler)`` is one pass of ``steps`` batches; passes continue the same random stream.

    Resuming: :meth:`state_dict` records the generator state and how many batches of the current pass were
    already yielded. After :meth:`load_state_dict`, the next ``iter(sampler)`` yields only the remaining batches of
    that pass, exactly those an uninterrupted run would have produced, and the passes after it are full again.
    This is exact because each batch consumes exactly one ``torch.rand(num_samples)`` from the sampler's own
    generator, drawn only when the batch is requested.

    Args:
        num_samples: dataset size N, > 0.
        sample_rate: inclusion probability q in (0, 1]. Give this or ``expected_batch_size``, not both.
        expected_batch_size: B, with q = B / N; an integer in [1, N].
        steps: batches per pass; defaults to ``round(1 / q)`` (one epoch in expectation).
        generator: a ``torch.Generator`` (CPU) to draw from; the sampler advances it.
        seed: seed for a private generator, if no generator is given. With neither, the private generator is
            seeded from OS entropy: the accountant's guarantee assumes nobody can tell which examples a step used,
            so a seed (or generator) is for tests and debugging, and must then stay secret.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float | None = None,
        expected_batch_size: int | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive integer (the dataset size), got {num_samples!r}.")
        self.num_samples: int = int(num_samples)

        if (sample_rate is None) == (expected_batch_size is None):
            raise ValueError(
                "give exactly one of sample_rate and expected_batch_size, got "
                f"sample_rate={sample_rate!r}, expected_batch_size={expected_batch_size!r}."
            )
        if expected_batch_size is not None:
            b = expected_batch_size
            if isinstance(b, bool) or int(b) != b or not (1 <= b <= self.num_samples):
                raise ValueError(
                    f"expected_batch_size must be an integer in [1, num_samples={self.num_samples}], got {b!r}."
                )
            self.expected_batch_size: float = int(b)
            self.sample_rate: float = int(b) / self.num_samples
        else:
            q = float(sample_rate)
            if not (0.0 < q <= 1.0):  # also rejects NaN
                raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}.")
            self.sample_rate = q
            self.expected_batch_size = q * self.num_samples

        if steps is None:
            steps = max(1, round(1.0 / self.sample_rate))
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer (batches per pass), got {steps!r}.")
        self.steps: int = int(steps)

        if generator is not None and seed is not None:
            raise ValueError("give a generator or a seed, not both (the seed would be ignored).")
        if generator is None:
            if seed is None:
                # OS entropy, not torch's global RNG: the guarantee assumes nobody can tell which examples a step used,
                # and torch.manual_seed(...) in a training script would make the draws predictable
                seed = int.from_bytes(os.urandom(8), "little") >> 1
            generator = torch.Generator().manual_seed(int(seed))
        elif generator.device.type != "cpu":
            raise ValueError(
                f"generator must be a CPU torch.Generator, got one on {generator.device}; the index draws are "
                "made on the CPU (they are N bytes per step and feed Python index lists)."
            )
        self.generator: torch.Generator = generator

        # Batches already yielded in the current pass, and where the next pass starts (set by load_state_dict).
        self._position = 0
        self._resume_at = 0

    def __len__(self) -> int:
        """Batches in a full pass (``steps``), also right after a resume, which yields fewer."""
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        start, self._resume_at = self._resume_at, 0
        self._position = start
        for _ in range(start, self.steps):
            # torch.rand is uniform on [0, 1), so `< q` is a Bernoulli(q) draw, and q = 1 includes everything.
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            indices = torch.nonzero(mask).flatten().tolist()
            self._position += 1
            yield indices
        self._position = 0

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the sampling stream exactly.

        Returns:
            A dict with ``generator_state`` (uint8 tensor), ``position`` (batches of the current pass already
            yielded; 0 between passes) and the configuration (``num_samples``, ``sample_rate``, ``steps``), which
            :meth:`load_state_dict` checks.
        """
        # A pass consumed to its last batch by zip/islice never runs the generator's epilogue: treat it as done.
        position = 0 if self._position >= self.steps else self._position
        return {
            "generator_state": self.generator.get_state(),
            "position": position,
            "num_samples": self.num_samples,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a state from :meth:`state_dict`; the next ``iter(self)`` resumes at the saved position.

        Args:
            state_dict: a dict produced by :meth:`state_dict` of a sampler with the same configuration.
        """
        missing = {"generator_state", "position", "num_samples", "sample_rate", "steps"} - set(state_dict)
        if missing:
            raise KeyError(
                f"PoissonSampler state_dict is missing {sorted(missing)}; got keys {sorted(state_dict)}. "
                "Pass a dict produced by PoissonSampler.state_dict()."
            )
        mine = (self.num_samples, self.sample_rate, self.steps)
        theirs = (state_dict["num_samples"], state_dict["sample_rate"], state_dict["steps"])
        if mine != theirs:
            raise ValueError(
                f"state_dict is for a sampler with (num_samples, sample_rate, steps)={theirs}, but this one has "
                f"{mine}. Build the sampler with the same configuration before loading."
            )
        position = int(state_dict["position"])
        if not (0 <= position < self.steps):
            raise ValueError(f"state_dict position must be in [0, steps={self.steps}), got {position}.")
        self.generator.set_state(state_dict["generator_state"])
        self._resume_at = position
        self._position = position

    def __repr__(self) -> str:
        return (
            f"PoissonSampler(num_samples={self.num_samples}, sample_rate={self.sample_rate:.6g}, "
            f"expected_batch_size={self.expected_batch_size:.6g}, steps={self.steps})"
        )
