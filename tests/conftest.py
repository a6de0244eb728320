"""Shared fixtures: small real data (a few hundred Fashion-MNIST images) and a tiny teacher."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from robustkd.data.datasets import ImageDataset, load_dataset
from robustkd.experiments.teacher import TeacherConfig, train_teacher
from robustkd.training.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def train_split() -> ImageDataset:
    return load_dataset("fashion-mnist", "train")


@pytest.fixture(scope="session")
def small_train(train_split: ImageDataset) -> ImageDataset:
    """600 real training images."""
    return train_split.subset(range(600))


@pytest.fixture(scope="session")
def small_test() -> ImageDataset:
    """300 real test images."""
    return load_dataset("fashion-mnist", "test").subset(range(300))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BadNets teacher with the student architecture, 2 epochs on 2,000 images (a few s)."""
    out = tmp_path_factory.mktemp("teacher") / "tiny.safetensors"
    config = TeacherConfig(
        architecture="small-cnn-student",
        trigger={"name": "badnets", "size": 3},
        rate=0.1,
        target=0,
        train_size=2000,
        eval_size=500,
        train=TrainConfig(epochs=2, batch_size=64, lr=0.05, seed=0, device="cpu"),
    )
    train_teacher(config, out)
    return out


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    """Write an unsigned-byte IDX file (the MNIST format)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


@pytest.fixture()
def fake_fashion(tmp_path: Path) -> Path:
    """A folder with four tiny, valid Fashion-MNIST IDX files (100 train, 20 test images)."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 100), ("t10k", 20)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


@pytest.fixture()
def seeded() -> None:
    torch.manual_seed(0)
