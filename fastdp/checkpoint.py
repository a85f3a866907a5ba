"""Training checkpoints written atomically.

A checkpoint is written to a temporary file in the destination's directory, flushed and fsync'ed, then renamed
over the destination (``os.replace`` is atomic on POSIX and Windows): a run killed mid-write leaves the previous
checkpoint intact, never a truncated one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (anything torch.save takes) to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (on the CPU; callers move what they restore)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; pass the file a previous run wrote (its --out-dir/last.pt)")
    # the checkpoint holds generator states and plain Python containers next to tensors: not weights-only
    return torch.load(path, map_location="cpu", weights_only=False)
