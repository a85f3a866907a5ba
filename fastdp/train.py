"""``fastdp-train``: differentially private training runs that reproduce the seed papers.

``fastdp-train`` alone trains a small CNN on scikit-learn's embedded digits (any machine, no download).
``fastdp-train --preset cifar10-wrn16-4-eps8`` and the other presets (``--list-presets``) follow the published
recipes on local copies of the datasets; every field of a preset can be overridden (``--lr 2``). The run writes
``metrics.jsonl``, ``summary.json``, ``curves.png`` and ``last.pt`` (a checkpoint ``--resume`` continues from,
bit-for-bit as if never interrupted) into its ``--out-dir``, all readable by their owner only.

This module is the command line: it parses and checks every argument (all problems of an invocation reported at
once, one line each, before any work) without importing torch; fastdp/trainer.py runs the training.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from fastdp import run_dir
from fastdp.presets import PRESETS, TrainConfig

#: config fields a resumed run may change (where and how it runs, not what it computes)
_RESUMABLE_CHANGES = (
    "device", "threads", "stop_at_step", "checkpoint_every", "eval_every", "dist_timeout", "max_nonfinite_steps",
)  # fmt: skip
#: what fastdp-train puts into last.pt (and reads back on --resume)
_CHECKPOINT_KEYS = (
    "version", "preset", "config", "step", "seconds", "model", "optimizer", "scheduler", "ema", "sampler",
    "augment_rng", "torch_rng", "records",
)  # fmt: skip
_DOC_FIELDS = ("target", "h100_hours", "notes")
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name not in _DOC_FIELDS}
_WRN = re.compile(r"^wrn-(\d+)-(\d+)$")


class UsageError(Exception):
    """Bad input: reported without a traceback, one line per problem (each ``args`` entry is one problem)."""


class NonFiniteStop(Exception):
    """The run stopped after --max-nonfinite-steps noise-only steps in a row (checkpoint and summary written).

    The message (empty on ranks other than 0, which print nothing) says why and how to resume; fastdp-train reports
    it as one line with exit status 1.
    """


class Interrupted(Exception):
    """A signal (SIGINT, SIGTERM) ended the run after a complete step; its checkpoint is written.

    Args: the signal's name, the step reached, the run's steps, the checkpoint (None on ranks other than 0).
    """


# ---------------------------------------------------------------------------------------------- checks
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


#: field -> (is the value allowed, what is allowed); None passes only where the text says "none"
_RULES: dict[str, tuple[Any, str]] = {
    "epsilon": (lambda v: _finite(v) and v > 0, "> 0 (a finite number)"),
    "delta": (lambda v: _finite(v) and 0 < v < 1, "in (0, 1)"),
    "noise_multiplier": (lambda v: v is None or (_finite(v) and v >= 0), "a finite number >= 0, or none (calibrated)"),
    "max_grad_norm": (lambda v: _finite(v) and v > 0, "> 0 (a finite number)"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "max_physical_batch": (lambda v: v >= 1, ">= 1"),
    "augmult": (lambda v: v >= 1, ">= 1"),
    "epochs": (lambda v: v is None or (_finite(v) and v > 0), "> 0 (a finite number), or none with --steps"),
    "steps": (lambda v: v is None or v >= 1, ">= 1, or none (from --epochs)"),
    "lr": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "momentum": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "weight_decay": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "warmup_steps": (lambda v: v >= 0, ">= 0"),
    "ema_decay": (lambda v: v is None or (_finite(v) and 0 <= v < 1), "in [0, 1), or none (no EMA)"),
    "crop_padding": (lambda v: v >= 0, ">= 0"),
    "seed": (lambda v: v >= 0, ">= 0"),
    "secret_seed": (lambda v: v is None or v >= 0, ">= 0, or none (OS entropy)"),
    "image_size": (lambda v: v is None or v >= 1, ">= 1, or none"),
    "threads": (lambda v: v is None or v >= 1, ">= 1, or none (torch's default)"),
    "eval_every": (lambda v: v >= 0, ">= 0 (0: ten evaluations per run)"),
    "checkpoint_every": (lambda v: v >= 0, ">= 0 (0: at the end only)"),
    "dist_timeout": (lambda v: _finite(v) and v > 0, "> 0 seconds"),
    "stop_at_step": (lambda v: v is None or v >= 1, ">= 1, or none"),
    "max_nonfinite_steps": (lambda v: v >= 0, ">= 0 (0: never stop)"),
}


def _convert(name: str, text: str) -> Any:
    """The value of option ``name`` given as ``text``; ValueError (saying what is allowed) if it is not one."""
    kind = _FIELDS[name].type
    if "None" in kind and text.strip().lower() == "none":
        return None
    if kind.startswith("int"):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{_flag(name)} must be an integer, got {text!r}") from None
    if kind.startswith("float"):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{_flag(name)} must be a number, got {text!r}") from None
    return text


def _device_problem(device: str) -> str | None:
    if device == "cpu":
        return None
    if not re.fullmatch(r"cuda(:\d+)?", device):
        return f"--device must be cpu, cuda or cuda:<index>, got {device!r}"
    import torch  # only for a GPU device

    if not torch.cuda.is_available():
        return f"--device {device} needs a GPU, but this torch ({torch.__version__}) sees none; pass --device cpu"
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        return f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0 ..)"
    return None


def _backend_problem(backend: str) -> str | None:
    from fastdp.backends import resolve_backend  # imports torch: only for an explicit backend

    try:
        resolve_backend(backend)
    except ValueError as e:  # resolve_backend's documented refusal: unknown, or not available here (and why)
        return f"--backend {backend}: {e}"
    return None


def _dataset_problem(cfg: TrainConfig) -> str | None:
    """The missing or misplaced dataset's message, checked without loading it (digits ships with scikit-learn)."""
    if cfg.dataset == "digits":
        return None
    from fastdp.data import DatasetNotFound
    from fastdp.data.datasets import check_dataset

    try:
        check_dataset(cfg.dataset, cfg.data_root)
    except DatasetNotFound as e:
        return e.describe(root_option="--data-root DIR")
    return None


def _rank() -> int:
    """This process's rank in a torchrun job (0 alone): only rank 0 takes and writes the run folder."""
    return int(os.environ.get("RANK", "0"))


def _out_dir_problem(out_dir: str, overwrite: bool) -> str | None:
    path = Path(out_dir).expanduser()
    if path.exists() and not path.is_dir():
        return f"--out-dir {out_dir} is a file, not a folder; pass a folder (created if missing)"
    if _rank() != 0:  # rank 0 may already hold the folder
        return None
    info = run_dir.holder(path)
    if info is not None:
        return f"--out-dir {out_dir}: {run_dir.describe_holder(out_dir, info)}"
    found = run_dir.run_files(path)
    if found and not overwrite:
        return (
            f"--out-dir {out_dir} holds a run ({', '.join(found)}); continue it with: fastdp-train --resume {out_dir} "
            "; or pass --overwrite to delete it and start anew, or another --out-dir"
        )
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"--out-dir {out_dir} cannot be created: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created in {existing} (not writable)"
        return f"--out-dir {out_dir} {what}; pass a folder you can write to"
    return None


def config_problems(cfg: TrainConfig, fresh: bool = True, overwrite: bool = False) -> list[str]:
    """Every problem of ``cfg``, one message each (a missing dataset's adds lines saying where it goes).

    Torch is imported only for what needs it: a GPU device, an explicit backend, a dataset other than digits.
    """
    out = []
    for name, (ok, allowed) in _RULES.items():
        value = getattr(cfg, name)
        if value is None and "none" not in allowed:
            ok_value = False
        else:
            try:
                ok_value = bool(ok(value))
            except TypeError:  # a value of another type (a library caller's)
                ok_value = False
        if not ok_value:
            out.append(f"{_flag(name)} must be {allowed}, got {value}")
    for name, f in _FIELDS.items():
        choices = f.metadata.get("choices")
        value = getattr(cfg, name)
        if choices and value not in choices and not (name == "model" and _WRN.match(str(value))):
            extra = ", or wrn-<depth>-<width>" if name == "model" else ""
            out.append(f"{_flag(name)} must be one of {', '.join(choices)}{extra}; got {value!r}")
    if cfg.steps is None and cfg.epochs is None:
        out.append("give --steps or --epochs (both are none)")
    if cfg.nesterov and _finite(cfg.momentum) and cfg.momentum <= 0:
        out.append(f"--nesterov needs --momentum > 0, got --momentum {cfg.momentum}")
    if cfg.dataset in ("digits", "cifar10") and cfg.image_size not in (None, 8 if cfg.dataset == "digits" else 32):
        out.append(f"--image-size: {cfg.dataset} images are not resized; leave it out (none), got {cfg.image_size}")
    if fresh and cfg.checkpoint and not Path(cfg.checkpoint).expanduser().is_file():
        out.append(f"--checkpoint {cfg.checkpoint}: no such file; pass a timm state_dict to fine-tune from, or none")
    if cfg.out_dir is not None and fresh:
        out.append(_out_dir_problem(cfg.out_dir, overwrite))
    out.append(_device_problem(cfg.device))
    if cfg.backend != "auto" and cfg.backend in (_FIELDS["backend"].metadata["choices"] or ()):
        out.append(_backend_problem(cfg.backend))
    if cfg.dataset in _FIELDS["dataset"].metadata["choices"]:
        out.append(_dataset_problem(cfg))
    return [p for p in out if p]


# ---------------------------------------------------------------------------------------------- signals
class StopOnSignal:
    """SIGINT (Ctrl-C) and SIGTERM, handled while the run is set up and trained.

    During the training loop (``deferred`` set by fastdp.trainer) the first signal asks the loop to stop after the
    step in progress: it writes the checkpoint and raises :class:`Interrupted`. Before the loop, or a second signal,
    raises KeyboardInterrupt at once (nothing trained yet, or the user insists), which fastdp-train reports in one line.
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.name: str | None = None
        self.deferred = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        for name in self.SIGNALS:
            try:
                self._previous[getattr(signal, name)] = signal.signal(getattr(signal, name), self._handle)
            except (ValueError, OSError):  # not the main thread, or a platform without it: default handling
                pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        first = self.name is None
        self.name = signal.Signals(signum).name
        if self.deferred and first:
            if _rank() == 0:
                print(
                    f"\nfastdp-train: {self.name}: stopping after this step and writing the checkpoint (send it again "
                    "to stop at once, without it)",
                    file=sys.stderr,
                    flush=True,
                )
            return
        raise KeyboardInterrupt(self.name)

    def requested(self) -> str | None:
        """The signal received, if any (polled by the loop after every step)."""
        return self.name

    def exit_status(self) -> int:
        """128 + the signal's number, as a shell reports a process the signal ended."""
        return 128 + int(getattr(signal, self.name or "SIGINT"))


# ---------------------------------------------------------------------------------------------- command line
def _default_text(name: str) -> str:
    value = getattr(PRESETS["digits"], name)  # the defaults are the digits preset's
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastdp-train",
        description=__doc__.split("\n\n")[0],
        epilog="Values are checked before any work; every problem is reported, one line each. Defaults are the "
        "digits preset's; another --preset changes them (fastdp-train --list-presets).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        default="digits",
        metavar="NAME",
        help=f"a recipe whose fields the options below override (default: digits; one of: {', '.join(PRESETS)})",
    )
    p.add_argument("--list-presets", action="store_true", help="print the presets with their targets and exit")
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue the run in this folder (or from this last.pt) where it stopped; its configuration is kept "
        f"except {', '.join(_flag(k) for k in _RESUMABLE_CHANGES)} (default: a new run)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out-dir that holds one, deleting its run files (default: refuse, and say how "
        "to resume it)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar on stderr)")
    for name, f in _FIELDS.items():
        flag = _flag(name)
        help_text = f.metadata.get("help", "")
        if "(default:" not in help_text:
            help_text += f" (default: {_default_text(name)})"
        choices = f.metadata.get("choices")
        if choices:
            help_text += f"; one of: {', '.join(choices)}"
        # SUPPRESS: a field not given is absent from the namespace, so "--checkpoint none" can still set None.
        # Values stay text here: _config converts and checks them all, to report every problem at once.
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            kind = f.type.split(" ")[0]
            metavar = {"data_root": "DIR", "out_dir": "DIR", "checkpoint": "FILE", "device": "DEVICE"}.get(name)
            metavar = metavar or {"int": "N", "float": "X"}.get(kind, "NAME" if choices else "TEXT")
            p.add_argument(flag, default=argparse.SUPPRESS, metavar=metavar, help=help_text)
    return p


def _given(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """The options given on the command line, converted; and the problems of those that did not convert."""
    given, problems = {}, []
    for name in _FIELDS:
        if hasattr(args, name):
            value = getattr(args, name)
            try:
                given[name] = value if isinstance(value, bool) else _convert(name, value)
            except ValueError as e:
                problems.append(str(e))
    return given, problems


class Finished(Exception):
    """--resume of a run that is finished: nothing to do (the message says so; exit status 0)."""


def _resume_state(args: argparse.Namespace) -> tuple[Path, dict]:
    """(the run folder, its checkpoint): last.pt, or the previous checkpoint when last.pt is torn.

    Raises:
        UsageError: the folder is in use, has no checkpoint, or holds something else.
    """
    from fastdp.checkpoint import CheckpointError, load_latest_checkpoint

    given = Path(args.resume).expanduser()
    path = given / "last.pt" if given.is_dir() else given
    folder = path.parent
    info = run_dir.holder(folder) if _rank() == 0 else None
    if info is not None:
        raise UsageError(f"--resume {args.resume}: {run_dir.describe_holder(folder, info)}")
    try:
        state, read, note = load_latest_checkpoint(path)
    except FileNotFoundError:
        if given.is_dir() and run_dir.run_files(folder):
            raise UsageError(
                f"--resume {args.resume}: the run in {folder} has no checkpoint: it ended before writing one (killed, "
                f"or stopped before its first step). Start it again: fastdp-train --out-dir {folder} --overwrite ..."
            ) from None
        raise UsageError(
            f"--resume {args.resume}: no checkpoint at {path}; pass the --out-dir of a fastdp-train run or its last.pt"
        ) from None
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    missing = [k for k in _CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else list(_CHECKPOINT_KEYS)
    if missing:
        raise UsageError(
            f"{read} is not a fastdp-train checkpoint (it has no {', '.join(missing)}); pass the last.pt (or the "
            "--out-dir) of a fastdp-train run"
        )
    if note:
        print(f"fastdp-train: {note}", file=sys.stderr, flush=True)
    return folder, state


def _config(args: argparse.Namespace) -> tuple[str, TrainConfig, dict | None]:
    """The run's preset, configuration and checkpoint to resume (None: a new run), every value checked.

    Raises:
        UsageError: with one entry per problem.
        Finished: --resume of a finished run (whose resumption would change nothing that it refuses).
    """
    given, problems = _given(args)
    if args.resume:
        folder, state = _resume_state(args)
        saved = state["config"]
        # a resumed run writes where it was resumed from (the checkpoint's out_dir may be a copied run's original)
        if "out_dir" in given and Path(given.pop("out_dir")).expanduser().resolve() != folder.resolve():
            problems.append(
                f"--out-dir: a resumed run writes into the folder it is resumed from ({folder}); to continue it "
                "elsewhere, copy that folder and resume the copy"
            )
        changed = sorted(
            k for k in given if k not in _RESUMABLE_CHANGES and given[k] != saved.get(k, _FIELDS[k].default)
        )
        if changed:
            problems.append(
                f"a resumed run keeps its configuration; cannot change {', '.join(changed)} "
                f"(only {', '.join(_RESUMABLE_CHANGES)} may change)"
            )
        if problems:
            raise UsageError(*problems)
        steps = state["sampler"]["steps"]  # the run's steps (the sampler draws exactly those)
        if state["step"] >= steps:
            raise Finished(
                f"the run in {folder} is finished (step {state['step']} of {steps}); nothing to do and nothing was "
                f"rewritten. Its results: {folder / 'summary.json'}"
            )
        # a stop point belongs to the invocation that gave it
        known = {k: v for k, v in saved.items() if k in _FIELDS or k in _DOC_FIELDS}
        cfg = TrainConfig(**known).replace(stop_at_step=None, out_dir=str(folder)).replace(**given)
        preset, fresh = state["preset"], False
    else:
        preset, state, fresh = args.preset, None, True
        if preset not in PRESETS:
            raise UsageError(f"--preset {preset}: unknown preset; known presets: {', '.join(PRESETS)}", *problems)
        cfg = PRESETS[preset].replace(**given)
        if cfg.out_dir is None:
            cfg = cfg.replace(out_dir=str(Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"))
    problems += config_problems(cfg, fresh=fresh, overwrite=args.overwrite)
    if problems:
        raise UsageError(*problems)
    return preset, cfg, state


def _exit_lines(problems: tuple) -> str:
    return "\n".join(f"fastdp-train: {p}" for p in problems)


def main(argv: list[str] | None = None) -> dict | None:
    # before anything imports torch: OpenMP threads that wait passively instead of spinning. When another process keeps
    # a core busy, spinning threads fight it for the core: 2-3x slower steps (bench/RESULTS.md). libgomp reads it once,
    # when torch loads it; a value the user set is kept
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    if args.list_presets:
        for name, cfg in PRESETS.items():
            print(f"{name:28s} {cfg.target}\n{'':28s} model {cfg.model}, dataset {cfg.dataset}, H100: {cfg.h100_hours}")
        return None
    lock, ckpt = None, None
    with StopOnSignal() as stop:
        try:
            preset, cfg, state = _config(args)
            ckpt = Path(cfg.out_dir) / "last.pt"
            if _rank() == 0:
                at = f", resumed at step {state['step']}" if state is not None else ""
                print(f"fastdp-train: {preset} run in {cfg.out_dir}{at}; setting up", flush=True)
            lock = _take_run_dir(cfg, fresh=state is None, overwrite=args.overwrite)
            from fastdp.trainer import run

            return run(cfg, preset, resume=state, progress=not args.no_progress, stop=stop)
        except Finished as e:
            print(f"fastdp-train: {e}", flush=True)
            return None
        except Interrupted as e:
            name, step, steps, path = e.args
            if path is not None:  # rank 0
                print(
                    f"fastdp-train: {name}: stopped after step {step} of {steps} and wrote the checkpoint {path}; "
                    f"continue with: fastdp-train --resume {path.parent}",
                    file=sys.stderr,
                    flush=True,
                )
            sys.exit(stop.exit_status())
        except KeyboardInterrupt:
            if os.environ.get("FASTDP_DEBUG"):
                raise
            if ckpt is not None and ckpt.exists():
                kept = f"the last checkpoint written is {ckpt}; continue with: fastdp-train --resume {ckpt.parent}"
            else:
                kept = "no checkpoint was written yet (nothing to resume): run the command again to start"
            what = "again: stopped at once" if stop.deferred else "before the first step"
            print(f"fastdp-train: {stop.name or 'SIGINT'} {what}; {kept}", file=sys.stderr, flush=True)
            sys.exit(stop.exit_status())
        except NonFiniteStop as e:
            sys.exit(f"fastdp-train: {e}" if str(e) else 1)
        except UsageError as e:
            if os.environ.get("FASTDP_DEBUG"):
                raise
            sys.exit(_exit_lines(e.args))
        except FileNotFoundError as e:
            from fastdp.data import DatasetNotFound

            if not isinstance(e, DatasetNotFound) or os.environ.get("FASTDP_DEBUG"):
                raise
            # malformed data found while loading (the check up front sees only that the files are there)
            sys.exit(_exit_lines((e.describe(root_option="--data-root DIR"),)))
        finally:
            if lock is not None:
                lock.release()
            # The run's optimizer and model sit in reference cycles (the engine's hooks) that hold the destroyed
            # process group: collect them now, while the interpreter is whole. Left to the interpreter's teardown,
            # gloo's objects are destroyed with the modules half cleared, which can abort the process (SIGABRT,
            # "terminate called without an active exception") after a successful run.
            gc.collect()


def _take_run_dir(cfg: TrainConfig, fresh: bool, overwrite: bool) -> run_dir.RunLock | None:
    """Lock the run folder (rank 0 of a torchrun job: the others write nothing); with --overwrite delete the run it
    holds; delete what a killed checkpoint write left. Raises UsageError if another process took it meanwhile."""
    if _rank() != 0:
        return None
    lock = run_dir.RunLock(cfg.out_dir)
    try:
        lock.acquire()
    except run_dir.RunDirBusy as e:
        raise UsageError(f"--out-dir {cfg.out_dir}: {e}") from None
    from fastdp.checkpoint import remove_temporaries

    if fresh and overwrite:
        removed = run_dir.clear_run(cfg.out_dir)
        if removed:
            print(f"fastdp-train: --overwrite: deleted {', '.join(removed)} in {cfg.out_dir}", flush=True)
    remove_temporaries(cfg.out_dir)
    return lock


def cli() -> None:
    """Console entry point (``fastdp-train``): exit status 0 on success."""
    main()


if __name__ == "__main__":
    # python -m fastdp.train: run the module fastdp.trainer imports (its exception classes), not this __main__ copy
    from fastdp.train import cli as _cli

    _cli()
