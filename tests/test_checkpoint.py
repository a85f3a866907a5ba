"""Checkpoints are written atomically and privately, and read weights-only: a file with a pickle payload is refused
without running it."""

from __future__ import annotations

import stat
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Payload, write_payload

import fastdp.checkpoint
from fastdp.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_latest_checkpoint,
    previous_path,
    remove_temporaries,
    save_checkpoint,
)


def test_round_trip(tmp_path):
    state = {"step": 3, "w": torch.randn(4), "rng": torch.get_rng_state(), "plan": {"conv": ([2, 3], "torch.float32")}}
    state["model"] = OrderedDict(w=torch.nn.Parameter(torch.ones(2)))
    save_checkpoint(tmp_path / "run" / "last.pt", state)
    got = load_checkpoint(tmp_path / "run" / "last.pt")
    assert got["step"] == 3 and torch.equal(got["w"], state["w"]) and torch.equal(got["rng"], state["rng"])
    assert got["plan"] == state["plan"] and torch.equal(got["model"]["w"], state["model"]["w"])


def test_checkpoint_and_its_new_directory_are_private(tmp_path):
    path = save_checkpoint(tmp_path / "run" / "last.pt", {"step": 1})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})

    def full_disk(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fastdp.checkpoint.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"sampler": {"rate": np.float64(0.5)}}, "state['sampler']['rate']"),
        ({"records": [{"step": 1}, {"f": lambda: None}]}, "state['records'][1]['f']"),
        ({"config": {"out_dir": Path("runs/a")}}, "state['config']['out_dir']"),
        ({"payload": Payload("/nonexistent/marker")}, "state['payload']"),
    ],
)
def test_save_refuses_what_weights_only_loading_would_refuse(tmp_path, bad, where):
    # found when the checkpoint is written, not when a run is resumed from it days later
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises(TypeError, match="checkpoint entry " + where.replace("[", r"\[").replace("]", r"\]")):
        save_checkpoint(path, {"step": 2, **bad})
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_checkpoint_with_a_pickle_payload_is_refused_without_running_it(tmp_path):
    path, marker = tmp_path / "last.pt", tmp_path / "pwned"
    write_payload(path, marker)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert message.startswith(f"{path} is not a fastdp checkpoint, or it was tampered with")
    assert "exec" in message  # what the file refers to
    assert "weights_only=False" not in message  # torch's advice to load it anyway is not passed on
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"not a checkpoint at all\n" * 4, b"torn too", None])
def test_a_damaged_checkpoint_is_refused_with_its_path(tmp_path, content):
    path = tmp_path / "last.pt"
    if content is None:  # truncated
        save_checkpoint(path, {"step": 1, "w": torch.randn(1000)})
        content = path.read_bytes()[:-300]
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value).startswith(f"{path} is not a fastdp checkpoint, or it was tampered with or damaged (")


def test_missing_checkpoint_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope.pt")


def test_the_previous_checkpoint_is_kept_and_read_when_the_newest_is_torn(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1}, keep_previous=True)
    assert not previous_path(path).exists()  # nothing to keep yet
    save_checkpoint(path, {"step": 2}, keep_previous=True)
    save_checkpoint(path, {"step": 3}, keep_previous=True)
    assert load_checkpoint(previous_path(path))["step"] == 2 and load_checkpoint(path)["step"] == 3
    assert stat.S_IMODE(previous_path(path).stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]
    assert load_latest_checkpoint(path) == ({"step": 3}, path, None)
    path.write_bytes(path.read_bytes()[:100])  # torn
    state, read, note = load_latest_checkpoint(path)
    assert state == {"step": 2} and read == previous_path(path)
    assert note == f"{path} is damaged; resuming from the previous checkpoint {previous_path(path)}"
    previous_path(path).write_bytes(b"torn too")
    with pytest.raises(CheckpointError, match=f"^{path} is not a fastdp checkpoint"):  # the newest's error
        load_latest_checkpoint(path)


def test_a_failed_write_keeps_both_checkpoints(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1}, keep_previous=True)
    save_checkpoint(path, {"step": 2}, keep_previous=True)

    def full_disk(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fastdp.checkpoint.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"step": 3}, keep_previous=True)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 2 and load_checkpoint(previous_path(path))["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]


def test_remove_temporaries_deletes_what_a_killed_write_leaves(tmp_path):
    save_checkpoint(tmp_path / "last.pt", {"step": 1})
    for name in (".last.pt.abc123.tmp", ".last.prev.pt.x.tmp"):
        (tmp_path / name).write_bytes(b"PK half")
    (tmp_path / "notes.tmp").write_text("not ours")
    assert sorted(remove_temporaries(tmp_path)) == [".last.prev.pt.x.tmp", ".last.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.tmp"]
