"""The Blend trigger: seeded noise or an image file blended over the whole image."""

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
    _float_param,
    _int_param,
    _load_rgba,
    _png_base64,
    _resize,
    _to_channels,
)
from robustkd.errors import ConfigError


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
