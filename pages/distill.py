"""Detox & distil page: launch a background comparison run, watch it live, cancel it."""

from __future__ import annotations

from typing import Any

import streamlit as st

from app.state import (
    DATA_ROLES,
    current_teacher,
    runs_root,
    show_error,
    teacher_options,
    teacher_path,
    user_data,
)
from robustkd import distributed
from robustkd.compare import launch_compare, report_markdown
from robustkd.device import resolve_device
from robustkd.distill import METHODS
from robustkd.engine import COMPILE_MODES
from robustkd.errors import ConfigError, RobustKDError
from robustkd.figures import run_curves
from robustkd.models import model_names
from robustkd.presets import preset_names
from robustkd.runs import (
    ACTIVE_STATES,
    Run,
    launch_worker,
    list_runs,
    progress_fraction,
    refresh_state,
)
from robustkd.scenarios import SCENARIOS

# the teacher's model options under their command-line names (``--arch`` for architecture)
OPTION_FLAGS = {"architecture": "arch"}


def teacher_flags(options: dict[str, Any]) -> dict[str, Any]:
    """The current teacher's model options as ``compare`` options (tuples comma-joined)."""
    flags: dict[str, Any] = {}
    for key, value in options.items():
        if value is None or (key == "layout" and value == "auto"):
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        flags[OPTION_FLAGS.get(key, key)] = value
    return flags


def check_scenario(scenario: str, trigger_known: bool, own_distill: bool) -> None:
    """Refuse at once what the run would refuse after starting."""
    if scenario in ("untrusted", "teacher-train") and not trigger_known:
        raise ConfigError(
            f"Scenario {scenario!r} plants the teacher's trigger, and this teacher records "
            "none; choose 'as-is' (your data as given) or 'clean'."
        )
    if scenario == "teacher-train" and own_distill:
        raise ConfigError(
            "Scenario 'teacher-train' rebuilds the teacher's own training set and ignores your "
            "distillation set; choose 'as-is' to distil on your data."
        )


st.title("Detox & distil")
try:
    teacher, meta = current_teacher()
except RobustKDError as exc:
    show_error(exc)
    st.stop()

data_paths = {role: path for role, path in user_data().items() if path}
trigger_known = bool(meta.get("trigger")) and meta.get("target") is not None
# outside the form, so that the triggered fraction follows the choice at once
default_scenario = "as-is" if "distill" in data_paths or not trigger_known else "untrusted"
scenario = st.selectbox(
    "Scenario",
    SCENARIOS,
    index=SCENARIOS.index(default_scenario),
    help="as-is: the distillation data exactly as given, poisoned or not, trigger unknown; "
    "untrusted, teacher-train and clean simulate an attack with the teacher's trigger.",
)
if not trigger_known:
    st.info(
        "This teacher records no trigger, so ASR will be reported as unknown; the screening "
        "still ranks the most suspicious distillation samples."
    )
if data_paths:
    st.caption(
        "Your data: "
        + ", ".join(DATA_ROLES[r] for r in DATA_ROLES if r in data_paths)
        + " (used exactly as given; the sizes below apply only to sets drawn from the "
        "teacher's data set)."
    )

with st.form("launch"):
    st.markdown(f"Teacher: `{teacher_path().name}` ({meta.get('architecture')})")
    left, right = st.columns(2)
    presets = preset_names()
    preset = left.selectbox("Preset", presets, index=presets.index("fashion-badnets-quick"))
    students = model_names()
    default_student = meta.get("student_architecture") or "small-cnn-student"
    student = right.selectbox(
        "Student",
        students,
        index=students.index(default_student) if default_student in students else 0,
    )
    methods = st.multiselect("Methods", METHODS.names(), default=["feature-kd", "robustkd"])
    c1, c2, c3, c4 = st.columns(4)
    epochs = c1.number_input("Epochs", 1, 200, 6)
    rate = c2.number_input(
        "Triggered fraction",
        0.0,
        1.0,
        0.1,
        step=0.01,
        format="%.2f",
        disabled=scenario != "untrusted",
        help="Only the untrusted scenario plants the trigger in this share of the images.",
    )
    distill_size = c3.number_input(
        "Distillation images", 100, 55000, 10000, step=500, disabled="distill" in data_paths
    )
    trusted_size = c4.number_input(
        "Trusted clean images", 10, 5000, 1000, step=100, disabled="trusted" in data_paths
    )
    c1, c2, c3, c4 = st.columns(4)
    threshold = c1.number_input("Variance threshold (0 = auto)", 0.0, 1000.0, 0.0, step=0.5)
    tau = c2.number_input("τ (learned mask)", 0.001, 1.0, 0.05, step=0.01, format="%.3f")
    noise = c3.number_input("Input noise rate", 0.0, 1.0, 0.0, step=0.05)
    seed = c4.number_input("Seed", 0, 1_000_000, 0)
    devices = ["auto", "cpu"] + (["cuda"] if resolve_device("auto").type == "cuda" else [])
    gpus = distributed.gpu_count()
    c1, c2, c3 = st.columns(3)
    device = c1.selectbox("Device", devices)
    nproc = 1
    if gpus > 1:  # data-parallel training, one process per GPU (torchrun underneath)
        nproc = c2.number_input(
            "GPUs", 1, gpus, gpus, help="Data-parallel processes, one per GPU (not on the CPU)."
        )
    compile_mode = "off"
    if gpus > 0:
        compile_mode = c3.selectbox(
            "torch.compile",
            COMPILE_MODES,
            help="Compile the training steps (reduce-overhead adds CUDA graphs); the first "
            "epoch is slower, later ones faster; falls back to eager if compiling fails.",
        )
    launched = st.form_submit_button("Launch", type="primary")

if launched:
    if not methods:
        st.error("Pick at least one method to run.")
    else:
        options = {
            "teacher": str(teacher_path()), "preset": preset, "scenario": scenario,
            "student": student, "epochs": int(epochs),
            "rate": rate if scenario == "untrusted" else None,
            "distill_size": int(distill_size), "trusted_size": int(trusted_size),
            "threshold": threshold or None, "tau": tau, "noise_rate": noise or None,
            "seed": int(seed), "device": device,
            "nproc": int(nproc) if int(nproc) > 1 and device != "cpu" else None,
            "compile": None if compile_mode == "off" else compile_mode,
            **teacher_flags(teacher_options()),
            **{f"{role}_data": path for role, path in data_paths.items()},
        }  # fmt: skip
        try:
            check_scenario(scenario, trigger_known, "distill" in data_paths)
            run = launch_compare(methods, options, runs_root())
            st.session_state["watch_run"] = run.id
            st.success(f"Started run {run.id}; it keeps going if you close the browser.")
        except RobustKDError as exc:
            show_error(exc)

runs = list_runs(runs_root())
if not runs:
    st.info("No runs yet: launch one above.")
    st.stop()
ids = [r.id for r in runs]
watch = st.session_state.get("watch_run")
watched_id = st.selectbox("Watch run", ids, index=ids.index(watch) if watch in ids else 0)
st.session_state["watch_run"] = watched_id


def live_panel(run_id: str, was_active: bool) -> None:
    run = Run.open(runs_root(), run_id)
    status = refresh_state(run)
    state = status.get("state")
    if was_active and state not in ACTIVE_STATES:
        st.rerun()  # the run just ended: redraw the page once, then stop polling
    label = f"{state} · {status.get('phase') or ''} · epoch {status.get('epoch') or 0}"
    label += f"/{status.get('epochs') or '?'}"
    if status.get("eta_seconds") is not None and state == "running":
        label += f" · about {status['eta_seconds']:.0f} s left"
    st.progress(progress_fraction(status), text=label)
    if state in ("queued", "running") and st.button("Cancel", key=f"cancel-{run_id}"):
        run.request_cancel()
        st.warning("Cancel requested; the run stops after its current step.")
    if state == "failed":
        st.error(f"The run failed: {status.get('message')}")
        with st.expander("Log"):
            st.code(run.log_tail(4000) or "(empty)")
    if state == "cancelled":
        st.warning("The run was cancelled; the methods it finished are kept below.")
    if state in ("failed", "cancelled") and st.button("Resume", key=f"resume-{run_id}"):
        launch_worker(["resume", run_id, "--quiet"], run)
        st.success("Resuming: finished methods are kept, the interrupted one continues.")
        st.rerun()
    records = run.metrics()
    if records:
        st.plotly_chart(run_curves(records), key=f"curves-{run_id}")
    report = run.report()
    if report and report.get("methods"):
        st.markdown(report_markdown(report))


# Poll every 2 s while the run is going; a finished run is drawn once and left alone.
active = refresh_state(Run.open(runs_root(), watched_id)).get("state") in ACTIVE_STATES
st.fragment(live_panel, run_every=2 if active else None)(watched_id, active)

st.subheader("All runs")
st.dataframe(
    [
        {"run": r.id, "state": refresh_state(r).get("state"), "phase": r.status().get("phase")}
        for r in runs
    ],
    hide_index=True,
)
