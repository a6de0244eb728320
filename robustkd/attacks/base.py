"""The trigger base class ``Trigger`` (the contract every trigger keeps: ``apply`` takes float
images in [0, 1] shaped ``(N, C, H, W)`` or ``(C, H, W)``, any channel count, size and device, and
returns a new tensor of the same shape, dtype and device clamped to [0, 1], never changing its
input, with patterns cached per shape, device and dtype), the registry ``TRIGGERS`` with
``trigger_names`` / ``create_trigger`` / ``trigger_from_dict`` (an exact rebuild from
``to_dict`` output), and the helpers more than one trigger uses: parameter validation, batching,
and reading, resizing and embedding pattern images.
"""

from __future__ import annotations

import abc
import base64
import binascii
import inspect
import io
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from robustkd.errors import ConfigError, DataError
from robustkd.registry import Registry

_CACHE_LIMIT = 32  # patterns kept per trigger; a handful of (size, device, dtype) keys in practice
# A pattern is resized to the image size: 2048² is ample, and bounds the float copies made of it
MAX_PATTERN_PIXELS = 2048 * 2048


# --------------------------------------------------------------------------- validation


def _is_number(value: object) -> bool:
    # bool is an int subclass, but `alpha=True` is a mistake, not 1.0
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _float_param(
    trigger: str,
    param: str,
    value: object,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    ok = _is_number(value) and math.isfinite(float(value))  # type: ignore[arg-type]
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        if math.isinf(high):
            where = f"{'above' if low_open else 'at least'} {low:g}"
        else:
            where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(
            f"The {trigger} trigger's {param} must be a number {where}; got {value!r}."
        )
    return float(value)  # type: ignore[arg-type]


def _int_param(trigger: str, param: str, value: object, low: int) -> int:
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool)) or value < low:
        raise ConfigError(
            f"The {trigger} trigger's {param} must be a whole number of at least {low}; "
            f"got {value!r}."
        )
    return int(value)


def _check_size(height: int, width: int) -> None:
    if not all(isinstance(v, (int, np.integer)) and v >= 1 for v in (height, width)):
        raise ConfigError(
            f"Image height and width must be positive integers; got {height}×{width}."
        )


def _as_batch(images: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(N, C, H, W)`` view of ``images`` and whether the input was a single ``(C, H, W)``."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        kind = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(
            f"Triggers stamp float image tensors in [0, 1], got {kind}; convert uint8 images "
            "with robustkd.data.datasets.to_float first."
        )
    if images.dim() == 3:
        return images.unsqueeze(0), True
    if images.dim() == 4:
        return images, False
    raise DataError(
        f"Triggers take images shaped (N, C, H, W) or (C, H, W); got {tuple(images.shape)}."
    )


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # half types lack some CPU kernels (grid_sample, bicubic) and lose the pattern's precision
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# --------------------------------------------------------------------------- base class


class Trigger(abc.ABC):
    """A backdoor trigger; subclasses implement ``_stamp`` and ``params``."""

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self._cache: dict[tuple, Any] = {}

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Stamp float images in [0, 1] shaped ``(N, C, H, W)`` or ``(C, H, W)``."""
        x, single = _as_batch(images)
        if x.shape[0] == 0:
            return images.clone()
        work = x.to(_work_dtype(x.dtype))
        # clamp always allocates, so the input can never be returned (or aliased) by mistake
        out = self._stamp(work).clamp(0.0, 1.0).to(x.dtype)
        return out[0] if single else out

    @abc.abstractmethod
    def _stamp(self, images: torch.Tensor) -> torch.Tensor:
        """Stamp a float32/float64 ``(N, C, H, W)`` batch; may leave [0, 1], must not mutate."""

    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this trigger (JSON-serialisable)."""

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., **params}``; ``trigger_from_dict`` rebuilds an identical trigger."""
        return {"name": self.name, **self.params()}

    def embedded(self) -> Trigger:
        """The same trigger carrying any image it reads as PNG pixels instead of a file path,
        so a checkpoint that records it needs no file beside it (itself when it has none)."""
        return self

    def region_mask(self, height: int, width: int) -> torch.Tensor:
        """Bool ``(H, W)`` mask of the pixels the trigger changes (all for whole-image ones)."""
        _check_size(height, width)
        return torch.ones(height, width, dtype=torch.bool)

    def _cached(self, key: tuple, make: Callable[[], Any]) -> Any:
        cache = self.__dict__.setdefault("_cache", {})  # survives a subclass skipping super()
        value = cache.get(key)
        if value is None:
            if len(cache) >= _CACHE_LIMIT:
                cache.clear()
            value = cache[key] = make()
        return value

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.params().items() if not k.endswith("_png")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


TRIGGERS: Registry[type[Trigger]] = Registry("trigger")


def trigger_names() -> list[str]:
    return TRIGGERS.names()


def create_trigger(name: str, **params: Any) -> Trigger:
    """Build the trigger registered as ``name``; unknown parameters raise ConfigError."""
    cls = TRIGGERS.get(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"The {cls.name} trigger has no parameter {', '.join(map(repr, unknown))}; "
            f"valid ones are: {', '.join(accepted)}."
        )
    return cls(**params)


def trigger_from_dict(d: Mapping[str, Any], *, allow_paths: bool = False) -> Trigger:
    """Rebuild a trigger from ``Trigger.to_dict()`` output (also after a JSON round trip).

    A description read from a file (checkpoint metadata, a run, the app's state) must not open
    files on this machine, so ``*_path`` parameters are refused unless ``allow_paths`` is set
    for a description the user typed themselves.
    """
    if not isinstance(d, Mapping) or not isinstance(d.get("name"), str):
        raise ConfigError(
            "A trigger description must be a mapping with a 'name' string, as written by "
            f"Trigger.to_dict(); got {_short(d)}."
        )
    params = dict(d)
    name = params.pop("name")
    paths = sorted(k for k, v in params.items() if str(k).endswith("_path") and v is not None)
    if paths and not allow_paths:
        # refused before any file is touched: the answer must not tell whether a path exists
        raise ConfigError(
            f"The recorded {name} trigger names a file ({', '.join(paths)}), and a trigger read "
            "from a checkpoint or saved state never opens files; re-import the teacher so the "
            "pattern travels inside it (robustkd import … --trigger-param pattern_path=FILE)."
        )
    return create_trigger(name, **params)


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- image helpers


def _load_rgba(source: str | Path | bytes, what: str) -> tuple[torch.Tensor, bool]:
    """Read an image file (or PNG bytes) as uint8 RGBA ``(4, h, w)`` and whether it has alpha."""
    from robustkd.data.images import read_rgba

    if isinstance(source, bytes):
        data, label = source, f"embedded {what} image"
    else:
        label = f"{what} image {source}"
        if not Path(source).is_file():
            raise DataError(f"The {label} does not exist; give the path of a PNG file.")
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise DataError(f"Cannot read the {label} ({exc.strerror}); check the file.") from exc
    rgba, has_alpha = read_rgba(data, label, MAX_PATTERN_PIXELS)
    return torch.from_numpy(rgba).permute(2, 0, 1).contiguous(), has_alpha


def _luminance(rgba: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of uint8 RGBA ``(4, h, w)`` as float in [0, 1] (as PIL's "L" mode)."""
    r, g, b = rgba[:3].double() / 255.0
    return 0.299 * r + 0.587 * g + 0.114 * b


def _to_channels(rgba: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 RGBA ``(4, h, w)`` → float64 ``(channels, h, w)`` in [0, 1]."""
    if channels == 3:
        return rgba[:3].double() / 255.0
    if channels == 4:
        return rgba.double() / 255.0
    # 1 channel is grey; other counts have no colour meaning, so repeat the grey value
    return _luminance(rgba).unsqueeze(0).expand(channels, -1, -1)


def _resize(image: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """Resize ``(C, h, w)`` to ``(C, height, width)``; same size returns the pixels untouched."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    if mode == "nearest":
        return F.interpolate(image[None], size=(height, width), mode="nearest-exact")[0]
    # antialias keeps large uploaded patterns from aliasing when shrunk to 28×28
    return F.interpolate(
        image[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )[0].clamp(0.0, 1.0)


def _png_base64(pixels: np.ndarray, mode: str) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _decode_base64(data: object, what: str) -> bytes:
    if not isinstance(data, str):
        raise DataError(f"The embedded {what} must be base64 PNG text; got {type(data).__name__}.")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataError(f"The embedded {what} is not valid base64 PNG data; re-create it.") from exc
