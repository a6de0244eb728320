"""Faults a long-running tool meets: full disks, unwritable folders, parallel runs, several
users at once, and broken inputs on every page."""

from __future__ import annotations

import errno
import json
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from robustkd.cli.main import main
from robustkd.experiments.compare import launch_compare
from robustkd.runs.liveness import refresh_state
from robustkd.runs.store import Run
from tests.conftest import ROOT

MAIN = str(ROOT / "app" / "main.py")
PAGES = ["teacher", "triggers", "variance", "attributions", "distill", "compare", "teach"]
TINY = {"distill_size": 300, "trusted_size": 100, "test_size": 200, "epochs": 1, "device": "cpu"}


def _wait_done(runs: list[Run], timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = [refresh_state(r).get("state") for r in runs]
        if all(s in ("done", "failed", "cancelled") for s in states):
            return
        time.sleep(0.5)
    raise AssertionError(f"runs did not finish: {states}")


def test_unwritable_runs_folder_is_one_sentence(tmp_path: Path, tiny_teacher: Path, capsys) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the runs folder should be")
    code = main(
        [
            "distill",
            "--teacher",
            str(tiny_teacher),
            "--method",
            "scratch",
            "--out",
            str(blocker / "run1"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "Cannot write a run folder" in err and "writable" in err


def test_full_disk_mid_run_is_reported(
    tmp_path: Path, tiny_teacher: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import robustkd.experiments.compare as compare_module

    def no_space(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "report.json"))

    monkeypatch.setattr(compare_module, "atomic_write_json", no_space)
    out = tmp_path / "runs" / "full"
    args = [
        "distill",
        "--teacher",
        str(tiny_teacher),
        "--method",
        "scratch",
        "--out",
        str(out),
        "--quiet",
    ] + [x for k, v in TINY.items() for x in ("--" + k.replace("_", "-"), str(v))]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "No space left on device" in err and err.count("\n") == 1
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and "No space left" in status["message"]


def test_two_runs_at_once_do_not_clobber(tmp_path: Path, tiny_teacher: Path) -> None:
    runs = [
        launch_compare(["scratch"], {**TINY, "teacher": str(tiny_teacher), "seed": seed}, tmp_path)
        for seed in (1, 2)
    ]
    _wait_done(runs)
    assert runs[0].path != runs[1].path
    for run, seed in zip(runs, (1, 2), strict=True):
        assert run.status()["state"] == "done", run.log_tail()
        report = run.report()
        assert report["methods"]["scratch"]["seed"] == seed
        assert (run.checkpoints_dir / "scratch.safetensors").exists()


def test_five_sessions_walk_the_pages_while_a_run_goes(
    tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROBUSTKD_TEACHER", str(tiny_teacher))
    monkeypatch.setenv("ROBUSTKD_RUNS", str(tmp_path))
    run = launch_compare(
        ["scratch", "feature-kd"],
        {**TINY, "epochs": 3, "distill_size": 1500, "teacher": str(tiny_teacher)},
        tmp_path,
    )
    sessions = [AppTest.from_file(MAIN, default_timeout=120) for _ in range(5)]
    for at in sessions:
        at.run()
    for page in PAGES:  # round-robin: every session visits every page while the run goes
        for at in sessions:
            at.switch_page(str(ROOT / "pages" / f"{page}.py")).run()
            assert not at.exception, (page, [e.value for e in at.exception])
    _wait_done([run])
    assert run.status()["state"] == "done", run.log_tail()


@pytest.mark.parametrize("broken", ["junk", "missing", "other-architecture"])
def test_every_page_survives_a_broken_teacher(
    broken: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from robustkd.models import create_model
    from robustkd.models.checkpoints import read_metadata, save_checkpoint

    path = tmp_path / "teacher.safetensors"
    if broken == "junk":
        path.write_bytes(b"\x89PNG\r\n not really anything")
    elif broken == "other-architecture":
        save_checkpoint(
            path,
            create_model("small-cnn"),
            {
                "architecture": "small-cnn-student",  # metadata that lies about the weights
                "model_args": {"num_classes": 10, "in_channels": 1, "image_size": [28, 28]},
            },
        )
        assert read_metadata(path)["architecture"] == "small-cnn-student"  # valid, but lying
    monkeypatch.setenv("ROBUSTKD_TEACHER", str(path))
    monkeypatch.setenv("ROBUSTKD_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(MAIN, default_timeout=120)
    at.run()
    for page in PAGES:
        at.switch_page(str(ROOT / "pages" / f"{page}.py")).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert at.error, f"{page} shows no message for a {broken} teacher"
        text = " ".join(e.value for e in at.error)
        assert "Traceback" not in text
