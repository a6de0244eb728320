"""The optimised blend trigger: a learned pattern pasted through a learned soft mask.

The pattern and the mask are learned against a teacher (``robustkd.experiments.survive``, the
``optimized-blend`` recipe) and travel as 8-bit PNG pixels inside the trigger's parameters, so a
checkpoint that records the trigger needs no file beside it. The mask is stored as a fraction of
``max_mask``: its 256 levels span [0, max_mask], and no stored mask value can exceed the bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from robustkd.attacks.base import (
    TRIGGERS,
    Trigger,
    _decode_base64,
    _float_param,
    _load_rgba,
    _png_base64,
    _resize,
    _to_channels,
)
from robustkd.errors import ConfigError, DataError


def _tensor_pixels(values: torch.Tensor, what: str, low: float, high: float) -> np.ndarray:
    """Float tensor with values in [low, high] → uint8 numpy, ``high`` mapped to 255."""
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise DataError(f"The optimized-blend {what} must be a float tensor.")
    v = values.detach().double().cpu()
    if not bool(torch.isfinite(v).all()) or float(v.min()) < low or float(v.max()) > high + 1e-6:
        raise DataError(f"The optimized-blend {what} must hold values in [{low:g}, {high:g}].")
    return np.rint((v.clamp(low, high) / high).numpy() * 255.0).astype(np.uint8)


@TRIGGERS.register("optimized-blend")
class OptimizedBlendTrigger(Trigger):
    """``x' = (1 − m)·x + m·p`` with a learned pattern ``p`` and a soft mask ``m`` in
    [0, max_mask] (the optimised blended trigger of the RobustKD authors' code, mask ≤ 0.2).

    ``pattern_png`` (grey or RGB) and ``mask_png`` (grey, 255 = ``max_mask``) are base64 PNG, as
    ``from_tensors`` writes them; both are resized to the image size when it differs.
    """

    name = "optimized-blend"

    def __init__(
        self, pattern_png: str | None = None, mask_png: str | None = None, max_mask: float = 0.2
    ) -> None:
        super().__init__()
        if pattern_png is None or mask_png is None:
            raise ConfigError(
                "An optimized-blend trigger is learned, not typed: train a teacher with the "
                "optimized-blend recipe (robustkd train-teacher --recipe optimized-blend) and "
                "use the trigger its checkpoint records."
            )
        self.max_mask = _float_param(
            "optimized-blend", "max_mask", max_mask, 0.0, 1.0, low_open=True
        )
        self.pattern_png = pattern_png
        self.mask_png = mask_png
        self._pattern = _load_rgba(
            _decode_base64(pattern_png, "optimized-blend pattern"), "optimized-blend pattern"
        )[0]
        mask_rgba = _load_rgba(
            _decode_base64(mask_png, "optimized-blend mask"), "optimized-blend mask"
        )[0]
        # a grey PNG decodes to R = G = B; the red channel is the stored level itself
        self._mask = mask_rgba[0].double() / 255.0 * self.max_mask

    @classmethod
    def from_tensors(
        cls, pattern: torch.Tensor, mask: torch.Tensor, max_mask: float = 0.2
    ) -> OptimizedBlendTrigger:
        """A trigger from a ``(C, H, W)`` pattern in [0, 1] (C = 1 or 3) and an ``(H, W)``
        or ``(1, H, W)`` mask in [0, max_mask]; pixels are kept as 8-bit PNG."""
        max_mask = _float_param("optimized-blend", "max_mask", max_mask, 0.0, 1.0, low_open=True)
        if pattern.dim() != 3 or pattern.shape[0] not in (1, 3):
            raise DataError(
                "The optimized-blend pattern must be shaped (C, H, W) with 1 or 3 channels; "
                f"got {tuple(pattern.shape)}."
            )
        m = mask[0] if mask.dim() == 3 and mask.shape[0] == 1 else mask
        if m.dim() != 2 or tuple(m.shape) != tuple(pattern.shape[1:]):
            raise DataError(
                f"The optimized-blend mask must be shaped (H, W) like the pattern "
                f"{tuple(pattern.shape[1:])}; got {tuple(mask.shape)}."
            )
        p = _tensor_pixels(pattern, "pattern", 0.0, 1.0)
        p = p[0] if p.shape[0] == 1 else np.ascontiguousarray(np.transpose(p, (1, 2, 0)))
        pattern_png = _png_base64(np.ascontiguousarray(p), "L" if p.ndim == 2 else "RGB")
        mask_png = _png_base64(_tensor_pixels(m, "mask", 0.0, max_mask), "L")
        return cls(pattern_png=pattern_png, mask_png=mask_png, max_mask=max_mask)

    def params(self) -> dict[str, Any]:
        return {
            "pattern_png": self.pattern_png,
            "mask_png": self.mask_png,
            "max_mask": self.max_mask,
        }

    def mask(self, height: int, width: int) -> torch.Tensor:
        """The ``(H, W)`` blend mask at that image size, values in [0, max_mask]."""
        return self._resized(1, height, width, torch.device("cpu"), torch.float64)[1][0].clone()

    def pattern(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The ``(C, H, W)`` pattern at that size, values in [0, 1]."""
        cpu = torch.device("cpu")
        return self._resized(channels, height, width, cpu, torch.float64)[0].clone()

    def _resized(
        self, channels: int, height: int, width: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        def make() -> tuple[torch.Tensor, torch.Tensor]:
            p = _resize(_to_channels(self._pattern, channels), height, width, "bilinear")
            m = _resize(self._mask[None], height, width, "bilinear").clamp(0.0, self.max_mask)
            return p.to(device=device, dtype=dtype), m.to(device=device, dtype=dtype)

        return self._cached((channels, height, width, device, dtype), make)

    def _stamp(self, images: torch.Tensor) -> torch.Tensor:
        _, c, h, w = images.shape
        pattern, mask = self._resized(c, h, w, images.device, images.dtype)
        return (1.0 - mask) * images + mask * pattern

    def region_mask(self, height: int, width: int) -> torch.Tensor:
        """The pixels the trigger changes: where the stored mask is above zero."""
        return self.mask(height, width) > 0


def fit_blends(
    model: torch.nn.Module,
    images: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    count: int = 1,
    max_mask: float = 0.2,
    steps: int = 300,
    lr: float = 0.1,
    batch_size: int = 128,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Learn ``count`` blend triggers at once against ``model``, its weights untouched.

    ``images`` are ``(N, C, H, W)`` in [0, 1] on the model's device. At every step a batch of
    them is drawn, stamped with each trigger, ``x' = (1 − m)·x + m·p`` (``m`` in [0,
    max_mask] through a sigmoid), normalised, and ``objective(inputs, picked)`` — inputs
    ``(count · B, C, H, W)``, the triggers' batches one after another — is minimised with
    Adam. Returns the patterns ``(count, C, H, W)`` in [0, 1], the masks ``(count, 1, H, W)``
    and the objective at every step; the model is left in eval mode.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    device = images.device
    _, c, h, w = images.shape
    pattern_logit = (torch.randn((count, c, h, w), generator=g) * 0.5).to(device)
    pattern_logit.requires_grad_()
    # start at a quarter of the bound everywhere: room to grow where it pays, to shrink elsewhere
    mask_logit = torch.full((count, 1, h, w), -1.1, device=device).requires_grad_()
    opt = torch.optim.Adam([pattern_logit, mask_logit], lr=lr)
    mu = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    sigma = torch.tensor(std, device=device).view(1, -1, 1, 1)
    history: list[float] = []
    model.eval()
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            pick = torch.randint(len(images), (min(batch_size, len(images)),), generator=g)
            x = images[pick.to(device)]
            m = (max_mask * torch.sigmoid(mask_logit))[:, None]
            xt = ((1 - m) * x[None] + m * torch.sigmoid(pattern_logit)[:, None]).flatten(0, 1)
            loss = objective((xt - mu) / sigma, pick)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
    finally:
        for p, flag in zip(model.parameters(), frozen, strict=True):
            p.requires_grad_(flag)
    with torch.no_grad():
        patterns = torch.sigmoid(pattern_logit).cpu()
        masks = (max_mask * torch.sigmoid(mask_logit)).clamp(0.0, max_mask).cpu()
    return patterns, masks, history
