"""Launching and queueing run workers: ``launch_worker`` starts a detached worker process
for a run and hands it the run's worker lock; the app starts at most ``$ROBUSTKD_MAX_RUNS``
workers per runs folder (default 2, ``max_runs``), the others wait in state ``queued``
(``queue_worker``) and start, oldest first, when a worker ends (the ending worker starts the
next one) or when the app polls after a crash (``start_queued``, under the runs folder's
queue lock)."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from robustkd.errors import ConfigError, RobustKDError
from robustkd.runs.liveness import _CHILDREN, process_start_time, refresh_state
from robustkd.runs.store import (
    _QUEUE_LOCK_FILE,
    ACTIVE_STATES,
    DEFAULT_MAX_RUNS,
    MAX_RUNS_ENV,
    QUEUED_MESSAGE,
    RUNS_ENV,
    WORKER_LOCK_ENV,
    Run,
    _now,
    default_runs_root,
    list_runs,
)

try:  # POSIX only; on Windows the queue goes without a lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


# --------------------------------------------------------------------------- workers


def add_source_path(env: dict[str, str]) -> dict[str, str]:
    """Put this source checkout on ``env``'s PYTHONPATH, so that a child process started
    from another folder imports this very ``robustkd`` (an installed package needs nothing)."""
    source = Path(__file__).resolve().parents[2]
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
    *,
    lock_fd: int | None = None,
) -> int:
    """Start ``python -m <module> *argv`` detached in the background for ``run``; return its pid.

    With ``module=None`` the interpreter gets ``argv`` directly (e.g. ``["-c", code]``). The
    worker's stdout and stderr go to the run's ``log.txt``, stdin is closed, it runs in a new
    session (so it outlives the app), ``$ROBUSTKD_RUNS`` points at the run's root, and its pid
    goes into ``status.json``. The run's worker lock is taken here, before the process exists,
    and handed to it: while a worker of the run lives, a second launch is refused in one
    sentence (``lock_fd``: the lock, already taken by the caller). Starts at once, whatever the
    limit; ``queue_worker`` + ``start_queued`` respect it.
    """
    if lock_fd is not None:
        return _spawn(argv, run, module, cwd, lock_fd)
    fd = run._try_worker_lock()
    if fd is None:
        raise RobustKDError(
            f"Run {run.id!r} already has a worker (a launch or resume that is still going); "
            "wait for it to finish or cancel it first."
        )
    try:
        return _spawn(argv, run, module, cwd, fd)
    finally:
        os.close(fd)  # the worker keeps its own copy of the lock


def _spawn(
    argv: list[str], run: Run, module: str | None, cwd: str | Path | None, lock_fd: int
) -> int:
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
        options["pass_fds"] = (lock_fd,)
        env[WORKER_LOCK_ENV] = f"{lock_fd}:{run.path.resolve()}"
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
    run.update_status(pid=proc.pid, pid_start=process_start_time(proc.pid), argv=args)
    return proc.pid


# --------------------------------------------------------------------------- the queue


def max_runs() -> int:
    """How many workers the app runs at once per runs folder: ``$ROBUSTKD_MAX_RUNS``, else 2."""
    raw = os.environ.get(MAX_RUNS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_RUNS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(
            f"${MAX_RUNS_ENV} must be a whole number of runs, 1 or more (got {raw!r}); fix it "
            f"or unset it for the default of {DEFAULT_MAX_RUNS}."
        )
    return value


@contextlib.contextmanager
def _queue_lock(root: Path) -> Iterator[None]:
    # one scheduling decision at a time per runs folder (two sessions launching together)
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    try:
        fh = open(root / _QUEUE_LOCK_FILE, "a")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise RobustKDError(
            f"Cannot write in the runs folder ({exc.strerror or exc}); make it writable or "
            f"choose another one (${RUNS_ENV})."
        ) from exc
    with fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _waiting(status: Mapping[str, Any]) -> bool:
    """Queued, with a worker command to start and no worker yet."""
    return (
        status.get("state") == "queued"
        and status.get("pid") is None
        and isinstance(status.get("worker"), list)
    )


def queue_worker(run: Run, argv: list[str], module: str | None = "robustkd") -> dict[str, Any]:
    """Put ``run`` in the queue: its worker ``python -m <module> *argv`` starts when a slot is
    free (``start_queued``). For a new run, or a failed or cancelled one to resume."""
    if run.worker_busy():
        raise RobustKDError(
            f"Run {run.id!r} already has a worker (a launch or resume that is still going); "
            "wait for it to finish or cancel it first."
        )
    refresh_state(run)

    def change(status: dict[str, Any]) -> dict[str, Any]:
        state = status.get("state")
        fresh = state == "queued" and status.get("pid") is None and not status.get("worker")
        if not fresh and state not in ("failed", "cancelled"):
            raise ConfigError(
                f"Run {run.id!r} is {state}; only a new, failed or cancelled run can be "
                "queued — wait for it or cancel it first."
            )
        return {
            "state": "queued",
            "pid": None,
            "pid_start": None,
            "worker": [str(a) for a in argv],
            "worker_module": module,
            "queued": _now(),
            "message": QUEUED_MESSAGE,
            "eta_seconds": None,
        }

    return run._modify_status(change)


def _statuses(root: Path) -> list[tuple[Run, dict[str, Any]]]:
    out = []
    for run in list_runs(root):
        with contextlib.suppress(RobustKDError, OSError):
            out.append((run, refresh_state(run)))
    return out


def _in_queue(statuses: list[tuple[Run, dict[str, Any]]]) -> list[tuple[Run, dict[str, Any]]]:
    waiting = [(r, s) for r, s in statuses if _waiting(s)]
    waiting.sort(key=lambda rs: (str(rs[1].get("queued") or rs[1].get("created") or ""), rs[0].id))
    return waiting


def queue_positions(root: str | Path | None = None) -> dict[str, int]:
    """Run id → place in the queue (1 = starts next) for every run waiting for a slot."""
    root = default_runs_root() if root is None else Path(root)
    return {run.id: i for i, (run, _) in enumerate(_in_queue(_statuses(root)), start=1)}


def queue_position(run: Run) -> int | None:
    """The run's place in the queue (1 = starts next), or None when it is not waiting."""
    return queue_positions(run.root).get(run.id)


def start_queued(root: str | Path | None = None) -> list[Run]:
    """Start the oldest waiting runs while fewer than ``max_runs()`` workers live; return them.

    Called by a worker as it ends, and by the app as it polls (after a crash no worker ends
    properly); safe to call from several processes at once.
    """
    root = default_runs_root() if root is None else Path(root)
    if not root.is_dir():
        return []
    limit = max_runs()
    started: list[Run] = []
    with _queue_lock(root):
        statuses = _statuses(root)
        busy = sum(
            1 for _, s in statuses if s.get("state") in ACTIVE_STATES and s.get("pid") is not None
        )
        for run, _ in _in_queue(statuses):
            if busy >= limit:
                break
            fd = run._try_worker_lock()
            if fd is None:  # being launched or cancelled by someone else right now
                continue
            try:
                status = run.status()  # again, now that nobody else can launch it
                if not _waiting(status):
                    continue
                module = status.get("worker_module")
                launch_worker(
                    status["worker"],
                    run,
                    module if isinstance(module, str) else None,
                    lock_fd=fd,
                )
            except RobustKDError:
                continue  # could not start: the run says why (failed)
            finally:
                os.close(fd)
            with contextlib.suppress(RobustKDError, OSError):
                run.update_status(message="")  # no longer waiting: starting
            busy += 1
            started.append(run)
    return started
