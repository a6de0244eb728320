"""Attributions page: where a model looks on clean and triggered test images, and how much of
its attribution falls inside the trigger's region."""

from __future__ import annotations

import streamlit as st
import torch

from app.state import current_teacher, load_model, run_checkpoints, show_error, test_set_for
from robustkd.analysis.attribution import ATTRIBUTION_METHODS, attribute, mass_in_region, overlay
from robustkd.analysis.metrics import backdoor_targets, predict
from robustkd.attacks import trigger_from_dict
from robustkd.data.datasets import to_float
from robustkd.errors import RobustKDError
from robustkd.models.modelcard import attack_mode_of, normalized_for

TEACHER = "Teacher"

st.title("Attributions")
try:
    teacher, meta = current_teacher()
    data = test_set_for(meta)
    trigger = trigger_from_dict(meta["trigger"]) if meta.get("trigger") else None
    mode = attack_mode_of(meta)
except RobustKDError as exc:
    show_error(exc)
    st.stop()
if trigger is None:
    st.info("This teacher records no trigger; pick a backdoored teacher in the sidebar.")
    st.stop()

students = run_checkpoints()
c1, c2, c3, c4 = st.columns([3, 2, 1, 1])
choice = c1.selectbox("Model", [TEACHER, *students], key="attr_model")
method = c2.selectbox("Method", ATTRIBUTION_METHODS, index=0, key="attr_method")
k = int(c3.number_input("Images", 1, 8, 4, key="attr_k"))
seed = int(c4.number_input("Seed", 0, 10_000, 0, key="attr_seed"))

try:
    if choice == TEACHER:
        model, model_meta = teacher, meta
    else:
        path = students[choice]
        model, model_meta = load_model(str(path), path.stat().st_mtime)
    seen = normalized_for(model_meta, data)  # the model's own normalisation, if it records one
    mean, std = seen.mean, seen.std
    layer = None
    if method == "layer-gradcam":
        stages = list(getattr(model, "feature_layers", []))
        layer = st.selectbox("Layer", stages, key="attr_layer") if stages else None
    # images already of their attack target cannot show a backdoor, as in ASR
    target = meta.get("target")
    aims = (
        backdoor_targets(data.labels, target, mode, data.num_classes)
        if target is not None
        else None
    )
    pool = torch.nonzero(data.labels != aims).flatten() if aims is not None else None
    pool = pool if pool is not None and pool.numel() else torch.arange(len(data))
    pick = torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(seed))[:k]
    idx = pool[pick]
    clean = to_float(data.images[idx])
    triggered = trigger.apply(clean)
    clean_pred = predict(model, clean, mean, std)
    trig_pred = predict(model, triggered, mean, std)
    with st.spinner(f"Computing {method} …"):
        clean_maps = attribute(model, clean, clean_pred, method, mean, std, layer=layer)
        trig_maps = attribute(model, triggered, trig_pred, method, mean, std, layer=layer)
    region = trigger.region_mask(*clean.shape[-2:])
    clean_share = mass_in_region(clean_maps, region)
    trig_share = mass_in_region(trig_maps, region)
except RobustKDError as exc:
    show_error(exc)
    st.stop()

m1, m2 = st.columns(2)
m1.metric(
    "Mass in the trigger region — triggered",
    f"{100 * float(trig_share.mean()):.1f} %",
    help=f"Mean over the {k} triggered images of the share of {method} attribution inside "
    f"the pixels the {trigger.name} trigger changes ({int(region.sum())} of {region.numel()}).",
)
m2.metric(
    "Mass in the trigger region — clean",
    f"{100 * float(clean_share.mean()):.1f} %",
    help="The same share on the clean images, for comparison.",
)
classes = list(meta.get("classes") or [str(i) for i in range(data.num_classes)])
st.caption(
    f"{method} for the predicted class of {'the teacher' if choice == TEACHER else choice}; "
    f"red marks where attribution is high. Trigger `{trigger.name}`, "
    + (
        "all-to-all (each class's target is the class after it)."
        if mode == "all-to-all"
        else f"target class {target} ({classes[target] if target is not None else '–'})."
    )
)
for start in range(0, k, 2):
    cols = st.columns(4)
    for j, i in enumerate(range(start, min(start + 2, k))):
        for col, tag, img, attr, pred, share in (
            (cols[2 * j], "clean", clean[i], clean_maps[i], clean_pred[i], clean_share[i]),
            (cols[2 * j + 1], "triggered", triggered[i], trig_maps[i], trig_pred[i], trig_share[i]),
        ):
            col.image(
                overlay(img, attr),
                caption=f"{tag} → {classes[int(pred)]} · {100 * float(share):.2f} % in region",
                width="stretch",
            )
