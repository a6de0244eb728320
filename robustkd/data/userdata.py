"""Data a user brings: an ImageFolder tree, a folder of unlabelled images, or an ``.npz``.

``load_user_data`` reads any of the three into an ``ImageDataset`` without resizing (every
image must share one size and one channel count) and fills ``ids`` so that each image can be
traced back to its file. ``extract_zip`` unpacks an uploaded archive safely. Everything here
is untrusted input: images are decoded only through the formats of the safe reader
(``robustkd.data.images``), ``.npz`` files are read without pickles and their shapes are checked
before any array is allocated, and every mistake is one ``DataError`` sentence that names the
file at fault by its path inside the data, never a decoder's message.
"""

from __future__ import annotations

import io
import lzma
import os
import re
import shutil
import stat
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from robustkd.data.datasets import IMAGE_SUFFIXES, ImageDataset, channel_stats
from robustkd.data.images import FORMAT_NAMES, MAX_PIXELS, read_pixels
from robustkd.errors import ConfigError, DataError

DATA_KINDS = ("imagefolder", "unlabelled", "npz")
# decoded pixels held in memory at once; a set larger than this needs a streaming pipeline
MAX_DATA_BYTES = 32 * 2**30
MAX_CLASSES = 100_000  # bounds the class list made up from the largest label of an .npz
_MAX_NAME_CHARS = 1000  # a class name longer than this is a forged file, not a label
_GIVE = "give an ImageFolder folder (one sub-folder per class), a folder of images or an .npz"
_CHUNK = 1 << 20
_DECODE_BATCH = 64  # image files per decoding task
_THREADED_FILE_BYTES = 16_384  # decode files larger than this on several threads
# tiny members compress far (blank images, text) and cannot make a bomb; ratios count above this
_RATIO_FLOOR = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


def _hidden(name: str) -> bool:
    """Dot-files and macOS archive debris are never data."""
    return name.startswith(".") or name == "__MACOSX"


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _listing(folder: Path) -> list[Path]:
    try:
        return sorted((p for p in folder.iterdir() if not _hidden(p.name)), key=lambda p: p.name)
    except OSError as exc:
        raise DataError(
            f"Cannot list the folder {folder.name}; check that it is readable."
        ) from exc


def _suffixes() -> str:
    return ", ".join(sorted(IMAGE_SUFFIXES))


def detect_kind(path: str | Path) -> str:
    """Which of ``DATA_KINDS`` the file or folder at ``path`` is (checked, not guessed)."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root} does not exist; {_GIVE}.")
    if root.is_file():
        if root.suffix.lower() == ".npz":
            return "npz"
        raise DataError(f"{root.name} is neither a folder nor an .npz file; {_GIVE}.")
    if not root.is_dir():
        raise DataError(f"{root.name} is neither a folder nor a regular file; {_GIVE}.")
    entries = _listing(root)
    if not entries:
        raise DataError(f"The folder {root.name} is empty; {_GIVE}.")
    folders = [p for p in entries if p.is_dir()]
    images = [p for p in entries if p.is_file() and _is_image(p)]
    if folders and images:
        # neither layout fits: guessing would silently drop images or invent a class
        raise DataError(
            f"The folder {root.name} holds class folders and also loose images such as "
            f"{images[0].name}; move every image into its class folder."
        )
    if folders:
        return "imagefolder"
    if images:
        return "unlabelled"
    npz = [p.name for p in entries if p.suffix.lower() == ".npz"]
    hint = f"give the file {npz[0]} itself" if npz else f"add images ({_suffixes()})"
    raise DataError(f"The folder {root.name} holds no images and no class folders; {hint}.")


# --------------------------------------------------------------------------- image folders


def _class_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """Image files under a class folder (sub-folders included, sorted) and the other files."""
    images: list[Path] = []
    others: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))  # walk in a fixed order
        for f in sorted(f for f in filenames if not _hidden(f)):
            p = Path(dirpath, f)
            (images if _is_image(p) else others).append(p)
    return images, others


def _decode(path: Path, rel: str) -> np.ndarray:
    """One image file as uint8 ``(H, W)`` (grey) or ``(H, W, 3)``, by the one safe reader."""
    return read_pixels(path, f"image {rel}")


def _batches(items: list[Any] | tuple[Any, ...]) -> Iterator[Any]:
    # a task per file costs more than decoding a small image; a task per batch does not
    return (items[i : i + _DECODE_BATCH] for i in range(0, len(items), _DECODE_BATCH))


def _decode_batch(paths: list[Path], rels: tuple[str, ...]) -> list[np.ndarray]:
    return [_decode(p, r) for p, r in zip(paths, rels, strict=True)]


def _describe(array: np.ndarray) -> str:
    return f"{array.shape[1]}×{array.shape[0]}"


def _read_images(root: Path, files: list[Path]) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Decode ``files`` (in order) into uint8 ``(N, C, H, W)``; all must agree in size and mode."""
    ids = tuple(p.relative_to(root).as_posix() for p in files)
    out: np.ndarray | None = None
    first: tuple[str, np.ndarray] | None = None
    grey: str | None = None
    colour: str | None = None
    # PIL releases the GIL while decoding, which pays off for photos; tiny files (icons,
    # 32×32 PNGs) decode faster than threads hand the GIL around, so they stay on one
    try:
        small = files[0].stat().st_size < _THREADED_FILE_BYTES if files else True
    except OSError:
        small = True
    workers = 1 if small else max(1, min(8, os.cpu_count() or 1))
    with warnings.catch_warnings():
        # our own pixel cap (below PIL's) refuses large images; PIL's warning would only be noise
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(workers) as pool:
            try:
                batches = pool.map(_decode_batch, _batches(files), _batches(ids))
                arrays = (a for batch in batches for a in batch)
                for i, array in enumerate(arrays):
                    if array.ndim == 2:
                        grey = grey or ids[i]
                    else:
                        colour = colour or ids[i]
                    if grey and colour:
                        raise DataError(
                            f"The images mix grey and colour files ({grey} is grey, {colour} is "
                            "colour); convert them all to one mode."
                        )
                    if first is None:
                        first = (ids[i], array)
                        channels = 1 if array.ndim == 2 else 3
                        total = len(files) * channels * array.shape[0] * array.shape[1]
                        if total > MAX_DATA_BYTES:
                            raise DataError(
                                f"{len(files):,} images of {_describe(array)} pixels need "
                                f"{total / 2**30:.1f} GiB, more than the limit of "
                                f"{MAX_DATA_BYTES / 2**30:.0f} GiB; use fewer or smaller images."
                            )
                        out = np.empty(
                            (len(files), channels, array.shape[0], array.shape[1]), np.uint8
                        )
                    elif array.shape[:2] != first[1].shape[:2]:
                        raise DataError(
                            f"The images differ in size ({first[0]} is {_describe(first[1])}, "
                            f"{ids[i]} is {_describe(array)} pixels); resize them all to one size."
                        )
                    assert out is not None
                    out[i] = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
            except BaseException:
                pool.shutdown(cancel_futures=True)  # stop decoding the rest after a mistake
                raise
    assert out is not None
    return torch.from_numpy(out), ids


def _check_count(count: int, max_images: int, where: str) -> None:
    if count > max_images:
        raise DataError(
            f"{where} holds {count:,} images, more than the limit of {max_images:,}; "
            "use a smaller set."
        )


def _load_imagefolder(root: Path, name: str, max_images: int) -> ImageDataset:
    folders = [p for p in _listing(root) if p.is_dir()]
    files: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        images, others = _class_files(folder)
        if not images and not others:
            raise DataError(
                f"The class folder {folder.name} is empty; put its images in it or remove it."
            )
        if not images:
            raise DataError(
                f"The class folder {folder.name} holds no images, only other files such as "
                f"{others[0].relative_to(root).as_posix()}; add {FORMAT_NAMES} images or "
                "remove the folder."
            )
        files += images
        labels += [label] * len(images)
        _check_count(len(files), max_images, f"The folder {root.name}")
    images_t, ids = _read_images(root, files)
    mean, std = channel_stats(images_t)
    return ImageDataset(
        images=images_t,
        labels=torch.tensor(labels, dtype=torch.long),
        classes=tuple(p.name for p in folders),
        mean=mean,
        std=std,
        name=name,
        ids=ids,
    )


def _load_unlabelled(root: Path, name: str, max_images: int) -> ImageDataset:
    files = [p for p in _listing(root) if p.is_file() and _is_image(p)]
    _check_count(len(files), max_images, f"The folder {root.name}")
    images, ids = _read_images(root, files)
    mean, std = channel_stats(images)
    return ImageDataset(
        images=images,
        labels=torch.full((len(files),), -1, dtype=torch.long),
        classes=(),
        mean=mean,
        std=std,
        name=name,
        ids=ids,
    )


# --------------------------------------------------------------------------- .npz files


def _npz_header(npz: np.lib.npyio.NpzFile, key: str, file: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an .npz, read from its header before any allocation."""
    member = f"{key}.npy" if f"{key}.npy" in npz.zip.namelist() else key
    try:
        with npz.zip.open(member) as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            else:  # 3.0 exists only for structured dtypes, which no image array uses
                raise ValueError(version)
    except Exception as exc:
        raise DataError(
            f"The array {key} in {file} is damaged or not a plain numpy array; save it again "
            "with numpy.savez."
        ) from exc
    return tuple(int(v) for v in shape), dtype


def _npz_array(npz: np.lib.npyio.NpzFile, key: str, file: str) -> np.ndarray:
    try:
        return np.asarray(npz[key])
    except Exception as exc:  # CRC errors, truncation, pickled objects
        raise DataError(
            f"The array {key} in {file} cannot be read (damaged, or it holds Python objects); "
            "save it again with numpy.savez."
        ) from exc


def _npz_classes(npz: np.lib.npyio.NpzFile, file: str) -> tuple[str, ...]:
    shape, dtype = _npz_header(npz, "classes", file)
    # the header alone could ask for terabytes (a huge string width): bound it before reading
    long_names = dtype.itemsize > 4 * _MAX_NAME_CHARS
    if dtype.kind not in "US" or len(shape) != 1 or shape[0] > MAX_CLASSES or long_names:
        raise DataError(
            f"The classes array in {file} must be a 1-D array of at most {MAX_CLASSES:,} "
            f"strings of at most {_MAX_NAME_CHARS} characters; got {dtype} shaped {shape}."
        )
    raw = _npz_array(npz, "classes", file)
    try:
        classes = tuple(v.decode() if isinstance(v, bytes) else str(v) for v in raw.tolist())
    except UnicodeDecodeError as exc:
        raise DataError(
            f"The class names in {file} are not valid UTF-8 text; save them as str."
        ) from exc
    if len(set(classes)) != len(classes):
        dup = next(c for c in classes if classes.count(c) > 1)
        raise DataError(f"The class name {dup!r} appears twice in {file}; give each class once.")
    return classes


def _load_npz(file: Path, name: str, allow_unlabelled: bool, max_images: int) -> ImageDataset:
    where = file.name
    try:
        npz = np.load(file, allow_pickle=False)
    except Exception as exc:
        raise DataError(
            f"{where} is not a readable .npz file; save the arrays with numpy.savez(path, x=..., "
            "y=...)."
        ) from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):  # a renamed .npy or pickle
        raise DataError(
            f"{where} is not an .npz archive; save the arrays with numpy.savez(path, x=..., y=...)."
        )
    with npz:
        if "x" not in npz.files:
            held = ", ".join(npz.files) or "nothing"
            raise DataError(
                f"{where} has no array named x (it holds {held}); save the images as x, uint8 "
                "shaped N×H×W or N×H×W×C."
            )
        shape, dtype = _npz_header(npz, "x", where)
        if dtype != np.uint8:
            raise DataError(
                f"The images x in {where} are {dtype}, not uint8; save them as uint8 pixels "
                "from 0 to 255."
            )
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
            flipped = len(shape) == 4 and shape[1] in (1, 3)
            raise DataError(
                f"The images x in {where} are shaped {shape}; save them as N×H×W or N×H×W×C "
                "with C = 1 or 3 (channels last"
                + (", so transpose this channels-first array)." if flipped else ").")
            )
        n, height, width = shape[:3]
        channels = shape[3] if len(shape) == 4 else 1
        if n == 0:
            raise DataError(f"The array x in {where} holds no images; save at least one.")
        _check_count(n, max_images, where)
        if height * width > MAX_PIXELS or n * channels * height * width > MAX_DATA_BYTES:
            raise DataError(
                f"The images x in {where} ({shape}) are larger than this reader takes "
                f"({MAX_PIXELS:,} pixels an image, {MAX_DATA_BYTES / 2**30:.0f} GiB in all); "
                "use fewer or smaller images."
            )

        labels: torch.Tensor
        if "y" in npz.files:
            y_shape, y_dtype = _npz_header(npz, "y", where)
            if y_dtype.kind not in "iu":
                raise DataError(
                    f"The labels y in {where} are {y_dtype}; save them as integers (class indices)."
                )
            if y_shape != (n,):
                raise DataError(
                    f"The labels y in {where} are shaped {y_shape} but x holds {n} images; "
                    "give one label per image."
                )
            y = _npz_array(npz, "y", where)
            bad = np.flatnonzero(y < 0)
            if bad.size:
                raise DataError(
                    f"The labels y in {where} include {int(y[bad[0]])} (at index {bad[0]}); "
                    "class indices start at 0."
                )
            top = int(y.max())
            if "classes" in npz.files:
                classes = _npz_classes(npz, where)
                if top >= len(classes):
                    raise DataError(
                        f"The labels y in {where} go up to {top} but only {len(classes)} class "
                        "names are given; give one name per class index."
                    )
            elif top >= MAX_CLASSES:
                raise DataError(
                    f"The labels y in {where} go up to {top}, more than {MAX_CLASSES:,} classes; "
                    "number the classes from 0."
                )
            else:  # no names given: classes are called by their index
                classes = tuple(str(i) for i in range(top + 1))
            labels = torch.from_numpy(y.astype(np.int64))
        else:
            if not allow_unlabelled:
                raise DataError(
                    f"{where} has no labels (no array y); only the distillation set may be "
                    "unlabelled, so add y with one class index per image."
                )
            # names, if given, still say what the teacher's outputs mean
            classes = _npz_classes(npz, where) if "classes" in npz.files else ()
            labels = torch.full((n,), -1, dtype=torch.long)

        x = _npz_array(npz, "x", where)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    images = torch.from_numpy(np.ascontiguousarray(x))
    mean, std = channel_stats(images)
    return ImageDataset(
        images=images,
        labels=labels,
        classes=classes,
        mean=mean,
        std=std,
        name=name,
        ids=tuple(f"npz:{i}" for i in range(n)),
    )


def load_user_data(
    path: str | Path,
    *,
    name: str | None = None,
    allow_unlabelled: bool = False,
    max_images: int = 200_000,
) -> ImageDataset:
    """Read an ImageFolder tree, a folder of unlabelled images or an ``.npz`` as it is.

    Images keep their size (all must share one size and one channel count: grey → 1,
    colour → 3). ImageFolder labels are the sorted class-folder index; unlabelled images get
    label ``-1`` and, from a folder, no classes. ``ids`` are paths relative to the folder, or
    ``"npz:INDEX"``. ``allow_unlabelled`` is for the distillation set only.
    """
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ConfigError(f"max_images must be a positive integer; got {max_images!r}.")
    root = Path(path)
    kind = detect_kind(root)
    if name is None:
        name = root.stem if kind == "npz" else root.resolve().name
    if kind == "npz":
        return _load_npz(root, name, allow_unlabelled, max_images)
    if kind == "unlabelled":
        if not allow_unlabelled:
            raise DataError(
                f"The folder {root.resolve().name} is a folder of unlabelled images; only the "
                "distillation set may be unlabelled, so give this set as an ImageFolder tree "
                "(one sub-folder per class)."
            )
        return _load_unlabelled(root, name, max_images)
    return _load_imagefolder(root, name, max_images)


# --------------------------------------------------------------------------- zip archives


def _positive(value: object, what: str, integer: bool) -> None:
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not ok or not value > 0:  # type: ignore[operator]
        kind = "integer" if integer else "number"
        raise ConfigError(f"{what} must be a positive {kind}; got {value!r}.")


def _plan(
    infos: list[zipfile.ZipInfo], max_bytes: int, max_files: int, max_ratio: float
) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """Check every member before anything is written; return the ones to extract."""
    if len(infos) > max_files:
        raise DataError(
            f"The zip archive holds {len(infos):,} entries, more than the limit of "
            f"{max_files:,}; upload fewer files."
        )
    keep: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
    seen: set[tuple[str, ...]] = set()
    declared = packed = 0
    for info in infos:
        name = info.filename
        if "\\" in name or name.startswith("/") or _DRIVE.match(name):
            raise DataError(
                f"The zip archive names an entry {name!r} with an absolute or Windows path; "
                "pack it with relative paths."
            )
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        if ".." in parts:
            raise DataError(
                f"The zip archive entry {name!r} points outside the archive (..); pack it with "
                "plain relative paths."
            )
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind == stat.S_IFLNK:
            raise DataError(
                f"The zip archive entry {name!r} is a symbolic link; pack the files themselves."
            )
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise DataError(
                f"The zip archive entry {name!r} is not a regular file or folder; pack only "
                "files and folders."
            )
        if info.flag_bits & 0x1:
            raise DataError(
                f"The zip archive entry {name!r} is encrypted; upload an archive without a "
                "password."
            )
        if not parts or any(_hidden(p) for p in parts):
            continue
        if parts in seen and not info.is_dir():  # a repeated folder entry is harmless
            raise DataError(
                f"The zip archive holds {'/'.join(parts)!r} twice; pack each file once."
            )
        seen.add(parts)
        if info.is_dir():
            keep.append((info, parts))
            continue
        if info.file_size > _RATIO_FLOOR and info.file_size > max_ratio * max(
            info.compress_size, 1
        ):
            ratio = info.file_size / max(info.compress_size, 1)
            raise DataError(
                f"The zip archive entry {name!r} expands {ratio:,.0f} times, more than the "
                f"limit of {max_ratio:g} (a zip bomb); upload the data without such padding."
            )
        declared += info.file_size
        packed += info.compress_size
        keep.append((info, parts))
    if declared > max_bytes:
        raise DataError(
            f"The zip archive expands to {declared:,} bytes, more than the limit of "
            f"{max_bytes:,}; upload less data."
        )
    if declared > _RATIO_FLOOR and declared > max_ratio * max(packed, 1):
        raise DataError(
            f"The zip archive expands {declared / max(packed, 1):,.0f} times, more than the limit "
            f"of {max_ratio:g} (a zip bomb); upload the data without such padding."
        )
    if not any(not info.is_dir() for info, _ in keep):
        raise DataError("The zip archive holds no files; upload an archive with your data in it.")
    return keep


def _chunks(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[bytes]:
    with archive.open(info) as src:
        while chunk := src.read(_CHUNK):
            yield chunk


def _write(
    archive: zipfile.ZipFile,
    members: list[tuple[zipfile.ZipInfo, tuple[str, ...]]],
    staging: Path,
    max_bytes: int,
) -> None:
    total = 0
    for info, parts in members:
        shown = "/".join(parts)
        target = staging.joinpath(*parts)
        try:
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with open(target, "xb") as out:
                for chunk in _chunks(archive, info):
                    written += len(chunk)
                    total += len(chunk)
                    # headers can lie about sizes: count what really comes out
                    if written > info.file_size or total > max_bytes:
                        raise DataError(
                            f"The zip archive entry {shown!r} holds more data than its header "
                            "declares; the archive is forged or damaged, pack it again."
                        )
                    out.write(chunk)
        except DataError:
            raise
        except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
            raise DataError(
                f"The zip archive uses {shown!r} both as a file and as a folder; pack it again "
                "with distinct names."
            ) from exc
        except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, ValueError) as exc:
            raise DataError(
                f"The zip archive entry {shown!r} is damaged (its data does not match its "
                "header); pack the archive again."
            ) from exc
        except (NotImplementedError, RuntimeError) as exc:
            raise DataError(
                f"The zip archive entry {shown!r} uses a compression this reader does not "
                "support; pack it again with standard (deflate) compression."
            ) from exc
        except OSError as exc:
            raise DataError(
                f"The zip archive entry {shown[:200]!r} could not be written (a name too long "
                "for this disk, or the disk full); shorten the names or free some space."
            ) from exc


def _data_root(dest: Path, tops: list[str]) -> Path:
    """Unwrap one top-level folder, and point at a lone .npz."""
    root = dest
    if len(tops) == 1:
        only = dest / tops[0]
        if only.is_dir():
            root = only
        elif only.suffix.lower() == ".npz":
            return only
    inner = _listing(root)
    if root != dest and len(inner) == 1 and inner[0].is_file() and inner[0].suffix == ".npz":
        return inner[0]
    return root


def extract_zip(
    source: str | Path | bytes,
    dest: str | Path,
    *,
    max_bytes: int = 2_000_000_000,
    max_files: int = 200_000,
    max_ratio: float = 200.0,
) -> Path:
    """Safely unpack an uploaded zip (a path or its bytes) into ``dest``; return the data root.

    Every entry is checked before anything is written (no absolute or ``..`` paths, no links,
    no encryption, within ``max_files``, ``max_bytes`` and ``max_ratio``); ``__MACOSX/`` and
    dot-files are skipped. Extraction goes to a hidden staging folder inside ``dest`` that is
    moved into place only when complete, so a refused archive leaves ``dest`` as it was. The
    root is the archive's single top-level folder if it has one, the path of its single
    ``.npz`` if that is all it holds, else ``dest``.
    """
    _positive(max_bytes, "max_bytes", True)
    _positive(max_files, "max_files", True)
    _positive(max_ratio, "max_ratio", False)
    if isinstance(source, (bytes, bytearray, memoryview)):
        handle: io.BytesIO | Path = io.BytesIO(bytes(source))
        what = "The uploaded file"
    else:
        handle = Path(source)
        what = handle.name
        if not handle.is_file():
            raise DataError(f"{handle} does not exist or is not a file; give a .zip archive.")
    try:
        archive = zipfile.ZipFile(handle)
    except Exception as exc:  # BadZipFile, truncated central directory, unreadable file
        raise DataError(f"{what} is not a readable zip archive; upload a .zip file.") from exc
    with archive:
        members = _plan(archive.infolist(), max_bytes, max_files, max_ratio)
        dest = Path(dest)
        created = not dest.exists()
        try:
            dest.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
        except OSError as exc:
            raise DataError(
                f"Cannot create the folder {dest.name} to extract into; choose a writable place."
            ) from exc
        try:
            _write(archive, members, staging, max_bytes)
            tops = sorted(p.name for p in staging.iterdir())
            clash = [t for t in tops if os.path.lexists(dest / t)]
            if clash:
                raise DataError(
                    f"The folder {dest.name} already holds {clash[0]!r}; extract into an empty "
                    "folder."
                )
            for top in tops:
                os.replace(staging / top, dest / top)
            staging.rmdir()
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if created:
                shutil.rmtree(dest, ignore_errors=True)  # it held only our staging folder
            raise
    return _data_root(dest, tops)
