"""Checkpoints: safetensors weights with JSON metadata; state-dict ``.pt`` files read safely.

The metadata (architecture and its arguments, classes, input shape, normalisation, trigger,
target, training config, measured ACC/ASR) lives in the safetensors header, so a checkpoint is
one self-describing file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save
from torch import nn

from robustkd.atomic import atomic_write_bytes
from robustkd.errors import CheckpointError, RobustKDError
from robustkd.models import create_model
from robustkd.models.metadata import MAX_METADATA_CHARS, parse_metadata

METADATA_KEY = "robustkd"
FORMAT_VERSION = 1
PT_SUFFIXES = (".pt", ".pth", ".bin")


def _default_teacher() -> Path:
    """The shipped teacher: inside the installed package (a wheel puts ``assets/`` there as
    ``robustkd/_assets/``), else in the checkout's ``assets/`` (a checkout or editable install)."""
    from importlib.resources import files

    name = "default_teacher.safetensors"
    packaged = Path(str(files("robustkd") / "_assets" / name))
    return packaged if packaged.is_file() else Path(__file__).resolve().parents[2] / "assets" / name


DEFAULT_TEACHER = _default_teacher()


def save_checkpoint(path: str | Path, model: nn.Module, metadata: Mapping[str, Any]) -> Path:
    """Write ``model``'s weights and ``metadata`` to a safetensors file, atomically."""
    path = Path(path)
    if "architecture" not in metadata or "model_args" not in metadata:
        raise ValueError("checkpoint metadata needs 'architecture' and 'model_args'")
    meta = {"format": FORMAT_VERSION, **metadata}
    text = json.dumps(meta)
    if len(text) > MAX_METADATA_CHARS:  # it could not be read back
        raise CheckpointError(
            f"The metadata for {path.name} has {len(text):,} characters, more than the limit of "
            f"{MAX_METADATA_CHARS:,}; use a smaller trigger pattern."
        )
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, save(tensors, metadata={METADATA_KEY: text}))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata stored in a safetensors checkpoint ({} for a ``.pt`` state dict)."""
    path = _existing(path)
    if path.suffix in PT_SUFFIXES:
        return {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(_not_a_checkpoint(path)) from exc
    if raw is None:
        return {}
    return parse_metadata(raw, path.name)  # limits, then every known field type-checked


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or of a ``.pt`` state dict (``weights_only`` loading)."""
    path = _existing(path)
    if path.suffix in PT_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{path} is not a plain PyTorch state dict (we load .pt files only with "
                "weights_only=True for safety); re-save it with torch.save(model.state_dict())."
            ) from exc
        return _unwrap_state_dict(obj, path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(_not_a_checkpoint(path)) from exc


def load_checkpoint(
    path: str | Path,
    architecture: str | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a checkpoint describes and load its weights.

    Arguments override (or, for a bare ``.pt`` state dict, supply) what the metadata says.
    """
    meta = read_metadata(path)
    state = read_state_dict(path)
    args = dict(meta.get("model_args", {}))
    arch = architecture or meta.get("architecture")
    if arch is None:
        raise CheckpointError(
            f"{Path(path).name} does not record its architecture; pass it (--arch NAME) "
            "together with its number of classes."
        )
    if num_classes is not None:
        args["num_classes"] = num_classes
    if in_channels is not None:
        args["in_channels"] = in_channels
    if image_size is not None:
        args["image_size"] = image_size
    if "image_size" in args and isinstance(args["image_size"], list):
        args["image_size"] = tuple(args["image_size"])
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"{Path(path).name} holds NaN or infinite weights (in {', '.join(bad[:3])}"
            f"{' …' if len(bad) > 3 else ''}); it is broken, use another checkpoint."
        )
    model = build_recorded_model(arch, args, Path(path).name)
    check_fits(model, state, arch, args.get("num_classes", 10), Path(path).name)
    model.load_state_dict(state)
    model.to(device).eval()
    meta = {**meta, "architecture": arch, "model_args": _jsonable(args)}
    return model, meta


def build_recorded_model(arch: str, args: Mapping[str, Any], name: str) -> nn.Module:
    """``create_model(arch, **args)`` for arguments a file recorded: one sentence if they do not
    fit (an argument the architecture lacks, or a value it cannot take)."""
    try:
        return create_model(arch, **args)
    except RobustKDError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        extra = sorted(set(args) - {"num_classes", "in_channels", "image_size"})
        raise CheckpointError(
            f"{name} records model arguments ({', '.join(extra) or 'none beyond the input'}) "
            f"that architecture {arch!r} cannot be built with; re-import the teacher with "
            "robustkd import."
        ) from exc


def check_fits(
    model: nn.Module, state: Mapping[str, torch.Tensor], arch: str, num_classes: int, name: str
) -> None:
    """Raise a CheckpointError naming the first missing/unexpected keys or shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches (checkpoint vs model)", shapes),
    ):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{label}: {', '.join(items[:3])}{more}")
    raise CheckpointError(
        f"{name} does not fit architecture {arch!r} with {num_classes} classes ("
        + "; ".join(parts)
        + "); pass the architecture and class count the checkpoint was trained with."
    )


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    # Other toolkits wrap the weights: {"state_dict": …}, {"model": …}, DataParallel "module."
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            inner = obj.get(key)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                obj = inner
                break
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise CheckpointError(
            f"{path} holds no state dict of tensors; save one with torch.save(model.state_dict())."
        )
    prefix = "module."
    if all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return dict(obj)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist; check the path.")
    return path


def _not_a_checkpoint(path: Path) -> str:
    return (
        f"{path} is not a checkpoint (expected a .safetensors file, or a .pt/.pth state dict); "
        "pick a model file saved by robustkd or torch.save(model.state_dict())."
    )


def _jsonable(args: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
