"""Import: turn any checkpoint (ours, a bare state dict, another toolkit's file) into a model
with full metadata — architecture, classes, input shape, normalisation, trigger and target.

Every verb (``info``, ``evaluate``, ``distill``, ``compare``, ``import``) and the app load a
model through ``load_model`` with the same ``ModelOptions``; ``import_checkpoint`` writes the
result once as a safetensors file that afterwards behaves like the shipped teacher.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkd.data.datasets import ImageDataset
from robustkd.errors import CheckpointError, ConfigError
from robustkd.models.checkpoints import build_recorded_model, read_metadata, save_checkpoint
from robustkd.models.interop import (
    LAYOUTS,
    adapt_state_dict,
    closest_fits,
    infer_io,
    model_args_for,
    read_foreign,
)
from robustkd.models.metadata import MAX_CHANNELS, MAX_CLASSES, MAX_IMAGE_SIDE, MIN_IMAGE_SIDE

NORMALIZATIONS = ("none", "dataset")


@dataclasses.dataclass
class ModelOptions:
    """What a user may say about a checkpoint; ``None`` means "read it from the file"."""

    architecture: str | None = None
    num_classes: int | None = None
    in_channels: int | None = None
    image_size: int | tuple[int, int] | None = None
    normalization: str | None = None  # "none", "dataset", or None (explicit mean/std below)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "auto"
    dataset: str | None = None  # the data set it was trained on (names its classes)

    def validate(self) -> ModelOptions:
        if self.layout not in LAYOUTS:
            raise ConfigError(
                f"Unknown source layout {self.layout!r}; choose one of: {', '.join(LAYOUTS)}."
            )
        if self.normalization is not None and self.normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"Unknown normalisation {self.normalization!r}; choose 'none', 'dataset', or "
                "give --mean and --std."
            )
        if (self.mean is None) != (self.std is None):
            raise ConfigError("Give --mean and --std together (one value per input channel).")
        if self.mean is not None and self.normalization is not None:
            raise ConfigError("Give either --normalization or --mean/--std, not both.")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != len(self.std) or not self.mean:
                raise ConfigError(
                    "--mean and --std need the same number of values, one per input channel."
                )
            bad = [v for v in (*self.mean, *self.std) if not math.isfinite(v)]
            if bad or any(s <= 0 for s in self.std):
                raise ConfigError("--std values must be positive and all values finite.")
        for key in ("num_classes", "in_channels"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be at least 1; got {value}.")
        return self

    def normalization_dict(self, channels: int) -> dict[str, list[float]] | None:
        """Explicit statistics, or None for "the data set's own"."""
        if self.mean is not None and self.std is not None:
            if len(self.mean) != channels:
                raise ConfigError(
                    f"The model takes {channels} input channel(s) but --mean/--std give "
                    f"{len(self.mean)} values; give one per channel."
                )
            return {"mean": list(self.mean), "std": list(self.std)}
        if self.normalization == "none":
            return {"mean": [0.0] * channels, "std": [1.0] * channels}
        return None


def load_model(
    path: str | Path,
    options: ModelOptions | None = None,
    data: ImageDataset | None = None,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a checkpoint holds and load its weights, with complete metadata.

    The options override what the file records; what neither says is read from the weights
    (input channels, classes), from ``data`` (input shape, classes), or recognised from the
    keys (architecture and source layout, when exactly one fits).
    """
    options = (options or ModelOptions()).validate()
    path = Path(path)
    meta = read_metadata(path)
    foreign = read_foreign(path)
    hints = foreign.hints
    state = foreign.state
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"{path.name} holds NaN or infinite weights (in {', '.join(bad[:3])}"
            f"{' …' if len(bad) > 3 else ''}); it is broken, use another checkpoint."
        )
    args: dict[str, Any] = dict(meta.get("model_args") or {})
    io = infer_io(state)
    classes = _first(
        options.num_classes, args.get("num_classes"), hints.get("num_classes"),
        io.get("num_classes"), data.num_classes if data is not None else None,
    )  # fmt: skip
    channels = _first(
        options.in_channels, args.get("in_channels"), hints.get("in_channels"),
        io.get("in_channels"), data.in_channels if data is not None else None, 1,
    )  # fmt: skip
    size = _first(
        options.image_size, args.get("image_size"), hints.get("image_size"),
        data.image_size if data is not None else None,
    )  # fmt: skip
    size_assumed = size is None
    if size is None:  # global pooling takes any size; this one only sizes FLOPs and probes
        size = 28 if channels == 1 else 32
    size = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
    if classes is None:
        raise CheckpointError(
            f"Cannot tell how many classes {path.name} predicts; pass --num-classes N."
        )
    _check_io(path.name, classes, channels, size, meta.get("target"))
    arch = options.architecture or meta.get("architecture") or hints.get("architecture")
    layout = options.layout
    if layout == "auto" and meta.get("architecture") and not options.architecture:
        layout = meta.get("layout") or "auto"
    if layout == "auto" and hints.get("layout"):
        layout = hints["layout"]
    if arch is None:
        arch, layout = _recognise(path, state, int(classes), int(channels), size)
    args.update(model_args_for(arch, layout))
    args.update(num_classes=int(classes), in_channels=int(channels), image_size=size)
    model = build_recorded_model(arch, args, path.name)
    state, used = adapt_state_dict(state, arch, layout, model)
    model.load_state_dict(state)
    model.to(device).eval()
    norm = options.normalization_dict(int(channels))
    if norm is None and options.normalization is None and options.mean is None:
        recorded = meta.get("normalization") or hints.get("normalization")
        if recorded == "none":  # a toolkit that feeds pixels in [0, 1]
            norm = ModelOptions(normalization="none").normalization_dict(int(channels))
        elif isinstance(recorded, dict):
            norm = recorded  # "dataset" (or nothing): the data's own statistics
    out = {k: v for k, v in meta.items() if k not in ("normalization",)}
    out.update(
        architecture=arch,
        model_args={k: list(v) if isinstance(v, tuple) else v for k, v in args.items()},
        layout=used,
    )
    if norm is not None:
        out["normalization"] = norm
    out.pop("image_size_assumed", None)
    if size_assumed:
        out["image_size_assumed"] = True  # said by `info` and `import`; never saved
    if options.dataset:
        out["dataset"] = options.dataset
    elif "dataset" not in out and hints.get("dataset"):
        out["dataset"] = hints["dataset"]
    if data is not None and not out.get("classes") and data.num_classes == classes:
        out["classes"] = list(data.classes)
    return model, out


def _check_io(
    name: str, classes: int, channels: int, size: tuple[int, ...], target: int | None
) -> None:
    """Bounds on what the file, its hints and the options said together, before any
    layer is allocated from them."""
    if not 2 <= classes <= MAX_CLASSES:
        raise ConfigError(
            f"{name} would predict {classes} classes; a model needs 2 to {MAX_CLASSES:,} "
            "(pass --num-classes N)."
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise ConfigError(
            f"{name} would take {channels} input channels; give 1 to {MAX_CHANNELS} "
            "(--in-channels N)."
        )
    if len(size) != 2 or not all(MIN_IMAGE_SIDE <= v <= MAX_IMAGE_SIDE for v in size):
        raise ConfigError(
            f"{name} would take images of {'×'.join(map(str, size))} pixels; give a size from "
            f"{MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE} per side (--image-size)."
        )
    if target is not None and not 0 <= target < classes:
        raise CheckpointError(
            f"{name} records target class {target} but its model predicts {classes} classes; "
            "re-import the teacher with the right --target."
        )


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _recognise(
    path: Path, state: dict[str, torch.Tensor], classes: int, channels: int, size: tuple[int, int]
) -> tuple[str, str]:
    """The one (architecture, layout) whose keys and shapes fit the weights exactly."""
    fits = closest_fits(state, classes, channels, size)
    exact = [(a, lay) for a, lay, score in fits if score >= 1.0]
    if len(exact) >= 1:
        return exact[0]
    near = ", ".join(f"{a} ({lay} layout, {100 * s:.0f} % of keys fit)" for a, lay, s in fits)
    raise CheckpointError(
        f"{path.name} does not record its architecture and no known one fits its keys"
        + (f" (closest: {near})" if near else "")
        + "; pass --arch NAME (see 'robustkd list models') and, if needed, --layout."
    )


def import_checkpoint(
    source: str | Path,
    out: str | Path,
    options: ModelOptions | None = None,
    data: ImageDataset | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``source`` with ``options`` and save it to ``out`` with complete metadata.

    ``extra`` adds recorded facts (trigger, target, attack mode, student architecture, class
    names); the result loads with no options anywhere a robustkd checkpoint does.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"Save the imported teacher as a .safetensors file; got {out.name}.")
    options = options or ModelOptions()
    if options.normalization == "dataset" and data is not None:
        # record the statistics themselves: the teacher then needs no data set to be read
        options = dataclasses.replace(options, normalization=None, mean=data.mean, std=data.std)
    model, meta = load_model(source, options, data)
    meta = {**meta, **(extra or {})}
    assumed = meta.pop("image_size_assumed", False)  # said to the user, never recorded
    meta.setdefault("kind", "teacher")
    meta["imported_from"] = Path(source).name
    classes = meta.get("classes")
    k = meta["model_args"]["num_classes"]
    if classes is not None and len(classes) != k:
        raise ConfigError(
            f"The model predicts {k} classes but {len(classes)} class names were given; "
            "give one name per class."
        )
    target = meta.get("target")
    if target is not None and not 0 <= int(target) < k:
        raise ConfigError(f"The target class must lie between 0 and {k - 1}; got {target}.")
    save_checkpoint(out, model, meta)
    return model, {**meta, "image_size_assumed": True} if assumed else meta
