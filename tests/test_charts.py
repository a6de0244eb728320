"""Every chart of the dashboard can be saved: PNG from its toolbar, a standalone HTML file."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
import pytest
from streamlit.testing.v1 import AppTest

from app.charts import PNG_SCALE, file_stem, standalone_html

ROOT = Path(__file__).resolve().parent.parent


def test_file_stem_keeps_safe_characters_only() -> None:
    assert file_stem("run-1/curves asr") == "run-1-curves-asr"
    assert file_stem("../..") == "chart"
    assert file_stem("var_flagged") == "var_flagged"


def test_the_html_opens_offline_with_the_data() -> None:
    fig = go.Figure(go.Bar(x=["teacher", "robustkd"], y=[0.9973, 0.0271], name="ASR"))
    html = standalone_html(fig)
    assert "<html>" in html[:100] and "0.0271" in html and "robustkd" in html
    assert "<script src=" not in html  # no script fetched from anywhere
    assert len(html) > 1_000_000  # Plotly's JavaScript travels inside the file


@pytest.fixture()
def variance_page(tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("ROBUSTKD_TEACHER", str(tiny_teacher))
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=180)
    at.run()
    at.switch_page(str(ROOT / "pages" / "variance.py")).run()
    assert not at.exception
    return at


def test_every_chart_on_a_page_has_its_downloads(variance_page: AppTest) -> None:
    charts, buttons = [], []
    for tab in ("Variance maps", "Top channels", "Threshold"):  # only the open tab is drawn
        variance_page.session_state["var_tab"] = tab
        variance_page.run()
        assert not variance_page.exception
        charts += variance_page.get("plotly_chart")
        buttons += variance_page.get("download_button")
    assert len(charts) == 5 and len(buttons) == len(charts)
    for chart, button in zip(charts, buttons, strict=True):
        config = chart.proto.config
        assert '"format": "png"' in config and f'"scale": {PNG_SCALE}' in config
        assert button.proto.label == "Download chart (HTML)"
