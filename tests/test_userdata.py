"""Users' own data: ImageFolder trees, unlabelled folders, .npz files and uploaded zips."""

from __future__ import annotations

import io
import stat
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import robustkd.data.datasets as data_module
from robustkd.data import userdata
from robustkd.data.datasets import ImageDataset, channel_stats
from robustkd.data.userdata import DATA_KINDS, detect_kind, extract_zip, load_user_data
from robustkd.errors import ConfigError, DataError

RNG = np.random.default_rng(0)


def _save(path: Path, pixels: np.ndarray, fmt: str | None = None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return pixels


def _rgb(h: int = 8, w: int = 8) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _grey(h: int = 8, w: int = 8) -> np.ndarray:
    return RNG.integers(0, 256, (h, w), dtype=np.uint8)


def _one_sentence(error: pytest.ExceptionInfo[BaseException], *names: str) -> str:
    """The message is one sentence (no decoder text after it) that names what is wrong."""
    msg = str(error.value)
    assert msg.endswith(".") and ". " not in msg and "\n" not in msg, msg
    assert "Traceback" not in msg and "PIL" not in msg, msg
    for name in names:
        assert name in msg, (name, msg)
    return msg


def _tree(root: Path) -> dict[str, np.ndarray]:
    """cat/ and dog/ (one image in a sub-folder), plus files that are not data."""
    pixels = {
        "cat/0.png": _save(root / "cat" / "0.png", _rgb()),
        "cat/1.png": _save(root / "cat" / "1.png", _rgb()),
        "dog/a.png": _save(root / "dog" / "a.png", _rgb()),
        "dog/more/b.bmp": _save(root / "dog" / "more" / "b.bmp", _rgb()),
    }
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / ".DS_Store").write_bytes(b"\0\1")
    (root / ".hidden").mkdir()
    (root / "README.md").write_text("about this data")
    return pixels


# --------------------------------------------------------------------------- loading


def test_imagefolder_keeps_pixels_labels_ids_and_stats(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    pixels = _tree(root)
    assert detect_kind(root) == "imagefolder" and "imagefolder" in DATA_KINDS
    data = load_user_data(root)
    assert data.name == "pets" and data.classes == ("cat", "dog") and data.labelled
    assert data.images.shape == (4, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert data.ids == ("cat/0.png", "cat/1.png", "dog/a.png", "dog/more/b.bmp")
    for i, rel in enumerate(data.ids):  # lossless formats: the exact pixels, channels first
        assert np.array_equal(data.images[i].permute(1, 2, 0).numpy(), pixels[rel])
    assert (data.mean, data.std) == channel_stats(data.images)
    assert load_user_data(root, name="mine").name == "mine"


def test_grey_images_jpeg_and_converted_modes(tmp_path: Path) -> None:
    root = tmp_path / "grey"
    _save(root / "a" / "0.png", _grey())
    _save(root / "a" / "1.jpg", _grey(), "JPEG")
    (root / "b").mkdir()
    Image.fromarray(_grey()).convert("1").save(root / "b" / "0.png")
    data = load_user_data(root)
    assert data.images.shape == (3, 1, 8, 8) and data.in_channels == 1
    assert set(data.images[2].unique().tolist()) <= {0, 255}  # 1-bit → grey 0/255

    colour = tmp_path / "colour"
    rgba = np.dstack([_rgb(), np.full((8, 8), 255, np.uint8)])
    rgba[0, 0, 3] = 0  # one transparent pixel, composited on black as images.py does
    _save(colour / "x" / "0.png", rgba)
    Image.fromarray(_grey()).convert("P").save(colour / "x" / "1.gif")
    data = load_user_data(colour)
    assert data.images.shape == (2, 3, 8, 8)
    assert data.images[0, :, 0, 0].tolist() == [0, 0, 0]
    assert torch.equal(
        data.images[0, :, 1:, 1:], torch.from_numpy(rgba[1:, 1:, :3]).permute(2, 0, 1)
    )


def test_unlabelled_folder(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    for i in range(3):
        _save(root / f"{i}.png", _rgb())
    (root / "list.csv").write_text("0.png\n")
    assert detect_kind(root) == "unlabelled"
    data = load_user_data(root, allow_unlabelled=True)
    assert data.labels.tolist() == [-1, -1, -1] and data.classes == () and not data.labelled
    assert data.ids == ("0.png", "1.png", "2.png") and data.images.shape == (3, 3, 8, 8)
    with pytest.raises(DataError) as err:
        load_user_data(root)
    _one_sentence(err, "pool", "only the distillation set may be unlabelled")


def test_npz_grey_colour_labels_and_classes(tmp_path: Path) -> None:
    x = RNG.integers(0, 256, (5, 6, 7), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", x=x, y=np.array([0, 2, 1, 2, 0]))
    data = load_user_data(tmp_path / "grey.npz")
    assert detect_kind(tmp_path / "grey.npz") == "npz"
    assert data.name == "grey" and data.images.shape == (5, 1, 6, 7)
    assert torch.equal(data.images[:, 0], torch.from_numpy(x))
    assert data.classes == ("0", "1", "2") and data.labels.dtype == torch.int64
    assert data.ids == tuple(f"npz:{i}" for i in range(5))

    xc = RNG.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    names = np.array(["plane", "car", "bird"])
    np.savez_compressed(tmp_path / "c.npz", x=xc, y=np.array([2, 0, 1, 1], np.uint8), classes=names)
    data = load_user_data(tmp_path / "c.npz")
    assert data.classes == ("plane", "car", "bird") and data.labels.tolist() == [2, 0, 1, 1]
    assert torch.equal(data.images, torch.from_numpy(xc).permute(0, 3, 1, 2))
    assert (data.mean, data.std) == channel_stats(data.images)

    np.savez(tmp_path / "u.npz", x=xc[..., :1], classes=names)
    data = load_user_data(tmp_path / "u.npz", allow_unlabelled=True)
    assert data.images.shape == (4, 1, 8, 8) and not data.labelled and data.num_classes == 3
    with pytest.raises(DataError) as err:
        load_user_data(tmp_path / "u.npz")
    _one_sentence(err, "u.npz", "only the distillation set may be unlabelled")


def _float64_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The straightforward float64 computation that the chunked one must equal."""
    x = images.double().div(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def test_chunked_channel_stats_match_float64(monkeypatch) -> None:
    monkeypatch.setattr(data_module, "STATS_CHUNK", 500)  # many chunks of a few images
    images = torch.from_numpy(RNG.integers(0, 256, (50, 3, 9, 7), dtype=np.uint8))
    assert channel_stats(images) == _float64_stats(images)
    flat = torch.full((4, 1, 5, 5), 7, dtype=torch.uint8)
    assert channel_stats(flat) == _float64_stats(flat)


# --------------------------------------------------------------------------- mistakes


def test_folder_mistakes(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_user_data(tmp_path / "nowhere")
    _one_sentence(err, "nowhere", "does not exist")

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"x")
    with pytest.raises(DataError) as err:
        load_user_data(tmp_path / "empty")
    _one_sentence(err, "empty", "is empty")

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError) as err:
        load_user_data(tmp_path / "notes.txt")
    _one_sentence(err, "notes.txt")

    only_npz = tmp_path / "holder"
    only_npz.mkdir()
    np.savez(only_npz / "d.npz", x=np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(DataError) as err:
        load_user_data(only_npz)
    _one_sentence(err, "holder", "d.npz")

    mixed = tmp_path / "mixed"
    _save(mixed / "cat" / "0.png", _rgb())
    _save(mixed / "stray.png", _rgb())
    with pytest.raises(DataError) as err:
        load_user_data(mixed)
    _one_sentence(err, "stray.png", "class folder")


def test_class_folder_mistakes(tmp_path: Path) -> None:
    root = tmp_path / "set"
    _save(root / "cat" / "0.png", _rgb())
    (root / "dog").mkdir()
    with pytest.raises(DataError) as err:
        load_user_data(root)
    _one_sentence(err, "dog", "is empty")
    (root / "dog" / "labels.csv").write_text("x")
    with pytest.raises(DataError) as err:
        load_user_data(root)
    _one_sentence(err, "dog", "labels.csv", "holds no images")


def test_images_that_do_not_fit_together(tmp_path: Path) -> None:
    sizes = tmp_path / "sizes"
    _save(sizes / "a" / "0.png", _rgb())
    _save(sizes / "b" / "1.png", _rgb(8, 10))
    with pytest.raises(DataError) as err:
        load_user_data(sizes)
    _one_sentence(err, "a/0.png", "8×8", "b/1.png", "10×8")

    modes = tmp_path / "modes"
    _save(modes / "a" / "0.png", _rgb())
    _save(modes / "a" / "1.png", _rgb())
    _save(modes / "b" / "2.png", _grey())
    with pytest.raises(DataError) as err:
        load_user_data(modes)
    _one_sentence(err, "b/2.png is grey", "a/0.png is colour")


def test_unreadable_and_unsafe_images(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    _save(root / "a" / "0.png", _rgb())
    (root / "a" / "1.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError) as err:
        load_user_data(root)
    _one_sentence(err, "a/1.png", "cannot be read")

    # an EPS file in disguise: PIL would hand it to Ghostscript, the reader must refuse it
    (root / "a" / "1.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")
    with pytest.raises(DataError) as err:
        load_user_data(root)
    _one_sentence(err, "a/1.png")

    half = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(half, format="PNG")
    (root / "a" / "1.png").write_bytes(half.getvalue()[:200])  # truncated pixel data
    with pytest.raises(DataError) as err:
        load_user_data(root)
    _one_sentence(err, "a/1.png")


def test_too_many_images(tmp_path: Path) -> None:
    root = tmp_path / "many"
    for i in range(4):
        _save(root / "c" / f"{i}.png", _grey())
    with pytest.raises(DataError) as err:
        load_user_data(root, max_images=3)
    _one_sentence(err, "3", "limit")
    np.savez(tmp_path / "many.npz", x=np.zeros((4, 2, 2), np.uint8), y=np.zeros(4, np.int64))
    with pytest.raises(DataError) as err:
        load_user_data(tmp_path / "many.npz", max_images=3)
    _one_sentence(err, "many.npz", "limit")
    with pytest.raises(ConfigError):
        load_user_data(root, max_images=0)


X = np.zeros((3, 4, 4), np.uint8)
Y = np.array([0, 1, 1])


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"images": X, "y": Y}, "no array named x"),
        ({"x": X.astype(np.float32), "y": Y}, "not uint8"),
        ({"x": np.zeros((3, 16), np.uint8), "y": Y}, "N×H×W"),
        ({"x": np.zeros((3, 4, 4, 4), np.uint8), "y": Y}, "C = 1 or 3"),
        ({"x": np.zeros((3, 3, 4, 4), np.uint8), "y": Y}, "transpose this channels-first"),
        ({"x": np.zeros((0, 4, 4), np.uint8), "y": Y[:0]}, "holds no images"),
        ({"x": X, "y": Y[:2]}, "one label per image"),
        ({"x": X, "y": np.array([0, -1, 1])}, "include -1"),
        ({"x": X, "y": np.array([0.0, 1.0, 1.0])}, "save them as integers"),
        ({"x": X, "y": Y, "classes": np.array(["a"])}, "one name per class"),
        ({"x": X, "y": Y, "classes": np.array(["a", "a"])}, "appears twice"),
        ({"x": X, "y": Y, "classes": np.array([1, 2])}, "strings"),
        ({"x": X, "y": Y, "classes": np.array(["a", "b" * 2000])}, "at most 1000 characters"),
    ],
)
def test_npz_mistakes(tmp_path: Path, arrays: dict[str, np.ndarray], expected: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError) as err:
        load_user_data(tmp_path / "d.npz")
    _one_sentence(err, "d.npz", expected)


def test_npz_files_that_are_not_npz(tmp_path: Path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DataError) as err:
        load_user_data(tmp_path / "junk.npz")
    _one_sentence(err, "junk.npz", "not a readable .npz")
    np.save(tmp_path / "arr.npy", X)
    (tmp_path / "arr.npy").rename(tmp_path / "arr.npz")
    with pytest.raises(DataError) as err:
        load_user_data(tmp_path / "arr.npz")
    _one_sentence(err, "arr.npz", "not an .npz")
    np.savez(tmp_path / "obj.npz", x=np.array([X, "pickle me"], dtype=object))
    with pytest.raises(DataError) as err:
        load_user_data(tmp_path / "obj.npz")
    _one_sentence(err, "obj.npz", "not uint8")


def test_dataset_ids_follow_subsets() -> None:
    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    labels = torch.tensor([0, 1, -1, 1])
    data = ImageDataset(images, labels, ("a", "b"), (0.5,), (0.5,), "d", ids=["p", "q", "r", "s"])
    assert data.ids == ("p", "q", "r", "s") and not data.labelled
    sub = data.subset([3, 1])
    assert sub.ids == ("s", "q") and sub.labelled and sub.labels.tolist() == [1, 1]
    assert data.replace(name="e").ids == data.ids and data.to("cpu").ids == data.ids
    assert ImageDataset(images, labels, ("a",), (0.5,), (0.5,), "d").subset([0]).ids is None
    with pytest.raises(DataError, match="one id per image"):
        ImageDataset(images, labels, ("a",), (0.5,), (0.5,), "d", ids=("p",))
    with pytest.raises(DataError, match="strings"):
        ImageDataset(images, labels, ("a",), (0.5,), (0.5,), "d", ids="pqrs")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- zips


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _zip(entries: dict[str, bytes], **kw: object) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, **kw) as zf:  # type: ignore[arg-type]
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _empty_or_absent(dest: Path) -> bool:
    return not dest.exists() or not any(dest.iterdir())


def test_zip_imagefolder_with_one_top_folder(tmp_path: Path) -> None:
    archive = tmp_path / "up.zip"
    archive.write_bytes(
        _zip(
            {
                "mydata/": b"",
                "mydata/cat/0.png": _png_bytes(_rgb()),
                "mydata/dog/0.png": _png_bytes(_rgb()),
                "__MACOSX/mydata/._0.png": b"junk",
                "mydata/.DS_Store": b"junk",
            }
        )
    )
    dest = tmp_path / "out"
    root = extract_zip(archive, dest)
    assert root == dest / "mydata"
    assert sorted(p.name for p in dest.iterdir()) == ["mydata"]  # no staging, no debris
    assert not (root / ".DS_Store").exists()
    data = load_user_data(root)
    assert data.classes == ("cat", "dog") and data.ids == ("cat/0.png", "dog/0.png")


def test_zip_roots_flat_and_npz(tmp_path: Path) -> None:
    flat = _zip({"cat/0.png": _png_bytes(_grey()), "dog/0.png": _png_bytes(_grey())})
    assert extract_zip(flat, tmp_path / "a") == tmp_path / "a"
    assert load_user_data(tmp_path / "a").in_channels == 1

    buf = io.BytesIO()
    np.savez(buf, x=X, y=Y)
    assert extract_zip(_zip({"set.npz": buf.getvalue()}), tmp_path / "b") == tmp_path / "b/set.npz"
    wrapped = _zip({"d/set.npz": buf.getvalue()})
    assert extract_zip(wrapped, tmp_path / "c") == tmp_path / "c/d/set.npz"
    assert len(load_user_data(tmp_path / "c/d/set.npz")) == 3


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../evil.png", "outside the archive"),
        ("ok/../../evil.png", "outside the archive"),
        ("/abs/evil.png", "absolute"),
        ("C:/evil.png", "absolute or Windows"),
        ("..\\evil.png", "absolute or Windows"),
    ],
)
def test_zip_path_tricks_are_refused(tmp_path: Path, name: str, expected: str) -> None:
    dest = tmp_path / "deep" / "out"
    with pytest.raises(DataError) as err:
        extract_zip(_zip({"good/0.png": _png_bytes(_rgb()), name: b"x"}), dest)
    _one_sentence(err, expected)
    assert _empty_or_absent(dest) and not (tmp_path / "deep" / "evil.png").exists()
    assert not (tmp_path / "evil.png").exists()


def test_zip_symlinks_and_encryption_are_refused(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("data/passwd")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("data/0.png", _png_bytes(_rgb()))
        zf.writestr(link, "/etc/passwd")
    dest = tmp_path / "out"
    with pytest.raises(DataError) as err:
        extract_zip(buf.getvalue(), dest)
    _one_sentence(err, "data/passwd", "symbolic link")
    assert _empty_or_absent(dest)

    # zipfile cannot write encrypted entries: set the "encrypted" flag in both headers
    raw = bytearray(_zip({"data/1.png": b"x"}))
    raw[raw.find(b"PK\x03\x04") + 6] |= 0x1
    raw[raw.find(b"PK\x01\x02") + 8] |= 0x1
    with pytest.raises(DataError) as err:
        extract_zip(bytes(raw), dest)
    _one_sentence(err, "encrypted")
    assert _empty_or_absent(dest)


def test_zip_bomb_and_limits(tmp_path: Path) -> None:
    bomb = _zip({"d/zeros.bin": bytes(50_000_000)})
    assert len(bomb) < 100_000
    dest = tmp_path / "out"
    with pytest.raises(DataError) as err:
        extract_zip(bomb, dest)
    _one_sentence(err, "zip bomb")
    with pytest.raises(DataError) as err:
        extract_zip(bomb, dest, max_bytes=10_000_000, max_ratio=1e9)
    _one_sentence(err, "10,000,000")
    assert _empty_or_absent(dest)

    three = _zip({f"d/{i}.png": _png_bytes(_grey()) for i in range(3)})
    with pytest.raises(DataError) as err:
        extract_zip(three, dest, max_files=2)
    _one_sentence(err, "limit of 2")
    with pytest.raises(ConfigError):
        extract_zip(three, dest, max_ratio=0)
    assert _empty_or_absent(dest)


def _patch_sizes(data: bytes, size: int) -> bytes:
    """Make both zip headers of a one-member archive declare ``size`` uncompressed bytes."""
    raw = bytearray(data)
    local = raw.find(b"PK\x03\x04")
    central = raw.find(b"PK\x01\x02")
    raw[local + 22 : local + 26] = size.to_bytes(4, "little")
    raw[central + 24 : central + 28] = size.to_bytes(4, "little")
    return bytes(raw)


def test_zip_lying_header_is_refused(tmp_path: Path, monkeypatch) -> None:
    honest = _zip({"d/big.bin": RNG.integers(0, 256, 300_000, dtype=np.uint8).tobytes()})
    dest = tmp_path / "out"
    with pytest.raises(DataError) as err:  # declares 1,000 bytes, holds 300,000
        extract_zip(_patch_sizes(honest, 1000), dest)
    _one_sentence(err, "d/big.bin")
    assert _empty_or_absent(dest)

    # were the reader ever to hand out more than declared, the byte count stops it
    def generous(archive: zipfile.ZipFile, info: zipfile.ZipInfo):
        yield bytes(info.file_size + 1)

    monkeypatch.setattr(userdata, "_chunks", generous)
    with pytest.raises(DataError) as err:
        extract_zip(honest, dest)
    _one_sentence(err, "more data than its header declares")
    assert _empty_or_absent(dest)


def test_zip_other_refusals_leave_dest_alone(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        extract_zip(b"this is no zip", tmp_path / "out")
    _one_sentence(err, "not a readable zip")
    with pytest.raises(DataError) as err:
        extract_zip(_zip({"__MACOSX/x": b"1", ".hidden": b"2"}), tmp_path / "out")
    _one_sentence(err, "holds no files")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate, as it should
        twice = io.BytesIO()
        with zipfile.ZipFile(twice, "w") as zf:
            zf.writestr("a/0.png", b"1")
            zf.writestr("a/0.png", b"2")
    with pytest.raises(DataError) as err:
        extract_zip(twice.getvalue(), tmp_path / "out")
    _one_sentence(err, "a/0.png", "twice")
    assert _empty_or_absent(tmp_path / "out")

    dest = tmp_path / "busy"
    (dest / "a").mkdir(parents=True)
    (dest / "a" / "keep.txt").write_text("mine")
    with pytest.raises(DataError) as err:
        extract_zip(_zip({"a/0.png": b"1"}), dest)
    _one_sentence(err, "already holds 'a'")
    assert sorted(p.name for p in dest.rglob("*")) == ["a", "keep.txt"]
    with pytest.raises(DataError) as err:
        extract_zip(tmp_path / "missing.zip", dest)
    _one_sentence(err, "missing.zip")
