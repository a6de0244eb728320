"""The custom trigger: the user's pattern pasted through a mask, read from image files or built
from in-memory numpy or tensor pixels (with the conversion of those pixels it alone uses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustkd.attacks.base import (
    TRIGGERS,
    Trigger,
    _check_size,
    _decode_base64,
    _load_rgba,
    _luminance,
    _png_base64,
    _resize,
    _to_channels,
)
from robustkd.errors import ConfigError, DataError


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
