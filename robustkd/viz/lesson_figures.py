"""The classroom lesson's figures (Teach page and its one-page report), sized for a projector.

Pure Plotly (no Streamlit). Every builder takes a report shaped as ``compare``'s (``teacher``,
``methods``, ``scenario``) or plain tensors, and returns a figure whose text stays readable on
a 1280×720 projector (``projector``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from robustkd.viz.figures import acc_asr_bars
from robustkd.viz.variance_figures import LayerComparison

FONT_SIZE = 18  # legible from the back of a classroom at 1280×720
TITLE_SIZE = 22
LABELS = {
    "teacher": "teacher",
    "scratch": "scratch student",
    "feature-kd": "plain KD student",
    "robustkd": "RobustKD student",
}


def projector(fig: go.Figure, height: int = 420) -> go.Figure:
    """Large type and margins that survive a projector."""
    fig.update_layout(
        font={"size": FONT_SIZE},
        title_font={"size": TITLE_SIZE},
        height=height,
        margin={"l": 60, "r": 30, "t": 80, "b": 60},
    )
    fig.update_annotations(font_size=FONT_SIZE)
    return fig


def sub_report(report: dict[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """The report with only ``methods`` (in that order), for the figures that take a report."""
    rows = report.get("methods", {})
    return {**report, "methods": {m: rows[m] for m in methods if m in rows}}


def _image_trace(image: torch.Tensor) -> go.Heatmap | go.Image:
    """A (C, H, W) image in [0, 1] as a trace: grey levels for one channel, RGB for three."""
    img = image.detach().float().clamp(0, 1).cpu()
    if img.shape[0] == 1:
        return go.Heatmap(
            z=img[0].tolist(),
            colorscale="gray",
            zmin=0,
            zmax=1,
            showscale=False,
            hovertemplate="row %{y}, col %{x}: %{z:.2f}<extra></extra>",
        )
    return go.Image(z=(img[:3].permute(1, 2, 0) * 255).round().tolist())


def stamp_figure(
    clean: torch.Tensor, triggered: torch.Tensor, clean_caption: str, triggered_caption: str
) -> go.Figure:
    """A test image and its triggered copy side by side, each captioned with a prediction."""
    # a caption "clean: teacher says Shirt (99 %)" on two lines, to fit half a projector
    titles = [c.replace(": ", ":<br>", 1) for c in (clean_caption, triggered_caption)]
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles)
    for col, image in ((1, clean), (2, triggered)):
        fig.add_trace(_image_trace(image), row=1, col=col)
        fig.update_yaxes(
            autorange="reversed",
            scaleanchor=f"x{col if col > 1 else ''}",
            showticklabels=False,
            row=1,
            col=col,
        )
        fig.update_xaxes(constrain="domain", showticklabels=False, row=1, col=col)
    return projector(fig, 380)


def lesson_bars(report: dict[str, Any], methods: Sequence[str], title: str) -> go.Figure:
    """ACC and ASR of the teacher and ``methods``, labelled for a class, not for a paper."""
    fig = acc_asr_bars(sub_report(report, methods))
    names = ["teacher", *[m for m in methods if m in report.get("methods", {})]]
    fig.update_traces(textposition="outside")
    fig.update_xaxes(tickvals=names, ticktext=[LABELS.get(n, n) for n in names])
    fig.update_layout(title=title, yaxis_range=[0, 115])
    return projector(fig)


def flagged_figure(row: dict[str, Any]) -> go.Figure:
    """RobustKD's two filters: flagged feature units per teacher layer, withheld samples."""
    units = row.get("flagged_units") or {}
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.65, 0.35],
        subplot_titles=("feature units replaced", "distillation images<br>screened out"),
        horizontal_spacing=0.15,
    )
    fig.add_bar(
        x=list(units),
        y=list(units.values()),
        text=list(units.values()),
        textposition="outside",
        showlegend=False,
        row=1,
        col=1,
    )
    flagged = row.get("flagged_samples")
    poisoned = row.get("rate", 0) * row.get("distill_size", 0) if row.get("distill_size") else None
    bars = {"screened out": flagged}
    if poisoned:
        bars = {"carried the trigger": round(poisoned), **bars}
    fig.add_bar(
        x=list(bars),
        y=list(bars.values()),
        text=list(bars.values()),
        textposition="outside",
        showlegend=False,
        marker_color="#d62728",
        row=1,
        col=2,
    )
    # each panel on its own scale: units and images are not one quantity
    fig.update_yaxes(range=[0, 1.25 * max([1, *units.values()])], row=1, col=1)
    fig.update_yaxes(range=[0, 1.25 * max([1, *(v for v in bars.values() if v)])], row=1, col=2)
    fig.update_layout(title="What RobustKD filters out of the teacher")
    return projector(fig)


def price_figure(report: dict[str, Any], methods: Sequence[str]) -> go.Figure:
    """What each student costs and keeps: ACC, parameters and FLOPs against the teacher."""
    names = ["teacher", *[m for m in methods if m in report.get("methods", {})]]
    rows = [report["teacher"], *(report["methods"][m] for m in names[1:])]
    labels = [LABELS.get(n, n) for n in names]
    fig = make_subplots(rows=1, cols=3, subplot_titles=("ACC (%)", "parameters", "FLOPs"))
    series = (
        [100 * r["acc"] for r in rows],
        [r.get("params") for r in rows],
        [r.get("flops") for r in rows],
    )
    for col, values in enumerate(series, start=1):
        text = [
            (f"{v:.1f}" if col == 1 else f"{v / 1e6:.2f} M" if v >= 1e6 else f"{v / 1e3:.0f} k")
            if v is not None
            else "n/a"
            for v in values
        ]
        fig.add_bar(
            x=labels, y=values, text=text, textposition="outside", showlegend=False, row=1, col=col
        )
    fig.update_yaxes(range=[0, 115], row=1, col=1)
    for col in (2, 3):
        top = max((v for v in series[col - 1] if v is not None), default=1)
        fig.update_yaxes(range=[0, 1.2 * top], row=1, col=col)
    fig.update_xaxes(tickangle=-30)
    fig.update_layout(title="The price: what a student keeps and what it costs")
    return projector(fig, 460)


def unit_ratio_map(cmp: LayerComparison) -> go.Figure:
    """Step 3's picture: per position, the largest triggered / clean variance ratio of any
    unit there; the trigger's spot lights up."""
    peak = cmp.unit_ratio.amax(0)
    fig = go.Figure(
        go.Heatmap(
            z=peak.tolist(),
            colorscale="Reds",
            zmin=1.0,
            colorbar={"title": "×"},
            hovertemplate="row %{y}, column %{x}: ×%{z:.1f}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed", scaleanchor="x", title="row")
    fig.update_xaxes(constrain="domain", title="column")
    fig.update_layout(title=f"{cmp.layer}: per-unit variance, triggered ÷ clean")
    return projector(fig, 400)


def channel_ratio_bars(cmp: LayerComparison) -> go.Figure:
    """The same layer's ratio per whole channel, on the per-unit map's scale: flat."""
    ratios = cmp.channel_ratio.tolist()
    fig = go.Figure(
        go.Bar(
            x=list(range(len(ratios))),
            y=ratios,
            hovertemplate="channel %{x}: ×%{y:.2f}<extra></extra>",
        )
    )
    top = max(float(cmp.unit_ratio.max()), max(ratios, default=1.0))
    fig.add_hline(y=1.0, line_dash="dot")
    fig.update_layout(
        title=f"{cmp.layer}: the same per whole channel",
        xaxis_title="channel",
        yaxis={"title": "×", "range": [0, 1.05 * top]},
    )
    return projector(fig, 340)
