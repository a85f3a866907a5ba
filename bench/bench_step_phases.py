"""Where a DP step's time goes on the CPU: forward, backward (with the clip step at its end), the clip step alone and
the optimizer step, for fastdp's DPSGD against plain SGD on the same model and batch.

One process, 2 threads, the two providers taking turns phase by phase in every round (a rotating order), medians over
the rounds: a shared machine's drift moves both alike. The clip step is the engine's end-of-backward pass (norms, clip
factors, the clipped sums: fastdp.engine.engine.GradSampleEngine._finalize), timed by wrapping it for this run,
and split into its parts (``ClipParts``: the groups' copies, the norms taken there, the clipped sums).

Run: python bench/bench_step_phases.py MODEL [ROUNDS] [--no-memory-budget]
MODEL: wrn-16-4 (batch 32), vit-s (patch 4, 32x32, batch 32) or gpt-lm (untied, positions per example, sequence 128,
batch 16; the form bench/bench_transformer_step.py runs Opacus on).
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import fastdp
from fastdp.engine import engine as engine_module
from fastdp.engine.flat import Flat
from fastdp.models import build_model
from fastdp.rules.linear import LinearStack

THREADS = 2


def _model_and_batch(name: str):
    g = torch.Generator().manual_seed(1)
    if name == "gpt-lm":
        build = lambda: build_model("gpt-lm", 256, context=128, tie_embeddings=False, expand_positions=True)  # noqa: E731
        x, y = torch.randint(0, 256, (16, 128), generator=g), torch.randint(0, 256, (16 * 128,), generator=g)
        return build, x, y, lambda out: F.cross_entropy(out.flatten(0, 1), y)
    options = {"image_size": 32} if name.startswith("vit") else {}
    build = lambda: build_model(name, num_classes=10, in_channels=3, **options)  # noqa: E731
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    return build, x, y, lambda out: F.cross_entropy(out, y)


class ClipParts:
    """Seconds of the clip step's parts, summed since the last ``clear``: the groups formed (the stacks' copies of
    their layers' operands), the squared norms taken there (flat buffers, stacks, the rest: the ghost norms of
    book-keeping Linear layers are taken here, a conv's during its backward), and the whole step (the clipped sums
    are the remainder)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.steps: list[float] = []
        self._wrap(engine_module.GradSampleEngine, "_finalize", "clip step", record=True)
        self._wrap(engine_module.Flat, "gather", "grouping")
        self._wrap(engine_module, "gather_stacks", "grouping")
        self._wrap(engine_module, "grouped_sq_norms", "norms")
        self._wrap(Flat, "sq_norm", "norms")
        self._wrap(LinearStack, "sq_norm", "norms")

    def _wrap(self, owner, attr: str, part: str, record: bool = False) -> None:
        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            spent = time.perf_counter() - start
            self.seconds[part] = self.seconds.get(part, 0.0) + spent
            if record:
                self.steps.append(spent)
            return out

        setattr(owner, attr, staticmethod(timed) if isinstance(vars(owner).get(attr), staticmethod) else timed)

    def clear(self) -> None:
        self.seconds.clear()
        self.steps.clear()


def main(name: str, rounds: int = 10, memory_budget: bool = True) -> None:
    torch.set_num_threads(THREADS)
    build, x, y, loss_of = _model_and_batch(name)
    parts = ClipParts()
    runs = {}
    for provider in ("non-private", "fastdp"):
        torch.manual_seed(0)
        model = build()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if provider == "fastdp":
                extra = {} if memory_budget else {"memory_budget": None}
                opt = fastdp.DPSGD(model, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0,
                                   expected_batch_size=x.shape[0], seed=0, **extra)  # fmt: skip
            else:
                opt = torch.optim.SGD(model.parameters(), lr=0.1)
        runs[provider] = (model, opt)
    phases = {p: {"forward": [], "backward": [], "step": []} for p in runs}

    def step(provider: str) -> None:
        model, opt = runs[provider]
        t0 = time.perf_counter()
        loss = loss_of(model(x))
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        t3 = time.perf_counter()
        for k, v in zip(("forward", "backward", "step"), (t1 - t0, t2 - t1, t3 - t2), strict=True):
            phases[provider][k].append(v)

    for provider in runs:  # warm-up: the plan, the probe, first-touch allocations
        step(provider)
        step(provider)
    for v in phases.values():
        for t in v.values():
            t.clear()
    parts.clear()
    names = list(runs)
    for r in range(rounds):
        for provider in names[r % 2 :] + names[: r % 2]:
            step(provider)
    ms = {p: {k: statistics.median(t) * 1e3 for k, t in v.items()} for p, v in phases.items()}
    total = {p: sum(v.values()) for p, v in ms.items()}
    budget = "default memory budget" if memory_budget else "memory_budget=None"
    print(f"{name}, {rounds} rounds, {THREADS} threads, fastdp with the {budget}; medians in ms:")
    for p, v in ms.items():
        print(f"  {p:<12} " + "  ".join(f"{k} {t:7.1f}" for k, t in v.items()) + f"  sum {total[p]:7.1f}")
    print(f"  fastdp's clip step (inside its backward): {statistics.median(parts.steps) * 1e3:.1f}")
    mean = {k: v / rounds * 1e3 for k, v in parts.seconds.items()}
    sums = mean["clip step"] - mean.get("grouping", 0.0) - mean.get("norms", 0.0)
    print(f"    of it, mean per step: grouping (stack copies) {mean.get('grouping', 0.0):.1f}, norms "
          f"{mean.get('norms', 0.0):.1f}, clip factors and clipped sums {sums:.1f}")  # fmt: skip
    print(f"  sum of medians, fastdp / non-private: {total['fastdp'] / total['non-private']:.2f}x")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(args[0], int(args[1]) if len(args) > 1 else 10, memory_budget="--no-memory-budget" not in sys.argv)
