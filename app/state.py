"""Cached loaders and the sidebar shared by every page."""

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

# Tests point the app at a tiny teacher through this variable.
TEACHER_ENV = "ROBUSTKD_TEACHER"


def teacher_path() -> Path:
    return Path(os.environ.get(TEACHER_ENV) or DEFAULT_TEACHER)


@st.cache_resource(show_spinner="Loading the teacher …")
def load_teacher(path: str, mtime: float) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model and metadata of a checkpoint, cached per file version."""
    return load_checkpoint(path)


@st.cache_resource(show_spinner="Loading the test images …")
def load_test_set(name: str) -> ImageDataset:
    return load_dataset(name, "test")


def current_teacher() -> tuple[torch.nn.Module, dict[str, Any]]:
    path = teacher_path()
    if not path.exists():
        raise RobustKDError(
            f"The teacher checkpoint {path} is missing; rebuild it with 'make teacher'."
        )
    return load_teacher(str(path), path.stat().st_mtime)


def test_set_for(meta: dict[str, Any]) -> ImageDataset:
    """The test split of the teacher's data, normalised as the teacher expects."""
    data = load_test_set(meta.get("dataset") or "fashion-mnist")
    norm = meta.get("normalization")
    return data.replace(mean=tuple(norm["mean"]), std=tuple(norm["std"])) if norm else data


def sidebar() -> None:
    """Current teacher, data set and device, on every page."""
    with st.sidebar:
        st.markdown("### RobustKD Studio")
        path = teacher_path()
        st.caption(f"Teacher: `{path.name}`")
        try:
            _, meta = current_teacher()
            st.caption(f"Data: {meta.get('dataset', 'unknown')}")
        except RobustKDError as exc:
            st.error(str(exc))
        st.caption(f"Device: {device_label(resolve_device('auto'))}")
