"""The classroom lesson: the shipped teacher and three students distilled from it.

``assets/lesson/`` holds the ``scratch``, ``feature-kd`` (plain KD) and ``robustkd`` students
of the shipped teacher (about 100 KB each) and ``lesson.json``, the comparison report of the run
that trained them. Packing re-evaluates every student (and the teacher) on the CPU, in float32,
on the whole test split, and writes those figures into ``lesson.json`` and into each student's
metadata, so that a test can check the shipped figures against the shipped weights. ``make
lesson`` builds it::

    robustkd compare --preset fashion-badnets-lesson --methods scratch,feature-kd,robustkd \\
        --out runs/lesson
    python -m robustkd.experiments.lesson runs/lesson --out assets/lesson

The Teach page tells the lesson from a report of this shape: ``lesson.json``, or the report of
a run the lecturer starts live (``compare`` writes the same keys).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustkd.analysis.metrics import evaluate
from robustkd.atomic import atomic_write_text
from robustkd.attacks import trigger_from_dict
from robustkd.data.datasets import load_dataset
from robustkd.errors import ConfigError, RobustKDError
from robustkd.models.checkpoints import DEFAULT_TEACHER, load_checkpoint, save_checkpoint
from robustkd.models.modelcard import attack_mode_of

LESSON_METHODS = ("scratch", "feature-kd", "robustkd")
# the lesson's steps, as the Teach page titles them (the browser test and benchmark find them)
STEP_TITLES = (
    "1 · The teacher and its trigger",
    "2 · Plain distillation",
    "3 · Where it hides",
    "4 · RobustKD",
    "5 · The price",
)
LESSON_PRESET = "fashion-badnets-lesson"
LESSON_DIR = DEFAULT_TEACHER.parent / "lesson"
REPORT_NAME = "lesson.json"
EVALUATED_ON = "CPU, float32, the whole test split"


def evaluate_checkpoint(path: str | Path, data_root: str | Path | None = None) -> dict[str, Any]:
    """ACC, ASR and per-class ACC of a checkpoint on its data set's test split, on the CPU."""
    model, meta = load_checkpoint(path)
    data = load_dataset(meta.get("dataset") or "fashion-mnist", "test", root=data_root)
    stored = meta.get("trigger")
    trigger = trigger_from_dict(stored) if stored else None
    target = meta.get("target")
    ev = evaluate(model.cpu().eval(), data, trigger, target, attack_mode_of(meta), device="cpu")
    return {
        "acc": ev.acc,
        "asr": ev.asr,
        "n_clean": ev.n_clean,
        "n_triggered": ev.n_triggered,
        "per_class_acc": ev.per_class_acc,
    }


def _read_report(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "report.json"
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{run_dir.name} holds no report.json: pack a finished run of 'robustkd compare "
            f"--preset {LESSON_PRESET} --methods {','.join(LESSON_METHODS)}'."
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{run_dir.name}/report.json cannot be read ({exc}).") from None
    methods = report.get("methods") if isinstance(report, dict) else None
    missing = [m for m in LESSON_METHODS if not isinstance(methods, dict) or m not in methods]
    if missing:
        raise ConfigError(
            f"The run {run_dir.name} lacks the method(s) {', '.join(missing)}; the lesson needs "
            f"{', '.join(LESSON_METHODS)}."
        )
    return report


def pack_lesson(
    run_dir: str | Path,
    out: str | Path = LESSON_DIR,
    teacher: str | Path = DEFAULT_TEACHER,
    data_root: str | Path | None = None,
) -> dict[str, Any]:
    """Copy the lesson's students from a finished ``compare`` run into ``out``, re-evaluated.

    Returns the lesson report written to ``out/lesson.json``.
    """
    run_dir, out, teacher = Path(run_dir), Path(out), Path(teacher)
    report = _read_report(run_dir)
    if report.get("teacher_path") != teacher.name:
        raise ConfigError(
            f"The run {run_dir.name} distilled {report.get('teacher_path')!r}, not the teacher "
            f"{teacher.name}; the lesson is built on that teacher."
        )
    out.mkdir(parents=True, exist_ok=True)
    methods: dict[str, Any] = {}
    for name in LESSON_METHODS:
        src = run_dir / "checkpoints" / f"{name}.safetensors"
        model, meta = load_checkpoint(src)
        figures = evaluate_checkpoint(src, data_root)
        meta["metrics"] = {**figures, "evaluated_on": EVALUATED_ON}
        dest = save_checkpoint(out / f"{name}.safetensors", model, meta)
        row = dict(report["methods"][name])
        row.update(figures, checkpoint=dest.name, size_bytes=dest.stat().st_size)
        row.pop("screen_csv", None)  # the run's screening list is not shipped
        methods[name] = row
    teacher_row = dict(report["teacher"])
    teacher_row.update(evaluate_checkpoint(teacher, data_root), size_bytes=teacher.stat().st_size)
    lesson = {
        "teacher": teacher_row,
        "teacher_path": teacher.name,
        "methods": methods,
        "reference": "feature-kd",
        "scenario": report.get("scenario"),
        "config": report.get("config"),
        "command": (
            f"robustkd compare --preset {LESSON_PRESET} --methods {','.join(LESSON_METHODS)}"
        ),
        "evaluated_on": EVALUATED_ON,
        "created": report.get("created"),
        "packed": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    atomic_write_text(out / REPORT_NAME, json.dumps(lesson, indent=1) + "\n")
    return lesson


def load_lesson(folder: str | Path = LESSON_DIR) -> dict[str, Any]:
    """The shipped lesson's report, with every student's checkpoint present."""
    folder = Path(folder)
    try:
        lesson = json.loads((folder / REPORT_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        raise ConfigError(
            "The lesson's shipped students are missing or unreadable; rebuild them with "
            "'make lesson'."
        ) from None
    methods = lesson.get("methods") if isinstance(lesson, dict) else None
    for name in LESSON_METHODS:
        row = methods.get(name) if isinstance(methods, dict) else None
        if not isinstance(row, dict) or not (folder / str(row.get("checkpoint"))).is_file():
            raise ConfigError(
                f"The lesson's {name} student is missing; rebuild the lesson with 'make lesson'."
            )
    return lesson


def student_paths(report: dict[str, Any], folder: str | Path) -> dict[str, Path]:
    """Each lesson student's checkpoint, for a lesson report or a ``compare`` run's report."""
    folder = Path(folder)
    paths = {}
    for name in LESSON_METHODS:
        rel = (report.get("methods", {}).get(name) or {}).get("checkpoint")
        if rel:
            path = (folder / rel).resolve()
            if path.is_relative_to(folder.resolve()) and path.is_file():
                paths[name] = path
    return paths


def _pct(value: float | None) -> str:
    return f"{100 * value:.1f} %" if value is not None else "n/a"


def lesson_sentences(
    report: dict[str, Any],
    classes: Sequence[str] = (),
    target: int | None = None,
    mode: str = "all-to-one",
) -> list[list[str]]:
    """Two or three plain sentences per lesson step, worded by what the numbers show
    (``classes``, ``target`` and ``mode``: the teacher's, to name the attacker's aim)."""
    t, rows, info = report["teacher"], report["methods"], report.get("scenario") or {}
    kd, rk, sc = rows.get("feature-kd", {}), rows.get("robustkd", {}), rows.get("scratch", {})
    name = classes[target] if isinstance(target, int) and 0 <= target < len(classes) else None
    aim = f"class {target} ({name})" if name else "the attacker's target class"
    if mode == "all-to-all":
        aim = "the class after their own (an all-to-all backdoor)"
    t_asr, kd_asr, rk_asr = t.get("asr") or 0.0, kd.get("asr") or 0.0, rk.get("asr") or 0.0
    rate = info.get("rate")
    share = f"{100 * rate:.0f} % of the" if rate else "some"
    if kd_asr >= 0.5:
        inherits = "inherits the backdoor"
    elif kd_asr >= 0.2:
        inherits = "partly inherits the backdoor"
    else:
        inherits = "barely inherits the backdoor in this run"
    floor = sc.get("asr")
    at_floor = floor is not None and rk_asr <= floor + 0.03
    units = rk.get("flagged_units") or {}
    steps = [
        [
            f"The teacher is accurate on clean images (ACC {_pct(t['acc'])}) but carries a "
            f"backdoor: stamped with the trigger, {_pct(t_asr)} of the images of other classes "
            f"are sent to {aim} (ASR).",
            "Pick a test image: the teacher names it correctly until the trigger is stamped on.",
        ],
        [
            f"A small student distilled from it with plain KD, on data where {share} images "
            f"carry the trigger, {inherits}: ASR {_pct(kd_asr)} against the teacher's "
            f"{_pct(t_asr)}.",
            "Nobody taught the student the trigger: it copied the teacher's answers on the "
            "triggered images, and with them the backdoor.",
        ],
        [
            "RobustKD looks for the trigger in the teacher's features: it compares the "
            "variance of every feature unit (one channel at one position) on the distillation "
            "data with its variance on a small trusted clean set.",
            "Units whose variance swells are where the trigger acts; the Feature variance "
            "page shows them layer by layer.",
        ],
        [
            f"RobustKD replaces the units whose variance swells ({sum(units.values()):,} over "
            f"{len(units)} layers) by their clean mean, and screens out "
            f"{rk.get('flagged_samples') or 0:,} distillation images whose features look "
            "triggered.",
            f"Its student's ASR is {_pct(rk_asr)}"
            + (
                f", as low as a student that never saw the teacher (scratch: {_pct(floor)})."
                if at_floor
                else f"; the scratch student's is {_pct(floor)}."
            ),
        ],
        [
            f"Each student has {rk.get('params') or 0:,} parameters, "
            f"{(t.get('params') or 0) / max(1, rk.get('params') or 1):.0f}× fewer than the "
            f"teacher, and needs {(t.get('flops') or 0) / max(1, rk.get('flops') or 1):.0f}× "
            "fewer FLOPs per image.",
            f"The RobustKD student keeps ACC {_pct(rk.get('acc'))}, against "
            f"{_pct(kd.get('acc'))} for plain KD and {_pct(t['acc'])} for the teacher: the "
            "defence costs "
            + (
                f"{100 * (kd.get('acc', 0) - rk.get('acc', 0)):.1f} points."
                if kd.get("acc", 0) > rk.get("acc", 0)
                else "no accuracy here."
            ),
        ],
    ]
    return steps


def lesson_html(title: str, sections: Sequence[tuple[str, Sequence[str], Sequence[Any]]]) -> str:
    """The lesson as one HTML page to hand out: per step a heading, its sentences and its
    figures (Plotly's JavaScript inside once, so the page opens offline)."""
    import html

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;font-size:18px}"
        "h2{margin-top:1.6em}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    first = True
    for heading, sentences, figures in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts += [f"<p>{html.escape(s)}</p>" for s in sentences]
        for fig in figures:
            parts.append(fig.to_html(include_plotlyjs=first, full_html=False))
            first = False
    parts.append("</body></html>")
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m robustkd.experiments.lesson",
        description="Pack a finished lesson run into the lesson's shipped students.",
    )
    parser.add_argument("run", help=f"run folder of 'robustkd compare --preset {LESSON_PRESET}'")
    parser.add_argument("--out", default=str(LESSON_DIR), help="folder to write (assets/lesson)")
    parser.add_argument("--data-root", help="folder with the test images (default: as usual)")
    args = parser.parse_args(argv)
    try:
        lesson = pack_lesson(args.run, args.out, data_root=args.data_root)
    except RobustKDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, row in {"teacher": lesson["teacher"], **lesson["methods"]}.items():
        asr = f"{100 * row['asr']:.2f}" if row.get("asr") is not None else "n/a"
        print(f"{name:>10}: ACC {100 * row['acc']:.2f} %, ASR {asr} %, {row['size_bytes']:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
