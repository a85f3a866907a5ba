"""bench/processes.py, the benches' one-process-per-provider harness: steps run in the provider's own process, one
per call, its build's exceptions (a bench's Skip) come back as themselves, and a failing step is an error."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from processes import StepProcess, step_processes  # noqa: E402


class Skip(Exception):
    pass


def _counting_step(path: str):
    """A step that appends its process id to ``path``."""

    def step():
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")

    return step


def _with_info(path: str):
    """A step and its info: a value, and a callable read when asked (after the steps)."""
    step = _counting_step(path)
    return step, {"kind": "counting", "lines": lambda: len(open(path).read().split())}


def _skipping(reason: str):
    raise Skip(reason)


def _failing_after(n: int):
    calls = []

    def step():
        calls.append(1)
        if len(calls) > n:
            raise ZeroDivisionError("step failed")

    return step


def test_each_provider_steps_in_its_own_process(tmp_path):
    files = {p: str(tmp_path / p) for p in ("a", "b")}
    builds = {p: (_counting_step, f) for p, f in files.items()}
    with step_processes(builds, warmup=1) as (steps, skipped):
        assert skipped == {}
        for _ in range(3):
            steps["a"]()
        steps["b"]()
    pids = {p: open(f).read().split() for p, f in files.items()}
    assert len(pids["a"]) == 1 + 3 and len(pids["b"]) == 1 + 1  # the warm-up step, then one per call
    assert len(set(pids["a"])) == 1 and len(set(pids["b"])) == 1
    assert pids["a"][0] != pids["b"][0] != str(os.getpid())


def test_a_build_that_skips_is_reported_and_others_run(tmp_path):
    builds = {"ok": (_counting_step, str(tmp_path / "ok")), "no": (_skipping, "cannot run this model")}
    with step_processes(builds, skip=Skip) as (steps, skipped):
        assert list(steps) == ["ok"] and skipped == {"no": "cannot run this model"}
        steps["ok"]()


def test_a_failing_step_raises_in_the_bench():
    step = StepProcess(_failing_after, 1)
    step()
    with pytest.raises(ZeroDivisionError, match="step failed"):
        step()


def test_the_info_of_a_build_is_read_in_its_process_when_asked(tmp_path):
    path = str(tmp_path / "steps")
    step = StepProcess(_with_info, path, warmup=1)
    step()
    step()
    assert step.info() == {"kind": "counting", "lines": 3}
    step.close()
