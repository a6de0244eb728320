from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robustkd.cli.main import main
from robustkd.data.datasets import load_dataset
from robustkd.models import create_model
from robustkd.models.checkpoints import save_checkpoint
from tests.conftest import ROOT

VERBS = ["train-teacher", "evaluate", "info", "list"]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's --help and usage errors
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_console_script_help() -> None:
    exe = Path(sys.executable).parent / "robustkd"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and all(v in result.stdout for v in VERBS)


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run([verb, "--help"], capsys)
    assert code == 0 and "usage: robustkd" in out


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["list", "triggers"], capsys)
    assert code == 0 and {"badnets", "blend", "sig", "wanet", "custom"} <= set(out.split())
    code, out, _ = run(["list", "presets"], capsys)
    assert "fashion-badnets" in out.split()


def test_train_evaluate_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.safetensors"
    code, stdout, err = run(
        [
            "train-teacher",
            "--preset",
            "fashion-badnets",
            "--arch",
            "small-cnn-student",
            "--train-size",
            "600",
            "--epochs",
            "1",
            "--eval-size",
            "200",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    assert out.exists() and "ACC" in stdout and "ASR" in stdout
    assert not out.with_suffix(".state.pt").exists()

    code, stdout, _ = run(["evaluate", str(out), "--limit", "300", "--json"], capsys)
    report = json.loads(stdout)
    assert code == 0 and report["n_clean"] == 300
    assert 0 <= report["acc"] <= 1 and 0 <= report["asr"] <= 1
    labels = load_dataset("fashion-mnist", "test").labels[:300]
    assert report["n_triggered"] == int((labels != 0).sum())  # target-class images excluded
    assert report["trigger"]["name"] == "badnets" and report["target"] == 0

    code, stdout, _ = run(
        [
            "evaluate",
            str(out),
            "--limit",
            "300",
            "--trigger",
            "blend",
            "--trigger-param",
            "alpha=0.3",
        ],
        capsys,
    )
    assert code == 0 and "trigger blend" in stdout

    code, stdout, _ = run(["info", str(out)], capsys)
    assert code == 0 and "small-cnn-student" in stdout and "parameters" in stdout
    code, stdout, _ = run(["info", str(out), "--json"], capsys)
    info = json.loads(stdout)
    assert info["params"] == sum(p.numel() for p in create_model("small-cnn-student").parameters())
    assert info["flops"] > 0 and info["trigger"]["name"] == "badnets"


def test_evaluate_a_bare_state_dict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(create_model("small-cnn-student").state_dict(), tmp_path / "m.pt")
    code, stdout, err = run(
        [
            "evaluate",
            str(tmp_path / "m.pt"),
            "--arch",
            "small-cnn-student",
            "--limit",
            "100",
            "--trigger",
            "badnets",
            "--target",
            "0",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads(stdout)["n_clean"] == 100


def _one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("robustkd: error:"), err
    assert needle.lower() in err.lower(), err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["train-teacher", "--dataset", "imagenet-42", "--out", "x.safetensors"],
            "unknown dataset",
        ),
        (
            [
                "train-teacher",
                "--arch",
                "resnet-9000",
                "--out",
                "x.safetensors",
                "--train-size",
                "10",
                "--epochs",
                "1",
            ],
            "unknown model",
        ),
        (["train-teacher", "--trigger", "laser", "--out", "x.safetensors"], "unknown trigger"),
        (["train-teacher", "--rate", "1.5", "--out", "x.safetensors"], "between 0 and 1"),
        (["train-teacher", "--rate", "-0.1", "--out", "x.safetensors"], "between 0 and 1"),
        (["train-teacher", "--target", "12", "--out", "x.safetensors"], "between 0 and 9"),
        (["train-teacher", "--epochs", "0", "--out", "x.safetensors"], "epochs"),
        (
            ["train-teacher", "--data-root", "/nonexistent/fm", "--out", "x.safetensors"],
            "does not exist",
        ),
        (["train-teacher", "--out", "x.pt"], ".safetensors"),
        (
            [
                "train-teacher",
                "--trigger",
                "badnets",
                "--trigger-param",
                "size=99",
                "--out",
                "x.safetensors",
            ],
            "badnets",
        ),
        (["evaluate", "no/such.safetensors"], "does not exist"),
        (["train-teacher"], "--out"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_user_mistakes_give_one_sentence(
    args: list[str],
    needle: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run(args, capsys)
    _one_line_error(code, err, needle)


def test_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"GIF89a not a model at all")
    for verb in ("evaluate", "info"):
        code, _, err = run([verb, str(bad)], capsys)
        _one_line_error(code, err, "not a checkpoint")


def test_checkpoint_of_another_architecture(tmp_path: Path, capsys) -> None:
    path = save_checkpoint(
        tmp_path / "s.safetensors",
        create_model("small-cnn-student"),
        {
            "architecture": "small-cnn-student",
            "model_args": {"num_classes": 10, "in_channels": 1, "image_size": [28, 28]},
        },
    )
    code, _, err = run(["info", str(path), "--arch", "small-cnn"], capsys)
    _one_line_error(code, err, "do not fit 'small-cnn'")
    assert "--arch small-cnn-student" in err  # names the architecture that would fit
    torch.save(create_model("small-cnn").state_dict(), tmp_path / "big.pt")
    code, _, err = run(
        ["evaluate", str(tmp_path / "big.pt"), "--arch", "small-cnn", "--num-classes", "100"],
        capsys,
    )
    _one_line_error(code, err, "fc.weight")


def test_corrupt_data_files(fake_fashion: Path, capsys, monkeypatch) -> None:
    (fake_fashion / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    monkeypatch.setenv("ROBUSTKD_FASHION_MNIST", str(fake_fashion))
    torch.save(create_model("small-cnn-student").state_dict(), fake_fashion / "m.pt")
    code, _, err = run(
        ["evaluate", str(fake_fashion / "m.pt"), "--arch", "small-cnn-student"], capsys
    )
    _one_line_error(code, err, "replace it")


def test_python_dash_m(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "robustkd", "list", "models"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and "small-cnn" in result.stdout.split()


@pytest.mark.parametrize(
    ("unbuffered", "lines_read"),
    [(False, 0), (True, 0), (True, 1)],
    ids=["buffered", "unbuffered", "unbuffered-after-one-line"],
)
def test_closed_stdout_ends_quietly(unbuffered: bool, lines_read: int) -> None:
    """``robustkd list methods | head -1``: a reader that leaves early is no error, and no
    sentence about disk space."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"  # each print is written at once, while the command runs
    proc = subprocess.Popen(
        [sys.executable, "-m", "robustkd", "list", "methods"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for _ in range(lines_read):
        assert proc.stdout.readline().strip()
    proc.stdout.close()  # with no line read: closed before the command (still starting) writes
    _, err = proc.communicate(timeout=300)
    assert "error" not in err.lower(), err
    assert proc.returncode in (0, 141), (proc.returncode, err)
