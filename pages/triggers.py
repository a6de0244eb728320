"""Triggers page: build a trigger, stamp it on a test image or an upload, and count the flips."""

from __future__ import annotations

from typing import Any

import streamlit as st
import torch

from app.state import current_teacher, show_error, test_set_for
from robustkd.analysis.predictions import flip_grid, top_k_predictions
from robustkd.attacks import (
    PATCH_PATTERNS,
    POSITIONS,
    CustomTrigger,
    Trigger,
    create_trigger,
    trigger_from_dict,
    trigger_names,
)
from robustkd.attacks.poison import MODES
from robustkd.data.datasets import ImageDataset
from robustkd.data.images import read_image, to_display
from robustkd.errors import RobustKDError
from robustkd.experiments.survive import describe_recipe
from robustkd.models.modelcard import attack_mode_of

UPLOAD_TYPES = ["png", "jpg", "jpeg", "gif", "bmp", "tif", "tiff", "webp", "ppm"]


def _default(stored: dict[str, Any], name: str, param: str, fallback: Any) -> Any:
    """The stored trigger's value when it is the chosen kind, else the widget's default."""
    return stored.get(param, fallback) if stored.get("name") == name else fallback


def build_trigger(
    name: str, stored: dict[str, Any], channels: int, height: int, width: int
) -> Trigger | None:
    """Widgets for ``name``'s parameters → the trigger (None while a custom one lacks a pattern)."""

    def d(param: str, fallback: Any) -> Any:
        return _default(stored, name, param, fallback)

    if name == "badnets":
        c1, c2, c3, c4 = st.columns(4)
        stored_size = int(d("size", 3))
        biggest = max(stored_size, min(height, width) // 2)
        size = c1.slider("Patch size", 1, biggest, stored_size, key="trig_size")
        pos = d("position", "bottom-right")
        current = tuple(pos) if isinstance(pos, (list, tuple)) else pos
        positions: list[Any] = list(POSITIONS)
        if isinstance(current, tuple):  # a stored [row, col] stays selectable
            positions.insert(0, current)
        position = c2.selectbox(
            "Position",
            positions,
            index=positions.index(current) if current in positions else 0,
            format_func=lambda p: f"row {p[0]}, col {p[1]}" if isinstance(p, tuple) else p,
            key="trig_position",
        )
        value = c3.slider("Value", 0.0, 1.0, float(d("value", 1.0)), 0.05, key="trig_value")
        pattern = c4.selectbox(
            "Pattern",
            PATCH_PATTERNS,
            index=PATCH_PATTERNS.index(d("pattern", "solid")),
            key="trig_pattern",
        )
        margin = int(d("margin", 1))
        return create_trigger(
            "badnets", size=size, position=position, value=value, pattern=pattern, margin=margin
        )
    if name == "blend":
        c1, c2 = st.columns(2)
        alpha = c1.slider("Alpha", 0.01, 1.0, float(d("alpha", 0.15)), 0.01, key="trig_alpha")
        seed = c2.number_input("Noise seed", 0, 100_000, int(d("seed", 0)), key="trig_seed")
        return create_trigger(
            "blend", alpha=alpha, seed=int(seed), pattern_png=d("pattern_png", None)
        )
    if name == "sig":
        c1, c2 = st.columns(2)
        amplitude = c1.slider(
            "Amplitude (0–255)", 1.0, 255.0, float(d("amplitude", 20.0)), 1.0, key="trig_amp"
        )
        frequency = c2.slider(
            "Frequency (periods per width)",
            0.5,
            14.0,
            float(d("frequency", 6.0)),
            0.5,
            key="trig_freq",
        )
        return create_trigger("sig", amplitude=amplitude, frequency=frequency)
    if name == "wanet":
        c1, c2, c3 = st.columns(3)
        strength = c1.slider(
            "Strength (pixels)", 0.0, 10.0, float(d("strength", 0.5)), 0.1, key="trig_strength"
        )
        grid = c2.slider("Grid size", 2, 16, int(d("grid_size", 4)), key="trig_grid")
        seed = c3.number_input("Warp seed", 0, 100_000, int(d("seed", 0)), key="trig_wseed")
        return create_trigger(
            "wanet",
            strength=strength,
            grid_size=grid,
            seed=int(seed),
            noise_rate=float(d("noise_rate", 0.0)),
        )
    if name == "custom":
        c1, c2 = st.columns(2)
        pattern = c1.file_uploader("Pattern image", type=UPLOAD_TYPES, key="trig_pattern_file")
        mask = c2.file_uploader(
            "Mask image (optional; white = stamped)", type=UPLOAD_TYPES, key="trig_mask_file"
        )
        st.caption(
            "Without a mask the pattern's non-black pixels are stamped (transparent pixels "
            "count as black)."
        )
        if pattern is None:
            if stored.get("name") == "custom":
                st.caption("Showing the teacher's stored custom trigger until you upload one.")
                return trigger_from_dict(stored)
            st.info("Upload a pattern image to build a custom trigger.")
            return None
        pixels, notes = read_image(
            pattern.getvalue(), channels, (height, width), what=f"pattern {pattern.name}"
        )
        mask_pixels = None
        if mask is not None:
            mask_pixels, mask_notes = read_image(
                mask.getvalue(), 1, (height, width), what=f"mask {mask.name}"
            )
            notes += mask_notes
        for note in notes:
            st.info(note)
        return CustomTrigger.from_arrays(pixels, mask_pixels)
    if name == "optimized-blend":
        if stored.get("name") != "optimized-blend":
            st.info(
                "An optimised blend trigger is learned while a teacher is trained "
                "(robustkd train-teacher --recipe optimized-blend); load such a teacher to see it."
            )
            return None
        learned = trigger_from_dict(stored)
        mask = learned.mask(height, width)  # type: ignore[attr-defined]
        st.caption(
            f"The teacher's learned pattern, blended through a mask of at most "
            f"{stored['max_mask']:g} (here {float(mask.max()):.3f} at most, "
            f"{float(mask.mean()):.3f} on average)."
        )
        return learned
    # a trigger registered elsewhere: its defaults, or the teacher's stored parameters
    return trigger_from_dict(stored) if stored.get("name") == name else create_trigger(name)


def source_image(
    data: ImageDataset, channels: int, height: int, width: int
) -> tuple[torch.Tensor | None, str]:
    """The image to stamp: a test image by index, or an upload (None when there is none)."""
    src = st.radio("Source", ["Test image", "Upload an image"], horizontal=True, key="trig_src")
    if src == "Test image":
        i = st.number_input("Test image index", 0, len(data) - 1, 0, key="trig_index")
        label = data.classes[int(data.labels[int(i)])]
        return data.images[int(i)].float() / 255, f"test image {int(i)} (true class: {label})"
    upload = st.file_uploader("Image", type=UPLOAD_TYPES, key="trig_upload")
    if upload is None:
        st.info("Upload an image to stamp the trigger on.")
        return None, ""
    try:
        image, notes = read_image(
            upload.getvalue(), channels, (height, width), what=f"file {upload.name}"
        )
    except RobustKDError as exc:
        show_error(exc)
        return None, ""
    for note in notes:
        st.info(note)
    return image, f"uploaded {upload.name}"


def show_top3(col: Any, title: str, image: torch.Tensor, top: list[tuple[str, float]]) -> None:
    col.image(to_display(image), caption=title, width=224)
    col.markdown(
        "\n".join(f"{r}. **{name}** {100 * p:.1f} %" for r, (name, p) in enumerate(top, 1))
    )


st.title("Triggers")
try:
    model, meta = current_teacher()
    data = test_set_for(meta)
    # the recorded trigger, checked (typed parameters, no file paths) before widgets read it
    recorded = trigger_from_dict(meta["trigger"]) if meta.get("trigger") else None
    stored_mode = attack_mode_of(meta)
except RobustKDError as exc:
    show_error(exc)
    st.stop()

classes = list(meta.get("classes") or data.classes)
channels, height, width = data.input_shape
stored: dict[str, Any] = recorded.to_dict() if recorded is not None else {}
names = trigger_names()

st.subheader("Trigger")
note = describe_recipe(meta.get("recipe"))
if note:
    st.caption(note)
c1, c2, c3 = st.columns([2, 1, 2])
name = c1.selectbox(
    "Trigger",
    names,
    index=names.index(stored["name"]) if stored.get("name") in names else 0,
    key="trig_name",
    help="Defaults to the trigger the teacher was trained with.",
)
mode = c2.radio(
    "Attack",
    MODES,
    index=MODES.index(stored_mode),
    key="trig_mode",
    help="All-to-one: every triggered image should become the target class; all-to-all: "
    "each should become the class after its own. Defaults to the teacher's.",
)
stored_target = meta.get("target")
target = c3.selectbox(
    "Target class",
    range(len(classes)),
    index=stored_target
    if isinstance(stored_target, int) and 0 <= stored_target < len(classes)
    else 0,
    format_func=lambda i: f"{i} · {classes[i]}",
    key="trig_target",
    disabled=mode == "all-to-all",
)
try:
    trigger: Trigger | None = build_trigger(name, stored, channels, height, width)
except RobustKDError as exc:
    show_error(exc)
    st.stop()
if trigger is None:
    st.stop()
# the Feature variance page stamps with the trigger built here
st.session_state["current_trigger"] = trigger.to_dict()
st.session_state["current_target"] = int(target)
st.session_state["current_mode"] = mode
if mode == "all-to-all":
    st.caption(f"`{trigger!r}` · all-to-all: each class's target is the class after it")
else:
    st.caption(f"`{trigger!r}` · target class {target} ({classes[target]})")

st.subheader("Clean and triggered")
image, what = source_image(data, channels, height, width)
if image is not None:
    try:
        stamped = trigger.apply(image)
        tops = top_k_predictions(model, torch.stack([image, stamped]), data.mean, data.std, classes)
    except RobustKDError as exc:
        show_error(exc)
    else:
        left, right = st.columns(2)
        show_top3(left, f"clean · {what}", image, tops[0])
        show_top3(right, "triggered", stamped, tops[1])

st.subheader("Which test images flip")
c1, c2 = st.columns(2)
n = c1.slider("Images", 4, 32, 8, step=4, key="trig_grid_n")
seed = c2.number_input("Sample seed", 0, 10_000, 0, key="trig_grid_seed")
try:
    grid = flip_grid(model, data, trigger, int(target), int(n), int(seed), mode)
except RobustKDError as exc:
    show_error(exc)
    st.stop()
if mode == "all-to-all":
    st.markdown(
        f"**{grid.n_flipped} of {grid.n} flipped to the class after their own** — all-to-all "
        f"attack, test images, seed {int(seed)}."
    )
else:
    st.markdown(
        f"**{grid.n_flipped} of {grid.n} flipped to class {target} ({classes[target]})** — "
        f"test images whose true class is not {target}, seed {int(seed)}."
    )
cols = st.columns(8)
for i in range(grid.n):
    col = cols[i % len(cols)]
    mark = "✅" if bool(grid.flipped[i]) else "·"
    col.image(
        [to_display(grid.clean[i]), to_display(grid.triggered[i])],
        caption=[
            f"clean: {classes[int(grid.clean_preds[i])]}",
            f"{mark} triggered: {classes[int(grid.triggered_preds[i])]}",
        ],
        width=64,
    )
    col.caption(f"true: {classes[int(grid.labels[i])]}")
