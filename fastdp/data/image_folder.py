"""Image-folder datasets (ImageNet, Imagenette): files decoded lazily with PIL, batch by batch.

Layout: ``<root>/train/<class>/<image>`` and ``<root>/val/<class>/<image>``; the class index is the position of the
class folder in the sorted list of the training split's class folders, and the validation split must have the same
folders. Each image is converted to RGB, resized so that its shorter side is ``resize_size`` (bilinear, antialiased)
and centre-cropped to ``image_size`` x ``image_size``: the standard ImageNet evaluation transform (256 then 224).
Random crops and flips for training are applied afterwards, batched on the device (:func:`fastdp.data.augment`).

Decoding runs in a thread pool when ``num_workers > 0``: PIL releases the GIL while decoding and resizing, so the
threads run in parallel without worker processes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdp.data.image_dataset import DatasetNotFound, ImageDataset, Indices

__all__ = [
    "IMAGENETTE_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "ImageFolderDataset",
    "load_imagenet",
    "load_imagenette",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Readable names of Imagenette's WordNet-id folders (from https://github.com/fastai/imagenette).
IMAGENETTE_CLASSES = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888605": "parachute",
}
# Resize the shorter side to image_size / 0.875 before the centre crop (256 for 224), as the ImageNet evaluation
# transform and the SmoothNets Imagenette pipeline do.
CROP_FRACTION = 0.875

_GENERIC_LAYOUT = (
    "<folder>/<class>/<image> with one folder per class and image files (" + ", ".join(IMG_EXTENSIONS) + ") in each"
)


def _pil() -> Any:
    """PIL.Image, imported on first use so that ``import fastdp.data`` does not need Pillow."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ModuleNotFoundError(
            "image-folder datasets (imagenette, imagenet) decode images with Pillow, which is not installed; "
            "install it: pip install pillow"
        ) from e
    return Image


def default_resize_size(image_size: int) -> int:
    """Shorter side before the centre crop: ``round(image_size / 0.875)`` (256 for 224)."""
    return round(image_size / CROP_FRACTION)


class ImageFolderDataset(ImageDataset):
    """Images in ``folder/<class>/<file>``, decoded with PIL when a batch is requested.

    Args:
        folder: the split folder holding one sub-folder per class.
        image_size: side of the square output images.
        resize_size: shorter side after resizing, before the centre crop; ``>= image_size``; defaults to
            ``round(image_size / 0.875)``.
        num_workers: decoding threads; 0 decodes in the calling thread.
        class_folders: the expected class folders in label order (e.g. the training split's, for a validation
            split); by default the sorted sub-folders of ``folder``.
        classes: class names in label order; default the class folder names.
        mean: per-channel mean of the pixels in [0, 1]; default ImageNet's.
        std: per-channel standard deviation of the pixels in [0, 1]; default ImageNet's.
        name: dataset name and split, for messages; default the folder path.

    Raises:
        DatasetNotFound: the folder, a class folder or any image in a class folder is missing.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        image_size: int,
        resize_size: int | None = None,
        num_workers: int = 0,
        class_folders: Sequence[str] | None = None,
        classes: Sequence[str] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        name: str | None = None,
    ) -> None:
        if isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}.")
        resize_size = default_resize_size(int(image_size)) if resize_size is None else resize_size
        if isinstance(resize_size, bool) or int(resize_size) != resize_size or resize_size < image_size:
            raise ValueError(
                f"resize_size (the shorter side before the centre crop) must be an integer >= image_size="
                f"{image_size}, got {resize_size!r}; leave it None for round(image_size / {CROP_FRACTION})."
            )
        if isinstance(num_workers, bool) or int(num_workers) != num_workers or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0 (decoding threads), got {num_workers!r}.")
        _pil()  # fail now, not at the first batch, if Pillow is missing
        self.folder = Path(folder).expanduser()
        self.class_folders, self.paths, labels = _scan(self.folder, class_folders)
        if classes is None:
            classes = self.class_folders
        elif len(classes) != len(self.class_folders):
            raise ValueError(
                f"classes must name each of the {len(self.class_folders)} class folders, got {len(classes)} names."
            )
        size = int(image_size)
        super().__init__(name or str(self.folder), classes, (3, size, size), mean, std)
        self.image_size = size
        self.resize_size = int(resize_size)
        self.num_workers = int(num_workers)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def targets(self) -> torch.Tensor:
        return self.labels

    def get_batch(self, indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._check_indices(indices)
        size = self.image_size
        out = np.empty((idx.numel(), size, size, 3), dtype=np.uint8)  # HWC, as PIL hands out pixels
        paths = [self.paths[i] for i in idx.tolist()]
        if self.num_workers > 0 and len(paths) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="fastdp-decode")
            list(self._pool.map(self._decode_into, paths, out))  # list(): wait, and re-raise a worker's error
        else:
            for path, row in zip(paths, out, strict=True):
                self._decode_into(path, row)
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), self.labels[idx]

    def _decode_into(self, path: str, out: np.ndarray) -> None:
        """Decodes ``path``, resizes, centre-crops and writes the (size, size, 3) pixels into ``out``."""
        size, short = self.image_size, self.resize_size
        Image = _pil()
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                w, h = img.size
                if min(w, h) != short:
                    # Truncation as in torchvision's Resize, so that pixels match the usual pipeline.
                    w, h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
                    img = img.resize((w, h), Image.Resampling.BILINEAR)
                left, top = round((w - size) / 2), round((h - size) / 2)
                out[...] = np.asarray(img.crop((left, top, left + size, top + size)))
        except (OSError, ValueError) as e:
            raise OSError(
                f"{self.name}: cannot decode image {path} ({type(e).__name__}: {e}); the file is damaged or not an "
                "image: replace it or delete it (the dataset then has to be reloaded)."
            ) from e

    def __getstate__(self) -> dict[str, Any]:
        # A thread pool cannot be pickled (DataLoader worker processes pickle the dataset); each copy makes its own.
        state = self.__dict__.copy()
        state["_pool"] = None
        return state


def _scan(folder: Path, class_folders: Sequence[str] | None) -> tuple[list[str], list[str], list[int]]:
    """(class folders in label order, image paths, labels) of ``folder``; raises DatasetNotFound on a bad layout."""

    def missing(problem: str, path: Path) -> DatasetNotFound:
        return DatasetNotFound("image folder", problem, path, layout=_GENERIC_LAYOUT, source="your images", root=None)

    if not folder.is_dir():
        raise missing("missing folder", folder)
    with os.scandir(folder) as entries:
        found = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if class_folders is None:
        if not found:
            raise missing("no class folders in", folder)
        class_folders = found
    else:
        class_folders = list(class_folders)
        absent = [c for c in class_folders if c not in found]
        if absent:
            raise missing(f"missing class folder ({len(absent)} of {len(class_folders)} absent)", folder / absent[0])
        extra = sorted(set(found) - set(class_folders))
        if extra:
            raise missing(f"unexpected class folder ({len(extra)} not among the training classes)", folder / extra[0])

    paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(class_folders):
        with os.scandir(folder / cls) as entries:
            files = sorted(
                e.name
                for e in entries
                if e.is_file() and not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMG_EXTENSIONS
            )
        if not files:
            raise missing("empty class folder (no image files in it)", folder / cls)
        paths.extend(os.path.join(folder, cls, f) for f in files)
        labels.extend([label] * len(files))
    return list(class_folders), paths, labels


def _load_train_val(
    dataset: str,
    root: str | Path,
    *,
    layout: str,
    source: str,
    image_size: int,
    resize_size: int | None,
    num_workers: int,
    class_names: dict[str, str] | None = None,
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    root = Path(root).expanduser()

    def error(problem: str, path: str | Path) -> DatasetNotFound:
        return DatasetNotFound(dataset, problem, path, layout=layout, source=source, root=root)

    if not root.is_dir():
        raise error("missing dataset root folder", root)
    common: dict[str, Any] = dict(image_size=image_size, resize_size=resize_size, num_workers=num_workers)
    try:
        train = ImageFolderDataset(root / "train", name=f"{dataset}/train", **common)
        classes = train.class_folders
        names = [class_names[c] for c in classes] if class_names and all(c in class_names for c in classes) else None
        val = ImageFolderDataset(root / "val", class_folders=classes, classes=names, name=f"{dataset}/val", **common)
    except DatasetNotFound as e:
        # Re-phrased with this dataset's layout and source, which the generic scan does not know.
        raise error(e.problem, e.filename) from None
    if names is not None:
        train.classes = tuple(names)
    return train, val


IMAGENETTE_LAYOUT = (
    "<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG with the same 10 class folders (n01440764, ...); "
    "the folder extracted from imagenette2.tgz (or imagenette2-320.tgz, imagenette2-160.tgz) is such a root"
)
IMAGENETTE_SOURCE = (
    "https://github.com/fastai/imagenette (full size: https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz), "
    "then: tar xzf imagenette2.tgz && mv imagenette2 <root>"
)
IMAGENET_LAYOUT = (
    "<root>/train/<wnid>/*.JPEG (1000 class folders) and <root>/val/<wnid>/*.JPEG (the 50000 validation images "
    "sorted into the same 1000 folders, e.g. with the valprep.sh script)"
)
IMAGENET_SOURCE = (
    "https://image-net.org/download.php (ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar; registration "
    "required); extract train's per-class tars into train/<wnid>/ and sort val into val/<wnid>/"
)


def load_imagenette(
    root: str | Path, image_size: int = 224, resize_size: int | None = None, num_workers: int = 0
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """Imagenette (10 ImageNet classes) train and val splits, with readable class names.

    The default 224 x 224 (shorter side 256, centre crop) is the resolution of the SmoothNets Imagenette experiments
    (Remerscheid et al. 2022, code: NiWaRe/DPBenchmark).

    Args:
        root: the extracted ``imagenette2`` folder (holding ``train/`` and ``val/``).
        image_size: side of the square images.
        resize_size: shorter side before the centre crop; default ``round(image_size / 0.875)``.
        num_workers: decoding threads.

    Returns:
        ``(train, val)`` image-folder datasets with ImageNet's mean and std.
    """
    return _load_train_val(
        "imagenette", root, layout=IMAGENETTE_LAYOUT, source=IMAGENETTE_SOURCE, image_size=image_size,
        resize_size=resize_size, num_workers=num_workers, class_names=IMAGENETTE_CLASSES,
    )  # fmt: skip


def load_imagenet(
    root: str | Path, image_size: int = 224, resize_size: int | None = None, num_workers: int = 0
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """ImageNet (ILSVRC2012) train and val splits; classes are the WordNet-id folder names.

    Args:
        root: the folder holding ``train/`` and ``val/``, each with 1000 class folders.
        image_size: side of the square images.
        resize_size: shorter side before the centre crop; default ``round(image_size / 0.875)`` (256 for 224).
        num_workers: decoding threads.

    Returns:
        ``(train, val)`` image-folder datasets with ImageNet's mean and std.
    """
    return _load_train_val(
        "imagenet", root, layout=IMAGENET_LAYOUT, source=IMAGENET_SOURCE, image_size=image_size,
        resize_size=resize_size, num_workers=num_workers,
    )  # fmt: skip
