"""Compare page: finished comparison runs side by side — ACC/ASR bars, the DER table with model
cost, per-class accuracy, training curves and the report files to download."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import streamlit as st

from app.state import load_model, runs_root, show_error
from robustkd.checkpoints import read_metadata
from robustkd.errors import RobustKDError
from robustkd.figures import acc_asr_bars, per_class_bars, training_curves
from robustkd.modelcard import input_shape_of
from robustkd.profiling import latency_per_image, report_rows
from robustkd.runs import REPORT_FILE, Run, list_runs

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


def _classes(report: dict) -> list[str] | None:
    for row in report["methods"].values():
        try:
            return list(read_metadata(row["checkpoint"]).get("classes") or []) or None
        except (RobustKDError, KeyError, OSError):
            continue
    return None


def show_run(run: Run) -> None:
    st.header(run.id)
    try:
        report = run.report()
        if not report or not report.get("methods"):
            st.info("This run has no results yet.")
            return
        info = report["scenario"]
        rows = report_rows(report, _measure)
        bars = acc_asr_bars(report)
        per_class = per_class_bars(report, _classes(report))
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
    st.plotly_chart(bars, key=f"{run.id}-bars")
    st.dataframe(pd.DataFrame(rows), hide_index=True, key=f"{run.id}-table")
    st.plotly_chart(per_class, key=f"{run.id}-per-class")
    left, right = st.columns(2)
    left.plotly_chart(curves["test_asr"], key=f"{run.id}-curves-asr")
    right.plotly_chart(curves["test_acc"], key=f"{run.id}-curves-acc")
    files = [(name, mime, _file_reader(run.path / name)) for name, mime in REPORT_FILES]
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
