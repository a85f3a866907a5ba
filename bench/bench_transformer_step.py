"""Transformers' full training step on CPU, float32, 2 threads: the ViT (``vit-s``: ViT-S widths, patch 4, 32x32,
batch 32) and the GPT-style LM (``gpt-lm``: sequence 128, batch 16, next-token loss over every position).

Providers: non-private SGD, fastdp DPSGD (planned by autotuning), Opacus hooks (GradSampleModule + DPOptimizer) and
Opacus ghost clipping (PrivacyEngine.make_private with grad_sample_mode="ghost"). Every provider builds a fresh
model from the same seed and steps on the same random batch. A provider Opacus cannot run on a model is reported as
skipped with Opacus' own error. Targets (issue 13): fastdp at most 1.25x the non-private step and at least 1.5x
faster than the better Opacus mode. Times are never asserted: the summary at the end prints the ratios of this run,
first from per-provider blocks of rounds, then from interleaved rounds (one step of each provider per round, ratios
taken within the round, robust to the machine's speed drifting on a shared machine). Every provider steps in a
process of its own, with a heap of its own (bench/processes.py).

Run: python -m pytest bench/bench_transformer_step.py -q --benchmark-disable-gc -p no:cacheprovider
(``-k interleaved`` for the ratios alone; FASTDP_BENCH_ROUNDS sets the rounds, default 3; FASTDP_BENCH_PROGRESS names
a file each finished interleaved scenario is appended to, FASTDP_BENCH_SUMMARY one the final summary is written to).
A ViT-S step at batch 32 takes seconds on two idle cores: the whole file is several minutes idle, far more loaded.
"""

from __future__ import annotations

import os
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from interleaved import median_ratios, run_rounds
from processes import step_processes

ROUNDS = int(os.environ.get("FASTDP_BENCH_ROUNDS", "3"))
WARMUP_ROUNDS = 0  # build_step already ran one step (fastdp's planning, Opacus' first-step checks)
THREADS = 2
SEED = 0
LR = 0.1
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
PROVIDERS = ["non-private", "opacus", "opacus-ghost", "fastdp"]


class Skip(Exception):
    """The provider cannot run this model (the reason is the message)."""


@dataclass(frozen=True)
class Scenario:
    batch: int
    build: Callable[[], torch.nn.Module]
    data: Callable[[torch.Generator, int], tuple[torch.Tensor, torch.Tensor]]
    #: logits and targets -> (input, target) of a cross-entropy whose rows are tokens or examples
    flat: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _vit():
    from fastdp.models import build_model

    return build_model("vit-s", 10, image_size=32)


def _gpt(**kw):
    from fastdp.models import build_model

    return build_model("gpt-lm", 256, context=128, **kw)


def _gpt_data(g, n):
    return torch.randint(0, 256, (n, 128), generator=g), torch.randint(0, 256, (n, 128), generator=g)


def _tokens(out, y):
    return out.flatten(0, 1), y.flatten()


SCENARIOS = {
    "gpt-lm, sequence 128, batch 16": Scenario(16, _gpt, _gpt_data, _tokens),
    # the same LM in the form Opacus can run: untied output layer, positions with a batch dimension
    "gpt-lm untied, positions expanded": Scenario(
        16, lambda: _gpt(tie_embeddings=False, expand_positions=True), _gpt_data, _tokens
    ),
    "vit-s, patch 4, 32x32, batch 32": Scenario(
        32, _vit, lambda g, n: (torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)),
        lambda out, y: (out, y),
    ),
}  # fmt: skip


def build_step(scenario: Scenario, provider: str):
    """A fresh model, optimizer and batch for ``provider``; returns ``step()``, one full training step."""
    torch.set_num_threads(THREADS)
    g = torch.Generator().manual_seed(SEED + 1)
    x, y = scenario.data(g, scenario.batch)
    torch.manual_seed(SEED)
    model = scenario.build().train()

    def loss_of(out):
        return F.cross_entropy(*scenario.flat(out, y))

    if provider == "non-private":
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        forward = model
    elif provider == "fastdp":
        import fastdp

        opt = fastdp.DPSGD(
            model, lr=LR, noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
            expected_batch_size=scenario.batch, seed=SEED,
        )  # fmt: skip
        forward = model
    elif provider == "opacus":
        import opacus
        from opacus.optimizers import DPOptimizer

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                forward = opacus.GradSampleModule(model)
            opt = DPOptimizer(
                torch.optim.SGD(forward.parameters(), lr=LR), noise_multiplier=NOISE_MULTIPLIER,
                max_grad_norm=MAX_GRAD_NORM, expected_batch_size=scenario.batch,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - whatever Opacus raises is the answer
            raise Skip(f"Opacus hooks cannot wrap the model: {type(e).__name__}: {e}") from e
    elif provider == "opacus-ghost":
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                forward, opt, criterion, _ = PrivacyEngine().make_private(
                    module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                    data_loader=DataLoader(TensorDataset(x, y), batch_size=scenario.batch),
                    criterion=torch.nn.CrossEntropyLoss(), noise_multiplier=NOISE_MULTIPLIER,
                    max_grad_norm=MAX_GRAD_NORM, grad_sample_mode="ghost", poisson_sampling=False,
                )  # fmt: skip
        except Exception as e:  # noqa: BLE001
            raise Skip(f"Opacus ghost clipping cannot wrap the model: {type(e).__name__}: {e}") from e

        def loss_of(out):  # per-sequence losses: Opacus' criterion takes the logits' shape
            return criterion(*scenario.flat(out, y), shape=out.shape if out.dim() == 3 else None)
    else:
        raise ValueError(f"unknown provider {provider!r}; one of {PROVIDERS}")

    def step():
        loss_of(forward(x)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        step()  # Opacus may only fail in the first step (an unsupported layer's backward)
    except Exception as e:  # noqa: BLE001
        if provider.startswith("opacus"):
            raise Skip(f"{provider} fails in its first step: {type(e).__name__}: {str(e)[:300]}") from e
        raise
    return step


def build_named(scenario: str, provider: str):
    """``build_step`` by the scenario's name (what a step's own process is given: bench/processes.py)."""
    return build_step(SCENARIOS[scenario], provider)


def _progress(line: str) -> None:
    """Append a finished scenario's line to $FASTDP_BENCH_PROGRESS (a long run on a loaded machine keeps it)."""
    path = os.environ.get("FASTDP_BENCH_PROGRESS")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


@pytest.fixture(scope="module")
def results() -> dict:
    """scenario -> provider -> per-provider median, and scenario -> interleaved ratios; printed at the end."""
    out: dict = {"blocks": {}, "interleaved": {}, "skipped": {}}
    yield out
    la = os.getloadavg()
    lines = [f"transformer DP steps, float32, {THREADS} threads; load average at end {la[0]:.2f} {la[1]:.2f} "
             f"{la[2]:.2f} on {os.cpu_count()} CPUs"]  # fmt: skip
    for name in SCENARIOS:
        blocks = out["blocks"].get(name, {})
        base = blocks.get("non-private")
        opacus = [blocks[p] for p in ("opacus", "opacus-ghost") if p in blocks]
        best = min(opacus) if opacus else None
        lines.append(f"{name}:")
        for p, med in blocks.items():
            ratio = f"{med / base:.2f}x non-private" if base else ""
            vs = f", {best / med:.2f}x faster than the better Opacus mode" if best else ""
            lines.append(f"  {p:<13} {med * 1e3:9.1f} ms  {ratio}{vs}")
        for p, why in out["skipped"].get(name, {}).items():
            lines.append(f"  {p:<13} skipped: {why}")
        inter = out["interleaved"].get(name)
        if inter:
            lines.append(f"  interleaved ({ROUNDS} rounds): x non-private {inter['x_non_private']}, "
                         f"speedup vs better Opacus {inter.get('vs_best_opacus')}")  # fmt: skip
    text = "\n".join(lines)
    print("\n" + text)
    path = os.environ.get("FASTDP_BENCH_SUMMARY")
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_transformer_step(benchmark, scenario, provider, results):
    with step_processes({provider: (build_named, scenario, provider)}, skip=Skip) as (steps, skipped):
        if skipped:
            results["skipped"].setdefault(scenario, {}).update(skipped)
            pytest.skip(skipped[provider])
        benchmark.group = scenario
        benchmark.pedantic(steps[provider], rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
    median = statistics.median(benchmark.stats.stats.data)
    results["blocks"].setdefault(scenario, {})[provider] = median
    base = results["blocks"][scenario].get("non-private")
    benchmark.extra_info.update(
        threads=THREADS, batch=SCENARIOS[scenario].batch, loadavg_1min=round(os.getloadavg()[0], 2),
        samples_per_s=round(SCENARIOS[scenario].batch / median, 2),
        ratio_to_non_private=round(median / base, 3) if base else None,
    )  # fmt: skip


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_transformer_interleaved(benchmark, scenario, results):
    """Every provider in its own process (bench/processes.py), one step of each per round in a rotating order;
    ratios within each round."""
    builds = {p: (build_named, scenario, p) for p in PROVIDERS}
    with step_processes(builds, skip=Skip) as (steps, skipped):
        results["skipped"].setdefault(scenario, {}).update(skipped)
        times = run_rounds(benchmark, steps, ROUNDS, f"{scenario}, interleaved")
    out = {"x_non_private": {p: round(r, 2) for p, r in median_ratios(times, "non-private").items()}}
    opacus = [p for p in ("opacus", "opacus-ghost") if p in times]
    if opacus and "fastdp" in times:
        best = [min(times[p][r] for p in opacus) for r in range(ROUNDS)]
        out["vs_best_opacus"] = round(statistics.median(b / a for a, b in zip(times["fastdp"], best, strict=True)), 2)
    results["interleaved"][scenario] = out
    benchmark.extra_info.update(out)
    ms = {p: round(statistics.median(t) * 1e3, 1) for p, t in times.items()}
    skipped = {p: why for p, why in results["skipped"].get(scenario, {}).items()}
    _progress(f"{scenario}: median ms {ms}; {out}; load {os.getloadavg()[0]:.2f}; skipped {skipped}")
