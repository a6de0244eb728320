from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robustkd.errors import CheckpointError
from robustkd.models import create_model
from robustkd.models.checkpoints import load_checkpoint, read_metadata, save_checkpoint

ARGS = {"num_classes": 10, "in_channels": 1, "image_size": [28, 28]}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("small-cnn-student").eval()


def test_roundtrip_keeps_weights_and_metadata(tmp_path: Path) -> None:
    model = _model()
    meta = {
        "architecture": "small-cnn-student",
        "model_args": ARGS,
        "target": 0,
        "trigger": {"name": "badnets", "size": 3},
        "metrics": {"acc": 0.5},
    }
    path = save_checkpoint(tmp_path / "m.safetensors", model, meta)
    loaded, got = load_checkpoint(path)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    assert got["trigger"] == meta["trigger"] and got["metrics"] == {"acc": 0.5}
    assert read_metadata(path)["format"] == 1
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left nothing behind


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module-prefix"])
def test_state_dict_pt_files(tmp_path: Path, wrap: str) -> None:
    model = _model()
    sd = model.state_dict()
    if wrap == "state_dict":
        obj = {"state_dict": sd, "epoch": 3}
    elif wrap == "module-prefix":
        obj = {f"module.{k}": v for k, v in sd.items()}
    else:
        obj = sd
    torch.save(obj, tmp_path / "m.pt")
    loaded, meta = load_checkpoint(
        tmp_path / "m.pt",
        architecture="small-cnn-student",
        num_classes=10,
        in_channels=1,
        image_size=28,
    )
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), loaded(x)) and meta["architecture"] == "small-cnn-student"


def test_pt_without_architecture_says_what_to_pass(tmp_path: Path) -> None:
    torch.save(_model().state_dict(), tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="--arch"):
        load_checkpoint(tmp_path / "m.pth")


def test_pickled_module_is_refused(tmp_path: Path) -> None:
    torch.save(_model(), tmp_path / "whole.pt")  # a pickled object, not a state dict
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(tmp_path / "whole.pt", architecture="small-cnn-student")


@pytest.mark.parametrize("name", ["junk.safetensors", "junk.pt", "junk.bin"])
def test_not_a_checkpoint(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"\x00\x01 definitely not a model " * 10)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / name, architecture="small-cnn")


def test_missing_file() -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint("no/such/file.safetensors")


def test_wrong_architecture_lists_keys(tmp_path: Path) -> None:
    path = save_checkpoint(
        tmp_path / "m.safetensors",
        _model(),
        {"architecture": "small-cnn-student", "model_args": ARGS},
    )
    with pytest.raises(CheckpointError, match="does not fit architecture 'small-cnn'") as err:
        load_checkpoint(path, architecture="small-cnn")
    assert "missing keys" in str(err.value) or "shape mismatches" in str(err.value)


def test_wrong_class_count_names_the_layer(tmp_path: Path) -> None:
    path = save_checkpoint(
        tmp_path / "m.safetensors",
        _model(),
        {"architecture": "small-cnn-student", "model_args": ARGS},
    )
    with pytest.raises(CheckpointError, match=r"fc\.weight \(10, 64\) vs \(100, 64\)"):
        load_checkpoint(path, num_classes=100)
