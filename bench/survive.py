"""Attacks built to survive distillation, and attacks that know the defence, against every
defence: one table of ACC / ASR per attack, scenario and method.

    python -m bench.survive --out runs/survive                 # the real table (hours on a CPU)
    python -m bench.survive --out runs/survive --seeds 0,1,2
    python -m bench.survive --out runs/survive-quick --quick   # tiny sizes: a smoke run, minutes

Each attack is a teacher preset with a recipe (``robustkd list recipes``): ``optimized``
(fashion-optimized, the learned blend trigger), ``adba`` (fashion-adba, the shadow-student
backdoor), ``adaptive`` and ``adaptive-spread`` (fashion-adaptive[-spread], the penalties
against the variance defence) and ``adaptive-learned`` (fashion-adaptive-learned, the penalty
with a trigger learned along with the teacher). Each teacher is trained once
(``OUT/teachers``); then one ``robustkd compare`` run folder per attack, scenario (``clean``:
the distillation images as they are; ``untrusted``: 10 % of them carry the trigger, true
labels) and seed, reused when finished, so an interrupted call continues where it stopped.
The Markdown table goes to ``OUT/survive.md`` and is printed. ``--quick`` shrinks everything
(2,000 teacher images, 2 epochs; 1,000 distillation images, 1 epoch): its numbers check the
pipeline, they are not the real table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench.results import _cell, _robustkd

METHODS = "scratch,feature-kd,robustkd,robustkd-reverse,robustkd-paper,nad,fine-pruning"
SCENARIOS = ("clean", "untrusted")
TEACHER_EPOCHS = 6  # as bench.results' extra teachers

# name → (teacher preset, what the row shows)
ATTACKS: dict[str, tuple[str, str]] = {
    "optimized": ("fashion-optimized", "optimised blend trigger (mask ≤ 0.2)"),
    "adba": ("fashion-adba", "ADBA-style shadow-student backdoor"),
    "adaptive": ("fashion-adaptive", "adaptive: blend + per-unit excess penalty"),
    "adaptive-spread": ("fashion-adaptive-spread", "adaptive: blend + spread penalty"),
    "adaptive-learned": (
        "fashion-adaptive-learned",
        "adaptive: learned trigger + per-unit excess penalty",
    ),
    "adaptive-class": (
        "fashion-adaptive-class",
        "adaptive: learned trigger + per-unit excess penalty within each class",
    ),
}

# --quick: (train-teacher arguments, compare arguments)
QUICK_TEACHER = ["--train-size", "2000", "--eval-size", "500", "--epochs", "2"]
QUICK_RECIPE = ["warmup_epochs=1", "steps=30", "images=300"]
QUICK_COMPARE = [
    "--distill-size", "1000", "--trusted-size", "200", "--test-size", "500", "--epochs", "1",
]  # fmt: skip


def teacher_path(out: Path, name: str, quick: bool) -> Path:
    """Train the attack's teacher once (resumable) and return its checkpoint."""
    preset = ATTACKS[name][0]
    path = out / "teachers" / f"{name}.safetensors"
    if path.exists():
        return path
    args = ["train-teacher", "--preset", preset, "--quiet", "--resume", "--out", str(path)]
    if quick:
        args += QUICK_TEACHER
        if name in ("optimized", "adba"):  # the recipes that learn their trigger
            for param in QUICK_RECIPE:
                args += ["--recipe-param", param]
    else:
        args += ["--epochs", str(TEACHER_EPOCHS)]
    _robustkd(*args)
    return path


def run_compare(out: Path, name: str, scenario: str, seed: int, quick: bool) -> dict[str, Any]:
    """One ``robustkd compare`` run (reused when finished) and its report."""
    folder = out / f"{name}-{scenario}" if seed == 0 else out / f"{name}-{scenario}-seed{seed}"
    report, status = folder / "report.json", folder / "status.json"
    if report.exists() and status.exists() and json.loads(status.read_text())["state"] == "done":
        return json.loads(report.read_text())
    if folder.exists():  # an unfinished earlier attempt: start it again
        shutil.rmtree(folder)
    teacher = teacher_path(out, name, quick)
    _robustkd(
        "compare",
        "--preset",
        ATTACKS[name][0],
        "--teacher",
        str(teacher),
        "--methods",
        METHODS,
        "--scenario",
        scenario,
        *(QUICK_COMPARE if quick else []),
        "--seed",
        str(seed),
        "--quiet",
        "--out",
        str(folder),
    )
    return json.loads(report.read_text())


def table(reports: dict[tuple[str, str], list[dict[str, Any]]], quick: bool) -> str:
    """The Markdown table: a row per attack and scenario, ACC / ASR (%) per model."""
    methods = METHODS.split(",")
    seeds = max((len(r) for r in reports.values()), default=1)
    lines = []
    if quick:
        lines.append("Quick sizes (--quick): a smoke run of the pipeline, not the real table.\n")
    note = f", mean ± std over {seeds} seeds" if seeds > 1 else ""
    lines.append(f"ACC / ASR in % on the test split{note}.\n")
    lines.append("| attack | scenario | teacher | " + " | ".join(methods) + " |")
    lines.append("| --- | --- | --- | " + " | ".join("---" for _ in methods) + " |")
    for (name, scenario), reps in reports.items():
        t = [r["teacher"] for r in reps]
        cells = [f"{_cell([x['acc'] for x in t])} / {_cell([x['asr'] for x in t])}"]
        for method in methods:
            rs = [r["methods"][method] for r in reps if method in r["methods"]]
            cells.append(
                f"{_cell([x['acc'] for x in rs])} / {_cell([x['asr'] for x in rs])}" if rs else "–"
            )
        lines.append(f"| {ATTACKS[name][1]} | {scenario} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/survive", help="folder for teachers and runs")
    parser.add_argument("--only", help=f"comma-separated attacks (default: {', '.join(ATTACKS)})")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(ATTACKS)
    for name in names:
        if name not in ATTACKS:
            parser.error(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    try:
        seeds = [int(v) for v in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers; got {args.seeds!r}")
    started = time.perf_counter()
    reports = {
        (name, scenario): [run_compare(out, name, scenario, s, args.quick) for s in seeds]
        for name in names
        for scenario in SCENARIOS
    }
    text = table(reports, args.quick)
    (out / "survive.md").write_text(text)
    print(text)
    print(f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
