"""Cached loaders, the current teacher, the user's data and the sidebar shared by every page.

Pages call ``current_teacher()`` / ``test_set_for(meta)`` and never load files themselves; a
user's mistake surfaces as a ``RobustKDError`` whose message ``show_error`` displays.

Session keys: ``teacher_path`` (the checkpoint in use), ``teacher_args`` (the ``ModelOptions``
fields it is loaded with, a plain JSON-able dict; ``{}`` = what the file records) and
``user_data`` (``{"distill": path | None, "trusted": ..., "test": ...}``, the user's own image
sets). Uploads are kept per content under the runs folder, so two files of the same name never
overwrite each other; each new upload removes old unused ones (``robustkd.runs.uploads``).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import streamlit as st
import torch

from robustkd.atomic import atomic_write_bytes
from robustkd.attacks import trigger_from_dict
from robustkd.data.datasets import ImageDataset, dataset_names, load_dataset
from robustkd.errors import ConfigError, DataError, RobustKDError, redact_paths
from robustkd.models.checkpoints import DEFAULT_TEACHER, read_metadata
from robustkd.models.importer import ModelOptions, import_checkpoint
from robustkd.models.importer import load_model as import_model
from robustkd.models.modelcard import check_fits_data, normalized_for
from robustkd.models.sharing import share
from robustkd.runs.liveness import refresh_state
from robustkd.runs.progress import run_label
from robustkd.runs.queue import queue_positions
from robustkd.runs.store import (
    DAMAGED,
    Run,
    atomic_write_text,
    default_runs_root,
    list_damaged_runs,
    list_runs,
    validate_name,
)
from robustkd.runs.uploads import clean_uploads, touch
from robustkd.training.device import device_label, resolve_device

# Tests point the app at a tiny teacher through this variable.
TEACHER_ENV = "ROBUSTKD_TEACHER"
UPLOADS = "uploads"  # sub-folder of the runs root where uploaded files are kept
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")
DATA_SUFFIXES = (".zip", ".npz")
# the user's image sets: session key → what the messages call it
DATA_ROLES = {"distill": "distillation set", "trusted": "trusted clean set", "test": "test set"}
# which of the user's sets stands in for a split of a named data set
SPLIT_ROLES = {"test": "test", "val": "trusted"}
ARCH_AUTO = "recognise from the keys"
DATA_RECORDED = "as recorded"
DATA_UPLOADED = "my uploaded data"
NORMALISATIONS = {
    "recorded (else the data set's)": None,
    "none (pixels in [0, 1])": "none",
    "the data set's": "dataset",
    "explicit mean & std": "explicit",
}
OPTION_KEYS = tuple(f.name for f in ModelOptions.__dataclass_fields__.values())


def runs_root() -> Path:
    return default_runs_root()


def default_teacher_path() -> Path:
    return Path(os.environ.get(TEACHER_ENV) or DEFAULT_TEACHER)


# teachers shipped beside the default, each showing an attack (``make examples`` rebuilds them)
EXAMPLES = Path(DEFAULT_TEACHER).parent / "examples"
EXAMPLE_NAMES = {  # file stem → what the sidebar calls it
    "optimized-blend": "Optimised blend: a learned trigger (mask ≤ 0.2)",
    "adaptive": "Adaptive blend: trained to hide from the variance defence",
    "adaptive-learned": "Adaptive, learned trigger: hides at every stage",
    "adaptive-class": "Adaptive, learned trigger: hides within every class too",
    "adba": "ADBA-style: passes to a student distilled on clean images",
}


def shipped_teachers() -> dict[str, Path]:
    """The shipped teachers by the names the sidebar shows: the default first."""
    default = default_teacher_path()
    found = {f"Default: {default.stem}": default}
    for path in sorted(EXAMPLES.glob("*.safetensors")):
        found[EXAMPLE_NAMES.get(path.stem, path.stem)] = path
    return found


def teacher_path() -> Path:
    """The checkpoint the user picked (the shipped default until they pick another)."""
    return Path(st.session_state.get("teacher_path") or default_teacher_path())


def teacher_options() -> dict[str, Any]:
    """The model options the current teacher is loaded with (``{}``: what the file records)."""
    return dict(st.session_state.get("teacher_args") or {})


def model_options(options: dict[str, Any] | None) -> ModelOptions:
    """A plain options dict (as kept in the session) as a validated ``ModelOptions``."""
    values = {k: v for k, v in (options or {}).items() if k in OPTION_KEYS}
    for key in ("mean", "std", "image_size"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    return ModelOptions(**values).validate()


# --------------------------------------------------------------------------- the user's data


def user_data() -> dict[str, str | None]:
    """Paths of the user's own image sets in this session (None: the teacher's data set's)."""
    current = st.session_state.get("user_data")
    if not isinstance(current, dict):
        current = st.session_state["user_data"] = {}
    for role in DATA_ROLES:  # in place: callers may set a role on what they got
        value = current.get(role)
        current[role] = value if isinstance(value, str) and value else None
    return current


@st.cache_resource(show_spinner="Reading your images …", max_entries=12)
def load_user_set(path: str, role: str) -> ImageDataset:
    """One of the user's image sets, cached per file (uploads never change: kept per content)."""
    from robustkd.data.userdata import load_user_data

    where = Path(path)
    name = where.stem if where.is_file() else where.name
    if name.startswith("data-"):  # the folder we extracted an archive without a top folder into
        name = f"your {DATA_ROLES[role]}"
    return load_user_data(where, name=name, allow_unlabelled=role == "distill")


def user_data_set(role: str) -> ImageDataset | None:
    """The user's ``role`` set (``distill``, ``trusted`` or ``test``), or None if not given."""
    path = user_data().get(role)
    if not path:
        return None
    if not Path(path).exists():
        raise DataError(
            f"Your uploaded {DATA_ROLES[role]} is no longer on the server; upload it again."
        )
    return load_user_set(path, role)


def reference_data() -> tuple[str, str] | None:
    """(role, path) of the user's set that tells a teacher its input shape and classes.

    The same order as the command line: the test set, else the trusted set, else the
    distillation set.
    """
    paths = user_data()
    return next(((r, paths[r]) for r in ("test", "trusted", "distill") if paths[r]), None)


def describe_data(data: ImageDataset) -> str:
    """Its size in words: N images, C×H×W, K classes (or unlabelled)."""
    c, h, w = data.input_shape
    kind = f"{data.num_classes} classes" if data.labelled else "unlabelled"
    return f"{len(data):,} images, {c}×{h}×{w}, {kind}"


# --------------------------------------------------------------------------- models


@st.cache_resource(show_spinner="Loading the model …", max_entries=16)
def load_model(
    path: str,
    mtime: float,
    options: dict[str, Any] | None = None,
    data: tuple[str, str] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A checkpoint's model and metadata, cached per file version, options and reference data.

    ``options`` holds ``ModelOptions`` fields as plain values; ``data`` is ``(role, path)`` of
    the user's set that fills in what neither the file nor the options say.
    """
    reference = load_user_set(data[1], data[0]) if data else None
    model, meta = import_model(path, model_options(options), reference)
    if not meta.get("dataset") and reference is None:
        meta["dataset"] = "fashion-mnist"  # the default data, as on the command line
    k = meta.get("model_args", {}).get("num_classes")
    if not meta.get("classes") or len(meta["classes"]) != k:
        classes: tuple[str, ...] = ()
        if meta.get("dataset"):
            try:  # a bare state dict: name the classes after its data set
                classes = load_split(meta["dataset"]).classes
            except RobustKDError:
                classes = ()
        meta["classes"] = list(classes) if len(classes) == k else [str(i) for i in range(k)]
    # one module for every session: share() makes it refuse hooks, mode switches and moves;
    # the library works on per-call views of it (robustkd.models.sharing)
    return share(model), meta


@st.cache_resource(show_spinner="Loading the test images …")
def load_split(name: str, split: str = "test") -> ImageDataset:
    return load_dataset(name, split)


def current_teacher() -> tuple[torch.nn.Module, dict[str, Any]]:
    path = teacher_path()
    if not path.exists():
        raise RobustKDError(
            f"The teacher checkpoint {path.name} is missing; rebuild it with 'make teacher' or "
            "pick another teacher in the sidebar."
        )
    return load_model(str(path), path.stat().st_mtime, teacher_options(), reference_data())


def test_set_for(meta: dict[str, Any], split: str = "test") -> ImageDataset:
    """A split of the teacher's data, normalised as the teacher expects.

    The user's own test set stands in for ``test`` and their trusted clean set for ``val``
    (the defender's clean data) when they uploaded one.
    """
    role = SPLIT_ROLES.get(split)
    data = user_data_set(role) if role else None
    what = f"uploaded {DATA_ROLES[role]}" if data is not None and role else ""
    if data is None:
        name = meta.get("dataset") or "fashion-mnist"
        data = load_split(name, split)
        what = f"{name} {split} split"
    check_fits_data(meta, data, what)
    return normalized_for(meta, data)


def data_key() -> dict[str, str | None]:
    """What the current data depends on, for caches keyed on the teacher and its data."""
    return dict(user_data())


def keep_widget_values(
    keys: tuple[str, ...], valid: dict[str, Callable[[Any], bool]] | None = None
) -> None:
    """Keep what the user chose in widgets a run may not draw (another page or tab open).

    Streamlit forgets a widget's value once a run does not draw it, so at the start of every
    run each key's value is copied aside (``_<key>``) while it exists and given back when it
    was forgotten. A value its ``valid`` check refuses (the options changed: another teacher,
    a smaller data set) is forgotten, so the widget starts from its default. Call it before the
    widgets are drawn.
    """
    checks = valid or {}
    for key in keys:
        ok = checks.get(key)
        kept = f"_{key}"
        if key in st.session_state:
            if ok is None or ok(st.session_state[key]):
                st.session_state[kept] = st.session_state[key]
                continue
            del st.session_state[key]
            st.session_state.pop(kept, None)
        elif st.session_state.get(kept) is not None:
            if ok is None or ok(st.session_state[kept]):
                st.session_state[key] = st.session_state[kept]
            else:
                del st.session_state[kept]


def show_error(exc: BaseException) -> None:
    """One clear sentence for a user's mistake (never a traceback, nor a server's folders)."""
    message = str(exc) if isinstance(exc, RobustKDError) else f"Unexpected error: {exc}"
    st.error(redact_paths(message))


# --------------------------------------------------------------------------- uploads


def _safe_name(name: str, suffixes: tuple[str, ...], what: str) -> str:
    stem, suffix = Path(name).stem, Path(name).suffix.lower()
    if suffix not in suffixes:
        raise DataError(what.format(name=name))
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)[:80].lstrip("._-")
    return validate_name(f"{safe or 'upload'}{suffix}", "file name")


def _keep(folder: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to ``folder/name`` atomically, unless an upload of it is already there."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if path.is_file() and path.stat().st_size == len(data):
        return path  # the same content under the same name: already kept
    return atomic_write_bytes(path, data)


def _content_folder(data: bytes, *parts: str) -> Path:
    """Where an upload of ``data`` is kept; saving one first removes old unused uploads."""
    folder = runs_root().joinpath(UPLOADS, *parts, hashlib.sha256(data).hexdigest()[:16])
    touch(folder)  # the same content again: its age starts afresh
    clean_uploads(runs_root(), keep=[folder, teacher_path(), *user_data().values()])
    return folder


def save_upload(name: str, data: bytes) -> Path:
    """Keep an uploaded checkpoint under the runs folder, per content (nothing is lost)."""
    safe = _safe_name(
        name,
        CHECKPOINT_SUFFIXES,
        "{name} is not a checkpoint file; upload a .safetensors file or a .pt/.pth state dict.",
    )
    return _keep(_content_folder(data), safe, data)


def save_data_upload(name: str, data: bytes) -> Path:
    """Keep an uploaded data set (a .zip or an .npz) per content; return its data root."""
    safe = _safe_name(
        name,
        DATA_SUFFIXES,
        "{name} is neither a .zip nor an .npz file; upload a .zip of an ImageFolder tree, of a "
        "folder of images or of one .npz, or the .npz itself.",
    )
    folder = _content_folder(data, "data")
    path = _keep(folder, safe, data)
    if path.suffix == ".npz":
        return path
    marker = folder / "root.txt"  # where the archive's data starts, once extracted
    if marker.is_file():
        root = (folder / marker.read_text(encoding="utf-8").strip()).resolve()
        if root.exists() and root.is_relative_to(folder.resolve()):
            return root
    from robustkd.data.userdata import extract_zip

    # a fresh folder per extraction: two sessions uploading the same archive never collide
    root = extract_zip(path, folder / f"data-{uuid.uuid4().hex[:8]}")
    atomic_write_text(marker, str(root.relative_to(folder)))
    return root


def run_checkpoints() -> dict[str, Path]:
    """Models written by finished runs: label → checkpoint path."""
    found: dict[str, Path] = {}
    for run in list_runs(runs_root()):
        for ckpt in sorted(run.checkpoints_dir.glob("*.safetensors")):
            if not ckpt.name.endswith("-detox.safetensors"):
                found[f"{run.id} / {ckpt.stem}"] = ckpt
    return found


# --------------------------------------------------------------------------- sidebar widgets


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values:
        raise ConfigError(
            f"The {what} must be numbers separated by commas, one per input channel, such as "
            "0.5,0.5,0.5."
        )
    return values


def _option_widgets() -> dict[str, Any]:
    """The model options a user may give for an uploaded checkpoint, as a plain dict."""
    from robustkd.models import model_names
    from robustkd.models.interop import LAYOUTS

    with st.expander("Model options (what the file does not record)"):
        arch = st.selectbox("Architecture", [ARCH_AUTO, *model_names()], key="teacher_arch")
        classes = st.number_input(
            "Classes (0 = read from the weights)", 0, 100_000, 0, key="teacher_classes"
        )
        channels = st.number_input(
            "Input channels (0 = from the weights)", 0, 64, 0, key="teacher_channels"
        )
        size = st.number_input("Image size (0 = the data's)", 0, 4096, 0, key="teacher_size")
        norm_label = st.selectbox("Normalisation", list(NORMALISATIONS), key="teacher_norm")
        norm = NORMALISATIONS[norm_label]
        mean = std = None
        if norm == "explicit":
            mean = st.text_input("Mean (one per channel)", "0.5", key="teacher_mean")
            std = st.text_input("Std (one per channel)", "0.25", key="teacher_std")
        layout = st.selectbox("Source layout", LAYOUTS, key="teacher_layout")
        dataset = st.selectbox(
            "Trained on",
            [DATA_RECORDED, *dataset_names(), DATA_UPLOADED],
            key="teacher_dataset",
            help="Names its classes; 'my uploaded data' takes shape and classes from the data "
            "you upload below.",
        )
    options: dict[str, Any] = {
        "architecture": None if arch == ARCH_AUTO else arch,
        "num_classes": int(classes) or None,
        "in_channels": int(channels) or None,
        "image_size": int(size) or None,
        "normalization": None if norm == "explicit" else norm,
        "mean": _floats(mean, "mean") if mean is not None else None,
        "std": _floats(std, "std") if std is not None else None,
        "layout": layout,
        "dataset": None if dataset in (DATA_RECORDED, DATA_UPLOADED) else dataset,
    }
    if dataset == DATA_UPLOADED and reference_data() is None:
        raise ConfigError(
            "You chose 'my uploaded data' but have uploaded no data; upload your test set under "
            "'Your data' first, or pick the data set the teacher was trained on."
        )
    options = {k: v for k, v in options.items() if v is not None and v != "auto"}
    model_options(options)  # refuse what cannot work before anything is switched
    return options


def _use_checkpoint(upload: Any, widgets: dict[str, Any] | Exception) -> None:
    try:
        if isinstance(widgets, Exception):
            raise widgets
        path = save_upload(upload.name, upload.getvalue())
        _, meta = load_model(str(path), path.stat().st_mtime, widgets, reference_data())
        test_set_for(meta)  # validates before switching: nothing in use is lost
        if meta.get("trigger"):  # a recorded path or an unreadable pattern is refused now
            trigger_from_dict(meta["trigger"])
    except RobustKDError as exc:
        show_error(exc)
        return
    st.session_state["teacher_path"] = str(path)
    st.session_state["teacher_args"] = widgets
    st.success(f"Now using {upload.name} ({meta.get('architecture')}).")


def _import_current() -> None:
    """Save the uploaded teacher with its metadata beside the upload and switch to it."""
    path, options = teacher_path(), teacher_options()
    try:
        _, meta = current_teacher()
        name = f"{path.stem}.safetensors"
        if path.suffix == ".safetensors" or (path.parent / name).exists():
            digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()
            name = f"{path.stem}-imported-{digest[:8]}.safetensors"
        out = path.parent / validate_name(name, "file name")
        ref = reference_data()
        data = load_user_set(ref[1], ref[0]) if ref else None
        extra = {k: meta[k] for k in ("dataset", "classes") if meta.get(k)}
        if not out.exists():
            import_checkpoint(path, out, model_options(options), data, extra)
    except RobustKDError as exc:
        show_error(exc)
        return
    st.session_state["teacher_path"] = str(out)
    st.session_state["teacher_args"] = {}
    st.success(f"Imported as {out.name}, with its metadata; now using it.")


def _in_uploads(path: Path) -> bool:
    try:
        return path.resolve().is_relative_to((runs_root() / UPLOADS).resolve())
    except OSError:
        return False


def _importable(path: Path) -> bool:
    """An uploaded teacher whose file does not (yet) say everything about it."""
    if not _in_uploads(path):
        return False
    if teacher_options():
        return True
    try:
        return not read_metadata(path).get("architecture")
    except RobustKDError:
        return False


def pick_teacher() -> None:
    """Sidebar widget: a shipped teacher, a run's output, or an uploaded checkpoint."""
    choice = st.radio(
        "Teacher", ["Shipped", "From a run", "Upload"], key="teacher_src", horizontal=True
    )
    if choice == "Shipped":
        shipped = shipped_teachers()
        label = next(iter(shipped))
        if len(shipped) > 1:
            label = st.selectbox(
                "Shipped teacher",
                list(shipped),
                key="teacher_shipped",
                help="The default carries a BadNets patch; the others show attacks built to "
                "survive distillation or to evade the variance defence (docs/results.md: "
                "Attacks that survive distillation).",
            )
        st.session_state["teacher_path"] = str(shipped[label])
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
        upload = st.file_uploader(
            "Checkpoint (.safetensors, .pt, .pth)",
            key="teacher_upload",
            type=["safetensors", "pt", "pth"],
        )
        try:
            widgets: dict[str, Any] | Exception = _option_widgets()
        except RobustKDError as exc:
            widgets = exc  # shown when the user asks to use the checkpoint
        if upload is not None and st.button("Use this checkpoint", key="teacher_use"):
            _use_checkpoint(upload, widgets)
        if _importable(teacher_path()) and st.button(
            "Import (save with metadata)",
            key="teacher_import",
            help="Writes a .safetensors file that records architecture, classes, input shape "
            "and normalisation, so it loads with no options anywhere.",
        ):
            _import_current()


def pick_data() -> None:
    """Sidebar expander: the user's distillation, trusted clean and test sets."""
    paths = user_data()
    with st.expander("Your data", expanded=any(paths.values())):
        st.caption(
            "A .zip of an ImageFolder tree (one folder per class), of a folder of images or of "
            "one .npz; or an .npz (x: N×H×W[×C] uint8, optional y). Only the distillation set "
            "may be unlabelled."
        )
        for role, what in DATA_ROLES.items():
            upload = st.file_uploader(
                what.capitalize(), type=["zip", "npz"], key=f"data_upload_{role}"
            )
            seen = f"data_seen_{role}"
            if upload is not None and st.session_state.get(seen) != upload.file_id:
                st.session_state[seen] = upload.file_id  # each upload is read once
                try:
                    path = save_data_upload(upload.name, upload.getvalue())
                    load_user_set(str(path), role)
                except RobustKDError as exc:
                    show_error(exc)  # the set in use (if any) stays
                else:
                    paths[role] = str(path)
            if paths[role]:
                try:
                    data = user_data_set(role)
                except RobustKDError as exc:
                    show_error(exc)
                    continue
                assert data is not None
                st.caption(f"{what.capitalize()}: `{data.name}` — {describe_data(data)}")
                if st.button("Forget", key=f"data_forget_{role}"):
                    paths[role] = None
                    st.rerun()


def pick_run() -> Run | None:
    """Sidebar widget: the run the Compare and Distil pages focus on."""
    runs = list_runs(runs_root())
    damaged = {f"{d.id} · {DAMAGED}": d for d in list_damaged_runs(runs_root())}
    if not runs and not damaged:
        st.caption("Runs: none yet")
        return None
    positions = queue_positions(runs_root())
    labels: dict[str, Run] = {}
    for r in runs:
        try:
            labels[f"{r.id} · {run_label(refresh_state(r), positions.get(r.id))}"] = r
        except RobustKDError:  # damaged since it was listed
            labels[f"{r.id} · {DAMAGED}"] = r
    label = st.selectbox("Run", [*labels, *damaged], key="run_pick")
    if label in damaged:
        st.warning(f"Run {damaged[label].id} is damaged: {damaged[label].reason}.")
        return None
    run = labels[label]
    st.session_state["run_id"] = run.id
    return run


def sidebar() -> None:
    """Teacher, data, device and run picker, on every page."""
    with st.sidebar:
        st.markdown("### RobustKD Studio")
        pick_teacher()
        pick_data()
        try:
            _, meta = current_teacher()
            st.caption(f"Teacher: `{teacher_path().name}` ({meta.get('architecture')})")
            test = user_data_set("test")
            data = f"your test set `{test.name}`" if test is not None else meta.get("dataset")
            st.caption(f"Data: {data or 'unknown'}")
        except RobustKDError as exc:
            show_error(exc)
        st.caption(f"Device: {device_label(resolve_device('auto'))}")
        pick_run()
