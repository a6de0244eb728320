"""A worker killed with SIGKILL mid-epoch shows as failed, and resuming it finishes with the
metrics of an uninterrupted run (same seed) within 0.5 points."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from robustkd.cli.main import main
from robustkd.experiments.compare import launch_compare
from robustkd.runs.liveness import refresh_state
from robustkd.runs.store import Run

OPTIONS = {
    "distill_size": 1500,
    "trusted_size": 100,
    "test_size": 300,
    "epochs": 3,
    "batch_size": 32,
    "device": "cpu",
    "seed": 3,
}
METHODS = ["scratch", "robustkd"]


def _wait(run: Run, predicate, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = refresh_state(run)
        if predicate(status):
            return status
        time.sleep(0.2)
    raise AssertionError(f"timed out; last status {refresh_state(run)}")


def test_sigkill_then_resume_matches_an_uninterrupted_run(
    tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("ROBUSTKD_RUNS", str(tmp_path))
    options = {**OPTIONS, "teacher": str(tiny_teacher)}
    run = launch_compare(METHODS, options, tmp_path)
    # kill it in the middle of robustkd's second epoch
    status = _wait(
        run,
        lambda s: (
            (
                s.get("phase") == "robustkd"
                and (s.get("epoch") or 0) >= 2
                and (s.get("step") or 0) >= 5
            )
            or s.get("state") in ("done", "failed")
        ),
    )
    assert status["state"] == "running", status
    os.kill(status["pid"], signal.SIGKILL)
    status = _wait(run, lambda s: s.get("state") == "failed")
    assert "stopped unexpectedly" in status["message"]
    assert list(run.checkpoints_dir.glob("robustkd.state.pt"))  # the last good epoch survives
    assert "scratch" in (run.report() or {}).get("methods", {})  # finished work is kept

    assert main(["resume", run.id, "--root", str(tmp_path), "--quiet"]) == 0
    capsys.readouterr()
    resumed = json.loads((run.path / "report.json").read_text())
    assert run.status()["state"] == "done" and list(resumed["methods"]) == METHODS
    assert not list(run.checkpoints_dir.glob("*.state.pt"))

    ref = tmp_path / "reference"
    argv = ["compare", "--methods", ",".join(METHODS), "--quiet", "--out", str(ref)]
    for key, value in options.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    assert main(argv) == 0
    reference = json.loads((ref / "report.json").read_text())
    for m in METHODS:
        for key in ("acc", "asr"):
            assert abs(resumed["methods"][m][key] - reference["methods"][m][key]) <= 0.005, (m, key)


def test_resume_refuses_what_cannot_be_resumed(tmp_path: Path, capsys) -> None:
    done = Run.create(tmp_path, "compare", {"argv": ["compare"]})
    done.finish({})
    assert main(["resume", done.id, "--root", str(tmp_path)]) == 2
    assert "already done" in capsys.readouterr().err
    other = Run.create(tmp_path, "teacher", {})
    other.fail("boom")
    assert main(["resume", other.id, "--root", str(tmp_path)]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert main(["resume", "no-such-run", "--root", str(tmp_path)]) == 2
