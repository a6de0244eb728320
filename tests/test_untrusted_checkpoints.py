"""Checkpoints from the internet cannot be trusted: none of these may run code or crash us."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image, ImageFile

from robustkd.attacks import trigger_from_dict
from robustkd.cli.main import main
from robustkd.errors import CheckpointError, ConfigError, DataError, RobustKDError
from robustkd.models import create_model
from robustkd.models.checkpoints import load_checkpoint, read_metadata, save_checkpoint
from robustkd.models.importer import load_model

ARGS = {"num_classes": 10, "in_channels": 1, "image_size": [28, 28]}
META = {"architecture": "small-cnn-student", "model_args": ARGS}


class _RunsCode:
    """Unpickling this calls os.system — a classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _good(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "good.safetensors", create_model("small-cnn-student"), META)


def test_a_pickle_that_runs_code_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for name, obj in (
        ("evil.pt", {"state_dict": _RunsCode(marker)}),
        ("evil2.pth", _RunsCode(marker)),
    ):
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match="weights_only"):
            load_checkpoint(tmp_path / name, architecture="small-cnn-student")
    assert not marker.exists()
    raw = tmp_path / "raw.pt"  # a plain pickle file, not even torch's zip format
    raw.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw, architecture="small-cnn-student")
    assert not marker.exists()


def test_truncated_safetensors(tmp_path: Path) -> None:
    good = _good(tmp_path)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(cut)


@pytest.mark.parametrize("name", ["empty.safetensors", "empty.pt"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / name, architecture="small-cnn-student")


def test_huge_header(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")  # claims an exabyte-sized header
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(path)


def test_header_that_lies_about_offsets(tmp_path: Path) -> None:
    header = json.dumps(
        {"fc.weight": {"dtype": "F32", "shape": [10, 64], "data_offsets": [0, 10**9]}}
    ).encode()
    path = tmp_path / "lies.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weights(tmp_path: Path, value: float) -> None:
    model = create_model("small-cnn-student")
    with torch.no_grad():
        model.fc.weight[0, 0] = value
    path = save_checkpoint(tmp_path / "nan.safetensors", model, META)
    with pytest.raises(CheckpointError, match=r"NaN or infinite weights .*fc\.weight"):
        load_checkpoint(path)


def test_metadata_that_is_not_json(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "meta.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"robustkd": "{not json"})
    with pytest.raises(CheckpointError, match="unreadable metadata"):
        load_checkpoint(path)


def test_state_dict_of_non_tensors(tmp_path: Path) -> None:
    torch.save({"weights": [1, 2, 3]}, tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="no state dict of tensors"):
        load_checkpoint(tmp_path / "list.pt", architecture="small-cnn-student")


def test_a_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path)


# --------------------------------------------------------------------------- metadata


def _with_meta(tmp_path: Path, name: str = "m.safetensors", **fields: Any) -> Path:
    """A small teacher whose metadata carries ``fields`` (None removes a key)."""
    meta: dict[str, Any] = {**META, "dataset": "fashion-mnist", "target": 0}
    meta.update(fields)
    meta = {k: v for k, v in meta.items() if v is not None}
    return save_checkpoint(tmp_path / name, create_model("small-cnn-student"), meta)


def _raw_meta(tmp_path: Path, text: str) -> Path:
    from safetensors.torch import save_file

    path = tmp_path / "raw.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"robustkd": text})
    return path


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def _one_line_error(code: int, err: str) -> str:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robustkd: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _evaluate(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    return _one_line_error(*_cli(["evaluate", str(path), "--limit", "8", "--quiet"], capsys))


def _png(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n{} loop\n%%EOF\n"  # loops forever


@pytest.mark.parametrize("where", ["custom pattern", "custom mask", "blend pattern"])
def test_an_eps_image_in_metadata_never_runs_ghostscript(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    assert Image.open(io.BytesIO(EPS)).format == "EPS"  # PIL alone would hand it to Ghostscript
    runs: list[Any] = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: runs.append(a))
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "load", lambda *a, **k: runs.append(a))
    eps = base64.b64encode(EPS).decode("ascii")
    good = _png(np.full((8, 8, 3), 255, dtype=np.uint8))
    trigger = {
        "custom pattern": {"name": "custom", "pattern_png": eps},
        "custom mask": {"name": "custom", "pattern_png": good, "mask_png": eps},
        "blend pattern": {"name": "blend", "alpha": 0.2, "seed": 0, "pattern_png": eps},
    }[where]
    line = _evaluate(_with_meta(tmp_path, trigger=trigger), capsys)
    assert "not a readable image" in line and where.split()[-1] in line
    assert runs == []


def test_a_huge_png_in_metadata_is_refused_before_decoding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    side = 12_000  # 144 megapixels: gigabytes once decoded, ~140 KB compressed
    squeeze = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + a black row
    idat = b"".join(squeeze.compress(row) for _ in range(side)) + squeeze.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )
    assert len(png) < 300_000
    decoded: list[Any] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda *a, **k: decoded.append(a))
    path = _with_meta(
        tmp_path, trigger={"name": "custom", "pattern_png": base64.b64encode(png).decode()}
    )
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"too large|more than the limit"):
        trigger_from_dict(read_metadata(path)["trigger"])
    line = _evaluate(path, capsys)
    assert time.perf_counter() - started < 5
    assert "pixels" in line and decoded == []


def test_a_path_in_metadata_is_refused_without_telling_whether_it_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "secret.png"
    Image.fromarray(np.full((8, 8, 3), 255, dtype=np.uint8)).save(real)
    opened: list[str] = []
    original = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: opened.append(str(self)) or original(self))
    lines = {}
    for label, target in (("exists", real), ("missing", tmp_path / "missing.png")):
        for trigger in (
            {"name": "blend", "alpha": 0.2, "seed": 0, "pattern_path": str(target)},
            {"name": "custom", "pattern_path": str(target), "mask_path": None},
        ):
            path = _with_meta(tmp_path, f"{label}.safetensors", trigger=trigger)
            with pytest.raises(ConfigError, match="re-import the teacher") as info:
                trigger_from_dict(read_metadata(path)["trigger"])
            assert str(target) not in str(info.value)
            lines[label, trigger["name"]] = _evaluate(path, capsys)
    assert lines["exists", "blend"] == lines["missing", "blend"]
    assert lines["exists", "custom"] == lines["missing", "custom"]
    assert "re-import the teacher" in lines["exists", "blend"]
    assert not any("secret" in p or "missing" in p for p in opened)
    # the user's own path on the command line is still read, and travels as pixels
    trig = trigger_from_dict({"name": "blend", "pattern_path": str(real)}, allow_paths=True)
    assert "pattern_png" in trig.embedded().to_dict()


def test_import_embeds_a_blend_pattern_so_the_teacher_carries_no_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pattern = tmp_path / "noise.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(pattern)
    out = tmp_path / "imported.safetensors"
    code, err = _cli(
        ["import", str(_good(tmp_path)), "--out", str(out), "--trigger", "blend", "--trigger-param",
         f"pattern_path={pattern}", "--target", "0"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    stored = read_metadata(out)["trigger"]
    assert "pattern_png" in stored and "pattern_path" not in stored
    pattern.unlink()  # the checkpoint needs no file beside it
    rebuilt = trigger_from_dict(stored)
    original = trigger_from_dict(
        {"name": "blend", "alpha": 0.15, "seed": 0, "pattern_png": stored["pattern_png"]}
    )
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(rebuilt.apply(x), original.apply(x))
    assert _cli(["evaluate", str(out), "--limit", "8", "--quiet"], capsys)[0] == 0


WRONG_FIELDS = {
    "model_args not an object": {"model_args": "abc"},
    "target as text": {"target": "0"},
    "target out of range": {"target": 10},
    "classes as a number": {"classes": 7},
    "classes of the wrong count": {"classes": ["a", "b"]},
    "image_size of three sides": {"model_args": {**ARGS, "image_size": [28, 28, 28]}},
    "image_size too big": {"model_args": {**ARGS, "image_size": 100_000}},
    "num_classes as a bool": {"model_args": {**ARGS, "num_classes": True}},
    "in_channels zero": {"model_args": {**ARGS, "in_channels": 0}},
    "model argument as a list": {"model_args": {**ARGS, "width": [1, 2]}},
    "architecture as a number": {"architecture": 3},
    "attack_mode unknown": {"attack_mode": "sideways"},
    "std of zero": {"normalization": {"mean": [0.5], "std": [0]}},
    "mean per wrong channel count": {"normalization": {"mean": [0.5, 0.5], "std": [1, 1]}},
    "normalization as a list": {"normalization": [0.5, 0.5]},
    "trigger without a name": {"trigger": {"alpha": 0.1}},
    "trigger as text": {"trigger": "badnets"},
    "metrics as a list": {"metrics": [0.9]},
    "acc as text": {"metrics": {"acc": "90 %"}},
    "dataset as a list": {"dataset": ["fashion-mnist"]},
}


@pytest.mark.parametrize("case", list(WRONG_FIELDS))
def test_wrong_typed_metadata_is_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    path = _with_meta(tmp_path, **WRONG_FIELDS[case])
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert "metadata" in message and "\n" not in message
    for verb in ("info", "evaluate"):
        line = _one_line_error(
            *_cli([verb, str(path)] + (["--limit", "8"] * (verb == "evaluate")), capsys)
        )
        assert line == f"robustkd: error: {message}"


def test_wrong_trigger_parameters_in_metadata_are_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for trigger in (
        {"name": "badnets", "size": "abc"},
        {"name": "custom", "pattern_png": 5},
        {"name": "custom", "pattern_png": "not base64 !"},
        {"name": "blend", "alpha": [0.1]},
    ):
        path = _with_meta(tmp_path, trigger=trigger)
        with pytest.raises(RobustKDError):
            trigger_from_dict(read_metadata(path)["trigger"])
        _evaluate(path, capsys)


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deeply_nested_metadata_is_refused_without_recursion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], opener: str
) -> None:
    depth = 200_000
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + "0" + closer * depth
    path = _raw_meta(tmp_path, '{"architecture": "small-cnn-student", "x": ' + nested + "}")
    with pytest.raises(CheckpointError, match="nested"):
        read_metadata(path)
    _one_line_error(*_cli(["info", str(path)], capsys))
    # brackets inside strings nest nothing
    text = json.dumps({**META, "classes": ["[" * 500] * 10, "note": "{" * 500})
    assert read_metadata(_raw_meta(tmp_path, text))["note"] == "{" * 500


def test_huge_metadata_is_refused_before_parsing(tmp_path: Path) -> None:
    from robustkd.models.metadata import MAX_METADATA_CHARS

    path = _raw_meta(tmp_path, json.dumps({**META, "pad": "x" * MAX_METADATA_CHARS}))
    with pytest.raises(CheckpointError, match="characters of metadata"):
        read_metadata(path)
    with pytest.raises(CheckpointError, match="characters"):
        save_checkpoint(
            tmp_path / "big.safetensors",
            create_model("small-cnn-student"),
            {**META, "pad": "x" * MAX_METADATA_CHARS},
        )


def test_std_of_zero_never_evaluates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A zero std made every input infinite and quietly measured 8 % ACC; now it is refused."""
    path = _with_meta(tmp_path, normalization={"mean": [0.0], "std": [0]})
    line = _evaluate(path, capsys)
    assert "normalization.std" in line and "positive" in line
    good = _with_meta(tmp_path, "ok.safetensors", normalization={"mean": [0.0], "std": [1.0]})
    assert _cli(["evaluate", str(good), "--limit", "8", "--quiet"], capsys)[0] == 0
