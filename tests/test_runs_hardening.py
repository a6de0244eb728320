"""Runs on a shared server: one worker per run, a queue with a per-server limit, liveness by
pid and start time, damaged folders listed, the teacher checked on resume, uploads cleaned, and
reports that name files instead of the server's folders."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from robustkd.cli.main import main
from robustkd.errors import ConfigError, RobustKDError, redact_paths
from robustkd.experiments.compare import launch_compare
from robustkd.runs.liveness import process_start_time, refresh_state
from robustkd.runs.queue import (
    launch_worker,
    max_runs,
    queue_position,
    queue_worker,
    start_queued,
)
from robustkd.runs.store import (
    DIED_MESSAGE,
    Run,
    file_sha256,
    list_damaged_runs,
    list_runs,
)
from robustkd.runs.uploads import clean_uploads, upload_days
from tests.conftest import ROOT
from tests.helpers import wait_for

TINY = ["--distill-size", "300", "--trusted-size", "100", "--test-size", "200"]
TINY += ["--epochs", "1", "--device", "cpu", "--quiet"]

# A stand-in worker: starts its run, waits for a "go" file in the run folder, finishes. Its
# end goes through Run.finish, as a real worker's does, which starts the next queued run.
WAITER = (
    "import os, sys, time\n"
    "from pathlib import Path\n"
    "from robustkd.runs.store import Run\n"
    "run = Run(Path(os.environ['ROBUSTKD_RUNS']) / sys.argv[1])\n"
    "run.start()\n"
    "while not (run.path / 'go').exists():\n"
    "    time.sleep(0.05)\n"
    "run.finish({'ok': True})\n"
)
SLEEPER = "import time\ntime.sleep(60)\n"


def _wait(predicate, timeout: float = 60.0) -> bool:
    return wait_for(predicate, timeout)


@pytest.fixture()
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "runs"
    folder.mkdir()
    monkeypatch.setenv("ROBUSTKD_RUNS", str(folder))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the stand-in workers import this checkout
    monkeypatch.delenv("ROBUSTKD_MAX_RUNS", raising=False)
    return folder


class Workers:
    """The worker processes a test started, ended when it is over (if still the same ones)."""

    def __init__(self) -> None:
        self.started: list[tuple[int, int | None]] = []

    def append(self, pid: int) -> None:
        self.started.append((pid, process_start_time(pid)))

    def stop(self) -> None:
        for pid, started in self.started:
            if process_start_time(pid) == started:  # not a later process that got the pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture()
def stop_workers():
    workers = Workers()
    yield workers
    workers.stop()


# --------------------------------------------------------------------------- teacher + report


def test_report_names_files_and_resume_refuses_a_rebuilt_teacher(
    tiny_teacher: Path, tmp_path: Path, root: Path, capsys
) -> None:
    teacher = tmp_path / "teacher.safetensors"
    shutil.copyfile(tiny_teacher, teacher)
    out = root / "r1"
    argv = ["compare", "--methods", "scratch", "--teacher", str(teacher), "--out", str(out)]
    assert main(argv + TINY) == 0
    capsys.readouterr()
    run = Run.open(root, "r1")
    assert run.config["teacher_sha256"] == file_sha256(teacher)

    report = run.report()
    assert report["teacher_path"] == "teacher.safetensors"
    assert report["methods"]["scratch"]["checkpoint"] == "checkpoints/scratch.safetensors"
    assert (run.path / report["methods"]["scratch"]["checkpoint"]).is_file()
    for name in ("report.json", "report.md", "report.csv"):  # what the app offers to download
        text = (run.path / name).read_text()
        assert str(tmp_path) not in text and "/tmp" not in text, name

    run.update_status(state="failed", message="interrupted")  # as if the worker had died
    teacher.write_bytes(teacher.read_bytes() + b"rebuilt")
    assert main(["resume", "r1", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "has changed since run 'r1' started" in err and "SHA-256" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert run.status()["state"] == "failed"  # refused before anything ran

    # the original file back: the app's Resume (queued, started in the background) finishes it
    teacher.write_bytes(teacher.read_bytes()[: -len(b"rebuilt")])
    queue_worker(run, ["resume", run.id, "--quiet"])
    assert start_queued(root) == [run]
    assert _wait(lambda: refresh_state(run)["state"] in ("done", "failed"), 120), run.log_tail()
    assert run.status()["state"] == "done", run.log_tail()
    # the worker writes "done" and then lets go of the run; on a loaded machine the test can
    # look in between
    assert _wait(lambda: not run.worker_busy(), 30)


def test_resume_of_an_older_run_without_a_hash_says_so(root: Path, capsys) -> None:
    run = Run.create(root, "compare", {"argv": ["compare", "--teacher", "missing.safetensors"]})
    run.fail("interrupted")
    assert main(["resume", run.id, "--root", str(root)]) == 2  # the missing teacher, later
    assert "recorded no teacher hash" in capsys.readouterr().err


def test_redact_paths_keeps_names_only() -> None:
    text = "compare --teacher /srv/data/t.safetensors --out runs/x http://a/b"
    assert redact_paths(text) == "compare --teacher …/t.safetensors --out runs/x http://a/b"


# --------------------------------------------------------------------------- one worker per run


def test_a_second_start_or_resume_of_a_run_is_refused(
    root: Path, stop_workers: Workers, capsys
) -> None:
    run = Run.create(root, "compare", {"argv": ["compare", "--methods", "scratch"]})
    run.fail("interrupted")
    pid = launch_worker(["-c", SLEEPER], run, module=None)  # the first resume, still going
    stop_workers.append(pid)
    assert run.worker_busy()

    with pytest.raises(RobustKDError, match="already has a worker"):
        launch_worker(["-c", "pass"], run, module=None)  # a double click a second later
    with pytest.raises(RobustKDError, match="already has a worker"):
        queue_worker(run, ["resume", run.id])
    assert main(["resume", run.id, "--root", str(root)]) == 2  # the CLI, at the same time
    err = capsys.readouterr().err
    assert "already being worked on by another process" in err and err.count("\n") == 1
    other = Run.open(root, run.id)
    with pytest.raises(RobustKDError, match="already being worked on"):
        other.start()  # a worker started by hand for the same run

    os.kill(pid, signal.SIGKILL)  # the lock goes with the process, however it ends
    assert _wait(lambda: not run.worker_busy(), 15)


def test_queueing_a_resume_twice_is_refused(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = Run.create(root, "compare", {"argv": ["compare"]})
    run.fail("interrupted")
    monkeypatch.setenv("ROBUSTKD_MAX_RUNS", "1")
    blocker = Run.create(root, "compare", {})
    blocker.start()  # this process: a live worker occupies the only slot
    queue_worker(run, ["resume", run.id, "--quiet"])
    assert start_queued(root) == []
    with pytest.raises(ConfigError, match="is queued"):
        queue_worker(run, ["resume", run.id, "--quiet"])  # the second click
    assert queue_position(run) == 1
    run.request_cancel()  # nothing runs it yet: cancelled at once
    assert run.status()["state"] == "cancelled" and not run.cancel_requested()
    blocker.finish({})


# --------------------------------------------------------------------------- liveness


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/stat").exists(), reason="needs /proc")
def test_a_reused_pid_does_not_keep_a_run_alive(root: Path) -> None:
    me = os.getpid()
    started = process_start_time(me)
    assert isinstance(started, int)

    alive = Run.create(root, "compare", {})
    alive.start()
    assert alive.status()["pid_start"] == started
    assert refresh_state(alive)["state"] == "running"

    reused = Run.create(root, "compare", {})
    reused.start()
    # the worker died and the system gave its pid to another process (here: this one)
    reused.update_status(pid=me, pid_start=started - 1)
    status = refresh_state(reused)
    assert status["state"] == "failed" and status["message"] == DIED_MESSAGE

    older = Run.create(root, "compare", {})  # written before start times were recorded
    older.start()
    older.update_status(pid_start=None)
    assert refresh_state(older)["state"] == "running"  # the pid alone decides


# --------------------------------------------------------------------------- damaged folders


def test_damaged_run_folders_are_listed_with_the_reason(root: Path, capsys) -> None:
    good = Run.create(root, "compare", {}, run_id="good")
    for name, status, config in (
        ("bad-json", "{broken", "{}"),
        ("bad-object", "[1, 2]", "{}"),
        ("bad-state", json.dumps({"state": "exploded"}), "{}"),
        ("bad-config", json.dumps(good.status()), "{half"),
    ):
        (root / name).mkdir()
        (root / name / "status.json").write_text(status)
        (root / name / "config.json").write_text(config)
    (root / "uploads").mkdir()  # not a run, not damaged
    (root / "notes").mkdir()

    assert list_runs(root) == [good]
    damaged = {d.id: d.reason for d in list_damaged_runs(root)}
    assert set(damaged) == {"bad-json", "bad-object", "bad-state", "bad-config"}
    assert "status.json is unreadable" in damaged["bad-json"]
    assert "not a JSON object" in damaged["bad-object"]
    assert "'exploded'" in damaged["bad-state"]
    assert "config.json" in damaged["bad-config"]

    assert main(["runs", "--root", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    assert any(line.startswith("bad-json") and "damaged" in line for line in lines)
    assert main(["runs", "--root", str(root), "--json"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["bad-config"]["state"] == "damaged"
    assert "config.json" in rows["bad-config"]["message"]
    assert rows["good"]["state"] == "queued"


def test_the_app_lists_damaged_and_queued_runs(
    tiny_teacher: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("ROBUSTKD_TEACHER", str(tiny_teacher))
    monkeypatch.setenv("ROBUSTKD_MAX_RUNS", "1")
    busy = Run.create(root, "compare", {}, run_id="busy")
    busy.start()  # a live worker (this process) holds the only slot
    waiting = Run.create(root, "compare", {}, run_id="waiting")
    queue_worker(waiting, ["-c", "pass"], module=None)
    (root / "broken").mkdir()
    (root / "broken" / "status.json").write_text("{")

    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=120)
    at.run()
    at.switch_page(str(ROOT / "pages" / "distill.py")).run()
    assert not at.exception, [e.value for e in at.exception]
    options = at.sidebar.selectbox(key="run_pick").options
    assert "waiting · queued (position 1)" in options and "broken · damaged" in options
    table = at.dataframe[-1].value
    states = dict(zip(table["run"], table["state"], strict=True))
    assert states == {"busy": "running", "waiting": "queued (position 1)", "broken": "damaged"}
    assert "status.json" in list(table["note"])[-1]
    at.sidebar.selectbox(key="run_pick").set_value("broken · damaged").run()
    assert any("broken is damaged" in w.value for w in at.sidebar.warning)
    busy.finish({})


# --------------------------------------------------------------------------- the queue


def test_the_limit_queues_runs_and_an_ending_worker_starts_the_next(
    root: Path, stop_workers: Workers, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROBUSTKD_MAX_RUNS", "1")
    assert max_runs() == 1
    first = Run.create(root, "compare", {}, run_id="first")
    second = Run.create(root, "compare", {}, run_id="second")
    queue_worker(first, ["-c", WAITER, first.id], module=None)
    assert start_queued(root) == [first]
    queue_worker(second, ["-c", WAITER, second.id], module=None)
    assert start_queued(root) == []  # the only slot is taken
    stop_workers.append(first.status()["pid"])
    assert _wait(lambda: first.status()["state"] == "running"), first.log_tail()
    status = refresh_state(second)
    assert status["state"] == "queued" and status["pid"] is None
    assert queue_position(second) == 1

    # launch_compare queues behind them too, with the teacher's hash in its config
    third = launch_compare(["scratch"], {"teacher": str(tiny_teacher), "epochs": 1}, root)
    assert third.status()["state"] == "queued" and queue_position(third) == 2
    assert third.config["teacher_sha256"] == file_sha256(tiny_teacher)
    third.request_cancel()
    assert third.status()["state"] == "cancelled"  # it never started
    assert queue_position(second) == 1

    (first.path / "go").touch()  # the first worker ends: it starts the second itself
    assert _wait(lambda: second.status()["pid"] is not None, 30), first.log_tail()
    stop_workers.append(second.status()["pid"])
    assert first.status()["state"] == "done"
    assert _wait(lambda: second.status()["state"] == "running"), second.log_tail()
    (second.path / "go").touch()
    assert _wait(lambda: second.status()["state"] == "done"), second.log_tail()
    assert third.status()["state"] == "cancelled"


def test_a_bad_limit_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("ROBUSTKD_MAX_RUNS", bad)
        with pytest.raises(ConfigError, match="ROBUSTKD_MAX_RUNS"):
            max_runs()
    monkeypatch.delenv("ROBUSTKD_MAX_RUNS")
    assert max_runs() == 2


# --------------------------------------------------------------------------- uploads


def _upload(root: Path, *parts: str, age_days: float = 0.0) -> Path:
    folder = root.joinpath("uploads", *parts)
    folder.mkdir(parents=True)
    (folder / "file.bin").write_bytes(b"x")
    when = time.time() - age_days * 86_400
    os.utime(folder, (when, when))
    return folder


def test_uploads_are_cleaned_by_the_documented_rule(root: Path) -> None:
    unused = _upload(root, "0123456789abcdef", age_days=8)
    recent = _upload(root, "1123456789abcdef", age_days=2)
    used_by_run = _upload(root, "data", "2123456789abcdef", age_days=30)
    in_session = _upload(root, "3123456789abcdef", age_days=30)
    old_data = _upload(root, "data", "4123456789abcdef", age_days=30)
    Run.create(root, "compare", {"options": {"test_data": str(used_by_run / "file.bin")}})
    damaged = root / "damaged-run"  # a config too broken to parse still protects its files
    damaged.mkdir()
    (damaged / "config.json").write_text('{"teacher": "' + str(old_data) + "/t.pt")

    removed = clean_uploads(root, keep=[in_session / "file.bin", None])
    assert removed == [unused]
    assert not unused.exists()
    assert all(p.exists() for p in (recent, used_by_run, in_session, old_data))

    assert clean_uploads(root, max_age_days=0) == [recent, in_session]  # 0: every unused one
    assert used_by_run.exists() and old_data.exists()


def test_upload_days_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROBUSTKD_UPLOAD_DAYS", raising=False)
    assert upload_days() == 7
    monkeypatch.setenv("ROBUSTKD_UPLOAD_DAYS", "0.5")
    assert upload_days() == 0.5
    for bad in ("-1", "soon", "inf", "nan"):
        monkeypatch.setenv("ROBUSTKD_UPLOAD_DAYS", bad)
        with pytest.raises(ConfigError, match="ROBUSTKD_UPLOAD_DAYS"):
            upload_days()


def test_saving_an_upload_cleans_old_ones_but_not_the_sessions(root: Path) -> None:
    import streamlit as st

    from app import state

    unused = _upload(root, "5123456789abcdef", age_days=10)
    teacher = _upload(root, "6123456789abcdef", age_days=10)
    st.session_state["teacher_path"] = str(teacher / "file.bin")
    try:
        path = state.save_upload("mine.safetensors", b"new content")
        again = state.save_upload("mine.safetensors", b"new content")
    finally:
        for key in ("teacher_path", "user_data"):
            st.session_state.pop(key, None)
    assert path == again and path.read_bytes() == b"new content"
    assert not unused.exists() and teacher.exists()


def test_cleaning_never_touches_anything_else(root: Path) -> None:
    run = Run.create(root, "compare", {})
    _upload(root, "not-a-digest", age_days=30)
    (root / "uploads" / "stray.txt").write_text("x")
    assert clean_uploads(root, max_age_days=0) == []
    assert run.path.exists() and (root / "uploads" / "not-a-digest").exists()


def test_worker_subprocess_inherits_the_lock(root: Path, stop_workers: Workers) -> None:
    """The lock is the launcher's until the worker exists, then the worker's alone."""
    run = Run.create(root, "compare", {})
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from robustkd.runs.store import Run\n"
        "run = Run(Path(os.environ['ROBUSTKD_RUNS']) / sys.argv[1])\n"
        "with run.worker_lock():\n"
        "    print('lock', 'adopted', flush=True)\n"
        "    __import__('time').sleep(60)\n"
    )
    pid = launch_worker(["-c", code, run.id], run, module=None)
    stop_workers.append(pid)
    assert _wait(lambda: "lock adopted" in run.log_tail(), 60), run.log_tail()
    assert run.worker_busy()
    os.kill(pid, signal.SIGKILL)
    assert _wait(lambda: not run.worker_busy(), 15)
