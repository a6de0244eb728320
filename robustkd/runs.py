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

Every file a reader may look at is either replaced atomically (``tempfile`` + ``os.replace``)
or appended line by line, so polling a run while its worker writes is always safe.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from robustkd.errors import ConfigError, RobustKDError

try:  # POSIX only; on Windows status updates go without a lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

RUNS_ENV = "ROBUSTKD_RUNS"
STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE_STATES = ("queued", "running")
TERMINAL_STATES = ("done", "failed", "cancelled")
CANCELLED_MESSAGE = "the run was cancelled"
DIED_MESSAGE = "the worker process stopped unexpectedly (killed or crashed); resume or relaunch it"

CONFIG_FILE = "config.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.json"
LOG_FILE = "log.txt"
CANCEL_FILE = "cancel"
CHECKPOINTS_DIR = "checkpoints"
_LOCK_FILE = ".status.lock"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_KIND_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")

# Workers this process launched, so that ``is_alive`` can reap them (an exited child stays a
# zombie, which ``os.kill(pid, 0)`` still reports as alive, until its parent waits for it).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


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


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` in one step: readers see the old or the new file, never half.

    The text goes to a temporary file in the same folder, is flushed to disk, then renamed over
    ``path``; on any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        _replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """``atomic_write_text`` of ``obj`` as indented JSON."""
    return atomic_write_text(path, _dumps(obj, indent=2) + "\n")


def _replace(src: str, dst: Path) -> None:
    if os.name != "nt":
        os.replace(src, dst)
        return
    for attempt in range(20):  # pragma: no cover - Windows refuses while a reader has dst open
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if attempt == 19:
                raise
            time.sleep(0.025)


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
                f"The status of run {self.id!r} is missing or unreadable; delete its folder "
                f"{self._path} or relaunch the job."
            ) from exc
        if not isinstance(status, dict):
            raise RobustKDError(
                f"The status of run {self.id!r} is not a JSON object; delete its folder "
                f"{self._path} or relaunch the job."
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

    def start(self, epochs: int | None = None, steps: int | None = None) -> dict[str, Any]:
        """Called by the worker as it begins: state ``running`` with this process's pid."""
        return self.update_status(
            state="running",
            pid=os.getpid(),
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
        return self.update_status(eta_seconds=None, finished=_now(), **fields)

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
        """Ask the worker to stop (it checks at every progress event)."""
        atomic_write_text(self._path / CANCEL_FILE, _now() + "\n")

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


# --------------------------------------------------------------------------- liveness


def is_alive(pid: int) -> bool:
    """Whether process ``pid`` is still running on this machine (zombies count as dead)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False  # os.kill(0 or -n, …) would address process groups
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    if os.name == "nt":  # pragma: no cover - os.kill would terminate the process
        return _windows_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc (macOS) or it just went away
    fields = stat.rsplit(")", 1)[-1].split()
    return bool(fields) and fields[0] in ("Z", "X")


def _windows_alive(pid: int) -> bool:  # pragma: no cover - Windows
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return False
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def refresh_state(run: Run) -> dict[str, Any]:
    """The run's status, after marking it ``failed`` if its worker died without saying so."""

    def change(status: dict[str, Any]) -> dict[str, Any] | None:
        pid = status.get("pid")
        if status.get("state") in ACTIVE_STATES and isinstance(pid, int) and not is_alive(pid):
            return {"state": "failed", "message": DIED_MESSAGE, "eta_seconds": None}
        return None

    status = run.status()
    if change(status) is None:
        return status
    # Re-check under the lock: the worker may have finished between the read and the check.
    return run._modify_status(change)


def list_runs(root: str | Path | None = None) -> list[Run]:
    """The runs under ``root`` (default ``default_runs_root()``), newest first.

    Folders without a readable ``status.json`` (junk, half-created, damaged) are skipped.
    """
    root = default_runs_root() if root is None else Path(root)
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    found: list[tuple[str, str, Run]] = []
    for entry in entries:
        if not _NAME_RE.match(entry.name):
            continue
        try:
            # like Run.open: only real folders of this root, no links leading elsewhere
            if not entry.is_dir() or entry.resolve().parent != root.resolve():
                continue
            status = _read_json(entry / STATUS_FILE)
        except (OSError, ValueError):
            continue
        if not isinstance(status, dict) or status.get("state") not in STATES:
            continue
        created = status.get("created")
        found.append((created if isinstance(created, str) else "", entry.name, Run(entry)))
    found.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return [run for _, _, run in found]


# --------------------------------------------------------------------------- progress


def eta_seconds(elapsed: float, done: int, total: int) -> float | None:
    """Seconds left if the remaining ``total - done`` units go at the rate seen so far."""
    try:
        if done <= 0 or total <= 0 or elapsed < 0 or not math.isfinite(elapsed):
            return None
    except TypeError:
        return None
    if done >= total:
        return 0.0
    return elapsed / done * (total - done)


class RunProgress:
    """Progress callback for ``train_model`` that keeps a run's status and metrics current.

    ``step`` events update ``status.json`` at most every ``interval`` seconds; ``epoch``
    events append ``{"phase", "epoch", **metrics}`` to ``metrics.jsonl`` and update the
    status. Raises ``RunCancelled`` once the run's cancel was requested. ``inner`` (a tqdm
    bar's callback, say) receives every event first.
    """

    def __init__(
        self,
        run: Run,
        phase: str = "",
        inner: Callable[[Any], Any] | None = None,
        *,
        interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run = run
        self.phase = phase
        self.inner = inner
        self.interval = interval
        self._clock = clock
        self._started = clock()
        self._last_write = -math.inf
        self._base_units: int | None = None  # units already done when we first heard

    def __call__(self, event: Any) -> None:
        if self.inner is not None:
            self.inner(event)
        kind = getattr(event, "kind", None)
        if kind in ("step", "epoch"):
            now = self._clock()
            if kind == "epoch":
                self._on_epoch(event, now)
            elif now - self._last_write >= self.interval:
                self._write_status(event, now)
        if self.run.cancel_requested():
            raise RunCancelled()

    def _on_epoch(self, event: Any, now: float) -> None:
        metrics = dict(getattr(event, "metrics", None) or {})
        record: dict[str, Any] = {"phase": self.phase, "epoch": event.epoch}
        if not metrics:
            record.update(loss=getattr(event, "loss", None), seconds=getattr(event, "seconds", 0))
        record.update(metrics)
        record.setdefault("time", _now())
        self.run.log_metrics(record)
        self._write_status(event, now)

    def _write_status(self, event: Any, now: float) -> None:
        epoch, epochs = int(event.epoch), int(event.epochs)
        step, steps = int(event.step), int(event.steps)
        done = (epoch - 1) * steps + step
        if self._base_units is None:  # e.g. resumed at a later epoch: time only what we saw
            self._base_units = done - (steps if event.kind == "epoch" else 1)
        eta = eta_seconds(
            now - self._started, done - self._base_units, epochs * steps - self._base_units
        )
        self.run.update_status(
            phase=self.phase,
            epoch=epoch,
            epochs=epochs,
            step=step,
            steps=steps,
            loss=getattr(event, "loss", None),
            eta_seconds=None if eta is None else round(eta, 1),
        )
        self._last_write = now


# --------------------------------------------------------------------------- workers


def add_source_path(env: dict[str, str]) -> dict[str, str]:
    """Put this source checkout on ``env``'s PYTHONPATH, so that a child process started
    from another folder imports this very ``robustkd`` (an installed package needs nothing)."""
    source = Path(__file__).resolve().parent.parent
    if not {"site-packages", "dist-packages"} & set(source.parts):
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(source), env.get("PYTHONPATH", "")) if p
        )
    return env


def launch_worker(
    argv: list[str],
    run: Run,
    module: str | None = "robustkd",
    cwd: str | Path | None = None,
) -> int:
    """Start ``python -m <module> *argv`` detached in the background for ``run``; return its pid.

    With ``module=None`` the interpreter gets ``argv`` directly (e.g. ``["-c", code]``). The
    worker's stdout and stderr go to the run's ``log.txt``, stdin is closed, it runs in a new
    session (so it outlives the app), ``$ROBUSTKD_RUNS`` points at the run's root, and its pid
    goes into ``status.json``.
    """
    args = [str(a) for a in argv]
    cmd = [sys.executable, *(["-m", module] if module else []), *args]
    env = dict(os.environ)
    env[RUNS_ENV] = str(run.root.resolve())
    env["PYTHONUNBUFFERED"] = "1"
    if module and module.split(".")[0] == "robustkd":
        add_source_path(env)
    options: dict[str, Any] = {}
    if os.name == "nt":  # pragma: no cover - Windows
        options["creationflags"] = (
            subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.DETACHED_PROCESS  # type: ignore[attr-defined]
        )
    else:
        options["start_new_session"] = True
    with open(run.log_path, "ab") as log:
        log.write(f"[{_now()}] $ {shlex.join(cmd)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                close_fds=True,
                **options,
            )
        except OSError as exc:
            message = f"could not start the worker ({exc}); check the Python installation"
            run.fail(message)
            raise RobustKDError(f"Run {run.id!r} {message}.") from exc
    _CHILDREN[proc.pid] = proc
    run.update_status(pid=proc.pid, argv=args)
    return proc.pid


def progress_fraction(status: Mapping[str, Any]) -> float:
    """Progress of a run's current phase in [0, 1], from its status (1 when it is over)."""
    if status.get("state") in TERMINAL_STATES:
        return 1.0
    epoch, epochs = status.get("epoch") or 0, status.get("epochs") or 0
    step, steps = status.get("step") or 0, status.get("steps") or 0
    if not epochs:
        return 0.0
    done = max(0, epoch - 1) + (step / steps if steps else 0)
    return max(0.0, min(1.0, done / epochs))
