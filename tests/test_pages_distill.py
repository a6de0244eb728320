"""The Detox & distil page launches a real background run, shows it live, and cancels."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from robustkd.runs.store import list_runs
from tests.conftest import ROOT

MAIN = str(ROOT / "app" / "main.py")
PAGE = str(ROOT / "pages" / "distill.py")


@pytest.fixture()
def page(tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("ROBUSTKD_TEACHER", str(tiny_teacher))
    monkeypatch.setenv("ROBUSTKD_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(MAIN, default_timeout=120)
    at.run()
    at.switch_page(PAGE)
    at.run()
    assert not at.exception
    return at


def _fill(at: AppTest, epochs: int = 1, distill: int = 300, trusted: int = 100) -> None:
    inputs = {w.label: w for w in at.number_input}
    inputs["Epochs"].set_value(epochs)
    inputs["Distillation images"].set_value(distill)
    inputs["Trusted clean images"].set_value(trusted)
    devices = next(s for s in at.selectbox if s.label == "Device")
    devices.set_value("cpu")


def _wait(root: Path, states: tuple[str, ...], timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = list_runs(root)
        if runs and runs[0].status().get("state") in states:
            return runs[0].status()
        time.sleep(1)
    raise AssertionError(f"no run reached {states} in {timeout} s")


def test_launch_watch_and_finish(page: AppTest, tmp_path: Path) -> None:
    assert page.title[0].value == "Detox & distil"
    assert any("No runs yet" in i.value for i in page.info)
    _fill(page)
    next(b for b in page.button if b.label == "Launch").click().run()
    assert not page.exception
    assert any("Started run" in s.value for s in page.success)
    status = _wait(tmp_path / "runs", ("done", "failed"))
    assert status["state"] == "done", status
    page.run()
    assert not page.exception
    report = json.loads((list_runs(tmp_path / "runs")[0].path / "report.json").read_text())
    text = " ".join(m.value for m in page.markdown)
    assert "| robustkd |" in text and f"{100 * report['methods']['robustkd']['acc']:.2f}" in text
    assert "label_screen" in report["methods"]["robustkd"]  # on by default: labelled data


def test_the_label_screen_can_be_turned_off(page: AppTest, tmp_path: Path) -> None:
    box = next(c for c in page.checkbox if "screens with the labels" in c.label)
    assert box.value is True
    _fill(page)
    box.uncheck()
    next(m for m in page.multiselect if m.label == "Methods").set_value(["robustkd"])
    next(b for b in page.button if b.label == "Launch").click().run()
    assert not page.exception
    run = list_runs(tmp_path / "runs")[0]
    assert "--no-label-screen" in run.config["argv"]
    assert _wait(tmp_path / "runs", ("done", "failed"))["state"] == "done"
    report = json.loads((run.path / "report.json").read_text())
    assert "label_screen" not in report["methods"]["robustkd"]


def test_cancel_a_running_run(page: AppTest, tmp_path: Path) -> None:
    _fill(page, epochs=50, distill=3000)
    next(b for b in page.button if b.label == "Launch").click().run()
    _wait(tmp_path / "runs", ("running",))
    page.run()
    cancel = next(b for b in page.button if b.label == "Cancel")
    cancel.click().run()
    assert not page.exception
    status = _wait(tmp_path / "runs", ("cancelled", "failed"), timeout=120)
    assert status["state"] == "cancelled", status
    page.run()
    assert any("cancelled" in w.value for w in page.warning)


def test_no_method_is_one_message(page: AppTest) -> None:
    next(m for m in page.multiselect if m.label == "Methods").set_value([])
    next(b for b in page.button if b.label == "Launch").click().run()
    assert not page.exception and any("at least one method" in e.value for e in page.error)


def test_one_gpu_or_none_offers_no_process_count(page: AppTest) -> None:
    assert "GPUs" not in [w.label for w in page.number_input]


def test_several_gpus_offer_data_parallel_processes(
    tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This machine has no GPU: pretend two are visible, so the form offers them. With no GPU
    # behind it, "auto" runs the 2 data-parallel processes on the CPU (gloo), for real.
    from robustkd.training import distributed

    monkeypatch.setattr(distributed, "gpu_count", lambda: 2)
    monkeypatch.setenv("ROBUSTKD_TEACHER", str(tiny_teacher))
    monkeypatch.setenv("ROBUSTKD_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(MAIN, default_timeout=120)
    at.run()
    at.switch_page(PAGE).run()
    inputs = {w.label: w for w in at.number_input}
    assert inputs["GPUs"].value == 2 and inputs["GPUs"].max == 2
    _fill(at)
    next(s for s in at.selectbox if s.label == "Device").set_value("auto")
    next(b for b in at.button if b.label == "Launch").click().run()
    assert not at.exception
    status = _wait(tmp_path / "runs", ("done", "failed"))
    assert status["state"] == "done", status
    run = list_runs(tmp_path / "runs")[0]
    argv = run.config["argv"]
    assert argv[argv.index("--nproc") + 1] == "2"


def test_the_reverse_share_reaches_robustkd_reverse(page: AppTest, tmp_path: Path) -> None:
    """The share of stamped copies set on the page is the one the run uses, and only a run
    with robustkd-reverse is given it."""
    _fill(page)
    share = next(w for w in page.number_input if w.label.startswith("robustkd-reverse"))
    assert share.value == 0.5
    share.set_value(0.25)
    next(m for m in page.multiselect if m.label == "Methods").set_value(["robustkd-reverse"])
    next(b for b in page.button if b.label == "Launch").click().run()
    assert not page.exception
    run = list_runs(tmp_path / "runs")[0]
    argv = run.config["argv"]
    assert argv[argv.index("--reverse-share") + 1] == "0.25"
    assert _wait(tmp_path / "runs", ("done", "failed"))["state"] == "done"
    report = json.loads((run.path / "report.json").read_text())
    assert report["config"]["reverse_share"] == 0.25
    assert len(report["methods"]["robustkd-reverse"]["reversed_triggers"]) == 10
