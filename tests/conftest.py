"""What the tests share: a float64 per-example oracle independent of fastdp's engine, a driver of the engine over
micro-batches, fixed seeds, a checkpoint with a pickle payload, and datasets written in their real on-disk formats.
"""

from __future__ import annotations

import copy
import functools
import os
import pickle
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastdp
from fastdp.engine import GradSampleEngine

#: the backends whose engine kernels and optimizer step run on CPU tensors here (cpp: fastdp._C's clip-and-reduce
#: and its fused one-call step)
BACKENDS = [b for b in ("torch", "cpp") if b in fastdp.available_backends()]


def pytest_sessionstart(session: pytest.Session) -> None:
    """With FASTDP_REQUIRE_EXT=1 (CI: .ci/run) the run fails when fastdp._C did not build or load, instead of
    skipping the extension's tests and passing without it."""
    from fastdp import _ext

    required = os.environ.get("FASTDP_REQUIRE_EXT", "").strip().lower() in ("1", "true", "yes", "on")
    if required and _ext.IMPORT_ERROR is not None:
        pytest.exit(f"FASTDP_REQUIRE_EXT=1 but {_ext.import_error_message()}", returncode=1)


def seed_of(*params) -> int:
    """A fixed seed for a parametrization: the CRC-32 of its parameters' repr, the same in every process (``hash()``
    of a string is salted per process, so a failure seeded with it may not reproduce)."""
    return zlib.crc32(repr(params).encode()) % 2**31


@functools.cache
def tail_groups(seed: int, step: int, below: int = 1 << 12, search: int = 1 << 22) -> tuple[int, ...]:
    """Groups of the noise stream (fastdp.philox) among the first ``search`` whose radius word x0 or x2 is below
    ``below``: there the radius uniform's low word (the extension words) changes the normal by ~1e-4 relative, far
    beyond the ulps a backend may differ by, so a backend that dropped it fails against the reference. Found by
    search (~2 s for 2^22 groups: each word is below 2^12 with probability 2^-20)."""
    from fastdp.philox import philox4x32

    g = torch.arange(search, dtype=torch.int64)
    step_words = (torch.full_like(g, step & 0xFFFFFFFF), torch.full_like(g, (step >> 32) & 0xFFFFFFFF))
    x0, _, x2, _ = philox4x32((g & 0xFFFFFFFF, g >> 32, *step_words), (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF))
    return tuple(g[(x0 < below) | (x2 < below)].tolist())


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


def split(x, t, sizes):
    """Consecutive micro-batches of ``sizes`` rows of (x, t)."""
    out, start = [], 0
    for s in sizes:
        out.append((x[start : start + s], t[start : start + s]))
        start += s
    return out


def forced_strategy_layers(eng: GradSampleEngine, strategy: str) -> list[str]:
    """The layers (module names, in model order) on which the forced ``strategy`` ran.

    Fails if a layer had ``strategy`` among its plan candidates (``eng.plan_costs``) but ran another: a forced
    strategy may be missing only where the layer's rule does not offer it.
    """
    names = {m: n for n, m in eng.model.named_modules()}
    assert all(m in eng.plan_costs for m in eng.plans), "every plan was made here (none restored from a state_dict)"
    silent = {
        names[m]: choice for m, (_, choice) in eng.plans.items() if choice != strategy and strategy in eng.plan_costs[m]
    }
    assert not silent, f"strategy={strategy!r} was forced and offered, but these layers ran another: {silent}"
    return [n for n, m in eng.model.named_modules() if m in eng.plans and eng.plans[m][1] == strategy]


def run_engine(
    model, batches, *, max_grad_norm, augmult=1, reduction="mean", strategy=None, clipping="flat", backend="torch"
):
    """The clipped sums by parameter name, the norms, and the strategy each planned layer ran, by module name.

    A forced ``strategy`` is checked to have run on every layer that offers it (:func:`forced_strategy_layers`).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eng = GradSampleEngine(
            model,
            max_grad_norm=max_grad_norm,
            augmult=augmult,
            loss_reduction=reduction,
            strategy=strategy,
            clipping=clipping,
            backend=backend,
        )
    for x, t in batches:
        reduce_rows(row_loss(model(x), t), reduction).backward()
    summed, norms = eng.pop()
    if strategy is not None:
        forced_strategy_layers(eng, strategy)
    named = dict(model.named_parameters())
    plans = {name: eng.plans[m][1] for name, m in model.named_modules() if m in eng.plans}
    eng.detach()
    return {n: summed[p] for n, p in named.items() if p in summed}, norms, plans


def assert_exact(model, x, t, sizes, *, augmult=1, reduction="mean", strategy=None, backend="torch") -> dict[str, str]:
    """The engine over micro-batches of ``sizes`` rows against the float64 loop, C at the median norm so that some
    examples are clipped and some are not; returns the plan (strategy by module name)."""
    _, ref_norms = reference(model, x, t, max_grad_norm=float("inf"), augmult=augmult)
    C = ref_norms.median().item()
    ref, _ = reference(model, x, t, max_grad_norm=C, augmult=augmult)
    got, norms, plans = run_engine(
        model, split(x, t, sizes), max_grad_norm=C, augmult=augmult, reduction=reduction, strategy=strategy,
        backend=backend,
    )  # fmt: skip
    assert (ref_norms > C).any() and (ref_norms < C).any()
    torch.testing.assert_close(norms.double(), ref_norms, rtol=2e-5, atol=1e-7)
    assert set(got) == set(ref), "every trainable parameter gets a clipped sum"
    # each clipped term has norm <= C and float32 rounds it at ~1e-7 relative: the sum is good to ~examples * C * 1e-7
    for n in ref:
        torch.testing.assert_close(
            got[n].double(), ref[n], rtol=2e-5, atol=2e-6 * len(ref_norms) * C, msg=lambda m, n=n: f"{n}: {m}"
        )
    return plans


@pytest.fixture(autouse=True)
def _threads():
    # one thread per pytest-xdist worker (the workers already use the cores), else 2 (the CPU CI machine's cores)
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
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


# ----------------------------------------------------------------------------------------------- dataset files

NAMES = [f"class{k}".encode() for k in range(10)]


def write_cifar(folder: Path, sizes: tuple[int, ...] = (3, 2, 1, 2, 2, 3), protocol: int = 2, seed: int = 0) -> dict:
    """Writes data_batch_1..5 (sizes[:5] images) and test_batch (sizes[5]) in the official format.

    Returns the expected (N, 3, 32, 32) uint8 images and labels of each split, built from HWC images so that the
    loader's CHW reading is checked against an independent construction of the rows (R plane, G plane, B plane).
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, list] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, n in zip(files, sizes, strict=True):
        hwc = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        data = np.stack([np.concatenate([img[:, :, c].reshape(-1) for c in range(3)]) for img in hwc])
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        batch = {
            b"batch_label": f"batch {name}".encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        split = "test" if name == "test_batch" else "train"
        expected[f"{split}_x"].append(torch.from_numpy(hwc).permute(0, 3, 1, 2))
        expected[f"{split}_y"].append(torch.tensor(labels, dtype=torch.long))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": NAMES, b"num_cases_per_batch": 10000, b"num_vis": 3072}, f, protocol=protocol)
    return {k: torch.cat(v) for k, v in expected.items()}


WNIDS = ("n02102040", "n01440764")  # listed unsorted: the class index must follow the sorted folder names


def pattern(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def write_folder(root: Path, classes: tuple[str, ...] = WNIDS, splits: tuple[str, ...] = ("train", "val")) -> dict:
    """Per split and class: a 6x4 RGB PNG, a 10x20 JPEG and a 5x5 greyscale PNG. Returns the PNG pixels."""
    pixels = {}
    for s, split in enumerate(splits):
        for c, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True)
            rgb = pattern(6, 4, seed=10 * s + c)
            Image.fromarray(rgb).save(d / "a.png")
            Image.fromarray(pattern(10, 20, seed=99)).save(d / "b.JPEG", quality=90)
            Image.fromarray(rgb[:, :, 0][:4, :4]).save(d / "c.png")  # mode "L", 4x4
            (d / ".hidden.png").write_bytes(b"not an image")  # skipped: hidden
            (d / "notes.txt").write_text("skipped: not an image extension")
            pixels[split, cls] = rgb
    return pixels
