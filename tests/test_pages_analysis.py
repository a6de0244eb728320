"""Attributions, Compare and Teach: the library functions behind them, and the pages driven
headless through AppTest on a tiny teacher with runs in a temporary folder.

Pages are opened as a user would: run the app (Teacher is the default page), then
``AppTest.switch_page(<page file>)``. Until ``app/main.py`` registers these pages, the same
navigation is built by a small stand-in entry script.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest
from torch import nn

from robustkd.analysis.attribution import ATTRIBUTION_METHODS, attribute, mass_in_region, overlay
from robustkd.analysis.profiling import latency_per_image, report_rows
from robustkd.attacks import BadNetsTrigger
from robustkd.errors import UnknownNameError
from robustkd.experiments.compare import compare
from robustkd.models import create_model
from robustkd.models.checkpoints import load_checkpoint
from robustkd.runs.liveness import refresh_state
from robustkd.runs.store import TERMINAL_STATES, Run, list_runs
from robustkd.training.distill import DistillConfig
from robustkd.training.scenarios import build_scenario
from tests.conftest import ROOT

MAIN = ROOT / "app" / "main.py"
PAGES = ["teacher", "attributions", "compare", "teach"]
STAND_IN = """
import streamlit as st
from app.state import sidebar
page = st.navigation([st.Page({paths[0]!r}, default=True), *[st.Page(p) for p in {paths[1:]!r}]])
sidebar()
page.run()
"""
TINY_DEMO = {"distill_size": 300, "trusted_size": 100, "test_size": 200, "epochs": 1}
SLOW_DEMO = {"distill_size": 4000, "trusted_size": 100, "test_size": 200, "epochs": 3}
MEAN, STD = (0.3,), (0.35,)


# --------------------------------------------------------------------------- library


@pytest.fixture(scope="module")
def student() -> nn.Module:
    torch.manual_seed(0)
    return create_model("small-cnn-student").eval()


@pytest.mark.parametrize("method", ATTRIBUTION_METHODS)
def test_attribute_gives_nonnegative_maps(student: nn.Module, method: str) -> None:
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    maps = attribute(student, images, torch.tensor([0, 3, 7]), method, MEAN, STD, steps=8)
    assert maps.shape == (3, 28, 28)
    assert torch.isfinite(maps).all() and (maps >= 0).all() and maps.sum() > 0
    assert not student.training


class PatchOnly(nn.Module):
    """Looks only at the bottom-right 3×3 BadNets patch (rows and columns 24–26)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(9, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x[:, 0, 24:27, 24:27].flatten(1))


class PatchBlind(nn.Module):
    """A CNN that never sees the BadNets patch (it is zeroed before the convolution)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)
        keep = torch.ones(28, 28)
        keep[24:27, 24:27] = 0
        self.register_buffer("keep", keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x * self.keep))
        return self.fc(h.mean(dim=(2, 3)))


def test_saliency_mass_follows_what_the_model_looks_at() -> None:
    torch.manual_seed(0)
    region = BadNetsTrigger(size=3).region_mask(28, 28)
    assert int(region.sum()) == 9 and bool(region[24:27, 24:27].all())
    images = BadNetsTrigger().apply(torch.rand(4, 1, 28, 28))
    targets = torch.tensor([0, 0, 1, 2])
    looking = attribute(PatchOnly(), images, targets, "saliency", MEAN, STD)
    blind = attribute(PatchBlind(), images, targets, "saliency", MEAN, STD)
    assert (mass_in_region(looking, region) > 0.9).all()
    assert (mass_in_region(blind, region) < 0.01).all()


def test_mistakes_are_named() -> None:
    with pytest.raises(UnknownNameError, match="saliency, integrated-gradients"):
        attribute(PatchOnly(), torch.rand(1, 1, 28, 28), torch.tensor([0]), "lime", MEAN, STD)
    with pytest.raises(UnknownNameError, match="block1"):
        attribute(
            create_model("small-cnn-student"),
            torch.rand(1, 1, 28, 28),
            torch.tensor([0]),
            "layer-gradcam",
            MEAN,
            STD,
            layer="nope",
        )


def test_mass_overlay_and_latency(student: nn.Module) -> None:
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[0, 0] = True
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0], maps[0, 3, 3] = 3.0, 1.0
    assert mass_in_region(maps, region).tolist() == [0.75, 0.0]  # an empty map has no mass
    out = overlay(torch.full((1, 4, 4), 0.5), maps[0])
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    assert out[0, 0, 0] > out[0, 0, 1] and out[1, 1].tolist() == [128, 128, 128]
    seconds = latency_per_image(student, (1, 28, 28), repeats=5)
    assert isinstance(seconds, float) and 0 < seconds < 1


# --------------------------------------------------------------------------- pages


def open_page(name: str, tmp_path: Path, query: dict[str, str] | None = None) -> AppTest:
    """The app on its default page, then switched to ``pages/<name>.py`` (with ``query`` as
    the address's query parameters)."""
    paths = [str(ROOT / "pages" / f"{p}.py") for p in PAGES]
    if f"{name}.py" in MAIN.read_text():
        at = AppTest.from_file(str(MAIN), default_timeout=120)
    else:
        script = tmp_path / "stand_in_main.py"
        script.write_text(STAND_IN.format(paths=paths))
        at = AppTest.from_file(str(script), default_timeout=120)
    at.run()
    assert not at.exception
    at.query_params.update(query or {})
    at.switch_page(str(ROOT / "pages" / f"{name}.py")).run()
    assert not at.exception, at.exception
    return at


@pytest.fixture()
def env(tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The tiny teacher as the shipped one, and an empty runs folder; stray workers end."""
    root = tmp_path / "runs"
    monkeypatch.setenv("ROBUSTKD_TEACHER", str(tiny_teacher))
    monkeypatch.setenv("ROBUSTKD_RUNS", str(root))
    yield root
    for run in list_runs(root):
        status = refresh_state(run)
        if status.get("pid") and status.get("state") not in TERMINAL_STATES:
            run.request_cancel()
            wait_for(run, 60)


def wait_for(run: Run, timeout: float, states: tuple[str, ...] = TERMINAL_STATES) -> str:
    deadline = time.monotonic() + timeout
    while (state := refresh_state(run).get("state")) not in states:
        if time.monotonic() > deadline:
            break
        time.sleep(0.3)
    return state


def images(at: AppTest) -> list:
    return [e for e in at.main if type(e).__name__ == "Image"]


def shares(at: AppTest) -> list[str]:
    """The '… % in region' share under each overlay."""
    return [c.split("·")[-1] for e in images(at) for c in e.captions]


def pixels(at: AppTest) -> list[str]:
    return [url for e in images(at) for url in e.value]  # media ids hash the image bytes


def test_attributions_page_measures_the_trigger_region(env: Path, tmp_path: Path) -> None:
    at = open_page("attributions", tmp_path)
    assert at.title[0].value == "Attributions" and not at.error
    labels = [m.label for m in at.metric]
    assert "Mass in the trigger region — triggered" in labels
    assert all(m.value.endswith("%") for m in at.metric)
    assert len(shares(at)) == 8  # 4 clean and 4 triggered images, each with its share
    before = ([m.value for m in at.metric], shares(at), pixels(at))
    at.selectbox(key="attr_method").set_value("integrated-gradients").run()
    assert not at.exception and not at.error
    after = ([m.value for m in at.metric], shares(at), pixels(at))
    assert len(after[1]) == 8 and all(a != b for a, b in zip(before, after, strict=True))


@pytest.fixture()
def finished_compare(env: Path, tiny_teacher: Path) -> Run:
    model, meta = load_checkpoint(tiny_teacher)
    meta["path"] = str(tiny_teacher)
    scenario = build_scenario(
        "untrusted", meta, rate=0.2, distill_size=300, trusted_size=100, test_size=200
    )
    config = DistillConfig(epochs=1, batch_size=64, device="cpu", eval_size=100)
    # as the CLI writes it: the report names the teacher, the config says where it is
    run = Run.create(
        env, "compare", {"methods": ["scratch", "feature-kd"], "teacher": str(tiny_teacher)}
    )
    run.start(epochs=2)
    run.finish(compare(model, meta, scenario, ["scratch", "feature-kd"], config, run))
    return run


def test_compare_page_shows_a_finished_run(
    finished_compare: Run, tmp_path: Path, tiny_teacher: Path
) -> None:
    report = finished_compare.report()
    rows = report_rows(report, lambda path: 0.002, finished_compare.path, tiny_teacher)
    assert [r["model"] for r in rows] == ["teacher", "scratch", "feature-kd"]
    assert all(r["checkpoint (MB)"] > 0 and r["latency (ms / image)"] == 2.0 for r in rows)

    at = open_page("compare", tmp_path)
    assert not at.error and at.multiselect(key="compare_runs").value == [finished_compare.id]
    charts = at.get("plotly_chart")
    assert len(charts) == 4  # ACC/ASR bars, per-class accuracy, ASR and ACC curves
    table = at.dataframe[0].value
    assert list(table["model"]) == ["teacher", "scratch", "feature-kd"]
    assert table["ASR (%)"][2] == pytest.approx(
        100 * report["methods"]["feature-kd"]["asr"], abs=0.01
    )
    assert (table["latency (ms / image)"] > 0).all() and (table["checkpoint (MB)"] > 0).all()
    names = [b.label for b in at.get("download_button")]
    files = [n for n in names if n != "Download chart (HTML)"]  # the run's files
    assert {"report.md", "report.json", "report.csv", "acc_asr.html"} <= set(files)
    assert len(files) == 7 and len(names) - len(files) == len(charts)  # one per chart


def test_attributions_of_a_student_from_a_run(finished_compare: Run, tmp_path: Path) -> None:
    at = open_page("attributions", tmp_path)
    label = f"{finished_compare.id} / feature-kd"
    assert label in at.selectbox(key="attr_model").options
    at.selectbox(key="attr_model").set_value(label).run()
    at.selectbox(key="attr_method").set_value("layer-gradcam").run()
    assert not at.exception and not at.error
    assert at.selectbox(key="attr_layer").value == "block1"  # Grad-CAM's shallow default
    assert label in at.caption[0].value and len(shares(at)) == 8


def test_unreadable_report_is_one_message(env: Path, tmp_path: Path) -> None:
    run = Run.create(env, "compare", {"methods": ["scratch"]})
    (run.path / "report.json").write_text("{not json")
    at = open_page("compare", tmp_path)
    assert "unreadable" in at.error[0].value and not at.get("plotly_chart")


def demo_run(root: Path) -> Run:
    runs = list_runs(root)
    assert len(runs) == 1
    run = runs[0]
    assert run.config["methods"] == ["scratch", "feature-kd", "robustkd"]
    assert run.config["options"]["preset"] == "fashion-badnets-quick"
    return run


def test_teach_demo_reports_the_numbers_it_measured(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROBUSTKD_TEACH_OPTIONS", json.dumps(TINY_DEMO))
    at = open_page("teach", tmp_path)
    assert at.radio(key="teach_source").value == "The shipped lesson"
    at.button(key="teach_start").click().run()
    assert not at.exception and not at.error
    run = demo_run(env)
    assert run.config["options"]["distill_size"] == 300
    assert wait_for(run, 120) == "done", run.log_tail()

    # another session does not see it ...
    other = open_page("teach", tmp_path)
    assert other.radio(key="teach_source").options == ["The shipped lesson"]
    assert not any("Your run is done" in s.value for s in other.success)
    # ... unless its address names it (reopened or shared): then the steps switch to it
    fresh = open_page("teach", tmp_path, {"run": run.id})
    assert fresh.radio(key="teach_source").value == "Your run"
    report = json.loads((run.path / "report.json").read_text())
    pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731
    t, kd, rk = report["teacher"], report["methods"]["feature-kd"], report["methods"]["robustkd"]
    said = lambda at: " ".join(m.value for m in at.markdown)  # noqa: E731
    assert f"ACC {pct(t['acc'])}" in said(fresh) and f"{pct(t['asr'])}" in said(fresh)
    fresh.button(key="teach_next").click().run()
    assert f"ASR {pct(kd['asr'])}" in said(fresh)
    fresh.segmented_control(key="teach_step").set_value("4 · RobustKD").run()
    assert not fresh.exception and f"ASR is {pct(rk['asr'])}" in said(fresh)
    assert f"run {run.id}" in " ".join(c.value for c in fresh.caption)
    assert any("Your run is done" in s.value for s in fresh.success)
    assert not fresh.button(key="teach_start").disabled
    # back to the shipped lesson: its numbers, not the run's
    fresh.radio(key="teach_source").set_value("The shipped lesson").run()
    assert "the shipped lesson" in " ".join(c.value for c in fresh.caption)


def test_teach_demo_can_be_cancelled(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROBUSTKD_TEACH_OPTIONS", json.dumps(SLOW_DEMO))
    at = open_page("teach", tmp_path)
    at.button(key="teach_start").click().run()
    run = demo_run(env)
    assert wait_for(run, 60, ("running", *TERMINAL_STATES)) == "running"
    at.run()
    assert at.button(key="teach_start").disabled and any(at.get("progress"))
    at.button(key="teach_cancel").click().run()
    assert not at.exception
    assert wait_for(run, 60) == "cancelled", run.log_tail()
    at.run()
    assert any("cancelled" in w.value for w in at.warning)


def test_bad_teach_options_are_one_message(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROBUSTKD_TEACH_OPTIONS", "[1, 2]")
    at = open_page("teach", tmp_path)
    at.button(key="teach_start").click().run()
    assert not at.exception and "JSON object" in at.error[0].value
    assert list_runs(env) == []
