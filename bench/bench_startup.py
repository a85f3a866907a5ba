"""How soon fastdp-train answers: ``import fastdp.train``, and the first line of the digits job (the README's first
command), each in a fresh process from its start, wall-clock. The job is stopped with SIGTERM once it has printed.

The target of issue 14 (item 7) is the first line within 3 s. Times are never asserted; bench/RESULTS.md has the
figures and the load they were taken under. Run:

    python -m pytest bench/bench_startup.py -q -p no:cacheprovider --benchmark-columns=median,min,max,rounds
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

ROUNDS = 5


def _import_fastdp_train() -> None:
    subprocess.run([sys.executable, "-c", "import fastdp.train"], check=True, timeout=120)


def _first_line_of_the_digits_job() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fastdp.train", "--no-progress", "--out-dir", os.path.join(tmp, "run")]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            line = proc.stdout.readline()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=120)
        assert line.startswith("fastdp-train: digits run in"), line


@pytest.mark.parametrize("what", ["import fastdp.train", "first line of fastdp-train (digits)"])
def test_startup(benchmark, what):
    fn = _import_fastdp_train if what.startswith("import") else _first_line_of_the_digits_job
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(load_average=os.getloadavg(), cpus=os.cpu_count(), when=time.strftime("%F %T"))
