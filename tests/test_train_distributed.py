"""fastdp-train under torchrun with 2 CPU processes (gloo): rank 0 alone writes, and a resumed run restores every
rank exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from fastdp.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

ARGS = [
    "--steps", "4", "--batch-size", "64", "--augmult", "2", "--crop-padding", "1", "--no-autotune",
    "--secret-seed", "3",
    "--noise-multiplier", "1.0", "--epsilon", "50", "--accountant", "rdp", "--eval-every", "2", "--no-progress",
    "--threads", "1", "--checkpoint-every", "1", "--dist-timeout", "60",
    "--log-private-stats",  # its statistics are added over the ranks (one all-reduce per step)
]  # fmt: skip


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastdp.train"]
    # a rank that aborts prints every thread's Python stack (where it was: a step, a collective, the teardown)
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def test_two_processes_train_and_resume_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    out = torchrun(*ARGS, "--out-dir", str(straight)).stdout
    assert out.count("fastdp-train digits:") == 1, "only rank 0 prints"
    assert "2 process(es)" in out
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["finished"] and summary["step"] == 4
    assert len((straight / "metrics.jsonl").read_text().splitlines()) == 4

    torchrun(*ARGS, "--out-dir", str(split), "--stop-at-step", "2")
    state = load_checkpoint(split / "last.pt")
    assert state["step"] == 2 and len(state["augment_rng"]) == 2  # every rank's augmentation stream
    torchrun("--resume", str(split), "--no-progress", "--threads", "1")
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(split / "last.pt")
    assert b["step"] == 4
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in a["records"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in b["records"]]
