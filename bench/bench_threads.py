"""fastdp-train's digits job on a shared machine: its training time alone and with one core kept busy by another
process, for the old default (torch's two threads, OpenMP's default spinning wait) and the new one (``threads=1`` in
the digits preset; ``OMP_WAIT_POLICY=PASSIVE``, which fastdp-train sets before torch loads unless it is set).

Each configuration runs the same job (fixed seeds, ``--steps``, sigma given: no calibration) in a fresh process; the
time is ``summary.json``'s ``seconds`` (the training loop, without start-up). The busy core is a Python process
spinning for the whole run. Issue 14's target (item 1): with one core busy, at most 1.6x the time alone, and alone no
slower than the old default. The old default is the code before the change, exported with
``git archive 5a16fee | tar -x -C OLD`` (and fastdp/_C*.so copied into OLD/fastdp). Run (several minutes):

    python bench/bench_threads.py --old-src OLD --steps 60 --repeats 2

It prints one line per configuration (median of the repeats) and the load average: on a machine others share,
"alone" is not idle, so compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _job(src: str, steps: int, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        env["PYTHONPATH"] = src
        cmd = [sys.executable, "-m", "fastdp.train", "--no-progress", "--steps", str(steps), "--noise-multiplier",
               "1", "--epsilon", "50", "--secret-seed", "1", "--no-autotune", *extra,
               "--out-dir", os.path.join(tmp, "run")]  # fmt: skip
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(os.path.join(tmp, "run", "summary.json")) as f:
            return float(json.load(f)["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-src", help="an export of the code before the change (its default: 2 threads, spinning)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    configs = {
        "new default (1 thread, passive wait)": (HERE, []),
        "new, --threads 2 (passive wait)": (HERE, ["--threads", "2"]),
    }
    if args.old_src:
        configs = {"old default (2 threads, spinning wait)": (args.old_src, []), **configs}
    print(f"load average before: {os.getloadavg()}, {os.cpu_count()} CPUs", flush=True)
    for name, (src, extra) in configs.items():
        alone = statistics.median(_job(src, args.steps, extra) for _ in range(args.repeats))
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            loaded = statistics.median(_job(src, args.steps, extra) for _ in range(args.repeats))
        finally:
            busy.kill()
            busy.wait()
        print(f"{name:40s} alone {alone:5.1f} s, one core busy {loaded:5.1f} s, ratio {loaded / alone:.2f}", flush=True)
    print(f"load average after: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
