"""A white-box statistical audit of the DP mechanism exactly as installed: ``python -m fastdp.audit``.

For every available backend, canary examples with Dirac gradients go through the public optimizer API
(``fastdp.DPSGD(..., backend=name)``, ``loss.backward()``, ``opt.step()``, ``opt.epsilon(delta)``,
``fastdp.data.PoissonSampler``) in two worlds, with and without the canaries; the released updates are turned
into one score per canary (fastdp.audit.scenarios explains the construction and what each scenario reveals).
From the two worlds' scores the audit estimates the Gaussian-DP parameter mu with a confidence interval and a
lower bound on epsilon from Clopper-Pearson bounds on a threshold test's error rates (Nasr et al. 2023), and
compares them with what fastdp claims (fastdp.audit.stats and fastdp.audit.checks give the statistics).

It is meant for a new build (the CUDA extension on a new machine, a torch or Triton upgrade): a kernel that
clips wrongly or adds the wrong noise moves the scores, and the audit exits non-zero. On a correct build each row
of the table is flagged with probability at most ``alpha`` (default 1e-3); the one-step rows are reproducible
from ``seed``, the Poisson rows use the sampler as users get it (seeded from OS entropy).

Reading the table: per scenario and backend, the scores per world, mu_hat [confidence interval] against the
claimed mu (1/sigma for one unsubsampled step), each world's noise standard deviation against sigma, the epsilon
lower bound against the claimed epsilon, and the verdict. VIOLATION: less private than claimed (the mu interval
lies above the claim, or the epsilon bound exceeds it). MISMATCH: not the claimed mechanism (the mu interval lies
below the claim, a noise standard deviation excludes sigma, or an update held inf/NaN). Sensitivity of the
one-step rows (power ~98%, simulated): a noise scale off by 1.5% (quick) or 0.5% (thorough) in one world is a
MISMATCH, and mu 5% (quick) or 1.5% (thorough) above the claim a VIOLATION.

Example:
    >>> result = fastdp.audit.run(quick=True)
    >>> print(result.table())
    >>> assert result.ok
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from fastdp.audit.checks import Row, check, format_table
from fastdp.audit.scenarios import OneStepConfig, PoissonConfig, one_step, poisson
from fastdp.backends import KNOWN, available_backends, resolve_backend

__all__ = ["SCENARIOS", "AuditResult", "Row", "run"]

#: the scenarios, in table order
SCENARIOS = ("one-step", "micro-batches", "poisson")

_QUICK = {
    "one-step": OneStepConfig(steps=800),
    "micro-batches": OneStepConfig(steps=800, micro_batches=4),
    "poisson": PoissonConfig(runs=32),
}
_THOROUGH = {
    "one-step": OneStepConfig(steps=8000),
    "micro-batches": OneStepConfig(steps=8000, micro_batches=4),
    "poisson": PoissonConfig(runs=160),
}


@dataclass
class AuditResult:
    """What ``run`` found.

    Attributes:
        rows: one per scenario and backend, in table order.
        alpha: each row's false-alarm budget.
        delta: the delta of the epsilons.
        seed: the seed of the audit's own randomness.
        quick: whether the quick settings were used.
        seconds: wall time of the whole audit.
    """

    rows: list[Row]
    alpha: float
    delta: float
    seed: int
    quick: bool
    seconds: float

    @property
    def ok(self) -> bool:
        """True when every row passed."""
        return all(r.ok for r in self.rows)

    def row(self, scenario: str, backend: str) -> Row:
        """The row of ``scenario`` on ``backend``."""
        for r in self.rows:
            if r.scenario == scenario and r.backend == backend:
                return r
        raise KeyError(f"no row for scenario {scenario!r} on backend {backend!r}; rows: {self.rows}")

    def table(self) -> str:
        """The table, its failure reasons and a summary line."""
        failed = sum(not r.ok for r in self.rows)
        summary = (
            f"{'quick' if self.quick else 'thorough'} audit, seed {self.seed}, delta {self.delta:g}, false-alarm "
            f"rate <= {self.alpha:g} per row; {len(self.rows) - failed}/{len(self.rows)} rows ok "
            f"({self.seconds:.1f} s)"
        )
        return format_table(self.rows) + "\n" + summary


def run(
    quick: bool = False,
    backends: Sequence[str] | None = None,
    seed: int = 0,
    scenarios: Sequence[str] | None = None,
    alpha: float = 1e-3,
    delta: float = 1e-5,
    progress: Callable[[Row], None] | None = None,
) -> AuditResult:
    """Audit the installed mechanism.

    Args:
        quick: the CI settings (10^5 scores per world in the one-step scenarios, 2 x 10^4 in the Poisson one;
            about 20 s on 2 CPU cores for two backends) instead of the thorough ones (10^6 and 10^5).
        backends: the backends to audit; default every one of ``fastdp.available_backends()``.
        seed: seed of the audit's own randomness (the optimizers' noise seeds, the micro-batch split).
        scenarios: a subset of ``SCENARIOS``; default all.
        alpha: each row's false-alarm budget (the probability that a correct build fails the row).
        delta: the delta at which epsilons are bounded and compared.
        progress: called with each row as soon as it is done.

    Returns:
        The rows and the overall verdict (``.ok``).
    """
    # an unknown or missing backend is an error here, with the reason; "auto" is the one it resolves to
    names = [resolve_backend(b).name for b in (available_backends() if backends is None else backends)]
    chosen = list(SCENARIOS if scenarios is None else scenarios)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; choose from {SCENARIOS}")
    if not 0.0 < alpha < 1.0 or not 0.0 < delta < 1.0:
        raise ValueError(f"alpha and delta must be in (0, 1), got alpha={alpha}, delta={delta}")
    configs = _QUICK if quick else _THOROUGH
    start = time.perf_counter()
    rows = []
    # the caller's torch RNG is left as it was (the plan's autotuning draws from it)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        for scenario in chosen:
            for backend in names:
                t0 = time.perf_counter()
                # a generator per (scenario, backend): a row does not depend on which other rows ran
                rng = np.random.default_rng([seed, SCENARIOS.index(scenario), KNOWN.index(backend)])
                cfg = configs[scenario]
                if scenario == "poisson":
                    samples = poisson(backend, cfg, rng, delta)
                else:
                    samples = one_step(backend, cfg, rng, delta)
                row = check(scenario, backend, samples, alpha, delta, white_box=scenario != "poisson")
                rows.append(replace(row, seconds=time.perf_counter() - t0))
                if progress is not None:
                    progress(rows[-1])
    return AuditResult(rows, alpha, delta, seed, quick, time.perf_counter() - start)
