"""fastdp.audit: a correct build passes; each injected bug is flagged by the scenario built to catch it.

The bugs are injected by wrapping internals with monkeypatch, in the form a real regression would take. Every
bug test runs the same (scenario, backend, seed) rows that ``test_correct_build_passes`` shows to be ok without
the bug (the one-step rows are reproducible from the seed), so a flag can only come from the injected bug; the
Poisson rows use an unseeded sampler, and a correct build fails one with probability at most alpha = 1e-3.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastdp
import fastdp.audit
import fastdp.engine.engine
from fastdp.audit.__main__ import main
from fastdp.audit.checks import check
from fastdp.audit.scenarios import Samples
from fastdp.audit.stats import clopper_pearson_upper, epsilon_lower_bound, gaussian_mu, noise_std
from fastdp.data.poisson import PoissonSampler
from fastdp.engine import GradSampleEngine
from fastdp.fused_step import FusedStep
from fastdp.optim import DPOptimizer

BACKENDS = fastdp.available_backends()
SEED = 0


def audit(scenario: str, backend: str) -> fastdp.audit.Row:
    result = fastdp.audit.run(quick=True, backends=[backend], scenarios=[scenario], seed=SEED)
    return result.row(scenario, backend)


# ---------------------------------------------------------------------------------------------- injected bugs
def inject_half_noise(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The std handed to either step path is halved. Returns the set of paths that ran ("torch", "fused")."""
    torch_step, fused_call = DPOptimizer._torch_step, FusedStep.__call__
    ran = set()

    def torch_half(self, summed, std):
        ran.add("torch")
        torch_step(self, summed, std / 2)

    def fused_half(self, sums, noise_std, batch, seed, step):
        ran.add("fused")
        fused_call(self, sums, noise_std / 2, batch, seed, step)

    monkeypatch.setattr(DPOptimizer, "_torch_step", torch_half)
    monkeypatch.setattr(FusedStep, "__call__", fused_half)
    return ran


def inject_no_clipping(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's clip factors are all ones."""
    monkeypatch.setattr(
        fastdp.engine.engine, "get_clipping", lambda name, *bound: lambda norms, C, g: torch.ones_like(norms)
    )


def inject_noise_per_micro_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """N(0, (sigma C)^2) is added to the clipped sum after every micro-batch, besides the step's noise."""
    init, finalize = DPOptimizer.__init__, GradSampleEngine._finalize

    def init_with_std(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.engine.bug_std = self.noise_multiplier * self.max_grad_norm

    def noisy_finalize(self):
        finalize(self)
        for s in self.summed.values():
            s.add_(torch.randn_like(s), alpha=self.bug_std)

    monkeypatch.setattr(DPOptimizer, "__init__", init_with_std)
    monkeypatch.setattr(GradSampleEngine, "_finalize", noisy_finalize)


def inject_realised_batch_division(monkeypatch: pytest.MonkeyPatch) -> None:
    """The step divides by the number of examples of the logical batch (at least 1) instead of the expected size."""
    pop, torch_step, fused_call = GradSampleEngine.pop, DPOptimizer._torch_step, FusedStep.__call__
    realised = {}

    def counting_pop(self):
        summed, norms = pop(self)
        realised["n"] = max(1, norms.numel())
        return summed, norms

    def torch_step_realised(self, summed, std):
        expected, self.expected_batch_size = self.expected_batch_size, realised["n"]
        try:
            torch_step(self, summed, std)
        finally:
            self.expected_batch_size = expected

    monkeypatch.setattr(GradSampleEngine, "pop", counting_pop)
    monkeypatch.setattr(DPOptimizer, "_torch_step", torch_step_realised)
    monkeypatch.setattr(
        FusedStep,
        "__call__",
        lambda self, sums, noise_std, batch, seed, step: fused_call(self, sums, noise_std, realised["n"], seed, step),
    )


def inject_repeating_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    """PoissonSampler seeds itself with a constant instead of OS entropy: every run draws the same batches."""
    init = PoissonSampler.__init__

    def fixed_seed_init(
        self, num_samples, sample_rate=None, expected_batch_size=None, steps=None, generator=None, seed=None
    ):
        if generator is None and seed is None:
            seed = 1234
        init(self, num_samples, sample_rate, expected_batch_size, steps, generator, seed)

    monkeypatch.setattr(PoissonSampler, "__init__", fixed_seed_init)


# ---------------------------------------------------------------------------------------------- the audit
def test_correct_build_passes():
    rng_state = torch.get_rng_state()
    result = fastdp.audit.run(quick=True, seed=SEED)
    assert torch.equal(torch.get_rng_state(), rng_state), "the audit left the caller's torch RNG as it was"
    print(result.table())
    assert [(r.scenario, r.backend) for r in result.rows] == [
        (s, b) for s in fastdp.audit.SCENARIOS for b in BACKENDS
    ], "one row per scenario and backend"
    assert result.ok, result.table()
    for row in result.rows:
        assert row.samples >= 10_000
        if row.claimed_mu is not None:
            assert row.claimed_mu == pytest.approx(0.5)  # sigma = 2 in the one-step scenarios
        assert 0 < row.claimed_epsilon < 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_noise_is_a_violation(monkeypatch, backend):
    ran = inject_half_noise(monkeypatch)
    row = audit("one-step", backend)
    # the backend's own step path was audited: cpp, cuda and triton have a fused step for SGD
    assert ran == ({"torch"} if backend == "torch" else {"fused"})
    assert row.verdict == "VIOLATION", row
    # mu doubles: the interval lies far above the claimed 0.5 (it is about [0.99, 1.02])
    assert row.mu.lo > 1.5 * row.claimed_mu, row


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_clipping_is_a_violation(monkeypatch, backend):
    inject_no_clipping(monkeypatch)
    row = audit("one-step", backend)
    assert row.verdict == "VIOLATION", row
    # the canary's gradient has norm 4 C: mu about 4 * 0.5, and epsilon well above the claim
    assert row.mu.lo > 3 * row.claimed_mu, row
    assert row.epsilon.epsilon > row.claimed_epsilon + 1, row


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_per_micro_batch_is_a_mismatch(monkeypatch, backend):
    inject_noise_per_micro_batch(monkeypatch)
    row = audit("micro-batches", backend)
    assert not row.ok, row
    # 4 micro-batches: 5 sigma^2 of noise, mu = 0.5 / sqrt(5) = 0.22, and the noise estimate says why
    assert row.mu.hi < row.claimed_mu, row
    assert all(sd.lo > 2 * row.claimed_sd for sd in row.noise_sd), row


@pytest.mark.parametrize("backend", BACKENDS)
def test_division_by_realised_batch_size_is_flagged(monkeypatch, backend):
    inject_realised_batch_division(monkeypatch)
    row = audit("one-step", backend)
    assert row.verdict == "VIOLATION", row
    # world 0 has the population alone (32 of B = 160 examples): its scores have 5x the standard deviation,
    # and the heavy lower tail gives an epsilon bound far above the claim
    assert row.noise_sd[0].lo > 4 * row.claimed_sd, row
    assert row.epsilon.epsilon > row.claimed_epsilon + 2, row


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeating_sampler_is_a_violation(monkeypatch, backend):
    inject_repeating_sampler(monkeypatch)
    row = audit("poisson", backend)
    assert row.verdict == "VIOLATION", row
    assert row.epsilon.epsilon > row.claimed_epsilon, row


def test_cli_exits_0_on_a_correct_build():
    # the module entry point itself, in a fresh process (the in-process main() is tested under a bug below)
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "fastdp.audit", "--quick", "--scenario", "one-step", "--backend", BACKENDS[0]]
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1/1 rows ok" in done.stdout, done.stdout


def test_cli_exits_1_under_a_bug(monkeypatch, capsys):
    inject_half_noise(monkeypatch)
    assert main(["--quick", "--scenario", "one-step", "--backend", BACKENDS[0]]) == 1
    out = capsys.readouterr().out
    assert "VIOLATION" in out and "0/1 rows ok" in out, out


def test_unknown_scenario_or_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown scenario"):
        fastdp.audit.run(quick=True, scenarios=["one-stop"])
    with pytest.raises(ValueError, match="unknown backend"):
        fastdp.audit.run(quick=True, backends=["tpu"])


def test_non_finite_scores_are_a_mismatch():
    # an inf or NaN in an update is never what the claimed mechanism releases, whatever the other scores say
    rng = np.random.default_rng(7)
    x0, x1 = rng.normal(0, 2, 10_000), rng.normal(1, 2, 10_000)
    x0[3] = np.nan
    samples = Samples(x0, x1, claimed_epsilon=1.99, claimed_mu=0.5, noise_multiplier=2.0)
    row = check("one-step", "torch", samples, alpha=1e-3, delta=1e-5, white_box=True)
    assert row.verdict == "MISMATCH" and "1 non-finite" in row.reasons[0], row
    assert row.samples == 9_999


# ---------------------------------------------------------------------------------------------- the statistics
def test_clopper_pearson_known_values():
    # no successes in n trials: the bound is 1 - alpha^(1/n); all successes: 1
    assert clopper_pearson_upper(0, 100, 0.01) == pytest.approx(1 - 0.01 ** (1 / 100))
    assert clopper_pearson_upper(100, 100, 0.01) == 1.0


def test_statistics_on_exact_gaussians():
    # mu-GDP pairs with the mu, sd and epsilon the audit should recover, at a fixed seed
    rng = np.random.default_rng(5)
    n, sigma = 200_000, 2.0
    x0, x1 = rng.normal(0, sigma, n), rng.normal(1, sigma, n)
    mu = gaussian_mu(x0, x1, 1e-3)
    assert mu.lo < 1 / sigma < mu.hi and mu.hi - mu.lo < 0.03
    sd = noise_std(x0, 1e-3)
    assert sd.lo < sigma < sd.hi
    # mu = 0.5 is (1.99, 1e-5)-DP: the bound is below it, and far from 0 with this many samples
    eps = epsilon_lower_bound(x0, x1, 1e-5, 1e-3)
    assert 0.5 < eps.epsilon < 1.99
    # noise halved: mu = 1, (4.38, 1e-5)-DP; the bound exceeds the claim of mu = 0.5
    eps = epsilon_lower_bound(x0 / 2, x1 / 2 + 0.5, 1e-5, 1e-3)
    assert eps.epsilon > 1.99


def test_epsilon_bound_false_alarm_rate():
    # the bound is valid at its level: with equal worlds (epsilon = 0), P(bound > 0) <= alpha. 200 draws at
    # alpha = 0.05: at most 10 expected; 25 or more would have probability < 1e-4 under the binomial
    rng = np.random.default_rng(6)
    positive = sum(
        epsilon_lower_bound(rng.normal(size=2000), rng.normal(size=2000), 1e-5, 0.05).epsilon > 0 for _ in range(200)
    )
    assert positive < 25
