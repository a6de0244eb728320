"""Checkpoints from the internet cannot be trusted: none of these may run code or crash us."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from robustkd.checkpoints import load_checkpoint, save_checkpoint
from robustkd.errors import CheckpointError
from robustkd.models import create_model

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
