"""Dataset loaders on tiny fixtures written into tmp_path in the real on-disk formats (tests/conftest.py), plus digits
and the registry.

CIFAR-10 batches are pickled dicts exactly like the official ones; image folders hold PNG/JPEG files written with
PIL. Every DatasetNotFound path is checked for naming the exact path, the expected layout and where to get the data.
"""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NAMES, write_cifar, write_folder
from PIL import Image

from fastdp.data import (
    DATASETS,
    DatasetNotFound,
    ImageDataset,
    ImageFolderDataset,
    TensorImageDataset,
    load_dataset,
)
from fastdp.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
IMAGENETTE_URL = "https://github.com/fastai/imagenette"


def assert_not_found(excinfo: pytest.ExceptionInfo, path: Path, *layout_and_source: str) -> str:
    """The message names the exact path, the layout, the source and the root/env var to use."""
    e = excinfo.value
    assert isinstance(e, FileNotFoundError)
    msg = str(e)
    assert f": {path}\n" in msg, msg  # the exact path checked, right after the problem
    assert e.filename == str(path)
    assert "Expected layout:" in msg and "Get it:" in msg and "FASTDP_DATA" in msg and "root=" in msg, msg
    for text in layout_and_source:
        assert text in msg, f"{text!r} not in:\n{msg}"
    return msg


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("point_at", ["parent", "batches_folder"])
def test_cifar10_round_trip(tmp_path: Path, protocol: int, point_at: str) -> None:
    expected = write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    root = tmp_path if point_at == "parent" else tmp_path / "cifar-10-batches-py"
    train, test = load_dataset("cifar10", root=root)
    assert isinstance(train, ImageDataset) and isinstance(test, TensorImageDataset)
    assert (len(train), len(test)) == (10, 3)
    assert train.image_shape == test.image_shape == (3, 32, 32)
    assert train.classes == tuple(n.decode() for n in NAMES) and train.num_classes == 10
    assert train.mean == CIFAR10_MEAN and train.std == CIFAR10_STD
    for ds, split in ((train, "train"), (test, "test")):
        x, y = ds.get_batch(list(range(len(ds))))
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.equal(x, expected[f"{split}_x"]), "pixels differ: the CHW order of the 3072-byte rows is wrong"
        assert torch.equal(y, expected[f"{split}_y"])
        assert torch.equal(ds.targets, expected[f"{split}_y"])
    # Indexing in any order, with repeats, from a tensor; and one example as a map-style dataset.
    idx = torch.tensor([4, 0, 4, 9])
    x, y = train.get_batch(idx)
    assert torch.equal(x, expected["train_x"][idx]) and torch.equal(y, expected["train_y"][idx])
    img, label = train[7]
    assert torch.equal(img, expected["train_x"][7]) and label == int(expected["train_y"][7])


def test_cifar10_default_root_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar(tmp_path / "cifar10" / "cifar-10-batches-py")
    monkeypatch.setenv("FASTDP_DATA", str(tmp_path))
    train, test = load_dataset("CIFAR10")  # case-insensitive name
    assert (len(train), len(test)) == (10, 3)


def test_cifar10_missing_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTDP_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFound) as excinfo:
        load_dataset("cifar10")
    msg = assert_not_found(excinfo, tmp_path / "nowhere" / "cifar10", "cifar-10-batches-py", "data_batch_1", CIFAR_URL)
    assert "missing dataset root folder" in msg


def test_cifar10_root_without_batches_folder(tmp_path: Path) -> None:
    (tmp_path / "unrelated.txt").write_text("not cifar")
    with pytest.raises(DatasetNotFound) as excinfo:
        load_dataset("cifar10", root=tmp_path)
    assert_not_found(excinfo, tmp_path / "cifar-10-batches-py", "test_batch", CIFAR_URL, "tar xzf")
    # With the archive downloaded but not extracted, the message says so.
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(DatasetNotFound) as excinfo:
        load_dataset("cifar10", root=tmp_path)
    assert "found cifar-10-python.tar.gz but not its extracted folder" in str(excinfo.value)


def test_cifar10_missing_batch_file(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFound) as excinfo:
        load_dataset("cifar10", root=tmp_path)
    msg = assert_not_found(excinfo, folder / "data_batch_3", "data_batch_5", CIFAR_URL)
    assert msg.startswith("cifar10: missing file")


@pytest.mark.parametrize(
    "damage",
    ["truncated", "no_labels", "wrong_row_size", "label_count", "label_range", "code_in_pickle"],
)
def test_cifar10_malformed_batch(tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    path = folder / "data_batch_2"
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        bad: object = {
            "no_labels": {b"data": good[b"data"]},
            "wrong_row_size": {**good, b"data": np.zeros((2, 1024), np.uint8)},
            "label_count": {**good, b"labels": [0, 1, 2]},
            "label_range": {**good, b"labels": [0, 10]},
            "code_in_pickle": {**good, b"labels": _CallsPrint()},
        }[damage]
        path.write_bytes(pickle.dumps(bad))
    with pytest.raises(DatasetNotFound) as excinfo:
        load_dataset("cifar10", root=tmp_path)
    msg = assert_not_found(excinfo, path, CIFAR_URL)
    assert "malformed" in msg


class _CallsPrint:
    """Unpickles by calling print(): the restricted unpickler must refuse it rather than run it."""

    def __reduce__(self) -> tuple:
        return (print, ("this must not run",))


def test_cifar10_rejects_resizing(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py")
    with pytest.raises(ValueError, match="image_size=64"):
        load_dataset("cifar10", root=tmp_path, image_size=64)
    assert len(load_dataset("cifar10", root=tmp_path, image_size=32)[0]) == 10


# ----------------------------------------------------------------------------------------------- image folders


def test_image_folder_classes_shapes_and_pixels(tmp_path: Path) -> None:
    pixels = write_folder(tmp_path)
    # resize_size=4: the 6x4 PNG keeps its size (shorter side 4) and is centre-cropped to columns 1..4.
    train, val = load_dataset("imagenette", root=tmp_path, image_size=4, resize_size=4)
    assert isinstance(train, ImageFolderDataset)
    assert train.class_folders == ["n01440764", "n02102040"] == val.class_folders
    assert train.classes == ("tench", "English springer") == val.classes  # Imagenette's readable names
    assert (len(train), len(val)) == (6, 6)
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.image_shape == (3, 4, 4)
    x, y = train.get_batch([0, 1, 2, 3])
    assert x.shape == (4, 3, 4, 4) and x.dtype == torch.uint8 and y.tolist() == [0, 0, 0, 1]
    # Files are sorted by name within a class: a.png, b.JPEG, c.png.
    assert torch.equal(x[0], torch.from_numpy(pixels["train", "n01440764"][:, 1:5]).permute(2, 0, 1))
    assert torch.equal(x[3], torch.from_numpy(pixels["train", "n02102040"][:, 1:5]).permute(2, 0, 1))
    grey = torch.from_numpy(pixels["train", "n01440764"][:4, :4, 0])
    assert all(torch.equal(x[2, c], grey) for c in range(3)), "greyscale must be converted to RGB"
    xv, _ = val.get_batch([3])
    assert torch.equal(xv[0], torch.from_numpy(pixels["val", "n02102040"][:, 1:5]).permute(2, 0, 1))


def test_image_folder_default_resize_and_threads(tmp_path: Path) -> None:
    write_folder(tmp_path, classes=("dogs", "cats"))
    # Default resize_size = round(8 / 0.875) = 9: the 10x20 JPEG becomes 9x18, then the centre 8x8.
    train, _ = load_dataset("imagenet", root=tmp_path, image_size=8)
    assert train.resize_size == 9 and train.classes == ("cats", "dogs")
    x, y = train.get_batch(torch.arange(6))
    assert x.shape == (6, 3, 8, 8) and y.tolist() == [0, 0, 0, 1, 1, 1]
    # The PIL reference for the JPEG: shorter side to 9 (bilinear), centre crop.
    with Image.open(train.paths[1]) as img:
        ref = img.convert("RGB").resize((9, 18), Image.Resampling.BILINEAR).crop((0, 5, 8, 13))
    assert torch.equal(x[1], torch.from_numpy(np.array(ref)).permute(2, 0, 1))
    threaded, _ = load_dataset("imagenet", root=tmp_path, image_size=8, num_workers=2)
    xt, yt = threaded.get_batch([5, 1, 0, 1])
    assert torch.equal(xt, x[[5, 1, 0, 1]]) and torch.equal(yt, y[[5, 1, 0, 1]])
    # Picklable despite its thread pool (DataLoader worker processes pickle datasets).
    clone = pickle.loads(pickle.dumps(threaded))
    assert torch.equal(clone.get_batch([5, 1])[0], x[[5, 1]])


def test_image_folder_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound) as excinfo:
        load_dataset("imagenette", root=tmp_path / "absent")
    assert_not_found(excinfo, tmp_path / "absent", "<root>/train/<wnid>", IMAGENETTE_URL)


def test_image_folder_missing_split(tmp_path: Path) -> None:
    write_folder(tmp_path, splits=("train",))
    with pytest.raises(DatasetNotFound) as excinfo:
        load_dataset("imagenette", root=tmp_path)
    assert_not_found(excinfo, tmp_path / "val", "<root>/val/<wnid>", IMAGENETTE_URL)


def test_image_folder_empty_class_folder(tmp_path: Path) -> None:
    write_folder(tmp_path)
    (tmp_path / "train" / "n09999999").mkdir()
    (tmp_path / "train" / "n09999999" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetNotFound) as excinfo:
        load_dataset("imagenette", root=tmp_path)
    msg = assert_not_found(excinfo, tmp_path / "train" / "n09999999", "<root>/train/<wnid>/*.JPEG", IMAGENETTE_URL)
    assert msg.startswith("imagenette: empty class folder")


def test_image_folder_no_class_folders(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetNotFound) as excinfo:
        load_dataset("imagenet", root=tmp_path)
    assert_not_found(excinfo, tmp_path / "train", "1000 class folders", "https://image-net.org")


def test_image_folder_val_classes_must_match_train(tmp_path: Path) -> None:
    write_folder(tmp_path)
    for f in (tmp_path / "val" / "n02102040").iterdir():
        f.unlink()
    (tmp_path / "val" / "n02102040").rmdir()
    with pytest.raises(DatasetNotFound) as excinfo:
        load_dataset("imagenette", root=tmp_path)
    assert "missing class folder" in assert_not_found(excinfo, tmp_path / "val" / "n02102040", IMAGENETTE_URL)


def test_image_folder_damaged_image(tmp_path: Path) -> None:
    write_folder(tmp_path)
    bad = tmp_path / "train" / "n01440764" / "a.png"
    bad.write_bytes(b"\x89PNG broken")
    train, _ = load_dataset("imagenette", root=tmp_path, image_size=4)
    with pytest.raises(OSError, match="cannot decode image .*a.png"):
        train.get_batch([0])


# ----------------------------------------------------------------------------------------------- digits, registry


def test_digits_sizes_values_and_stats() -> None:
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits")
    assert (len(train), len(test)) == (1437, 360)  # 80/20 of 1797
    assert train.image_shape == (1, 8, 8) and train.classes == tuple("0123456789")
    x, y = train.get_batch(range(len(train)))
    xt, yt = test.get_batch(range(len(test)))
    assert x.dtype == torch.uint8 and int(x.max()) == 255 and int(x.min()) == 0
    # The two splits together are exactly scikit-learn's images, mapped 0..16 -> round(v * 255 / 16).
    sk = load_digits()
    mapped = np.round(sk.images * 255 / 16).astype(np.uint8)
    want = Counter((img.tobytes(), int(t)) for img, t in zip(mapped, sk.target, strict=True))
    all_x, all_y = torch.cat([x, xt]), torch.cat([y, yt])
    got = Counter((img[0].numpy().tobytes(), int(t)) for img, t in zip(all_x, all_y, strict=True))
    assert got == want
    # Stratified: each class's test share is 20% of its count, up to rounding.
    counts = torch.bincount(torch.cat([y, yt]), minlength=10)
    assert (torch.bincount(yt, minlength=10) - 0.2 * counts).abs().max() <= 1
    # Fixed normalisation constants, not statistics of the (private) training split, shared by the test split.
    assert train.mean == test.mean == (0.5,) and train.std == test.std == (0.5,)


def test_digits_split_is_deterministic() -> None:
    a_train, a_test = load_dataset("digits", seed=3)
    b_train, b_test = load_dataset("digits", seed=3)
    c_train, _ = load_dataset("digits", seed=4)
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_test.labels, b_test.labels)
    assert not torch.equal(a_train.images, c_train.images)
    assert len(load_dataset("digits", test_fraction=0.5)[1]) == 899


def test_empty_and_invalid_indices(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py")
    write_folder(tmp_path / "folder")
    datasets = [
        load_dataset("digits")[0],
        load_dataset("cifar10", root=tmp_path)[0],
        load_dataset("imagenette", root=tmp_path / "folder", image_size=4)[0],
    ]
    for ds in datasets:
        for empty in ([], torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.int32)):
            x, y = ds.get_batch(empty)
            assert x.shape == (0, *ds.image_shape) and x.dtype == torch.uint8
            assert y.shape == (0,) and y.dtype == torch.int64
        with pytest.raises(IndexError, match=rf"in \[0, {len(ds)}\)"):
            ds.get_batch([0, len(ds)])
        with pytest.raises(IndexError):
            ds.get_batch([-1])
        with pytest.raises(TypeError, match="integers"):
            ds.get_batch(torch.ones(len(ds), dtype=torch.bool))
        with pytest.raises(ValueError, match="1-D"):
            ds.get_batch([[0, 1]])


def test_registry_errors(tmp_path: Path) -> None:
    assert DATASETS == ("digits", "cifar10", "imagenette", "imagenet")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; known datasets: digits, cifar10, imagenette"):
        load_dataset("mnist")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['num_workers'\]; digits accepts: test_fraction"):
        load_dataset("digits", num_workers=2)
    with pytest.raises(ValueError, match="image_size=16"):
        load_dataset("digits", image_size=16)
