"""robustkd-reverse: triggers reversed from a teacher, and the student's stamped inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from robustkd.attacks.optimized_blend import fit_blends
from robustkd.data.datasets import normalize, to_float
from robustkd.defenses.reverse import ReversedTriggers, TriggerStamp, reverse_triggers
from robustkd.errors import ConfigError, DataError
from robustkd.experiments.compare import compare
from robustkd.models import create_model
from robustkd.models.checkpoints import load_checkpoint
from robustkd.runs.store import Run
from robustkd.training.distill import DistillConfig, distill_student
from robustkd.training.scenarios import build_scenario
from tests.conftest import ROOT
from tests.helpers import run_cli

TINY = {"distill_size": 200, "trusted_size": 100, "test_size": 100}


@pytest.fixture(scope="module")
def teacher(tiny_teacher: Path):
    return load_checkpoint(tiny_teacher)


@pytest.fixture(scope="module")
def scenario(teacher):
    return build_scenario("clean", teacher[1], **TINY)


def test_reversal_turns_the_teacher_within_its_bound(teacher, scenario) -> None:
    """Every class gets a trigger inside the mask bound that turns some of the teacher's
    answers to it (the BadNets target, class 0, among the easiest), and the objective falls."""
    model, _ = teacher
    found = reverse_triggers(model, scenario.trusted, max_mask=0.3, steps=40, seed=0)
    assert found.patterns.shape == (10, 1, 28, 28) and found.masks.shape == (10, 1, 28, 28)
    assert float(found.masks.max()) <= 0.3 + 1e-6 and float(found.masks.min()) >= 0
    assert 0 <= float(found.patterns.min()) <= float(found.patterns.max()) <= 1
    rates = found.flip_rates
    assert len(rates) == 10 and max(rates) > 0.2
    assert rates[0] >= sorted(rates)[5]  # the planted target is in the easier half
    summary = found.summary()
    assert summary[0]["target"] == 0 and summary[0]["flip_rate"] == round(rates[0], 4)

    images = to_float(scenario.trusted.images)
    data = scenario.trusted

    def objective(inputs: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(inputs), torch.zeros(len(inputs)).long())

    gen = torch.Generator().manual_seed(0)
    _, _, history = fit_blends(model, images, data.mean, data.std, objective, 2, 0.2, 30, 0.1,
                               32, gen)  # fmt: skip
    assert sum(history[-5:]) < sum(history[:5])


def _triggers() -> ReversedTriggers:
    patterns = torch.stack([torch.ones(1, 4, 4), torch.zeros(1, 4, 4)])
    masks = torch.full((2, 1, 4, 4), 0.5)
    return ReversedTriggers(patterns, masks, [1.0, 0.5], (0.5,), (0.25,))


def test_stamp_changes_only_its_share_of_rows() -> None:
    x = normalize(torch.rand(2000, 1, 4, 4), (0.5,), (0.25,))
    assert torch.equal(TriggerStamp(_triggers(), 0.0, seed=0)(x), x)
    every = TriggerStamp(_triggers(), 1.0, seed=0)(x)
    assert bool((every != x).flatten(1).any(1).all())
    # each stamped row is one of the two triggers blended at 0.5 in pixel space
    pixels = x * 0.25 + 0.5
    candidates = [(0.5 * pixels + 0.5 * v - 0.5) / 0.25 for v in (1.0, 0.0)]
    near = [(every - c).abs().flatten(1).amax(1) < 1e-5 for c in candidates]
    assert bool((near[0] | near[1]).all()) and int(near[0].sum()) > 500 < int(near[1].sum())
    half = TriggerStamp(_triggers(), 0.5, seed=0)(x)
    changed = int((half != x).flatten(1).any(1).sum())
    assert 850 < changed < 1150
    again = TriggerStamp(_triggers(), 0.5, seed=0)(x)
    assert torch.equal(again, half)  # seeded


def test_student_input_reaches_the_student_not_the_teacher(teacher, scenario) -> None:
    """The stamp changes what the student reads; the teacher still reads the clean batch."""
    model, _ = teacher
    seen: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
    handle = model.register_forward_pre_hook(lambda _, a: seen["teacher"].append(a[0].clone()))

    def stamp(x: torch.Tensor) -> torch.Tensor:
        out = x + 1.0
        seen["student"].append(out.clone())
        return out

    student = create_model("small-cnn-student", num_classes=10, in_channels=1, image_size=28)
    config = DistillConfig(epochs=1, batch_size=64, device="cpu", eval_size=50)
    try:
        distill_student(model, student, scenario, config, logit_weight=1.0, student_input=stamp)
    finally:
        handle.remove()
    pairs = [t for t in seen["teacher"] if len(t) == 64][:2]
    assert pairs and seen["student"]
    assert torch.allclose(seen["student"][0] - 1.0, pairs[0], atol=1e-5)


def test_cli_runs_robustkd_reverse_and_refuses_a_bad_share(tiny_teacher: Path, tmp_path, capsys):
    base = [
        "compare", "--teacher", str(tiny_teacher), "--scenario", "clean",
        "--distill-size", "200", "--trusted-size", "50", "--test-size", "100",
        "--epochs", "1", "--device", "cpu", "--quiet",
    ]  # fmt: skip
    code, _, err = run_cli([*base, "--methods", "robustkd-reverse", "--reverse-share", "1.5",
                            "--out", str(tmp_path / "bad")], capsys)  # fmt: skip
    assert code != 0 and "share of stamped student inputs" in err and "Traceback" not in err
    out = tmp_path / "good"
    args = [*base, "--methods", "robustkd-reverse", "--reverse-steps", "5", "--reverse-share",
            "0.3", "--out", str(out)]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    m = report["methods"]["robustkd-reverse"]
    assert len(m["reversed_triggers"]) == 10
    # the triggers themselves are kept beside the report
    assert m["triggers_file"] == "robustkd-reverse-triggers.npz"
    kept = ReversedTriggers.load(out / m["triggers_file"])
    expected = [t["flip_rate"] for t in m["reversed_triggers"]]
    assert kept.flip_rates == pytest.approx(expected, abs=1e-4)
    assert report["config"]["reverse_share"] == 0.3 and report["config"]["reverse_steps"] == 5


def test_reversal_refuses_a_teacher_of_too_many_classes(scenario) -> None:
    """One trigger per class: a 1,000-class teacher (one trained elsewhere, say) is refused in
    one sentence rather than run out of memory."""
    wide = create_model("small-cnn-student", num_classes=1000, in_channels=1, image_size=28)
    with pytest.raises(ConfigError, match="at most 100"):
        reverse_triggers(wide, scenario.trusted, steps=1)


def test_reversed_triggers_round_trip_and_pictures(tmp_path: Path) -> None:
    found = _triggers()
    path = found.save(tmp_path / "t-triggers.npz")
    back = ReversedTriggers.load(path)
    assert torch.equal(back.patterns, found.patterns) and torch.equal(back.masks, found.masks)
    assert back.flip_rates == found.flip_rates and back.mean == found.mean
    pictures = back.pictures()
    assert pictures.dtype == np.uint8 and pictures.shape == (2, 4, 4, 1)
    assert int(pictures[0].max()) == 255  # brightened to its own peak
    assert int(pictures[1].max()) == 0  # a black pattern adds nothing


@pytest.mark.parametrize(
    "arrays",
    [
        {"patterns": np.zeros((2, 1, 4, 4), np.float32)},  # keys missing
        {  # a mask beyond [0, 1]
            "patterns": np.zeros((2, 1, 4, 4), np.float32),
            "masks": np.full((2, 1, 4, 4), 2.0, np.float32),
            "flip_rates": np.zeros(2, np.float32),
            "mean": np.zeros(1, np.float32),
            "std": np.ones(1, np.float32),
        },
        {  # masks for a different image size
            "patterns": np.zeros((2, 1, 4, 4), np.float32),
            "masks": np.zeros((2, 1, 5, 5), np.float32),
            "flip_rates": np.zeros(2, np.float32),
            "mean": np.zeros(1, np.float32),
            "std": np.ones(1, np.float32),
        },
        {  # an object array would need a pickle to read
            "patterns": np.array([{"x": 1}], dtype=object),
            "masks": np.zeros((1, 1, 4, 4), np.float32),
            "flip_rates": np.zeros(1, np.float32),
            "mean": np.zeros(1, np.float32),
            "std": np.ones(1, np.float32),
        },
    ],
)
def test_a_malformed_triggers_file_is_refused_in_one_sentence(tmp_path: Path, arrays) -> None:
    path = tmp_path / "x-triggers.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match="run robustkd-reverse again"):
        ReversedTriggers.load(path)


def test_a_triggers_file_that_is_no_zip_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk-triggers.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="run robustkd-reverse again"):
        ReversedTriggers.load(tmp_path / "junk-triggers.npz")


def test_a_triggers_file_too_large_unpacked_is_refused(tmp_path: Path, monkeypatch) -> None:
    import robustkd.defenses.reverse as reverse

    ok = _triggers().save(tmp_path / "ok-triggers.npz")
    assert ReversedTriggers.load(ok).flip_rates == [1.0, 0.5]
    monkeypatch.setattr(reverse, "MAX_FILE_BYTES", 100)  # sizes are read before unpacking
    with pytest.raises(DataError, match="run robustkd-reverse again"):
        ReversedTriggers.load(ok)


def test_compare_page_shows_the_reversed_triggers(
    teacher, scenario, tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished robustkd-reverse run shows one picture per class with its flip rate, the
    recorded target marked; a damaged file gives one sentence, not a traceback."""
    model, meta = teacher
    root = tmp_path / "runs"
    monkeypatch.setenv("ROBUSTKD_TEACHER", str(tiny_teacher))
    monkeypatch.setenv("ROBUSTKD_RUNS", str(root))
    config = DistillConfig(epochs=1, batch_size=64, device="cpu", eval_size=50, reverse_steps=5)
    run = Run.create(root, "compare", {"methods": ["robustkd-reverse"]})
    run.start(epochs=1)
    run.finish(compare(model, meta, scenario, ["robustkd-reverse"], config, run))
    rates = run.report()["methods"]["robustkd-reverse"]["reversed_triggers"]

    app = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=120)
    app.run()
    app.switch_page(str(ROOT / "pages" / "compare.py")).run()
    assert not app.exception and not app.error
    assert any(s.value == "Triggers reversed from the teacher — robustkd-reverse"
               for s in app.subheader)  # fmt: skip
    shown = [e for e in app.main if type(e).__name__ == "Image"]
    captions = [c for e in shown for c in e.captions if " · turns " in c]
    assert len(captions) == 10
    assert captions[0].startswith("0 ") and "recorded target" in captions[0]
    assert sum("recorded target" in c for c in captions) == 1
    assert f"turns {100 * rates[3]['flip_rate']:.0f} %" in captions[3]

    (run.path / "robustkd-reverse-triggers.npz").write_bytes(b"damaged")
    app.run()
    assert not app.exception
    assert any("run robustkd-reverse again" in e.value for e in app.error)
