"""Kernel-launching aten ops and host syncs per steady-state training step: the DP step against the non-private one.

On a GPU every aten op that computes something is a kernel launch costing ~5-10 us of host time, and every host read
of a device value drains the queue, so a DP step should issue about as many launches as the non-private step and no
syncs (issue 12: at most 2x now, 1.5x as the goal). This counts them with ``fastdp.launches.LaunchCounter`` over one
steady-state step (forward, backward, optimizer step, zero_grad) after two warm-up steps (the plan and the
batch-provenance probe are made then), on the CPU path of each backend. The plan is the cost model's
(``autotune=False``): timed plans vary between runs, and with them the counts. The non-private step is
``torch.optim.SGD`` with ``foreach=True`` (what torch picks on a GPU). Printed per model; nothing is asserted here
(tests/test_launches.py holds the bound). Run:

    python bench/bench_launches.py            # or: python -m pytest bench/bench_launches.py -q -s
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import fastdp
from fastdp.launches import LaunchCounter
from fastdp.models import build_model
from fastdp.rules import conv_ghost

#: model -> (input shape, batch, build_model options)
CASES = {
    "wrn-16-4": ((3, 32, 32), 32, {}),
    "wrn-40-4": ((3, 32, 32), 32, {}),
    "nf_resnet50": ((3, 32, 32), 8, {}),
    "vit-s": ((3, 32, 32), 32, {"image_size": 32}),
    "vit-mini": ((3, 32, 32), 32, {"image_size": 32}),
    "digits_cnn": ((1, 8, 8), 32, {}),
}


def count(model_name: str, private: bool, backend: str = "auto", batch: int | None = None) -> LaunchCounter:
    shape, default_batch, options = CASES[model_name]
    batch = batch or default_batch
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10, in_channels=shape[0], **options)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if private:
            opt = fastdp.DPSGD(model, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch,
                               seed=0, backend=backend, autotune=False)  # fmt: skip
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.1, foreach=True)

    def step():
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(2):
        step()
    with LaunchCounter() as counter:
        step()
    return counter


@contextmanager
def gpu_sizes():
    """Work split as on a GPU: the CPU forms the shifted ghost norm's Gram matrices a few examples at a time
    (fastdp.rules.conv_ghost: 2 MB for the torch path's box additions to stay in cache, 32 MiB with fastdp._C's
    shifted_gram), which splits one launch into several that a GPU would not issue."""
    tables = (conv_ghost.CHUNK_BYTES, conv_ghost.CHUNK_BYTES_SHIFTED)
    cpu = [t.pop("cpu", None) for t in tables]
    try:
        yield
    finally:
        for t, v in zip(tables, cpu, strict=True):
            if v is not None:
                t["cpu"] = v


def report(models=tuple(CASES)) -> list[str]:
    lines = []
    for name in models:
        plain = count(name, private=False)
        for backend in ["torch"] + [b for b in ("cpp",) if b in fastdp.available_backends()]:
            dp = count(name, private=True, backend=backend)
            with gpu_sizes():
                gpu = count(name, private=True, backend=backend).total
            as_gpu = "" if gpu == dp.total else f" ({gpu}, {gpu / plain.total:.2f}x, with a GPU's stacks and chunks)"
            lines.append(
                f"{name} ({backend}): {dp.total} launching ops in a DP step{as_gpu}, {plain.total} non-private "
                f"({dp.total / plain.total:.2f}x); host syncs {dp.total_syncs} vs {plain.total_syncs}; most frequent "
                "in the DP step: " + ", ".join(f"{k} {v}" for k, v in dp.launches.most_common(6))
            )
    return lines


def test_report_launches():
    for line in report():
        print(line)


if __name__ == "__main__":
    for line in report():
        print(line)
