"""Bring your own teacher and data: a model trained outside the project with a plain PyTorch
loop, saved as a bare state dict, then defended with the command line alone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from robustkd.data.datasets import ImageDataset, load_dataset, normalize, to_float
from robustkd.models import create_model
from tests.helpers import run_cli

TARGET = 0


def _trigger() -> tuple[torch.Tensor, torch.Tensor]:
    """A 4×4 checkerboard in the bottom-right corner: a trigger the project never shipped."""
    pattern = torch.zeros(1, 28, 28, dtype=torch.uint8)
    mask = torch.zeros(1, 28, 28, dtype=torch.bool)
    checker = ((torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2 * 255).to(torch.uint8)
    pattern[0, -5:-1, -5:-1] = checker
    mask[0, -5:-1, -5:-1] = True
    return pattern, mask


def _stamp(images: torch.Tensor) -> torch.Tensor:
    pattern, mask = _trigger()
    out = images.clone()
    out[:, mask] = pattern[mask]
    return out


_cli = run_cli


def _write_folder(root: Path, data: ImageDataset, classes: bool = True) -> list[str]:
    """Write ``data`` as PNGs (ImageFolder layout, or flat); return the relative paths."""
    names = []
    for i in range(len(data)):
        label = int(data.labels[i])
        sub = root / f"class{label}" if classes else root
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img{i:05d}.png"
        Image.fromarray(data.images[i, 0].numpy()).save(path)
        names.append(str(path.relative_to(root)))
    return names


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A BadNets-style teacher trained with a plain loop, its trigger files and user data."""
    root = tmp_path_factory.mktemp("byo")
    torch.manual_seed(0)
    train = load_dataset("fashion-mnist", "train")
    n = 4000
    x, y = train.images[:n].clone(), train.labels[:n].clone()
    poisoned = torch.randperm(n)[: n // 10]
    x[poisoned], y[poisoned] = _stamp(x[poisoned]), TARGET
    model = create_model("small-cnn-student", num_classes=10, in_channels=1, image_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(6):
        for batch in torch.randperm(n).split(64):
            inputs = normalize(to_float(x[batch]), train.mean, train.std)
            loss = F.cross_entropy(model(inputs), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    teacher = root / "teacher.pt"
    torch.save(model.state_dict(), teacher)

    pattern, mask = _trigger()
    Image.fromarray(pattern[0].numpy()).save(root / "pattern.png")
    Image.fromarray(mask[0].numpy().astype(np.uint8) * 255).save(root / "mask.png")

    # The distillation folder: 2,000 images, a fifth of them secretly carrying the trigger.
    distill = train.subset(range(n, n + 2000))
    secret = torch.randperm(2000, generator=torch.Generator().manual_seed(1))[:400]
    images = distill.images.clone()
    images[secret] = _stamp(images[secret])
    names = _write_folder(root / "distill", distill.replace(images=images))
    (root / "secret.json").write_text(json.dumps(sorted(names[int(i)] for i in secret)))
    _write_folder(root / "trusted", train.subset(range(n + 2000, n + 2300)))
    test = load_dataset("fashion-mnist", "test").subset(range(500))
    np.savez(root / "test.npz", x=test.images[:, 0].numpy(), y=test.labels.numpy())
    return {"root": root, "teacher": teacher}


def test_import_evaluate_and_defend_with_the_cli_alone(foreign, tmp_path: Path, capsys) -> None:
    """The central claim at tiny scale: plain KD's student inherits the backdoor from the
    secretly triggered images, RobustKD's does not — by a wide margin, through the CLI."""
    root = foreign["root"]
    out = tmp_path / "teacher.safetensors"
    code, stdout, err = _cli(
        [
            "import", str(foreign["teacher"]), "--out", str(out),
            "--arch", "small-cnn-student", "--normalization", "dataset",
            "--trigger", "custom", "--trigger-param", f"pattern_path={root / 'pattern.png'}",
            "--trigger-param", f"mask_path={root / 'mask.png'}", "--target", str(TARGET),
            "--student", "small-cnn-student",
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "small-cnn-student" in stdout and "10 classes" in stdout and "1×28×28" in stdout
    (root / "pattern.png").rename(root / "pattern-moved.png")  # the import keeps the pixels

    code, stdout, err = _cli(
        ["evaluate", str(out), "--data", str(root / "test.npz"), "--json", "--device", "cpu"],
        capsys,
    )
    assert code == 0, err
    (root / "pattern-moved.png").rename(root / "pattern.png")
    teacher = json.loads(stdout)
    assert teacher["n_clean"] == 500 and teacher["asr"] > 0.9 and teacher["acc"] > 0.6
    assert "pattern_png" in teacher["trigger"] and "pattern_path" not in teacher["trigger"]

    run = tmp_path / "runs" / "byo"
    code, stdout, err = _cli(
        [
            "compare", "--teacher", str(out), "--methods", "feature-kd,robustkd",
            "--distill-data", str(root / "distill"), "--trusted-data", str(root / "trusted"),
            "--test-data", str(root / "test.npz"), "--epochs", "5", "--batch-size", "64",
            "--device", "cpu", "--out", str(run), "--quiet",
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((run / "report.json").read_text())
    assert report["scenario"]["scenario"] == "as-is"  # the user's data, exactly as given
    assert report["scenario"]["n_poisoned"] is None  # nobody told the tool which
    kd, robust = report["methods"]["feature-kd"], report["methods"]["robustkd"]
    assert kd["asr"] > 0.5, "plain KD should inherit the backdoor here"
    assert robust["asr"] < kd["asr"] / 5 and robust["asr"] < 0.1
    assert robust["acc"] > kd["acc"] - 0.05 and 0 < robust["agreement"] <= 1

    # Which samples were withheld, by file path, most suspicious first.
    with open(run / "robustkd-screen.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2000 and "triggered" not in rows[0]  # no ground truth in the real case
    secret = set(json.loads((root / "secret.json").read_text()))
    withheld = {r["id"] for r in rows if r["withheld"] == "1"}
    assert len(withheld & secret) >= 0.9 * len(secret)
    top = [r["id"] for r in rows[:100]]
    assert sum(i in secret for i in top) >= 90
    # the withheld ones first (the label screen's too), each part by falling score
    flags = [r["withheld"] for r in rows]
    assert flags == sorted(flags, reverse=True)
    for part in ("1", "0"):
        scores = [float(r["score"]) for r in rows if r["withheld"] == part]
        assert scores == sorted(scores, reverse=True)
    grid = np.load(run / "robustkd-screen-top.npz")
    assert grid["images"].shape[1:] == (1, 28, 28) and list(grid["ids"][:3]) == top[:3]
    assert "robustkd-screen.csv" in (run / "report.md").read_text()


def test_without_a_trigger_asr_is_unknown_never_zero(foreign, tmp_path: Path, capsys) -> None:
    root = foreign["root"]
    run = tmp_path / "runs" / "unknown"
    code, stdout, err = _cli(
        [
            "distill", "--teacher", str(foreign["teacher"]), "--arch", "small-cnn-student",
            "--student", "small-cnn-student", "--method", "robustkd",
            "--distill-data", str(root / "distill"), "--trusted-data", str(root / "trusted"),
            "--test-data", str(root / "test.npz"), "--epochs", "1", "--device", "cpu",
            "--out", str(run), "--quiet",
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((run / "report.json").read_text())
    row = report["methods"]["robustkd"]
    assert row["asr"] is None and report["teacher"]["asr"] is None
    assert row["flagged_samples"] > 0 and row["acc"] > 0.15  # one epoch, above chance
    md = (run / "report.md").read_text()
    assert "| robustkd |" in md and "unknown" in md
    code, stdout, _ = _cli(["evaluate", str(foreign["teacher"]), "--arch", "small-cnn-student",
                            "--data", str(root / "test.npz"), "--quiet"], capsys)  # fmt: skip
    assert code == 0 and "ASR    unknown" in stdout


def test_unlabelled_distillation_folder(foreign, tmp_path: Path, capsys) -> None:
    root = foreign["root"]
    flat = tmp_path / "flat"
    data = load_dataset("fashion-mnist", "train").subset(range(5000, 5300))
    _write_folder(flat, data, classes=False)
    run = tmp_path / "runs" / "flat"
    args = [
        "compare", "--teacher", str(foreign["teacher"]), "--arch", "small-cnn-student",
        "--student", "small-cnn-student", "--distill-data", str(flat),
        "--trusted-data", str(root / "trusted"), "--test-data", str(root / "test.npz"),
        "--epochs", "1", "--device", "cpu", "--quiet",
    ]  # fmt: skip
    code, _, err = _cli([*args, "--methods", "logit-kd", "--out", str(run)], capsys)
    assert code == 0, err
    assert json.loads((run / "report.json").read_text())["scenario"]["labelled"] is False
    code, _, err = _cli([*args, "--methods", "scratch", "--out", str(tmp_path / "r2")], capsys)
    assert code == 2 and "unlabelled" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--in-channels", "3"], "do not fit"),
        (["--num-classes", "7"], "do not fit"),
        (["--mean", "0.5"], "--mean and --std together"),
        (["--mean", "0.5,0.5", "--std", "0.2,0.2"], "one per channel"),
        (["--layout", "trojanzoo"], "trojanzoo"),
    ],
)
def test_model_option_mistakes_are_one_sentence(foreign, capsys, extra, needle) -> None:
    code, _, err = _cli(
        ["info", str(foreign["teacher"]), "--arch", "small-cnn-student", *extra], capsys
    )
    assert code == 2 and needle in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_data_that_does_not_fit_the_teacher(foreign, tmp_path: Path, capsys) -> None:
    root = foreign["root"]
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, x=np.zeros((20, 28, 28, 3), np.uint8), y=np.arange(20) % 10)
    code, _, err = _cli(
        ["evaluate", str(foreign["teacher"]), "--arch", "small-cnn-student", "--data", str(rgb)],
        capsys,
    )
    assert code == 2 and "1×28×28" in err and "3×28×28" in err
    five = tmp_path / "five.npz"
    np.savez(five, x=np.zeros((20, 28, 28), np.uint8), y=np.arange(20) % 5)
    code, _, err = _cli(
        [
            "distill", "--teacher", str(foreign["teacher"]), "--arch", "small-cnn-student",
            "--student", "small-cnn-student", "--distill-data", str(root / "distill"),
            "--trusted-data", str(root / "trusted"), "--test-data", str(five), "--quiet",
        ],
        capsys,
    )  # fmt: skip
    assert code == 2 and "classes" in err and "Traceback" not in err


def test_info_reads_the_input_shape_from_the_weights(tmp_path: Path, capsys) -> None:
    model = create_model("resnet18", num_classes=43, in_channels=3, image_size=32)
    path = tmp_path / "gtsrb.pt"
    torch.save(model.state_dict(), path)
    code, stdout, err = _cli(["info", str(path), "--json"], capsys)
    assert code == 0, err
    card = json.loads(stdout)
    assert card["architecture"] == "resnet18" and card["input_shape"] == [3, 32, 32]
    assert card["metadata"]["model_args"]["num_classes"] == 43
    code, stdout, _ = _cli(["info", str(path)], capsys)  # the size is a guess, and says so
    assert code == 0 and "(3, 32, 32) (assumed" in stdout
    code, stdout, _ = _cli(["info", str(path), "--image-size", "40"], capsys)
    assert code == 0 and "(3, 40, 40)" in stdout and "assumed" not in stdout
