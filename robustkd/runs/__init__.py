"""Runs: the run folder on disk, its lock and liveness, the worker queue, and uploads.

``store`` holds the run folder model (the ``Run`` class, its states, file and environment
names, ``RunCancelled``, the JSON file helpers, listing and the teacher check); ``liveness``
whether a run's worker process still lives (``is_alive``, ``refresh_state``); ``progress`` the
training callback ``RunProgress`` and how progress reads (``eta_seconds``,
``progress_fraction``, ``run_label``); ``queue`` launching and queueing workers
(``launch_worker``, ``queue_worker``, ``start_queued``); ``uploads`` the uploaded files kept
per content. The names below are re-exported here; code inside the library imports each from
the module that defines it.
"""

from __future__ import annotations

from robustkd.runs.liveness import is_alive, process_start_time, refresh_state
from robustkd.runs.progress import RunProgress, eta_seconds, progress_fraction, run_label
from robustkd.runs.queue import (
    add_source_path,
    launch_worker,
    max_runs,
    queue_position,
    queue_positions,
    queue_worker,
    start_queued,
)
from robustkd.runs.store import (
    ACTIVE_STATES,
    CANCEL_FILE,
    CANCELLED_MESSAGE,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    DAMAGED,
    DIED_MESSAGE,
    LOG_FILE,
    MAX_RUNS_ENV,
    METRICS_FILE,
    QUEUED_MESSAGE,
    REPORT_FILE,
    RUNS_ENV,
    STATES,
    STATUS_FILE,
    TERMINAL_STATES,
    DamagedRun,
    Run,
    RunCancelled,
    append_jsonl,
    atomic_write_json,
    check_teacher,
    default_runs_root,
    file_sha256,
    list_damaged_runs,
    list_runs,
    read_jsonl,
    validate_name,
)

__all__ = [
    "ACTIVE_STATES",
    "CANCELLED_MESSAGE",
    "CANCEL_FILE",
    "CHECKPOINTS_DIR",
    "CONFIG_FILE",
    "DAMAGED",
    "DIED_MESSAGE",
    "LOG_FILE",
    "MAX_RUNS_ENV",
    "METRICS_FILE",
    "QUEUED_MESSAGE",
    "REPORT_FILE",
    "RUNS_ENV",
    "STATES",
    "STATUS_FILE",
    "TERMINAL_STATES",
    "DamagedRun",
    "Run",
    "RunCancelled",
    "RunProgress",
    "add_source_path",
    "append_jsonl",
    "atomic_write_json",
    "check_teacher",
    "default_runs_root",
    "eta_seconds",
    "file_sha256",
    "is_alive",
    "launch_worker",
    "list_damaged_runs",
    "list_runs",
    "max_runs",
    "process_start_time",
    "progress_fraction",
    "queue_position",
    "queue_positions",
    "queue_worker",
    "read_jsonl",
    "refresh_state",
    "run_label",
    "start_queued",
    "validate_name",
]
