"""Compare page: finished comparison runs side by side — ACC/ASR bars, the DER table with model
cost, per-class accuracy, training curves and the report files to download."""

from __future__ import annotations

import csv
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from app.charts import show_chart
from app.state import load_model, runs_root, show_error
from robustkd.analysis.profiling import latency_per_image, report_rows
from robustkd.defenses.reverse import ReversedTriggers
from robustkd.errors import RobustKDError, redact_paths
from robustkd.models.checkpoints import read_metadata
from robustkd.models.modelcard import input_shape_of
from robustkd.runs.store import REPORT_FILE, Run, list_runs, validate_name
from robustkd.viz.figures import acc_asr_bars, per_class_bars, training_curves

REPORT_FILES = (("report.md", "text/markdown"), ("report.json", "application/json"))
REPORT_FILES += (("report.csv", "text/csv"),)
FIGURES = ("acc_asr", "curves_asr", "curves_acc", "per_class")


@st.cache_data(show_spinner="Measuring latency …", max_entries=256)
def _latency(path: str, mtime: float) -> float | None:
    """Seconds per image on the CPU, cached per checkpoint version."""
    try:
        model, meta = load_model(path, mtime)
        return latency_per_image(model, input_shape_of(meta))
    except RobustKDError:
        return None


def _measure(path: Path) -> float | None:
    return _latency(str(path), path.stat().st_mtime)


def _file_reader(path: Path) -> Callable[[], bytes]:
    return lambda: path.read_bytes()


def _report_reader(path: Path) -> Callable[[], str]:
    """A report file as downloaded: reports of older versions held absolute server paths."""
    return lambda: redact_paths(path.read_text(encoding="utf-8"))


def _standalone_figure(path: Path) -> Callable[[], str]:
    """The figure's HTML with the plotly.min.js it refers to inlined, so it opens on its own."""

    def make() -> str:
        html = path.read_text(encoding="utf-8")
        js = path.parent / "plotly.min.js"
        tag = '<script charset="utf-8" src="plotly.min.js"></script>'
        if tag in html and js.is_file():
            inline = f'<script type="text/javascript">{js.read_text(encoding="utf-8")}</script>'
            html = html.replace(tag, inline)
        return html

    return make


def _checkpoint(run: Run, row: dict) -> Path:
    """A method's checkpoint: by its name in the run's checkpoints/ (a report never points the
    app elsewhere; older reports held absolute paths)."""
    name = validate_name(Path(str(row["checkpoint"])).name, "checkpoint name")
    return run.checkpoints_dir / name


def _teacher_file(run: Run | None) -> Path | None:
    """The teacher the run loaded, from its config (the report names it only)."""
    if run is None:
        return None
    try:
        config = run.config
    except RobustKDError:
        return None
    options = config.get("options") if isinstance(config.get("options"), dict) else {}
    teacher = config.get("teacher") or options.get("teacher")
    return Path(teacher) if isinstance(teacher, str) and teacher else None


def _recorded(report: dict, run: Run) -> dict:
    """The metadata the run's first readable checkpoint records (classes, target …)."""
    for row in report["methods"].values():
        try:
            return read_metadata(_checkpoint(run, row))
        except (RobustKDError, KeyError, OSError):
            continue
    return {}


def table_rows(report: dict, run: Run | None = None) -> list[dict]:
    """The cost table with the agreement column; ASR reads "unknown" when no trigger is known."""
    folder = run.path if run is not None else None
    rows = report_rows(report, _measure, folder, _teacher_file(run))
    known = report["scenario"].get("trigger_known", True)
    agreement = [None, *(r.get("agreement") for r in report["methods"].values())]
    out = []
    for row, agree in zip(rows, agreement, strict=True):
        row = dict(row)
        if not known:
            row["ASR (%)"] = "unknown"
        # insert after ASR: the share of test images where the model predicts as the teacher
        items = list(row.items())
        at = [k for k, _ in items].index("ASR (%)") + 1
        share = round(100 * agree, 2) if isinstance(agree, (int, float)) else None
        items.insert(at, ("agreement (%)", share))
        out.append(dict(items))
    return out


@st.cache_data(show_spinner=False, max_entries=64)
def _screen(csv_path: str, top_path: str, mtime: float) -> dict:
    """Counts from a screening CSV and the most suspicious images kept beside it."""
    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    withheld = sum(1 for r in rows if r.get("withheld") == "1")
    with np.load(top_path, allow_pickle=False) as npz:
        top = {k: npz[k] for k in ("images", "ids", "scores", "withheld")}
    n = len(top["images"])
    if (
        top["images"].dtype != np.uint8
        or top["images"].ndim != 4
        or any(len(top[k]) != n for k in ("ids", "scores", "withheld"))
    ):
        raise ValueError("malformed arrays")
    return {**top, "n_total": len(rows), "n_withheld": withheld}


def show_screening(run: Run, method: str, row: dict) -> None:
    """How many distillation samples the screen withheld, the most suspicious ones, the CSV."""
    try:
        # only file names from the report: a run folder never points the app elsewhere
        name = validate_name(Path(str(row["screen_csv"])).name, "screening file")
        if not name.endswith("-screen.csv"):
            raise ValueError(name)
        csv_path = run.path / name
        top_path = run.path / name.replace("-screen.csv", "-screen-top.npz")
        screen = _screen(str(csv_path), str(top_path), csv_path.stat().st_mtime)
    except (RobustKDError, OSError, ValueError, KeyError, csv.Error, zipfile.BadZipFile):
        show_error(
            RobustKDError(
                f"The screened samples of {method} in run {run.id} are missing or unreadable; "
                "relaunch the comparison to write them again."
            )
        )
        return
    st.subheader(f"Screened samples — {method}")
    st.caption(
        f"{screen['n_withheld']:,} of {screen['n_total']:,} distillation samples withheld from "
        f"the teacher's signal. The {len(screen['images'])} most suspicious, highest score "
        "first:"
    )
    count = min(16, len(screen["images"]))
    cols = st.columns(8)
    for i in range(count):
        image = screen["images"][i].transpose(1, 2, 0)
        cols[i % len(cols)].image(
            image[..., 0] if image.shape[-1] == 1 else image,
            caption=f"{screen['ids'][i]} · {float(screen['scores'][i]):.3g} · "
            + ("withheld" if bool(screen["withheld"][i]) else "kept"),
            width="stretch",
        )
    st.download_button(
        f"{method}-screen.csv (every sample, most suspicious first)",
        data=_file_reader(csv_path),
        file_name=f"{run.id}-{method}-screen.csv",
        mime="text/csv",
        key=f"{run.id}-dl-screen-{method}",
        on_click="ignore",
    )


@st.cache_data(show_spinner=False, max_entries=64)
def _reversed(path: str, mtime: float) -> tuple[np.ndarray, list[float], float]:
    """The pictures, flip rates and mask bound of a run's reversed triggers (checked)."""
    triggers = ReversedTriggers.load(path)
    return triggers.pictures(), triggers.flip_rates, float(triggers.masks.max())


def show_reversed_triggers(run: Run, method: str, row: dict, report: dict, recorded: dict) -> None:
    """The trigger reversed from the teacher for each class: what it adds, how often it turns
    the teacher, with the recorded target marked."""
    try:
        name = validate_name(Path(str(row["triggers_file"])).name, "reversed-triggers file")
        if not name.endswith("-triggers.npz"):
            raise ValueError(name)
        path = run.path / name
        pictures, rates, bound = _reversed(str(path), path.stat().st_mtime)
    except RobustKDError as exc:
        show_error(exc)
        return
    except (OSError, ValueError):
        show_error(
            RobustKDError(
                f"The reversed triggers of {method} in run {run.id} are missing; relaunch the "
                "comparison to write them again."
            )
        )
        return
    classes = list(recorded.get("classes") or [])
    target = recorded.get("target") if report["scenario"].get("trigger_known") else None
    st.subheader(f"Triggers reversed from the teacher — {method}")
    st.caption(
        "One blend trigger per class, learned on the trusted images to turn the teacher's "
        "answer to that class (mask at most "
        f"{bound:.2f}); each picture is what it adds to a black image, brightened to its own "
        "peak. The student is taught to answer images stamped with them as the teacher answers "
        "the clean ones. A class whose trigger turns nearly every image is one a backdoor "
        "could target — but natural classes can be easy to reach too."
    )
    cols = st.columns(min(len(pictures), 10))
    for k, picture in enumerate(pictures):
        label = classes[k] if k < len(classes) else f"class {k}"
        mark = " · recorded target" if target == k else ""
        cols[k % len(cols)].image(
            picture[..., 0] if picture.shape[-1] == 1 else picture,
            caption=f"{k} {label} · turns {100 * rates[k]:.0f} %{mark}",
            width="stretch",
        )


def show_run(run: Run) -> None:
    st.header(run.id)
    try:
        report = run.report()
        if not report or not report.get("methods"):
            st.info("This run has no results yet.")
            return
        info = report["scenario"]
        rows = table_rows(report, run)
        bars = acc_asr_bars(report)
        recorded = _recorded(report, run)  # read once: the chart and the triggers use it
        per_class = per_class_bars(report, list(recorded.get("classes") or []) or None)
        curves = {key: training_curves(report, key) for key in ("test_asr", "test_acc")}
    except (RobustKDError, KeyError, TypeError) as exc:
        show_error(
            exc
            if isinstance(exc, RobustKDError)
            else RobustKDError(
                f"The report of run {run.id} lacks {exc}; it was written by another version — "
                "relaunch the comparison."
            )
        )
        return
    st.caption(
        f"Scenario `{info.get('scenario')}` on {info.get('dataset')}: distillation set "
        f"{info.get('distill_size')}, trusted set {info.get('trusted_size')}, test set "
        f"{info.get('test_size')}, seed {info.get('seed')}. DER against "
        f"`{report.get('reference')}`; latency measured on this machine's CPU, batch 1."
    )
    show_chart(bars, f"{run.id}-bars")
    st.dataframe(pd.DataFrame(rows), hide_index=True, key=f"{run.id}-table")
    show_chart(per_class, f"{run.id}-per-class")
    left, right = st.columns(2)
    show_chart(curves["test_asr"], f"{run.id}-curves-asr", left)
    show_chart(curves["test_acc"], f"{run.id}-curves-acc", right)
    if not info.get("trigger_known", True):
        st.info("No trigger was given or recorded for this run, so its ASR is unknown.")
    for method, row in report["methods"].items():
        if isinstance(row, dict) and row.get("screen_csv"):
            show_screening(run, method, row)
        if isinstance(row, dict) and row.get("triggers_file"):
            show_reversed_triggers(run, method, row, report, recorded)
    files = [(name, mime, _report_reader(run.path / name)) for name, mime in REPORT_FILES]
    files += [
        (f"{fig}.html", "text/html", _standalone_figure(run.path / "figures" / f"{fig}.html"))
        for fig in FIGURES
    ]
    cols = st.columns(len(files))
    for col, (name, mime, data) in zip(cols, files, strict=True):
        exists = (run.path / name).is_file() or (run.path / "figures" / name).is_file()
        col.download_button(
            name,
            data=data,
            file_name=f"{run.id}-{name}",
            mime=mime,
            key=f"{run.id}-dl-{name}",
            disabled=not exists,
            on_click="ignore",
        )


st.title("Compare")
finished = [r for r in list_runs(runs_root()) if (r.path / REPORT_FILE).is_file()]
if not finished:
    st.info(
        "No comparison has finished yet; start one from the Teach page or with 'robustkd compare'."
    )
    st.stop()
ids = [r.id for r in finished]
focus = st.session_state.get("run_id")
picked = st.multiselect(
    "Runs", ids, default=[focus if focus in ids else ids[0]], key="compare_runs"
)
if not picked:
    st.info("Pick one or more runs to compare.")
for run in finished:
    if run.id in picked:
        show_run(run)
