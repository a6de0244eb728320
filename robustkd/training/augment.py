"""Batched data augmentation on any device: a draw of random crop offsets and flips from a
generator, and its application to a batch (zero-padded crops, horizontal flips).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class AugmentDraw:
    """The random part of a batch's augmentation: crop offsets (2, N) and flips (N,)."""

    shifts: torch.Tensor | None
    flips: torch.Tensor | None

    def __getitem__(self, index: Any) -> AugmentDraw:
        """The draw of some samples of the batch (a rank's shard, say)."""
        return AugmentDraw(
            None if self.shifts is None else self.shifts[:, index],
            None if self.flips is None else self.flips[index],
        )


def draw_augment(n: int, mode: str, padding: int, generator: torch.Generator) -> AugmentDraw:
    """Draw crop offsets and flips for ``n`` images on the generator's device."""
    device = generator.device
    shifts = flips = None
    if mode != "none" and padding > 0:
        shifts = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=device)
    if mode == "crop-flip":
        flips = torch.rand(n, generator=generator, device=device) < 0.5
    return AugmentDraw(shifts, flips)


def apply_augment(x: torch.Tensor, draw: AugmentDraw, padding: int) -> torch.Tensor:
    """Zero-padded random crops and horizontal flips of ``x`` (N, C, H, W), batched."""
    if x.shape[0] == 0 or (draw.shifts is None and draw.flips is None):
        return x
    n, _, h, w = x.shape
    if draw.shifts is not None:
        shifts = draw.shifts.to(x.device)
        padded = F.pad(x, (padding, padding, padding, padding))
        rows = torch.arange(h, device=x.device)[None, :] + shifts[0][:, None]  # (n, h)
        cols = torch.arange(w, device=x.device)[None, :] + shifts[1][:, None]  # (n, w)
        batch = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
        x = x.permute(0, 3, 1, 2)
    if draw.flips is not None:
        x = torch.where(draw.flips.to(x.device)[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def augment_batch(
    x: torch.Tensor, mode: str, padding: int, generator: torch.Generator
) -> torch.Tensor:
    """Random crops with zero padding (and horizontal flips), batched, on x's device."""
    if mode == "none" or x.shape[0] == 0:
        return x
    return apply_augment(x, draw_augment(x.shape[0], mode, padding, generator), padding)
