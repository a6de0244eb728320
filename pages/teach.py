"""Teach page: one click shows that plain KD passes the teacher's backdoor to the student and
that RobustKD does not, with the numbers measured in that very run.

The demo is ``robustkd compare --methods feature-kd,robustkd --preset fashion-badnets-quick``
on the shipped teacher, started in the background; reopening the page shows the newest demo
run. ``$ROBUSTKD_TEACH_OPTIONS`` may hold a JSON object of extra ``compare`` options (CLI
names with ``_``, e.g. ``{"distill_size": 300, "epochs": 1}``) — tests use it for tiny runs.
"""

from __future__ import annotations

import json
import os
import shlex
from typing import Any

import streamlit as st

from app.charts import show_chart
from app.state import default_teacher_path, runs_root, show_error
from robustkd.errors import ConfigError, RobustKDError, redact_paths
from robustkd.experiments.compare import launch_compare
from robustkd.runs.liveness import refresh_state
from robustkd.runs.queue import queue_position, start_queued
from robustkd.runs.store import ACTIVE_STATES, Run, list_runs
from robustkd.viz.figures import acc_asr_bars, training_curves

DEMO_PRESET = "fashion-badnets-quick"
DEMO_METHODS = ["feature-kd", "robustkd"]
OPTIONS_ENV = "ROBUSTKD_TEACH_OPTIONS"
RUN_KEY = "teach_run"


def demo_options() -> dict[str, Any]:
    """The demo's ``compare`` options: preset, shipped teacher, ``$ROBUSTKD_TEACH_OPTIONS``."""
    options: dict[str, Any] = {"preset": DEMO_PRESET, "teacher": str(default_teacher_path())}
    raw = os.environ.get(OPTIONS_ENV)
    if raw:
        try:
            extra = json.loads(raw)
        except json.JSONDecodeError:
            extra = None
        if not isinstance(extra, dict):
            raise ConfigError(
                f"${OPTIONS_ENV} must hold a JSON object of compare options, such as "
                '{"epochs": 1}; fix or unset it.'
            )
        options.update(extra)
    return options


def is_demo(run: Run) -> bool:
    try:
        config = run.config
    except RobustKDError:
        return False
    options = config.get("options")
    return (
        isinstance(options, dict)
        and options.get("preset") == DEMO_PRESET
        and config.get("methods") == DEMO_METHODS
    )


def current_demo() -> Run | None:
    """This session's demo run, else the newest demo run in the runs folder."""
    run_id = st.session_state.get(RUN_KEY)
    if run_id:
        try:
            return Run.open(runs_root(), run_id)
        except RobustKDError:
            st.session_state.pop(RUN_KEY, None)
    return next((r for r in list_runs(runs_root()) if is_demo(r)), None)


def progress_of(status: dict[str, Any], methods: list[str]) -> float:
    """Share of the whole demo done: methods one after the other, epochs and steps within."""
    if status.get("state") == "done":
        return 1.0
    phase, epoch, epochs = status.get("phase"), status.get("epoch"), status.get("epochs")
    if phase not in methods or not epoch or not epochs:
        return 0.0
    steps, step = status.get("steps") or 1, status.get("step") or 0
    within = (epoch - 1 + min(step, steps) / steps) / epochs
    return max(0.0, min(1.0, (methods.index(phase) + within) / len(methods)))


def _pct(value: float | None) -> str:
    return f"{100 * value:.1f} %" if value is not None else "n/a"


def story(report: dict[str, Any]) -> list[str]:
    """Three sentences with the numbers measured in the run (worded by what they show)."""
    t, kd, rk = report["teacher"], report["methods"]["feature-kd"], report["methods"]["robustkd"]
    t_asr, kd_asr, rk_asr = t.get("asr") or 0.0, kd.get("asr") or 0.0, rk.get("asr") or 0.0
    backdoored = "is backdoored" if t_asr >= 0.5 else "carries only a weak backdoor"
    if kd_asr >= 0.5:
        inherits = "inherits it"
    elif kd_asr >= 0.2:
        inherits = "partly inherits it"
    else:
        inherits = "does not inherit it in this run"
    if rk_asr < 0.1:
        robust = "does not"
    elif rk_asr <= kd_asr / 2:
        robust = "inherits far less of it"
    else:
        robust = "does not remove it in this run"
    return [
        f"1 · The teacher {backdoored}: ACC {_pct(t['acc'])}, ASR {_pct(t.get('asr'))}.",
        f"2 · Plain KD (feature-kd) {inherits}: ASR {_pct(kd.get('asr'))}.",
        f"3 · RobustKD {robust}: ASR {_pct(rk.get('asr'))} at ACC {_pct(rk['acc'])}.",
    ]


def live_curves(run: Run) -> dict[str, Any]:
    """The epochs logged so far, per method, shaped as a report's ``methods`` for the figures."""
    methods: dict[str, Any] = {}
    for record in run.metrics():
        if record.get("phase") and record.get("epoch") is not None:
            methods.setdefault(record["phase"], {"history": []})["history"].append(record)
    return {"methods": methods}


def panel(run_id: str, was_active: bool) -> None:
    try:
        run = Run.open(runs_root(), run_id)
        if was_active:  # a worker that crashed frees its slot: start what waits
            start_queued(runs_root())
        status = refresh_state(run)
        state = status.get("state")
        report = run.report() if state == "done" else None
    except RobustKDError as exc:
        show_error(exc)
        return
    if was_active and state not in ACTIVE_STATES:
        st.rerun(scope="app")  # finished: redraw the whole page once and stop polling
    st.caption(f"Run `{run.id}` · {state}")
    methods = list(run.config.get("methods") or DEMO_METHODS)
    if state in ACTIVE_STATES:
        phase = status.get("phase") or ""
        position = queue_position(run) if state == "queued" else None
        if phase and status.get("epoch"):
            eta = status.get("eta_seconds")
            text = f"{phase}: epoch {status['epoch']} / {status.get('epochs')}"
            text += f" · about {eta:.0f} s left in this method" if eta is not None else ""
        elif position:
            text = f"queued (position {position}): starts when a run going now ends …"
        else:
            text = "Preparing the data and the teacher …"
        st.progress(progress_of(status, methods), text=text)
        if st.button("Cancel", key="teach_cancel"):
            run.request_cancel()
            st.info("Cancelling — the worker stops at its next step.")
        curves = live_curves(run)
        if curves["methods"]:
            left, right = st.columns(2)
            show_chart(training_curves(curves, "test_asr"), "teach_live_asr", left)
            show_chart(training_curves(curves, "test_acc"), "teach_live_acc", right)
    elif state == "failed":
        st.error(f"The demo failed: {redact_paths(status.get('message') or 'see the run log')}")
    elif state == "cancelled":
        st.warning("The demo was cancelled; run it again to see the result.")
    elif report and all(m in report.get("methods", {}) for m in DEMO_METHODS):
        for line in story(report):
            st.caption(line)
        show_chart(acc_asr_bars(report), "teach_bars")
    else:
        st.info("The run finished without a complete report; run the demo again.")


st.title("Teach")
st.markdown(
    "A public teacher may carry a backdoor. This demo distils the shipped backdoored teacher "
    "into a small student twice — with plain feature KD and with RobustKD — and measures clean "
    "accuracy (ACC) and attack success rate (ASR) of each."
)
demo = current_demo()
try:
    active = demo is not None and refresh_state(demo).get("state") in ACTIVE_STATES
except RobustKDError:
    active = False
if st.button("Run the demo", key="teach_start", type="primary", disabled=active):
    try:
        teacher = default_teacher_path()
        if not teacher.is_file():
            raise RobustKDError(
                f"The shipped teacher {teacher} is missing; rebuild it with 'make teacher'."
            )
        demo = launch_compare(DEMO_METHODS, demo_options(), root=runs_root())
    except RobustKDError as exc:
        show_error(exc)
    else:
        st.session_state[RUN_KEY] = demo.id
        st.rerun()
if demo is None:
    st.caption(f"Runs `robustkd compare` with the {DEMO_PRESET} preset on the shipped teacher.")
    st.stop()
st.caption(f"`robustkd {redact_paths(shlex.join(str(a) for a in demo.config.get('argv', [])))}`")
st.fragment(run_every=2 if active else None)(panel)(demo.id, active)
