"""Reproduce the comparison tables of docs/results.md (minutes of CPU training per row).

    python -m bench.results --out runs/results            # everything (about 40 min, 2 cores)
    python -m bench.results --out runs/results --only main,clean
    python -m bench.results --out runs/results --only main,blend,sig,wanet,clean --seeds 0,1,2

Each experiment is one ``robustkd compare`` run folder under ``--out`` per seed (``NAME`` for
seed 0, ``NAME-seedS`` for the others: the distillation seed — student initialisation, data
draws, triggered samples — while the teacher stays the same); finished ones are reused, so an
interrupted call continues where it stopped. With several seeds a cell is mean ± std. The
Markdown tables are written to ``OUT/results.md`` and printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from robustkd.models.checkpoints import DEFAULT_TEACHER

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


def run_experiment(out: Path, name: str, seed: int = 0) -> dict[str, Any]:
    folder = out / (name if seed == 0 else f"{name}-seed{seed}")
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
        "--seed",
        str(seed),
        "--quiet",
        "--out",
        str(folder),
    )
    return json.loads(report.read_text())


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _cell(values: list[float | None]) -> str:
    """One seed: the value; several: mean ± sample std over the seeds."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if len(values) == 1:
        return _pct(vals[0])
    mean = sum(vals) / len(vals)
    std = (sum((v - mean) ** 2 for v in vals) / max(1, len(vals) - 1)) ** 0.5
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def table(reports: dict[str, list[dict[str, Any]]]) -> str:
    """The Markdown table; each experiment maps to its reports, one per seed."""
    seeds = max((len(r) for r in reports.values()), default=1)
    note = f" (mean ± std over {seeds} seeds)" if seeds > 1 else ""
    rows = [
        f"| experiment | model | ACC{note} | ASR{note} | DER | flagged samples "
        "(recall / precision) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, reps in reports.items():
        label = EXPERIMENTS[name][2]
        t = [r["teacher"] for r in reps]
        rows.append(
            f"| {label} | teacher | {_cell([x['acc'] for x in t])} | "
            f"{_cell([x['asr'] for x in t])} | – | – |"
        )
        for method in reps[0]["methods"]:
            rs = [r["methods"][method] for r in reps if method in r["methods"]]
            screen = "–"
            if "flagged_samples" in rs[0]:
                flagged = [r["flagged_samples"] for r in rs]
                shown = str(flagged[0]) if len(rs) == 1 else f"{sum(flagged) / len(rs):.0f}"
                rec = _cell([r.get("screen_recall") for r in rs])
                prec = _cell([r.get("screen_precision") for r in rs])
                screen = f"{shown} ({rec} / {prec})"
            ders = [r["der"] for r in rs if "der" in r]
            d = f"{sum(ders) / len(ders):.3f}" if ders else "–"
            rows.append(
                f"| | {method} | {_cell([r['acc'] for r in rs])} | "
                f"{_cell([r['asr'] for r in rs])} | {d} | {screen} |"
            )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/results", help="folder for the run folders")
    parser.add_argument("--only", help="comma-separated experiments (default: all)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(EXPERIMENTS)
    try:
        seeds = [int(v) for v in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers; got {args.seeds!r}")
    reports: dict[str, list[dict[str, Any]]] = {}
    started = time.perf_counter()
    for name in names:
        if name not in EXPERIMENTS:
            parser.error(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
        reports[name] = [run_experiment(out, name, seed) for seed in seeds]
    text = table(reports)
    (out / "results.md").write_text(text)
    print(text)
    print(f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
