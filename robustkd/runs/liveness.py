"""Process liveness of run workers: ``process_start_time``, ``is_alive`` (with the zombie and
Windows checks it needs), ``refresh_state``, which marks a run ``failed`` when its worker died
without saying so, and ``_CHILDREN``, the workers this process launched, which ``is_alive``
reaps."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from robustkd.runs.store import ACTIVE_STATES, DIED_MESSAGE, Run

# Workers this process launched, so that ``is_alive`` can reap them (an exited child stays a
# zombie, which ``os.kill(pid, 0)`` still reports as alive, until its parent waits for it).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def process_start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22);
    None where there is no ``/proc`` (macOS, Windows) or no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the name in parentheses may hold spaces
    try:
        return int(fields[19])  # fields[0] is field 3 (the state)
    except (IndexError, ValueError):
        return None


def is_alive(pid: int, started: int | None = None) -> bool:
    """Whether process ``pid`` is still running on this machine (zombies count as dead).

    With ``started`` (``process_start_time`` recorded when the worker began), a process that
    merely reuses the pid after the worker died counts as dead too; where start times are
    unknown, only the pid is checked.
    """
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False  # os.kill(0 or -n, …) would address process groups
    child = _CHILDREN.get(pid)
    if child is not None:  # our own unreaped child: its pid cannot have been reused
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    if isinstance(started, int) and not isinstance(started, bool):
        now = process_start_time(pid)
        if now is not None and now != started:
            return False  # the pid belongs to another process now
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
        pid, started = status.get("pid"), status.get("pid_start")
        if (
            status.get("state") in ACTIVE_STATES
            and isinstance(pid, int)
            and not is_alive(pid, started if isinstance(started, int) else None)
        ):
            return {"state": "failed", "message": DIED_MESSAGE, "eta_seconds": None}
        return None

    status = run.status()
    if change(status) is None:
        return status
    # Re-check under the lock: the worker may have finished between the read and the check.
    return run._modify_status(change)
