"""Clean-versus-triggered feature variance at one layer: the numbers and the Plotly figures.

``compare_layer`` turns two ``LayerStats`` (same layer, clean and triggered images) into the
per-channel and per-unit variance ratios the Feature variance page shows; the builders below
draw them (pure Plotly, no Streamlit). Spatial maps are drawn with row 0 at the top, as images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from robustkd.analysis.features import VARIANCE_FLOOR, LayerStats, top_k, variance_score
from robustkd.defenses.detox import LayerFit, check_threshold
from robustkd.errors import ConfigError

RATIO_SCALE = "RdBu_r"  # diverging: ratio 1 (no change) is the middle
VALUE_SCALE = "Viridis"


@dataclasses.dataclass(frozen=True)
class LayerComparison:
    """Variance of one layer on clean and on triggered images, and their ratio.

    Ratios are ``features.variance_score`` of the triggered statistics against the clean ones
    (with its variance floor), so a ratio of 1 means "no change".
    """

    layer: str
    n: int
    clean_var: torch.Tensor  # (C,)
    triggered_var: torch.Tensor  # (C,)
    channel_ratio: torch.Tensor  # (C,)
    unit_ratio: torch.Tensor  # (C, H, W)
    spatial_clean: torch.Tensor  # (H, W) unit variance averaged over channels
    spatial_triggered: torch.Tensor  # (H, W)
    spatial_ratio: torch.Tensor  # (H, W) unit ratio averaged over channels

    @property
    def channels(self) -> int:
        return int(self.clean_var.numel())

    def top_channels(self, k: int) -> tuple[list[int], list[float]]:
        """The ``k`` channels whose variance grows most under the trigger, and their ratios."""
        values, idx = top_k(self.channel_ratio, k)
        return [int(i) for i in idx], [float(v) for v in values]


def compare_layer(
    clean: LayerStats, triggered: LayerStats, floor: float = VARIANCE_FLOOR
) -> LayerComparison:
    """Compare a layer's statistics on triggered images with those on clean images."""
    if clean.layer != triggered.layer or clean.channel_var.shape != triggered.channel_var.shape:
        raise ConfigError(
            f"Compare statistics of one layer; got {clean.layer!r} and {triggered.layer!r}."
        )
    unit_ratio = variance_score(triggered, clean, per_unit=True, floor=floor)
    return LayerComparison(
        layer=clean.layer,
        n=min(clean.n, triggered.n),
        clean_var=clean.channel_var,
        triggered_var=triggered.channel_var,
        channel_ratio=variance_score(triggered, clean, floor=floor),
        unit_ratio=unit_ratio,
        spatial_clean=clean.spatial_variance_map(),
        spatial_triggered=triggered.spatial_variance_map(),
        spatial_ratio=unit_ratio.mean(0),
    )


def _prefix(layer: str) -> str:
    return f"{layer}: " if layer else ""


def _image_axes(fig: go.Figure, panels: int) -> None:
    for i in range(1, panels + 1):
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{i if i > 1 else ''}", row=1, col=i)
        fig.update_xaxes(constrain="domain", row=1, col=i)


def channel_variance_figure(cmp: LayerComparison) -> go.Figure:
    """Per-channel variance, clean and triggered (log10, 2 × C), and their ratio (1 × C)."""
    channels = list(range(cmp.channels))
    log_var = torch.stack([cmp.clean_var, cmp.triggered_var]).clamp_min(1e-12).log10()
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.6, 0.4],
        vertical_spacing=0.08,
        subplot_titles=("variance (log10)", "ratio triggered / clean"),
    )
    fig.add_heatmap(
        z=log_var.tolist(),
        x=channels,
        y=["clean", "triggered"],
        colorscale=VALUE_SCALE,
        colorbar={"title": "log10 var", "y": 0.75, "len": 0.5},
        customdata=torch.stack([cmp.clean_var, cmp.triggered_var]).tolist(),
        hovertemplate="channel %{x}, %{y}: variance %{customdata:.4g}<extra></extra>",
        row=1,
        col=1,
    )
    fig.add_heatmap(
        z=[cmp.channel_ratio.tolist()],
        x=channels,
        y=["ratio"],
        colorscale=RATIO_SCALE,
        zmid=1.0,
        colorbar={"title": "ratio", "y": 0.2, "len": 0.4},
        hovertemplate="channel %{x}: ratio %{z:.3g}<extra></extra>",
        row=2,
        col=1,
    )
    fig.update_xaxes(title_text="channel", row=2, col=1)
    fig.update_layout(title=f"{cmp.layer}: per-channel variance over {cmp.n} images", height=360)
    return fig


def spatial_variance_figure(cmp: LayerComparison) -> go.Figure:
    """Where the variance sits: clean, triggered and ratio maps (averaged over channels)."""
    fig = make_subplots(
        rows=1, cols=3, subplot_titles=("clean", "triggered", "ratio triggered / clean")
    )
    vmax = float(torch.maximum(cmp.spatial_clean.max(), cmp.spatial_triggered.max()))
    for col, m in ((1, cmp.spatial_clean), (2, cmp.spatial_triggered)):
        fig.add_heatmap(
            z=m.tolist(),
            colorscale=VALUE_SCALE,
            zmin=0.0,
            zmax=vmax,
            showscale=col == 2,
            colorbar={"title": "variance", "x": 0.64},
            hovertemplate="row %{y}, col %{x}: %{z:.4g}<extra></extra>",
            row=1,
            col=col,
        )
    fig.add_heatmap(
        z=cmp.spatial_ratio.tolist(),
        colorscale=RATIO_SCALE,
        zmid=1.0,
        colorbar={"title": "ratio"},
        hovertemplate="row %{y}, col %{x}: ratio %{z:.3g}<extra></extra>",
        row=1,
        col=3,
    )
    _image_axes(fig, 3)
    fig.update_layout(
        title=f"{cmp.layer}: per-unit variance, mean over channels ({cmp.n} images)", height=340
    )
    return fig


def ranked_channels_figure(cmp: LayerComparison, k: int = 20) -> go.Figure:
    """The ``k`` channels with the largest triggered / clean variance ratio."""
    idx, values = cmp.top_channels(k)
    fig = go.Figure()
    fig.add_bar(
        x=[f"ch {i}" for i in idx],
        y=values,
        text=[f"{v:.2f}" for v in values],
        hovertemplate="%{x}: ratio %{y:.3g}<extra></extra>",
    )
    fig.add_hline(y=1.0, line_dash="dot", annotation_text="no change")
    fig.update_layout(
        title=f"{cmp.layer}: top {len(idx)} channels by variance ratio",
        xaxis_title="channel",
        yaxis_title="ratio triggered / clean",
        height=340,
    )
    return fig


def activation_maps_figure(
    clean: torch.Tensor, triggered: torch.Tensor, channels: Sequence[int], layer: str = ""
) -> go.Figure:
    """Activation maps of ``channels`` for one image, clean (top row) and triggered (bottom).

    ``clean`` and ``triggered`` are one image's ``(C, H, W)`` activations; each channel shares
    one colour range across its two maps. The maps are tiled into one heatmap (one pair of
    axes, blank gaps between tiles), which a browser draws several times faster than one
    subplot per map; hovering a tile names its channel and shows the raw activation.
    """
    if clean.dim() != 3 or clean.shape != triggered.shape:
        raise ConfigError(
            "Give one image's (C, H, W) activations, clean and triggered, of the same shape."
        )
    channels = [int(c) for c in channels]
    if not channels or not all(0 <= c < clean.shape[0] for c in channels):
        raise ConfigError(f"Choose channels between 0 and {clean.shape[0] - 1}; got {channels}.")
    h, w = clean.shape[1:]
    gap = max(1, w // 6)
    rows, cols = 2 * h + gap, len(channels) * (w + gap) - gap
    shade = torch.full((rows, cols), float("nan"))  # colour: the channel's own range
    value = torch.full((rows, cols), float("nan"))  # hover: the raw activation
    label = [[""] * cols for _ in range(rows)]
    for j, c in enumerate(channels):
        lo = float(torch.minimum(clean[c].min(), triggered[c].min()))
        hi = float(torch.maximum(clean[c].max(), triggered[c].max()))
        x0 = j * (w + gap)
        for i, (acts, kind) in enumerate(((clean, "clean"), (triggered, "triggered"))):
            y0 = i * (h + gap)
            shade[y0 : y0 + h, x0 : x0 + w] = (acts[c] - lo) / (hi - lo) if hi > lo else 0.5
            value[y0 : y0 + h, x0 : x0 + w] = acts[c]
            for r in range(h):
                label[y0 + r][x0 : x0 + w] = [f"ch {c} {kind}, row {r}, col {k}" for k in range(w)]
    fig = go.Figure(
        go.Heatmap(
            z=shade.tolist(),
            customdata=value.tolist(),
            text=label,
            colorscale=VALUE_SCALE,
            zmin=0.0,
            zmax=1.0,
            showscale=False,
            hoverongaps=False,
            hovertemplate="%{text}: %{customdata:.3g}<extra></extra>",
        )
    )
    fig.update_xaxes(
        tickvals=[j * (w + gap) + (w - 1) / 2 for j in range(len(channels))],
        ticktext=[f"ch {c}" for c in channels],
        showgrid=False,
        zeroline=False,
        constrain="domain",
    )
    fig.update_yaxes(
        tickvals=[(h - 1) / 2, h + gap + (h - 1) / 2],
        ticktext=["clean", "triggered"],
        autorange="reversed",
        scaleanchor="x",
        showgrid=False,
        zeroline=False,
    )
    fig.update_layout(
        title=f"{_prefix(layer)}activations of the top {len(channels)} channels "
        "(each channel on its own colour range)",
        height=420,
    )
    return fig


def flagged_units_figure(fit: LayerFit, threshold: float) -> go.Figure:
    """A threshold fit at one layer: the highest unit score per position, and how many
    channels are flagged (to be masked) there at ``threshold``."""
    check_threshold(threshold)
    mask = fit.mask(threshold)
    scores = fit.scores
    if scores.dim() == 1:  # channel granularity: one score per channel, at every position
        scores = scores[:, None, None].expand_as(mask)
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("highest unit score", f"channels flagged at threshold {threshold:.3g}"),
    )
    fig.add_heatmap(
        z=scores.amax(0).tolist(),
        colorscale=RATIO_SCALE,
        zmid=1.0,
        colorbar={"title": "score", "x": 0.44},
        hovertemplate="row %{y}, col %{x}: score %{z:.3g}<extra></extra>",
        row=1,
        col=1,
    )
    fig.add_heatmap(
        z=mask.sum(0).tolist(),
        colorscale="Reds",
        zmin=0,
        zmax=max(1, int(mask.shape[0])),
        colorbar={"title": "flagged"},
        hovertemplate="row %{y}, col %{x}: %{z} channels flagged<extra></extra>",
        row=1,
        col=2,
    )
    _image_axes(fig, 2)
    fig.update_layout(
        title=f"{fit.layer}: {int(mask.sum())} of {mask.numel()} units flagged",
        height=340,
    )
    return fig
