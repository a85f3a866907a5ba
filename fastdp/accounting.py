"""Privacy accounting for DP-SGD with Poisson-subsampled Gaussian steps.

Every number reported here comes from Google's ``dp-accounting`` library: we only describe what was run
(a composition of Poisson-subsampled Gaussian mechanisms) as a ``DpEvent`` and ask one of its accountants.
No closed-form or home-made bound is used anywhere, so the guarantee is exactly as strong as dp-accounting's.

Two accountants are offered:

- ``"pld"`` (default): privacy loss distributions (Koskela et al., Google's PLD), numerically tight; the
  pessimistic discretisation it uses keeps the reported epsilon an upper bound.
- ``"rdp"``: Renyi DP (Mironov et al.), looser (typically 5-10% larger epsilon for DP-SGD) but very fast at
  any noise level.

Both use the add-or-remove-one neighbouring relation, which is the one under which Poisson subsampling
amplifies privacy; the sampler in :mod:`fastdp.data` is what makes that assumption true.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import dp_accounting
from dp_accounting import mechanism_calibration, pld, rdp

__all__ = [
    "PrivacyAccountant",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "steps_for_epochs",
]

MECHANISMS: tuple[str, ...] = ("pld", "rdp")

# Width of the grid on which PLDAccountant discretises the privacy loss. 1e-4 is dp-accounting's own default.
# The cost of PLD is set by the number of grid points, i.e. (range of the privacy loss) / interval, not by the
# number of steps: a self-composition of T identical steps is done by FFT exponentiation, O(log T) convolutions.
# Measured on a 2-core CPU (dp-accounting 0.6.0): q = 4096/50000, sigma = 3, 2500 steps -> 0.2 s (eps 6.5789 at
# delta 1e-5; an interval of 1e-3 gives 6.5797 in 0.02 s, 1e-2 gives 6.659). q = 256/60000, sigma = 1.1,
# 60 epochs -> 0.27 s. So the default is cheap at the noise levels DP-SGD uses and we keep it: the result then
# matches dp-accounting called with its defaults. What is expensive is small sigma, because the loss range grows
# like 1/sigma^2 (sigma = 0.25: ~2-7 s; sigma = 1/16: 20-150 s). That only matters to calibration, which is why
# calibrate_noise_multiplier brackets the answer with the fast RDP accountant before it asks PLD anything.
PLD_VALUE_DISCRETIZATION_INTERVAL = 1e-4

# Limits of the noise-multiplier search in calibrate_noise_multiplier. Below the floor, epsilon is in the
# thousands for any realistic sampling rate (and PLD would take minutes); above the ceiling every target
# epsilon a user could want is already met.
_SIGMA_FLOOR = 2.0**-10
_SIGMA_CEILING = 2.0**20


def _check_mechanism(mechanism: str) -> str:
    if not isinstance(mechanism, str) or mechanism.lower() not in MECHANISMS:
        raise ValueError(
            f"mechanism must be one of {MECHANISMS}, got {mechanism!r}. Use 'pld' (tight, default) or 'rdp'."
        )
    return mechanism.lower()


def _check_sample_rate(sample_rate: float, *, allow_zero: bool = True) -> float:
    q = float(sample_rate)
    ok = (0.0 <= q <= 1.0) if allow_zero else (0.0 < q <= 1.0)
    if not ok:  # also rejects NaN
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(
            f"sample_rate must be in {interval}, got {sample_rate!r}. It is the Poisson inclusion probability "
            "q = expected_batch_size / dataset_size."
        )
    return q


def _check_noise_multiplier(noise_multiplier: float) -> float:
    sigma = float(noise_multiplier)
    if not (0.0 <= sigma < math.inf):
        raise ValueError(
            f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}. It is the noise std divided by "
            "the clipping norm."
        )
    return sigma


def _check_delta(delta: float, name: str = "delta") -> float:
    d = float(delta)
    if not (0.0 < d < 1.0):
        raise ValueError(f"{name} must be in (0, 1), got {delta!r}. A usual choice is 1/N or smaller, e.g. 1e-5.")
    return d


def _check_count(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


@contextlib.contextmanager
def _quiet_rdp_orders():
    """dp-accounting's RDP logs an absl warning for every Renyi order whose series fails to converge and is left
    out. The bound stays valid (a minimum over the remaining orders), so for a user it is noise: silenced here."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _make_accountant(mechanism: str) -> dp_accounting.PrivacyAccountant:
    """A fresh, empty accountant of the given kind (add-or-remove-one neighbouring relation)."""
    if mechanism == "pld":
        return pld.PLDAccountant(value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL)
    return rdp.RdpAccountant()


def _make_event(history: Sequence[Sequence[float]]) -> dp_accounting.DpEvent:
    """The DpEvent of a training run: phases of `count` identical Poisson-subsampled Gaussian steps, in order."""
    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), int(count)
            )
            for q, sigma, count in history
        ]
    )


class PrivacyAccountant:
    """Tracks the DP-SGD steps taken and reports (epsilon, delta) through dp-accounting.

    The history is stored compressed as ``[q, sigma, count]`` phases; consecutive steps with the same
    (q, sigma) extend the last phase, so a run with a constant schedule is one phase whatever its length.

    Args:
        mechanism: ``"pld"`` (default, tight) or ``"rdp"`` (looser, fast).

    Example:
        >>> acc = PrivacyAccountant()
        >>> acc.step(sample_rate=4096 / 50000, noise_multiplier=3.0, num_steps=2500)
        >>> eps = acc.epsilon(1e-5)
    """

    def __init__(self, mechanism: str = "pld") -> None:
        self.mechanism: str = _check_mechanism(mechanism)
        self.history: list[list[float | int]] = []
        # Results for the current history only, keyed on ("epsilon", delta) / ("delta", epsilon). PLD costs
        # ~0.2 s per query and training loops tend to ask the same question every step or every log line.
        self._cache_history: tuple[tuple[float | int, ...], ...] = ()
        self._cache: dict[tuple[str, float], float] = {}

    @property
    def steps(self) -> int:
        """Total number of steps recorded."""
        return sum(int(count) for _, _, count in self.history)

    def step(self, sample_rate: float, noise_multiplier: float, num_steps: int = 1) -> None:
        """Records ``num_steps`` Poisson-subsampled Gaussian steps.

        Args:
            sample_rate: Poisson inclusion probability q of each example in each step, in [0, 1].
            noise_multiplier: noise std divided by the clipping norm, sigma >= 0 (0 means no privacy).
            num_steps: how many such steps were taken (0 records nothing).
        """
        q = _check_sample_rate(sample_rate)
        sigma = _check_noise_multiplier(noise_multiplier)
        n = _check_count(num_steps, "num_steps", 0)
        if n == 0:
            return
        if self.history and self.history[-1][0] == q and self.history[-1][1] == sigma:
            self.history[-1][2] = int(self.history[-1][2]) + n
        else:
            self.history.append([q, sigma, n])

    def _history_key(self) -> tuple[tuple[float | int, ...], ...]:
        return tuple(tuple(phase) for phase in self.history)

    def _cached(self, kind: str, value: float, compute: Callable[[], float]) -> float:
        key = self._history_key()
        if key != self._cache_history:
            self._cache_history, self._cache = key, {}
        if (kind, value) not in self._cache:
            self._cache[(kind, value)] = compute()
        return self._cache[(kind, value)]

    def _leaks_without_noise(self) -> bool:
        # An example included (q > 0) in a step with no noise is released exactly: no finite epsilon holds for
        # any delta < q. dp-accounting agrees (inf / delta 1); answering directly saves building a PLD.
        return any(q > 0.0 and sigma == 0.0 for q, sigma, _ in self.history)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at the given delta.

        Args:
            delta: target delta, in (0, 1).

        Returns:
            The smallest epsilon the accountant certifies; 0.0 if no step was taken, ``math.inf`` if some step
            used noise_multiplier 0 with a positive sample rate.
        """
        delta = _check_delta(delta)
        if not self.history:
            return 0.0
        if self._leaks_without_noise():
            return math.inf

        def compute() -> float:
            with _quiet_rdp_orders():
                return float(_make_accountant(self.mechanism).compose(_make_event(self.history)).get_epsilon(delta))

        return self._cached("epsilon", delta, compute)

    def delta(self, epsilon: float) -> float:
        """Delta spent so far at the given epsilon.

        Args:
            epsilon: target epsilon, finite and >= 0.

        Returns:
            The smallest delta the accountant certifies; 0.0 if no step was taken, 1.0 if some step used
            noise_multiplier 0 with a positive sample rate.
        """
        eps = float(epsilon)
        if not (0.0 <= eps < math.inf):
            raise ValueError(f"epsilon must be finite and >= 0, got {epsilon!r}.")
        if not self.history:
            return 0.0
        if self._leaks_without_noise():
            return 1.0

        def compute() -> float:
            return float(_make_accountant(self.mechanism).compose(_make_event(self.history)).get_delta(eps))

        return self._cached("delta", eps, compute)

    def state_dict(self) -> dict[str, Any]:
        """The accountant's state as plain Python types (JSON- and torch.save-friendly).

        Returns:
            ``{"mechanism": str, "history": [[q, sigma, count], ...]}``.
        """
        return {"mechanism": self.mechanism, "history": [[float(q), float(s), int(c)] for q, s, c in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a state produced by :meth:`state_dict` (mechanism included), replacing the current one.

        Args:
            state_dict: a dict with keys ``"mechanism"`` and ``"history"``.
        """
        missing = {"mechanism", "history"} - set(state_dict)
        if missing:
            raise KeyError(
                f"PrivacyAccountant state_dict is missing {sorted(missing)}; got keys {sorted(state_dict)}. "
                "Pass a dict produced by PrivacyAccountant.state_dict()."
            )
        mechanism = _check_mechanism(state_dict["mechanism"])
        restored = PrivacyAccountant(mechanism)
        for phase in state_dict["history"]:
            if len(phase) != 3:
                raise ValueError(f"each history entry must be [sample_rate, noise_multiplier, count], got {phase!r}.")
            restored.step(phase[0], phase[1], phase[2])
        self.mechanism, self.history = mechanism, restored.history
        self._cache_history, self._cache = (), {}

    def __repr__(self) -> str:
        return f"PrivacyAccountant(mechanism={self.mechanism!r}, steps={self.steps}, phases={len(self.history)})"


def compute_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, mechanism: str = "pld"
) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps.

    Args:
        noise_multiplier: noise std divided by the clipping norm, >= 0.
        sample_rate: Poisson inclusion probability q, in [0, 1].
        steps: number of steps, >= 0.
        delta: target delta, in (0, 1).
        mechanism: ``"pld"`` or ``"rdp"``.

    Returns:
        The epsilon certified by dp-accounting (0.0 for 0 steps, inf for sigma 0 with q > 0).
    """
    accountant = PrivacyAccountant(mechanism)
    accountant.step(sample_rate, noise_multiplier, steps)
    return accountant.epsilon(delta)


def _find_bracket(
    epsilon_of: Callable[[float], float], target_epsilon: float, guess: float, factor: float
) -> tuple[float, float]:
    """Geometric search from ``guess`` for sigma_lo < sigma_hi with eps(sigma_lo) > target >= eps(sigma_hi).

    Epsilon decreases monotonically in sigma, so one walk in the right direction finds the bracket.
    """
    sigma = guess
    if epsilon_of(sigma) > target_epsilon:
        while True:
            upper = sigma * factor
            if upper > _SIGMA_CEILING:
                raise RuntimeError(
                    f"no noise_multiplier <= {_SIGMA_CEILING:g} reaches target_epsilon={target_epsilon!r}; "
                    "the target is unreachably small for this delta. Raise target_epsilon or target_delta."
                )
            if epsilon_of(upper) <= target_epsilon:
                return sigma, upper
            sigma = upper
    while True:
        lower = sigma / factor
        if lower < _SIGMA_FLOOR:
            raise ValueError(
                f"target_epsilon={target_epsilon!r} is met even with noise_multiplier {sigma:g}; this calibration "
                f"does not search below {_SIGMA_FLOOR:g}. Such a target gives no meaningful privacy: lower it, or "
                "pass noise_multiplier directly."
            )
        if epsilon_of(lower) > target_epsilon:
            return lower, sigma
        sigma = lower


@functools.lru_cache(maxsize=64)  # a pure function of its arguments; dp-accounting takes ~0.1-1 s per call
def calibrate_noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    mechanism: str = "pld",
    tol: float = 1e-4,
) -> float:
    """The smallest noise multiplier whose epsilon after ``steps`` steps is at most ``target_epsilon``.

    The root is found by ``dp_accounting.calibrate_dp_mechanism`` (Brent's method, with a fallback bisection
    that guarantees the returned value meets the target). Because PLD is slow at small sigma, the bracket is
    first located with the (fast, looser) RDP accountant and only then refined with the requested one.

    Args:
        target_epsilon: privacy budget epsilon, > 0.
        target_delta: privacy budget delta, in (0, 1).
        sample_rate: Poisson inclusion probability q, in (0, 1].
        steps: number of training steps, >= 1.
        mechanism: ``"pld"`` (default) or ``"rdp"``.
        tol: absolute tolerance on sigma; the result is within ``tol`` above the exact threshold.

    Returns:
        sigma with ``compute_epsilon(sigma, sample_rate, steps, target_delta, mechanism) <= target_epsilon``.
    """
    eps_target = float(target_epsilon)
    if not (0.0 < eps_target < math.inf):
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}; it must also be finite.")
    delta = _check_delta(target_delta, "target_delta")
    q = _check_sample_rate(sample_rate, allow_zero=False)
    steps = _check_count(steps, "steps", 1)
    mechanism = _check_mechanism(mechanism)
    if not (float(tol) > 0.0):
        raise ValueError(f"tol must be > 0, got {tol!r}.")

    def make_event(sigma: float) -> dp_accounting.DpEvent:
        return _make_event([(q, sigma, steps)])

    def epsilon_of(sigma: float, mech: str) -> float:
        return compute_epsilon(sigma, q, steps, delta, mech)

    # RDP bracket: factor 2 from sigma = 1, each evaluation ~10-60 ms at any sigma.
    lo, hi = _find_bracket(lambda s: epsilon_of(s, "rdp"), eps_target, 1.0, 2.0)
    if mechanism == "pld":
        # PLD is tighter, so its threshold is usually a little below RDP's (about 0.94x at q=0.08, T=2500,
        # eps 8). Walk from RDP's upper end in small steps so PLD is never evaluated far below the answer.
        lo, hi = _find_bracket(lambda s: epsilon_of(s, "pld"), eps_target, hi, 1.25)

    try:
        with _quiet_rdp_orders():
            sigma = dp_accounting.calibrate_dp_mechanism(
                lambda: _make_accountant(mechanism),
                make_event,
                eps_target,
                delta,
                bracket_interval=mechanism_calibration.ExplicitBracketInterval(lo, hi),
                tol=float(tol),
            )
    except (ValueError, mechanism_calibration.NoBracketIntervalFoundError) as err:
        raise RuntimeError(
            f"dp_accounting.calibrate_dp_mechanism failed for target_epsilon={eps_target}, target_delta={delta}, "
            f"sample_rate={q}, steps={steps}, mechanism={mechanism!r} in the bracket [{lo}, {hi}]: {err}"
        ) from err

    sigma = float(sigma)
    achieved = epsilon_of(sigma, mechanism)
    if not achieved <= eps_target:
        raise RuntimeError(
            f"calibrated noise_multiplier {sigma} gives epsilon {achieved} > target_epsilon {eps_target} "
            f"(sample_rate={q}, steps={steps}, delta={delta}, mechanism={mechanism!r}). This should not happen; "
            "please report it, and meanwhile pass a slightly larger noise_multiplier directly."
        )
    return sigma


def steps_for_epochs(epochs: float, sample_rate: float) -> int:
    """Number of Poisson steps that make ``epochs`` passes over the data in expectation.

    Args:
        epochs: number of epochs, > 0.
        sample_rate: Poisson inclusion probability q, in (0, 1].

    Returns:
        ``ceil(epochs / q)`` (with a small slack so that e.g. 60 / (256/60000) is not rounded up by float error).
    """
    e = float(epochs)
    if not (0.0 < e < math.inf):
        raise ValueError(f"epochs must be finite and > 0, got {epochs!r}.")
    q = _check_sample_rate(sample_rate, allow_zero=False)
    ratio = e / q
    # e / q can land a few ulps above an exact integer (e.g. 3 / 0.1 = 30.000000000000004); don't add a step for it.
    nearest = round(ratio)
    if abs(ratio - nearest) <= 1e-9 * max(1.0, ratio):
        return int(nearest)
    return math.ceil(ratio)
