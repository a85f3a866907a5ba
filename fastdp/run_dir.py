"""The run folder of ``fastdp-train``: one run per folder, written by one process at a time.

A folder holds a run when it has any of :data:`RUN_FILES`. A new run into such a folder is refused unless asked to
overwrite it (``--overwrite`` deletes those files first), and every run, new or resumed, holds the folder's lock
(:class:`RunLock`, an advisory ``flock`` on ``.lock``, released by the kernel when the process ends however it ends):
a second process is refused with the process id of the one holding it, so two runs never interleave their
``metrics.jsonl``. Standard library only: the command line checks the folder before it imports torch.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the run-files check still refuses a fresh run into a run
    fcntl = None

#: the files a fastdp-train run writes into its folder (last.prev.pt: the checkpoint before last.pt)
RUN_FILES = ("last.pt", "last.prev.pt", "metrics.jsonl", "summary.json", "curves.png")
LOCK_FILE = ".lock"


class RunDirBusy(Exception):
    """Another process holds the run folder's lock; the message names it."""


def run_files(folder: str | os.PathLike) -> list[str]:
    """The :data:`RUN_FILES` present in ``folder`` (none if it does not exist)."""
    folder = Path(folder)
    return [name for name in RUN_FILES if (folder / name).exists()]


def holder(folder: str | os.PathLike) -> dict | None:
    """Who holds the lock of ``folder`` (pid, host, started, command), or None when nobody does."""
    path = Path(folder) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def describe_holder(folder: str | os.PathLike, info: dict) -> str:
    pid, host = info.get("pid", "?"), info.get("host", "?")
    since = info.get("started", "?")
    stop = f"; to stop it: kill -INT {pid} (it writes a checkpoint)" if host == socket.gethostname() else ""
    return (
        f"the run folder {folder} is in use by process {pid} on {host} (started {since}: {info.get('command', '?')}); "
        f"wait for it to end or pass another --out-dir{stop}"
    )


class RunLock:
    """The run folder's lock, held from :meth:`acquire` until :meth:`release` (or the process's end).

    The folder is created (0700) if missing. ``.lock`` (0600) holds the holder's pid, host, start time and command
    for the message another process gets.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock; raises RunDirBusy naming the process that holds it."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if fcntl is None:
            return self
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_holder(fd)
            os.close(fd)
            raise RunDirBusy(describe_holder(self.folder, info)) from None
        info = {
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(["fastdp-train", *sys.argv[1:]])[:1000],
        }  # fmt: skip
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def clear_run(folder: str | os.PathLike) -> list[str]:
    """Delete the run files of ``folder`` (for ``--overwrite``, under the lock); returns their names."""
    removed = run_files(folder)
    for name in removed:
        (Path(folder) / name).unlink()
    return removed
