"""Plotly figures shared by the CLI's reports and the dashboard (no Streamlit here)."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go


def acc_asr_bars(report: dict[str, Any]) -> go.Figure:
    """Grouped ACC/ASR bars: the teacher, then each method, in percent."""
    names = ["teacher", *report["methods"]]
    rows = [report["teacher"], *report["methods"].values()]
    fig = go.Figure()
    fig.add_bar(
        name="ACC",
        x=names,
        y=[100 * r["acc"] for r in rows],
        text=[f"{100 * r['acc']:.1f}" for r in rows],
    )
    asr = [100 * r["asr"] if r.get("asr") is not None else None for r in rows]
    fig.add_bar(
        name="ASR", x=names, y=asr, text=[f"{a:.1f}" if a is not None else "n/a" for a in asr]
    )
    info = report["scenario"]
    fig.update_layout(
        barmode="group",
        yaxis_title="%",
        yaxis_range=[0, 105],
        title=f"ACC and ASR — scenario {info['scenario']}, trusted set {info['trusted_size']}, "
        f"seed {info['seed']}",
        legend_orientation="h",
    )
    return fig


def training_curves(report: dict[str, Any], key: str = "test_asr") -> go.Figure:
    """One line per method: ``key`` (test_acc, test_asr or loss) after each epoch."""
    fig = go.Figure()
    for name, result in report["methods"].items():
        hist = [h for h in result.get("history", []) if h.get(key) is not None]
        if hist:
            scale = 100 if key != "loss" else 1
            fig.add_scatter(
                x=[h["epoch"] for h in hist],
                y=[scale * h[key] for h in hist],
                mode="lines+markers",
                name=name,
            )
    label = {"test_acc": "ACC (%)", "test_asr": "ASR (%)", "loss": "loss"}.get(key, key)
    fig.update_layout(xaxis_title="epoch", yaxis_title=label, title=f"{label} during training")
    return fig


def per_class_bars(report: dict[str, Any], classes: list[str] | None = None) -> go.Figure:
    fig = go.Figure()
    for name, r in [("teacher", report["teacher"]), *report["methods"].items()]:
        acc = r.get("per_class_acc")
        if acc:
            labels = classes or [str(i) for i in range(len(acc))]
            fig.add_bar(name=name, x=labels, y=[100 * a for a in acc])
    fig.update_layout(barmode="group", yaxis_title="ACC (%)", title="Per-class accuracy")
    return fig


def run_curves(records: list[dict[str, Any]]) -> go.Figure:
    """Live curves of a run's metric stream: test ACC and ASR per epoch, one line per phase."""
    fig = go.Figure()
    phases: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        phases.setdefault(str(r.get("phase") or "run"), []).append(r)
    for phase, rows in phases.items():
        for key, dash in (("test_acc", "solid"), ("test_asr", "dot")):
            pts = [(r["epoch"], 100 * r[key]) for r in rows if r.get(key) is not None]
            if pts:
                fig.add_scatter(
                    x=[p[0] for p in pts],
                    y=[p[1] for p in pts],
                    mode="lines+markers",
                    name=f"{phase} {key[5:].upper()}",
                    line={"dash": dash},
                )
    fig.update_layout(
        xaxis_title="epoch",
        yaxis_title="%",
        yaxis_range=[0, 105],
        title="ACC (solid) and ASR (dotted) on test images after each epoch",
    )
    return fig
