"""Run folders: creation, status, metrics, atomic files, listing, liveness, progress, workers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from robustkd.data.datasets import ImageDataset
from robustkd.errors import ConfigError, RobustKDError
from robustkd.runs import queue as runs_queue
from robustkd.runs import store as runs
from robustkd.runs.liveness import is_alive, refresh_state
from robustkd.runs.progress import RunProgress, eta_seconds
from robustkd.runs.queue import launch_worker
from robustkd.runs.store import (
    Run,
    RunCancelled,
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    list_runs,
)
from robustkd.training.config import TrainConfig, TrainEvent
from robustkd.training.engine import train_model
from tests import helpers


@pytest.fixture()
def finished_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    return tmp_path / "runs"


def wait_for(predicate, timeout: float = 15.0) -> bool:
    return helpers.wait_for(predicate, timeout)


# --------------------------------------------------------------------------- create / open


def test_create_open_round_trip(root: Path) -> None:
    config = {"teacher": "t.safetensors", "epochs": 3, "lr": 0.05, "nested": {"a": [1, 2]}}
    run = Run.create(root, "distil", config)
    assert re.fullmatch(r"\d{8}-\d{6}-distil-[0-9a-f]{6}", run.id)
    assert run.path == root / run.id
    for name in ("config.json", "status.json", "log.txt"):
        assert (run.path / name).is_file()
    assert (run.path / "checkpoints").is_dir()

    again = Run.open(root, run.id)
    assert again == run
    assert again.config == config
    status = again.status()
    assert status["state"] == "queued"
    assert status["kind"] == "distil"
    assert status["pid"] is None
    assert status["created"] == status["updated"]
    assert again.metrics() == []
    assert again.report() is None

    named = Run.create(root, "evaluate", {}, run_id="my-eval.1")
    assert Run.open(root, "my-eval.1").status()["kind"] == "evaluate"
    with pytest.raises(ConfigError, match="already exists"):
        Run.create(root, "evaluate", {}, run_id="my-eval.1")
    assert named.status()["state"] == "queued"  # the failed create did not touch it


def test_open_missing_run_says_how_to_list(root: Path) -> None:
    Run.create(root, "train", {}, run_id="other")
    with pytest.raises(RobustKDError) as info:
        Run.open(root, "nope")
    message = str(info.value)
    assert "robustkd runs" in message
    assert "other" not in message
    # a folder without status.json is not a run either
    (root / "half").mkdir()
    with pytest.raises(RobustKDError, match="robustkd runs"):
        Run.open(root, "half")


def test_default_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(runs.RUNS_ENV, raising=False)
    assert runs.default_runs_root() == Path("runs")
    monkeypatch.setenv(runs.RUNS_ENV, str(tmp_path / "elsewhere"))
    assert runs.default_runs_root() == tmp_path / "elsewhere"
    run = Run.create(None, "compare", {"x": 1})
    assert run.path.parent == tmp_path / "elsewhere"
    assert list_runs() == [run]
    assert Run.open(None, run.id) == run


BAD_IDS = ["../evil", "a/b", "/etc/passwd", "", ".hidden", "x" * 200, "..", ".", "a b", "a\\b"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_run_ids_are_refused(tmp_path: Path, bad: str) -> None:
    root = tmp_path / "root"
    with pytest.raises(ConfigError):
        Run.create(root, "train", {"x": 1}, run_id=bad)
    with pytest.raises(ConfigError):
        Run.open(root, bad)
    # nothing was created anywhere: not outside root, not even root itself
    assert list(tmp_path.iterdir()) == []


def test_symlink_out_of_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    Run.create(outside, "train", {}, run_id="victim")
    root.mkdir()
    (root / "link").symlink_to(outside / "victim", target_is_directory=True)
    with pytest.raises(ConfigError, match="outside"):
        Run.open(root, "link")
    with pytest.raises(ConfigError):
        Run.create(root, "train", {}, run_id="link")
    assert list_runs(root) == []  # ... and listing does not follow it into another root's run


@pytest.mark.parametrize("kind", ["../x", "a/b", "", "x" * 41, "-lead"])
def test_bad_kinds_are_refused(root: Path, kind: str) -> None:
    with pytest.raises(ConfigError):
        Run.create(root, kind, {})
    assert not root.exists()


def test_checkpoint_path_stays_inside(root: Path) -> None:
    run = Run.create(root, "train", {})
    path = run.checkpoint_path("teacher.safetensors")
    assert path == run.path / "checkpoints" / "teacher.safetensors"
    for bad in ("../config.json", "a/b.pt", "/etc/passwd", "", ".tmp"):
        with pytest.raises(ConfigError):
            run.checkpoint_path(bad)


# --------------------------------------------------------------------------- status


def test_status_transitions(root: Path) -> None:
    run = Run.create(root, "train", {"epochs": 3})
    created = run.status()
    time.sleep(0.002)

    started = run.start(epochs=3, steps=10)
    assert started["state"] == "running"
    assert started["pid"] == os.getpid()
    assert (started["epochs"], started["steps"]) == (3, 10)
    assert started["updated"] > created["updated"]
    assert started["created"] == created["created"]

    run.update_status(epoch=2, message="halfway")
    status = run.status()
    assert (status["epoch"], status["epochs"], status["message"]) == (2, 3, "halfway")
    assert status["state"] == "running"  # merged, not replaced

    with pytest.raises(ValueError):
        run.update_status(state="exploded")
    assert run.status()["state"] == "running"

    done = run.finish({"acc": 0.91, "asr": 0.02})
    assert done["state"] == "done"
    assert run.report() == {"acc": 0.91, "asr": 0.02}
    assert json.loads((run.path / "report.json").read_text()) == {"acc": 0.91, "asr": 0.02}

    failing = Run.create(root, "distil", {})
    failing.start()
    status = failing.fail("the teacher file is corrupt; pick another one")
    assert status["state"] == "failed"
    assert failing.status()["message"] == "the teacher file is corrupt; pick another one"
    assert failing.report() is None

    cancelling = Run.create(root, "detoxify", {})
    cancelling.start()
    assert not cancelling.cancel_requested()
    cancelling.request_cancel()
    assert cancelling.cancel_requested()
    assert Run.open(root, cancelling.id).cancel_requested()  # a marker any process can see
    status = cancelling.mark_cancelled()
    assert status["state"] == "cancelled"
    assert status["message"] == "the run was cancelled"
    assert not cancelling.cancel_requested()  # consumed, so a relaunch is not cancelled at once


def test_corrupt_status_raises_user_error(root: Path) -> None:
    run = Run.create(root, "train", {})
    (run.path / "status.json").write_text("{broken")
    with pytest.raises(RobustKDError, match="unreadable"):
        run.status()


# --------------------------------------------------------------------------- metrics / files


def test_metrics_tolerate_truncated_last_line(root: Path) -> None:
    run = Run.create(root, "train", {})
    run.log_metrics({"epoch": 1, "loss": 2.0})
    run.log_metrics({"epoch": 2, "loss": 1.5, "acc": 0.5})
    with open(run.metrics_path, "a") as fh:
        fh.write('{"epoch": 3, "lo')  # a writer died mid-line
    assert run.metrics() == [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5, "acc": 0.5}]

    # the next append starts on a fresh line, so it is not glued to the partial one
    run.log_metrics({"epoch": 4, "loss": 1.0})
    assert [r["epoch"] for r in run.metrics()] == [1, 2, 4]


def test_append_jsonl_serialises_tensors_and_paths(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"loss": torch.tensor(0.5), "v": torch.tensor([1, 2]), "p": Path("a")})
    assert runs.read_jsonl(path) == [{"loss": 0.5, "v": [1, 2], "p": "a"}]


def test_atomic_write_leaves_no_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "data.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]

    def broken_replace(src: str, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(runs.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "half")
    assert json.loads(target.read_text()) == {"a": 2}  # old content intact
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]  # temp file removed


def test_concurrent_reader_never_sees_partial_json(tmp_path: Path) -> None:
    target = tmp_path / "big.json"
    payloads = [{"version": i, "values": list(range(i, i + 20_000))} for i in range(2)]
    atomic_write_json(target, payloads[0])
    stop = threading.Event()
    reads, errors = [0], []

    def reader() -> None:
        while not stop.is_set():
            try:
                obj = json.loads(target.read_text())
                assert obj["values"][0] == obj["version"]
                reads[0] += 1
            except Exception as exc:
                errors.append(repr(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(200):
            atomic_write_json(target, payloads[i % 2])
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert reads[0] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["big.json"]


# --------------------------------------------------------------------------- listing


def test_list_runs_newest_first_and_skips_junk(root: Path) -> None:
    made = [Run.create(root, "train", {}, run_id=name) for name in ("b", "a", "c")]
    (root / "junk").mkdir()
    (root / "junk" / "notes.txt").write_text("hello")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "status.json").write_text('{"state": "run')
    (root / "listy").mkdir()
    (root / "listy" / "status.json").write_text("[1, 2]")
    (root / "stray.txt").write_text("not a folder")
    hidden = root / ".hidden"
    hidden.mkdir()
    (hidden / "status.json").write_text(json.dumps(made[0].status()))

    listed = list_runs(root)
    assert [r.id for r in listed] == ["c", "a", "b"]  # creation order, not name order
    assert listed == made[::-1]
    assert list_runs(root / "missing") == []


# --------------------------------------------------------------------------- liveness


def test_is_alive(finished_pid: int) -> None:
    assert is_alive(os.getpid())
    assert not is_alive(finished_pid)
    for bogus in (0, -1, None, True):
        assert not is_alive(bogus)  # type: ignore[arg-type]


def test_refresh_state_marks_dead_worker_failed(root: Path, finished_pid: int) -> None:
    dead = Run.create(root, "distil", {})
    dead.start(epochs=5)
    dead.update_status(pid=finished_pid)
    status = refresh_state(dead)
    assert status["state"] == "failed"
    assert "stopped unexpectedly" in status["message"]
    assert dead.status() == status  # written to disk, not just returned

    queued = Run.create(root, "distil", {})
    queued.update_status(pid=finished_pid)  # launched, crashed before start()
    assert refresh_state(queued)["state"] == "failed"

    alive = Run.create(root, "distil", {})
    alive.start()  # this test process: alive
    assert refresh_state(alive)["state"] == "running"

    finished = Run.create(root, "distil", {})
    finished.start()
    finished.finish({"ok": True})
    finished.update_status(pid=finished_pid)
    assert refresh_state(finished)["state"] == "done"  # only active runs can die

    never_launched = Run.create(root, "distil", {})
    assert refresh_state(never_launched)["state"] == "queued"


# --------------------------------------------------------------------------- progress


def test_eta_seconds() -> None:
    assert eta_seconds(10.0, 1, 5) == pytest.approx(40.0)
    assert eta_seconds(10.0, 5, 5) == 0.0
    assert eta_seconds(10.0, 0, 5) is None
    assert eta_seconds(10.0, 3, 0) is None
    assert eta_seconds(float("nan"), 1, 5) is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_run_progress_throttles_steps_and_logs_epochs(root: Path) -> None:
    run = Run.create(root, "distil", {})
    run.start(epochs=2, steps=10)
    clock = FakeClock()
    seen: list[TrainEvent] = []
    progress = RunProgress(run, phase="distil robustkd", inner=seen.append, clock=clock)

    clock.now += 1.0  # first step took 1 s
    progress(TrainEvent("step", 1, 2, 1, 10, 2.3))
    status = run.status()
    assert (status["epoch"], status["step"], status["steps"]) == (1, 1, 10)
    assert status["phase"] == "distil robustkd"
    assert status["eta_seconds"] == pytest.approx(19.0)  # 19 more steps at 1 s each

    for step in range(2, 5):  # 1/8 s apart: within the 0.5 s window, nothing written
        clock.now += 0.125
        progress(TrainEvent("step", 1, 2, step, 10, 2.0))
    assert run.status()["step"] == 1
    clock.now += 0.125  # 0.5 s after the last write
    progress(TrainEvent("step", 1, 2, 5, 10, 1.9))
    assert run.status()["step"] == 5

    clock.now += 0.5
    metrics = {"epoch": 1, "loss": 1.8, "lr": 0.05, "acc": 0.6, "asr": 0.9, "seconds": 1.6}
    progress(TrainEvent("epoch", 1, 2, 10, 10, 1.8, metrics, 1.6))  # not throttled
    status = run.status()
    assert (status["epoch"], status["step"]) == (1, 10)
    assert status["eta_seconds"] == pytest.approx(2.0)  # 10 steps took 2 s, 10 to go
    [record] = run.metrics()
    assert record["phase"] == "distil robustkd"
    assert {k: record[k] for k in metrics} == metrics
    assert len(seen) == 6  # inner gets every event


def test_run_progress_raises_when_cancelled(root: Path) -> None:
    run = Run.create(root, "distil", {})
    run.start()
    progress = RunProgress(run)
    progress(TrainEvent("step", 1, 1, 1, 5, 1.0))
    run.request_cancel()
    with pytest.raises(RunCancelled, match="the run was cancelled") as info:
        progress(TrainEvent("step", 1, 1, 2, 5, 1.0))  # inside the throttle window too
    assert isinstance(info.value, RobustKDError)


def test_run_progress_drives_real_training(root: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    data = ImageDataset(
        images=torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=gen),
        labels=torch.arange(40) % 4,
        classes=("a", "b", "c", "d"),
        mean=(0.5,),
        std=(0.25,),
        name="tiny",
    )
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    config = TrainConfig(epochs=3, batch_size=10, device="cpu", augment="none")
    run = Run.create(root, "train", config.to_dict())
    run.start(epochs=3)
    train_model(model, data, config, progress=RunProgress(run, phase="teacher"))
    records = run.metrics()
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(r["phase"] == "teacher" and "loss" in r for r in records)
    status = run.status()
    assert (status["epoch"], status["epochs"], status["step"], status["steps"]) == (3, 3, 4, 4)
    assert status["eta_seconds"] == 0.0

    # cancelling mid-training stops it at the next event
    again = Run.create(root, "train", config.to_dict())
    again.start(epochs=3)

    def cancel_after_first_epoch(event: TrainEvent) -> None:
        if event.kind == "epoch":
            again.request_cancel()

    with pytest.raises(RunCancelled):
        train_model(
            model, data, config, progress=RunProgress(again, inner=cancel_after_first_epoch)
        )
    assert [r["epoch"] for r in again.metrics()] == [1]


# --------------------------------------------------------------------------- workers


def test_launch_worker_runs_detached_and_logs(root: Path) -> None:
    run = Run.create(root, "evaluate", {})
    code = (
        "import os, sys, time\n"
        "time.sleep(0.3)\n"
        "print('hello from', os.getpid())\n"
        "print('session leader', os.getsid(0) == os.getpid())\n"
        "print('stdin', repr(sys.stdin.read()))\n"
        "print('root', os.environ['ROBUSTKD_RUNS'])\n"
        "print('oops', file=sys.stderr)\n"
    )
    pid = launch_worker(["-c", code], run, module=None)
    assert run.status()["pid"] == pid
    assert run.status()["argv"] == ["-c", code]
    assert is_alive(pid)
    assert refresh_state(run)["state"] == "queued"  # alive: left alone
    assert wait_for(lambda: not is_alive(pid))
    log = run.log_path.read_text()
    assert f"hello from {pid}" in log
    assert "session leader True" in log
    assert "stdin ''" in log
    assert f"root {root.resolve()}" in log
    assert "oops" in log
    # it exited without calling start()/finish(): the app now sees a dead worker
    assert refresh_state(run)["state"] == "failed"


def test_launch_worker_with_module(root: Path) -> None:
    run = Run.create(root, "compare", {})
    source = root / "in.json"
    source.write_text('{"b":1,"a":[1,2]}')
    pid = launch_worker([str(source)], run, module="json.tool")
    assert wait_for(lambda: not is_alive(pid))
    log = run.log_path.read_text()
    assert "-m json.tool" in log.splitlines()[0]  # the command line comes first
    assert json.loads(log.split("\n", 1)[1]) == {"b": 1, "a": [1, 2]}


def test_launch_worker_failure_marks_run_failed(
    root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    run = Run.create(root, "train", {})
    monkeypatch.setattr(runs_queue.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(RobustKDError, match="could not start"):
        launch_worker(["-c", "pass"], run, module=None)
    assert run.status()["state"] == "failed"
