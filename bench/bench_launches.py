"""Kernel-launching aten ops per steady-state training step: the DP step against the non-private one.

On a GPU every aten op that computes something is a kernel launch costing ~5-10 us of host time, so a DP step
should issue about as many as the non-private step (issue 12: at most 2x now, 1.5x as the goal). This counts them on
the CPU default path with a ``TorchDispatchMode`` over one steady-state step (forward, backward, optimizer step,
zero_grad), after two warm-up steps (the plan and the batch-provenance probe are made then). The plan is the cost
model's (``autotune=False``): timed plans vary between runs, and with them the counts. Views and metadata ops
launch nothing and are left out. It also counts host syncs that would stall a GPU queue (``aten._local_scalar_dense``:
``.item()``, ``bool(t)``, ``int(t)``). Printed per model; nothing is asserted. Run:

    python bench/bench_launches.py            # or: python -m pytest bench/bench_launches.py -q -s
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastdp
from fastdp.models import build_model

#: ops that only make views or read metadata: no kernel
_NO_LAUNCH = {
    "view", "_unsafe_view", "reshape", "as_strided", "t", "transpose", "permute", "expand", "squeeze", "unsqueeze",
    "detach", "alias", "slice", "select", "unbind", "split", "split_with_sizes", "chunk", "narrow", "flatten",
    "unflatten", "view_as", "expand_as", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    "_reshape_alias", "lift_fresh", "set_", "is_same_size", "_to_copy_noop", "resolve_conj", "resolve_neg",
    "_has_compatible_shallow_copy_type", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "dim", "size",
    "stride", "numel", "promote_types", "result_type", "can_cast",
}  # fmt: skip
_SYNC = {"_local_scalar_dense", "item", "is_nonzero"}

CASES = {"wrn-16-4": ((3, 32, 32), 32), "digits_cnn": ((1, 8, 8), 32)}


class Counting(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.launches: Counter = Counter()
        self.syncs: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _SYNC:
            self.syncs[name] += 1
        elif name not in _NO_LAUNCH:
            self.launches[name] += 1
        return func(*args, **(kwargs or {}))


def count(model_name: str, private: bool, backend: str = "auto") -> Counting:
    shape, batch = CASES[model_name]
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10, in_channels=shape[0])
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if private:
            opt = fastdp.DPSGD(model, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch,
                               seed=0, backend=backend, autotune=False)  # fmt: skip
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step():
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(2):
        step()
    mode = Counting()
    with mode:
        step()
    return mode


def report() -> list[str]:
    lines = []
    for name in CASES:
        plain = count(name, private=False)
        for backend in ["torch"] + [b for b in ("cpp",) if b in fastdp.available_backends()]:
            dp = count(name, private=True, backend=backend)
            n, m = sum(plain.launches.values()), sum(dp.launches.values())
            lines.append(
                f"{name} ({backend}): {m} launching ops in a DP step, {n} non-private ({m / n:.2f}x); host syncs "
                f"{sum(dp.syncs.values())} vs {sum(plain.syncs.values())}; most frequent in the DP step: "
                + ", ".join(f"{k} {v}" for k, v in dp.launches.most_common(6))
            )
    return lines


def test_report_launches():
    for line in report():
        print(line)


if __name__ == "__main__":
    for line in report():
        print(line)
