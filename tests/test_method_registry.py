"""Methods are classes in one registry: a method registered here alone reaches the CLI's list,
a comparison run from the CLI, the saved checkpoints' kind and the app's method picker."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from robustkd.cli.main import main
from robustkd.defenses import (
    METHODS,
    Context,
    Method,
    Recipe,
    StudentMethod,
    Trained,
    method_names,
    register_method,
)
from robustkd.errors import UnknownNameError
from robustkd.models.checkpoints import read_metadata
from robustkd.registry import Registry
from robustkd.training.distill import DistillConfig
from tests.conftest import ROOT

BUILT_IN = [
    "scratch",
    "logit-kd",
    "feature-kd",
    "robustkd",
    "robustkd-reverse",
    "robustkd-paper",
    "nad",
    "fine-tuning",
    "fine-pruning",
]
TINY = ["--distill-size", "200", "--trusted-size", "50", "--test-size", "100"]
FAST = ["--epochs", "1", "--device", "cpu", "--quiet"]


class TeacherCopy(Method):
    """A do-nothing repair: the teacher itself, copied."""

    name = "teacher-copy"
    description = "teacher, copied unchanged (a test's toy)"
    order = 65
    produces = "teacher"

    def train(self, ctx: Context) -> Trained:
        return Trained(copy.deepcopy(ctx.teacher), [])


class ToyKD(StudentMethod):
    """Logit KD at half the configured weight."""

    name = "toy-kd"
    description = "student, logit KD at half weight (a test's toy)"
    order = 25
    options = ("logit_weight", "temperature")

    def recipe(self, ctx: Context) -> Recipe:
        weight = ctx.config.logit_weight / 2
        return Recipe(ctx.teacher, logit_weight=weight, extra={"toy_weight": weight})


@pytest.fixture()
def toys() -> Iterator[None]:
    """TeacherCopy and ToyKD registered for one test, and removed again after it."""
    try:
        register_method(TeacherCopy)
        register_method(ToyKD)
        yield
    finally:
        for name in ("teacher-copy", "toy-kd"):
            if name in METHODS:
                METHODS.unregister(name)
    assert method_names() == BUILT_IN


def test_built_in_methods_in_report_order() -> None:
    assert method_names() == BUILT_IN
    assert sorted(METHODS.names()) == sorted(BUILT_IN)
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    for name in BUILT_IN:
        cls = METHODS.get(name)
        assert cls.name == name and cls.description and set(cls.options) <= fields
    repairs = [n for n in BUILT_IN if METHODS.get(n).produces == "teacher"]
    assert repairs == ["fine-tuning", "fine-pruning"]


def test_a_registered_method_is_listed_in_its_order(toys, capsys) -> None:
    assert main(["list", "methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == [*BUILT_IN[:2], "toy-kd", *BUILT_IN[2:7], "teacher-copy", *BUILT_IN[7:]]
    assert lines[names.index("toy-kd")].endswith("student, logit KD at half weight (a test's toy)")
    assert METHODS.get("TOY-KD") is ToyKD  # names are case-insensitive, as in every registry


def test_a_registered_method_runs_in_a_comparison(toys, tiny_teacher: Path, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["compare", "--teacher", str(tiny_teacher), "--methods", "toy-kd,teacher-copy"]
    code = main([*argv, *TINY, *FAST, "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "| toy-kd |" in stdout and "| teacher-copy |" in stdout
    report = json.loads((out / "report.json").read_text())
    assert list(report["methods"]) == ["toy-kd", "teacher-copy"]
    toy, copied = report["methods"]["toy-kd"], report["methods"]["teacher-copy"]
    assert toy["toy_weight"] == 0.5 and len(toy["history"]) == 1  # its recipe, its epoch
    # the copy of the teacher measures exactly as the teacher, and is saved as a teacher
    assert copied["acc"] == report["teacher"]["acc"] and copied["asr"] == report["teacher"]["asr"]
    assert copied["agreement"] == 1.0
    assert read_metadata(out / copied["checkpoint"])["kind"] == "teacher"
    assert read_metadata(out / toy["checkpoint"])["kind"] == "student"


def test_a_registered_method_is_offered_in_the_app(
    toys, tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROBUSTKD_TEACHER", str(tiny_teacher))
    monkeypatch.setenv("ROBUSTKD_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=120)
    at.run()
    at.switch_page(str(ROOT / "pages" / "distill.py")).run()
    assert not at.exception
    picker = next(m for m in at.multiselect if m.label == "Methods")
    assert picker.options == method_names() and "toy-kd" in picker.options
    assert picker.value == ["feature-kd", "robustkd"]


def test_register_method_refuses_incomplete_classes(toys) -> None:
    class Nameless(Method):
        description = "x"
        order = 1

        def train(self, ctx: Context) -> Trained:
            raise AssertionError

    class Unread(ToyKD):
        name = "unread"
        options = ("temprature",)

    class Abstract(StudentMethod):
        name = "abstract"
        description = "x"
        order = 1

    class Shouting(ToyKD):
        name = "Shouting"

    class Sideways(TeacherCopy):
        name = "sideways"
        produces = "optimizer"  # type: ignore[assignment]

    with pytest.raises(TypeError, match="sets no 'name'"):
        register_method(Nameless)
    with pytest.raises(TypeError, match="temprature"):
        register_method(Unread)
    with pytest.raises(TypeError, match="recipe"):
        register_method(Abstract)
    with pytest.raises(TypeError, match="lower case"):
        register_method(Shouting)
    with pytest.raises(TypeError, match="produces"):
        register_method(Sideways)
    with pytest.raises(ValueError, match="registered twice"):
        register_method(ToyKD)


def test_unregister_gives_back_and_forgets() -> None:
    registry: Registry[int] = Registry("thing")
    registry.register("one")(1)
    assert registry.unregister("ONE") == 1 and "one" not in registry
    with pytest.raises(UnknownNameError, match="Unknown thing 'one'"):
        registry.unregister("one")


def test_readme_names_exactly_the_registered_methods() -> None:
    text = (ROOT / "README.md").read_text()
    start = text.index("Methods (`robustkd list methods`):")
    sentence = text[start : text.index(".\n", start)].split(":", 1)[1]
    sentence = re.sub(r"\([^)]*\)", "", sentence)  # the notes beside some names
    assert re.findall(r"`([^`]+)`", sentence) == method_names()
