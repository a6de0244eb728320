"""Comparisons: run several methods on one scenario and write the report (JSON, Markdown,
CSV, Plotly HTML) and the students' checkpoints into a run folder.

A report names files, never where they lie on the machine that ran it (it is downloaded and
shown to others): checkpoints relative to the run folder, the teacher and the screening CSV
by name, absolute paths in the command cut to their last part."""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from robustkd import __version__
from robustkd.analysis.metrics import der, evaluate
from robustkd.atomic import atomic_write, atomic_write_text
from robustkd.defenses import METHODS, run_method
from robustkd.errors import redact_paths
from robustkd.models.checkpoints import save_checkpoint
from robustkd.models.complexity import count_flops, count_parameters
from robustkd.runs.store import Run, atomic_write_json
from robustkd.training import distributed
from robustkd.training.config import ProgressFn
from robustkd.training.distill import DistillConfig
from robustkd.training.scenarios import Scenario

REFERENCE = "feature-kd"  # DER is measured against plain KD when it is in the comparison
REPORT_COLUMNS = [
    "method",
    "acc",
    "asr",
    "der",
    "agreement",
    "params",
    "flops",
    "scenario",
    "seed",
    "trusted_size",
    "rate",
    "flagged_samples",
    "train_seconds",
]


def teacher_row(teacher: nn.Module, scenario: Scenario) -> dict[str, Any]:
    ev = evaluate(
        teacher.cpu().eval(), scenario.test, scenario.trigger, scenario.target, scenario.mode
    )
    return {
        "method": "teacher",
        "acc": ev.acc,
        "asr": ev.asr,
        "n_clean": ev.n_clean,
        "n_triggered": ev.n_triggered,
        "per_class_acc": ev.per_class_acc,
        "params": count_parameters(teacher),
        "flops": count_flops(teacher, scenario.test.input_shape),
    }


def compare(
    teacher: nn.Module,
    teacher_meta: dict[str, Any],
    scenario: Scenario,
    methods: Sequence[str],
    config: DistillConfig,
    run: Run,
    progress_for: Callable[[str], ProgressFn | None] | None = None,
    command: str = "",
    resume: bool = False,
) -> dict[str, Any]:
    """Run ``methods`` one after the other; the report is rewritten after each one.

    Every training phase saves its state in the run's checkpoints/ after each epoch; with
    ``resume`` the methods already in the run's report are kept and the interrupted one
    continues from its last saved epoch.
    """
    methods = [METHODS.get(m).name for m in methods]  # unknown names refused up front
    config.validate()
    report: dict[str, Any] = {
        "teacher": teacher_row(teacher, scenario),
        "teacher_path": Path(teacher_meta["path"]).name if teacher_meta.get("path") else None,
        "scenario": scenario.info,
        "config": config.to_dict(),
        "methods": {},
        "reference": REFERENCE if REFERENCE in methods else "teacher",
        "command": redact_paths(command),
        "robustkd": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    previous = (run.report() or {}).get("methods", {}) if resume else {}
    shared: dict[str, Any] = {}
    for method in methods:
        if method in previous:  # finished before the interruption
            row = dict(previous[method])
            for key, folder in (
                ("checkpoint", "checkpoints/"),
                ("screen_csv", ""),
                ("triggers_file", ""),
            ):
                if row.get(key):  # a report of an older version held absolute paths
                    row[key] = folder + Path(str(row[key])).name
            report["methods"][method] = row
            continue
        progress = progress_for(method) if progress_for else None
        result = run_method(
            method,
            teacher,
            teacher_meta,
            scenario,
            config,
            progress,
            shared,
            state_dir=run.checkpoints_dir,
        )
        row = {**result.metrics, "history": result.history}
        ckpt = run.checkpoint_path(f"{method}.safetensors")
        row["checkpoint"] = ckpt.relative_to(run.path).as_posix()  # relative: see above
        report["methods"][method] = row
        _add_der(report)
        if not distributed.is_main():  # under torchrun: rank 0 writes the files
            continue
        is_student = METHODS.get(method).produces == "student"
        shape_args = {
            k: teacher_meta["model_args"][k]
            for k in ("num_classes", "in_channels", "image_size")
            if k in teacher_meta["model_args"]
        }
        save_checkpoint(
            ckpt,
            result.model,
            {
                # a repair (fine-tuning, fine-pruning) produces a teacher, not a student
                "kind": "student" if is_student else "teacher",
                "architecture": config.student or teacher_meta.get("student_architecture")
                if is_student
                else teacher_meta["architecture"],
                # a student is ours whatever layout the teacher came in
                "model_args": shape_args if is_student else teacher_meta["model_args"],
                "dataset": teacher_meta.get("dataset"),
                "classes": teacher_meta.get("classes"),
                "normalization": teacher_meta.get("normalization"),
                "trigger": teacher_meta.get("trigger"),
                "target": teacher_meta.get("target"),
                "method": method,
                "scenario": scenario.info,
                "metrics": {k: row[k] for k in ("acc", "asr", "n_clean", "n_triggered")},
            },
        )
        if result.detoxifier is not None:
            result.detoxifier.save(run.checkpoint_path(f"{method}-detox.safetensors"))
        if result.screen_scores is not None and result.withheld is not None:
            row["screen_csv"] = write_screen(
                run.path, method, scenario, result.screen_scores, result.withheld
            ).name
        if result.found is not None:
            row["triggers_file"] = result.found.save(run.path / f"{method}-triggers.npz").name
        write_report(run.path, report)
        for state in run.checkpoints_dir.glob(f"{method}*.state.pt"):  # done: not needed again
            state.unlink()
    return report


def _add_der(report: dict[str, Any]) -> None:
    ref = report["methods"].get(report["reference"]) or report["teacher"]
    for row in report["methods"].values():
        if row.get("asr") is not None and ref.get("asr") is not None:
            row["der"] = der(ref["acc"], ref["asr"], row["acc"], row["asr"])


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}" if isinstance(v, float) else "–"


def _asr(v: Any, known: bool) -> str:
    return _pct(v) if known else "unknown"


SCREEN_TOP = 48  # most suspicious samples kept as images beside the CSV (the app's grid)


def write_screen(
    folder: Path,
    method: str,
    scenario: Scenario,
    scores: torch.Tensor,
    withheld: torch.Tensor,
) -> Path:
    """``METHOD-screen.csv``: every distillation sample's id, score and whether it was
    withheld, the withheld ones first, then the most suspicious; ``METHOD-screen-top.npz``: the
    top images themselves."""
    data = scenario.distill
    scores, withheld = scores.cpu().double(), withheld.cpu().bool()
    ids = list(data.ids) if data.ids is not None else [f"{data.name}:{i}" for i in range(len(data))]
    truth = scenario.poisoned_mask
    # withheld first (by the variance score or, when the label screen caught it, with its
    # score), then the highest scores
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort((~withheld[order]).int(), stable=True)].tolist()
    buf = io.StringIO()
    writer = csv.writer(buf)
    header = ["rank", "index", "id", "score", "withheld"]
    if truth is not None:
        header.append("triggered")  # a simulation's ground truth, never seen by the defence
    writer.writerow(header)
    for rank, i in enumerate(order, start=1):
        row = [rank, i, ids[i], f"{float(scores[i]):.6g}", int(withheld[i])]
        if truth is not None:
            row.append(int(truth[i]))
        writer.writerow(row)
    path = folder / f"{method}-screen.csv"
    atomic_write_text(path, buf.getvalue())
    top = order[:SCREEN_TOP]
    arrays = {
        "images": data.images[torch.as_tensor(top, dtype=torch.long)].cpu().numpy(),
        "index": np.asarray(top, dtype=np.int64),
        "ids": np.asarray([ids[i] for i in top], dtype=str),
        "scores": scores[top].numpy(),
        "withheld": withheld[top].numpy(),
    }
    atomic_write(folder / f"{method}-screen-top.npz", lambda fh: np.savez(fh, **arrays))
    return path


def report_markdown(report: dict[str, Any]) -> str:
    info = report["scenario"]
    known = info.get("trigger_known", True)
    poisoned = info.get("n_poisoned")
    carried = (
        f"{poisoned} carry the trigger"
        if poisoned is not None
        else "used as given, poisoned or not"
    )
    asr_note = (
        "ASR over triggered test images whose true class is not the target"
        if known
        else "ASR unknown: no trigger was given or recorded"
    )
    lines = [
        f"# Comparison — scenario `{info['scenario']}`",
        "",
        f"Data {info['dataset']}: distillation set {info['distill_size']} images "
        f"({carried}), trusted clean set {info['trusted_size']}, "
        f"test set {info['test_size']}; seed {info['seed']}. ACC/ASR in %, {asr_note}; "
        "agreement = test images on which the model predicts what the teacher predicts. "
        f"DER against `{report['reference']}`.",
        "",
        "| model | ACC | ASR | agreement | DER | params | FLOPs | flagged samples | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    t = report["teacher"]
    lines.append(
        f"| teacher | {_pct(t['acc'])} | {_asr(t['asr'], known)} | – | – | {t['params']:,} | "
        f"{t['flops']:,} | – | – |"
    )
    for name, r in report["methods"].items():
        flagged = r.get("flagged_samples", "–")
        d = f"{r['der']:.3f}" if "der" in r else "–"
        lines.append(
            f"| {name} | {_pct(r['acc'])} | {_asr(r['asr'], known)} | "
            f"{_pct(r.get('agreement'))} | {d} | {r['params']:,} | "
            f"{r['flops']:,} | {flagged} | {r.get('train_seconds', '–')} |"
        )
    screens = [(n, r["screen_csv"]) for n, r in report["methods"].items() if r.get("screen_csv")]
    for name, path in screens:
        lines += ["", f"`{name}` screened samples, withheld first: `{Path(path).name}`."]
        labels = report["methods"][name].get("label_screen")
        if labels:
            lines[-1] += (
                f" With the labels, {labels['disputed']} were withheld because the teacher "
                f"disputes their label, {labels.get('within_classes', 0)} because they "
                f"deviate within their class and {labels.get('signature', 0)} because they "
                "deviate from their class the way the disputed samples do; "
                f"{labels['only_by_labels']} of these the variance screen alone missed."
            )
    if report.get("command"):
        lines += ["", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def report_csv(report: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=REPORT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerow({**report["teacher"], "scenario": report["scenario"]["scenario"]})
    for r in report["methods"].values():
        writer.writerow(r)
    return buf.getvalue()


def write_report(folder: Path, report: dict[str, Any]) -> None:
    """report.json, report.md, report.csv and figures/*.html, each written atomically."""
    from robustkd.viz.figures import acc_asr_bars, per_class_bars, training_curves

    atomic_write_json(folder / "report.json", report)
    atomic_write_text(folder / "report.md", report_markdown(report))
    atomic_write_text(folder / "report.csv", report_csv(report))
    figs = {
        "acc_asr": acc_asr_bars(report),
        "curves_asr": training_curves(report, "test_asr"),
        "curves_acc": training_curves(report, "test_acc"),
        "per_class": per_class_bars(report),
    }
    fig_dir = folder / "figures"
    fig_dir.mkdir(exist_ok=True)
    js = fig_dir / "plotly.min.js"
    if not js.exists():  # one local copy: the figures open offline
        from plotly.offline import get_plotlyjs

        atomic_write_text(js, get_plotlyjs())
    for name, fig in figs.items():
        html = fig.to_html(include_plotlyjs="plotly.min.js", full_html=True)
        atomic_write_text(fig_dir / f"{name}.html", html)


def launch_compare(
    methods: Sequence[str],
    options: dict[str, Any],
    root: str | Path | None = None,
) -> Run:
    """Start ``robustkd compare`` as a background worker in a new run folder; return the run.

    ``options`` maps CLI option names (without dashes, ``_`` for ``-``) to values, e.g.
    ``{"teacher": path, "scenario": "untrusted", "epochs": 2}``; the worker keeps running when
    the caller (the app) goes away. With ``$ROBUSTKD_MAX_RUNS`` workers already going, the run
    waits in state ``queued`` and starts when one ends (``robustkd.runs.queue.start_queued``).
    """
    from robustkd.errors import DataError
    from robustkd.runs.queue import max_runs, queue_worker, start_queued
    from robustkd.runs.store import file_sha256

    methods = [METHODS.get(m).name for m in methods]
    max_runs()  # a bad $ROBUSTKD_MAX_RUNS is refused before a run folder is made
    argv = ["compare", "--methods", ",".join(methods), "--quiet"]
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    config: dict[str, Any] = {"methods": list(methods), "options": options, "argv": argv}
    if options.get("teacher"):  # the worker and resume refuse a teacher rebuilt meanwhile
        try:
            config["teacher_sha256"] = file_sha256(options["teacher"])
        except OSError as exc:
            raise DataError(
                f"The teacher file {Path(str(options['teacher'])).name} is missing or "
                "unreadable; pick another teacher."
            ) from exc
    run = Run.create(root, "compare", config)
    queue_worker(run, [*argv, "--run", run.id])
    start_queued(run.root)
    return run
