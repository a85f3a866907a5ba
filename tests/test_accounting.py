"""fastdp.accounting against dp-accounting called directly (the oracle), plus calibration and validation."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fastdp import accounting
from fastdp.accounting import PrivacyAccountant, calibrate_noise_multiplier, compute_epsilon, steps_for_epochs

MECHANISMS = ["pld", "rdp"]


def direct_accountant(mechanism: str) -> dp_accounting.PrivacyAccountant:
    """dp-accounting's own accountant with its defaults (the oracle)."""
    return pld.PLDAccountant() if mechanism == "pld" else rdp.RdpAccountant()


def direct_event(phases: list[tuple[float, float, int]]) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), count
            )
            for q, sigma, count in phases
        ]
    )


def direct_epsilon(mechanism: str, phases: list[tuple[float, float, int]], delta: float) -> float:
    return direct_accountant(mechanism).compose(direct_event(phases)).get_epsilon(delta)


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize(
    "phases",
    [
        [(0.01, 2.0, 100)],
        [(4096 / 50000, 3.0, 2500)],  # De et al. CIFAR-10 setting
        [(0.5, 8.0, 7)],
        [(0.01, 2.5, 50), (0.02, 2.0, 30)],  # two phases: schedule change mid-run
    ],
)
def test_epsilon_matches_dp_accounting(mechanism: str, phases: list[tuple[float, float, int]]) -> None:
    acc = PrivacyAccountant(mechanism)
    for q, sigma, count in phases:
        acc.step(q, sigma, count)
    for delta in (1e-5, 1e-3):
        # Same event, same accountant settings: the numbers must be identical, not merely close.
        assert acc.epsilon(delta) == direct_epsilon(mechanism, phases, delta)
    eps = acc.epsilon(1e-5)
    expected_delta = direct_accountant(mechanism).compose(direct_event(phases)).get_delta(eps)
    assert acc.delta(eps) == expected_delta
    assert acc.steps == sum(c for _, _, c in phases)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_history_is_compressed_and_order_kept(mechanism: str) -> None:
    acc = PrivacyAccountant(mechanism)
    for _ in range(20):
        acc.step(0.02, 2.5)
    acc.step(0.02, 2.5, num_steps=5)
    acc.step(0.05, 2.5, num_steps=3)
    acc.step(0.02, 2.5, num_steps=0)  # no-op, must not open a phase
    acc.step(0.02, 2.5, num_steps=2)
    assert acc.history == [[0.02, 2.5, 25], [0.05, 2.5, 3], [0.02, 2.5, 2]]
    assert acc.steps == 30
    assert acc.epsilon(1e-5) == direct_epsilon(mechanism, [(0.02, 2.5, 25), (0.05, 2.5, 3), (0.02, 2.5, 2)], 1e-5)


def test_sanity_mnist_setting_matches_dp_accounting() -> None:
    # Abadi et al. MNIST: q = 256/60000, sigma = 1.1, 60 epochs, delta = 1e-5.
    q = 256 / 60000
    steps = steps_for_epochs(60, q)
    assert steps == math.ceil(60 * 60000 / 256)
    eps = {m: compute_epsilon(1.1, q, steps, 1e-5, m) for m in MECHANISMS}
    for m in MECHANISMS:
        assert eps[m] == direct_epsilon(m, [(q, 1.1, steps)], 1e-5)
    # PLD is the tight accountant: it may never report more than RDP does for the same run.
    assert 0 < eps["pld"] <= eps["rdp"]


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_no_noise_is_infinite_and_no_steps_is_free(mechanism: str) -> None:
    acc = PrivacyAccountant(mechanism)
    assert acc.epsilon(1e-5) == 0.0
    assert acc.delta(1.0) == 0.0
    assert acc.steps == 0

    acc.step(0.1, 2.0, 10)
    acc.step(0.1, 0.0, 1)
    assert acc.epsilon(1e-5) == math.inf
    assert acc.delta(10.0) == 1.0
    # The shortcut agrees with the library.
    assert direct_epsilon(mechanism, [(0.1, 2.0, 10), (0.1, 0.0, 1)], 1e-5) == math.inf

    # q = 0: nobody is sampled, so even sigma = 0 costs nothing (answered by dp-accounting).
    zero = PrivacyAccountant(mechanism)
    zero.step(0.0, 0.0, 5)
    assert zero.epsilon(1e-5) == 0.0


def test_epsilon_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = accounting._make_accountant
    monkeypatch.setattr(accounting, "_make_accountant", lambda m: calls.append(m) or real(m))
    acc = PrivacyAccountant()
    acc.step(0.01, 3.0, 100)
    first = acc.epsilon(1e-5)
    assert acc.epsilon(1e-5) == first and len(calls) == 1
    acc.epsilon(1e-6)
    assert len(calls) == 2
    acc.step(0.01, 3.0, 1)  # new history: recomputed, and larger
    assert acc.epsilon(1e-5) > first and len(calls) == 3


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_state_dict_round_trip(mechanism: str) -> None:
    acc = PrivacyAccountant(mechanism)
    acc.step(0.01, 2.5, 40)
    acc.step(0.03, 3.5, 10)
    state = json.loads(json.dumps(acc.state_dict()))  # plain python types only
    restored = PrivacyAccountant("rdp" if mechanism == "pld" else "pld")
    restored.step(0.5, 0.5, 3)  # replaced, not appended to
    restored.load_state_dict(state)
    assert restored.mechanism == mechanism
    assert restored.history == acc.history
    assert restored.steps == 50
    assert restored.epsilon(1e-5) == acc.epsilon(1e-5)


def test_load_state_dict_errors() -> None:
    acc = PrivacyAccountant()
    with pytest.raises(KeyError, match="missing"):
        acc.load_state_dict({"history": []})
    with pytest.raises(ValueError, match="mechanism must be one of"):
        acc.load_state_dict({"mechanism": "gdp", "history": []})
    with pytest.raises(ValueError, match="sample_rate"):
        acc.load_state_dict({"mechanism": "pld", "history": [[1.5, 1.0, 3]]})


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("target", [0.5, 1.0])
def test_calibrate_is_feasible_and_tight(mechanism: str, target: float) -> None:
    q, steps, delta = 0.02, 500, 1e-5
    sigma = calibrate_noise_multiplier(target, delta, q, steps, mechanism=mechanism)
    assert compute_epsilon(sigma, q, steps, delta, mechanism) <= target
    # Sigma is ~3.3 (target 0.5) and ~1.9 (target 1.0); bigger targets need smaller sigma, where PLD is slow.
    # Tightness: 2% less noise already overshoots (the tolerance on sigma is 1e-4 absolute).
    assert compute_epsilon(0.98 * sigma, q, steps, delta, mechanism) > target


def test_calibrate_pld_needs_less_noise_than_rdp() -> None:
    args = (0.5, 1e-5, 0.02, 500)
    assert calibrate_noise_multiplier(*args, mechanism="pld") <= calibrate_noise_multiplier(*args, mechanism="rdp")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_epsilon": 0.0}, "target_epsilon must be > 0, got 0.0"),
        ({"target_epsilon": -1.0}, "target_epsilon must be > 0"),
        ({"target_epsilon": math.inf}, "target_epsilon must be > 0"),
        ({"target_delta": 0.0}, "target_delta must be in \\(0, 1\\)"),
        ({"target_delta": 1.0}, "target_delta must be in \\(0, 1\\)"),
        ({"sample_rate": 0.0}, "sample_rate must be in \\(0, 1\\]"),
        ({"sample_rate": 1.5}, "sample_rate must be in \\(0, 1\\]"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"steps": 2.5}, "steps must be an integer >= 1"),
        ({"mechanism": "gdp"}, "mechanism must be one of"),
        ({"tol": 0.0}, "tol must be > 0"),
    ],
)
def test_calibrate_errors(kwargs: dict, match: str) -> None:
    args = {"target_epsilon": 2.0, "target_delta": 1e-5, "sample_rate": 0.01, "steps": 100} | kwargs
    with pytest.raises(ValueError, match=match):
        calibrate_noise_multiplier(**args)


def test_accountant_errors() -> None:
    with pytest.raises(ValueError, match="mechanism must be one of \\('pld', 'rdp'\\), got 'moments'"):
        PrivacyAccountant("moments")
    acc = PrivacyAccountant()
    for q in (-0.1, 1.1, math.nan):
        with pytest.raises(ValueError, match="sample_rate must be in \\[0, 1\\]"):
            acc.step(q, 1.0)
    for sigma in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="noise_multiplier must be finite and >= 0"):
            acc.step(0.1, sigma)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 0"):
        acc.step(0.1, 1.0, -1)
    assert acc.history == []  # nothing recorded by failed calls
    for delta in (0.0, 1.0, -1e-5):
        with pytest.raises(ValueError, match="delta must be in \\(0, 1\\)"):
            acc.epsilon(delta)
    with pytest.raises(ValueError, match="epsilon must be finite and >= 0"):
        acc.delta(-1.0)
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        compute_epsilon(1.0, 0.1, -3, 1e-5)


def test_steps_for_epochs() -> None:
    assert steps_for_epochs(1, 0.1) == 10
    assert steps_for_epochs(3, 0.1) == 30  # 3 / 0.1 = 30.000000000000004 in floats: no extra step
    assert steps_for_epochs(1, 0.3) == 4  # ceil(3.33)
    assert steps_for_epochs(875, 4096 / 50000) == math.ceil(875 * 50000 / 4096)
    assert steps_for_epochs(0.5, 1.0) == 1
    with pytest.raises(ValueError, match="epochs must be finite and > 0"):
        steps_for_epochs(0, 0.1)
    with pytest.raises(ValueError, match="sample_rate must be in \\(0, 1\\]"):
        steps_for_epochs(1, 0.0)
