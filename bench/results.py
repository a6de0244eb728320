"""Reproduce the comparison tables of docs/results.md (minutes of CPU training per row).

    python -m bench.results --out runs/results            # everything (about 40 min, 2 cores)
    python -m bench.results --out runs/results --only main,clean

Each experiment is one ``robustkd compare`` run folder under ``--out``; finished ones are
reused, so an interrupted call continues where it stopped. The Markdown tables are written
to ``OUT/results.md`` and printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from robustkd.cli import DEFAULT_TEACHER

TEACHER_EPOCHS = 6  # the extra teachers (Blend, SIG, WaNet): 6 epochs of the fashion preset
CORE = "scratch,feature-kd,robustkd"
ALL = "scratch,logit-kd,feature-kd,robustkd,robustkd-paper,nad,fine-tuning,fine-pruning"

# name → (teacher, extra compare arguments, what the row shows)
EXPERIMENTS: dict[str, tuple[str, list[str], str]] = {
    "main": ("badnets", ["--methods", ALL], "BadNets, untrusted, 10 %, trusted 1,000"),
    "blend": ("blend", ["--methods", CORE + ",robustkd-paper"], "Blend, untrusted, 10 %"),
    "sig": ("sig", ["--methods", CORE + ",robustkd-paper"], "SIG, untrusted, 10 %"),
    "wanet": ("wanet", ["--methods", CORE + ",robustkd-paper"], "WaNet, untrusted, 10 %"),
    "clean": ("badnets", ["--methods", CORE, "--scenario", "clean"], "BadNets, clean data"),
    "rate-1": ("badnets", ["--methods", CORE, "--rate", "0.01"], "BadNets, untrusted, 1 %"),
    "rate-5": ("badnets", ["--methods", CORE, "--rate", "0.05"], "BadNets, untrusted, 5 %"),
    "trusted-200": (
        "badnets",
        ["--methods", "robustkd", "--trusted-size", "200"],
        "BadNets, untrusted, 10 %, trusted 200",
    ),
    "trusted-500": (
        "badnets",
        ["--methods", "robustkd", "--trusted-size", "500"],
        "BadNets, untrusted, 10 %, trusted 500",
    ),
    "teacher-train-drop": (
        "badnets",
        ["--methods", "robustkd", "--scenario", "teacher-train", "--screen-policy", "drop"],
        "BadNets, the teacher's own poisoned training set, screened samples dropped",
    ),
    "teacher-train": (
        "badnets",
        ["--methods", CORE, "--scenario", "teacher-train"],
        "BadNets, the teacher's own poisoned training set (20,000 drawn)",
    ),
}


def _robustkd(*args: str) -> None:
    cmd = [sys.executable, "-m", "robustkd", *args]
    print("$ robustkd " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def teacher_path(out: Path, name: str) -> Path:
    if name == "badnets":
        return DEFAULT_TEACHER
    path = out / "teachers" / f"{name}.safetensors"
    if not path.exists():
        _robustkd(
            "train-teacher",
            "--preset",
            f"fashion-{name}",
            "--epochs",
            str(TEACHER_EPOCHS),
            "--quiet",
            "--resume",
            "--out",
            str(path),
        )
    return path


def run_experiment(out: Path, name: str) -> dict[str, Any]:
    folder = out / name
    report = folder / "report.json"
    status = folder / "status.json"
    if report.exists() and status.exists() and json.loads(status.read_text())["state"] == "done":
        return json.loads(report.read_text())
    if folder.exists():  # an unfinished earlier attempt: start it again
        import shutil

        shutil.rmtree(folder)
    teacher, args, _ = EXPERIMENTS[name]
    _robustkd(
        "compare",
        "--preset",
        "fashion-badnets",
        "--teacher",
        str(teacher_path(out, teacher)),
        *args,
        "--quiet",
        "--out",
        str(folder),
    )
    return json.loads(report.read_text())


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def table(reports: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| experiment | model | ACC | ASR | DER | flagged samples (recall / precision) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, rep in reports.items():
        label = EXPERIMENTS[name][2]
        t = rep["teacher"]
        rows.append(f"| {label} | teacher | {_pct(t['acc'])} | {_pct(t['asr'])} | – | – |")
        for method, r in rep["methods"].items():
            screen = "–"
            if "flagged_samples" in r:
                rec, prec = r.get("screen_recall"), r.get("screen_precision")
                screen = f"{r['flagged_samples']} ({_pct(rec)} / {_pct(prec)})"
            d = f"{r['der']:.3f}" if "der" in r else "–"
            rows.append(f"| | {method} | {_pct(r['acc'])} | {_pct(r['asr'])} | {d} | {screen} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/results", help="folder for the run folders")
    parser.add_argument("--only", help="comma-separated experiments (default: all)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(EXPERIMENTS)
    reports = {}
    started = time.perf_counter()
    for name in names:
        if name not in EXPERIMENTS:
            parser.error(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
        reports[name] = run_experiment(out, name)
    text = table(reports)
    (out / "results.md").write_text(text)
    print(text)
    print(f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
