"""Science code never replaces what the user asked with a default behind their back: it says
so, or it refuses."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest

import robustkd.defenses.base as method_base
import robustkd.defenses.learned_detox as learned_detox
import robustkd.training.distill as distill_module
from robustkd.analysis.metrics import evaluate
from robustkd.attacks import create_trigger
from robustkd.cli.main import main
from robustkd.defenses import run_method
from robustkd.errors import ConfigError
from robustkd.experiments.compare import compare
from robustkd.models.checkpoints import load_checkpoint, read_metadata
from robustkd.runs.store import Run
from robustkd.training.distill import DistillConfig
from robustkd.training.scenarios import build_scenario

TINY = {"distill_size": 200, "trusted_size": 80, "test_size": 100}


def _config(**kw: Any) -> DistillConfig:
    base = {"epochs": 1, "batch_size": 64, "device": "cpu", "eval_size": 50, "finetune_epochs": 1}
    return DistillConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def teacher(tiny_teacher: Path):
    return load_checkpoint(tiny_teacher)


@pytest.fixture(scope="module")
def scenario(teacher):
    return build_scenario("untrusted", teacher[1], rate=0.2, **TINY)


def _captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Record what a method hands to the training loop, without training."""
    seen: dict[str, Any] = {}

    def fake_distill(teacher, student, scenario, config, **kw):
        seen.update(kw)
        return []

    monkeypatch.setattr(method_base, "distill_student", fake_distill)
    return seen


@pytest.mark.parametrize(
    ("method", "asked", "expected"),
    [
        ("robustkd-paper", None, 0.1),  # the paper's own noise
        ("robustkd-paper", 0.0, 0.0),  # a user's 0 is 0, not the paper's 0.1
        ("robustkd", None, 0.0),
        ("robustkd", 0.2, 0.2),
    ],
)
def test_noise_rate_zero_can_be_set(teacher, scenario, monkeypatch, method, asked, expected):
    seen = _captured(monkeypatch)
    monkeypatch.setattr(learned_detox, "fit_learned", lambda *a, **k: None)
    run_method(method, teacher[0], teacher[1], scenario, _config(noise_rate=asked))
    assert seen["noise_rate"] == expected


def test_fine_tuning_batch_size_is_an_option(teacher, scenario, monkeypatch) -> None:
    seen: dict[str, Any] = {}
    real = distill_module.train_model

    def spy(model, data, config, **kw):
        seen["batch_size"] = config.batch_size
        return real(model, data, config, **kw)

    monkeypatch.setattr(distill_module, "train_model", spy)
    run_method("fine-tuning", teacher[0], teacher[1], scenario, _config(finetune_batch_size=16))
    assert seen["batch_size"] == 16
    with pytest.raises(ConfigError, match="fine-tuning batch size"):
        _config(finetune_batch_size=0).validate()


def test_asr_over_no_triggered_image_is_undefined_not_zero(teacher, scenario) -> None:
    only_target = scenario.test.subset(
        [i for i in range(len(scenario.test)) if int(scenario.test.labels[i]) == 0]
    )
    ev = evaluate(teacher[0], only_target, create_trigger("badnets", size=3), target=0)
    assert ev.n_triggered == 0 and ev.asr is None
    ev = evaluate(teacher[0], scenario.test, create_trigger("badnets", size=3), target=0)
    assert ev.n_triggered > 0 and ev.asr is not None


def test_repaired_teachers_are_saved_as_teachers(teacher, scenario, tmp_path: Path) -> None:
    run = Run.create(tmp_path, "compare", {"test": True})
    compare(teacher[0], teacher[1], scenario, ["fine-tuning", "logit-kd"], _config(), run)
    assert read_metadata(run.checkpoint_path("fine-tuning.safetensors"))["kind"] == "teacher"
    assert read_metadata(run.checkpoint_path("logit-kd.safetensors"))["kind"] == "student"


def test_distill_without_a_preset_says_which_plan(tiny_teacher: Path, tmp_path, capsys) -> None:
    code = main(
        [
            "distill", "--teacher", str(tiny_teacher), "--method", "scratch",
            "--distill-size", "200", "--trusted-size", "50", "--test-size", "100",
            "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "r"),
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0 and "plan: the default plan (no --preset): scenario untrusted" in err


def test_model_families_that_fail_to_import_are_named(monkeypatch, capsys) -> None:
    import robustkd.models as models

    real = importlib.import_module

    def failing(name: str, *a: Any) -> Any:
        if name == "robustkd.models.vgg":
            raise ImportError("No module named 'imaginary_dependency'")
        return real(name, *a)

    monkeypatch.setattr(models.importlib, "import_module", failing)
    monkeypatch.setattr(models, "UNAVAILABLE", {})
    assert "imaginary_dependency" in models.unavailable_families()["vgg"]
    assert main(["list", "models"]) == 0
    err = capsys.readouterr().err
    assert "the vgg models are unavailable" in err and "imaginary_dependency" in err
