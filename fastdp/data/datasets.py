"""Dataset registry: ``load_dataset(name, ...) -> (train, test)`` for the datasets fastdp knows by name.

Roots: ``root=None`` means ``$FASTDP_DATA/<name>``, with ``FASTDP_DATA`` defaulting to ``~/.cache/fastdp/data``:

==============  ===================================================================  =====================
name            layout under the root                                                images
==============  ===================================================================  =====================
``digits``      none: scikit-learn's embedded copy (root is ignored)                 1 x 8 x 8
``cifar10``     ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``  3 x 32 x 32
``imagenette``  ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``                       3 x 224 x 224 default
``imagenet``    ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``                       3 x 224 x 224 default
==============  ===================================================================  =====================
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastdp.data import cifar10, image_folder
from fastdp.data.cifar10 import load_cifar10
from fastdp.data.digits import load_digits
from fastdp.data.image_dataset import DatasetNotFound, ImageDataset, data_root
from fastdp.data.image_folder import load_imagenet, load_imagenette

__all__ = ["DATASETS", "check_dataset", "load_dataset"]

Loader = Callable[..., tuple[ImageDataset, ImageDataset]]


def _check_native_size(name: str, size: int, image_size: int | None) -> None:
    if image_size is not None and image_size != size:
        raise ValueError(
            f"{name} images are {size}x{size} and in-memory datasets are not resized; got image_size={image_size!r}. "
            f"Leave image_size=None (or {size})."
        )


def _digits(root: Path, image_size: int | None, seed: int, *, test_fraction: float = 0.2) -> Any:
    _check_native_size("digits", 8, image_size)
    return load_digits(seed=seed, test_fraction=test_fraction)


def _cifar10(root: Path, image_size: int | None, seed: int) -> Any:
    _check_native_size("cifar10", 32, image_size)
    return load_cifar10(root)


def _imagenette(
    root: Path, image_size: int | None, seed: int, *, resize_size: int | None = None, num_workers: int = 0
) -> Any:
    return load_imagenette(root, image_size or 224, resize_size=resize_size, num_workers=num_workers)


def _imagenet(
    root: Path, image_size: int | None, seed: int, *, resize_size: int | None = None, num_workers: int = 0
) -> Any:
    return load_imagenet(root, image_size or 224, resize_size=resize_size, num_workers=num_workers)


# Each loader takes (root, image_size, seed) and its own keyword options; seed only matters for random splits.
_LOADERS: dict[str, Loader] = {
    "digits": _digits,
    "cifar10": _cifar10,
    "imagenette": _imagenette,
    "imagenet": _imagenet,
}
DATASETS: tuple[str, ...] = tuple(_LOADERS)


def _options(loader: Loader) -> list[str]:
    params = inspect.signature(loader).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def load_dataset(
    name: str, root: str | Path | None = None, image_size: int | None = None, *, seed: int = 0, **options: Any
) -> tuple[ImageDataset, ImageDataset]:
    """Loads the train and test (or val) splits of a dataset from a local folder; nothing is downloaded.

    Args:
        name: one of :data:`DATASETS` (``"digits"``, ``"cifar10"``, ``"imagenette"``, ``"imagenet"``), any case.
        root: the dataset folder; default ``$FASTDP_DATA/<name>`` (``FASTDP_DATA`` defaults to
            ``~/.cache/fastdp/data``). Ignored by ``digits``, which ships with scikit-learn.
        image_size: side of the square images of the image-folder datasets (default 224); the in-memory
            datasets (``digits``, ``cifar10``) are not resized and accept only None or their own size.
        seed: seed of the train/test split where one is drawn (``digits``); the same seed gives the same split.
        **options: per-dataset options: ``test_fraction`` (digits, default 0.2); ``resize_size`` (shorter side
            before the centre crop, default ``round(image_size / 0.875)``) and ``num_workers`` (decoding threads,
            default 0) for imagenette and imagenet.

    Returns:
        ``(train, test)`` datasets implementing :class:`fastdp.data.ImageDataset`.

    Raises:
        DatasetNotFound: the data is missing or malformed; the message names the path checked, the expected layout,
            where to get the data and where to put it.
        ValueError: unknown dataset name, or an image_size the dataset cannot provide.
        TypeError: an option the dataset does not take.
    """
    key = str(name).lower()
    if key not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}.")
    loader = _LOADERS[key]
    unknown = sorted(set(options) - set(_options(loader)))
    if unknown:
        accepted = ", ".join(_options(loader)) or "none"
        raise TypeError(f"load_dataset({key!r}) got unknown option(s) {unknown}; {key} accepts: {accepted}.")
    path = data_root(key) if root is None else Path(root).expanduser()
    return loader(path, image_size, seed, **options)


def check_dataset(name: str, root: str | Path | None = None) -> None:
    """Checks that the files ``load_dataset(name, root)`` reads first are where it looks, without reading them.

    Cheap (a few ``stat`` calls), for a command line to report a missing dataset before any work; a malformed file is
    only found by :func:`load_dataset`.

    Raises:
        DatasetNotFound: as :func:`load_dataset` would for a missing folder or file.
        ValueError: unknown dataset name.
    """
    key = str(name).lower()
    if key not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}.")
    path = data_root(key) if root is None else Path(root).expanduser()
    if key == "cifar10":
        folder = cifar10._find_folder(path)
        for f in (*cifar10.TRAIN_FILES, cifar10.TEST_FILE):
            if not (folder / f).is_file():
                raise DatasetNotFound(
                    "cifar10", "missing file", folder / f, layout=cifar10.LAYOUT, source=cifar10.SOURCE, root=path
                )
    elif key in ("imagenette", "imagenet"):
        layout = image_folder.IMAGENETTE_LAYOUT if key == "imagenette" else image_folder.IMAGENET_LAYOUT
        source = image_folder.IMAGENETTE_SOURCE if key == "imagenette" else image_folder.IMAGENET_SOURCE
        for where, problem in ((path, "missing dataset root folder"), (path / "train", "missing folder"),
                               (path / "val", "missing folder")):  # fmt: skip
            if not where.is_dir():
                raise DatasetNotFound(key, problem, where, layout=layout, source=source, root=path)
