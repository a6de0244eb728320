"""Teacher page: the model card, live ACC/ASR, and clean vs triggered test images."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import streamlit as st
import torch

from app.state import (
    current_teacher,
    data_key,
    show_error,
    teacher_options,
    teacher_path,
    test_set_for,
)
from robustkd.analysis.metrics import Evaluation, evaluate, predict
from robustkd.attacks import trigger_from_dict
from robustkd.data.datasets import ImageDataset
from robustkd.errors import RobustKDError
from robustkd.models.modelcard import ModelCard, model_card


# What every session shows the same is computed once per server: the card (it counts FLOPs
# with a forward pass) and the measured ACC/ASR, keyed on the teacher file's version, its
# model options and the data (a page switch then costs no evaluation).
@st.cache_resource(max_entries=16)
def card_of(model_key: str, path: str, _model: torch.nn.Module, _meta: dict[str, Any]) -> ModelCard:
    return model_card(path, _model, _meta)


@st.cache_resource(show_spinner="Measuring the teacher …", max_entries=64)
def measured(
    model_key: str,
    n: int,
    trigger_json: str | None,
    target: int | None,
    mode: str,
    _model: torch.nn.Module,
    _data: ImageDataset,
) -> Evaluation:
    trigger = trigger_from_dict(json.loads(trigger_json)) if trigger_json else None
    return evaluate(_model, _data.subset(range(n)), trigger, target, mode)


st.title("Teacher")
try:
    model, meta = current_teacher()
    path = teacher_path()
    model_key = json.dumps(
        [str(path), path.stat().st_mtime, teacher_options(), data_key()], sort_keys=True
    )
    card = card_of(model_key, str(path), model, meta)
    data = test_set_for(meta)
    trigger = trigger_from_dict(card.trigger) if card.trigger else None
except RobustKDError as exc:
    show_error(exc)
    st.stop()

cols = st.columns(4)
cols[0].metric("Architecture", card.architecture or "?")
cols[1].metric("Parameters", f"{card.params:,}")
cols[2].metric("FLOPs / image", f"{card.flops / 1e6:.1f} M")
cols[3].metric("Input", "×".join(str(v) for v in card.input_shape))
st.markdown(
    f"**Data** {card.dataset} · **trigger** `{card.trigger}` · **target class** "
    f"{card.target} ({card.classes[card.target] if card.target is not None else '–'}) · "
    f"**attack** {card.attack_mode} · **student architecture** {card.student_architecture}"
)
if card.metrics and card.metrics.get("acc") is not None:  # type-checked when read
    m = card.metrics
    asr = f"{100 * m['asr']:.2f} %" if m.get("asr") is not None else "n/a"
    on = f" on {m['data']}" if m.get("data") else ""
    st.caption(f"Recorded at training: ACC {100 * m['acc']:.2f} %, ASR {asr}{on}.")

st.subheader("Measured now")
# an uploaded test set may be small: offer only counts it holds, and all of it
sizes = sorted({v for v in (200, 500, 1000, 2000, 5000) if v < len(data)} | {len(data)})
n = st.select_slider("Test images", options=sizes, value=min(1000, len(data)))
try:
    trigger_json = json.dumps(card.trigger, sort_keys=True) if card.trigger else None
    result = measured(
        model_key, min(n, len(data)), trigger_json, card.target, card.attack_mode, model, data
    )
except RobustKDError as exc:  # e.g. a trigger with no target class recorded
    show_error(exc)
    st.stop()
if card.attack_mode == "all-to-all":  # each triggered image should become the next class
    hits = "triggered images are classified as the class after their own"
else:
    hits = f"triggered images whose true class is not {card.target} are classified as {card.target}"
c1, c2 = st.columns(2)
c1.metric("ACC", f"{100 * result.acc:.2f} %", help=f"{result.n_correct} / {result.n_clean} correct")
if result.asr is not None:
    c2.metric(
        "ASR",
        f"{100 * result.asr:.2f} %",
        help=f"{result.n_attack_success} / {result.n_triggered} {hits}",
    )
elif trigger is None:
    c2.metric("ASR", "unknown", help="No trigger is recorded for this teacher.")
else:
    c2.metric("ASR", "undefined", help="No test image outside the target class to trigger.")
st.caption(f"{result.n_clean} clean and {result.n_triggered} triggered test images.")

st.subheader("Clean and triggered test images")
count = st.slider("Images", 4, 16, 8, step=4)
seed = st.number_input("Sample seed", 0, 10_000, 0)
idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(int(seed)))[:count]
images = data.images[idx]
clean_probs = predict(model, images, data.mean, data.std, return_probs=True)
shown = images.float() / 255
trig_images = trigger.apply(shown) if trigger else shown
trig_probs = predict(model, trig_images, data.mean, data.std, return_probs=True)
grid = st.columns(count // 2 if count > 8 else count)
for i in range(count):
    col = grid[i % len(grid)]
    label = card.classes[int(data.labels[idx[i]])]
    for tag, img, probs in (
        ("clean", shown[i], clean_probs[i]),
        ("triggered", trig_images[i], trig_probs[i]),
    ):
        pred = int(probs.argmax())
        col.image(
            np.ascontiguousarray(img.permute(1, 2, 0).squeeze(-1).numpy()),
            clamp=True,
            caption=f"{tag}: {card.classes[pred]} ({100 * float(probs[pred]):.0f} %)",
            width="stretch",
        )
    col.caption(f"true: {label}")
