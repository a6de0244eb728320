"""The BadNets trigger: a small solid or checkerboard square patch at a fixed place."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from robustkd.attacks.base import TRIGGERS, Trigger, _check_size, _float_param, _int_param
from robustkd.errors import ConfigError

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
