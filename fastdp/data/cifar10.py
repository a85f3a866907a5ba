"""CIFAR-10 from the official python-pickle batches, held in memory as uint8 (150 MB for 60000 images).

Each batch file is a pickled dict with ``b'data'`` (a uint8 array of shape (n, 3072); a row holds the 1024-byte R,
G and B planes of one 32x32 image in row-major order, i.e. CHW) and ``b'labels'`` (n ints in 0..9); ``batches.meta``
holds ``b'label_names'``. The files are unpickled with a restricted unpickler that only builds numpy arrays, so a
tampered file cannot run code.

The batches are checked for consistency (rows of 3072 bytes, one label per row, labels in 0..9), not for the
official 10000 rows each, so a subset or a tiny test fixture in the same format loads too.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdp.data.image_dataset import DatasetNotFound, TensorImageDataset

__all__ = ["CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "load_cifar10"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the 50000 training images in [0, 1] units (the population std, not the 0.2023/0.1994/
# 0.2010 that circulate and are the std of per-image means).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
ARCHIVE = "cifar-10-python.tar.gz"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
LAYOUT = (
    f"<root>/{FOLDER}/{{{', '.join(TRAIN_FILES)}, {TEST_FILE}, {META_FILE}}} (the python version); root may also be "
    f"the {FOLDER} folder itself"
)
SOURCE = f"{URL} (163 MiB), then: tar xzf {ARCHIVE} -C <root>"

_ROW = 3 * 32 * 32


class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain Python containers, refuses any other global (no code runs from the file)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays")
        return super().find_class(module, name)


def _find_folder(root: Path) -> Path:
    """The folder holding the batch files: ``root/cifar-10-batches-py``, or ``root`` itself."""

    def missing(problem: str, path: Path) -> DatasetNotFound:
        return DatasetNotFound("cifar10", problem, path, layout=LAYOUT, source=SOURCE, root=root)

    if not root.is_dir():
        raise missing("missing dataset root folder", root)
    inner = root / FOLDER
    if inner.is_dir():
        return inner
    if root.name == FOLDER or any((root / f).exists() for f in (*TRAIN_FILES, TEST_FILE)):
        return root
    if (root / ARCHIVE).exists():
        raise missing(f"found {ARCHIVE} but not its extracted folder (run: tar xzf {root / ARCHIVE} -C {root})", inner)
    raise missing("missing folder", inner)


def _read_pickle(path: Path, root: Path) -> dict:
    if not path.is_file():
        raise DatasetNotFound("cifar10", "missing file", path, layout=LAYOUT, source=SOURCE, root=root)
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # truncated download, wrong file, HTML error page, ...: all mean "get the file again"
        raise DatasetNotFound(
            "cifar10", f"malformed file (cannot unpickle it: {type(e).__name__}: {e})", path,
            layout=LAYOUT, source=SOURCE, root=root,
        ) from e  # fmt: skip
    if not isinstance(obj, dict):
        raise DatasetNotFound(
            "cifar10", f"malformed file (a pickled dict expected, got {type(obj).__name__})", path,
            layout=LAYOUT, source=SOURCE, root=root,
        )  # fmt: skip
    return obj


def _read_batch(path: Path, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (n, 3, 32, 32), labels int64 (n,)) of one batch file, checked."""
    batch = _read_pickle(path, root)

    def malformed(why: str) -> DatasetNotFound:
        return DatasetNotFound("cifar10", f"malformed batch ({why})", path, layout=LAYOUT, source=SOURCE, root=root)

    missing_keys = [k for k in (b"data", b"labels") if k not in batch]
    if missing_keys:
        raise malformed(f"no key {missing_keys[0]!r}; keys are {sorted(batch)}")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise malformed(f"b'data' must be a uint8 array of shape (n, {_ROW}), got a {what}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise malformed(f"b'labels' must be a list of ints, got {type(labels).__name__}") from e
    if labels.shape != (data.shape[0],):
        raise malformed(f"{data.shape[0]} images but b'labels' has shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise malformed(f"labels must be in 0..9, got the range {labels.min()}..{labels.max()}")
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def _read_classes(folder: Path, root: Path) -> tuple[str, ...]:
    path = folder / META_FILE
    if not path.exists():
        return CIFAR10_CLASSES  # the names are fixed; the meta file is not needed to use the data
    names = _read_pickle(path, root).get(b"label_names")
    if not isinstance(names, list | tuple) or len(names) != 10:
        raise DatasetNotFound(
            "cifar10", f"malformed file (b'label_names' must list 10 class names, got {names!r:.200})", path,
            layout=LAYOUT, source=SOURCE, root=root,
        )  # fmt: skip
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def load_cifar10(root: str | Path) -> tuple[TensorImageDataset, TensorImageDataset]:
    """CIFAR-10 train (``data_batch_1..5``) and test (``test_batch``) sets from the python-pickle batches.

    Args:
        root: the folder holding ``cifar-10-batches-py/``, or that folder itself.

    Returns:
        ``(train, test)``, in-memory datasets of shape ``(3, 32, 32)`` with 10 classes.

    Raises:
        DatasetNotFound: a folder or batch file is missing or malformed (the message names the path).
    """
    root = Path(root).expanduser()
    folder = _find_folder(root)
    # Check every file exists before reading any: one message for the first missing file, without a long read first.
    for name in (*TRAIN_FILES, TEST_FILE):
        if not (folder / name).is_file():
            raise DatasetNotFound("cifar10", "missing file", folder / name, layout=LAYOUT, source=SOURCE, root=root)
    classes = _read_classes(folder, root)
    train = [_read_batch(folder / name, root) for name in TRAIN_FILES]
    test_x, test_y = _read_batch(folder / TEST_FILE, root)
    train_x = torch.cat([x for x, _ in train])
    train_y = torch.cat([y for _, y in train])
    return (
        TensorImageDataset(train_x, train_y, classes, CIFAR10_MEAN, CIFAR10_STD, name="cifar10/train"),
        TensorImageDataset(test_x, test_y, classes, CIFAR10_MEAN, CIFAR10_STD, name="cifar10/test"),
    )
