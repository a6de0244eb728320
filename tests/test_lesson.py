"""The classroom lesson: the shipped students match the figures they ship with, a finished run
packs into a lesson, and the Teach page walks its five steps on the shipped assets (AppTest,
no training)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from robustkd.cli.main import main as cli
from robustkd.errors import ConfigError
from robustkd.experiments.lesson import (
    LESSON_DIR,
    LESSON_METHODS,
    evaluate_checkpoint,
    lesson_html,
    lesson_sentences,
    load_lesson,
    main,
    pack_lesson,
    student_paths,
)
from robustkd.models.checkpoints import DEFAULT_TEACHER, read_metadata
from robustkd.viz.lesson_figures import FONT_SIZE, flagged_figure, lesson_bars, price_figure
from tests.conftest import ROOT

STEPS = ["1 · The teacher", "2 · Plain", "3 · Where", "4 · RobustKD", "5 · The price"]


def test_shipped_students_match_their_recorded_figures() -> None:
    lesson = load_lesson()
    rows = lesson["methods"]
    for name in LESSON_METHODS:
        path = LESSON_DIR / rows[name]["checkpoint"]
        assert path.stat().st_size <= 120_000, f"{name} is no longer tiny"
        measured = evaluate_checkpoint(path)  # CPU, float32, the whole test split
        recorded = read_metadata(path)["metrics"]
        assert measured["n_clean"] == 10000 and measured["n_triggered"] == 9000
        for key in ("acc", "asr"):
            assert measured[key] == pytest.approx(rows[name][key], abs=5e-4), (name, key)
            assert measured[key] == pytest.approx(recorded[key], abs=5e-4), (name, key)
        # good students: within 3 points of the teacher's clean accuracy
        assert measured["acc"] >= lesson["teacher"]["acc"] - 0.03, name
    assert rows["feature-kd"]["asr"] >= 0.5  # plain KD is clearly backdoored
    assert rows["robustkd"]["asr"] <= rows["scratch"]["asr"] + 0.03  # RobustKD at the floor
    assert lesson["teacher"]["acc"] == pytest.approx(
        read_metadata(DEFAULT_TEACHER)["metrics"]["acc"]
    )
    text = (LESSON_DIR / "lesson.json").read_text()
    assert "/" not in json.loads(text)["teacher_path"] and "/home" not in text


@pytest.fixture(scope="module")
def lesson_run(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> Path:
    out = tmp_path_factory.mktemp("lesson") / "run"
    code = cli(
        [
            "compare", "--teacher", str(tiny_teacher), "--methods", ",".join(LESSON_METHODS),
            "--distill-size", "300", "--trusted-size", "100", "--test-size", "200",
            "--epochs", "1", "--quiet", "--out", str(out),
        ]
    )  # fmt: skip
    assert code in (0, None)
    return out


def test_a_finished_run_packs_into_a_lesson(
    lesson_run: Path, tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lesson"
    lesson = pack_lesson(lesson_run, out, teacher=tiny_teacher)
    assert load_lesson(out) == lesson
    # the command that made it, however it was started (here: main() in this process)
    command = json.loads((lesson_run / "report.json").read_text())["command"]
    assert command.startswith("robustkd compare --teacher ") and "--quiet" not in command
    paths = student_paths(lesson, out)
    assert sorted(paths) == sorted(LESSON_METHODS)
    for name, path in paths.items():
        meta = read_metadata(path)["metrics"]
        assert meta["acc"] == lesson["methods"][name]["acc"]
        assert meta["n_clean"] == 10000  # re-evaluated on the whole test split
        assert "screen_csv" not in lesson["methods"][name]
    # the command line: the shipped teacher is not the one this run distilled
    code = main([str(lesson_run), "--out", str(tmp_path / "other")])
    assert code == 2 and "not the teacher" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_packing_refuses_an_incomplete_run(
    lesson_run: Path, tiny_teacher: Path, tmp_path: Path
) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(lesson_run, partial)
    report = json.loads((partial / "report.json").read_text())
    del report["methods"]["robustkd"]
    (partial / "report.json").write_text(json.dumps(report))
    with pytest.raises(ConfigError, match="lacks the method"):
        pack_lesson(partial, tmp_path / "out", teacher=tiny_teacher)
    with pytest.raises(ConfigError, match=r"no report\.json"):
        pack_lesson(tmp_path, tmp_path / "out", teacher=tiny_teacher)
    with pytest.raises(ConfigError, match="make lesson"):
        load_lesson(tmp_path / "nothing")


def test_sentences_say_what_the_numbers_show() -> None:
    lesson = load_lesson()
    t, rows = lesson["teacher"], lesson["methods"]
    steps = lesson_sentences(lesson, ["T-shirt/top", *"123456789"], 0)
    assert len(steps) == 5 and all(2 <= len(s) <= 3 for s in steps)
    assert f"ACC {100 * t['acc']:.1f} %" in steps[0][0] and "T-shirt/top" in steps[0][0]
    assert "inherits the backdoor" in steps[1][0]
    assert f"{rows['robustkd']['flagged_samples']:,}" in steps[3][0]
    # a plain KD student that did not pick the backdoor up is not said to have
    weak = json.loads(json.dumps(lesson))
    weak["methods"]["feature-kd"]["asr"] = 0.05
    assert "barely inherits" in lesson_sentences(weak)[1][0]


def test_figures_are_sized_for_a_projector_and_the_handout_opens_offline() -> None:
    lesson = load_lesson()
    figs = [
        lesson_bars(lesson, ["feature-kd"], "t"),
        flagged_figure(lesson["methods"]["robustkd"]),
        price_figure(lesson, list(LESSON_METHODS)),
    ]
    for fig in figs:
        assert fig.layout.font.size >= FONT_SIZE and fig.layout.height >= 380
    page = lesson_html("Lesson", [("Step", ["One sentence."], figs)])
    assert page.count("window.PlotlyConfig") == 1  # plotly.js inside, once
    assert "One sentence." in page and len(page) > 1_000_000  # the library, not a link


# --------------------------------------------------------------------------- the page


@pytest.fixture()
def teach(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("ROBUSTKD_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("ROBUSTKD_TEACHER", raising=False)
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=180)
    at.run()
    at.switch_page(str(ROOT / "pages" / "teach.py")).run()
    assert not at.exception, at.exception
    return at


def _said(at: AppTest) -> str:
    return " ".join(m.value for m in at.markdown)


def test_every_lesson_step_shows_its_picture_with_the_shipped_results(teach: AppTest) -> None:
    at = teach
    lesson = load_lesson()
    rows = lesson["methods"]
    assert at.radio(key="teach_source").value == "The shipped lesson"
    charts_seen = []
    for i, prefix in enumerate(STEPS):
        assert at.header[0].value.startswith(prefix), at.header[0].value
        assert not at.exception and not at.error
        charts_seen.append(len(at.get("plotly_chart")))
        assert any("arrow_forward" in str(link.proto) for link in at.get("page_link"))
        text = _said(at)
        if i == 0:
            assert "says" not in text  # the captions live in the figure
            assert f"{100 * lesson['teacher']['asr']:.1f} %" in text
        if i == 1:
            assert f"ASR {100 * rows['feature-kd']['asr']:.1f} %" in text
        if i == 2:
            assert "row" in text and "column" in text  # where the variance swells
        if i == 3:
            assert f"ASR is {100 * rows['robustkd']['asr']:.1f} %" in text
            # the link to the threshold opens the Feature variance page on its Threshold tab
            link = next(p.proto for p in at.get("page_link") if "threshold" in p.proto.label)
            assert link.page.endswith("variance") and "var_tab=Threshold" in link.query_string
        if i == 4:
            table = at.dataframe[0].value
            assert table["model"].iloc[0] == "teacher" and len(table) == 4
            assert table["parameters"].iloc[3] == rows["robustkd"]["params"]
        if i < len(STEPS) - 1:
            at.button(key="teach_next").click().run()
    assert at.button(key="teach_next").disabled
    assert charts_seen == [1, 2, 2, 2, 1]
    at.button(key="teach_back").click().run()
    assert at.header[0].value.startswith(STEPS[3])


def test_picking_an_image_changes_what_the_teacher_says(teach: AppTest) -> None:
    at = teach
    first = at.get("plotly_chart")[0].proto.spec
    at.number_input(key="teach_image").set_value(7).run()
    assert not at.exception and at.get("plotly_chart")[0].proto.spec != first
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    titles = [a["text"] for a in spec["layout"]["annotations"]]
    assert titles[1].startswith("triggered:<br>teacher says")


def test_leaving_teach_and_coming_back_keeps_the_lessons_place(teach: AppTest) -> None:
    """Streamlit drops the state of widgets a page does not draw; the lesson keeps its own."""
    at = teach
    at.number_input(key="teach_image").set_value(7).run()
    at.button(key="teach_next").click().run()
    at.button(key="teach_next").click().run()
    assert at.header[0].value.startswith(STEPS[2])
    at.switch_page(str(ROOT / "pages" / "teacher.py")).run()
    assert not at.exception
    at.switch_page(str(ROOT / "pages" / "teach.py")).run()
    assert not at.exception
    assert at.header[0].value.startswith(STEPS[2])
    at.button(key="teach_back").click().run()
    at.button(key="teach_back").click().run()
    assert at.number_input(key="teach_image").value == 7


def test_a_missing_lesson_is_one_sentence(
    teach: AppTest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import robustkd.experiments.lesson as lesson_module

    monkeypatch.setattr(lesson_module, "LESSON_DIR", tmp_path / "gone")
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=180)
    at.run()
    at.switch_page(str(ROOT / "pages" / "teach.py")).run()
    assert not at.exception
    assert any("make lesson" in e.value for e in at.error)
    assert at.button(key="teach_start")  # the live run is still offered


def test_make_lesson_is_documented() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "lesson:" in makefile and "robustkd.experiments.lesson" in makefile
    assert "--preset fashion-badnets-lesson" in makefile
    assert "make lesson" in (ROOT / "README.md").read_text()
