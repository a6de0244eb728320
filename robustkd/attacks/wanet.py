"""The WaNet trigger: an invisible seeded smooth warp, with its "noise mode" for poisoning."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from robustkd.attacks.base import (
    TRIGGERS,
    Trigger,
    _as_batch,
    _check_size,
    _float_param,
    _int_param,
    _work_dtype,
)


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
