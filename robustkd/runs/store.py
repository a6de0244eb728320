"""Runs: one job (train a teacher, detoxify, distil, evaluate, compare) in its own folder.

The CLI worker writes a run; the app only reads and polls it (and may drop a ``cancel``
marker). A run folder ``<root>/<id>/`` holds::

    config.json     the job's full configuration, written once at creation
    status.json     state, progress and ETA (rewritten atomically, so readers never see half)
    metrics.jsonl   one JSON object per epoch or event (appended; a partial last line is ignored)
    report.json     the final results
    checkpoints/    model files written by the job
    log.txt         the worker's stdout and stderr
    cancel          present once a cancel was requested; the worker polls for it
    .worker.lock    locked (``flock``) by the run's one worker for its whole life

Every file a reader may look at is either replaced atomically (``robustkd.atomic``)
or appended line by line, so polling a run while its worker writes is always safe.

One worker per run: the launcher takes the run's worker lock before the worker process exists
and hands it over (an inherited descriptor), so a second launch, resume or double click is
refused at once, and the lock goes away with the process however it ends.

This module holds the run folder model: the constants (states, file and environment names),
``RunCancelled``, the JSON file helpers, ``validate_name``, the ``Run`` class, listing
(``list_runs``, ``list_damaged_runs``) and the teacher check. Liveness is in
``robustkd.runs.liveness``, progress in ``robustkd.runs.progress``, and launching and queueing
workers in ``robustkd.runs.queue``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from robustkd.atomic import atomic_write_text
from robustkd.errors import ConfigError, RobustKDError

try:  # POSIX only; on Windows status updates go without a lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

RUNS_ENV = "ROBUSTKD_RUNS"
MAX_RUNS_ENV = "ROBUSTKD_MAX_RUNS"  # workers the app runs at once per runs folder
DEFAULT_MAX_RUNS = 2
# "<fd>:<run folder>": the worker lock a launcher handed to this process (see launch_worker)
WORKER_LOCK_ENV = "ROBUSTKD_WORKER_LOCK"
STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE_STATES = ("queued", "running")
TERMINAL_STATES = ("done", "failed", "cancelled")
CANCELLED_MESSAGE = "the run was cancelled"
DIED_MESSAGE = "the worker process stopped unexpectedly (killed or crashed); resume or relaunch it"
QUEUED_MESSAGE = "waiting for a free worker slot"
DAMAGED = "damaged"  # what listings call a run folder whose files cannot be read

CONFIG_FILE = "config.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.json"
LOG_FILE = "log.txt"
CANCEL_FILE = "cancel"
CHECKPOINTS_DIR = "checkpoints"
_LOCK_FILE = ".status.lock"
_WORKER_LOCK_FILE = ".worker.lock"
_QUEUE_LOCK_FILE = ".queue.lock"  # in the runs root: one scheduling decision at a time

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_KIND_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")

# Worker locks this process holds: run folder → [descriptor, holders] (re-entrant, so that
# ``resume`` can hold the lock and the ``compare`` it runs in-process can take it again).
_HELD: dict[Path, list[int]] = {}


class RunCancelled(RobustKDError):  # noqa: N818 - reads as a state, like "cancelled"
    """Raised inside a worker when the user asked to cancel its run."""

    def __init__(self, message: str = CANCELLED_MESSAGE) -> None:
        super().__init__(message)


# --------------------------------------------------------------------------- file helpers


def default_runs_root() -> Path:
    """Where runs live: ``$ROBUSTKD_RUNS`` if set, else ``./runs``."""
    return Path(os.environ.get(RUNS_ENV) or "runs").expanduser()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _json_default(obj: Any) -> Any:
    # numpy / torch scalars and arrays, paths, sets; anything else as its text, so that a
    # logging detail never kills a long training job.
    for attr in ("item", "tolist"):
        method = getattr(obj, attr, None)
        if callable(method):
            with contextlib.suppress(Exception):
                return method()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    return str(obj)


def _dumps(obj: Any, indent: int | None = None) -> str:
    return json.dumps(obj, indent=indent, default=_json_default)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """``atomic_write_text`` of ``obj`` as indented JSON."""
    return atomic_write_text(path, _dumps(obj, indent=2) + "\n")


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line, flushed to disk.

    If the file ends in a partial line (a writer died mid-line), a newline goes first so that the
    new record stays readable; readers skip the partial line.
    """
    line = _dumps(dict(record)) + "\n"
    with open(path, "a+b") as fh:
        if fh.seek(0, os.SEEK_END) > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                line = "\n" + line
        fh.write(line.encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, skipping lines that are partial or not objects."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(obj, dict):
            records.append(obj)
    return records


def _read_json(path: Path) -> Any:
    """Parsed JSON of ``path``; raises OSError / ValueError when missing or corrupt."""
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- names


def validate_name(name: str, what: str = "run id") -> str:
    """Check a run id or file name: 1–100 letters, digits or ``._-``, not starting with ``.``."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            f"{what} {name!r} is not allowed; use 1 to 100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit."
        )
    return name


def _inside(folder: Path, name: str, what: str) -> Path:
    """``folder / name`` after checking that it resolves to a direct child of ``folder``."""
    validate_name(name, what)
    base = folder.resolve()
    target = (base / name).resolve()
    if target.parent != base:
        raise ConfigError(f"{what} {name!r} points outside {folder} (a link?); pick another name.")
    return folder / name


# --------------------------------------------------------------------------- runs


class Run:
    """One job's folder; see the module docstring for its files."""

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._started = False  # this process is the run's worker (between start and the end)
        self._locked_by_start = False

    def __repr__(self) -> str:
        return f"Run({str(self._path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Run) and other._path.resolve() == self._path.resolve()

    def __hash__(self) -> int:
        return hash(self._path.resolve())

    # ---- creation and lookup

    @classmethod
    def create(
        cls,
        root: str | Path | None,
        kind: str,
        config: Mapping[str, Any],
        run_id: str | None = None,
    ) -> Run:
        """Make a new run folder (state ``queued``) under ``root`` for a job of ``kind``.

        The id is ``YYYYmmdd-HHMMSS-<kind>-<6 hex>`` (UTC) unless ``run_id`` is given.
        """
        if not isinstance(kind, str) or not _KIND_RE.match(kind):
            raise ConfigError(
                f"run kind {kind!r} is not allowed; use up to 40 letters, digits, '_' or '-'."
            )
        if run_id is not None:
            validate_name(run_id)
        root = default_runs_root() if root is None else Path(root)
        try:
            return cls._create(root, kind, config, run_id)
        except OSError as exc:  # unwritable folder, full disk, a file where a folder should be
            raise RobustKDError(
                f"Cannot write a run folder in {root} ({exc.strerror or exc}); choose a writable "
                f"folder with free space (--out, or ${RUNS_ENV})."
            ) from exc

    @classmethod
    def _create(cls, root: Path, kind: str, config: Mapping[str, Any], run_id: str | None) -> Run:
        root.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            name = run_id or (f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{kind}-{secrets.token_hex(3)}")
            path = _inside(root, name, "run id")
            try:
                path.mkdir()
            except FileExistsError:
                if run_id is not None:
                    raise ConfigError(
                        f"A run named {run_id!r} already exists in {root}; pick another id."
                    ) from None
                continue
            break
        else:  # pragma: no cover - ten random collisions in one second
            raise RobustKDError(f"Could not pick a free run id in {root}; try again.")
        run = cls(path)
        (path / CHECKPOINTS_DIR).mkdir()
        (path / LOG_FILE).touch()
        atomic_write_json(path / CONFIG_FILE, dict(config))
        now = _now()
        # status.json comes last: list_runs skips a folder until it exists
        atomic_write_json(
            path / STATUS_FILE,
            {
                "state": "queued",
                "kind": kind,
                "phase": "",
                "created": now,
                "updated": now,
                "pid": None,
                "epoch": None,
                "epochs": None,
                "step": None,
                "steps": None,
                "eta_seconds": None,
                "message": "",
            },
        )
        return run

    @classmethod
    def open(cls, root: str | Path | None, run_id: str) -> Run:
        """The existing run ``run_id`` under ``root``."""
        root = default_runs_root() if root is None else Path(root)
        path = _inside(root, run_id, "run id")
        if not (path / STATUS_FILE).is_file():
            raise RobustKDError(
                f"There is no run {run_id!r} in {root}; "
                "see 'robustkd runs' for the runs that exist."
            )
        return cls(path)

    # ---- basic facts

    @property
    def id(self) -> str:
        return self._path.name

    @property
    def path(self) -> Path:
        return self._path

    @property
    def root(self) -> Path:
        return self._path.parent

    @property
    def log_path(self) -> Path:
        return self._path / LOG_FILE

    @property
    def metrics_path(self) -> Path:
        return self._path / METRICS_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self._path / CHECKPOINTS_DIR

    @cached_property
    def config(self) -> dict[str, Any]:
        """The job's configuration as written at creation."""
        try:
            config = _read_json(self._path / CONFIG_FILE)
        except (OSError, ValueError) as exc:
            raise RobustKDError(
                f"The config of run {self.id!r} is missing or unreadable; relaunch the job."
            ) from exc
        if not isinstance(config, dict):
            raise RobustKDError(f"The config of run {self.id!r} is not a JSON object; relaunch it.")
        return config

    # ---- status

    def status(self) -> dict[str, Any]:
        """The current ``status.json`` (read afresh each call)."""
        try:
            status = _read_json(self._path / STATUS_FILE)
        except (OSError, ValueError) as exc:
            raise RobustKDError(
                f"The status of run {self.id!r} is missing or unreadable; delete the run's "
                "folder or relaunch the job."
            ) from exc
        if not isinstance(status, dict):
            raise RobustKDError(
                f"The status of run {self.id!r} is not a JSON object; delete the run's folder "
                "or relaunch the job."
            )
        return status

    @property
    def state(self) -> str:
        return str(self.status().get("state"))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Serialises read-modify-write of status.json between the worker and the launcher
        # (which records the pid while the worker may already be starting).
        if fcntl is None:  # pragma: no cover - Windows
            yield
            return
        with open(self._path / _LOCK_FILE, "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _modify_status(
        self, change: Callable[[dict[str, Any]], Mapping[str, Any] | None]
    ) -> dict[str, Any]:
        """Apply ``change(status)`` (fields to merge, or None for no change) under the lock."""
        with self._locked():
            status = self.status()
            fields = change(status)
            if fields is None:
                return status
            state = fields.get("state", status.get("state"))
            if state not in STATES:
                raise ValueError(f"unknown run state {state!r}; expected one of {STATES}")
            status.update(fields)
            status["updated"] = _now()
            atomic_write_json(self._path / STATUS_FILE, status)
            return status

    def update_status(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into ``status.json`` (and stamp ``updated``); returns the new status."""
        return self._modify_status(lambda _: fields)

    # ---- the one worker

    def _try_worker_lock(self) -> int | None:
        """A descriptor holding this run's worker lock, or None while another holds it."""
        if fcntl is None:  # pragma: no cover - Windows: no lock, one worker is trusted
            return os.open(os.devnull, os.O_RDONLY)
        fd = os.open(self._path / _WORKER_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd

    def _adopt_inherited_lock(self) -> int | None:
        """The worker lock the launcher handed to this process for this run, if any."""
        held = os.environ.get(WORKER_LOCK_ENV, "")
        fd_text, _, folder = held.partition(":")
        if fcntl is None or not fd_text.isdigit() or Path(folder) != self._path.resolve():
            return None
        fd = int(fd_text)
        try:
            mine, lock = os.fstat(fd), os.stat(self._path / _WORKER_LOCK_FILE)
            if (mine.st_dev, mine.st_ino) != (lock.st_dev, lock.st_ino):
                return None
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already: succeeds at once
        except OSError:
            return None
        del os.environ[WORKER_LOCK_ENV]  # not for this process's own children
        return fd

    def _acquire_worker_lock(self) -> None:
        key = self._path.resolve()
        if key in _HELD:
            _HELD[key][1] += 1
            return
        fd = self._adopt_inherited_lock()
        if fd is None:
            fd = self._try_worker_lock()
        if fd is None:
            raise RobustKDError(
                f"Run {self.id!r} is already being worked on by another process (a launch or "
                "resume that is still going); wait for it to finish or cancel it first."
            )
        _HELD[key] = [fd, 1]

    def _release_worker_lock(self) -> None:
        key = self._path.resolve()
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] <= 0:
            del _HELD[key]
            os.close(held[0])  # the lock goes with the last descriptor of it

    @contextlib.contextmanager
    def worker_lock(self) -> Iterator[None]:
        """Hold this run's worker lock (refused in one sentence while another process has it).

        Re-entrant within a process; a worker started by ``launch_worker`` takes over the lock
        its launcher took for it.
        """
        self._acquire_worker_lock()
        try:
            yield
        finally:
            self._release_worker_lock()

    def worker_busy(self) -> bool:
        """Whether some process (this one included) holds the run's worker lock now."""
        if self._path.resolve() in _HELD:
            return True
        fd = self._try_worker_lock()
        if fd is None:
            return True
        os.close(fd)
        return False

    def start(self, epochs: int | None = None, steps: int | None = None) -> dict[str, Any]:
        """Called by the worker as it begins: state ``running`` with this process's pid.

        Takes the run's worker lock until ``finish``, ``fail`` or ``mark_cancelled`` (refused
        in one sentence while another process works on the run); under torchrun the launching
        process holds it for its ranks.
        """
        from robustkd.runs.liveness import process_start_time
        from robustkd.training import distributed

        if not self._started:
            if not distributed.launched():
                self._acquire_worker_lock()
                self._locked_by_start = True
            self._started = True
        return self.update_status(
            state="running",
            pid=os.getpid(),
            pid_start=process_start_time(os.getpid()),
            started=_now(),
            epochs=epochs,
            steps=steps,
            epoch=None,
            step=None,
            eta_seconds=None,
            message="",
        )

    def _end(self, **fields: Any) -> dict[str, Any]:
        with contextlib.suppress(FileNotFoundError):
            (self._path / CANCEL_FILE).unlink()
        status = self.update_status(eta_seconds=None, finished=_now(), **fields)
        if self._started:  # the worker ends: its slot goes to the queue
            from robustkd.runs.queue import start_queued

            self._started = False
            if self._locked_by_start:
                self._locked_by_start = False
                self._release_worker_lock()
            with contextlib.suppress(RobustKDError, OSError):  # the app's polling retries
                start_queued(self.root)
        return status

    def finish(self, report: Mapping[str, Any]) -> dict[str, Any]:
        """Write ``report.json``, then mark the run ``done``."""
        atomic_write_json(self._path / REPORT_FILE, dict(report))
        return self._end(state="done", message="")

    def fail(self, message: str) -> dict[str, Any]:
        """Mark the run ``failed`` with a one-sentence ``message`` for the user."""
        return self._end(state="failed", message=str(message))

    def mark_cancelled(self) -> dict[str, Any]:
        """Mark the run ``cancelled`` (and consume the cancel request)."""
        return self._end(state="cancelled", message=CANCELLED_MESSAGE)

    # ---- cancelling

    def request_cancel(self) -> None:
        """Ask the worker to stop (it checks at every progress event); a run still waiting
        in the queue, with no worker to ask, is cancelled at once."""
        atomic_write_text(self._path / CANCEL_FILE, _now() + "\n")
        fd = self._try_worker_lock()  # held: a worker exists (or is being launched) and sees it
        if fd is None:
            return
        try:
            status = self.status()
            if status.get("state") == "queued" and status.get("pid") is None:
                self.mark_cancelled()
        finally:
            os.close(fd)

    def cancel_requested(self) -> bool:
        return (self._path / CANCEL_FILE).exists()

    # ---- metrics, report, log, checkpoints

    def log_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one record (an epoch's numbers or an event) to ``metrics.jsonl``."""
        append_jsonl(self.metrics_path, record)

    def metrics(self) -> list[dict[str, Any]]:
        """All complete records of ``metrics.jsonl`` (a partial last line is ignored)."""
        return read_jsonl(self.metrics_path)

    def report(self) -> dict[str, Any] | None:
        """The final results, or None while there are none."""
        path = self._path / REPORT_FILE
        try:
            report = _read_json(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise RobustKDError(
                f"The report of run {self.id!r} is unreadable; relaunch the job to rewrite it."
            ) from exc
        return report if isinstance(report, dict) else None

    def log_tail(self, max_bytes: int = 20_000) -> str:
        """The last ``max_bytes`` of ``log.txt`` (whole lines), or '' without a log."""
        try:
            with open(self.log_path, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - max_bytes))
                data = fh.read()
        except FileNotFoundError:
            return ""
        if size > max_bytes and b"\n" in data:
            data = data.split(b"\n", 1)[1]
        return data.decode("utf-8", errors="replace")

    def checkpoint_path(self, name: str) -> Path:
        """Where the checkpoint file ``name`` of this run lives (``checkpoints/<name>``)."""
        self.checkpoints_dir.mkdir(exist_ok=True)
        return _inside(self.checkpoints_dir, name, "checkpoint name")


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class DamagedRun:
    """A run folder whose status or config cannot be read, and why (for listings)."""

    id: str
    path: Path
    reason: str


def _damage(folder: Path, status: Any) -> str | None:
    """Why a run folder with a ``status.json`` is unusable, or None when it is fine."""
    if isinstance(status, Exception):
        return "its status.json is unreadable or not valid JSON"
    if not isinstance(status, dict):
        return "its status.json is not a JSON object"
    if status.get("state") not in STATES:
        return f"its status.json names no known state ({str(status.get('state'))[:40]!r})"
    try:
        config = _read_json(folder / CONFIG_FILE)
    except (OSError, ValueError):
        return "its config.json is missing, unreadable or not valid JSON"
    if not isinstance(config, dict):
        return "its config.json is not a JSON object"
    return None


def _scan(root: Path) -> tuple[list[Run], list[DamagedRun]]:
    try:
        entries = list(root.iterdir())
    except OSError:
        return [], []
    found: list[tuple[str, str, Run]] = []
    damaged: list[DamagedRun] = []
    for entry in entries:
        if not _NAME_RE.match(entry.name):
            continue
        try:
            # like Run.open: only real folders of this root, no links leading elsewhere
            if not entry.is_dir() or entry.resolve().parent != root.resolve():
                continue
            if not (entry / STATUS_FILE).is_file():
                continue  # junk, the uploads folder, or a run still being created
            status: Any = _read_json(entry / STATUS_FILE)
        except (OSError, ValueError) as exc:
            status = exc
        reason = _damage(entry, status)
        if reason is not None:
            damaged.append(DamagedRun(entry.name, entry, reason))
            continue
        created = status.get("created")
        found.append((created if isinstance(created, str) else "", entry.name, Run(entry)))
    found.sort(key=lambda item: (item[0], item[1]), reverse=True)
    damaged.sort(key=lambda d: d.id, reverse=True)
    return [run for _, _, run in found], damaged


def list_runs(root: str | Path | None = None) -> list[Run]:
    """The runs under ``root`` (default ``default_runs_root()``), newest first.

    Folders without a ``status.json`` (junk, half-created) are skipped; those whose status or
    config cannot be read are left out here and listed by ``list_damaged_runs``.
    """
    return _scan(default_runs_root() if root is None else Path(root))[0]


def list_damaged_runs(root: str | Path | None = None) -> list[DamagedRun]:
    """Run folders under ``root`` with a ``status.json`` or ``config.json`` that cannot be
    read (corrupt, not an object, an unknown state), each with the reason in words."""
    return _scan(default_runs_root() if root is None else Path(root))[1]


# --------------------------------------------------------------------------- the teacher


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_teacher(run: Run, teacher: str | Path) -> bool:
    """Refuse (one sentence) a teacher file other than the one ``run`` started with.

    Returns False when the run recorded no hash (made by an older version): nothing to check.
    """
    recorded = run.config.get("teacher_sha256")
    if not isinstance(recorded, str) or not recorded:
        return False
    path = Path(teacher)
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise RobustKDError(
            f"The teacher file {path.name} that run {run.id!r} started with is missing or "
            "unreadable; restore it, or start a new run."
        ) from exc
    if actual != recorded:
        raise ConfigError(
            f"The teacher file {path.name} has changed since run {run.id!r} started (its "
            "SHA-256 differs from the one recorded); continuing would mix two teachers in one "
            "report — restore the original file, or start a new run."
        )
    return True
