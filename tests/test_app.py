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


def test_a_page_switch_back_to_the_teacher_measures_nothing_again(
    app: AppTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    import streamlit as st

    import robustkd.analysis.metrics as metrics

    calls = []
    real = metrics.evaluate
    monkeypatch.setattr(metrics, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    st.cache_resource.clear()
    app.run()
    first = _metric(app, "ACC")
    app.switch_page(str(ROOT / "pages" / "compare.py")).run()
    app.switch_page(str(ROOT / "pages" / "teacher.py")).run()
    app.run()
    assert not app.exception and _metric(app, "ACC") == first
    assert len(calls) == 1  # shared by every session and rerun until the teacher changes
    app.select_slider[0].set_value(200).run()
    assert len(calls) == 2


def test_a_shipped_example_teacher_is_one_choice_away(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sidebar offers the shipped examples beside the default; picking one shows its
    attack on the Triggers page, and the default is one choice back."""
    from app.state import EXAMPLE_NAMES

    monkeypatch.delenv("ROBUSTKD_TEACHER", raising=False)
    at = AppTest.from_file(MAIN, default_timeout=180)
    at.run()
    box = at.sidebar.selectbox(key="teacher_shipped")
    assert box.options[0] == "Default: default_teacher" and box.value == box.options[0]
    assert EXAMPLE_NAMES["optimized-blend"] in box.options
    box.set_value(EXAMPLE_NAMES["optimized-blend"]).run()
    assert not at.exception and at.session_state["teacher_path"].endswith(
        "optimized-blend.safetensors"
    )
    at.switch_page(str(ROOT / "pages" / "triggers.py")).run()
    assert not at.exception and not at.error
    assert at.selectbox(key="trig_name").value == "optimized-blend"
    assert any(c.value.startswith("The teacher's learned pattern") for c in at.caption)
    at.sidebar.selectbox(key="teacher_shipped").set_value(box.options[0]).run()
    assert at.session_state["teacher_path"].endswith("default_teacher.safetensors")


def test_missing_teacher_is_one_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ROBUSTKD_TEACHER", str(tmp_path / "gone.safetensors"))
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.run()
    assert not at.exception
    assert any("make teacher" in e.value for e in at.error)


def _use_upload(
    at: AppTest, name: str, content: bytes, arch: str = "recognise from the keys", classes: int = 10
) -> None:
    at.sidebar.radio(key="teacher_src").set_value("Upload").run()
    at.sidebar.file_uploader(key="teacher_upload").upload(name, content)
    at.sidebar.selectbox(key="teacher_arch").set_value(arch)
    at.sidebar.number_input(key="teacher_classes").set_value(classes)
    at.run()
    at.sidebar.button(key="teacher_use").click().run()


def test_uploading_junk_keeps_the_current_teacher(
    app: AppTest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROBUSTKD_RUNS", str(tmp_path / "runs"))
    app.run()
    _use_upload(app, "model.safetensors", b"GIF89a this is not a model")
    assert not app.exception
    assert any("not a checkpoint" in e.value for e in app.sidebar.error)
    assert _metric(app, "Architecture") == "small-cnn-student"  # nothing was lost
    # kept (per content), not dropped
    assert len(list((tmp_path / "runs" / "uploads").glob("*/model.safetensors"))) == 1


def test_uploading_a_state_dict_switches_the_teacher(
    app: AppTest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    import torch

    from robustkd.models import create_model

    monkeypatch.setenv("ROBUSTKD_RUNS", str(tmp_path / "runs"))
    buf = io.BytesIO()
    torch.save(create_model("small-cnn").state_dict(), buf)
    app.run()
    _use_upload(app, "other.pt", buf.getvalue(), arch="small-cnn")
    assert not app.exception
    assert any("Now using other.pt" in s.value for s in app.sidebar.success)
    app.run()
    assert _metric(app, "Architecture") == "small-cnn"
    wrong = io.BytesIO()
    torch.save(create_model("small-cnn").state_dict(), wrong)
    _use_upload(app, "wrong.pt", wrong.getvalue(), arch="small-cnn-student")
    assert any("do not fit 'small-cnn-student'" in e.value for e in app.sidebar.error)
    assert _metric(app, "Architecture") == "small-cnn"  # the last good teacher stays


def test_uploading_a_model_for_other_data_is_refused(
    app: AppTest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    import torch

    from robustkd.models import create_model

    monkeypatch.setenv("ROBUSTKD_RUNS", str(tmp_path / "runs"))
    buf = io.BytesIO()
    torch.save(create_model("small-cnn", num_classes=100).state_dict(), buf)
    app.run()
    _use_upload(app, "cifar100.pt", buf.getvalue(), arch="small-cnn", classes=100)
    assert not app.exception
    assert any("100 classes" in e.value for e in app.sidebar.error)
    assert _metric(app, "Architecture") == "small-cnn-student"
