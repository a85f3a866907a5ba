"""What a training run leaves behind: metrics as JSON lines, a final JSON summary, a PNG of accuracy and epsilon.

All files are written by rank 0 only in a distributed run (the caller decides). They are created readable by
their owner only (0600, in a directory created 0700), like the checkpoint next to them: what a run logs describes
its private training data. The plot is drawn with matplotlib's non-interactive Agg backend, so it works without
a display.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import IO, Any


def _private_open(path: str | os.PathLike, mode: str = "w") -> IO:
    """``open(path, mode)`` for writing, the file created (or reset to) 0600 and its directory created 0700."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode.startswith("a") else os.O_TRUNC)
    flags |= getattr(os, "O_BINARY", 0) if "b" in mode else 0  # Windows translates newlines otherwise
    fd = os.open(path, flags, 0o600)
    try:
        if hasattr(os, "fchmod"):  # POSIX: a file that already existed keeps its mode through os.open
            os.fchmod(fd, 0o600)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


class MetricsLog:
    """Appends one JSON object per line to ``path``; ``records`` keeps them for the plot and the summary."""

    def __init__(
        self, path: str | os.PathLike, records: list[dict[str, Any]] | None = None, write: bool = True
    ) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = list(records or [])
        self.writes = write  # False: keep the records in memory only (ranks other than 0)
        if not write:
            return
        # a resumed run rewrites the file from the checkpoint's records: lines written after that checkpoint
        # by the interrupted run are dropped, so the file describes the run that produced the parameters
        with _private_open(self.path, "w") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.writes:
            return
        with _private_open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def write_summary(path: str | os.PathLike, summary: dict[str, Any]) -> Path:
    path = Path(path)
    with _private_open(path, "w") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    return path


def plot_curves(path: str | os.PathLike, records: list[dict[str, Any]], title: str) -> Path:
    """Test accuracy (raw and EMA weights) and epsilon spent against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if "test_accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in evals]
    ax.plot(steps, [100 * r["test_accuracy"] for r in evals], "o-", label="test accuracy")
    if any("ema_test_accuracy" in r for r in evals):
        ema = [(r["step"], 100 * r["ema_test_accuracy"]) for r in evals if "ema_test_accuracy" in r]
        ax.plot(*zip(*ema, strict=True), "s--", label="test accuracy (EMA)")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    eps = ax.twinx()
    eps_points = [(r["step"], r["epsilon"]) for r in records if math.isfinite(r.get("epsilon", math.nan))]
    if eps_points:
        eps.plot(*zip(*eps_points, strict=True), color="tab:red", label="epsilon")
    eps.set_ylabel("epsilon", color="tab:red")
    lines = ax.get_legend_handles_labels()[0] + eps.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    with _private_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return path
