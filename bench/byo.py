"""Bring your own teacher and data, at full scale: the row "a teacher trained elsewhere" of
docs/results.md.

    python -m bench.byo --out runs/byo          # about 25 minutes on 2 CPU cores

1. A teacher is trained **outside the project**: a plain PyTorch loop (no robustkd training
   code) on 30,000 Fashion-MNIST training images, 10 % of them stamped with a trigger the
   project never shipped (a 4×4 checkerboard in the bottom-right corner) and relabelled 0.
   It is saved as a bare state dict (``torch.save(model.state_dict())``), its trigger as a
   pattern PNG and a mask PNG.
2. The user's data is written as files: a distillation ImageFolder of 20,000 other training
   images, 10 % of which secretly carry the trigger (true labels kept); a trusted clean
   ImageFolder of 1,000 images; the 10,000 test images as an ``.npz``.
3. Then the command line only: ``robustkd import``, ``robustkd evaluate``, and ``robustkd
   compare`` (scratch, plain KD, RobustKD) in the ``as-is`` scenario on those folders.

Finished steps are reused, so an interrupted call continues. The table is written to
``OUT/byo.md`` and printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TARGET = 0
TEACHER_IMAGES = 30_000
TEACHER_EPOCHS = 8
DISTILL_IMAGES = 20_000
TRUSTED_IMAGES = 1_000
RATE = 0.1
METHODS = "scratch,feature-kd,robustkd"
# ImageFolder numbers classes in sorted folder order: a digit prefix keeps the teacher's order.
FOLDERS = [
    "0-tshirt", "1-trouser", "2-pullover", "3-dress", "4-coat",
    "5-sandal", "6-shirt", "7-sneaker", "8-bag", "9-ankle-boot",
]  # fmt: skip


def stamp(images: torch.Tensor) -> torch.Tensor:
    """The checkerboard trigger on uint8 ``(N, 1, 28, 28)`` images."""
    out = images.clone()
    checker = ((torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2 * 255).to(torch.uint8)
    out[:, 0, -5:-1, -5:-1] = checker
    return out


def train_outside(out: Path, seed: int) -> Path:
    """A teacher trained with a plain loop and saved as a bare state dict."""
    from robustkd.data.datasets import load_dataset, normalize, to_float
    from robustkd.models import create_model

    path = out / "teacher.pt"
    if path.exists():
        return path
    torch.manual_seed(seed)
    train = load_dataset("fashion-mnist", "train")
    x = train.images[:TEACHER_IMAGES].clone()
    y = train.labels[:TEACHER_IMAGES].clone()
    poisoned = torch.randperm(len(x))[: int(RATE * len(x))]
    x[poisoned], y[poisoned] = stamp(x[poisoned]), TARGET
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    steps = TEACHER_EPOCHS * ((len(x) + 127) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=steps)
    started = time.perf_counter()
    for epoch in range(TEACHER_EPOCHS):
        model.train()
        for batch in torch.randperm(len(x)).split(128):
            inputs = normalize(to_float(x[batch]), train.mean, train.std)
            loss = F.cross_entropy(model(inputs), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"teacher epoch {epoch + 1}/{TEACHER_EPOCHS}: loss {loss.item():.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    torch.save(model.state_dict(), path)
    pattern = stamp(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))[0, 0].numpy()
    Image.fromarray(pattern).save(out / "pattern.png")
    mask = np.zeros((28, 28), np.uint8)
    mask[-5:-1, -5:-1] = 255
    Image.fromarray(mask).save(out / "mask.png")
    return path


def write_user_data(out: Path, seed: int) -> None:
    """The distillation and trusted ImageFolders and the test ``.npz``."""
    from robustkd.data.datasets import load_dataset

    if (out / "data" / "done").exists():
        return
    train = load_dataset("fashion-mnist", "train")
    start = TEACHER_IMAGES
    distill = train.subset(range(start, start + DISTILL_IMAGES))
    g = torch.Generator().manual_seed(seed + 1)
    secret = torch.randperm(len(distill), generator=g)[: int(RATE * len(distill))]
    images = distill.images.clone()
    images[secret] = stamp(images[secret])
    names = []
    for i in range(len(distill)):
        folder = out / "data" / "distill" / FOLDERS[int(distill.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i, 0].numpy()).save(folder / f"{i:05d}.png")
        names.append(f"{folder.name}/{i:05d}.png")
    (out / "data" / "secret.json").write_text(json.dumps(sorted(names[int(i)] for i in secret)))
    trusted = train.subset(range(start + DISTILL_IMAGES, start + DISTILL_IMAGES + TRUSTED_IMAGES))
    for i in range(len(trusted)):
        folder = out / "data" / "trusted" / FOLDERS[int(trusted.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(trusted.images[i, 0].numpy()).save(folder / f"{i:05d}.png")
    test = load_dataset("fashion-mnist", "test")
    np.savez(
        out / "data" / "test.npz",
        x=test.images[:, 0].numpy(),
        y=test.labels.numpy(),
        classes=np.asarray(FOLDERS),
    )
    (out / "data" / "done").write_text("")


def robustkd(*args: str) -> str:
    print("$ robustkd " + " ".join(args), flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "robustkd", *args], check=True, capture_output=True, text=True
    )
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/byo", help="folder for every file it writes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=4, help="distillation epochs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    teacher = train_outside(out, args.seed)
    write_user_data(out, args.seed)
    data = out / "data"
    imported = out / "teacher.safetensors"
    robustkd(
        "import", str(teacher), "--out", str(imported), "--arch", "small-cnn",
        "--dataset", "fashion-mnist", "--normalization", "dataset", "--trigger", "custom",
        "--trigger-param", f"pattern_path={out / 'pattern.png'}",
        "--trigger-param", f"mask_path={out / 'mask.png'}", "--target", str(TARGET),
        "--student", "small-cnn-student",
    )  # fmt: skip
    ev = json.loads(robustkd("evaluate", str(imported), "--data", str(data / "test.npz"),
                             "--json", "--quiet"))  # fmt: skip
    run = out / "compare"
    if not (run / "report.json").exists() or json.loads(
        (run / "status.json").read_text()
    ).get("state") != "done":
        robustkd(
            "compare", "--teacher", str(imported), "--methods", METHODS,
            "--distill-data", str(data / "distill"), "--trusted-data", str(data / "trusted"),
            "--test-data", str(data / "test.npz"), "--epochs", str(args.epochs),
            "--seed", str(args.seed), "--quiet", "--out", str(run),
        )  # fmt: skip
    report = json.loads((run / "report.json").read_text())
    secret = set(json.loads((data / "secret.json").read_text()))
    import csv

    with open(run / "robustkd-screen.csv", newline="") as fh:
        withheld = {r["id"] for r in csv.DictReader(fh) if r["withheld"] == "1"}
    caught = len(withheld & secret)
    lines = [
        "| model | ACC % | ASR % | agreement % |",
        "| --- | --- | --- | --- |",
        f"| teacher (imported) | {100 * ev['acc']:.2f} | {100 * ev['asr']:.2f} | – |",
    ]
    for name, row in report["methods"].items():
        lines.append(
            f"| {name} | {100 * row['acc']:.2f} | {100 * row['asr']:.2f} | "
            f"{100 * row['agreement']:.2f} |"
        )
    lines += [
        "",
        f"RobustKD withheld {len(withheld)} of {DISTILL_IMAGES} distillation images; "
        f"{caught} of the {len(secret)} secretly triggered ones among them "
        f"(recall {100 * caught / len(secret):.1f} %, precision "
        f"{100 * caught / max(1, len(withheld)):.1f} %).",
        f"Wall time {time.perf_counter() - started:.0f} s (steps already done are reused).",
    ]
    text = "\n".join(lines) + "\n"
    (out / "byo.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
