"""A model card: what a checkpoint is, how big, what it was trained on and how it measures."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from robustkd.data.datasets import ImageDataset
from robustkd.errors import ConfigError
from robustkd.models.complexity import count_flops, count_parameters
from robustkd.models.metadata import MODES


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """The facts the CLI's ``info`` and the app's Teacher page show."""

    path: str
    architecture: str | None
    params: int
    flops: int
    input_shape: tuple[int, int, int]
    feature_layers: list[str]
    file_bytes: int
    dataset: str | None
    classes: list[str]
    trigger: dict[str, Any] | None
    target: int | None
    attack_mode: str  # all-to-one or all-to-all (see metrics.backdoor_targets)
    student_architecture: str | None
    metrics: dict[str, Any] | None
    metadata: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d


def input_shape_of(meta: dict[str, Any]) -> tuple[int, int, int]:
    """The ``(C, H, W)`` a checkpoint's model takes, from its metadata."""
    args = meta.get("model_args", {})
    size = args.get("image_size", 28)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(args.get("in_channels", 1)), int(h), int(w)


def model_card(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> ModelCard:
    """Describe ``model`` loaded from ``path`` with metadata ``meta``."""
    shape = input_shape_of(meta)
    return ModelCard(
        path=str(path),
        architecture=meta.get("architecture"),
        params=count_parameters(model),
        flops=count_flops(model, shape),
        input_shape=shape,
        feature_layers=list(getattr(model, "feature_layers", [])),
        file_bytes=Path(path).stat().st_size,
        dataset=meta.get("dataset"),
        classes=list(meta.get("classes", [])),
        trigger=meta.get("trigger"),
        target=meta.get("target"),
        attack_mode=attack_mode_of(meta),
        student_architecture=meta.get("student_architecture"),
        metrics=meta.get("metrics"),
        metadata={k: v for k, v in meta.items() if k != "history"},
    )


def attack_mode_of(meta: dict[str, Any]) -> str:
    """The backdoor's attack mode a checkpoint records (all-to-one when it records none)."""
    mode = meta.get("attack_mode") or "all-to-one"
    if mode not in MODES:
        raise ConfigError(
            f"The checkpoint records the unknown attack mode {mode!r}; re-import it with one of "
            f"{', '.join(MODES)}."
        )
    return str(mode)


def normalized_for(meta: dict[str, Any], data: ImageDataset) -> ImageDataset:
    """``data`` carrying the normalisation the model of ``meta`` expects (its own, if none)."""
    norm = meta.get("normalization")
    if not isinstance(norm, dict):
        return data
    mean, std = tuple(norm.get("mean") or ()), tuple(norm.get("std") or ())
    if len(mean) != data.in_channels or len(std) != data.in_channels:
        raise ConfigError(
            f"The model's normalisation has {len(mean)} value(s) per statistic but the data has "
            f"{data.in_channels} channel(s); re-import the model with matching --mean/--std."
        )
    return data.replace(mean=mean, std=std)


def check_fits_data(meta: dict[str, Any], data: ImageDataset, what: str) -> None:
    """A model of ``meta`` must take ``data``'s input shape and predict its classes."""
    args = meta.get("model_args") or {}
    shape = input_shape_of(meta)
    if tuple(data.input_shape) != shape:
        raise ConfigError(
            f"The teacher takes {shape[0]}×{shape[1]}×{shape[2]} images but the {what} holds "
            f"{data.in_channels}×{data.image_size[0]}×{data.image_size[1]}; give data of the "
            "teacher's input shape (or --in-channels/--image-size for the teacher)."
        )
    k = args.get("num_classes")
    if data.classes and k is not None and data.num_classes != k:
        raise ConfigError(
            f"The teacher predicts {k} classes but the {what} has {data.num_classes}; give "
            "data with the teacher's classes."
        )
