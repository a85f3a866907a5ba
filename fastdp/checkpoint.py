"""Training checkpoints written atomically and read without running code.

A checkpoint is written to a temporary file in the destination's directory (``tempfile.mkstemp``: readable by its
owner only, 0600), flushed and fsync'ed, then renamed over the destination (``os.replace`` is atomic on POSIX and
Windows): a run killed mid-write leaves the previous checkpoint intact, never a truncated one. A process killed
outright (SIGKILL) can leave the temporary behind: :func:`remove_temporaries` deletes them. With
``keep_previous=True`` the checkpoint being replaced stays as ``<name>.prev.pt`` (a hard link, so ``last.pt`` never
goes missing), and :func:`load_latest_checkpoint` falls back to it when the newest is damaged (a copy cut short, a
disk that lost the last write): a torn checkpoint never loses the run.

A checkpoint holds only tensors, numbers, strings, None and plain containers (dict, list, tuple), so that it loads
with ``torch.load(..., weights_only=True)``: unpickling a file can run any code the file names, and ``--resume``
must not run a payload someone put into a ``last.pt``. :func:`save_checkpoint` refuses anything else before it
writes, :func:`load_checkpoint` refuses a file that holds anything else.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: what a checkpoint may hold: all of it loads under weights_only=True in every torch fastdp supports
_PLAIN = (type(None), bool, int, float, str, torch.Tensor, nn.Parameter)
_CONTAINERS = (dict, OrderedDict, list, tuple)


class CheckpointError(ValueError):
    """A file that is not a checkpoint fastdp wrote, or was damaged or altered; nothing in it was run."""


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError naming the first entry of ``value`` that weights-only loading would refuse."""
    kind = type(value)
    if kind in _PLAIN:
        return
    if kind not in _CONTAINERS:
        raise TypeError(
            f"checkpoint entry {where} is a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only="
            "True) refuses; store tensors, numbers, strings, None and dicts, lists or tuples of them (convert it "
            "with int(), float(), .tolist() or a state_dict())"
        )
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        if isinstance(value, dict):
            _check_plain(key, f"{where} (a key)")
        _check_plain(item, f"{where}[{key!r}]")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], keep_previous: bool = False) -> Path:
    """Write ``state`` to ``path`` atomically, readable by its owner only; returns the path.

    Args:
        path: the checkpoint file; its directory is created (0700) if missing.
        state: tensors, numbers, strings, None and dicts, lists or tuples of them.
        keep_previous: keep the checkpoint it replaces as :func:`previous_path` (``last.prev.pt``).

    Raises:
        TypeError: ``state`` holds anything else (the message names the entry); nothing is written.
    """
    _check_plain(state, "state")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.is_file():
            _keep(path, previous_path(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def previous_path(path: str | os.PathLike) -> Path:
    """Where ``save_checkpoint(path, ..., keep_previous=True)`` keeps the checkpoint it replaces: last.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _keep(path: Path, previous: Path) -> None:
    """``previous`` becomes ``path``'s current content, atomically, while ``path`` stays in place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{previous.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(path, tmp)  # no copy: the same inode, which the os.replace of the new checkpoint unlinks from path
        except OSError:  # a file system without hard links
            shutil.copyfile(path, tmp)
        os.replace(tmp, previous)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete what :func:`save_checkpoint` leaves in ``folder`` when its process is killed mid-write (call it where
    no other process writes checkpoints, e.g. under the run folder's lock); returns the names deleted."""
    removed = []
    for tmp in Path(folder).glob(".*.pt.*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp.name)
    return removed


def _what_torch_refused(e: Exception) -> str:
    """The part of torch.load's error that says what is wrong with the file; not its advice to load it anyway."""
    text = str(e)
    found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\.? Please use|\n\n|$)", text, re.DOTALL)
    if found and found.group(1).strip():
        return found.group(1).strip()
    first = text.strip().splitlines()[0].split(". ")[0] if text.strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (on the CPU; callers move what they restore).

    The file is loaded with ``weights_only=True``: it may hold only tensors, numbers, strings and plain containers,
    and no code in it runs.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file holds other objects (a pickle payload, or a checkpoint of another program) or is
            not a readable torch file (truncated, corrupted).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; pass the file a previous run wrote (its --out-dir/last.pt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise
    # UnpicklingError: a global outside the allowed set (a payload, another program's objects) or bytes that are no
    # pickle; the others: not a torch zip archive, or a truncated one (IndexError: short bytes that torch takes for
    # a legacy pickle, whose unpickler then pops an empty stack)
    except (pickle.UnpicklingError, RuntimeError, KeyError, IndexError, EOFError, ValueError, OSError) as e:
        # not chained: torch's message goes on to advise loading the file with weights_only=False
        raise CheckpointError(
            f"{path} is not a fastdp checkpoint, or it was tampered with or damaged ({_what_torch_refused(e)}): it "
            "was refused and nothing in it ran; resume only from a complete last.pt that fastdp wrote"
        ) from None


def load_latest_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], Path, str | None]:
    """:func:`load_checkpoint` of ``path``, or of the previous checkpoint kept next to it when ``path`` is missing or
    damaged. Returns (state, the file read, None or a note saying why the previous one was read).

    Raises:
        FileNotFoundError, CheckpointError: as :func:`load_checkpoint` for ``path``, when no previous one loads.
    """
    path = Path(path)
    try:
        return load_checkpoint(path), path, None
    except (FileNotFoundError, CheckpointError) as e:
        previous = previous_path(path)
        if not previous.is_file():
            raise
        try:
            state = load_checkpoint(previous)
        except CheckpointError:
            raise e from None
        why = "is missing" if isinstance(e, FileNotFoundError) else "is damaged"
        return state, previous, f"{path} {why}; resuming from the previous checkpoint {previous}"
