"""From a scenario's scores to a verdict: the checks of one row of the audit table, and the table.

A row's checks share its false-alarm budget ``alpha`` (Bonferroni): on a correct build a row is flagged with
probability at most alpha, and the table with at most alpha times its number of rows.

- One-step rows (white box: the claimed mechanism is exactly known) spend alpha/3 on each of:
  the mu interval (violation if it lies entirely above the claimed 1/sigma, mismatch if entirely below: the
  installed mechanism is then not the claimed one, e.g. it adds more noise than it accounts for); the noise
  scale (chi-square interval of each world's standard deviation, alpha/6 each; mismatch if one excludes sigma);
  the epsilon lower bound (violation if above the claimed epsilon).
- Poisson rows spend all of alpha on the epsilon lower bound; their mu estimate is shown for information only
  (a subsampled mechanism is not exactly Gaussian-DP, so there is no claimed mu to compare it with).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fastdp.audit.scenarios import Samples
from fastdp.audit.stats import EpsilonBound, Estimate, epsilon_lower_bound, gaussian_mu, noise_std

__all__ = ["Row", "check", "format_table"]

OK, MISMATCH, VIOLATION = "ok", "MISMATCH", "VIOLATION"

#: fewer scores per world than this is a broken run, not a statistic
_MIN_SAMPLES = 100


@dataclass
class Row:
    """One scenario on one backend: estimates, claims and the verdict.

    Attributes:
        scenario, backend: what ran.
        samples: scores per world (the smaller world's count).
        mu: the Gaussian-DP estimate with its interval.
        claimed_mu: 1 / sigma for the one-step scenarios, None for the Poisson runs.
        noise_sd: each world's score standard deviation with its interval (one-step scenarios; None otherwise).
        claimed_sd: sigma, what the noise standard deviations should be (None when not checked).
        epsilon: the epsilon lower bound at ``delta`` and the test it came from.
        claimed_epsilon: what fastdp's accountant reports for the scenario.
        verdict: "ok", "MISMATCH" (not the claimed mechanism) or "VIOLATION" (less private than claimed).
        reasons: one line per failed check.
        seconds: wall time of the scenario (both worlds) and its checks.
    """

    scenario: str
    backend: str
    samples: int
    mu: Estimate
    claimed_mu: float | None
    noise_sd: tuple[Estimate, Estimate] | None
    claimed_sd: float | None
    epsilon: EpsilonBound
    claimed_epsilon: float
    verdict: str = OK
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no check of the row failed."""
        return self.verdict == OK


def check(scenario: str, backend: str, samples: Samples, alpha: float, delta: float, white_box: bool) -> Row:
    """Run a row's checks on a scenario's scores.

    Args:
        scenario, backend: names for the row.
        samples: the two worlds' scores and the claims.
        alpha: the row's false-alarm budget, split over its checks (module docstring).
        delta: the delta of the epsilon bound.
        white_box: True for the one-step scenarios (mu and the noise scale are checked two-sided).

    Returns:
        The row, with its verdict and the reasons for it.
    """
    violations, mismatches = [], []
    finite0, finite1 = np.isfinite(samples.x0), np.isfinite(samples.x1)
    x0, x1 = samples.x0[finite0], samples.x1[finite1]
    bad = len(samples.x0) + len(samples.x1) - len(x0) - len(x1)
    if bad:
        # an inf or NaN in a released update is never what the claimed mechanism releases
        mismatches.append(f"{bad} non-finite scores (inf or NaN in the update)")
    if min(len(x0), len(x1)) < _MIN_SAMPLES:
        raise ValueError(
            f"scenario {scenario!r} on {backend!r} left {len(x0)} and {len(x1)} finite scores in the two worlds; "
            f"the checks need at least {_MIN_SAMPLES} per world"
        )
    share = alpha / 3.0 if white_box else alpha
    mu = gaussian_mu(x0, x1, share)
    eps = epsilon_lower_bound(x0, x1, delta, share)
    if eps.epsilon > samples.claimed_epsilon:
        violations.append(f"epsilon >= {eps.epsilon:.3f} > claimed {samples.claimed_epsilon:.3f}")
    sd = None
    if white_box:
        claimed = samples.claimed_mu
        if mu.lo > claimed:
            violations.append(f"mu >= {mu.lo:.3f} > claimed {claimed:.3f}")
        elif mu.hi < claimed:
            mismatches.append(f"mu <= {mu.hi:.3f} < claimed {claimed:.3f}")
        sd = (noise_std(x0, share / 2.0), noise_std(x1, share / 2.0))
        sigma = samples.noise_multiplier
        for world, est in enumerate(sd):
            if not est.lo <= sigma <= est.hi:
                mismatches.append(f"world {world} noise sd {est} excludes sigma = {sigma:g}")
    verdict = VIOLATION if violations else MISMATCH if mismatches else OK
    return Row(
        scenario=scenario,
        backend=backend,
        samples=min(len(x0), len(x1)),
        mu=mu,
        claimed_mu=samples.claimed_mu,
        noise_sd=sd,
        claimed_sd=samples.noise_multiplier if white_box else None,
        epsilon=eps,
        claimed_epsilon=samples.claimed_epsilon,
        verdict=verdict,
        reasons=violations + mismatches,
    )


def format_table(rows: list[Row]) -> str:
    """The audit table: one line per row, then the reasons of the rows that failed."""
    header = (
        "scenario",
        "backend",
        "samples",
        "mu [CI]",
        "claim mu",
        "noise sd w0 / w1",
        "eps lb",
        "claim eps",
        "verdict",
        "s",
    )
    lines = [header]
    for r in rows:
        sd = "-" if r.noise_sd is None else f"{r.noise_sd[0].value:.3f} / {r.noise_sd[1].value:.3f}"
        if r.claimed_sd is not None:
            sd += f" ({r.claimed_sd:g})"
        lines.append(
            (
                r.scenario,
                r.backend,
                str(r.samples),
                str(r.mu),
                "-" if r.claimed_mu is None else f"{r.claimed_mu:.3f}",
                sd,
                f"{r.epsilon.epsilon:.3f}",
                f"{r.claimed_epsilon:.3f}",
                r.verdict,
                f"{r.seconds:.1f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    for r in rows:
        for reason in r.reasons:
            out.append(f"  {r.scenario}/{r.backend}: {reason}")
    return "\n".join(out)
