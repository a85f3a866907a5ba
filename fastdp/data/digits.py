"""scikit-learn's embedded digits: 1797 greyscale 8x8 images of 10 digits, no files needed.

The 0..16 pixel values are mapped to uint8 by ``round(v * 255 / 16)`` (0 -> 0, 16 -> 255), and the set is split
into train and test by a stratified, seeded split (same seed, same split). Images are normalised with fixed
constants, mean 0.5 and std 0.5 in [0, 1] units (to [-1, 1]): statistics of the training split would be computed
from the private data without noise, and every example's input would depend on every other example.
"""

from __future__ import annotations

import torch

from fastdp.data.image_dataset import TensorImageDataset

__all__ = ["load_digits"]


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> tuple[TensorImageDataset, TensorImageDataset]:
    """The digits dataset split into train and test.

    Args:
        seed: seed of the stratified split; the same seed gives the same split.
        test_fraction: fraction of each class held out for test, in (0, 1).

    Returns:
        ``(train, test)``, in-memory datasets of shape ``(1, 8, 8)`` with 10 classes named ``"0"``..``"9"``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
    try:
        from sklearn.datasets import load_digits as sk_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ModuleNotFoundError(
            "the digits dataset ships with scikit-learn, which is not installed; install it: pip install scikit-learn"
        ) from e

    d = sk_digits()
    images = torch.from_numpy(d.images).mul(255.0 / 16.0).round().to(torch.uint8).unsqueeze(1)  # (1797, 1, 8, 8)
    labels = torch.from_numpy(d.target).long()
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=test_fraction, random_state=seed, stratify=d.target
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)

    mean, std = (0.5,), (0.5,)  # data-independent (module docstring)
    classes = [str(k) for k in range(10)]
    return (
        TensorImageDataset(images[train_idx], labels[train_idx], classes, mean, std, name="digits/train"),
        TensorImageDataset(images[test_idx], labels[test_idx], classes, mean, std, name="digits/test"),
    )
