"""The SIG trigger: a sinusoidal signal along the columns added to the whole image."""

from __future__ import annotations

import math
from typing import Any

import torch

from robustkd.attacks.base import TRIGGERS, Trigger, _float_param


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
