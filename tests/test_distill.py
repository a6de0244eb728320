"""Scenarios, distillation methods, comparison reports and their CLI verbs on a tiny teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from robustkd.defenses import METHODS, run_method
from robustkd.errors import ConfigError, UnknownNameError
from robustkd.experiments.compare import compare
from robustkd.models import create_model
from robustkd.models.checkpoints import DEFAULT_TEACHER, load_checkpoint, save_checkpoint
from robustkd.runs.store import Run
from robustkd.training.distill import DistillConfig
from robustkd.training.scenarios import build_scenario, probe_scenario
from tests.helpers import run_cli

TINY = {"distill_size": 300, "trusted_size": 100, "test_size": 200}


def _config(**kw: object) -> DistillConfig:
    base = {
        "epochs": 1,
        "batch_size": 64,
        "device": "cpu",
        "eval_size": 100,
        "finetune_epochs": 1,
        "learned_epochs": 1,
    }
    return DistillConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def teacher(tiny_teacher: Path):
    return load_checkpoint(tiny_teacher)


@pytest.fixture(scope="module")
def scenario(teacher):
    return build_scenario("untrusted", teacher[1], rate=0.2, **TINY)


def test_untrusted_scenario_sizes(scenario) -> None:
    assert len(scenario.distill) == 300 and len(scenario.trusted) == 100
    assert len(scenario.test) == 200 and int(scenario.poisoned_mask.sum()) == 60
    assert scenario.info["n_poisoned"] == 60 and scenario.trigger.name == "badnets"
    # the trusted images are not among the distillation images
    d = {bytes(x.numpy()) for x in scenario.distill.images}
    assert not any(bytes(x.numpy()) in d for x in scenario.trusted.images)


def test_clean_scenario_has_no_trigger_in_the_data(teacher) -> None:
    sc = build_scenario("clean", teacher[1], **TINY)
    assert int(sc.poisoned_mask.sum()) == 0 and sc.trigger is not None  # ASR still measured


def test_probe_scenario_draws_three_disjoint_subsets_and_plants_the_share() -> None:
    from robustkd import create_trigger, load_dataset

    val = load_dataset("fashion-mnist", "val").subset(range(600))
    trigger = create_trigger("badnets")
    probe = probe_scenario(val, 150, trigger, target=0, rate=0.2)
    seen = [{bytes(x.numpy()) for x in d.images} for d in (probe.trusted, probe.validation)]
    assert len(probe.trusted) == len(probe.suspect) == len(probe.validation) == 150
    assert not seen[0] & seen[1]
    again = probe_scenario(val, 150, trigger, target=0, rate=0.2)  # the same for every call
    assert torch.equal(again.suspect.images, probe.suspect.images)
    clean = probe_scenario(val, 150)
    changed = (clean.suspect.images != probe.suspect.images).flatten(1).any(1)
    assert int(changed.sum()) == 30  # 20 % triggered, labels kept
    assert torch.equal(clean.suspect.labels, probe.suspect.labels)
    with pytest.raises(ConfigError):
        probe_scenario(val, 150, trigger, target=None, rate=0.2)


def test_teacher_train_rebuilds_the_poisoned_training_set(teacher) -> None:
    sc = build_scenario("teacher-train", teacher[1], trusted_size=100, distill_size=None)
    assert len(sc.distill) == 2000 and int(sc.poisoned_mask.sum()) == 200
    assert torch.all(sc.distill.labels[sc.poisoned_mask] == 0)  # all-to-one relabelled
    assert len(sc.trusted) == 100 and len(sc.validation) == 4900


def test_scenario_mistakes(teacher, tmp_path: Path) -> None:
    _, meta = teacher
    with pytest.raises(ConfigError, match="at least 4"):
        build_scenario("untrusted", meta, trusted_size=0, distill_size=100)
    with pytest.raises(ConfigError, match="Unknown scenario"):
        build_scenario("dirty", meta)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        build_scenario("untrusted", meta, rate=2.0)
    clean_meta = {**meta, "trigger": None, "target": None}
    with pytest.raises(ConfigError, match="needs a trigger"):
        build_scenario("untrusted", clean_meta, **TINY)


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_runs_and_is_measured(method: str, teacher, scenario) -> None:
    model, meta = teacher
    result = run_method(method, model, meta, scenario, _config())
    m = result.metrics
    assert m["method"] == method and 0 <= m["acc"] <= 1 and 0 <= m["asr"] <= 1
    assert m["n_clean"] == 200 and m["scenario"] == "untrusted" and m["seed"] == 0
    assert len(result.history) >= 1 and "test_acc" in result.history[-1]
    student_params = sum(p.numel() for p in create_model("small-cnn-student").parameters())
    assert m["params"] == student_params  # the tiny teacher shares the student's architecture
    if method == "robustkd":
        assert sum(m["flagged_units"].values()) > 0 and m["flagged_samples"] > 0
        assert 0 <= m["screen_recall"] <= 1 and result.detoxifier is not None
    if method == "fine-pruning":
        assert 0 < m["pruned_channels"] < 64
    if method == "robustkd-reverse":  # robustkd's screens, and one reversed trigger per class
        assert m["flagged_samples"] > 0 and len(m["reversed_triggers"]) == 10
        assert all(0 <= r["flip_rate"] <= 1 for r in m["reversed_triggers"])


def test_screening_policy_drop_and_no_screen(teacher, scenario) -> None:
    model, meta = teacher
    dropped = run_method("robustkd", model, meta, scenario, _config(screen_policy="drop"))
    assert dropped.metrics["flagged_samples"] > 0
    unscreened = run_method("robustkd", model, meta, scenario, _config(screen=False))
    assert "flagged_samples" not in unscreened.metrics


def test_label_screen_catches_what_the_variance_screen_does_not_see() -> None:
    """With a threshold no unit reaches (a trigger the variance cannot see), the variance screen
    withholds nothing; the label screen still withholds the triggered samples whose label the
    shipped teacher turns to the target, and few of the clean ones (its quantile)."""
    model, meta = load_checkpoint(DEFAULT_TEACHER)
    scenario = build_scenario("untrusted", meta, rate=0.2, **TINY)
    blind = _config(threshold=1e5)
    unlabelled_screen = _config(threshold=1e5, screen_labels=False)
    alone = run_method("robustkd", model, meta, scenario, unlabelled_screen)
    assert alone.metrics["flagged_samples"] == 0 and "label_screen" not in alone.metrics
    both = run_method("robustkd", model, meta, scenario, blind)
    info = both.metrics["label_screen"]
    assert info["only_by_labels"] == both.metrics["flagged_samples"] >= info["disputed"]
    assert info["signature_examples"] == info["disputed"]
    truth = scenario.poisoned_mask
    flipped = truth & (scenario.distill.labels != meta["target"])
    withheld = both.withheld
    assert withheld is not None
    assert float(withheld[flipped].float().mean()) >= 0.9
    # the target class's own triggered samples: not disputed, found by the signature
    assert float(withheld[truth & ~flipped].float().mean()) >= 0.9
    assert float(withheld[~truth].float().mean()) <= 0.08
    # with the variance screen on as well, the union is withheld
    default = run_method("robustkd", model, meta, scenario, _config())
    assert default.metrics["flagged_samples"] >= default.metrics["label_screen"]["disputed"]


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"threshold": -1.0}, "threshold"),
        ({"tau": 0.0}, "τ"),
        ({"tau": 1.5}, "τ"),
        ({"noise_rate": 2.0}, "noise rate"),
        ({"reverse_share": 1.5}, "stamped student inputs"),
        ({"reverse_max_mask": 0.0}, "mask bound"),
        ({"reverse_steps": 0}, "reversal's steps"),
        ({"screen_policy": "ignore"}, "screening policy"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_config_mistakes(kw: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        _config(**kw).validate()


def test_unknown_layer_lists_the_valid_ones(teacher, scenario) -> None:
    model, meta = teacher
    with pytest.raises(UnknownNameError, match="block1, block2, block3"):
        run_method("robustkd", model, meta, scenario, _config(layers="block9"))


def test_student_that_cannot_take_the_input(teacher, scenario) -> None:
    model, meta = teacher
    with pytest.raises(ConfigError):
        run_method("scratch", model, meta, scenario, _config(student="tv-vit_b_16"))


def test_compare_writes_a_complete_report(teacher, scenario, tmp_path: Path) -> None:
    model, meta = teacher
    run = Run.create(tmp_path, "compare", {"test": True})
    report = compare(model, meta, scenario, ["scratch", "feature-kd", "robustkd"], _config(), run)
    assert list(report["methods"]) == ["scratch", "feature-kd", "robustkd"]
    saved = json.loads((run.path / "report.json").read_text())
    assert saved["methods"]["robustkd"]["acc"] == pytest.approx(
        report["methods"]["robustkd"]["acc"]
    )
    assert saved["reference"] == "feature-kd"
    assert saved["methods"]["feature-kd"]["der"] == pytest.approx(0.5)  # against itself
    md = (run.path / "report.md").read_text()
    assert "| robustkd |" in md and "| teacher |" in md
    labels = saved["methods"]["robustkd"]["label_screen"]
    assert f"{labels['disputed']} were withheld because the teacher disputes their label" in md
    assert f"{labels['within_classes']} because they deviate within their class" in md
    assert f"{labels['signature']} because they deviate from their class the way" in md
    assert (run.path / "report.csv").read_text().count("\n") == 5  # header + teacher + 3
    for fig in ("acc_asr", "curves_asr", "curves_acc", "per_class"):
        html = (run.path / "figures" / f"{fig}.html").read_text()
        assert "plotly.min.js" in html
    assert (run.path / "figures" / "plotly.min.js").stat().st_size > 1_000_000  # offline
    _, smeta = load_checkpoint(run.path / "checkpoints" / "robustkd.safetensors")
    assert (
        smeta["method"] == "robustkd"
        and smeta["metrics"]["acc"] == saved["methods"]["robustkd"]["acc"]
    )
    assert (run.path / "checkpoints" / "robustkd-detox.safetensors").exists()


_cli = run_cli


def test_cli_distill_and_runs(tiny_teacher: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "runs" / "one"
    code, stdout, err = _cli(
        [
            "distill",
            "--teacher",
            str(tiny_teacher),
            "--method",
            "robustkd",
            "--distill-size",
            "300",
            "--trusted-size",
            "100",
            "--test-size",
            "200",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    assert "| robustkd |" in stdout and (out / "report.json").exists()
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "done"
    code, stdout, _ = _cli(["runs", "--root", str(out.parent), "--json"], capsys)
    rows = json.loads(stdout)
    assert code == 0 and rows[0]["id"] == "one" and rows[0]["state"] == "done"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--method", "magic"], "unknown method"),
        (["--layers", "block9"], "valid layers include"),
        (["--threshold", "0"], "threshold"),
        (["--tau", "3"], "τ"),
        (["--trusted-size", "0"], "at least 4"),
        (["--student", "tv-vit_b_16"], "vit_b_16"),
        (["--scenario", "teacher-train", "--trusted-size", "6000"], "trusted size"),
        (["--preset", "nope"], "unknown preset"),
    ],
)
def test_cli_mistakes(
    args: list[str], needle: str, tiny_teacher: Path, tmp_path: Path, capsys
) -> None:
    base = [
        "distill",
        "--teacher",
        str(tiny_teacher),
        "--distill-size",
        "200",
        "--test-size",
        "100",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(tmp_path / "r"),
    ]
    code, _, err = _cli(base + args, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.startswith("robustkd: error:") and needle.lower() in err.lower(), err


def test_cli_scenario_without_trigger(tmp_path: Path, capsys) -> None:
    path = save_checkpoint(
        tmp_path / "clean.safetensors",
        create_model("small-cnn-student"),
        {
            "architecture": "small-cnn-student",
            "dataset": "fashion-mnist",
            "model_args": {"num_classes": 10, "in_channels": 1, "image_size": [28, 28]},
            "student_architecture": "small-cnn-student",
            "trigger": None,
            "target": None,
        },
    )
    code, _, err = _cli(
        [
            "compare",
            "--teacher",
            str(path),
            "--scenario",
            "untrusted",
            "--out",
            str(tmp_path / "r"),
        ],
        capsys,
    )
    assert code == 2 and "needs a trigger" in err
