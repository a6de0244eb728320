from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustkd.data.datasets import (
    FASHION_MNIST_ENV,
    ImageDataset,
    dataset_names,
    defender_subset,
    load_dataset,
    normalize,
    read_idx,
    to_float,
    to_uint8,
)
from robustkd.errors import ConfigError, DataError, UnknownNameError
from tests.conftest import write_idx


def test_registry_names() -> None:
    assert {"fashion-mnist", "cifar10", "cifar100", "svhn", "gtsrb", "imagefolder"} <= set(
        dataset_names()
    )


def test_fashion_mnist_splits_are_fixed_and_disjoint(train_split: ImageDataset) -> None:
    val = load_dataset("fashion-mnist", "val")
    test = load_dataset("fashion-mnist", "test")
    assert (len(train_split), len(val), len(test)) == (55000, 5000, 10000)
    assert train_split.input_shape == (1, 28, 28) and train_split.num_classes == 10
    assert test.classes[9] == "Ankle boot"
    # train + val = the 60,000 official training images: same label histogram
    counts = torch.bincount(train_split.labels, minlength=10) + torch.bincount(val.labels)
    assert counts.tolist() == [6000] * 10
    again = load_dataset("fashion-mnist", "val")
    assert torch.equal(again.images, val.images)


def test_environment_variable_overrides_folder(fake_fashion: Path, monkeypatch) -> None:
    monkeypatch.setenv(FASHION_MNIST_ENV, str(fake_fashion))
    test = load_dataset("fashion-mnist", "test")
    assert len(test) == 20 and test.labels.tolist()[:3] == [0, 1, 2]
    train = load_dataset("fashion-mnist", "train")
    val = load_dataset("fashion-mnist", "val")
    assert len(train) + len(val) == 100 and len(val) == 10


def test_root_argument_and_uncompressed_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for prefix in ("train", "t10k"):
        write_idx(
            tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (30, 28, 28)), False
        )
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(30) % 10, False)
    data = load_dataset("fashion-mnist", "test", tmp_path)
    assert data.images.shape == (30, 1, 28, 28)


@pytest.mark.parametrize("damage", ["truncate", "magic", "not-gzip"])
def test_corrupt_idx_gives_data_error(fake_fashion: Path, damage: str) -> None:
    path = fake_fashion / "t10k-images-idx3-ubyte.gz"
    if damage == "truncate":
        import gzip

        raw = gzip.decompress(path.read_bytes())
        with gzip.open(path, "wb") as fh:
            fh.write(raw[:-100])
    elif damage == "magic":
        import gzip

        raw = bytearray(gzip.decompress(path.read_bytes()))
        raw[2] = 0x0D  # float data: not ours
        with gzip.open(path, "wb") as fh:
            fh.write(bytes(raw))
    else:
        path.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError, match="replace it"):
        load_dataset("fashion-mnist", "test", fake_fashion)


def test_missing_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test", tmp_path / "nowhere")
    with pytest.raises(DataError, match="Missing t10k-images"):
        load_dataset("fashion-mnist", "test", tmp_path)


def test_unknown_names() -> None:
    with pytest.raises(UnknownNameError, match="fashion-mnist"):
        load_dataset("mnist-fashion")
    with pytest.raises(ConfigError, match="split"):
        load_dataset("fashion-mnist", "validation")


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)


def test_defender_subset(small_train: ImageDataset) -> None:
    sub, idx = defender_subset(small_train, 0.1, seed=3)
    assert len(sub) == 60 and torch.equal(sub.labels, small_train.labels[idx])
    _, idx2 = defender_subset(small_train, 0.1, seed=3)
    assert torch.equal(idx, idx2)
    excl = torch.arange(500)
    sub3, idx3 = defender_subset(small_train, 100, seed=0, exclude=excl)
    assert len(sub3) == 100 and int(idx3.min()) >= 500
    with pytest.raises(ConfigError):
        defender_subset(small_train, 1.5)
    with pytest.raises(ConfigError):
        defender_subset(small_train, 101, exclude=excl)


def test_batches_cover_everything_and_shuffle_is_seeded(small_train: ImageDataset) -> None:
    def order(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.cat([y for _, y in small_train.batches(64, shuffle=True, generator=g)])

    assert torch.equal(order(1), order(1)) and not torch.equal(order(1), order(2))
    assert sorted(order(1).tolist()) == sorted(small_train.labels.tolist())
    sizes = [x.shape[0] for x, _ in small_train.batches(256)]
    assert sizes == [256, 256, 88]


def test_conversions() -> None:
    x = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8)
    f = to_float(x)
    assert f.dtype == torch.float32 and float(f.max()) == 1.0
    assert torch.equal(to_uint8(f), x)
    n = normalize(f, (0.5,), (0.25,))
    assert torch.allclose(n, (f - 0.5) / 0.25)


def test_dataset_validates_shapes() -> None:
    with pytest.raises(DataError):
        ImageDataset(
            torch.zeros(2, 1, 4, 4),
            torch.zeros(2, dtype=torch.long),
            ("a", "b"),
            (0.5,),
            (0.5,),
            "x",
        )
    with pytest.raises(DataError, match="one label per image"):
        ImageDataset(
            torch.zeros(2, 1, 4, 4, dtype=torch.uint8),
            torch.zeros(3, dtype=torch.long),
            ("a", "b"),
            (0.5,),
            (0.5,),
            "x",
        )


def test_cifar10_from_local_folder(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 20) for i in range(1, 6)] + [("test_batch", 10)]:
        with open(folder / name, "wb") as fh:
            pickle.dump(
                {
                    "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                    "labels": list(np.arange(n) % 10),
                },
                fh,
            )
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    test = load_dataset("cifar10", "test", tmp_path)
    assert test.images.shape == (10, 3, 32, 32) and test.classes[0] == "c0"
    assert len(load_dataset("cifar10", "train", tmp_path)) == 90


def test_folder_datasets_never_download(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("ROBUSTKD_DATA", raising=False)
    for name in ("cifar10", "cifar100", "svhn", "gtsrb", "imagefolder"):
        with pytest.raises(DataError, match="--data-root"):
            load_dataset(name, "test")
    with pytest.raises(DataError, match=r"cifar-10-batches-py|batches"):
        load_dataset("cifar10", "test", tmp_path / "empty")


def test_imagefolder(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(d / f"{i}.png")
    data = load_dataset("imagefolder", "test", tmp_path)
    assert data.images.shape == (6, 3, 32, 32) and data.classes == ("cat", "dog")
    (tmp_path / "test" / "dog" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"bad\.png"):
        load_dataset("imagefolder", "test", tmp_path)
