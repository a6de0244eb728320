"""Every chart the dashboard draws, drawn one way: interactive, and downloadable.

The chart's toolbar saves it as a PNG (at twice the screen resolution, named after the chart);
the button under it saves it as a self-contained HTML file (Plotly's JavaScript inside, so it
opens offline: a lecturer's slides, a paper's supplement). The HTML is built only when the
button is clicked.
"""

from __future__ import annotations

import re
from typing import Any

import plotly.graph_objects as go
import streamlit as st

PNG_SCALE = 2


def file_stem(key: str) -> str:
    """A file name made from a chart's key (letters, digits, ``-`` and ``_`` only)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", key).strip("-") or "chart"


def standalone_html(fig: go.Figure) -> str:
    """``fig`` as one HTML file that needs no network to open."""
    return fig.to_html(include_plotlyjs=True, full_html=True)


def show_chart(fig: go.Figure, key: str, where: Any = None) -> None:
    """Draw ``fig`` in ``where`` (a column or container; the page by default) with its PNG
    and HTML downloads."""
    where = st if where is None else where
    stem = file_stem(key)
    where.plotly_chart(
        fig,
        key=key,
        config={"toImageButtonOptions": {"format": "png", "filename": stem, "scale": PNG_SCALE}},
    )
    where.download_button(
        "Download chart (HTML)",
        data=lambda: standalone_html(fig),
        file_name=f"{stem}.html",
        mime="text/html",
        key=f"{key}-html",
        on_click="ignore",
    )
