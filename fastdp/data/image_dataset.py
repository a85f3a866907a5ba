"""The image dataset interface every loader returns, its in-memory implementation, and where datasets live.

A dataset hands out whole batches as uint8 tensors, ``get_batch(indices) -> (x (n, C, H, W) uint8, y (n,) int64)``:
a Poisson step's index list goes in as is (possibly empty), and conversion to floats, augmentation and normalisation
happen afterwards on the training device (:mod:`fastdp.data.augment`), batched. ``mean``/``std`` are per channel of
pixels scaled to [0, 1], for :func:`fastdp.data.normalize`.

Datasets are never downloaded: they are read from a local folder, by default ``$FASTDP_DATA/<name>`` with
``FASTDP_DATA`` defaulting to ``~/.cache/fastdp/data``. A missing or malformed one raises :class:`DatasetNotFound`
saying what is missing, the expected layout, where to get it and where to put it.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = [
    "DATA_ENV",
    "DEFAULT_DATA_DIR",
    "DatasetNotFound",
    "ImageDataset",
    "TensorImageDataset",
    "data_root",
]

DATA_ENV = "FASTDP_DATA"
DEFAULT_DATA_DIR = "~/.cache/fastdp/data"

Indices = Sequence[int] | torch.Tensor


def data_root(name: str) -> Path:
    """The default folder of dataset ``name``: ``$FASTDP_DATA/<name>``, with ``FASTDP_DATA`` defaulting to
    ``~/.cache/fastdp/data``.

    Args:
        name: the dataset name, e.g. ``"cifar10"``.

    Returns:
        The expanded path (it need not exist).
    """
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR).expanduser() / name


class DatasetNotFound(FileNotFoundError):
    """A dataset is missing or malformed on disk.

    The message says what is wrong with which exact path, the expected layout, where to get the data and where to
    put it. ``filename`` is the path checked, ``dataset`` the dataset name.

    Args:
        dataset: the dataset name, e.g. ``"cifar10"``.
        problem: what is wrong, e.g. ``"missing file"`` or ``"malformed batch (no b'labels')"``.
        path: the exact path checked.
        layout: the expected layout under the dataset root.
        source: where to get the data (an official URL and how to unpack it).
        root: the dataset root in use, for the "where to put it" line; None (a folder given directly, not a named
            dataset) leaves that line out.
    """

    def __init__(
        self, dataset: str, problem: str, path: str | Path, *, layout: str, source: str, root: str | Path | None
    ) -> None:
        self._parts = (dataset, problem, path, layout, source, root)
        super().__init__(self.describe())
        self.filename = str(path)
        self.dataset = dataset
        self.problem = problem

    def describe(self, root_option: str = "root=... to load_dataset") -> str:
        """The message, with ``root_option`` as the way to give the root (fastdp-train: ``--data-root DIR``)."""
        dataset, problem, path, layout, source, root = self._parts
        message = f"{dataset}: {problem}: {path}\n  Expected layout: {layout}\n  Get it: {source}"
        if root is not None:
            message += (
                f"\n  Put it under the dataset root {root} (pass {root_option}, or set {DATA_ENV}=<dir> to "
                f"use <dir>/{dataset}; without it the root is {DEFAULT_DATA_DIR}/{dataset}). Nothing is downloaded."
            )
        return message

    def __str__(self) -> str:
        # OSError's own __str__ would print "[Errno None] ..." once filename is set.
        return str(self.args[0])


class ImageDataset(abc.ABC):
    """An image classification dataset handing out uint8 batches by index.

    Subclasses set the attributes below (through this ``__init__``) and implement ``__len__``, ``get_batch`` and
    ``targets``.

    Attributes:
        name: dataset name and split, e.g. ``"cifar10/train"``.
        classes: class names; label ``k`` is ``classes[k]``.
        image_shape: ``(C, H, W)`` of every image.
        mean: per-channel mean of pixels scaled to [0, 1] (C floats).
        std: per-channel standard deviation of pixels scaled to [0, 1] (C floats).
    """

    def __init__(
        self,
        name: str,
        classes: Sequence[str],
        image_shape: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {tuple(image_shape)!r}.")
        if len(mean) != shape[0] or len(std) != shape[0]:
            raise ValueError(
                f"mean and std need one value per channel (C={shape[0]}), got {len(mean)} and {len(std)} values."
            )
        if not all(s > 0 for s in std):
            raise ValueError(f"std must be positive per channel, got {tuple(std)!r}.")
        self.name = name
        self.classes: tuple[str, ...] = tuple(classes)
        self.image_shape: tuple[int, int, int] = shape  # type: ignore[assignment]
        self.mean: tuple[float, ...] = tuple(float(m) for m in mean)
        self.std: tuple[float, ...] = tuple(float(s) for s in std)

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(classes)``."""
        return len(self.classes)

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @property
    @abc.abstractmethod
    def targets(self) -> torch.Tensor:
        """All labels, int64 of shape ``(len(self),)`` (no image is decoded)."""

    @abc.abstractmethod
    def get_batch(self, indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels at ``indices``.

        Args:
            indices: a list or 1-D integer tensor of indices in ``[0, len(self))``, possibly empty, repeats allowed.

        Returns:
            ``(x, y)``: x uint8 of shape ``(n, C, H, W)``, y int64 of shape ``(n,)``, in the order of ``indices``;
            ``n = 0`` gives ``(0, C, H, W)`` and ``(0,)``.
        """

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """One example ``(x uint8 (C, H, W), label)``, for use as a map-style ``torch.utils.data.Dataset``."""
        x, y = self.get_batch([index])
        return x[0], int(y[0])

    def _check_indices(self, indices: Indices) -> torch.Tensor:
        """``indices`` as a 1-D int64 CPU tensor, checked against ``len(self)``."""
        if isinstance(indices, torch.Tensor):
            if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
                raise TypeError(
                    f"{self.name}: indices must be integers, got a {indices.dtype} tensor; pass a list or an integer "
                    "tensor of indices (for a mask m, pass m.nonzero().flatten())."
                )
            idx = indices.detach().to("cpu", torch.long)
        else:
            try:
                # dtype given explicitly: torch.as_tensor([]) would be float32, which cannot index.
                idx = torch.as_tensor(indices, dtype=torch.long)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"{self.name}: indices must be a list or 1-D tensor of ints, got {indices!r}.") from e
        if idx.dim() != 1:
            raise ValueError(f"{self.name}: indices must be 1-D (a list of indices), got shape {tuple(idx.shape)}.")
        n = len(self)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            bad = idx[(idx < 0) | (idx >= n)][:5].tolist()
            raise IndexError(f"{self.name}: indices must be in [0, {n}), got {bad} among them.")
        return idx

    def __repr__(self) -> str:
        kind = type(self).__name__
        return f"{kind}({self.name!r}, n={len(self)}, classes={self.num_classes}, shape={self.image_shape})"


class TensorImageDataset(ImageDataset):
    """A dataset held in memory as one uint8 tensor; ``get_batch`` is a single gather.

    Args:
        images: uint8 tensor of shape ``(N, C, H, W)``.
        labels: integer tensor of shape ``(N,)`` with values in ``[0, len(classes))``.
        classes: class names.
        mean: per-channel mean of pixels scaled to [0, 1].
        std: per-channel standard deviation of pixels scaled to [0, 1].
        name: dataset name and split, for messages.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        name: str = "tensors",
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"{name}: images must be a uint8 tensor of shape (N, C, H, W), got {images.dtype} of shape "
                f"{tuple(images.shape)}."
            )
        if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
            raise ValueError(
                f"{name}: labels must be an integer tensor of shape ({images.shape[0]},), got {labels.dtype} of "
                f"shape {tuple(labels.shape)}."
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise ValueError(
                f"{name}: labels must be in [0, {len(classes)}) (one per class name), got the range "
                f"[{int(labels.min())}, {int(labels.max())}]."
            )
        super().__init__(name, classes, images.shape[1:], mean, std)
        self.images = images.contiguous()
        self.labels = labels.to(device=images.device, dtype=torch.long)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def targets(self) -> torch.Tensor:
        return self.labels

    @property
    def device(self) -> torch.device:
        """Where the images live; ``get_batch`` returns tensors there."""
        return self.images.device

    def to(self, device: torch.device | str) -> TensorImageDataset:
        """A copy of the dataset with its tensors on ``device`` (e.g. all of CIFAR-10, 150 MB, on the GPU).

        Args:
            device: the target device.

        Returns:
            A new dataset sharing nothing mutable with this one (or ``self`` when already there).
        """
        device = torch.device(device)
        if device == self.images.device:
            return self
        return TensorImageDataset(
            self.images.to(device), self.labels.to(device), self.classes, self.mean, self.std, self.name
        )

    def get_batch(self, indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._check_indices(indices).to(self.images.device)
        return self.images[idx], self.labels[idx]
