"""Feature variance page: where a trigger inflates a layer's variance, and a threshold preview."""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import streamlit as st
import torch

from app.charts import show_chart
from app.state import (
    current_teacher,
    data_key,
    keep_widget_values,
    show_error,
    teacher_path,
    test_set_for,
)
from robustkd.analysis.features import StatsCache, activations
from robustkd.analysis.metrics import Evaluation, evaluate
from robustkd.attacks import Trigger, trigger_from_dict
from robustkd.attacks.poison import MODES
from robustkd.data.datasets import ImageDataset
from robustkd.defenses.detox import (
    INTERACTIVE_MS,
    DetoxPreview,
    Preview,
    ThresholdFit,
    auto_threshold,
    fit_threshold,
)
from robustkd.errors import RobustKDError
from robustkd.models.modelcard import attack_mode_of
from robustkd.training.scenarios import probe_scenario
from robustkd.viz.variance_figures import (
    activation_maps_figure,
    channel_variance_figure,
    compare_layer,
    flagged_units_figure,
    ranked_channels_figure,
    spatial_variance_figure,
)

TABS = ("Variance maps", "Top channels", "Threshold")
# what the user chose, kept while another tab or page is open (the open tab is the address's)
KEPT = (
    "var_layer", "var_n", "var_image", "var_trusted", "var_percent", "var_gran", "var_threshold",
)  # fmt: skip
# log-spaced slider stops from 1 to 50
THRESHOLDS = sorted({round(float(v), 2) for v in np.geomspace(1.0, 50.0, 41)})


@st.cache_resource(max_entries=1)
def stats_cache() -> tuple[StatsCache, threading.Lock]:
    """One statistics cache for every session, and a lock: sessions run in their own threads."""
    return StatsCache(max_entries=64), threading.Lock()


@st.cache_resource(show_spinner="Scoring units against the trusted clean set …", max_entries=8)
def threshold_fit(
    model_key: str,
    trigger_json: str,
    target: int,
    mode: str,
    size: int,
    percent: int,
    granularity: str,
    _model: torch.nn.Module,
    _val: ImageDataset,
) -> ThresholdFit:
    """Fit on a trusted val subset against a same-size val subset, ``percent`` % triggered."""
    trigger = trigger_from_dict(json.loads(trigger_json))
    probe = probe_scenario(_val, size, trigger, target, percent / 100, mode)
    return fit_threshold(_model, probe.trusted, probe.suspect, granularity=granularity)


# each entry holds the layer's activations on n clean and n triggered images
@st.cache_resource(show_spinner="Preparing the detox preview …", max_entries=2)
def detox_preview(
    model_key: str,
    fit_key: tuple,
    layer: str,
    n: int,
    _model: torch.nn.Module,
    _fit: ThresholdFit,
    _data: ImageDataset,
) -> tuple[DetoxPreview, Evaluation]:
    """The preview at one layer on the first ``n`` test images, and the teacher's own numbers."""
    trigger_json, target, mode = fit_key[0], fit_key[1], fit_key[-1]
    trigger = trigger_from_dict(json.loads(trigger_json))
    sub = _data.subset(range(n))
    return (
        DetoxPreview(_model, _fit, layer, sub, trigger, target, mode=mode),
        evaluate(_model, sub, trigger, target, mode),
    )


# Figures are built once per what they show and shared by every session: building a Plotly
# figure validates every property (tens of ms each), and drawing it only reads it.
@st.cache_resource(max_entries=16)
def variance_figures(
    model_key: str, trigger_json: str, layer: str, n: int, _cmp: Any
) -> tuple[Any, Any, Any]:
    """The channel, spatial and ranked-channel figures of one layer's comparison."""
    return (
        channel_variance_figure(_cmp),
        spatial_variance_figure(_cmp),
        ranked_channels_figure(_cmp, 20),
    )


@st.cache_resource(max_entries=64)
def flagged_figure(model_key: str, fit_key: tuple, layer: str, threshold: float, _fit: Any) -> Any:
    """The flagged-units figure of one layer's fit at one threshold."""
    return flagged_units_figure(_fit, threshold)


def pp(change: float) -> str:
    """A change of a fraction in percentage points, with no "-0.00"."""
    return f"{round(100 * change, 2) + 0.0:+.2f} pp"


def current_trigger(meta: dict[str, Any], num_classes: int) -> tuple[Trigger | None, int, str, str]:
    """The trigger, target, attack mode and their origin: those built on the Triggers page,
    else the teacher's stored ones."""
    built = st.session_state.get("current_trigger")
    target = st.session_state.get("current_target")
    mode = st.session_state.get("current_mode")
    if built and isinstance(target, int) and 0 <= target < num_classes:
        mode = mode if mode in MODES else attack_mode_of(meta)
        return trigger_from_dict(built), target, mode, "the Triggers page"
    stored, target = meta.get("trigger"), meta.get("target")
    return (
        (trigger_from_dict(stored) if stored else None),
        int(target) if target is not None else 0,
        attack_mode_of(meta),
        "the teacher's stored trigger",
    )


st.title("Feature variance")
try:
    model, meta = current_teacher()
    data = test_set_for(meta)
    val = test_set_for(meta, "val")
    trigger, target, mode, origin = current_trigger(meta, data.num_classes)
except RobustKDError as exc:
    show_error(exc)
    st.stop()
layers = list(getattr(model, "feature_layers", []))
if not layers:
    st.error("This teacher names no stage outputs (feature_layers), so there is nothing to show.")
    st.stop()
if trigger is None:
    st.info("This teacher records no trigger; build one on the Triggers page.")
    st.stop()
classes = list(meta.get("classes") or data.classes)
# the checkpoint file, its version, its model options and the user's data name the model
# and its data for caching
path = teacher_path()
model_key = json.dumps(
    [str(path), path.stat().st_mtime, st.session_state.get("teacher_args") or {}, data_key()],
    sort_keys=True,
)
aim = (
    "all-to-all (each class's target is the class after it)"
    if mode == "all-to-all"
    else f"target class {target} ({classes[target]})"
)
st.caption(f"Trigger `{trigger!r}` from {origin} · {aim}.")
offer_reset = origin == "the Triggers page" and bool(meta.get("trigger"))
if offer_reset and st.button("Use the teacher's stored trigger", key="var_stored_trigger"):
    for k in ("current_trigger", "current_target", "current_mode"):
        st.session_state.pop(k, None)
    st.rerun()

sizes = sorted({n for n in (100, 200, 500, 1000, 2000) if n <= len(data)} | {min(len(data), 500)})
limit = max(4, len(val) // 3)  # trusted clean images the threshold may use
# a value kept from another teacher or data set that no longer fits starts afresh
keep_widget_values(
    KEPT,
    {
        "var_layer": lambda v: v in layers,
        "var_n": lambda v: v in sizes,
        "var_trusted": lambda v: isinstance(v, int) and 4 <= v <= limit,
    },
)
c1, c2 = st.columns(2)
# a middle stage: early layers see pixels, the last one mostly classes
layer = c1.selectbox("Layer", layers, index=len(layers) // 2, key="var_layer")
n = c2.select_slider("Test images", sizes, value=min(500, len(data)), key="var_n")
sub = data.subset(range(n))
trigger_json = json.dumps(trigger.to_dict(), sort_keys=True)
# Only the open tab runs and is drawn (a page switch draws two charts, not five); the open tab
# is in the address, so a link can open the threshold directly (…/variance?var_tab=Threshold).
maps_tab, top_tab, threshold_tab = st.tabs(
    TABS, key="var_tab", on_change="rerun", bind="query-params"
)


def comparison() -> Any:
    """The layer's clean and triggered statistics on the first ``n`` test images, compared."""
    try:
        cache, lock = stats_cache()
        with lock:
            clean_stats = cache.get(model, sub, [layer])[layer]
            trig_stats = cache.get(model, sub, [layer], trigger)[layer]
        return compare_layer(clean_stats, trig_stats)
    except RobustKDError as exc:
        show_error(exc)
        st.stop()


if maps_tab.open:
    with maps_tab:
        fig_channels, fig_spatial, _ = variance_figures(
            model_key, trigger_json, layer, n, comparison()
        )
        st.caption(
            "Per channel, and per position averaged over channels: the variance on clean test "
            "images, on the same images triggered, and their ratio."
        )
        show_chart(fig_channels, "var_channels")
        show_chart(fig_spatial, "var_spatial")

if top_tab.open:
    with top_tab:
        cmp = comparison()
        show_chart(variance_figures(model_key, trigger_json, layer, n, cmp)[2], "var_ranked")
        top, ratios = cmp.top_channels(4)
        st.caption(
            "Largest ratios: "
            + ", ".join(f"channel {c} ×{r:.2f}" for c, r in zip(top, ratios, strict=True))
        )
        st.subheader("Activation maps of the top channels")
        keep_widget_values(("var_image",), {"var_image": lambda v: 0 <= v < n})
        i = st.number_input("Test image", 0, n - 1, 0, key="var_image")
        one = data.subset([int(i)])
        clean_act = activations(model, one, layer)[0]
        trig_act = activations(model, one, layer, trigger)[0]
        show_chart(activation_maps_figure(clean_act, trig_act, top, layer), "var_acts")

if not threshold_tab.open:
    st.stop()
with threshold_tab:
    st.subheader("Variance threshold and detoxified teacher")
    st.caption(
        "Units whose variance on a distillation-like set (val images, some triggered) exceeds "
        "the threshold × their variance on a trusted clean val subset are replaced by their "
        "clean mean."
    )
    c1, c2, c3 = st.columns(3)
    size = int(
        c1.number_input("Trusted clean images (val)", 4, limit, min(500, limit), key="var_trusted")
    )
    percent = int(c2.slider("Triggered share of the suspect set (%)", 0, 50, 10, key="var_percent"))
    granularity = c3.radio("Flag", ["unit", "channel"], horizontal=True, key="var_gran")
    try:
        fit = threshold_fit(
            model_key, trigger_json, target, mode, size, percent, granularity, model, val
        )
        fit_key = (trigger_json, target, size, percent, granularity, mode)
        preview, base = detox_preview(model_key, fit_key, layer, n, model, fit, data)
    except RobustKDError as exc:
        show_error(exc)
        st.stop()

    default = round(fit.layers[layer].default_threshold, 2)
    left, right = st.columns([3, 1])
    with right:
        st.write("")
        if st.button("Auto threshold (validation data)", key="var_auto_btn"):
            # judged on this layer alone, as the preview detoxifies this layer alone
            one_layer = ThresholdFit({layer: fit.layers[layer]}, fit.granularity, fit.calibration)
            try:
                validation = probe_scenario(val, size).validation
                auto = round(auto_threshold(model, one_layer, validation), 3)
            except RobustKDError as exc:
                show_error(exc)
            else:
                st.session_state["var_auto"] = auto
                st.session_state["var_threshold"] = auto
        if "var_auto" in st.session_state:
            st.caption(
                f"Auto: {st.session_state['var_auto']:g} — the lowest threshold keeping clean "
                f"ACC within 1 point on {size} validation images."
            )
    st.session_state.setdefault("var_threshold", default)
    options = sorted(
        {*THRESHOLDS, default, st.session_state.get("var_auto", default)}
        | {st.session_state["var_threshold"]}
    )
    with left:
        threshold = st.select_slider(
            "Variance threshold (log scale)",
            options,
            format_func=lambda v: f"{v:g}",
            key="var_threshold",
            help=f"Clean-halves default at {layer}: {default:g}.",
        )

    m1, m2, m3 = st.columns(3)
    acc_slot, asr_slot = m1.empty(), m2.empty()
    note = st.empty()

    def show(result: Preview) -> None:
        """The detoxified teacher's ACC/ASR; a first answer on part of the images says so."""

        def images(used: int, total: int) -> str:
            if result.complete:
                return f"{total} test images"
            return f"{used} of {total} test images (a class-stratified part; all follow)"

        acc_slot.metric(
            "Detoxified ACC",
            f"{100 * result.acc:.2f} %",
            pp(result.acc - base.acc) if result.complete else None,
            help=f"{images(result.n_clean, preview.n_clean)}; the teacher alone: "
            f"{100 * base.acc:.2f} % on all {preview.n_clean}.",
        )
        if result.asr is not None and base.asr is not None:
            asr_slot.metric(
                "Detoxified ASR",
                f"{100 * result.asr:.2f} %",
                pp(result.asr - base.asr) if result.complete else None,
                delta_color="inverse",
                help=f"triggered: {images(result.n_triggered, preview.n_triggered)}; the teacher "
                f"alone: {100 * base.asr:.2f} % on all {preview.n_triggered}.",
            )

    # a first answer within the interactive budget (on part of the images where all of them
    # would take longer), then the answer on all of them
    result = preview(float(threshold), budget_ms=INTERACTIVE_MS)
    show(result)
    m3.metric("Flagged units", f"{result.flagged_units:,}", help=f"at {layer}")
    if not result.complete:
        note.caption(
            f"First answer on {result.n_clean:,} of {preview.n_clean:,} clean and "
            f"{result.n_triggered:,} of {preview.n_triggered:,} triggered test images (a "
            f"class-stratified part); computing all of them …"
        )
        result = preview(float(threshold))
        show(result)
        note.empty()
    counts = fit.flagged_units(float(threshold))
    st.caption(
        f"Flagged at threshold {threshold:g}: "
        + " · ".join(
            f"{name} {c:,} of {fit.layers[name].clean_mean.numel():,}" for name, c in counts.items()
        )
        + f". The preview detoxifies {layer} only, on the first {n} test images."
    )
    show_chart(
        flagged_figure(model_key, fit_key, layer, float(threshold), fit.layers[layer]),
        "var_flagged",
    )
