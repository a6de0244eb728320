"""The shipped default teacher is what its metadata says it is."""

from __future__ import annotations

import pytest

from robustkd.analysis.metrics import evaluate
from robustkd.attacks import trigger_from_dict
from robustkd.data.datasets import load_dataset
from robustkd.models import model_names
from robustkd.models.checkpoints import DEFAULT_TEACHER, load_checkpoint


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
