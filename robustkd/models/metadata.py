"""Checkpoint metadata read from a file: parsed within limits and every known field type-checked.

A checkpoint may come from anyone, so its JSON header is untrusted input: ``parse_metadata``
refuses huge or deeply nested text before ``json.loads`` sees it, and ``validate_metadata``
checks each field the code relies on (architecture, model arguments, classes, target, attack
mode, normalisation, trigger, metrics …) and raises ``CheckpointError`` with one sentence for
the first bad one. Keys it does not know are kept as they are; nothing relies on them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from robustkd.errors import CheckpointError

# how a backdoor picks its target: one class for all, or each class to the next
MODES = ("all-to-one", "all-to-all")
MAX_METADATA_CHARS = 16_000_000  # room for an embedded trigger pattern; JSON parsing stays fast
MAX_METADATA_DEPTH = 64  # our own metadata nests about 5 deep; json.loads recurses per level
MAX_CLASSES = 100_000  # the classifier layer is allocated before any weight is read
MAX_CHANNELS = 1024
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 8, 4096
NORMALIZATION_NAMES = ("none", "dataset")

# a JSON string, escapes included: brackets inside strings do not nest anything
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def parse_metadata(raw: object, name: str) -> dict[str, Any]:
    """The checked metadata in ``raw`` (JSON text); ``name`` is the file named in errors."""
    if not isinstance(raw, str):
        raise CheckpointError(f"{name} has unreadable metadata; re-save the checkpoint.")
    if len(raw) > MAX_METADATA_CHARS:
        raise CheckpointError(
            f"{name} has {len(raw):,} characters of metadata, more than the limit of "
            f"{MAX_METADATA_CHARS:,}; re-import the teacher with a smaller trigger pattern."
        )
    depth = _nesting_depth(raw)
    if depth > MAX_METADATA_DEPTH:
        raise CheckpointError(
            f"{name} has metadata nested {depth} levels deep, more than the limit of "
            f"{MAX_METADATA_DEPTH}; re-save the checkpoint."
        )
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, or an int of 5000+ digits
        raise CheckpointError(f"{name} has unreadable metadata; re-save the checkpoint.") from exc
    return validate_metadata(meta, name) if isinstance(meta, dict) else {}


def _nesting_depth(raw: str) -> int:
    """The deepest ``[``/``{`` nesting in JSON text, counted without recursion."""
    bare = _JSON_STRING.sub(b'""', raw.encode("utf-8", "surrogatepass"))
    codes = np.frombuffer(bare, dtype=np.uint8)
    opens = (codes == ord("[")) | (codes == ord("{"))
    brackets = opens | (codes == ord("]")) | (codes == ord("}"))
    steps = np.where(opens[brackets], 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max(initial=0))


def validate_metadata(meta: Mapping[str, Any], name: str = "the checkpoint") -> dict[str, Any]:
    """``meta`` as a dict once every known field has the type and range the code relies on.

    Absent fields (and ``null`` for optional ones) are fine; a present field of the wrong type
    or out of range raises ``CheckpointError`` naming it. Unknown keys are kept unchecked.
    """
    if not isinstance(meta, Mapping):
        raise CheckpointError(
            f"The metadata of {name} is not a JSON object; re-save the checkpoint."
        )
    meta = dict(meta)
    check = _Checker(name)
    check.opt(meta, "format", _is_int, "a whole number")
    check.opt(meta, "architecture", _is_name, "a model name")
    classes_count: int | None = None
    channels: int | None = None
    args = meta.get("model_args")
    if args is not None:
        check.field("model_args", args, isinstance(args, Mapping), "an object of model arguments")
        check.opt(
            args,
            "num_classes",
            lambda v: _int_in(v, 2, MAX_CLASSES),
            f"a whole number from 2 to {MAX_CLASSES:,}",
            "model_args.num_classes",
        )
        check.opt(
            args,
            "in_channels",
            lambda v: _int_in(v, 1, MAX_CHANNELS),
            f"a whole number from 1 to {MAX_CHANNELS}",
            "model_args.in_channels",
        )
        check.opt(
            args,
            "image_size",
            _is_image_size,
            f"a side or [height, width] of whole numbers from {MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE}",
            "model_args.image_size",
        )
        for key, value in args.items():  # extra arguments reach the model's constructor
            ok = key == "image_size" or _is_scalar(value)
            check.field(f"model_args.{key}", value, ok, "a number, text or null")
        classes_count, channels = args.get("num_classes"), args.get("in_channels")
    classes = meta.get("classes")
    if classes is not None:
        check.field("classes", classes, _is_str_list(classes), "a list of class names")
        if classes_count is not None and len(classes) != classes_count:
            raise CheckpointError(
                f"The metadata of {name} names {len(classes)} classes but its model predicts "
                f"{classes_count}; re-import the teacher with one name per class (--classes)."
            )
    top = classes_count - 1 if classes_count is not None else MAX_CLASSES - 1
    check.opt(
        meta, "target", lambda v: _int_in(v, 0, top), f"a class index from 0 to {top} or null"
    )
    check.opt(meta, "attack_mode", lambda v: v in MODES, f"one of {', '.join(MODES)} or null")
    _check_normalization(check, meta.get("normalization"), channels)
    trigger = meta.get("trigger")
    if trigger is not None:
        ok = isinstance(trigger, Mapping) and _is_name(trigger.get("name"))
        ok = ok and all(isinstance(k, str) for k in trigger)
        check.field("trigger", trigger, ok, "an object with a trigger 'name' or null")
    recipe = meta.get("recipe")
    if recipe is not None:
        ok = isinstance(recipe, Mapping) and _is_name(recipe.get("name"))
        ok = ok and all(isinstance(k, str) and _is_recipe_value(v) for k, v in recipe.items())
        check.field(
            "recipe", recipe, ok, "an object with a recipe 'name' and number or text options"
        )
    metrics = meta.get("metrics")
    if metrics is not None:
        check.field("metrics", metrics, isinstance(metrics, Mapping), "an object or null")
        for key in ("acc", "asr"):
            check.opt(
                metrics,
                key,
                lambda v: _is_number(v) and 0 <= v <= 1,
                "a number from 0 to 1 or null",
                f"metrics.{key}",
            )
        for key in ("n_clean", "n_triggered", "n_correct", "n_attack_success"):
            check.opt(
                metrics,
                key,
                lambda v: _int_in(v, 0, math.inf),
                "a whole number of at least 0",
                f"metrics.{key}",
            )
        check.opt(metrics, "data", lambda v: isinstance(v, str), "text", "metrics.data")
    for key in ("dataset", "kind", "layout", "student_architecture", "imported_from", "created"):
        check.opt(meta, key, lambda v: isinstance(v, str), "text or null")
    for key in ("params", "flops"):
        check.opt(meta, key, lambda v: _int_in(v, 0, math.inf), "a whole number of at least 0")
    check.opt(meta, "input_shape", lambda v: _is_int_list(v, 3), "[channels, height, width]")
    check.opt(meta, "history", lambda v: isinstance(v, list), "a list")
    for key in ("config", "attack"):
        check.opt(meta, key, lambda v: isinstance(v, Mapping), "an object or null")
    return meta


class _Checker:
    """Raises the one-sentence error for a field that fails its test."""

    def __init__(self, name: str) -> None:
        self.name = name

    def field(self, label: str, value: Any, ok: bool, expected: str) -> None:
        if not ok:
            raise CheckpointError(
                f"The metadata field '{label}' of {self.name} must be {expected}, not "
                f"{_short(value)}; re-import the teacher with robustkd import (or use another "
                "checkpoint)."
            )

    def opt(
        self, where: Mapping[str, Any], key: str, test: Any, expected: str, label: str = ""
    ) -> None:
        value = where.get(key)
        if value is not None:
            self.field(label or key, value, bool(test(value)), expected)


def _check_normalization(check: _Checker, norm: Any, channels: int | None) -> None:
    if norm is None or norm in NORMALIZATION_NAMES:
        return
    expected = "an object with 'mean' and 'std' lists, one value per input channel"
    check.field("normalization", norm, isinstance(norm, Mapping), expected)
    mean, std = norm.get("mean"), norm.get("std")
    each = "one per input channel" + (f" ({channels})" if channels is not None else "")
    check.field(
        "normalization.mean", mean, _is_number_list(mean, channels), f"finite numbers, {each}"
    )
    ok = _is_number_list(std, channels) and min(std) > 0
    check.field("normalization.std", std, ok, f"positive finite numbers, {each}")
    check.field("normalization.std", std, len(std) == len(mean), "as long as normalization.mean")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(value: Any, low: float, high: float) -> bool:
    return _is_int(value) and low <= value <= high


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 200


def _is_recipe_value(value: Any) -> bool:
    return _is_scalar(value) or _is_str_list(value)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, bool, int)) or _is_number(value)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_int_list(value: Any, length: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == length
        and all(_int_in(v, 1, 10**6) for v in value)
    )


def _is_number_list(value: Any, length: int | None) -> bool:
    return (
        isinstance(value, list)
        and len(value) >= 1
        and (length is None or len(value) == length)
        and all(_is_number(v) for v in value)
    )


def _is_image_size(value: Any) -> bool:
    sides = value if isinstance(value, list) and len(value) == 2 else [value]
    return all(_int_in(v, MIN_IMAGE_SIDE, MAX_IMAGE_SIDE) for v in sides)


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, float) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
