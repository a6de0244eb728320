"""Teach page: the backdoor-transfer lesson in five steps, with real results from the start.

The lesson opens on the shipped teacher and its three shipped students (``assets/lesson/``,
built by ``make lesson``; ``robustkd.experiments.lesson``): (1) the teacher and its trigger,
(2) plain distillation, (3) where the backdoor hides, (4) RobustKD, (5) the price. Each step has
one picture, two or three sentences worded from the numbers, and links to the page that
explores it further. "Run it yourself" re-runs the lesson live (``robustkd compare --methods
scratch,feature-kd,robustkd --preset fashion-badnets-quick`` on the shipped teacher, in the
background); when it ends, the steps switch to that run. A session sees only its own live run,
or the one its address names (``?run=ID``): a lecturer can share that link with the class.
``$ROBUSTKD_TEACH_OPTIONS`` may hold a JSON object of extra ``compare`` options (CLI names with
``_``, e.g. ``{"distill_size": 300, "epochs": 1}``) — tests use it for tiny runs.

What every session shows the same (models, test images, variance statistics) is computed once
per server and shared read-only (``st.cache_resource``); a session keeps only its choices.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

import streamlit as st
import torch

from app.charts import show_chart
from app.state import (
    default_teacher_path,
    keep_widget_values,
    load_model,
    load_split,
    runs_root,
    show_error,
)
from robustkd.analysis.features import feature_stats
from robustkd.analysis.metrics import predict
from robustkd.attacks import Trigger, trigger_from_dict
from robustkd.data.datasets import ImageDataset, to_float
from robustkd.errors import ConfigError, RobustKDError, redact_paths
from robustkd.experiments.compare import launch_compare
from robustkd.experiments.lesson import (
    LESSON_DIR,
    LESSON_METHODS,
    STEP_TITLES,
    lesson_html,
    lesson_sentences,
    load_lesson,
    student_paths,
)
from robustkd.models.checkpoints import DEFAULT_TEACHER
from robustkd.models.modelcard import attack_mode_of, normalized_for
from robustkd.runs.liveness import refresh_state
from robustkd.runs.queue import queue_position, start_queued
from robustkd.runs.store import ACTIVE_STATES, Run
from robustkd.viz.figures import training_curves
from robustkd.viz.lesson_figures import (
    LABELS,
    channel_ratio_bars,
    flagged_figure,
    lesson_bars,
    price_figure,
    stamp_figure,
    unit_ratio_map,
)
from robustkd.viz.variance_figures import (
    compare_layer,
)

DEMO_PRESET = "fashion-badnets-quick"
DEMO_METHODS = list(LESSON_METHODS)
OPTIONS_ENV = "ROBUSTKD_TEACH_OPTIONS"
RUN_KEY = "teach_run"
RUN_PARAM = "run"  # the live run in the page's address


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
    """This session's live run, or the one the page's address names (``?run=ID``, set when the
    run starts, so reopening or sharing the address finds it); never another session's run."""
    run_id = st.session_state.get(RUN_KEY) or st.query_params.get(RUN_PARAM)
    if not run_id:
        return None
    try:
        run = Run.open(runs_root(), str(run_id))
    except RobustKDError:
        run = None
    if run is None or not is_demo(run):
        st.session_state.pop(RUN_KEY, None)
        return None
    st.session_state[RUN_KEY] = run.id
    return run


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
        rk = report["methods"]["robustkd"]
        kd = report["methods"]["feature-kd"]
        st.success(
            f"Your run is done: plain KD ASR {100 * (kd.get('asr') or 0):.1f} %, RobustKD ASR "
            f"{100 * (rk.get('asr') or 0):.1f} % at ACC {100 * rk['acc']:.1f} %. The lesson's "
            "steps above show it (choose the shipped lesson again under “Results”)."
        )
    else:
        st.info("The run finished without a complete report; run the demo again.")


STEPS = list(STEP_TITLES)
INTRO = (
    "A public teacher may carry a backdoor. Does a small student distilled from it inherit "
    "the backdoor, and can RobustKD stop it? Five steps, with results measured on real models."
)
PAGES = Path(__file__).resolve().parent
LINKS = [
    [("teacher.py", "Teacher: its card and measurements"), ("triggers.py", "Triggers: build one")],
    [("distill.py", "Detox & distil: train students"), ("compare.py", "Compare: every method")],
    [("variance.py", "Feature variance: every layer"), ("attributions.py", "Attributions")],
    [
        ("variance.py?var_tab=Threshold", "Feature variance: the threshold"),
        ("distill.py", "Detox & distil"),
    ],
    [("compare.py", "Compare: per-class ACC, curves, report")],
]
SHIPPED, YOURS = "The shipped lesson", "Your run"
N_VARIANCE = 1000  # test images for step 3's statistics


@st.cache_resource(show_spinner="Reading the lesson …", max_entries=4)
def lesson_report(folder: str, mtime: float) -> dict[str, Any]:
    return load_lesson(folder)


@st.cache_resource(show_spinner="Measuring the variance of each unit …", max_entries=8)
def unit_variance(
    model_key: str, layer: str, trigger_json: str, _model: torch.nn.Module, _data: ImageDataset
) -> Any:
    """Clean-versus-triggered statistics of ``layer`` on the first test images (shared)."""
    trigger = trigger_from_dict(json.loads(trigger_json))
    clean = feature_stats(_model, _data, [layer])[layer]
    triggered = feature_stats(_model, _data, [layer], trigger)[layer]
    return compare_layer(clean, triggered)


def _links(step: int) -> None:
    cols = st.columns(len(LINKS[step]))
    for col, (target, label) in zip(cols, LINKS[step], strict=True):
        file, _, tab = target.partition("?var_tab=")  # a link may open one of a page's tabs
        col.page_link(
            str(PAGES / file),
            label=label,
            icon=":material/arrow_forward:",
            query_params={"var_tab": tab} if tab else None,
        )


def variance_sentences(cmp: Any) -> list[str]:
    """Step 3's sentences from the measured ratios: the unit that swells most, and the
    channel that does."""
    ratio = cmp.unit_ratio
    flat = int(ratio.flatten().argmax())
    h, w = ratio.shape[1], ratio.shape[2]
    c, row, col = flat // (h * w), (flat % (h * w)) // w, flat % w
    unit_max, channel_max = float(ratio.max()), float(cmp.channel_ratio.max())
    return [
        f"On triggered images the variance of single feature units at {cmp.layer} swells up to "
        f"×{unit_max:.1f} their clean level (channel {c}, row {row}, column {col}): the map "
        "lights up where the trigger sits.",
        f"Averaged over whole channels the largest change is ×{channel_max:.1f}"
        + (
            ", far smaller: this is why RobustKD scores single units rather than channels."
            if channel_max < unit_max / 2
            else "; at this layer the channels show it too."
        ),
    ]


def _go(step: int) -> None:
    """Back / Next: runs before the step selector is drawn again."""
    st.session_state["teach_step"] = STEPS[max(0, min(step, len(STEPS) - 1))]


# the lesson's place, kept while the user visits other pages
KEPT = ("teach_step", "teach_image", "teach_layer", "teach_source")


def _prediction(model: torch.nn.Module, image: torch.Tensor, data: ImageDataset) -> str:
    probs = predict(model, image[None], data.mean, data.std, return_probs=True)[0]
    k = int(probs.argmax())
    return f"{data.classes[k]} ({100 * float(probs[k]):.0f} %)"


def source() -> tuple[dict[str, Any], Path, dict[str, Path], str] | None:
    """The report the steps tell, its teacher, its students and its name: the shipped lesson,
    or this server's newest finished live run when chosen."""
    demo = current_demo()
    finished = None
    if demo is not None:
        try:
            if refresh_state(demo).get("state") == "done":
                report = demo.report()
                if all(m in report.get("methods", {}) for m in DEMO_METHODS):
                    finished = (demo, report)
        except RobustKDError:
            finished = None
    options = [SHIPPED] + ([YOURS] if finished else [])
    if finished and st.session_state.get("teach_seen_run") != finished[0].id:
        st.session_state["teach_seen_run"] = finished[0].id  # a new run: show it
        st.session_state["teach_source"] = YOURS
    if st.session_state.get("teach_source") not in options:
        st.session_state["teach_source"] = SHIPPED
    choice = st.radio(
        "Results", options, horizontal=True, key="teach_source", label_visibility="collapsed"
    )
    if choice == YOURS and finished:
        run, report = finished
        teacher = Path(str(run.config.get("options", {}).get("teacher") or DEFAULT_TEACHER))
        return report, teacher, student_paths(report, run.path), f"run {run.id}"
    try:
        folder = LESSON_DIR
        report = lesson_report(str(folder), (folder / "lesson.json").stat().st_mtime)
    except (OSError, RobustKDError) as exc:
        show_error(
            exc
            if isinstance(exc, RobustKDError)
            else ConfigError(
                "The lesson's shipped students are missing; rebuild them with 'make lesson'."
            )
        )
        return None
    return report, DEFAULT_TEACHER, student_paths(report, folder), "the shipped lesson"


def lesson(
    report: dict[str, Any], teacher_file: Path, students: dict[str, Path], name: str
) -> None:
    if not teacher_file.is_file():
        raise ConfigError(
            f"The lesson's teacher {teacher_file.name} is missing; run 'make teacher'."
        )
    teacher, meta = load_model(str(teacher_file), teacher_file.stat().st_mtime)
    stored = meta.get("trigger")
    if not stored:
        raise ConfigError(
            "The lesson's teacher records no trigger; rebuild it with 'make teacher'."
        )
    trigger: Trigger = trigger_from_dict(stored)
    target = meta.get("target")
    classes = list(meta.get("classes") or [])
    data = normalized_for(meta, load_split(meta.get("dataset") or "fashion-mnist", "test"))
    sentences = lesson_sentences(report, classes, target, attack_mode_of(meta))
    st.session_state.setdefault("teach_step", STEPS[0])
    step_name = (
        st.segmented_control("Step", STEPS, key="teach_step", label_visibility="collapsed")
        or STEPS[0]
    )
    step = STEPS.index(step_name)
    # one picture beside its sentences, so that both fit a projector's 1280 × 720; Back and
    # Next stay where they are from step to step: a click never moves the page
    left, right = st.columns([3, 2], gap="medium")
    back, nxt = right.columns(2)
    back.button(
        "Back",
        key="teach_back",
        disabled=step == 0,
        on_click=_go,
        args=(step - 1,),
        width="stretch",
    )
    nxt.button(
        "Next step",
        key="teach_next",
        type="primary",
        disabled=step == len(STEPS) - 1,
        on_click=_go,
        args=(step + 1,),
        width="stretch",
    )
    right.header(step_name)
    figures = {}

    if step in (0, 1):
        i = int(
            right.number_input(
                "Test image",
                0,
                len(data) - 1,
                key="teach_image",
                help="Any image of the test split; the trigger is stamped on a copy.",
            )
        )
        image = to_float(data.images[i])
        stamped = trigger.apply(image[None])[0]
        who = teacher if step == 0 else None
        if step == 1 and "feature-kd" in students:
            path = students["feature-kd"]
            who, _ = load_model(str(path), path.stat().st_mtime)
        if who is not None:
            label = "teacher" if step == 0 else "plain KD student"
            figures["stamp"] = stamp_figure(
                image,
                stamped,
                f"clean: {label} says {_prediction(who, image, data)}",
                f"triggered: {label} says {_prediction(who, stamped, data)}",
            )
    if step == 0:
        pic = figures["stamp"]
    elif step == 1:
        pic = lesson_bars(report, ["feature-kd"], "The plain KD student inherits the backdoor")
    elif step == 2:
        layers = list(getattr(teacher, "feature_layers", []))
        layer = right.selectbox("Teacher layer", layers, key="teach_layer")
        key = f"{teacher_file}:{teacher_file.stat().st_mtime}"
        cmp = unit_variance(
            key,
            layer,
            json.dumps(trigger.to_dict(), sort_keys=True),
            teacher,
            data.subset(range(min(N_VARIANCE, len(data)))),
        )
        pic = unit_ratio_map(cmp)
        sentences[2] = variance_sentences(cmp)
        figures["channels"] = channel_ratio_bars(cmp)
    elif step == 3:
        pic = flagged_figure(report["methods"]["robustkd"])
        figures["bars"] = lesson_bars(
            report, ["feature-kd", "robustkd", "scratch"], "RobustKD stops the transfer"
        )
    else:
        pic = price_figure(report, list(LESSON_METHODS))
    with right:
        if step == 0:
            st.markdown(f"##### {INTRO}")
        for line in sentences[step]:
            st.markdown(f"##### {line}")
    with left:
        show_chart(pic, f"teach_step{step + 1}")
    if step == 1 and "stamp" in figures:
        show_chart(figures["stamp"], "teach_student_flip")
    if step == 2:
        show_chart(figures["channels"], "teach_step3_channels")
    if step == 3:
        show_chart(figures["bars"], "teach_step4_bars")
    if step == 4:
        rows = [("teacher", report["teacher"])] + [
            (m, report["methods"][m]) for m in LESSON_METHODS if m in report["methods"]
        ]
        st.dataframe(
            [
                {
                    "model": LABELS.get(m, m),
                    "ACC %": round(100 * r["acc"], 2),
                    "ASR %": round(100 * r["asr"], 2) if r.get("asr") is not None else None,
                    "parameters": r.get("params"),
                    "FLOPs": r.get("flops"),
                    "file (KB)": round(r["size_bytes"] / 1024) if r.get("size_bytes") else None,
                }
                for m, r in rows
            ],
            hide_index=True,
        )
    _links(step)
    st.caption(f"Results of {name}: `{redact_paths(report.get('command') or '')}`")
    st.download_button(
        "Download the lesson (one-page HTML)",
        data=lambda: handout(report, sentences, name),
        file_name="robustkd-lesson.html",
        mime="text/html",
        key="teach_handout",
        on_click="ignore",
    )


def handout(report: dict[str, Any], sentences: list[list[str]], name: str) -> str:
    """The lesson's results as one page (the figures that need no chosen image or layer)."""
    figures = [
        [],
        [lesson_bars(report, ["feature-kd"], "The plain KD student inherits the backdoor")],
        [],
        [
            flagged_figure(report["methods"]["robustkd"]),
            lesson_bars(
                report, ["feature-kd", "robustkd", "scratch"], "RobustKD stops the transfer"
            ),
        ],
        [price_figure(report, list(LESSON_METHODS))],
    ]
    sections = [
        (title, lines, figs) for title, lines, figs in zip(STEPS, sentences, figures, strict=True)
    ]
    return lesson_html(f"Backdoor transfer in knowledge distillation ({name})", sections)


st.title("Teach")
keep_widget_values(KEPT)
chosen = source()
if chosen is not None:
    try:
        lesson(*chosen)
    except RobustKDError as exc:
        show_error(exc)

st.divider()
st.subheader("Run it yourself")
demo = current_demo()
try:
    active = demo is not None and refresh_state(demo).get("state") in ACTIVE_STATES
except RobustKDError:
    active = False
st.caption(
    f"Trains the three students again from the shipped teacher with the {DEMO_PRESET} preset "
    "(a few minutes on a laptop); the steps switch to your run when it ends."
)
if st.button("Run it yourself", key="teach_start", type="primary", disabled=active):
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
        st.query_params[RUN_PARAM] = demo.id
        st.rerun()
if demo is not None:
    st.caption(
        f"`robustkd {redact_paths(shlex.join(str(a) for a in demo.config.get('argv', [])))}`"
    )
    st.fragment(run_every=2 if active else None)(panel)(demo.id, active)
