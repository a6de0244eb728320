"""Backdoor triggers: objects with one verb, ``apply``, that stamp float images in [0, 1].

Every trigger takes images shaped ``(N, C, H, W)`` or ``(C, H, W)`` with any channel count and
size, on any device, and returns a new tensor of the same shape, dtype and device, clamped to
[0, 1]; the input is never changed in place. Patterns and warping grids are made lazily for
each image shape, device and dtype and cached on the trigger, so stamping many batches is cheap.

``to_dict`` / ``trigger_from_dict`` round-trip a trigger exactly through JSON, and
``region_mask`` names the pixels a trigger touches (to measure attribution mass inside it).
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


def _array_to_hwc(array: object, what: str) -> np.ndarray:
    """numpy HW/HWC or torch HW/CHW → float64 numpy ``(h, w, c)`` with values in [0, 1]."""
    if isinstance(array, torch.Tensor):
        t = array.detach().cpu()
        t = t.double() if t.is_floating_point() else t  # numpy has no bfloat16
        a = (t.permute(1, 2, 0) if t.dim() == 3 else t).numpy()
    else:
        a = np.asarray(array)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[0] < 1 or a.shape[1] < 1:
        raise DataError(
            f"The {what} must be a 2-D or 3-D array (numpy H×W×C or tensor C×H×W); "
            f"got shape {a.shape}."
        )
    if a.dtype == np.bool_:
        return a.astype(np.float64)
    if np.issubdtype(a.dtype, np.integer):
        scaled, limits = a.astype(np.float64) / 255.0, "integers in 0..255"
    elif np.issubdtype(a.dtype, np.floating):
        scaled, limits = a.astype(np.float64), "floats in [0, 1]"
    else:
        raise DataError(f"The {what} must hold numbers; got dtype {a.dtype}.")
    if not np.isfinite(scaled).all() or scaled.min() < 0 or scaled.max() > 1:
        raise DataError(f"The {what} must hold {limits}; got values from {a.min()} to {a.max()}.")
    return scaled


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


# --------------------------------------------------------------------------- BadNets

POSITIONS = ("bottom-right", "top-left", "top-right", "bottom-left", "center")
PATCH_PATTERNS = ("solid", "checkerboard")


@TRIGGERS.register("badnets")
class BadNetsTrigger(Trigger):
    """A small square patch at a fixed place (Gu et al. 2017, BadNets).

    ``position`` is a named corner / ``"center"`` (``margin`` pixels from the border) or
    ``[row, col]`` of the patch's top-left pixel (``margin`` is then ignored). The
    checkerboard alternates ``value`` and ``1 − value``, starting with ``value`` top-left.
    """

    name = "badnets"

    def __init__(
        self,
        size: int = 3,
        position: str | list[int] | tuple[int, int] = "bottom-right",
        pattern: str = "solid",
        value: float = 1.0,
        margin: int = 1,
    ) -> None:
        super().__init__()
        self.size = _int_param("badnets", "size", size, 1)
        self.margin = _int_param("badnets", "margin", margin, 0)
        self.value = _float_param("badnets", "value", value, 0.0, 1.0)
        if pattern not in PATCH_PATTERNS:
            raise ConfigError(
                f"Unknown BadNets pattern {pattern!r}; choose one of: {', '.join(PATCH_PATTERNS)}."
            )
        self.pattern = pattern
        if isinstance(position, str):
            if position not in POSITIONS:
                raise ConfigError(
                    f"Unknown BadNets position {position!r}; choose one of: "
                    f"{', '.join(POSITIONS)}, or [row, col]."
                )
            self.position: str | list[int] = position
        elif (
            isinstance(position, (list, tuple))
            and len(position) == 2
            and all(
                isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0
                for v in position
            )
        ):
            self.position = [int(position[0]), int(position[1])]
        else:
            raise ConfigError(
                f"A BadNets position must be one of {', '.join(POSITIONS)} or [row, col] with "
                f"non-negative integers; got {position!r}."
            )

    def params(self) -> dict[str, Any]:
        position = self.position if isinstance(self.position, str) else list(self.position)
        return {
            "size": self.size,
            "position": position,
            "pattern": self.pattern,
            "value": self.value,
            "margin": self.margin,
        }

    def corner(self, height: int, width: int) -> tuple[int, int]:
        """Row and column of the patch's top-left pixel in an ``height × width`` image."""
        _check_size(height, width)
        s, m = self.size, self.margin
        if isinstance(self.position, list):
            row, col = self.position
        elif self.position == "center":
            row, col = (height - s) // 2, (width - s) // 2
        else:
            vertical, horizontal = self.position.split("-")
            row = m if vertical == "top" else height - m - s
            col = m if horizontal == "left" else width - m - s
        if row < 0 or col < 0 or row + s > height or col + s > width:
            where = (
                f"at {self.position}"
                if isinstance(self.position, list)
                else f"{self.position} with a {m}-pixel margin"
            )
            raise ConfigError(
                f"A {s}×{s} BadNets patch {where} does not fit a {height}×{width} image; "
                "choose a smaller size or margin, or another position."
            )
        return row, col

    def patch(
        self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The ``(size, size)`` patch values."""

        def make() -> torch.Tensor:
            p = torch.full((self.size, self.size), self.value, dtype=torch.float64)
            if self.pattern == "checkerboard":
                idx = torch.arange(self.size)
                odd = (idx[:, None] + idx[None, :]) % 2 == 1
                p[odd] = 1.0 - self.value
            return p.to(device=device, dtype=dtype)

        return self._cached(("patch", torch.device(device), dtype), make)

    def _stamp(self, images: torch.Tensor) -> torch.Tensor:
        row, col = self.corner(images.shape[-2], images.shape[-1])
        out = images.clone()
        out[:, :, row : row + self.size, col : col + self.size] = self.patch(
            images.device, images.dtype
        )
        return out

    def region_mask(self, height: int, width: int) -> torch.Tensor:
        row, col = self.corner(height, width)
        mask = torch.zeros(height, width, dtype=torch.bool)
        mask[row : row + self.size, col : col + self.size] = True
        return mask


# --------------------------------------------------------------------------- Blend


@TRIGGERS.register("blend")
class BlendTrigger(Trigger):
    """Blend a pattern over the whole image, ``(1 − alpha)·x + alpha·pattern`` (Chen et al. 2017).

    The pattern is uniform noise drawn from ``seed`` at each image shape, or the image file at
    ``pattern_path`` (or the base64 PNG ``pattern_png``, as ``embedded`` writes it) resized to
    the image size (then ``seed`` is unused).
    """

    name = "blend"

    def __init__(
        self,
        alpha: float = 0.15,
        seed: int = 0,
        pattern_path: str | Path | None = None,
        pattern_png: str | None = None,
    ) -> None:
        super().__init__()
        self.alpha = _float_param("blend", "alpha", alpha, 0.0, 1.0, low_open=True)
        self.seed = _int_param("blend", "seed", seed, 0)
        if pattern_path is not None and pattern_png is not None:
            raise ConfigError("Give the blend trigger's pattern as pattern_path or pattern_png.")
        self.pattern_path = None if pattern_path is None else str(pattern_path)
        self.pattern_png = pattern_png
        self._image: torch.Tensor | None = None
        if pattern_png is not None:
            data = _decode_base64(pattern_png, "blend pattern")
            self._image = _load_rgba(data, "blend pattern")[0]
        elif pattern_path is not None:
            self._image = _load_rgba(Path(pattern_path), "blend pattern")[0]

    def params(self) -> dict[str, Any]:
        if self.pattern_png is not None:
            return {"alpha": self.alpha, "seed": self.seed, "pattern_png": self.pattern_png}
        return {"alpha": self.alpha, "seed": self.seed, "pattern_path": self.pattern_path}

    def embedded(self) -> BlendTrigger:
        if self._image is None or self.pattern_png is not None:
            return self
        pixels = np.ascontiguousarray(self._image.permute(1, 2, 0).numpy())
        return BlendTrigger(self.alpha, self.seed, pattern_png=_png_base64(pixels, "RGBA"))

    def pattern(
        self,
        channels: int,
        height: int,
        width: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The ``(C, H, W)`` pattern blended into images of that shape."""
        _check_size(height, width)

        def make() -> torch.Tensor:
            if self._image is None:
                # drawn on the CPU so the pattern is the same whatever device the images are on
                gen = torch.Generator().manual_seed(self.seed)
                p = torch.rand((channels, height, width), generator=gen, dtype=torch.float64)
            else:
                p = _resize(_to_channels(self._image, channels), height, width, "bilinear")
            return p.to(device=device, dtype=dtype)

        return self._cached((channels, height, width, torch.device(device), dtype), make)

    def _stamp(self, images: torch.Tensor) -> torch.Tensor:
        _, c, h, w = images.shape
        p = self.pattern(c, h, w, images.device, images.dtype)
        return (1.0 - self.alpha) * images + self.alpha * p


# --------------------------------------------------------------------------- SIG


@TRIGGERS.register("sig")
class SIGTrigger(Trigger):
    """A sinusoid along the columns added to every row and channel (Barni et al. 2019, SIG).

    ``x' = x + amplitude/255 · sin(2π · j · frequency / W)`` for column ``j``; ``amplitude`` is
    in 0..255 pixel units.
    """

    name = "sig"

    def __init__(self, amplitude: float = 20.0, frequency: float = 6.0) -> None:
        super().__init__()
        self.amplitude = _float_param("sig", "amplitude", amplitude, 0.0, 255.0, low_open=True)
        self.frequency = _float_param("sig", "frequency", frequency, 0.0, low_open=True)

    def params(self) -> dict[str, Any]:
        return {"amplitude": self.amplitude, "frequency": self.frequency}

    def signal(
        self, width: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The ``(W,)`` offset added to each column."""

        def make() -> torch.Tensor:
            j = torch.arange(width, dtype=torch.float64)
            s = self.amplitude / 255.0 * torch.sin(2 * math.pi * j * self.frequency / width)
            return s.to(device=device, dtype=dtype)

        return self._cached((width, torch.device(device), dtype), make)

    def _stamp(self, images: torch.Tensor) -> torch.Tensor:
        return images + self.signal(images.shape[-1], images.device, images.dtype)


# --------------------------------------------------------------------------- WaNet


@TRIGGERS.register("wanet")
class WaNetTrigger(Trigger):
    """An invisible smooth warp of the image (Nguyen & Tran 2021, WaNet).

    A seeded ``grid_size × grid_size`` control field, uniform in [−1, 1] and normalised by its
    mean absolute value, is upsampled bicubically to the image size and added, scaled by
    ``strength`` pixels (``strength / H`` vertically, ``strength / W`` horizontally), to the
    identity sampling grid. ``noise_rate`` is the fraction of extra "noise mode" images that
    poisoning warps with a random perturbation on top while keeping their labels.
    """

    name = "wanet"

    def __init__(
        self, seed: int = 0, strength: float = 0.5, grid_size: int = 4, noise_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.seed = _int_param("wanet", "seed", seed, 0)
        self.strength = _float_param("wanet", "strength", strength, 0.0)
        self.grid_size = _int_param("wanet", "grid_size", grid_size, 2)
        self.noise_rate = _float_param("wanet", "noise_rate", noise_rate, 0.0, 1.0, high_open=True)
        gen = torch.Generator().manual_seed(self.seed)
        field = (
            torch.rand((1, 2, self.grid_size, self.grid_size), generator=gen, dtype=torch.float64)
            * 2
            - 1
        )
        self._control = field / field.abs().mean()

    def params(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "strength": self.strength,
            "grid_size": self.grid_size,
            "noise_rate": self.noise_rate,
        }

    def grid(
        self,
        height: int,
        width: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The ``(1, H, W, 2)`` warped sampling grid for ``F.grid_sample(align_corners=True)``."""
        _check_size(height, width)

        def make() -> torch.Tensor:
            # built in float64 on the CPU: identical grids on every device
            flow = F.interpolate(
                self._control, size=(height, width), mode="bicubic", align_corners=True
            ).permute(0, 2, 3, 1)
            scale = torch.tensor([width, height], dtype=torch.float64)  # grid is (x, y)
            ys = torch.linspace(-1, 1, height, dtype=torch.float64)
            xs = torch.linspace(-1, 1, width, dtype=torch.float64)
            identity = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]
            warped = (identity + self.strength * flow / scale).clamp(-1.0, 1.0)
            return warped.to(device=device, dtype=dtype)

        return self._cached((height, width, torch.device(device), dtype), make)

    def _warp(self, images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(
            images, grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )

    def _stamp(self, images: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        return self._warp(
            images, self.grid(h, w, images.device, images.dtype).expand(n, -1, -1, -1)
        )

    def apply_noise(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """WaNet's noise mode: the warp plus a random per-image grid perturbation of ±1 pixel."""
        x, single = _as_batch(images)
        if x.shape[0] == 0:
            return images.clone()
        work = x.to(_work_dtype(x.dtype))
        n, _, h, w = work.shape
        # drawn where the generator lives, then moved, so a CPU generator works for GPU images
        noise = torch.rand((n, h, w, 2), generator=generator, device=generator.device) * 2 - 1
        scale = torch.tensor([w, h], dtype=work.dtype, device=work.device)
        grid = self.grid(h, w, work.device, work.dtype)
        grid = (grid + noise.to(device=work.device, dtype=work.dtype) / scale).clamp(-1.0, 1.0)
        out = self._warp(work, grid).clamp(0.0, 1.0).to(x.dtype)
        return out[0] if single else out


# --------------------------------------------------------------------------- custom


@TRIGGERS.register("custom")
class CustomTrigger(Trigger):
    """A pattern pasted through a binary mask, ``x' = (1 − mask)·x + mask·pattern``.

    The pattern comes from ``pattern_path`` and is resized to the image size. The mask comes
    from ``mask_path`` (pixels at least half-bright), else from the pattern: where its alpha is
    above 0 if it has transparency, otherwise where it is not black. ``pattern_png`` /
    ``mask_png`` (base64 PNG) are how ``from_arrays`` triggers serialise; pass paths instead.
    """

    name = "custom"

    def __init__(
        self,
        pattern_path: str | Path | None = None,
        mask_path: str | Path | None = None,
        pattern_png: str | None = None,
        mask_png: str | None = None,
    ) -> None:
        super().__init__()
        if (pattern_path is None) == (pattern_png is None):
            raise ConfigError(
                "A custom trigger needs exactly one pattern source; give pattern_path (an image "
                "file) or build it with CustomTrigger.from_arrays."
            )
        if pattern_path is not None and mask_png is not None:
            raise ConfigError("Give the custom trigger's mask as mask_path, not mask_png.")
        if pattern_png is not None and mask_path is not None:
            raise ConfigError("Give the custom trigger's mask as mask_png, not mask_path.")
        self.pattern_path = None if pattern_path is None else str(pattern_path)
        self.mask_path = None if mask_path is None else str(mask_path)
        self.pattern_png = pattern_png
        self.mask_png = mask_png
        if pattern_png is not None:
            source: str | Path | bytes = _decode_base64(pattern_png, "custom trigger pattern")
        else:
            source = Path(pattern_path)  # type: ignore[arg-type]
        self._pattern, has_alpha = _load_rgba(source, "custom trigger pattern")
        if mask_path is not None or mask_png is not None:
            mask_source = (
                Path(mask_path)
                if mask_path is not None
                else _decode_base64(mask_png, "custom trigger mask")
            )
            self._mask = _luminance(_load_rgba(mask_source, "custom trigger mask")[0]) >= 0.5
        elif has_alpha:
            self._mask = self._pattern[3] > 0
        else:
            self._mask = (self._pattern[:3] > 0).any(dim=0)
        if not self._mask.any():
            raise DataError(
                "The custom trigger's mask selects no pixels; give a pattern with visible "
                "(non-black or opaque) pixels or a mask with white ones."
            )

    @classmethod
    def from_arrays(
        cls, pattern: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor | None = None
    ) -> CustomTrigger:
        """A trigger from in-memory pixels (e.g. an app upload).

        Arrays are numpy ``(H, W)`` / ``(H, W, C)`` or tensors ``(H, W)`` / ``(C, H, W)`` with
        1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA) channels, holding uint8 or floats in
        [0, 1]. Pixels are kept as 8-bit PNG, so ``to_dict`` round-trips them exactly.
        """
        p = _array_to_hwc(pattern, "custom trigger pattern")
        c = p.shape[2]
        if c not in (1, 2, 3, 4):
            raise DataError(
                f"The custom trigger pattern needs 1, 2, 3 or 4 channels (numpy H×W×C or tensor "
                f"C×H×W); got {c}."
            )
        px = np.rint(p * 255.0).astype(np.uint8)
        if c in (1, 2):  # grey (+ alpha) → RGB (+ alpha)
            px = np.concatenate([px[:, :, :1]] * 3 + ([px[:, :, 1:2]] if c == 2 else []), axis=2)
        pattern_png = _png_base64(np.ascontiguousarray(px), "RGBA" if c in (2, 4) else "RGB")
        mask_png = None
        if mask is not None:
            m = _array_to_hwc(mask, "custom trigger mask")
            if m.shape[2] != 1:
                raise DataError(
                    f"The custom trigger mask must have a single channel; got {m.shape[2]}."
                )
            mask_png = _png_base64(np.where(m[:, :, 0] >= 0.5, 255, 0).astype(np.uint8), "L")
        return cls(pattern_png=pattern_png, mask_png=mask_png)

    def embedded(self) -> CustomTrigger:
        """The same trigger carrying its pixels (PNG) instead of file paths, so a checkpoint
        that records it needs no file beside it."""
        if self.pattern_png is not None:
            return self
        return CustomTrigger.from_arrays(self._pattern, self._mask.float())

    def params(self) -> dict[str, Any]:
        if self.pattern_png is not None:
            return {"pattern_png": self.pattern_png, "mask_png": self.mask_png}
        return {"pattern_path": self.pattern_path, "mask_path": self.mask_path}

    def _resized(
        self, channels: int, height: int, width: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        def make() -> tuple[torch.Tensor, torch.Tensor]:
            p = _resize(_to_channels(self._pattern, channels), height, width, "bilinear")
            m = _resize(self._mask[None].double(), height, width, "nearest")[0] > 0.5
            return p.to(device=device, dtype=dtype), m.to(device)

        return self._cached((channels, height, width, device, dtype), make)

    def _stamp(self, images: torch.Tensor) -> torch.Tensor:
        _, c, h, w = images.shape
        pattern, mask = self._resized(c, h, w, images.device, images.dtype)
        # a binary mask makes (1 − m)·x + m·p a selection; where() keeps x bit-exact outside
        return torch.where(mask, pattern, images)

    def region_mask(self, height: int, width: int) -> torch.Tensor:
        _check_size(height, width)
        return self._resized(1, height, width, torch.device("cpu"), torch.float32)[1].clone()
