"""Shared oracles: a float64 per-example loop, independent of fastdp's engine; a checkpoint with a pickle payload."""

from __future__ import annotations

import copy
import os

import pytest
import torch


def row_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A per-row loss that is non-trivial for any output shape: <out, target> + 0.05 ||out||^2 per row."""
    out, target = out.flatten(1), target.flatten(1).to(out.dtype)
    return (out * target).sum(1) + 0.05 * out.square().sum(1)


def reduce_rows(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    return losses.mean() if reduction == "mean" else losses.sum()


def reference(
    model: torch.nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    max_grad_norm: float,
    augmult: int = 1,
    clipping: str = "flat",
    gamma: float = 0.01,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Clipped per-example gradient sum and unclipped norms, in float64, one example at a time.

    Example i is rows i*K..i*K+K-1; its gradient is the mean over its K views of the row-loss gradients.
    ``model`` must be an unwrapped copy (taken before fastdp attaches).
    """
    m = copy.deepcopy(model).double()
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    totals = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(x.shape[0] // augmult):
        rows = slice(i * augmult, (i + 1) * augmult)
        xi = x[rows].double() if x.is_floating_point() else x[rows]
        loss = row_loss(m(xi), target[rows].double()).sum() / augmult
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        norms.append(norm)
        c = min(1.0, max_grad_norm / norm.item()) if clipping == "flat" else max_grad_norm / (norm.item() + gamma)
        for t, g in zip(totals, grads, strict=True):
            t += c * g
    return {n: t for (n, _), t in zip(named, totals, strict=True)}, torch.stack(norms)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


class Payload:
    """Unpickles by running code (here: creating the file ``marker``), as a malicious checkpoint would."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def write_payload(path, marker) -> None:
    """A checkpoint-shaped file whose records hold a :class:`Payload`; checks that plain unpickling runs it."""
    torch.save({"version": 1, "step": 3, "model": {"w": torch.zeros(2)}, "records": [Payload(marker)]}, path)
    torch.load(path, weights_only=False)  # the payload is live: loading the file the old way runs it
    assert os.path.exists(marker)
    os.remove(marker)
