"""Cached loaders, the current teacher and the sidebar shared by every page.

Pages call ``current_teacher()`` / ``test_set_for(meta)`` and never load files themselves; a
user's mistake surfaces as a ``RobustKDError`` whose message ``show_error`` displays.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import streamlit as st
import torch

from robustkd.checkpoints import load_checkpoint
from robustkd.cli import DEFAULT_TEACHER
from robustkd.data import ImageDataset, load_dataset
from robustkd.device import device_label, resolve_device
from robustkd.errors import RobustKDError
from robustkd.runs import Run, default_runs_root, list_runs, refresh_state, validate_name

# Tests point the app at a tiny teacher through this variable.
TEACHER_ENV = "ROBUSTKD_TEACHER"
UPLOADS = "uploads"  # sub-folder of the runs root where uploaded checkpoints are kept


def runs_root() -> Path:
    return default_runs_root()


def default_teacher_path() -> Path:
    return Path(os.environ.get(TEACHER_ENV) or DEFAULT_TEACHER)


def teacher_path() -> Path:
    """The checkpoint the user picked (the shipped default until they pick another)."""
    return Path(st.session_state.get("teacher_path") or default_teacher_path())


@st.cache_resource(show_spinner="Loading the model …", max_entries=16)
def load_model(
    path: str, mtime: float, arch: str | None = None, num_classes: int | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A checkpoint's model and metadata, cached per file version."""
    model, meta = load_checkpoint(path, architecture=arch, num_classes=num_classes)
    meta.setdefault("dataset", "fashion-mnist")
    if not meta.get("classes"):  # a bare state dict: name the classes after its data set
        classes = load_split(meta["dataset"]).classes
        k = meta.get("model_args", {}).get("num_classes", len(classes))
        meta["classes"] = list(classes) if k == len(classes) else [str(i) for i in range(k)]
    return model.eval(), meta


@st.cache_resource(show_spinner="Loading the test images …")
def load_split(name: str, split: str = "test") -> ImageDataset:
    return load_dataset(name, split)


def current_teacher() -> tuple[torch.nn.Module, dict[str, Any]]:
    path = teacher_path()
    if not path.exists():
        raise RobustKDError(
            f"The teacher checkpoint {path} is missing; rebuild it with 'make teacher' or pick "
            "another teacher in the sidebar."
        )
    extra = st.session_state.get("teacher_args") or {}
    return load_model(str(path), path.stat().st_mtime, **extra)


def test_set_for(meta: dict[str, Any], split: str = "test") -> ImageDataset:
    """A split of the teacher's data, normalised as the teacher expects."""
    data = load_split(meta.get("dataset") or "fashion-mnist", split)
    k = meta.get("model_args", {}).get("num_classes", data.num_classes)
    shape = tuple(meta.get("input_shape") or data.input_shape)
    if k != data.num_classes or shape != data.input_shape:
        raise RobustKDError(
            f"This model takes {shape} inputs with {k} classes but {data.name} has "
            f"{data.input_shape} images in {data.num_classes} classes; pick a model for this data."
        )
    norm = meta.get("normalization")
    return data.replace(mean=tuple(norm["mean"]), std=tuple(norm["std"])) if norm else data


def show_error(exc: BaseException) -> None:
    """One clear sentence for a user's mistake (never a traceback)."""
    st.error(str(exc) if isinstance(exc, RobustKDError) else f"Unexpected error: {exc}")


def save_upload(name: str, data: bytes) -> Path:
    """Keep an uploaded checkpoint under the runs folder (nothing a user uploads is lost)."""
    stem, suffix = Path(name).stem, Path(name).suffix.lower()
    if suffix not in (".safetensors", ".pt", ".pth"):
        raise RobustKDError(
            f"{name} is not a checkpoint file; upload a .safetensors file or a .pt/.pth state dict."
        )
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)[:80] or "upload"
    folder = runs_root() / UPLOADS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / validate_name(f"{safe}{suffix}", "file name")
    path.write_bytes(data)
    return path


def run_checkpoints() -> dict[str, Path]:
    """Models written by finished runs: label → checkpoint path."""
    found: dict[str, Path] = {}
    for run in list_runs(runs_root()):
        for ckpt in sorted(run.checkpoints_dir.glob("*.safetensors")):
            if not ckpt.name.endswith("-detox.safetensors"):
                found[f"{run.id} / {ckpt.stem}"] = ckpt
    return found


def pick_teacher() -> None:
    """Sidebar widget: the shipped default, a run's output, or an uploaded checkpoint."""
    choice = st.radio(
        "Teacher", ["Shipped default", "From a run", "Upload"], key="teacher_src", horizontal=True
    )
    if choice == "Shipped default":
        st.session_state["teacher_path"] = str(default_teacher_path())
        st.session_state["teacher_args"] = {}
    elif choice == "From a run":
        options = run_checkpoints()
        if not options:
            st.info("No run has written a model yet.")
            return
        label = st.selectbox("Model", list(options), key="teacher_run")
        st.session_state["teacher_path"] = str(options[label])
        st.session_state["teacher_args"] = {}
    else:
        from robustkd.models import model_names

        upload = st.file_uploader(
            "Checkpoint (.safetensors, .pt, .pth)",
            key="teacher_upload",
            type=["safetensors", "pt", "pth"],
        )
        arch = st.selectbox(
            "Architecture (for a bare state dict)",
            ["from metadata", *model_names()],
            key="teacher_arch",
        )
        classes = st.number_input("Classes", 2, 1000, 10, key="teacher_classes")
        if upload is not None and st.button("Use this checkpoint", key="teacher_use"):
            try:
                path = save_upload(upload.name, upload.getvalue())
                args = (
                    {} if arch == "from metadata" else {"arch": arch, "num_classes": int(classes)}
                )
                _, meta = load_model(str(path), path.stat().st_mtime, **args)
                test_set_for(meta)  # validates before switching: nothing in use is lost
            except RobustKDError as exc:
                show_error(exc)
                return
            st.session_state["teacher_path"] = str(path)
            st.session_state["teacher_args"] = args
            st.success(f"Now using {upload.name}.")


def pick_run() -> Run | None:
    """Sidebar widget: the run the Compare and Distil pages focus on."""
    runs = list_runs(runs_root())
    if not runs:
        st.caption("Runs: none yet")
        return None
    labels = {f"{r.id} · {refresh_state(r).get('state')}": r for r in runs}
    label = st.selectbox("Run", list(labels), key="run_pick")
    run = labels[label]
    st.session_state["run_id"] = run.id
    return run


def sidebar() -> None:
    """Teacher, data set, device and run picker, on every page."""
    with st.sidebar:
        st.markdown("### RobustKD Studio")
        pick_teacher()
        try:
            _, meta = current_teacher()
            st.caption(f"Teacher: `{teacher_path().name}` ({meta.get('architecture')})")
            st.caption(f"Data: {meta.get('dataset', 'unknown')}")
        except RobustKDError as exc:
            show_error(exc)
        st.caption(f"Device: {device_label(resolve_device('auto'))}")
        pick_run()
