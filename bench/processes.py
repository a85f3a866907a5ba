"""Each provider's training step in a process of its own, run from the bench's process one step at a time.

In one process the providers share a heap: a peer's step that allocates gigabytes (Opacus keeps a per-example
gradient of every parameter) leaves glibc's heap and its mmap threshold in a state the next provider's step pays
for, and which provider pays depends on the order. In processes of their own each provider keeps its own heap, as it
would in a real run; they still take turns step by step (bench/interleaved.py), so a shared machine's drift moves
all of them alike, and only one runs at a time (the others wait on their pipe, taking no CPU).

A process is started by ``spawn`` (a fork of a process whose OpenMP pool is running can deadlock) and builds its
step by calling ``build(*args)``, a module-level function of an importable module (the bench's own directory is on
the path the parent gives it). What ``build`` raises is raised again by the constructor here, so a bench's
``Skip`` reaches its ``except`` as if the step were built in-process.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any


def _serve(conn, build: Callable[..., Any], args: tuple, warmup: int) -> None:
    try:
        built = build(*args)
        step, info = built if isinstance(built, tuple) else (built, {})
        for _ in range(warmup):
            step()
    except BaseException as e:  # noqa: BLE001 - the parent re-raises it
        conn.send(("raised", _portable(e)))
        return
    conn.send(("ready", None))
    while (request := conn.recv()) is not None:
        try:
            if request == "info":  # read now: a plan is made by the first step
                conn.send(("done", {k: v() if callable(v) else v for k, v in info.items()}))
                continue
            step()
        except BaseException as e:  # noqa: BLE001
            conn.send(("raised", _portable(e)))
            return
        conn.send(("done", None))


def _portable(e: BaseException) -> BaseException:
    """``e`` if it survives pickling (the bench modules' own exceptions do), else a RuntimeError with its traceback."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError("".join(traceback.format_exception(e)))


class StepProcess:
    """One provider's step in its own process: calling the object runs one step there and returns when it is done.

    ``build(*args)`` returns the step, or ``(step, info)`` with ``info`` a dict whose values (or, for a callable, what
    it returns when asked) ``info()`` hands back.
    """

    def __init__(self, build: Callable[..., Any], *args: Any, warmup: int = 0) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, build, args, warmup), daemon=True)
        self._proc.start()
        child.close()
        self._answer()

    def __call__(self) -> None:
        self._conn.send("step")
        self._answer()

    def info(self) -> dict:
        self._conn.send("info")
        return self._answer()

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()

    def _answer(self) -> Any:
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self._proc.join(timeout=5)
            raise RuntimeError(f"the step's process exited with code {self._proc.exitcode} without answering") from None
        if kind == "raised":
            self.close()
            raise payload
        return payload


@contextmanager
def step_processes(builds: dict[str, tuple], warmup: int = 0, skip: type[BaseException] | tuple = ()):
    """``{provider: (build, *args)}`` -> ``(steps, skipped)``: a StepProcess per provider that could be built, and
    ``{provider: message}`` for those whose build raised one of ``skip``. Built one after another (a provider's
    planning times its layers on an otherwise idle machine); every process is closed on exit."""
    steps: dict[str, StepProcess] = {}
    skipped: dict[str, str] = {}
    try:
        for name, (build, *args) in builds.items():
            try:
                steps[name] = StepProcess(build, *args, warmup=warmup)
            except skip as e:
                skipped[name] = str(e)
        yield steps, skipped
    finally:
        for s in steps.values():
            s.close()
