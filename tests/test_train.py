"""fastdp-train: the main job, its outputs (what they publish, who can read them), exact resume, the epsilon stop,
the stop on non-finite gradients, refused checkpoints and one-line errors."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest
import torch
from conftest import write_payload

import fastdp.optim
import fastdp.trainer
from fastdp.accounting import compute_epsilon
from fastdp.checkpoint import load_checkpoint, save_checkpoint
from fastdp.presets import PRESETS
from fastdp.train import build_parser, main

QUICK = ["--no-progress", "--threads", "2"]
#: what metrics.jsonl may hold by default: covered by epsilon (computed from the released parameters) or public
PUBLIC_FIELDS = {"step", "lr", "seconds", "epsilon", "test_accuracy", "ema_test_accuracy"}
#: functions of the private batch without noise, logged only with --log-private-stats
PRIVATE_FIELDS = {"batch", "loss", "train_accuracy"}
RUN_FILES = ("metrics.jsonl", "summary.json", "curves.png", "last.pt")


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_short_run_learns_within_the_privacy_target(tmp_path):
    summary = main(["--epochs", "3", "--epsilon", "4", "--out-dir", str(tmp_path), *QUICK])
    assert summary["finished"] and summary["epsilon"] <= 4.0
    assert summary["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    # what the run leaves behind
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, summary["steps"] + 1))
    assert records[-1]["test_accuracy"] == summary["test_accuracy"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_checkpoint(tmp_path / "last.pt")["step"] == summary["steps"]


def _final(run_dir):
    state = load_checkpoint(run_dir / "last.pt")
    return state["model"], state["ema"]["shadow"], state["records"]


def test_resumed_run_ends_with_the_parameters_of_an_uninterrupted_one(tmp_path):
    # augmentation, augmult, EMA, momentum, a cosine schedule and checkpoints mid-run: every piece of state counts
    args = [
        "--steps", "6", "--batch-size", "64", "--augmult", "2", "--crop-padding", "1", "--ema-decay", "0.9",
        "--momentum", "0.5", "--lr-schedule", "cosine", "--max-physical-batch", "48", "--checkpoint-every", "2",
        "--noise-multiplier", "1.0", "--epsilon", "50", "--accountant", "rdp", "--eval-every", "3",
        "--log-private-stats",  # kept on resume: the resumed records have them too
        "--no-autotune",  # timed plans can differ between the two processes; their rounding would differ too
        "--secret-seed", "3",  # both runs draw the same samples and noise (by default each draws its own secret)
        *QUICK,
    ]  # fmt: skip
    main([*args, "--out-dir", str(tmp_path / "straight")])
    main([*args, "--out-dir", str(tmp_path / "split"), "--stop-at-step", "3"])
    assert load_checkpoint(tmp_path / "split" / "last.pt")["step"] == 3
    summary = main(["--resume", str(tmp_path / "split"), *QUICK])
    assert summary["finished"] and summary["step"] == 6
    (model_a, ema_a, rec_a), (model_b, ema_b, rec_b) = _final(tmp_path / "straight"), _final(tmp_path / "split")
    for name in model_a:
        assert torch.equal(model_a[name], model_b[name]), name
    for name in ema_a:
        assert torch.equal(ema_a[name], ema_b[name]), name
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in rec_a]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in rec_b]


def test_training_stops_before_it_would_exceed_the_target_epsilon(tmp_path, capsys):
    sigma, eps = 2.0, 2.0  # about 20 steps fit; 10 epochs plan 56
    args = ["--noise-multiplier", str(sigma), "--epsilon", str(eps), "--epochs", "10", "--out-dir", str(tmp_path)]
    summary = main([*args, *QUICK])
    q = 256 / summary["train_examples"]
    assert summary["steps"] < summary["planned_steps"]
    assert summary["epsilon"] <= eps
    # one step more would have exceeded the target (checked with dp-accounting directly)
    assert compute_epsilon(sigma, q, summary["steps"] + 1, 1e-5) > eps
    assert "would exceed epsilon" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, words",
    [
        (["--noise-multiplier", "0.5", "--epsilon", "0.5"], "even one step"),
        (["--preset", "no-such-preset"], "unknown preset"),
        (["--epsilon", "0"], "--epsilon must be > 0"),
        (["--batch-size", "100000"], "larger than the training set"),
        (["--delta", "0.5"], "is not below 1/N"),  # PLD calibration ran for minutes at such a delta
        (["--model", "no-such-model"], "no-such-model"),
        (["--dataset", "cifar10", "--data-root", "/nonexistent/fastdp-data"], "/nonexistent/fastdp-data"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--augmult", "0"], "--"),
        (["--resume", "/nonexistent/run"], "no checkpoint"),
        (["--backend", "cuda"] if not torch.cuda.is_available() else ["--backend", "gpu"], "backend"),
        (["--max-nonfinite-steps", "-1"], "--max-nonfinite-steps must be >= 0"),
    ],
)
def test_bad_input_is_a_one_line_error(args, words, tmp_path):
    with pytest.raises(SystemExit) as e:
        main([*args, "--out-dir", str(tmp_path), *QUICK])
    # no traceback: one line saying what is wrong (a missing dataset adds lines saying where to put it)
    message = str(e.value)
    assert message.startswith("fastdp-train: ") and words in message.splitlines()[0]


def test_resume_refuses_to_change_what_the_run_computes(tmp_path):
    main(["--steps", "2", "--noise-multiplier", "1", "--out-dir", str(tmp_path), *QUICK])
    with pytest.raises(SystemExit) as e:
        main(["--resume", str(tmp_path), "--lr", "0.1", *QUICK])
    assert "cannot change lr" in str(e.value)


def test_list_presets_names_every_preset_and_its_target(capsys):
    assert main(["--list-presets"]) is None
    out = capsys.readouterr().out
    for name, cfg in PRESETS.items():
        assert name in out and cfg.target in out


def test_sampling_and_noise_are_secret_by_default(tmp_path):
    # the same --seed twice: without --secret-seed each run draws its own sampling and noise seed from OS entropy
    args = ["--steps", "2", "--noise-multiplier", "1", "--epsilon", "50", "--no-autotune", *QUICK]
    main([*args, "--out-dir", str(tmp_path / "a")])
    main([*args, "--out-dir", str(tmp_path / "b")])
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert not torch.equal(a["sampler"]["generator_state"], b["sampler"]["generator_state"])
    assert a["optimizer"]["noise"]["seed"] != b["optimizer"]["noise"]["seed"]
    assert any(not torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_empty_poisson_batches_are_noise_only_steps(tmp_path):
    # expected batch 1 of 1437 examples: a step draws no example with probability (1 - 1/1437)^1437 = 0.37 and must
    # still step (and be accounted). A fixed secret seed makes the draw deterministic: with a fresh one, 6 steps had
    # no empty batch with probability 0.63^6 = 6% (seen once in CI); this seed's 6 steps have both kinds.
    summary = main(["--steps", "6", "--batch-size", "1", "--noise-multiplier", "1", "--epsilon", "50", "--out-dir",
                    str(tmp_path), "--secret-seed", "1", "--log-private-stats", *QUICK])  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["finished"] and summary["step"] == 6
    assert any(r["batch"] == 0 for r in records) and any(r["batch"] > 0 for r in records)
    assert load_checkpoint(tmp_path / "last.pt")["optimizer"]["accountant"] is not None


def test_backend_is_a_run_option(tmp_path):
    summary = main(["--steps", "2", "--backend", "torch", "--out-dir", str(tmp_path), *QUICK])
    assert summary["finished"]
    assert load_checkpoint(tmp_path / "last.pt")["config"]["backend"] == "torch"
    with pytest.raises(SystemExit) as e:  # the backend decides the noise stream and the plan: it stays on resume
        main(["--resume", str(tmp_path), "--backend", "cpp", *QUICK])
    assert "cannot change backend" in str(e.value)


# ---------------------------------------------------------------------------------------------- what the files publish
def test_run_files_publish_only_what_epsilon_covers_and_only_to_their_owner(tmp_path, capsys):
    run_dir = tmp_path / "run"  # created by the run
    # with the progress bar (no --no-progress)
    args = ["--steps", "4", "--eval-every", "2", "--ema-decay", "0.9", "--no-autotune", "--threads", "2"]
    summary = main([*args, "--out-dir", str(run_dir)])
    records = _records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {"step", "lr", "seconds"} <= set(r) <= PUBLIC_FIELDS, r
    assert "nonfinite_examples" not in summary
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    bar = capsys.readouterr().err
    assert "eps=" in bar and "loss=" not in bar and "acc=" not in bar
    # private like the checkpoint (mkstemp: 0600), in a directory only its owner can list
    assert _mode(run_dir) == 0o700
    for name in RUN_FILES:
        assert _mode(run_dir / name) == 0o600, name


def test_log_private_stats_logs_the_batch_statistics_and_is_kept_on_resume(tmp_path, capsys):
    args = ["--steps", "4", "--noise-multiplier", "1", "--epsilon", "50", "--no-autotune", "--threads", "2"]
    main([*args, "--log-private-stats", "--stop-at-step", "2", "--out-dir", str(tmp_path)])
    (tmp_path / "metrics.jsonl").chmod(0o644)  # as an older fastdp left it: the resumed run makes it private
    summary = main(["--resume", str(tmp_path), "--threads", "2"])  # the flag is not given again
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:  # expected batch 256 of 1437: never empty
        assert PRIVATE_FIELDS <= set(r), r
        assert r["batch"] > 0 and r["loss"] > 0 and 0 <= r["train_accuracy"] <= 1
    assert summary["nonfinite_examples"] == 0
    assert "loss=" in capsys.readouterr().err
    for name in RUN_FILES:
        assert _mode(tmp_path / name) == 0o600, name


def test_the_new_options_say_what_they_do_and_their_default():
    text = " ".join(build_parser().format_help().split())
    assert "--log-private-stats" in text and "epsilon does NOT cover them" in text and "(default: off)" in text
    assert "--max-nonfinite-steps" in text and "0 never stops (default: 10)" in text


# ---------------------------------------------------------------------------------------------- refused checkpoints
@pytest.mark.parametrize("extra", [["--optimizer", "adam", "--amp", "bf16", "--clipping", "automatic"]])
def test_checkpoints_load_weights_only(tmp_path, extra):
    # the resume tests cover SGD with momentum, EMA, a cosine schedule and the sampler; this adds Adam's step tensors
    main(["--steps", "2", "--no-autotune", "--out-dir", str(tmp_path), *extra, *QUICK])
    state = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 2 and state["optimizer"]["optimizer"]["state"]


def test_resume_of_a_checkpoint_with_a_pickle_payload_is_refused_and_runs_nothing(tmp_path):
    ckpt, marker = tmp_path / "last.pt", tmp_path / "pwned"
    write_payload(ckpt, marker)
    proc = subprocess.run(
        [sys.executable, "-m", "fastdp.train", "--resume", str(ckpt), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"fastdp-train: {ckpt} is not a fastdp checkpoint, or it was tampered"
    )
    assert not marker.exists()


def test_resume_of_another_programs_checkpoint_is_a_one_line_error(tmp_path):
    save_checkpoint(tmp_path / "last.pt", {"state_dict": {"w": torch.zeros(2)}, "epoch": 3})
    with pytest.raises(SystemExit) as e:
        main(["--resume", str(tmp_path), *QUICK])
    assert str(e.value).startswith(f"fastdp-train: {tmp_path / 'last.pt'} is not a fastdp-train checkpoint (it has no")


# ---------------------------------------------------------------------------------------------- non-finite gradients
def _poison_training_rows(monkeypatch, rows: slice) -> None:
    """Make ``rows`` of every training chunk NaN after normalisation (evaluation runs under no_grad and stays clean)."""
    real = fastdp.trainer.normalize

    def normalize(x, mean, std):
        out = real(x, mean, std)
        if torch.is_grad_enabled():
            out[rows] = float("nan")
        return out

    monkeypatch.setattr(fastdp.trainer, "normalize", normalize)


NONFINITE = ["--noise-multiplier", "1", "--epsilon", "50", "--no-autotune", "--secret-seed", "5", *QUICK]


@pytest.mark.filterwarnings("ignore:fastdp. step .* non-finite gradient")
def test_a_run_of_noise_only_steps_stops_with_a_checkpoint_and_resumes(tmp_path, monkeypatch):
    _poison_training_rows(monkeypatch, slice(None))  # every example, every step
    args = ["--steps", "10", "--max-nonfinite-steps", "3", "--out-dir", str(tmp_path), *NONFINITE]
    with pytest.raises(SystemExit) as e:
        main(args)
    ckpt = tmp_path / "last.pt"
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("fastdp-train: stopped at step 3: every example of the last 3 logical batches had a ")
    assert f"fastdp-train --resume {ckpt} --max-nonfinite-steps 0" in message
    assert load_checkpoint(ckpt)["step"] == 3  # nothing lost
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert not summary["finished"] and summary["step"] == 3
    # the streak is in the checkpoint: 2 more such steps reach 5 in a row, as without the interruption
    with pytest.raises(SystemExit, match="stopped at step 5: every example of the last 5"):
        main(["--resume", str(tmp_path), "--max-nonfinite-steps", "5", *QUICK])
    summary = main(["--resume", str(tmp_path), "--max-nonfinite-steps", "0", *QUICK])  # 0: never stop
    assert summary["finished"] and summary["step"] == 10


@pytest.mark.filterwarnings("ignore:fastdp. step .* non-finite gradient")
def test_a_diverging_run_stops(tmp_path):
    # lr 1e30: after one step the logits overflow, every gradient is NaN and every following step is noise only
    with pytest.raises(SystemExit) as e:
        main(["--steps", "20", "--lr", "1e30", "--max-nonfinite-steps", "2", "--out-dir", str(tmp_path), *NONFINITE])
    step = load_checkpoint(tmp_path / "last.pt")["step"]
    assert step < 20 and str(e.value).startswith(f"fastdp-train: stopped at step {step}: every example of the last 2")


@pytest.mark.filterwarnings("ignore:fastdp. step .* non-finite gradient")
def test_a_batch_with_some_finite_gradients_is_not_a_noise_only_step(tmp_path, monkeypatch):
    _poison_training_rows(monkeypatch, slice(0, 1))  # one example per chunk
    summary = main(["--steps", "3", "--max-nonfinite-steps", "1", "--log-private-stats", "--out-dir", str(tmp_path),
                    *NONFINITE])  # fmt: skip
    assert summary["finished"] and summary["nonfinite_examples"] >= 3


def test_the_run_is_collected_before_the_process_exits(tmp_path, monkeypatch):
    """The optimizer sits in reference cycles (the engine's hooks) and, under torchrun, holds the process group:
    fastdp-train collects it before returning, not the interpreter's teardown (where gloo can abort the process).
    The collector is off here, so only fastdp-train's own collection can free it."""
    import gc
    import weakref

    made = []
    init = fastdp.optim.DPOptimizer.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(fastdp.optim.DPOptimizer, "__init__", recording)
    gc.collect()
    gc.disable()
    try:
        main(["--steps", "1", "--eval-every", "1", "--out-dir", str(tmp_path), *QUICK])
        assert made and all(ref() is None for ref in made), "the run's optimizer outlives fastdp-train's main"
    finally:
        gc.enable()


def test_every_generator_of_a_step_draws_from_the_secret_seed():
    """Sampling, noise, augmentation and dropout all come from the secret seed (none from --seed): augmentations
    drawn in batch order from a known seed would let the removal of one example change every later example's views
    (a review's finding). Sampling and noise are the same on every rank, augmentation and dropout differ per rank;
    the streams are independent of each other."""
    from fastdp.trainer import _seeds

    a, b = _seeds(1), _seeds(2)
    assert _seeds(1) == a and all(a[k] != b[k] for k in a)
    assert len(set(a.values())) == 4
    other_rank = _seeds(1, rank=1)
    assert (other_rank["sampler"], other_rank["noise"]) == (a["sampler"], a["noise"])
    assert other_rank["augment"] != a["augment"] and other_rank["torch"] != a["torch"]
