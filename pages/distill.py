"""Detox & distil page: launch a background comparison run, watch it live, cancel it."""

from __future__ import annotations

from typing import Any

import streamlit as st

from app.charts import show_chart
from app.state import (
    DATA_ROLES,
    current_teacher,
    runs_root,
    show_error,
    teacher_options,
    teacher_path,
    user_data,
)
from robustkd.defenses import METHODS, method_names
from robustkd.errors import ConfigError, RobustKDError, redact_paths
from robustkd.experiments.compare import launch_compare, report_markdown
from robustkd.experiments.presets import preset_names
from robustkd.models import model_names
from robustkd.runs.liveness import refresh_state
from robustkd.runs.progress import progress_fraction, run_label
from robustkd.runs.queue import queue_position, queue_positions, queue_worker, start_queued
from robustkd.runs.store import (
    ACTIVE_STATES,
    DAMAGED,
    Run,
    check_teacher,
    list_damaged_runs,
    list_runs,
)
from robustkd.training import distributed
from robustkd.training.config import COMPILE_MODES
from robustkd.training.device import resolve_device
from robustkd.training.distill import DistillConfig
from robustkd.training.scenarios import SCENARIOS
from robustkd.viz.figures import run_curves

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


def resume(run: Run) -> None:
    """Queue the run's resume (it starts when a worker slot is free), after checking that its
    teacher file is still the one it started with."""
    options = run.config.get("options")
    teacher = options.get("teacher") if isinstance(options, dict) else run.config.get("teacher")
    if isinstance(teacher, str) and teacher:
        check_teacher(run, teacher)
    queue_worker(run, ["resume", run.id, "--quiet"])
    start_queued(run.root)


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
    methods = st.multiselect(
        "Methods",
        method_names(),
        default=["feature-kd", "robustkd"],
        help="  \n".join(f"**{m}**: {METHODS.get(m).description}" for m in method_names()),
    )
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
    noise = c3.number_input(
        "Input noise rate",
        0.0,
        1.0,
        value=None,
        step=0.05,
        placeholder="method default",
        help="Salt-and-pepper on the student's input; empty: the method's own (robustkd-paper "
        "0.1, the others 0).",
    )
    seed = c4.number_input("Seed", 0, 1_000_000, 0)
    label_screen = st.checkbox(
        "RobustKD also screens with the labels",
        value=True,
        help="Labelled distillation data only: samples whose label the teacher disputes, "
        "samples that deviate within their own class, and samples that deviate from their "
        "class the way the disputed ones do, get cross-entropy only too. Catches an adaptive "
        "trigger whose features stay inside the clean range of all images, or of each class.",
    )
    reverse_share = st.number_input(
        "robustkd-reverse: share of each batch stamped",
        0.0,
        1.0,
        DistillConfig().reverse_share,
        step=0.05,
        format="%.2f",
        help="robustkd-reverse learns one trigger per class from the teacher on the trusted "
        "images; this share of each batch reaches the student stamped with one of them, "
        "taught to answer it as the teacher answers the clean image. More costs clean "
        "accuracy; less leaves more of a backdoor that reaches the student through clean data.",
    )
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
            "threshold": threshold or None, "tau": tau, "noise_rate": noise,
            "seed": int(seed), "device": device, "no_label_screen": not label_screen,
            "reverse_share": reverse_share if "robustkd-reverse" in methods else None,
            "nproc": int(nproc) if int(nproc) > 1 and device != "cpu" else None,
            "compile": None if compile_mode == "off" else compile_mode,
            **teacher_flags(teacher_options()),
            **{f"{role}_data": path for role, path in data_paths.items()},
        }  # fmt: skip
        try:
            check_scenario(scenario, trigger_known, "distill" in data_paths)
            run = launch_compare(methods, options, runs_root())
            st.session_state["watch_run"] = run.id
            position = queue_position(run)
            if position:
                st.success(
                    f"Queued run {run.id} (position {position}): it starts when one of the "
                    "runs going now ends, even if you close the browser."
                )
            else:
                st.success(f"Started run {run.id}; it keeps going if you close the browser.")
        except RobustKDError as exc:
            show_error(exc)

try:  # a worker that crashed frees its slot: start what waits (a worker that ends does it too)
    start_queued(runs_root())
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
    try:
        run = Run.open(runs_root(), run_id)
        if was_active:
            start_queued(runs_root())
        status = refresh_state(run)
        position = queue_position(run) if status.get("state") == "queued" else None
    except RobustKDError as exc:  # damaged meanwhile, or a bad $ROBUSTKD_MAX_RUNS
        show_error(exc)
        return
    state = status.get("state")
    if was_active and state not in ACTIVE_STATES:
        st.rerun()  # the run just ended: redraw the page once, then stop polling
    label = f"{run_label(status, position)} · {status.get('phase') or ''}"
    label += f" · epoch {status.get('epoch') or 0}"
    label += f"/{status.get('epochs') or '?'}"
    if status.get("eta_seconds") is not None and state == "running":
        label += f" · about {status['eta_seconds']:.0f} s left"
    st.progress(progress_fraction(status), text=label)
    if state in ("queued", "running") and st.button("Cancel", key=f"cancel-{run_id}"):
        run.request_cancel()
        st.warning("Cancel requested; the run stops after its current step.")
    if state == "failed":
        st.error(f"The run failed: {redact_paths(status.get('message') or '')}")
        with st.expander("Log"):
            st.code(redact_paths(run.log_tail(4000)) or "(empty)")
    if state == "cancelled":
        st.warning("The run was cancelled; the methods it finished are kept below.")
    if state in ("failed", "cancelled") and st.button("Resume", key=f"resume-{run_id}"):
        try:
            resume(run)
        except RobustKDError as exc:  # e.g. the teacher file changed, or a second click
            show_error(exc)
        else:
            st.rerun()  # finished methods are kept, the interrupted one continues
    records = run.metrics()
    if records:
        show_chart(run_curves(records), f"curves-{run_id}")
    report = run.report()
    if report and report.get("methods"):
        st.markdown(redact_paths(report_markdown(report)))  # older reports held paths


# Poll every 2 s while the run is going; a finished run is drawn once and left alone.
try:
    active = refresh_state(Run.open(runs_root(), watched_id)).get("state") in ACTIVE_STATES
except RobustKDError:
    active = False  # damaged meanwhile: the panel says so
st.fragment(live_panel, run_every=2 if active else None)(watched_id, active)


def run_rows() -> list[dict[str, Any]]:
    """Every run with its state (queue position, reason of damage), damaged folders too."""
    positions = queue_positions(runs_root())
    rows = []
    for r in runs:
        try:
            status = refresh_state(r)
        except RobustKDError as exc:
            status = {"state": DAMAGED, "message": str(exc)}
        note = status.get("message") if status.get("state") in ("failed", DAMAGED) else ""
        rows.append(
            {
                "run": r.id,
                "state": run_label(status, positions.get(r.id)),
                "phase": status.get("phase"),
                "note": redact_paths(note or ""),
            }
        )
    for d in list_damaged_runs(runs_root()):
        rows.append({"run": d.id, "state": DAMAGED, "phase": None, "note": d.reason})
    return rows


st.subheader("All runs")
st.dataframe(run_rows(), hide_index=True)
