"""The dashboard, driven headless through Streamlit's AppTest on a tiny teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import ROOT

MAIN = str(ROOT / "app" / "main.py")


@pytest.fixture()
def app(tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("ROBUSTKD_TEACHER", str(tiny_teacher))
    return AppTest.from_file(MAIN, default_timeout=120)


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_teacher_page_shows_card_and_measurements(app: AppTest) -> None:
    app.run()
    assert not app.exception
    assert _metric(app, "Architecture") == "small-cnn-student"
    assert _metric(app, "ACC").endswith("%") and _metric(app, "ASR").endswith("%")
    assert any("Device" in c.value for c in app.sidebar.caption)
    images = [e for e in app.main if type(e).__name__ == "Image"]
    assert len(images) == 16  # 8 test images, clean and triggered


def test_changing_sample_count_changes_the_measurement(app: AppTest) -> None:
    app.run()
    before = next(c.value for c in app.caption if "clean and" in c.value)
    app.select_slider[0].set_value(200).run()
    after = next(c.value for c in app.caption if "clean and" in c.value)
    assert not app.exception
    assert before != after and after.startswith("200 clean")


def test_missing_teacher_is_one_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ROBUSTKD_TEACHER", str(tmp_path / "gone.safetensors"))
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.run()
    assert not at.exception
    assert any("make teacher" in e.value for e in at.error)
