"""bench/gpu_validate.sh cannot rot without a GPU: its shell passes ``bash -n`` (and shellcheck where installed), and
its dry run executes every Python stage (bench/gpu_validate.py: norms, step, noisy, smoke) on the CPU at tiny sizes,
through the script's own stage boxes and summary."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_validate.sh"


def test_script_is_valid_shell():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", "-S", "warning", str(SCRIPT)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


@pytest.mark.skipif(find_spec("triton") is None, reason="the dry run runs the kernels in Triton's interpreter")
def test_dry_run_runs_every_python_stage(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "STAGES", "BUDGET")}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable, TRITON_CACHE_DIR=str(tmp_path / "triton"))
    r = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert "DRY RUN" in summary and "targets:" in summary, summary
    for stage in ("norms", "step", "noisy", "sanitizer"):
        assert f"END {stage} rc=0" in out, out[-4000:]
    for stage, expected in (
        ("norms", "norm bf16 / wgrad bf16"),
        ("step", "non-private step"),
        ("noisy", "triton sgd / copy bandwidth"),
        ("smoke", "kernels with a bad result: 0"),
    ):
        results = json.loads((tmp_path / f"{stage}.json").read_text())
        assert results["dry_run"] is True
        assert any(expected in f"{x['what']}: {x['value']}" for x in results["results"]), (stage, results)
        assert f"{stage if stage != 'smoke' else 'sanitizer'}: RESULT" in summary, summary
    assert "BAD" not in (tmp_path / "log.txt").read_text()
