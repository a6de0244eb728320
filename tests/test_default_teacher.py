"""The shipped default teacher, and the shipped example teachers, are what their metadata says."""

from __future__ import annotations

import pytest

from bench import variance_evidence
from robustkd.analysis.metrics import evaluate
from robustkd.attacks import trigger_from_dict
from robustkd.attacks.poison import poison_dataset
from robustkd.data.datasets import load_dataset
from robustkd.defenses.detox import screen_within_classes
from robustkd.models import model_names
from robustkd.models.checkpoints import DEFAULT_TEACHER, load_checkpoint, read_metadata
from robustkd.training.scenarios import probe_scenario

EXAMPLES = sorted((DEFAULT_TEACHER.parent / "examples").glob("*.safetensors"))
# file → the recipe it shows (make examples)
RECIPES = {
    "optimized-blend": "optimized-blend",
    "adaptive": "adaptive",
    "adaptive-learned": "adaptive-learned",
    "adaptive-class": "adaptive-learned",  # scope=class
    "adba": "adba",
}


@pytest.fixture(scope="module")
def teacher():
    return load_checkpoint(DEFAULT_TEACHER)


def test_metadata_meets_the_targets(teacher) -> None:
    _, meta = teacher
    m = meta["metrics"]
    assert m["n_clean"] == 10000 and m["acc"] >= 0.91 and m["asr"] >= 0.99
    assert meta["trigger"]["name"] == "badnets" and meta["target"] == 0
    assert meta["student_architecture"] in model_names()
    assert meta["config"]["train"]["seed"] == 0 and meta["dataset"] == "fashion-mnist"


def test_recomputed_acc_asr_match_metadata(teacher) -> None:
    model, meta = teacher
    test = load_dataset("fashion-mnist", "test").subset(range(2000))
    result = evaluate(model, test, trigger_from_dict(meta["trigger"]), meta["target"])
    assert abs(result.acc - meta["metrics"]["acc"]) <= 0.015
    assert abs(result.asr - meta["metrics"]["asr"]) <= 0.015


def test_small_enough_to_commit() -> None:
    assert DEFAULT_TEACHER.stat().st_size < 5_000_000


def test_the_examples_are_shipped() -> None:
    assert sorted(p.stem for p in EXAMPLES) == sorted(RECIPES)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_teachers_are_what_they_say(path) -> None:
    """Each example carries its recipe and a working backdoor, re-measured here."""
    meta = read_metadata(path)
    assert meta["recipe"]["name"] == RECIPES[path.stem] and meta["dataset"] == "fashion-mnist"
    assert meta["metrics"]["acc"] >= 0.88 and meta["metrics"]["asr"] >= 0.99
    assert path.stat().st_size < 5_000_000
    model, meta = load_checkpoint(path)
    test = load_dataset("fashion-mnist", "test").subset(range(2000))
    result = evaluate(model, test, trigger_from_dict(meta["trigger"]), meta["target"])
    assert abs(result.acc - meta["metrics"]["acc"]) <= 0.015
    assert abs(result.asr - meta["metrics"]["asr"]) <= 0.015


def _evidence(path) -> dict[str, list[str]]:
    """bench.variance_evidence's rows for a teacher, by stage (400 trusted / 400 suspect)."""
    rows = variance_evidence.evidence(path, 400, 0.1)
    return {row.split(" | ")[1]: row.split(" | ")[2:] for row in rows}


def test_the_learned_adaptive_example_hides_from_the_variance_at_every_stage() -> None:
    """What the lecturer shows with it: against the default teacher's trigger every stage
    lights up and the screen catches every triggered image; the learned adaptive trigger
    leaves no stage's strongest unit above a fifth of the default's and slips past the
    screen."""
    loud = _evidence(DEFAULT_TEACHER)
    quiet = _evidence(DEFAULT_TEACHER.parent / "examples" / "adaptive-learned.safetensors")
    for stage in ("block1", "block2", "block3"):
        assert float(quiet[stage][1]) < 0.2 * float(loud[stage][1])  # highest unit score
    assert loud["screen"][0].startswith("40 of 40")
    caught = quiet["screen"][0]
    assert caught.startswith("inactive") or int(caught.split(" of ")[0]) <= 10
    # the label screen's disputes, and the signature learned from them, see it all the same
    assert int(quiet["screen"][3].split(" of ")[0]) >= 30
    assert int(quiet["screen"][4].split(" of ")[0]) >= 38


def test_the_variance_screen_within_each_class_catches_the_learned_adaptive_trigger() -> None:
    """RobustKD's answer to it: held inside the clean range of all images together, the
    trigger stands out within its images' own class (1,000 trusted and 1,000 suspect images,
    10 % of them triggered: the screen over all images catches 1 of 100)."""
    path = DEFAULT_TEACHER.parent / "examples" / "adaptive-learned.safetensors"
    model, meta = load_checkpoint(path)
    probe = probe_scenario(load_dataset("fashion-mnist", "val"), 1000)
    planted = poison_dataset(
        probe.suspect, trigger_from_dict(meta["trigger"]), 0.1, 0, keep_labels=True, seed=0
    )
    withheld, info = screen_within_classes(model, probe.trusted, planted.dataset)
    triggered = planted.poisoned_mask
    assert int((withheld & triggered).sum()) >= 60 and int(withheld.sum()) <= 150
    assert info["skipped"] == [] and set(info["classes"]) == set(meta["classes"])


def test_the_class_scope_example_hides_within_every_class_but_not_from_its_signature() -> None:
    """The next step of the lesson: held inside every class's range as well, the trigger
    slips past the screen within each class too (3 of 100 on the full probe, against 82 of
    100 for the learned adaptive example); the label screen's disputes and the signature
    learned from them still find it (87 and 98 of 100)."""
    path = DEFAULT_TEACHER.parent / "examples" / "adaptive-class.safetensors"
    assert read_metadata(path)["recipe"]["scope"] == "class"
    quiet = _evidence(path)
    within, disputed, signature = (int(quiet["screen"][i].split(" of ")[0]) for i in (2, 3, 4))
    assert within <= 8 and disputed >= 30 and signature >= 38  # of 40
