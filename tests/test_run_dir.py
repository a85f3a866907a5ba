"""The run folder's lock: held by one process, named to the others, released when its holder ends."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fastdp import run_dir
from fastdp.run_dir import RunLock

pytestmark = pytest.mark.skipif(run_dir.fcntl is None, reason="no advisory locks on this platform")

TAKE = "import sys; from fastdp.run_dir import RunLock, RunDirBusy\ntry:\n    RunLock(sys.argv[1]).acquire()\n" \
    "except RunDirBusy as e:\n    print(e)\n    sys.exit(3)\n"  # fmt: skip


def test_the_lock_names_its_holder_to_another_process_and_is_released(tmp_path):
    folder = tmp_path / "run"
    assert run_dir.holder(folder) is None  # no folder yet
    with RunLock(folder):
        info = run_dir.holder(folder)
        assert info["pid"] == os.getpid() and info["host"]
        proc = subprocess.run([sys.executable, "-c", TAKE, str(folder)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 3 and f"is in use by process {os.getpid()} on " in proc.stdout, proc
    assert run_dir.holder(folder) is None
    proc = subprocess.run([sys.executable, "-c", TAKE, str(folder)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc  # its holder ended: the kernel released it
    assert run_dir.holder(folder) is None
    assert (folder.stat().st_mode & 0o777) == 0o700 and ((folder / ".lock").stat().st_mode & 0o777) == 0o600


def test_run_files_and_clear_run(tmp_path):
    for name in ("last.pt", "metrics.jsonl", "notes.txt"):
        (tmp_path / name).write_text("x")
    assert run_dir.run_files(tmp_path) == ["last.pt", "metrics.jsonl"]
    assert run_dir.clear_run(tmp_path) == ["last.pt", "metrics.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
