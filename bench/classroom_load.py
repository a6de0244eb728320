"""A classroom on one server: many students walk the Teach page's lesson at once while a live
run trains, in one Debian Chromium driven by Playwright.

    python -m bench.classroom_load [--sessions 30] [--out runs/bench/classroom_load.json]
    python -m bench.classroom_load --sessions 3 --quick      # a quick check of the script

One ``streamlit run app/main.py`` on the shipped teacher and lesson, with a temporary runs
folder. A first session (the lecturer) opens the Teach page and presses "Run it yourself": one
live ``robustkd compare`` run, shrunk by ``$ROBUSTKD_TEACH_OPTIONS`` (``--run-options``) so that it
still trains while the students work; the lecturer's page stays open, polling its progress. Then
``--sessions`` browser contexts (one per student, started ``--stagger`` seconds apart, driven
concurrently) each open the Teach page, pick their own test image, walk the five steps with
"Next step", then open Teacher, Triggers, Feature variance, Attributions, Detox & distil,
Compare and Teach from the sidebar; on Feature variance each opens the Threshold tab and every
other student moves the threshold slider to its lowest stop.

The server runs with no file watcher, from a copy of the working tree (``--snapshot tree``;
``head``: the last commit; ``none``: in place), so that edits during a long run cannot reach
it. Each page load, step switch and interaction is timed from the click to the script's end
(the app no longer running, nothing stale on the screen, the expected header present).
Errors: a Streamlit exception or a Python traceback on a page or in the server's log, a wait
past ``--timeout``, and any sign that one session's choices reached another (each session must
see its own step, test image and threshold); a student stops at its first error. The server's
peak memory and that of its children (the run worker) are sampled from ``/proc`` (``psutil``
elsewhere). Prints a table last and writes the figures as JSON to ``--out`` (the server's log
beside it); exits 1 if there was any error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustkd.experiments.lesson import STEP_TITLES

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 720}  # a projector
STEPS = list(STEP_TITLES)
STEP_CHARTS = [1, 2, 2, 2, 1]  # Plotly charts each step draws at least
PAGES = [
    "Teacher",
    "Triggers",
    "Feature variance",
    "Attributions",
    "Detox & distil",
    "Compare",
    "Teach",
]
PAGE_TEXT = {"Teacher": "Measured now", "Feature variance": "Per channel, and per position"}
RUN_OPTIONS = {"distill_size": 2000, "epochs": 2}
QUICK_RUN_OPTIONS = {"distill_size": 300, "trusted_size": 100, "test_size": 200, "epochs": 1}
ACTIVE = ("queued", "running")

# Installed in every page before Streamlit's own scripts: notes a full script run (the page's
# title marked stale; a fragment's rerun leaves the title alone). A run the frontend draws in
# one go may show nothing stale: the actions that rely on this have another sign too.
OBSERVER_JS = """
window.__benchFull = false;
new MutationObserver(ms => { for (const m of ms) {
  if (m.target.getAttribute('data-stale') === 'true' && m.target.querySelector('h1'))
    window.__benchFull = true;
}}).observe(document, {subtree: true, attributes: true, attributeFilter: ['data-stale']});
"""
# The script has finished and drawn what the action expects (textContent: no layout forced in
# pages that are still drawing; polled four times a second in every page).
DONE_JS = """([h1, h2, charts, text, mode, before]) => {
  const app = document.querySelector('[data-testid="stApp"]');
  if (!app || app.dataset.testScriptState !== 'notRunning') return false;
  if (document.querySelector('[data-testid="stStatusWidget"], [data-stale="true"]')) return false;
  const has = (sel, want) => [...document.querySelectorAll(sel)]
    .some(e => e.textContent.trim() === want);
  if (h1 && !has('h1', h1)) return false;
  if (h2 && !has('h2', h2)) return false;
  if (mode === 'image') {  // the first chart redrawn for the new image, or gone with an error
    const c = document.querySelector('[data-testid="stPlotlyChart"]');
    if (!window.__benchFull && c !== null && c.textContent === before) return false;
  }
  if (mode === 'threshold' && !window.__benchFull
      && ![...document.querySelectorAll('[data-testid="stCaptionContainer"]')]
        .some(e => e.textContent.includes('Flagged at threshold') && e.textContent !== before))
    return false;
  if (document.querySelector('[data-testid="stException"]')) return true;  // counted as an error
  const drawn = [...document.querySelectorAll('[data-testid="stPlotlyChart"]')]
    .filter(c => c.querySelector('.main-svg')).length;
  if (drawn < charts) return false;
  return !text || document.body.textContent.includes(text);
}"""
# What a stuck page shows, for the error's detail.
STUCK_JS = """() => {
  const app = document.querySelector('[data-testid="stApp"]');
  const heads = [...document.querySelectorAll('h1, h2')].map(e => e.innerText.trim());
  const charts = [...document.querySelectorAll('[data-testid="stPlotlyChart"]')];
  return heads.join(' | ') + ` (script ${app && app.dataset.testScriptState}, `
    + `connection ${app && app.dataset.testConnectionState}, `
    + `${document.querySelectorAll('[data-stale="true"]').length} stale, `
    + `status widget ${!!document.querySelector('[data-testid="stStatusWidget"]')}, `
    + `${charts.filter(c => c.querySelector('.main-svg')).length} of ${charts.length} charts `
    + `drawn, ${document.querySelectorAll('[data-testid="stException"]').length} exceptions)`;
}"""
THRESHOLD_CAPTION = '[data-testid="stCaptionContainer"]'


# --------------------------------------------------------------------------- the server


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.25)
    raise SystemExit(f"the server did not become healthy within {timeout:.0f} s")


SNAPSHOT_PARTS = ("app", "pages", "robustkd", "assets", ".streamlit", "pyproject.toml")


def snapshot(kind: str, dest: Path) -> tuple[Path, str]:
    """The source tree the server runs: ``none`` this checkout in place; ``tree`` a copy of
    its app, pages, library and assets as they are now; ``head`` the last commit's
    (``git archive``). A copy keeps the server's code fixed while the checkout is edited
    during a long run. Returns the folder and a description for the report."""
    if kind == "none":
        return ROOT, "the checkout in place"
    dest.mkdir(parents=True)
    if kind == "head":
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        archive = subprocess.run(
            ["git", "archive", "--format=tar", "HEAD", *SNAPSHOT_PARTS],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return dest, f"the last commit ({commit})"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in SNAPSHOT_PARTS:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dest / part)
    return dest, "a copy of the working tree"


def start_server(
    source: Path,
    runs: Path,
    run_options: dict[str, Any],
    log: Path,
    preload: list[str] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """``streamlit run app/main.py`` from ``source`` on a free port, with no file watcher (a
    classroom's server does not reload code): the shipped teacher, ``runs`` as runs folder,
    ``run_options`` as the Teach page's demo options. Returns the process and its URL."""
    port = _port()
    env = {
        **os.environ,
        "ROBUSTKD_RUNS": str(runs),
        "ROBUSTKD_TEACH_OPTIONS": json.dumps(run_options),
        # this tree's library, before the installed one (the run worker inherits it)
        "PYTHONPATH": os.pathsep.join(p for p in (str(source), os.environ.get("PYTHONPATH")) if p),
    }
    env.pop("ROBUSTKD_TEACHER", None)  # the shipped teacher, which the lesson is built on
    if preload:  # imported as the interpreter starts, before any session
        site = log.parent / "preload"
        site.mkdir(exist_ok=True)
        lines = [f"import {name}  # noqa: F401" for name in preload]
        (site / "sitecustomize.py").write_text("\n".join(lines) + "\n")
        env["PYTHONPATH"] = os.pathsep.join((str(site), env["PYTHONPATH"]))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app/main.py",
             "--server.port", str(port), "--server.address", "127.0.0.1",
             "--server.headless", "true", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none"],
            cwd=source, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url, proc)
    return proc, url


# --------------------------------------------------------------------------- memory and the run


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process in bytes; {} once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return _psutil_rss(pid)
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def _psutil_rss(pid: int) -> dict[str, int]:
    """Where there is no /proc: the resident size psutil reports (the peak is sampled)."""
    try:
        import psutil  # type: ignore[import-untyped]

        rss = int(psutil.Process(pid).memory_info().rss)
    except Exception:  # psutil missing, or the process gone
        return {}
    return {"VmRSS": rss, "VmHWM": rss}


def _parents() -> dict[int, int]:
    """Every process's parent, from /proc (else psutil; {} if neither)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            import psutil  # type: ignore[import-untyped]

            return {p.pid: p.ppid() for p in psutil.process_iter()}
        except Exception:
            return {}
    parents: dict[int, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def _descendants(pid: int, parents: dict[int, int]) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        todo += kids
    return found


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used so far (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


@dataclass
class Sampler:
    """Samples the server's memory, its children's, and the live run's state, once a second."""

    server_pid: int
    t0: float
    source: Path
    run_dir: Path | None = None
    server_peak: int = 0
    server_rss_peak: int = 0
    children: dict[int, dict[str, Any]] = field(default_factory=dict)
    browser_peak: int = 0  # all of the benchmark's own descendants (Chromium, its driver)
    cpu: dict[int, tuple[str, float]] = field(default_factory=dict)  # pid: (role, seconds)
    run_states: list[dict[str, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self.sample()

    def run_status(self) -> dict[str, Any]:
        if self.run_dir is None:
            return {}
        try:
            status = json.loads((self.run_dir / "status.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return status if isinstance(status, dict) else {}

    def sample(self) -> None:
        mem = _proc_status(self.server_pid)
        self.server_peak = max(self.server_peak, mem.get("VmHWM", 0), mem.get("VmRSS", 0))
        self.server_rss_peak = max(self.server_rss_peak, mem.get("VmRSS", 0))
        status = self.run_status()
        worker = status.get("pid")
        parents = _parents()
        served = _descendants(self.server_pid, parents)
        browser = [p for p in _descendants(os.getpid(), parents) if p != self.server_pid]
        browser = [p for p in browser if p not in served]
        self.browser_peak = max(
            self.browser_peak, sum(_proc_status(p).get("VmRSS", 0) for p in browser)
        )
        for pid, role in [(self.server_pid, "server"), *((p, "browser") for p in browser)]:
            if (seconds := _cpu_seconds(pid)) is not None:
                self.cpu[pid] = (role, seconds)
        for pid in {*served, *([worker] if isinstance(worker, int) else [])}:
            mem = _proc_status(pid)
            if not mem:
                continue
            if (seconds := _cpu_seconds(pid)) is not None:
                self.cpu[pid] = ("run worker" if pid == worker else "server", seconds)
            cmd = _cmdline(pid).replace(f"{self.source}{os.sep}", "")
            cmd = cmd.replace(f"{ROOT}{os.sep}", "")[:300]
            row = self.children.setdefault(pid, {"pid": pid, "cmd": cmd, "peak": 0})
            row["peak"] = max(row["peak"], mem.get("VmHWM", 0), mem.get("VmRSS", 0))
            if pid == worker:
                row["role"] = "run worker"
        if status:
            state = {k: status.get(k) for k in ("state", "phase", "epoch", "epochs")}
            if (
                not self.run_states
                or {k: v for k, v in self.run_states[-1].items() if k != "t"} != state
            ):
                self.run_states.append({"t": round(time.perf_counter() - self.t0, 1), **state})

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used, by role, as last sampled."""
        total: dict[str, float] = {}
        for role, seconds in self.cpu.values():
            total[role] = round(total.get(role, 0.0) + seconds, 1)
        return total

    def worker_peak(self) -> int | None:
        rows = [r["peak"] for r in self.children.values() if r.get("role") == "run worker"]
        return max(rows) if rows else None


# --------------------------------------------------------------------------- the sessions


class _StuckError(Exception):
    """A session stops after an error: a page stuck past the timeout, or showing an error."""


@dataclass
class Classroom:
    """What the sessions record: every timed action, every error, the independence checks."""

    url: str
    timeout_s: float
    t0: float
    shots: Path  # where a stuck page's screenshot goes
    actions: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    load_captions: dict[int, str] = field(default_factory=dict)  # threshold caption on arrival
    moved_captions: dict[int, str] = field(default_factory=dict)  # after the move to the lowest

    def error(self, session: int | str, action: str, kind: str, detail: str) -> None:
        self.errors.append(
            {
                "session": session,
                "action": action,
                "kind": kind,
                "detail": detail[:500],
                "t": round(time.perf_counter() - self.t0, 1),
            }
        )


@dataclass
class Session:
    """One browser context: a student (or the lecturer, ``who == "lecturer"``)."""

    room: Classroom
    page: Any
    who: int | str
    loaded: float | None = None  # seconds until the browser had the app's page loaded

    async def goto(self, path: str) -> None:
        """Open a page of the app; notes how long the browser took to load it (HTML and the
        app's JavaScript), before the script's first run is drawn."""
        t = time.perf_counter()
        await self.page.goto(f"{self.room.url}{path}")
        self.loaded = time.perf_counter() - t

    async def act(
        self,
        name: str,
        action: Callable[[], Awaitable[Any]],
        *,
        h1: str | None = None,
        h2: str | None = None,
        charts: int = 0,
        text: str | None = None,
        mode: str = "",
        before: str = "",
    ) -> float:
        """Run ``action``, wait for the script to finish, check the page; return the seconds."""
        page = self.page
        self.loaded = None
        if page.url.startswith("http"):
            await page.evaluate("() => { window.__benchFull = false; }")
        t = time.perf_counter()
        started = t - self.room.t0
        await action()
        try:
            await page.wait_for_function(
                DONE_JS,
                arg=[h1, h2, charts, text, mode, before],
                polling=250,
                timeout=self.room.timeout_s * 1000,
            )
        except Exception as exc:  # Playwright's timeout, or the page gone
            shown = await self._headers()
            with contextlib.suppress(Exception):
                self.room.shots.mkdir(parents=True, exist_ok=True)
                await page.screenshot(path=str(self.room.shots / f"{self.who}.png"))
            kind = "timeout" if "Timeout" in type(exc).__name__ else "browser"
            if h2 and any(s in shown for s in STEPS) and h2 not in shown:
                kind = "independence"  # another step on the screen than the one chosen
            self.room.error(self.who, name, kind, f"{exc.__class__.__name__}; shown: {shown}")
            raise _StuckError from exc
        seconds = time.perf_counter() - t
        if not await self.check(name):
            raise _StuckError  # a student who meets an error stops there
        self.room.actions.append(
            {
                "session": self.who,
                "action": name,
                "seconds": round(seconds, 3),
                "start": round(started, 2),
                **({"loaded_s": round(self.loaded, 3)} if self.loaded is not None else {}),
            }
        )
        return seconds

    async def _headers(self) -> str:
        try:
            return await self.page.evaluate(STUCK_JS)
        except Exception:
            return "(page unreadable)"

    async def check(self, name: str) -> bool:
        """A Streamlit exception or a Python traceback on the page is an error; True if none."""
        page = self.page
        ok = True
        if await page.locator('[data-testid="stException"]').count():
            text = await page.locator('[data-testid="stException"]').first.inner_text()
            self.room.error(self.who, name, "exception", text.strip().splitlines()[0])
            ok = False
        body = await page.inner_text("body")
        if "Traceback" in body:
            at = body.index("Traceback")
            self.room.error(self.who, name, "traceback", body[at : at + 400])
            ok = False
        return ok

    async def close(self) -> None:
        await self.page.context.close()

    async def nav(self, title: str) -> None:
        link = self.page.locator('[data-testid="stSidebarNav"]').get_by_role(
            "link", name=title, exact=True
        )
        await link.click()

    async def chosen_step(self) -> str:
        sel = '[data-testid="stButtonGroup"] [aria-checked="true"]'
        return (await self.page.locator(sel).first.inner_text()).strip()


async def _open(browser: Any, room: Classroom, who: int | str) -> Session:
    context = await browser.new_context(viewport=VIEWPORT)
    await context.add_init_script(OBSERVER_JS)
    page = await context.new_page()
    page.set_default_timeout(room.timeout_s * 1000)
    return Session(room, page, who)


async def lecturer(
    browser: Any, room: Classroom, runs: Path, start_run: bool = True
) -> tuple[Session, Path | None]:
    """Open the Teach page and start the live run with "Run it yourself"."""
    s = await _open(browser, room, "lecturer")
    await s.act(
        "Teach (lecturer)",
        lambda: s.goto("/teach"),
        h1="Teach",
        h2=STEPS[0],
        charts=1,
    )
    if not start_run:
        return s, None
    await s.page.get_by_role("button", name="Run it yourself", exact=True).click()
    # the worker has booted and trains (it shows "queued" until then)
    await s.page.get_by_text(re.compile(r"· running$")).first.wait_for()
    found = [p for p in runs.iterdir() if (p / "status.json").is_file()]
    if len(found) != 1:
        raise SystemExit(f"expected one live run in the runs folder, found {len(found)}")
    return s, found[0]


async def student(browser: Any, room: Classroom, i: int, delay: float) -> None:
    """One student: the lesson's five steps, then every page from the sidebar."""
    await asyncio.sleep(delay)
    s = await _open(browser, room, i)
    page = s.page
    image = str(1 + i)  # a test image of its own
    try:
        await s.act("Teach: open", lambda: s.goto("/teach"), h1="Teach", h2=STEPS[0], charts=1)
        box = page.get_by_label("Test image", exact=True)
        chart = page.locator('[data-testid="stPlotlyChart"]').first
        before = await chart.text_content() or ""

        async def pick() -> None:
            await box.fill(image)
            await box.press("Enter")

        await s.act(
            "Teach: test image",
            pick,
            h1="Teach",
            h2=STEPS[0],
            charts=1,
            mode="image",
            before=before,
        )
        await _own_image(s, image, "Teach: test image")
        for n in range(1, len(STEPS)):
            nxt = page.get_by_role("button", name="Next step", exact=True)
            await s.act(
                f"Teach: step {n + 1}", nxt.click, h1="Teach", h2=STEPS[n], charts=STEP_CHARTS[n]
            )
            if (shown := await s.chosen_step()) != STEPS[n]:
                room.error(i, f"Teach: step {n + 1}", "independence", f"step chosen: {shown}")
            if n == 1:
                await _own_image(s, image, "Teach: step 2")
        for title in PAGES:
            charts = 1 if title == "Teach" else 0
            await s.act(
                title, lambda t=title: s.nav(t), h1=title, charts=charts, text=PAGE_TEXT.get(title)
            )
            if title == "Feature variance":
                await _threshold(s, i)
        # back on the lesson: the step is this session's own (where it left, or the first)
        shown = await s.chosen_step()
        if shown not in (STEPS[0], STEPS[-1]):
            room.error(i, "Teach", "independence", f"step chosen on return: {shown}")
    except _StuckError:
        pass
    except Exception as exc:  # counted, and the other sessions go on
        room.error(i, "session", "browser", f"{exc.__class__.__name__}: {exc}")
    finally:
        await s.close()


async def _own_image(s: Session, image: str, name: str) -> None:
    value = await s.page.get_by_label("Test image", exact=True).input_value()
    if value != image:
        s.room.error(s.who, name, "independence", f"test image {value}, chose {image}")


async def _caption(s: Session) -> str:
    caption = s.page.locator(THRESHOLD_CAPTION).filter(has_text="Flagged at threshold")
    return await caption.first.text_content() or ""


async def _threshold(s: Session, i: int) -> None:
    """Every student opens the Threshold tab; every other one moves the threshold to its
    lowest stop; each checks its own."""
    await s.act(
        "Feature variance: Threshold tab",
        lambda: s.page.get_by_role("tab", name="Threshold").click(),
        h1="Feature variance",
        text="Flagged at threshold",
    )
    arrived = await _caption(s)
    s.room.load_captions[i] = arrived
    if i % 2 == 0:
        return
    thumb = (
        s.page.locator('[data-testid="stSlider"]')
        .filter(has_text="Variance threshold")
        .first.locator('input[type="range"], [role="slider"]')
        .first
    )

    async def lowest() -> None:
        await thumb.focus()
        await thumb.press("Home")

    await s.act(
        "Feature variance: threshold",
        lowest,
        h1="Feature variance",
        mode="threshold",
        before=arrived,
    )
    s.room.moved_captions[i] = await _caption(s)


def independence(room: Classroom) -> list[str]:
    """The threshold each session saw must be its own: the default on arrival for all, the
    lowest stop for those that moved it, whatever the others did meanwhile."""
    problems = []
    if len(set(room.load_captions.values())) > 1:
        problems.append(f"threshold on arrival differs between sessions: {room.load_captions}")
    moved = set(room.moved_captions.values())
    if len(moved) > 1:
        problems.append(f"the lowest threshold differs between sessions: {room.moved_captions}")
    if moved & set(room.load_captions.values()):
        problems.append("a session that moved its threshold still shows the default")
    return problems


# --------------------------------------------------------------------------- figures


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _mib(value: int | None) -> float | None:
    return round(value / 2**20, 1) if value else None


def _seconds(value: float | None) -> str:
    return f"{value:.2f} s" if value is not None else "–"


def _run_words(status: dict[str, Any]) -> str:
    state = status.get("state") or "unknown"
    if state == "running" and status.get("phase"):
        return f"running ({status['phase']}, epoch {status.get('epoch')} / {status.get('epochs')})"
    return str(state)


def _machine() -> dict[str, Any]:
    total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "memory_gib": total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _summary(traceback: str, source: Path) -> str:
    """A traceback in one line: the innermost frame of the project's own code, and the error."""
    lines = traceback.strip().splitlines()
    ours = [
        ln.strip()
        for ln in lines
        if ln.strip().startswith("File ") and "site-packages" not in ln and "<frozen" not in ln
    ]
    where = ours[-1].replace(f"{source}{os.sep}", "") if ours else "?"
    return f"{where}: {lines[-1].strip()}"


def _stop_run(run_dir: Path, status: dict[str, Any]) -> None:
    """Cancel the live run if it still goes (the worker outlives the server by design)."""
    from robustkd.errors import RobustKDError
    from robustkd.runs.liveness import is_alive
    from robustkd.runs.store import Run

    if status.get("state") not in ACTIVE:
        return
    with contextlib.suppress(RobustKDError):
        Run(run_dir).request_cancel()
    pid = status.get("pid")
    deadline = time.time() + 30
    while isinstance(pid, int) and time.time() < deadline and is_alive(pid):
        time.sleep(0.5)
    if isinstance(pid, int) and is_alive(pid, status.get("pid_start")):
        os.kill(pid, signal.SIGTERM)


# --------------------------------------------------------------------------- main


async def _classroom(
    room: Classroom, sampler: Sampler, runs: Path, args: argparse.Namespace
) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    facts: dict[str, Any] = {}
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            teacher, run_dir = await lecturer(browser, room, runs, not args.no_run)
            sampler.run_dir = run_dir
            sampler.sample()
            facts["run_id"] = run_dir.name if run_dir else None
            facts["run_at_start"] = _run_words(sampler.run_status()) if run_dir else "none"
            t = time.perf_counter()
            await asyncio.gather(
                *(student(browser, room, i, i * args.stagger) for i in range(args.sessions))
            )
            facts["students_wall_s"] = round(time.perf_counter() - t, 1)
            await teacher.check("lecturer's page at the end")
            await teacher.close()
        finally:
            await browser.close()
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=30, help="students (browser contexts)")
    parser.add_argument("--quick", action="store_true", help="a tiny live run: checks the script")
    parser.add_argument("--out", default="runs/bench/classroom_load.json", help="JSON to write")
    parser.add_argument("--stagger", type=float, help="seconds between students' starts (2; 1)")
    parser.add_argument("--timeout", type=float, help="seconds one wait may take (300; 180)")
    parser.add_argument("--run-options", help="JSON object of compare options for the live run")
    parser.add_argument(
        "--no-run",
        action="store_true",
        help="the lecturer starts no live run (to compare: the same class without one)",
    )
    parser.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE in the server before any session (to tell a first-import race "
        "from other errors; repeatable)",
    )
    parser.add_argument(
        "--snapshot",
        choices=("tree", "head", "none"),
        default="tree",
        help="run the server from a copy of the working tree (default), of the last commit, "
        "or in place",
    )
    args = parser.parse_args(argv)
    if args.sessions < 1:
        parser.error("--sessions must be at least 1")
    args.stagger = args.stagger if args.stagger is not None else (1.0 if args.quick else 2.0)
    args.timeout = args.timeout or (180.0 if args.quick else 300.0)
    run_options = (
        json.loads(args.run_options)
        if args.run_options
        else (QUICK_RUN_OPTIONS if args.quick else RUN_OPTIONS)
    )
    if not isinstance(run_options, dict):
        parser.error("--run-options must be a JSON object")
    if not Path(CHROMIUM).exists():
        print(f"error: {CHROMIUM} is missing (make browser)", file=sys.stderr)
        return 2

    machine = _machine()
    work = Path(tempfile.mkdtemp(prefix="robustkd-classroom-"))
    source, source_words = snapshot(args.snapshot, work / "src")
    runs, log = work / "runs", work / "streamlit.log"
    runs.mkdir()
    t0 = time.perf_counter()
    server, url = start_server(source, runs, run_options, log, args.preload)
    sampler = Sampler(server.pid, t0, source)
    sampler.start()
    out = Path(args.out)
    room = Classroom(url, args.timeout, t0, out.parent / f"{out.stem}-stuck")
    facts: dict[str, Any] = {}
    try:
        facts = asyncio.run(_classroom(room, sampler, runs, args))
    except _StuckError:
        pass  # the lecturer's page got stuck: recorded as an error
    finally:
        sampler.stop()
        end_status = sampler.run_status()
        if sampler.run_dir is not None:
            from robustkd.errors import RobustKDError
            from robustkd.runs.liveness import refresh_state
            from robustkd.runs.store import Run

            with contextlib.suppress(RobustKDError):
                end_status = refresh_state(Run(sampler.run_dir))
            _stop_run(sampler.run_dir, end_status)
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
    server_log = log.read_text(errors="replace")
    for block in re.findall(r"Traceback[^\n]*\n(?:[ \t][^\n]*\n)*[^\n]*", server_log):
        room.error("server", "server log", "traceback", _summary(block, source))
    for problem in independence(room):
        room.error("all", "Feature variance", "independence", problem)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(log, out.with_suffix(".server.log"))
    shutil.rmtree(work, ignore_errors=True)

    seconds = [a["seconds"] for a in room.actions]
    per_action: dict[str, dict[str, Any]] = {}
    for a in room.actions:
        row = per_action.setdefault(a["action"], {"seconds": [], "loaded": []})
        row["seconds"].append(a["seconds"])
        if "loaded_s" in a:
            row["loaded"].append(a["loaded_s"])
    for row in per_action.values():
        values, loaded = row.pop("seconds"), row.pop("loaded")
        row.update(
            n=len(values),
            p50_s=percentile(values, 50),
            p95_s=percentile(values, 95),
            max_s=max(values),
        )
        if loaded:  # of which the browser loading the page, before the script's first run
            row.update(loaded_p50_s=percentile(loaded, 50), loaded_max_s=max(loaded))
    students = [a for a in room.actions if a["session"] != "lecturer"]
    expected = args.sessions * (3 + (len(STEPS) - 1) + len(PAGES)) + args.sessions // 2
    kinds: dict[str, int] = {}
    for e in room.errors:
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    worker_peak = sampler.worker_peak()
    result = {
        "date": datetime.date.today().isoformat(),
        "command": "python -m bench.classroom_load "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {**machine, "load_average_end": list(os.getloadavg())},
        "sessions": args.sessions,
        "quick": args.quick,
        "stagger_s": args.stagger,
        "timeout_s": args.timeout,
        "run_options": None if args.no_run else run_options,
        "source": source_words,
        "preload": args.preload,
        "page_loads": len(students),
        "page_loads_expected": expected,
        "p50_s": percentile([a["seconds"] for a in students], 50),
        "p95_s": percentile([a["seconds"] for a in students], 95),
        "max_s": max((a["seconds"] for a in students), default=None),
        "all_actions_p50_s": percentile(seconds, 50),
        "errors": len(room.errors),
        "error_kinds": kinds,
        "error_list": room.errors[:50],
        "independence_ok": not any(e["kind"] == "independence" for e in room.errors),
        "server_peak_rss_mib": _mib(sampler.server_peak),
        "server_peak_rss_sampled_mib": _mib(sampler.server_rss_peak),
        "worker_peak_rss_mib": _mib(worker_peak),
        "browser_peak_rss_mib": _mib(sampler.browser_peak),
        "cpu_seconds": sampler.cpu_seconds(),
        "children": [{**r, "peak_mib": _mib(r.pop("peak"))} for r in sampler.children.values()],
        "run": {
            "id": facts.get("run_id"),
            "state_at_students_start": facts.get("run_at_start"),
            "state_at_end": _run_words(end_status) if sampler.run_dir else "no live run",
            "states": sampler.run_states,
        },
        "students_wall_s": facts.get("students_wall_s"),
        "wall_s": round(time.perf_counter() - t0, 1),
        "per_action": per_action,
        "actions": room.actions,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")

    print("| action | n | p50 | p95 | max |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, row in per_action.items():
        print(
            f"| {name} | {row['n']} | {_seconds(row['p50_s'])} | {_seconds(row['p95_s'])} | "
            f"{_seconds(row['max_s'])} |"
        )
    for name, row in per_action.items():
        if "loaded_p50_s" in row:
            print(
                f"{name}: the browser had the page loaded after {_seconds(row['loaded_p50_s'])} "
                f"(p50; max {_seconds(row['loaded_max_s'])}), before the script's first run"
            )
    for e in room.errors[:20]:
        print(f"error: session {e['session']}, {e['action']}: {e['kind']}: {e['detail'][:200]}")
    print()
    worker = f", run worker {_mib(worker_peak):,.0f} MiB" if worker_peak else ""
    print(
        "| sessions | page loads | p50 | p95 | max | errors | server peak memory | "
        "run worker at the end |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    print(
        f"| {args.sessions} | {len(students)} of {expected} | {_seconds(result['p50_s'])} | "
        f"{_seconds(result['p95_s'])} | {_seconds(result['max_s'])} | {len(room.errors)} | "
        f"{_mib(sampler.server_peak) or 0:,.0f} MiB{worker} | {result['run']['state_at_end']} |"
    )
    return 0 if not room.errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
