"""fastdp-train as a new user meets it, through the real entry point in a subprocess: --help, the checks up front,
interruptions, run folders, resume, secure noise and startup."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastdp.presets import PRESETS, TrainConfig
from fastdp.train import build_parser

QUICK = ["--no-progress", "--threads", "2", "--no-autotune"]
#: a short run whose sigma is given (no calibration) and whose sampling and noise are fixed
SHORT = ["--steps", "3", "--noise-multiplier", "1", "--epsilon", "50", "--secret-seed", "1", *QUICK]


def fastdp_train(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``python -m fastdp.train ARGS`` (the entry point fastdp-train calls), its output captured as text."""
    cmd = [sys.executable, "-m", "fastdp.train", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("fastdp-train: ")]


# ---------------------------------------------------------------------------------------------- --help
def test_every_option_has_a_description_its_default_and_its_choices():
    parser = build_parser()
    fields = {f"--{f.name.replace('_', '-')}": f for f in dataclasses.fields(TrainConfig)}
    for action in parser._actions:
        if action.dest == "help":
            continue
        flag = action.option_strings[0]
        text = " ".join((action.help or "").split())
        assert len(text) > 20, (flag, text)
        if action.nargs != 0:  # an option taking a value (flags say what they do)
            assert "(default: " in text, (flag, text)
        f = fields.get(flag)
        for choice in (f.metadata.get("choices") or ()) if f else ():
            assert choice in text, (flag, choice, text)
    # the real entry point prints it
    proc = fastdp_train("--help")
    assert proc.returncode == 0
    out = " ".join(proc.stdout.split())
    assert "--accountant NAME privacy accountant" in out and "one of: pld, rdp" in out
    assert "--amp NAME" in out and "one of: none, bf16" in out
    assert "--lr-schedule NAME" in out and "one of: constant, cosine" in out
    assert "--lr X learning rate (finite, >= 0) (default: 2.0)" in out


def test_the_choices_fastdp_train_checks_are_those_the_library_knows():
    # fastdp-train checks these without importing torch, from fastdp.presets: they must stay the library's
    from fastdp import presets
    from fastdp.accounting import MECHANISMS
    from fastdp.backends import KNOWN
    from fastdp.data import DATASETS
    from fastdp.models import IMAGE_MODEL_NAMES
    from fastdp.trainer import _OPTIMIZERS

    assert set(presets.DATASETS) == set(DATASETS)
    assert set(presets.MODELS) == set(IMAGE_MODEL_NAMES)
    assert set(presets.ACCOUNTANTS) == set(MECHANISMS)
    assert set(presets.BACKENDS) == {"auto", *KNOWN}
    assert set(presets.OPTIMIZERS) == set(_OPTIMIZERS)
    for cfg in PRESETS.values():  # every preset passes its own checks
        for name in ("dataset", "model", "accountant", "clipping", "backend", "optimizer", "lr_schedule", "amp"):
            choices = TrainConfig.__dataclass_fields__[name].metadata["choices"]
            assert getattr(cfg, name) in choices or cfg.model.startswith("wrn-"), (name, getattr(cfg, name))


# ---------------------------------------------------------------------------------------------- checks up front
def test_every_problem_is_reported_at_once_before_any_work(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    proc = fastdp_train(
        "--preset", "cifar10-smoothnet-eps7",  # a GPU preset (device cuda, no GPU here) whose data is missing
        "--data-root", tmp_path / "no-data",
        "--lr", "nan", "--epsilon", "0", "--batch-size", "lots", "--accountant", "moments", "--ema-decay", "1",
        "--out-dir", a_file, cwd=tmp_path,
    )  # fmt: skip
    lines = _error_lines(proc)
    expected = [
        "--lr must be a finite number >= 0, got nan",
        "--epsilon must be > 0 (a finite number), got 0.0",
        "--batch-size must be an integer, got 'lots'",
        "--accountant must be one of pld, rdp; got 'moments'",
        "--ema-decay must be in [0, 1), or none (no EMA), got 1.0",
        f"--out-dir {a_file} is a file",
        f"cifar10: missing dataset root folder: {tmp_path / 'no-data'}",
    ]
    if not _has_gpu():
        expected.append("--device cuda needs a GPU")
    for words in expected:
        assert any(words in line for line in lines), (words, proc.stderr)
    assert "pass --data-root DIR" in proc.stderr  # the missing dataset says how to point at it
    assert proc.stdout == ""  # nothing started
    assert a_file.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize(
    "args, line",
    [
        (["--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
        (["--lr", "inf"], "--lr must be a finite number >= 0, got inf"),
        (["--max-grad-norm", "-1"], "--max-grad-norm must be > 0 (a finite number), got -1.0"),
        (["--delta", "1"], "--delta must be in (0, 1), got 1.0"),
        (["--steps", "none", "--epochs", "none"], "give --steps or --epochs (both are none)"),
        (["--nesterov"], "--nesterov needs --momentum > 0"),
        (["--model", "resnet"], "--model must be one of digits_cnn"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_option_the_value_and_what_is_allowed(tmp_path, args, line):
    proc = fastdp_train(*args, "--out-dir", tmp_path / "run", *QUICK)
    (only,) = _error_lines(proc)
    assert only.startswith(f"fastdp-train: {line}") and proc.stderr.strip() == only
    assert not (tmp_path / "run").exists()  # no work, no folder


# ---------------------------------------------------------------------------------------------- interruptions
def _start(*args: str, cwd=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fastdp.train", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _lines(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


LONG = ["--steps", "100000", "--noise-multiplier", "1", "--epsilon", "1e6", "--accountant", "rdp", *QUICK]


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_training_writes_a_checkpoint_and_prints_the_resume_command(tmp_path, sig, status):
    run = tmp_path / "run"
    proc = _start(*LONG, "--out-dir", run)
    _wait_for(lambda: _lines(run / "metrics.jsonl") >= 2, proc)  # training (no periodic checkpoint: digits' default)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert "Traceback" not in err
    from fastdp.checkpoint import load_checkpoint

    step = load_checkpoint(run / "last.pt")["step"]
    assert step >= 2 and _lines(run / "metrics.jsonl") == step  # every logged step is in the checkpoint
    last = err.strip().splitlines()[-1]
    assert last == (
        f"fastdp-train: {sig.name}: stopped after step {step} of 100000 and wrote the checkpoint {run / 'last.pt'}; "
        f"continue with: fastdp-train --resume {run}"
    )
    proc = fastdp_train("--resume", run, "--stop-at-step", step + 1, *QUICK[:3])
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(run / "last.pt")["step"] == step + 1


def test_a_signal_before_the_first_step_exits_without_a_traceback(tmp_path):
    run = tmp_path / "run"
    proc = _start("--out-dir", run, *QUICK)  # the digits default: calibrates sigma first
    _wait_for(lambda: bool(proc.stdout.readline()), proc)  # "fastdp-train: digits run in ...; setting up"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        "fastdp-train: SIGINT before the first step; no checkpoint was written yet (nothing to resume): run the "
        "command again to start"
    )


def test_resume_of_a_finished_run_says_so_and_rewrites_nothing(tmp_path):
    run = tmp_path / "run"
    assert fastdp_train(*SHORT, "--out-dir", run).returncode == 0
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir()}
    proc = fastdp_train("--resume", run, *QUICK[:3])
    assert proc.returncode == 0, proc.stderr
    assert f"fastdp-train: the run in {run} is finished (step 3 of 3); nothing to do" in proc.stdout
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir()} == before


# ---------------------------------------------------------------------------------------------- run folders
def test_a_new_run_into_a_run_folder_is_refused_unless_asked_to_overwrite(tmp_path):
    run = tmp_path / "run"
    assert fastdp_train(*SHORT, "--out-dir", run).returncode == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    proc = fastdp_train(*SHORT, "--out-dir", run)
    (line,) = _error_lines(proc)
    assert line.startswith(f"fastdp-train: --out-dir {run} holds a run (last.pt, metrics.jsonl, summary.json, ")
    assert f"fastdp-train --resume {run}" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    proc = fastdp_train(*SHORT, "--steps", "2", "--out-dir", run, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert "--overwrite: deleted last.pt, metrics.jsonl, summary.json, curves.png" in proc.stdout
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_run_folder_in_use_is_refused_with_the_process_holding_it(tmp_path):
    from fastdp.run_dir import RunLock

    run = tmp_path / "run"
    assert fastdp_train(*SHORT, "--steps", "4", "--stop-at-step", "2", "--out-dir", run).returncode == 0
    with RunLock(run):  # this process holds it, as a running fastdp-train would
        for args in (["--resume", run], [*SHORT, "--out-dir", run, "--overwrite"]):
            (line,) = _error_lines(fastdp_train(*args))
            assert f"is in use by process {os.getpid()} on " in line, line
    assert fastdp_train("--resume", run, *QUICK[:3]).returncode == 0  # released


def test_a_moved_run_resumes_where_it_is_and_a_killed_write_leaves_nothing_behind(tmp_path):
    # a relative --out-dir, as the README's default runs/<preset>-<time> is: the checkpoint's config holds it
    assert fastdp_train(*SHORT, "--steps", "4", "--stop-at-step", "2", "--out-dir", "a", cwd=tmp_path).returncode == 0
    (tmp_path / "a").rename(tmp_path / "b")
    stale = tmp_path / "b" / ".last.pt.k1ll3d.tmp"  # what a checkpoint write killed by SIGKILL leaves
    stale.write_bytes(b"PK half a checkpoint")
    (line,) = _error_lines(fastdp_train("--resume", "b", "--out-dir", "c", *QUICK[:3], cwd=tmp_path))
    assert "a resumed run writes into the folder it is resumed from (b)" in line
    proc = fastdp_train("--resume", "b", *QUICK[:3], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists() and not stale.exists()
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["finished"] and summary["checkpoint"] == str(Path("b") / "last.pt")


def test_a_torn_checkpoint_resumes_from_the_previous_one(tmp_path):
    from fastdp.checkpoint import load_checkpoint

    run = tmp_path / "run"
    args = [*SHORT, "--steps", "5", "--checkpoint-every", "1"]
    assert fastdp_train(*args, "--stop-at-step", "3", "--out-dir", run).returncode == 0
    assert load_checkpoint(run / "last.prev.pt")["step"] == 2
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:1000])  # torn: a copy cut short
    proc = fastdp_train("--resume", run, *QUICK[:3])
    assert proc.returncode == 0, proc.stderr
    assert f"fastdp-train: {run / 'last.pt'} is damaged; resuming from the previous checkpoint" in proc.stderr
    assert load_checkpoint(run / "last.pt")["step"] == 5
    # both torn: one line, nothing run
    for name in ("last.pt", "last.prev.pt"):
        (run / name).write_bytes(b"PK\x03\x04 torn")
    (line,) = _error_lines(fastdp_train("--resume", run, *QUICK[:3]))
    assert line.startswith(f"fastdp-train: {run / 'last.pt'} is not a fastdp checkpoint, or it was tampered with")


def test_resume_of_a_run_killed_before_its_first_checkpoint_says_so(tmp_path):
    run = tmp_path / "run"
    assert fastdp_train(*SHORT, "--out-dir", run).returncode == 0
    (run / "last.pt").unlink()
    (line,) = _error_lines(fastdp_train("--resume", run, *QUICK[:3]))
    assert line.startswith(f"fastdp-train: --resume {run}: the run in {run} has no checkpoint: it ended before")
    assert f"fastdp-train --out-dir {run} --overwrite" in line


# ---------------------------------------------------------------------------------------------- resume cost
RESUME_WITHOUT_CALIBRATING = """
import sys
import fastdp.optim, fastdp.trainer

def calibrated(*args, **kwargs):
    raise AssertionError("sigma was calibrated again on --resume")

fastdp.optim.calibrate_noise_multiplier = calibrated
fastdp.trainer.steps_within_budget = calibrated
from fastdp.train import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("sigma", [[], ["--noise-multiplier", "1.5"]])
def test_resume_restores_sigma_and_the_steps_instead_of_calibrating_again(tmp_path, sigma):
    from fastdp.checkpoint import load_checkpoint

    run = tmp_path / "run"
    args = ["--steps", "4", "--stop-at-step", "2", "--epsilon", "20", *sigma, *QUICK, "--out-dir", run]
    assert fastdp_train(*args).returncode == 0
    saved = load_checkpoint(run / "last.pt")["optimizer"]["noise_multiplier"]
    cmd = [sys.executable, "-c", RESUME_WITHOUT_CALIBRATING, "--resume", str(run), *QUICK[:3]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["step"] == 4 and summary["noise_multiplier"] == saved


# ---------------------------------------------------------------------------------------------- secure noise
def test_secure_rng_draws_the_noise_from_os_entropy_and_is_kept_on_resume(tmp_path):
    from fastdp.checkpoint import load_checkpoint

    # the same seeds twice: with the seeded Philox stream the runs are equal, with OS entropy they are not
    args = [*SHORT, "--stop-at-step", "2"]  # not finished: its resume below is checked
    for name, extra in (("a", []), ("b", []), ("s1", ["--secure-rng"]), ("s2", ["--secure-rng"])):
        proc = fastdp_train(*args, *extra, "--out-dir", tmp_path / name)
        assert proc.returncode == 0, proc.stderr
    a, b, s1, s2 = (load_checkpoint(tmp_path / n / "last.pt") for n in ("a", "b", "s1", "s2"))
    assert all(a["model"][k].equal(b["model"][k]) for k in a["model"])
    assert not all(s1["model"][k].equal(s2["model"][k]) for k in s1["model"])
    assert s1["optimizer"]["noise"]["secure"] and not a["optimizer"]["noise"]["secure"]
    assert s1["config"]["secure_rng"] is True
    (line,) = _error_lines(fastdp_train("--resume", tmp_path / "s1", "--no-secure-rng", *QUICK[:3]))
    assert "cannot change secure_rng" in line


# ---------------------------------------------------------------------------------------------- startup
FIRST_LINE_BEFORE_TORCH = """
import importlib.abc, sys

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            print("TORCH IMPORTED", flush=True)
            sys.meta_path.remove(self)
        return None

sys.meta_path.insert(0, Watch())
from fastdp.train import main
main(sys.argv[1:])
"""


def test_the_command_line_checks_and_prints_its_first_line_before_importing_torch(tmp_path):
    # a bad invocation is refused without importing torch at all
    cmd = [sys.executable, "-c", FIRST_LINE_BEFORE_TORCH, "--lr", "nan", "--out-dir", str(tmp_path / "x")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "TORCH IMPORTED" not in proc.stdout, proc.stdout
    assert proc.stderr.strip() == "fastdp-train: --lr must be a finite number >= 0, got nan"
    # the digits job says what it does before torch loads (torch alone takes seconds to import)
    cmd = [sys.executable, "-c", FIRST_LINE_BEFORE_TORCH, "--out-dir", str(tmp_path / "run"), *QUICK]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first, second = proc.stdout.readline(), proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert first == f"fastdp-train: digits run in {tmp_path / 'run'}; setting up\n"
    assert second == "TORCH IMPORTED\n"
