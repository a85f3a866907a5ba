"""The audit's experiments: canaries through the public optimizer API, in two worlds, and the scores they give.

The model is ``nn.Linear(d, 1, bias=False)`` with ``loss = model(x).sum()`` and ``loss_reduction="sum"``, so the
gradient of example i is its own input x_i (a Dirac gradient: nothing else in the model moves it). Canary j is
the example ``x = M C e_j`` (M = 4 > 1: unclipped its gradient would have norm M C, so clipping must act); the
other examples are a fixed population of zero vectors (gradient 0: they change nothing but the batch size). The
optimizer is plain SGD (momentum 0, learning rate lr), so a step from zero weights reveals the noisy gradient:
``g = -w_after / lr``. The score of coordinate j is ``s_j = g_j B / C``: the installed mechanism is claimed to
release S + N(0, sigma^2 C^2 I) over B, S the sum of clipped gradients, so s_j is N(1, sigma^2) with canary j
in the batch and N(0, sigma^2) without it.

Why one step gives d samples. Each example is clipped on its own and the noise is i.i.d. across coordinates, so
under the claimed mechanism s_j depends on canary j and on the noise of coordinate j only: with d canaries on
d orthogonal coordinates, one step is d independent copies of the single-canary experiment, and a run without
canaries is d independent copies of its other world. The audit's false-alarm guarantee is a statement about the
claimed mechanism (the null hypothesis), so it needs exactly this independence and no more. A buggy mechanism
may couple the coordinates (through the batch size, for instance); that only has to be detected, and the worlds
below are built so that each bug the tests inject moves the scores of every coordinate.

The worlds. World 1 trains on P zero examples and the d canaries; world 0 on the same P zero examples alone
(the add/remove neighbouring relation the accountant certifies, applied to each canary). The expected batch size
is B = P + d, the size of world 1's data (what a user sets for q = 1); the learning rate, C and B are
deliberately not 1, so that the noise scale and the division each have to be right for the scores to come out
in units of 1. Every optimizer gets its own noise seed, drawn from the audit's seeded generator: the worlds'
noises are independent and the audit is reproducible (except the Poisson scenario's sampler, which seeds itself
from OS entropy exactly as users get it).

Scenarios, and what each injected bug does to them (the tests inject each one):

- ``one-step``: d = 128 canaries, P = 32, B = 160, sigma = 2 (claimed mu 0.5; the claimed epsilon is
  ``opt.epsilon(delta)`` after one step with q = 1, 1.99 at delta = 1e-5). All rows in one micro-batch; each
  step of the same optimizer, from zeroed weights, is a fresh draw of the mechanism and gives d scores.
  Half the noise: mu doubles (violation, the interval is far above 0.5; the epsilon bound passes the claim
  too). No clipping: the canary's mean is M, mu = M / sigma = 2 (violation). Extra noise per micro-batch:
  variance 2 sigma^2, mu / sqrt(2) (mismatch: not the claimed mechanism, and the noise estimate says so).
  Division by the realised batch size: world 0 divides by P = 32 instead of B = 160, so its scores have 5x the
  standard deviation; mu lies below the claim, and the heavy lower tail of world 0 puts the epsilon bound far
  above it (violation). The worlds differ by all d canaries, so here the bug shows through the batch size of
  the whole group; that is faithful, because it is exactly how the bug leaks in training: the scale of the noise,
  which anyone who sees many coordinates of an update can measure, reveals how many examples the batch held.
- ``micro-batches``: the same rows split over 4 micro-batches (4 backward calls), each canary in one of them.
  It adds the accumulation over micro-batches to what is checked (a lost, repeated or jointly clipped
  micro-batch moves mu); noise per micro-batch shows with 5 times the variance.
- ``poisson``: runs of T = 64 Poisson-sampled steps (d = 1024 canaries, P = 64, q = 1/64, sigma = 1; claimed
  epsilon 0.97 at delta = 1e-5), each with a fresh optimizer and a fresh unseeded PoissonSampler, compared with
  ``opt.epsilon(delta)`` after the T steps. The adversary saw one earlier run (the reference run): for canary j
  it sums s_j over the steps in which the reference run included canary j and divides by the square root of
  their number k_j (canaries the reference never included, about 1/e of them, are not scored). With a correct
  sampler the reference pattern is independent of the audited run, so the score is a post-processing of the
  run's output with independent side information and the claim must hold; the score's shift is only about
  q sqrt(k_j). With a sampler that repeats across runs the pattern is the audited run's own, every scored step
  contains the canary, and the score is N(sqrt(k_j), sigma^2): subsampling hides nothing and the epsilon bound
  (about 2.2-2.5 with the quick settings) exceeds the claim. No clipping and division by the realised batch size
  are flagged here too; half the noise is not (this adversary is too weak to see it through the subsampling,
  which is what the one-step rows are for).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import fastdp
from fastdp.backends import resolve_backend

__all__ = ["PoissonConfig", "OneStepConfig", "Samples", "one_step", "poisson"]


@dataclass(frozen=True)
class OneStepConfig:
    """The one-step scenarios (``micro_batches`` > 1: the rows split over that many backward calls)."""

    #: canaries = coordinates, and the zero population (B = population + canaries). Small on purpose: a step's
    #: tensors stay under 128 KB, below glibc's mmap threshold; larger ones are mapped fresh from the OS on every
    #: op, which costs milliseconds per op on some sandboxed machines. The samples come from many cheap steps.
    canaries: int = 128
    population: int = 32
    #: steps per world; each gives ``canaries`` scores
    steps: int = 800
    micro_batches: int = 1
    noise_multiplier: float = 2.0
    max_grad_norm: float = 0.5
    lr: float = 2.0
    #: the canary's gradient norm in units of C, before clipping
    magnitude: float = 4.0


@dataclass(frozen=True)
class PoissonConfig:
    """The Poisson-sampled multi-step scenario (q = expected_batch_size / (canaries + population))."""

    canaries: int = 1024
    population: int = 64
    #: audited runs per world (plus one reference run)
    runs: int = 32
    steps: int = 64
    #: q = 17 / 1088 = 1/64: about one inclusion of each canary per run
    expected_batch_size: int = 17
    noise_multiplier: float = 1.0
    max_grad_norm: float = 0.5
    lr: float = 2.0
    magnitude: float = 4.0


@dataclass
class Samples:
    """The scores of one scenario on one backend, and what fastdp claims for it.

    Attributes:
        x0, x1: scores of world 0 (no canary) and world 1 (canary), one per canary and repetition.
        claimed_epsilon: epsilon at ``delta`` that the optimizer reports for one canary's participation.
        claimed_mu: the Gaussian-DP parameter of the claimed mechanism (1 / sigma for one step; None for the
            subsampled runs, which are not exactly GDP).
        noise_multiplier: sigma, the claimed standard deviation of the scores within a world (one-step scenarios).
    """

    x0: np.ndarray
    x1: np.ndarray
    claimed_epsilon: float
    claimed_mu: float | None
    noise_multiplier: float


def _device(backend: str) -> torch.device:
    return torch.device(resolve_backend(backend).device_type or "cpu")


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**62))


def _model_and_optimizer(
    backend: str, d: int, cfg: OneStepConfig | PoissonConfig, batch: int, sample_size: int, seed: int
) -> tuple[nn.Linear, fastdp.DPOptimizer]:
    # no init: every step starts from zero weights
    model = nn.utils.skip_init(nn.Linear, d, 1, bias=False, device=_device(backend))
    opt = fastdp.DPSGD(
        model,
        lr=cfg.lr,
        noise_multiplier=cfg.noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        expected_batch_size=batch,
        sample_size=sample_size,
        loss_reduction="sum",
        backend=backend,
        seed=seed,
    )
    return model, opt


def _step(model: nn.Linear, opt: fastdp.DPOptimizer, micro: list[torch.Tensor], scale: float) -> np.ndarray:
    """One logical batch from zero weights; returns the released gradient in score units (g B / C)."""
    with torch.no_grad():
        model.weight.zero_()
    for x in micro:
        model(x).sum().backward()
    opt.step()
    opt.zero_grad()
    # w_after = -lr * g, and scale = B / (lr C)
    return (-model.weight.detach().double().flatten() * scale).cpu().numpy()


def _canary_rows(indices: torch.Tensor, canaries: int, value: float, device: torch.device) -> torch.Tensor:
    """The inputs of the examples ``indices``: example j < canaries is value * e_j, the others are zero."""
    x = torch.zeros(len(indices), canaries, device=device)
    is_canary = indices < canaries
    rows = torch.nonzero(is_canary).flatten()
    x[rows.to(device), indices[is_canary].to(device)] = value
    return x


def one_step(backend: str, cfg: OneStepConfig, rng: np.random.Generator, delta: float) -> Samples:
    """World 0 and world 1 of the one-step scenario on ``backend``.

    Args:
        backend: a name from ``fastdp.available_backends()``.
        cfg: sizes and the mechanism's parameters.
        rng: the audit's generator (noise seeds of the optimizers, the split into micro-batches).
        delta: the delta of the claimed epsilon.

    Returns:
        ``cfg.steps * cfg.canaries`` scores per world; the claim is ``opt.epsilon(delta)`` after one step with
        q = 1 (sample_size = expected_batch_size).
    """
    d, batch = cfg.canaries, cfg.canaries + cfg.population
    # rows 0..d-1 are the canaries, the rest the zero population; one fixed shuffle spreads both over the
    # micro-batches (every canary is in exactly one of them)
    order = torch.from_numpy(rng.permutation(batch))
    scores, claim = [], 0.0
    for with_canaries in (False, True):
        model, opt = _model_and_optimizer(backend, d, cfg, batch, batch, _seed(rng))
        examples = order if with_canaries else order[order >= d]
        x = _canary_rows(examples, d, cfg.magnitude * cfg.max_grad_norm, _device(backend))
        micro = list(torch.tensor_split(x, cfg.micro_batches))
        scale = batch / (cfg.lr * cfg.max_grad_norm)
        rows = []
        for i in range(cfg.steps):
            rows.append(_step(model, opt, micro, scale))
            if i == 0 and with_canaries:
                claim = opt.epsilon(delta)  # the canaries' data set, after one step (PLD: ~0.3 s, asked once)
        scores.append(np.concatenate(rows))
    return Samples(scores[0], scores[1], claim, 1.0 / cfg.noise_multiplier, cfg.noise_multiplier)


def poisson(backend: str, cfg: PoissonConfig, rng: np.random.Generator, delta: float) -> Samples:
    """World 0 and world 1 of Poisson-sampled runs on ``backend``, scored with a reference run's inclusion pattern.

    Args:
        backend: a name from ``fastdp.available_backends()``.
        cfg: sizes and the mechanism's parameters.
        rng: the audit's generator (the optimizers' noise seeds; the sampler is unseeded).
        delta: the delta of the claimed epsilon.

    Returns:
        One score per (audited run, canary that the reference run included at least once) per world; the
        claim is ``opt.epsilon(delta)`` of a world-1 run after its ``cfg.steps`` steps.
    """
    d, n = cfg.canaries, cfg.canaries + cfg.population
    q = cfg.expected_batch_size / n

    def one_run(with_canaries: bool) -> tuple[np.ndarray, np.ndarray, fastdp.DPOptimizer]:
        """Scores (steps x d) and the canaries' inclusion (steps x d) of one fresh run."""
        model, opt = _model_and_optimizer(backend, d, cfg, cfg.expected_batch_size, n, _seed(rng))
        # world 0 has the population only: its example i is the population's i, numbered after the canaries
        first = 0 if with_canaries else d
        scale = cfg.expected_batch_size / (cfg.lr * cfg.max_grad_norm)
        scores = np.empty((cfg.steps, d))
        included = np.zeros((cfg.steps, d), dtype=bool)
        for t, batch in enumerate(fastdp.data.PoissonSampler(n - first, sample_rate=q, steps=cfg.steps)):
            idx = torch.as_tensor(batch, dtype=torch.long) + first
            micro = [] if len(idx) == 0 else [_canary_rows(idx, d, cfg.magnitude * cfg.max_grad_norm, _device(backend))]
            scores[t] = _step(model, opt, micro, scale)
            included[t, idx[idx < d].numpy()] = True
        if opt.steps_taken != cfg.steps:
            raise RuntimeError(f"a run took {opt.steps_taken} steps, expected {cfg.steps}")
        return scores, included, opt

    _, reference, _ = one_run(True)
    k = reference.sum(axis=0)
    scored = k > 0
    weights = reference[:, scored] / np.sqrt(k[scored])

    def score(s: np.ndarray) -> np.ndarray:
        return (s[:, scored] * weights).sum(axis=0)

    x0, x1, claim = [], [], None
    for _ in range(cfg.runs):
        s1, _, opt = one_run(True)
        x1.append(score(s1))
        if claim is None:
            claim = opt.epsilon(delta)
        s0, _, _ = one_run(False)
        x0.append(score(s0))
    return Samples(np.concatenate(x0), np.concatenate(x1), float(claim), None, cfg.noise_multiplier)
