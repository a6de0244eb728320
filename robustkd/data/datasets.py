"""Datasets: a registry of loaders that read local files only, splits and defender subsets.

Every dataset is held in memory as uint8 images ``(N, C, H, W)`` plus int64 labels; the
normalisation statistics travel with it. Nothing is ever downloaded.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from robustkd.errors import ConfigError, DataError
from robustkd.registry import Registry

FASHION_MNIST_ENV = "ROBUSTKD_FASHION_MNIST"
FASHION_MNIST_DEFAULT = Path("/usr/share/datasets/fashion-mnist")
DATA_ROOT_ENV = "ROBUSTKD_DATA"
SPLITS = ("train", "val", "test")
VALIDATION_SIZE = 5000  # images held out of the training split (the defender's validation data)
STATS_CHUNK = 1 << 24  # pixels summed at a time by channel_stats (as int64: 128 MiB)
SPLIT_SEED = 20240603  # fixes which training images form the validation split


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """Images as uint8 ``(N, C, H, W)``, labels as int64 ``(N,)``, plus what describes them.

    Unlabelled images carry label ``-1``. ``ids`` (optional) names each image where it came
    from (a relative file path, ``"npz:INDEX"``), so a flagged sample can be traced back.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"Dataset {self.name!r} must hold uint8 images shaped (N, C, H, W); "
                f"got {self.images.dtype} {tuple(self.images.shape)}."
            )
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"Dataset {self.name!r} has {self.images.shape[0]} images but "
                f"{self.labels.numel()} labels; give one label per image."
            )
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise DataError(
                f"Dataset {self.name!r} needs one mean and std per channel ({self.in_channels})."
            )
        if self.ids is not None:
            if isinstance(self.ids, str) or not all(isinstance(i, str) for i in self.ids):
                raise DataError(f"Dataset {self.name!r} needs its ids as a sequence of strings.")
            object.__setattr__(self, "ids", tuple(self.ids))  # frozen like the rest, even if a list
            if len(self.ids) != self.images.shape[0]:
                raise DataError(
                    f"Dataset {self.name!r} has {self.images.shape[0]} images but "
                    f"{len(self.ids)} ids; give one id per image."
                )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labelled(self) -> bool:
        """True when every image has a class label (unlabelled images carry ``-1``)."""
        return bool((self.labels >= 0).all())

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, *self.image_size)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageDataset:
        """The images at ``indices`` (kept in that order)."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
        ids = None if self.ids is None else tuple(self.ids[i] for i in idx.tolist())
        return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx], ids=ids)

    def replace(self, **changes: object) -> ImageDataset:
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str) -> ImageDataset:
        """The same data on ``device`` (a GPU-resident copy for fast training)."""
        return dataclasses.replace(
            self, images=self.images.to(device), labels=self.labels.to(device)
        )

    def normalization(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(uint8 images, labels)`` batches, optionally in a seeded random order."""
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=generator).to(self.images.device)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                yield self.images[idx], self.labels[idx]
        else:
            for start in range(0, n, batch_size):
                yield (
                    self.images[start : start + batch_size],
                    self.labels[start : start + batch_size],
                )


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images → float32 in [0, 1]."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] → uint8, rounded (how a poisoned image is stored on disk)."""
    return images.clamp(0, 1).mul(255.0).round_().to(torch.uint8)


def normalize(
    images: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """Float images in [0, 1] → model input, per channel ``(x − mean) / std``.

    Pass ``mean``/``std`` as tensors already on the images' device in a hot loop: built from
    Python numbers they are copied to the GPU, and the host waits, on every call.
    """
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (unbiased) std of uint8 images, as float tuples in [0, 1] units.

    Exact integer sums over chunks: no float64 copy of the whole set (8× the data in memory).
    """
    n, c, h, w = images.shape
    step = max(1, STATS_CHUNK // max(1, c * h * w))
    s1 = [0] * c
    s2 = [0] * c
    for start in range(0, n, step):
        chunk = images[start : start + step].to(torch.int64)
        sums = chunk.sum(dim=(0, 2, 3)).tolist()
        squares = (chunk * chunk).sum(dim=(0, 2, 3)).tolist()
        for k in range(c):
            s1[k] += sums[k]
            s2[k] += squares[k]
    count = n * h * w
    mean = tuple(round(a / count / 255.0, 4) for a in s1)
    var = [(b * count - a * a) / (count * max(count - 1, 1)) for a, b in zip(s1, s2, strict=True)]
    std = tuple(round(max(v**0.5 / 255.0, 1e-6), 4) for v in var)
    return mean, std


# --------------------------------------------------------------------------- loaders

Loader = Callable[[str, "Path | None"], ImageDataset]
DATASETS: Registry[Loader] = Registry("dataset")


def dataset_names() -> list[str]:
    return DATASETS.names()


def load_dataset(name: str, split: str = "test", root: str | Path | None = None) -> ImageDataset:
    """Load split ``train``, ``val`` or ``test`` of a registered dataset from local files.

    ``train`` and ``val`` are a fixed, seeded partition of the official training images
    (``val`` holds ``VALIDATION_SIZE`` of them); ``test`` is the official test set.
    """
    loader = DATASETS.get(name)
    if split not in SPLITS:
        raise ConfigError(f"Unknown split {split!r}; choose one of: {', '.join(SPLITS)}.")
    return loader(split, Path(root) if root is not None else None)


def _train_val(full: ImageDataset, split: str) -> ImageDataset:
    n = len(full)
    n_val = min(VALIDATION_SIZE, n // 10)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    idx = order[:n_val] if split == "val" else order[n_val:]
    return full.subset(idx.sort().values)


def defender_subset(
    dataset: ImageDataset, size: float | int, seed: int = 0, exclude: torch.Tensor | None = None
) -> tuple[ImageDataset, torch.Tensor]:
    """A seeded random subset the defender holds as trusted clean data.

    ``size`` is a fraction in (0, 1] or an image count; ``exclude`` lists indices that must
    not be drawn (e.g. the distillation set). Returns the subset and its indices.
    """
    available = torch.ones(len(dataset), dtype=torch.bool)
    if exclude is not None:
        available[torch.as_tensor(exclude, dtype=torch.long)] = False
    pool = torch.nonzero(available).flatten()
    if isinstance(size, float):
        if not 0 < size <= 1:
            raise ConfigError(f"A subset fraction must lie in (0, 1]; got {size}.")
        count = max(1, round(size * len(pool)))
    else:
        count = int(size)
    if count < 1 or count > len(pool):
        raise ConfigError(
            f"Cannot draw {count} images from the {len(pool)} available in {dataset.name!r}; "
            "choose a size between 1 and that number."
        )
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    idx = pool[order[:count]].sort().values
    return dataset.subset(idx), idx


# ---- IDX (MNIST-family) files


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array; corrupt files raise DataError."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(
            f"Cannot read {path}: {exc}; the file is corrupt, replace it with a good copy."
        ) from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file; replace it with a good copy.")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated (no complete header); replace it with a good copy.")
    shape = struct.unpack(">" + "I" * ndim, data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DataError(
            f"{path} holds {len(data) - header} bytes of data but its header promises "
            f"{expected}; the file is corrupt or truncated, replace it with a good copy."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.exists():
            return candidate
    raise DataError(
        f"Missing {stem}(.gz) in {folder}; install Debian's dataset-fashion-mnist package "
        f"(apt-get install dataset-fashion-mnist) or set {FASHION_MNIST_ENV} to a folder "
        "holding the four IDX files."
    )


FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MEAN, FASHION_STD = (0.286,), (0.353,)


def fashion_mnist_root(root: Path | None = None) -> Path:
    """The folder holding the Fashion-MNIST IDX files: argument, environment, then Debian's."""
    if root is not None:
        return root
    env = os.environ.get(FASHION_MNIST_ENV)
    return Path(env) if env else FASHION_MNIST_DEFAULT


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(split: str, root: Path | None = None) -> ImageDataset:
    folder = fashion_mnist_root(root)
    if not folder.is_dir():
        raise DataError(
            f"Fashion-MNIST folder {folder} does not exist; install Debian's "
            "dataset-fashion-mnist package (apt-get install dataset-fashion-mnist) or set "
            f"{FASHION_MNIST_ENV} / --data-root to a folder holding the four IDX files."
        )
    prefix = "t10k" if split == "test" else "train"
    images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"Fashion-MNIST files in {folder} do not match (images {images.shape}, labels "
            f"{labels.shape}); replace them with a good copy."
        )
    if labels.size and int(labels.max()) >= len(FASHION_CLASSES):
        raise DataError(f"Fashion-MNIST labels in {folder} exceed 9; the file is corrupt.")
    full = ImageDataset(
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=FASHION_CLASSES,
        mean=FASHION_MEAN,
        std=FASHION_STD,
        name="fashion-mnist",
    )
    return full if split == "test" else _train_val(full, split)


# ---- folder-based datasets (never downloaded)


def _data_root(root: Path | None, name: str) -> Path:
    if root is not None:
        return root
    env = os.environ.get(DATA_ROOT_ENV)
    if not env:
        raise DataError(
            f"Dataset {name!r} is read from a local folder; pass --data-root DIR (or set "
            f"{DATA_ROOT_ENV}) pointing at the folder that holds it."
        )
    return Path(env) / name


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="latin1")
    except FileNotFoundError as exc:
        raise DataError(f"Missing {path}; put the CIFAR python batches there.") from exc
    except Exception as exc:
        raise DataError(f"Cannot read {path} ({exc}); replace it with a good copy.") from exc


def _cifar(split: str, root: Path | None, name: str, folder_name: str) -> ImageDataset:
    base = _data_root(root, name)
    folder = base / folder_name if (base / folder_name).is_dir() else base
    if not folder.is_dir():
        raise DataError(
            f"{name} folder {folder} does not exist; extract the official python-version "
            f"archive so that {folder_name}/ lies inside --data-root."
        )
    if name == "cifar10":
        files = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
        label_key = "labels"
        meta = _unpickle(folder / "batches.meta")["label_names"]
    else:
        files = ["test"] if split == "test" else ["train"]
        label_key = "fine_labels"
        meta = _unpickle(folder / "meta")["fine_label_names"]
    xs, ys = [], []
    for f in files:
        d = _unpickle(folder / f)
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs))
    full = ImageDataset(
        images=x,
        labels=torch.from_numpy(np.concatenate(ys)),
        classes=tuple(meta),
        mean=(0.4914, 0.4822, 0.4465) if name == "cifar10" else (0.5071, 0.4865, 0.4409),
        std=(0.2470, 0.2435, 0.2616) if name == "cifar10" else (0.2673, 0.2564, 0.2762),
        name=name,
    )
    return full if split == "test" else _train_val(full, split)


@DATASETS.register("cifar10")
def load_cifar10(split: str, root: Path | None = None) -> ImageDataset:
    return _cifar(split, root, "cifar10", "cifar-10-batches-py")


@DATASETS.register("cifar100")
def load_cifar100(split: str, root: Path | None = None) -> ImageDataset:
    return _cifar(split, root, "cifar100", "cifar-100-python")


@DATASETS.register("svhn")
def load_svhn(split: str, root: Path | None = None) -> ImageDataset:
    base = _data_root(root, "svhn")
    path = base / ("test_32x32.mat" if split == "test" else "train_32x32.mat")
    if not path.exists():
        raise DataError(
            f"Missing {path}; put SVHN's train_32x32.mat and test_32x32.mat in --data-root."
        )
    try:
        from scipy.io import loadmat
    except ImportError as exc:  # scipy is a declared dependency; say so if it is missing
        raise DataError("Reading SVHN needs scipy; pip install scipy.") from exc
    try:
        mat = loadmat(path)
    except Exception as exc:
        raise DataError(f"Cannot read {path} ({exc}); replace it with a good copy.") from exc
    x = torch.from_numpy(np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1)))
    y = torch.from_numpy(mat["y"].astype(np.int64).flatten() % 10)  # SVHN stores digit 0 as 10
    full = ImageDataset(
        images=x,
        labels=y,
        classes=tuple(str(i) for i in range(10)),
        mean=(0.4377, 0.4438, 0.4728),
        std=(0.1980, 0.2010, 0.1970),
        name="svhn",
    )
    return full if split == "test" else _train_val(full, split)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".gif", ".tif", ".tiff", ".webp"}


def read_image_folder(
    folder: Path, name: str, image_size: int = 32, channels: int = 3
) -> ImageDataset:
    """Read ``folder/CLASS/*.png|jpg…`` into memory, resized to ``image_size`` squares."""
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise DataError(
            f"Image folder {folder} does not exist; make one sub-folder per class with the "
            "images inside (ImageFolder layout)."
        )
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{folder} has no class sub-folders; put each class's images in its own.")
    mode = "L" if channels == 1 else "RGB"
    xs, ys = [], []
    for label, cls in enumerate(classes):
        for f in sorted((folder / cls).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert(mode).resize((image_size, image_size), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"Cannot read image {f} ({exc}); remove or replace it.") from exc
            xs.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise DataError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    images = torch.from_numpy(np.stack(xs))
    mean, std = channel_stats(images)
    return ImageDataset(
        images=images,
        labels=torch.tensor(ys, dtype=torch.long),
        classes=tuple(classes),
        mean=mean,
        std=std,
        name=name,
    )


def _folder_split(name: str, split: str, root: Path | None, sub: dict[str, str]) -> ImageDataset:
    base = _data_root(root, name)
    full = read_image_folder(base / sub["test" if split == "test" else "train"], name)
    return full if split == "test" else _train_val(full, split)


@DATASETS.register("gtsrb")
def load_gtsrb(split: str, root: Path | None = None) -> ImageDataset:
    """GTSRB in ImageFolder layout: ``train/00000…/`` and ``test/00000…/`` under --data-root."""
    return _folder_split("gtsrb", split, root, {"train": "train", "test": "test"})


@DATASETS.register("imagefolder")
def load_imagefolder(split: str, root: Path | None = None) -> ImageDataset:
    """Any ImageFolder tree: ``train/CLASS/*`` and ``test/CLASS/*`` under --data-root."""
    return _folder_split("imagefolder", split, root, {"train": "train", "test": "test"})
