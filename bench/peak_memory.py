"""Peak CPU memory of one WRN-16-4 training step, per provider, measured in a fresh process.

torch has no allocator statistics on CPU, so the peak is read from the kernel: in a fresh subprocess the model,
optimizer and data are built, then

before every step VmRSS is read and the high-water mark (VmHWM) is reset by writing "5" to
/proc/self/clear_refs; after the step VmHWM is read. With rss0 = VmRSS right before the first step:

* ``peak_mb`` (what ``peak_step_memory`` returns): max over steps 2..steps of VmHWM - rss0, the steady-state
  step's peak over the state before training (it counts what the steps keep, such as optimizer buffers, and the
  step's transient peak, but not one-time work of the first step such as fastdp's per-layer autotuning);
* ``first_step_mb``: VmHWM - rss0 of the first step alone (with the one-time work);
* ``warm_mb``: max over steps 2..steps of VmHWM - VmRSS-right-before-that-step (transient only).

The subprocess runs with MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB so that glibc serves tensor buffers with mmap
and gives them back to the kernel on free (its default dynamic threshold would keep freed step buffers in the
heap and hide them in the next step's baseline). If clear_refs cannot be written, the HWM is not reset and
``hwm_reset`` is False in the result and the numbers are only valid if the HWM before the steps was below
their peaks.

The step builders live here (``build_step``) so that the benchmark and the memory probe run the same code.

Usage: ``python bench/peak_memory.py PROVIDER [STEPS]`` prints a JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROVIDERS = ("non-private", "fastdp", "fastdp-nobudget", "opacus", "opacus-ghost")
BATCH = 32
THREADS = 2
SEED = 0
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
LR = 0.1


class Skip(Exception):
    """The provider cannot run here (the reason is the message)."""


# ---------------------------------------------------------------------------------------------- step builders
def _data(seed: int = SEED):
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(BATCH, 3, 32, 32, generator=g, dtype=torch.float32)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    return x, y


def _model(seed: int = SEED):
    import torch

    from fastdp.models import wrn

    torch.manual_seed(seed)
    return wrn(16, 4, num_classes=10, ws=False)


def _fastdp_optimizer(model, memory_budget="auto"):
    import fastdp

    kwargs = dict(
        lr=LR, noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM, expected_batch_size=BATCH, seed=SEED,
        memory_budget=memory_budget,
    )  # fmt: skip
    return fastdp.DPSGD(model, **kwargs), "fastdp.DPSGD"


def plan_summary(opt) -> str:
    """The strategies the engine chose, layer by layer in forward order, e.g. 'keep x5, shifted_ghost x6'."""
    from collections import Counter

    counts = Counter(choice for _, choice in opt.engine.plans.values())
    return ", ".join(f"{k} x{n}" for k, n in counts.most_common())


def build_step(provider: str, seed: int = SEED, plan: dict | None = None):
    """Build the provider's model, optimizer and data; return (step, info). ``step()`` is one full training step.

    ``plan``: for fastdp providers, an engine ``plan_state()`` to load instead of planning on the first step.
    """
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(THREADS)
    x, y = _data(seed)
    model = _model(seed)
    model.train()
    info: dict = {"provider": provider}

    if provider == "non-private":
        opt = torch.optim.SGD(model.parameters(), lr=LR)

        def step():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    elif provider in ("fastdp", "fastdp-nobudget"):
        # "fastdp": the default plan (memory_budget="auto"); "fastdp-nobudget": the plan with no memory limit
        opt, api = _fastdp_optimizer(model, "auto" if provider == "fastdp" else None)
        info["fastdp_api"] = api
        info["plan"] = lambda: plan_summary(opt)
        info["plan_state"] = lambda: opt.engine.plan_state()
        if plan is not None:
            opt.engine.load_plan_state(plan)

        def step():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()

    elif provider == "opacus":
        import opacus
        from opacus.optimizers import DPOptimizer

        gsm = opacus.GradSampleModule(model)
        opt = DPOptimizer(
            torch.optim.SGD(gsm.parameters(), lr=LR),
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=MAX_GRAD_NORM,
            expected_batch_size=BATCH,
        )
        info["opacus_mode"] = "hooks (GradSampleModule + DPOptimizer)"

        def step():
            loss = F.cross_entropy(gsm(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    elif provider == "opacus-ghost":
        import warnings

        from torch.utils.data import DataLoader, TensorDataset

        try:
            from opacus import PrivacyEngine

            loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gsm, opt, criterion, _loader = PrivacyEngine().make_private(
                    module=model,
                    optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                    data_loader=loader,
                    criterion=torch.nn.CrossEntropyLoss(),
                    noise_multiplier=NOISE_MULTIPLIER,
                    max_grad_norm=MAX_GRAD_NORM,
                    grad_sample_mode="ghost",
                    poisson_sampling=False,
                )
        except Exception as e:  # noqa: BLE001
            raise Skip(f"opacus ghost clipping could not be set up: {type(e).__name__}: {e}") from e
        if opt.expected_batch_size != BATCH:
            raise Skip(f"opacus ghost: expected_batch_size {opt.expected_batch_size} != {BATCH}")
        info["opacus_mode"] = "ghost (PrivacyEngine.make_private + DPLossFastGradientClipping)"

        def step():
            loss = criterion(gsm(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    else:
        raise ValueError(f"unknown provider {provider!r}; one of {PROVIDERS}")
    return step, info


# ---------------------------------------------------------------------------------------------- /proc readers
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure(provider: str, steps: int) -> dict:
    import gc

    if steps < 2:
        raise ValueError("steps must be >= 2 (one first step, at least one steady-state step)")
    plan = os.environ.get("FASTDP_BENCH_PLAN")
    step, info = build_step(provider, plan=json.loads(plan) if plan else None)
    gc.collect()
    hwm_before = _status_kb("VmHWM")
    rss0 = _status_kb("VmRSS")
    reset = True
    hwm, rss_before = [], []
    for _ in range(steps):
        gc.collect()
        rss_before.append(_status_kb("VmRSS"))
        reset = _reset_hwm() and reset
        step()
        hwm.append(_status_kb("VmHWM"))
    return {
        **{k: v() if callable(v) else v for k, v in info.items() if k != "plan_state"},
        "steps": steps,
        "hwm_reset": reset,
        "rss_before_first_step_mb": rss0 / 1024,
        "hwm_before_first_step_mb": hwm_before / 1024,
        # primary: steady-state step peak over the RSS right before the first step (persistent state the steps
        # created, e.g. optimizer buffers and plans, plus the step's transient peak); excludes one-time work of
        # the first step (fastdp's autotuning, lazy initialisation)
        "peak_mb": (max(hwm[1:]) - rss0) / 1024,
        # the first step alone (includes the one-time work)
        "first_step_mb": (hwm[0] - rss0) / 1024,
        # transient only: steady-state step peak over the RSS right before that step
        "warm_mb": max(h - r for h, r in zip(hwm[1:], rss_before[1:], strict=True)) / 1024,
    }


# ---------------------------------------------------------------------------------------------- public API
def peak_step_memory_info(provider: str, steps: int = 3, timeout: float = 300.0, plan: dict | None = None) -> dict:
    """Run ``steps`` steps of ``provider`` in a fresh process; return the measurement dict (MB).

    ``plan``: a fastdp engine's ``plan_state()`` to use instead of autotuning in the subprocess, so that the
    memory measured is that of the plan timed elsewhere (this process' malloc settings change timings, and
    with them what autotuning would choose).
    """
    env = dict(os.environ)
    if plan is not None:
        env["FASTDP_BENCH_PLAN"] = json.dumps(plan)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("OMP_NUM_THREADS", str(THREADS))
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), provider, str(steps)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"peak_memory subprocess for {provider!r} failed (rc {proc.returncode}):\n{proc.stderr}")
    return json.loads(lines[-1])


def peak_step_memory(provider: str, steps: int = 3) -> float:
    """Peak RSS increase (MB) of ``steps`` training steps over the RSS right before the first one."""
    info = peak_step_memory_info(provider, steps)
    if "skip" in info:
        raise Skip(info["skip"])
    return info["peak_mb"]


if __name__ == "__main__":
    _provider = sys.argv[1]
    _steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    try:
        _out = _measure(_provider, _steps)
    except Skip as e:
        _out = {"provider": _provider, "skip": str(e)}
    print(json.dumps(_out))
