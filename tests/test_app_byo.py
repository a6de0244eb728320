"""Bring your own teacher and data, in the app: uploads in the sidebar, the pages on the user's
test set, an as-is comparison's screened samples, and a launch that passes the user's data."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from robustkd.data.datasets import ImageDataset
from robustkd.experiments.compare import compare
from robustkd.models import create_model
from robustkd.models.checkpoints import load_checkpoint, read_metadata
from robustkd.runs.store import Run, list_runs
from robustkd.training.distill import DistillConfig
from robustkd.training.scenarios import DataSources, build_scenario
from tests.conftest import ROOT

MAIN = str(ROOT / "app" / "main.py")
PAGES = ROOT / "pages"


@pytest.fixture()
def runs(tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "runs"
    monkeypatch.setenv("ROBUSTKD_TEACHER", str(tiny_teacher))
    monkeypatch.setenv("ROBUSTKD_RUNS", str(root))
    return root


@pytest.fixture()
def app(runs: Path) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=120)
    at.run()
    assert not at.exception
    return at


def state_dict_bytes(arch: str, seed: int = 0) -> bytes:
    """A model trained nowhere: random weights saved as a bare state dict."""
    torch.manual_seed(seed)
    buf = io.BytesIO()
    torch.save(create_model(arch).state_dict(), buf)
    return buf.getvalue()


def npz_bytes(data: ImageDataset, labelled: bool = True) -> bytes:
    buf = io.BytesIO()
    arrays = {"x": data.images[:, 0].numpy()}
    if labelled:
        arrays["y"] = data.labels.numpy()
    np.savez(buf, **arrays)
    return buf.getvalue()


def use_teacher(at: AppTest, name: str, content: bytes, arch: str | None = None) -> None:
    if at.sidebar.radio(key="teacher_src").value != "Upload":
        at.sidebar.radio(key="teacher_src").set_value("Upload").run()
    at.sidebar.file_uploader(key="teacher_upload").set_value(
        (name, content, "application/octet-stream")
    )
    if arch is not None:
        at.sidebar.selectbox(key="teacher_arch").set_value(arch)
    at.run()
    at.sidebar.button(key="teacher_use").click().run()


def upload_data(at: AppTest, role: str, name: str, content: bytes) -> None:
    at.sidebar.file_uploader(key=f"data_upload_{role}").set_value(
        (name, content, "application/octet-stream")
    )
    at.run()


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def one_sentence(at: AppTest) -> str:
    """The single error the sidebar shows: one sentence, no traceback."""
    errors = [e.value for e in at.sidebar.error]
    assert len(errors) == 1, errors
    text = errors[0]
    assert "Traceback" not in text and "\n" not in text and text.endswith(".")
    return text


def test_bare_state_dict_is_recognised_and_imported(app: AppTest, runs: Path) -> None:
    use_teacher(app, "bare.pt", state_dict_bytes("small-cnn"))
    assert not app.exception and not app.sidebar.error
    assert any("Now using bare.pt (small-cnn)" in s.value for s in app.sidebar.success)
    app.run()
    assert metric(app, "Architecture") == "small-cnn"  # the tiny teacher is small-cnn-student
    assert metric(app, "ACC").endswith("%") and "**trigger** `None`" in app.markdown[0].value
    assert any("bare.pt" in c.value for c in app.sidebar.caption)

    app.sidebar.button(key="teacher_import").click().run()
    assert not app.exception and not app.sidebar.error
    [upload] = (runs / "uploads").glob("*/bare.pt")
    saved = upload.with_name("bare.safetensors")
    meta = read_metadata(saved)
    assert meta["architecture"] == "small-cnn" and meta["imported_from"] == "bare.pt"
    assert meta["model_args"]["num_classes"] == 10 and meta["dataset"] == "fashion-mnist"
    assert app.session_state["teacher_path"] == str(saved)
    assert app.session_state["teacher_args"] == {}
    app.run()
    assert metric(app, "Architecture") == "small-cnn"


def test_uploads_of_one_name_stay_separate(app: AppTest, runs: Path) -> None:
    first, second = state_dict_bytes("small-cnn", 0), state_dict_bytes("small-cnn", 1)
    use_teacher(app, "model.pt", first)
    use_teacher(app, "model.pt", second)
    assert not app.exception and not app.sidebar.error
    kept = sorted((runs / "uploads").glob("*/model.pt"))
    assert len(kept) == 2 and {p.read_bytes() for p in kept} == {first, second}
    assert Path(app.session_state["teacher_path"]).read_bytes() == second


def test_user_test_set_and_bad_uploads(app: AppTest, small_test: ImageDataset) -> None:
    n = 250
    upload_data(app, "test", "mine.npz", npz_bytes(small_test.subset(range(n))))
    assert not app.exception and not app.sidebar.error
    assert any("250 images, 1×28×28, 10 classes" in c.value for c in app.sidebar.caption)
    path = app.session_state["user_data"]["test"]
    assert path.endswith("mine.npz") and "/uploads/data/" in path
    app.select_slider[0].set_value(n).run()
    assert next(c.value for c in app.caption if "clean and" in c.value).startswith("250 clean")
    assert metric(app, "ACC").endswith("%")

    # a teacher whose keys fit no known architecture: one sentence, the teacher stays
    junk = io.BytesIO()
    torch.save({"stem.weight": torch.randn(8, 1, 3, 3), "head.weight": torch.randn(10, 8)}, junk)
    use_teacher(app, "odd.pt", junk.getvalue())
    assert "no known one fits its keys" in one_sentence(app)
    assert metric(app, "Architecture") == "small-cnn-student"

    # an archive that reaches outside itself: one sentence, the test set stays
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("../x", b"escape")
    upload_data(app, "test", "evil.zip", buf.getvalue())
    assert "points outside the archive" in one_sentence(app)
    assert app.session_state["user_data"]["test"] == path
    app.run()
    assert not app.sidebar.error
    assert next(c.value for c in app.caption if "clean and" in c.value).startswith("250 clean")


@pytest.fixture()
def as_is_run(
    runs: Path, tiny_teacher: Path, small_train: ImageDataset, small_test: ImageDataset
) -> Run:
    """A finished as-is comparison on the user's own sets, with no trigger known."""
    model, meta = load_checkpoint(tiny_teacher)
    for key in ("trigger", "target"):
        meta.pop(key, None)
    meta["path"] = str(tiny_teacher)
    unlabelled = small_train.subset(range(300))
    unlabelled = unlabelled.replace(labels=torch.full((300,), -1), classes=())
    sources = DataSources(
        distill=unlabelled, trusted=small_train.subset(range(300, 400)), test=small_test
    )
    scenario = build_scenario("as-is", meta, sources=sources)
    config = DistillConfig(epochs=1, batch_size=64, device="cpu", eval_size=100)
    run = Run.create(runs, "compare", {"methods": ["feature-kd", "robustkd"]})
    run.start(epochs=2)
    run.finish(compare(model, meta, scenario, ["feature-kd", "robustkd"], config, run))
    return run


def test_compare_page_shows_screened_samples_and_unknown_asr(as_is_run: Run, app: AppTest) -> None:
    report = as_is_run.report()
    assert report["scenario"]["trigger_known"] is False
    row = report["methods"]["robustkd"]
    app.switch_page(str(PAGES / "compare.py")).run()
    assert not app.exception and not app.error

    table = app.dataframe[0].value
    assert list(table["ASR (%)"]) == ["unknown"] * 3
    assert table["agreement (%)"][2] == pytest.approx(100 * row["agreement"], abs=0.01)
    assert any(s.value == "Screened samples — robustkd" for s in app.subheader)
    withheld = int(row["flagged_samples"])
    assert any(f"{withheld:,} of 300 distillation samples withheld" in c.value for c in app.caption)
    shown = [e for e in app.main if type(e).__name__ == "Image"]
    assert len(shown) == 16
    top = np.load(as_is_run.path / "robustkd-screen-top.npz")
    captions = [c for e in shown for c in e.captions]
    assert captions[0].startswith(f"{top['ids'][0]} · {float(top['scores'][0]):.3g} · ")
    assert all(c.endswith(("· withheld", "· kept")) for c in captions)
    labels = [b.label for b in app.get("download_button")]
    assert any(label.startswith("robustkd-screen.csv") for label in labels)


def test_launch_passes_the_uploaded_data_and_teacher_options(
    app: AppTest,
    runs: Path,
    small_train: ImageDataset,
    small_test: ImageDataset,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from robustkd.runs import queue as runs_queue

    started: list[list[str]] = []
    monkeypatch.setattr(
        runs_queue, "launch_worker", lambda argv, run, *a, **k: started.append(argv)
    )
    use_teacher(app, "bare.pt", state_dict_bytes("small-cnn"), arch="small-cnn")
    upload_data(app, "distill", "pool.npz", npz_bytes(small_train.subset(range(200)), False))
    upload_data(app, "trusted", "clean.npz", npz_bytes(small_train.subset(range(200, 300))))
    upload_data(app, "test", "test.npz", npz_bytes(small_test.subset(range(100))))
    assert not app.exception and not app.sidebar.error
    assert any("200 images, 1×28×28, unlabelled" in c.value for c in app.sidebar.caption)

    app.switch_page(str(PAGES / "distill.py")).run()
    assert not app.exception and not app.error
    assert next(s for s in app.selectbox if s.label == "Scenario").value == "as-is"
    assert any("ASR will be reported as unknown" in i.value for i in app.info)
    assert next(w for w in app.number_input if w.label == "Triggered fraction").disabled
    next(s for s in app.selectbox if s.label == "Device").set_value("cpu")
    next(b for b in app.button if b.label == "Launch").click().run()
    assert not app.exception and not app.error

    [run] = list_runs(runs)
    argv = run.config["argv"]
    assert started and started[0][: len(argv)] == argv
    paths = app.session_state["user_data"]
    for role in ("distill", "trusted", "test"):
        assert argv[argv.index(f"--{role}-data") + 1] == paths[role]
    assert argv[argv.index("--scenario") + 1] == "as-is" and "--rate" not in argv
    assert argv[argv.index("--arch") + 1] == "small-cnn" and "--layout" not in argv
    teacher = argv[argv.index("--teacher") + 1]
    assert teacher == app.session_state["teacher_path"] and teacher.endswith("bare.pt")
