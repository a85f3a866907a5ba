"""Every paper preset runs end to end on CPU: two steps on a tiny stand-in of its dataset in the real layout.

The preset's own model is tested in test_models.py; here the CIFAR/ImageNet presets keep their recipe (augmult,
EMA, schedule, accountant, bf16 autocast) but train a WRN-10-1 or SmoothNet on a few 32x32 images, so that the
plumbing from preset to data layout to optimizer is exercised in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import WNIDS, write_cifar, write_folder

from fastdp.presets import PRESETS
from fastdp.train import main

SMALL = ["--steps", "2", "--device", "cpu", "--amp", "bf16", "--no-progress", "--threads", "2", "--eval-every", "1"]


@pytest.mark.parametrize("preset", [p for p in PRESETS if PRESETS[p].dataset != "digits"])
def test_preset_runs_two_steps_on_a_tiny_copy_of_its_dataset(preset, tmp_path):
    cfg = PRESETS[preset]
    root = tmp_path / "data"
    if cfg.dataset == "cifar10":
        write_cifar(root / "cifar-10-batches-py", sizes=(8, 8, 8, 8, 8, 6))
        batch = 8
    else:
        write_folder(root)
        batch = len(WNIDS)
    args = ["--preset", preset, "--data-root", str(root), "--batch-size", str(batch), "--max-physical-batch", "16"]
    args += ["--augmult", str(min(cfg.augmult, 2)), "--out-dir", str(tmp_path / "run")]
    if cfg.model != "smoothnet_v1":
        args += ["--model", "wrn-10-1"]
    if cfg.dataset != "cifar10":
        args += ["--image-size", "32"]
    if cfg.checkpoint:
        args += ["--checkpoint", "none"]
    summary = main([*args, *SMALL])
    assert summary["finished"] and summary["step"] == 2
    assert summary["epsilon"] <= cfg.epsilon
    assert (tmp_path / "run" / "curves.png").exists()
    if cfg.ema_decay is not None:
        assert summary["ema_test_accuracy"] is not None


def test_digits_vit_preset_trains_through_the_cli(tmp_path):
    """The ViT preset end to end through fastdp-train's entry point: its cls_token and pos_embed are split per example
    (a fallback warning would show in the output), a few steps on the embedded digits."""
    cmd = [sys.executable, "-m", "fastdp.train", "--preset", "digits-vit", "--steps", "3", "--no-progress",
           "--no-autotune", "--eval-every", "3", "--out-dir", str(tmp_path / "run")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vit-mini on digits" in proc.stdout
    assert "fallback" not in proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["step"] == 3 and summary["preset"] == "digits-vit"
    assert 0.0 <= summary["test_accuracy"] <= 1.0
