"""The statistics of the audit: two samples of a scalar score, one per world, in; bounds on privacy out.

World 0 ran without the canary, world 1 with it. Under the claimed mechanism both samples are i.i.d. (the
scenarios in fastdp.audit.scenarios say why), and the three procedures below are exact or conservative at the
level ``alpha`` each is given; their union over a row of the audit table is bounded by adding the levels.

mu (Gaussian DP). One unsubsampled DP-SGD step releases, per canary coordinate, N(1, sigma^2) with the canary
and N(0, sigma^2) without it (in units of C / B): two Gaussians with equal variance whose means differ by
mu * sd, mu = 1 / sigma, which is exactly mu-GDP (Dong, Roth and Su 2019). The estimate is the standardised mean
difference ``mu_hat = (mean_1 - mean_0) / s_p``, s_p the pooled standard deviation. Its standard error is
``sqrt(1/n_0 + 1/n_1 + mu^2 / (2 (n_0 + n_1)))`` (the first two terms from the means, the last from the
relative error of s_p, sqrt(1 / (2 df)); Hedges and Olkin 1985), and the interval is ``mu_hat +- z se`` with z
the 1 - alpha/2 normal quantile. mu_hat is a noncentral t over a constant, so with the ~10^4+ samples per world
the audit draws, the normal approximation is far inside the budget alpha (its tails are heavier by O(1/df)).

Noise scale. ``(n - 1) S^2 / sigma^2`` is chi-square with n - 1 degrees of freedom for each world's sample
variance S^2; the interval for the standard deviation inverts it (alpha/2 per world, Bonferroni).

epsilon lower bound (Nasr et al. 2023, "Tight Auditing of Differentially Private Machine Learning", and
Jagielski et al. 2020). For any event S of the output, (epsilon, delta)-DP gives P_1(S) <= e^eps P_0(S) + delta
and P_0(S) <= e^eps P_1(S) + delta. A threshold test that answers "canary present" on S has FPR = P_0(S) and
FNR = 1 - P_1(S), so epsilon >= log((1 - delta - FNR) / FPR), and for the complement of S the second form,
log((1 - delta - FPR) / FNR). Clopper-Pearson upper bounds on the two rates (alpha/2 each, so both hold at once
with probability >= 1 - alpha) turn that into a lower bound that holds with probability >= 1 - alpha for any
(epsilon, delta)-DP mechanism whose trials are independent. Choosing the best of many thresholds on the same
data would void that, so the samples are split once, before looking: the threshold and its side are
chosen on the even-indexed samples, and the bound is computed from the odd-indexed ones only (once both rates
are bounded, both forms hold, so the larger is reported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["EpsilonBound", "Estimate", "clopper_pearson_upper", "epsilon_lower_bound", "gaussian_mu", "noise_std"]

#: how many order statistics on each side of the selection half are tried as thresholds (geometrically spaced
#: ranks: the tails, where the epsilon bound is decided, get the finest grid)
_THRESHOLD_RANKS = 400


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a two-sided confidence interval [lo, hi] at level 1 - alpha."""

    value: float
    lo: float
    hi: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


@dataclass(frozen=True)
class EpsilonBound:
    """An epsilon lower bound and the threshold test it came from.

    Attributes:
        epsilon: the lower bound (0 when no test gives a positive one: 0 is always a valid lower bound).
        threshold: the score threshold t of the test.
        present_above: True if the test says "canary present" for scores > t, False for scores <= t.
        fpr_ub, fnr_ub: Clopper-Pearson upper bounds on the test's false positive and false negative rates.
        n0, n1: the evaluation samples (half of each world's).
    """

    epsilon: float
    threshold: float
    present_above: bool
    fpr_ub: float
    fnr_ub: float
    n0: int
    n1: int


def clopper_pearson_upper(k: np.ndarray | int, n: int, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound on a binomial rate: P(rate > bound) <= alpha.

    Args:
        k: observed counts (an array or a scalar), 0 <= k <= n.
        n: trials.
        alpha: the level.

    Returns:
        The bounds, ``Beta(1 - alpha; k + 1, n - k)`` quantiles, and 1 where k == n.
    """
    k = np.asarray(k, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        ub = stats.beta.ppf(1.0 - alpha, k + 1.0, n - k)
    return np.where(k >= n, 1.0, ub)


def gaussian_mu(x0: np.ndarray, x1: np.ndarray, alpha: float) -> Estimate:
    """The Gaussian-DP parameter as the standardised mean difference of the two worlds, with its interval.

    Args:
        x0, x1: the scores of world 0 (no canary) and world 1 (canary), in units of the claimed shift.
        alpha: the interval is two-sided at level 1 - alpha.

    Returns:
        mu_hat and its normal-approximation interval (see the module docstring for the standard error).
    """
    n0, n1 = len(x0), len(x1)
    pooled = ((n0 - 1) * np.var(x0, ddof=1) + (n1 - 1) * np.var(x1, ddof=1)) / (n0 + n1 - 2)
    mu = float((np.mean(x1) - np.mean(x0)) / math.sqrt(pooled))
    se = math.sqrt(1.0 / n0 + 1.0 / n1 + mu * mu / (2.0 * (n0 + n1)))
    z = float(stats.norm.ppf(1.0 - alpha / 2.0))
    return Estimate(mu, mu - z * se, mu + z * se)


def noise_std(x: np.ndarray, alpha: float) -> Estimate:
    """The standard deviation of a Gaussian sample, with the chi-square interval.

    Args:
        x: the sample (its mean is estimated, so n - 1 degrees of freedom).
        alpha: the interval is two-sided at level 1 - alpha.

    Returns:
        The sample standard deviation and the exact interval ``sqrt((n-1) S^2 / chi2_{1-alpha/2, alpha/2})``.
    """
    df = len(x) - 1
    var = float(np.var(x, ddof=1))
    lo = math.sqrt(df * var / stats.chi2.ppf(1.0 - alpha / 2.0, df))
    hi = math.sqrt(df * var / stats.chi2.ppf(alpha / 2.0, df))
    return Estimate(math.sqrt(var), lo, hi)


def epsilon_lower_bound(x0: np.ndarray, x1: np.ndarray, delta: float, alpha: float) -> EpsilonBound:
    """A lower bound on epsilon (at ``delta``) that holds with probability >= 1 - alpha.

    The thresholds (order statistics of the pooled even-indexed samples, dense in the tails) and both sides
    ("present" above or below t) are scored on the even-indexed samples; the best is evaluated once on the
    odd-indexed ones (module docstring).

    Args:
        x0, x1: scores of world 0 and world 1; i.i.d. within a world, in an order fixed before the run.
        delta: the delta the bound is for.
        alpha: the level (alpha/2 for each Clopper-Pearson bound).

    Returns:
        The bound and the test that gave it.
    """
    sel0, sel1 = np.sort(x0[0::2]), np.sort(x1[0::2])
    ev0, ev1 = np.sort(x0[1::2]), np.sort(x1[1::2])
    pooled = np.sort(np.concatenate([sel0, sel1]))
    n = len(pooled)
    ranks = np.unique(np.geomspace(1, max(1, n // 2), _THRESHOLD_RANKS).astype(np.int64))
    thresholds = np.unique(np.concatenate([pooled[ranks - 1], pooled[n - ranks]]))
    best, t, above = -np.inf, 0.0, True
    for side in (True, False):
        eps = _nasr(*_error_bounds(sel0, sel1, thresholds, side, alpha), delta)
        i = int(np.argmax(eps))
        if eps[i] > best:
            best, t, above = float(eps[i]), float(thresholds[i]), side
    fpr, fnr = _error_bounds(ev0, ev1, np.array([t]), above, alpha)
    eps = float(_nasr(fpr, fnr, delta)[0])
    return EpsilonBound(max(0.0, eps), t, above, float(fpr[0]), float(fnr[0]), len(ev0), len(ev1))


def _error_bounds(
    s0: np.ndarray, s1: np.ndarray, thresholds: np.ndarray, present_above: bool, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """Clopper-Pearson upper bounds (alpha/2 each) on the FPR and FNR of "present iff score > t" (or <= t) for
    each threshold t, from the sorted scores of the two worlds."""
    le0, le1 = np.searchsorted(s0, thresholds, side="right"), np.searchsorted(s1, thresholds, side="right")
    n0, n1 = len(s0), len(s1)
    false_pos, false_neg = (n0 - le0, le1) if present_above else (le0, n1 - le1)
    return clopper_pearson_upper(false_pos, n0, alpha / 2.0), clopper_pearson_upper(false_neg, n1, alpha / 2.0)


def _nasr(fpr: np.ndarray, fnr: np.ndarray, delta: float) -> np.ndarray:
    """max(log((1 - delta - FNR) / FPR), log((1 - delta - FPR) / FNR)), -inf where neither is defined."""
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.fmax(np.log((1.0 - delta - fnr) / fpr), np.log((1.0 - delta - fpr) / fnr))
    return np.nan_to_num(eps, nan=-np.inf)
