"""Checkpoints are written atomically: a failed write leaves the previous checkpoint intact."""

from __future__ import annotations

import pytest
import torch

from fastdp.checkpoint import load_checkpoint, save_checkpoint


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")  # fails in the middle of torch.save


def test_round_trip(tmp_path):
    state = {"step": 3, "w": torch.randn(4), "rng": torch.get_rng_state()}
    save_checkpoint(tmp_path / "run" / "last.pt", state)
    got = load_checkpoint(tmp_path / "run" / "last.pt")
    assert got["step"] == 3 and torch.equal(got["w"], state["w"]) and torch.equal(got["rng"], state["rng"])


def test_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"step": 2, "bad": _Unpicklable()})
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_missing_checkpoint_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope.pt")
