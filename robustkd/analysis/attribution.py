"""Where a model looks: Captum attributions in pixel space, their mass inside a trigger region,
and a heat overlay for display.

Models take normalised input, but triggers and people think in [0, 1] pixels, so attributions
are taken through ``PixelSpaceModel`` (``f(x01) = model(normalize(x01, mean, std))``): a map's
pixels are the image's pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from robustkd.analysis.features import resolve_layers
from robustkd.data.datasets import normalize
from robustkd.errors import ConfigError, DataError, UnknownNameError
from robustkd.models.sharing import view

ATTRIBUTION_METHODS = ("saliency", "integrated-gradients", "layer-gradcam", "occlusion")


class PixelSpaceModel(nn.Module):
    """``model`` behind its input normalisation: takes float images in [0, 1]."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.model(normalize(x01, self.mean, self.std))


def _check_inputs(images01: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if not isinstance(images01, torch.Tensor) or images01.dim() != 4:
        shape = tuple(images01.shape) if isinstance(images01, torch.Tensor) else None
        raise DataError(f"Attributions take images shaped (N, C, H, W); got {shape}.")
    if not images01.is_floating_point():
        raise DataError(
            f"Attributions take float images in [0, 1], got {images01.dtype}; convert uint8 "
            "images with robustkd.data.datasets.to_float first."
        )
    targets = torch.as_tensor(targets).long().flatten()
    if targets.numel() != images01.shape[0]:
        raise DataError(
            f"Give one target class per image: {images01.shape[0]} images but "
            f"{targets.numel()} targets."
        )
    return targets


def _gradcam_layer(model: nn.Module, layer: str | None) -> str:
    if layer is None:
        stages = list(getattr(model, "feature_layers", []))
        if not stages:
            raise ConfigError(
                "This model names no stage outputs; pass the layer for Grad-CAM by name."
            )
        return stages[0]  # a shallow stage keeps most of the image's resolution
    names = resolve_layers(model, layer)
    if len(names) != 1:
        raise ConfigError(f"Grad-CAM takes one layer; got {', '.join(names)}.")
    return names[0]


def attribute(
    model: nn.Module,
    images01: torch.Tensor,
    targets: torch.Tensor,
    method: str,
    mean: Sequence[float],
    std: Sequence[float],
    layer: str | None = None,
    steps: int = 32,
) -> torch.Tensor:
    """Non-negative ``(N, H, W)`` attribution maps of ``targets`` for [0, 1] images.

    Gradient maps are absolute values summed over channels; ``layer-gradcam`` works on ``layer``
    (default the model's first stage), ReLU'd and upsampled to the image; ``occlusion`` slides a
    3×3 (or a tenth of the image) black window. ``steps`` is Integrated Gradients' path length.
    """
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion, Saliency

    if method not in ATTRIBUTION_METHODS:
        raise UnknownNameError(
            f"Unknown attribution method {method!r}; choose one of: "
            f"{', '.join(ATTRIBUTION_METHODS)}."
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"Integrated Gradients needs at least 1 step; got {steps!r}.")
    targets = _check_inputs(images01, targets)
    n, c, h, w = images01.shape
    param = next(model.parameters(), None)
    device = param.device if param is not None else images01.device
    # a leaf that needs gradients (Captum would otherwise set it, with a warning)
    x = images01.detach().to(device=device, dtype=torch.float32).requires_grad_(True)
    targets = targets.to(device)
    if n == 0:
        return torch.zeros(0, h, w)
    # an eval-mode view: Grad-CAM's hooks and the mode switch never touch ``model``, which
    # other callers may share; its weights need no gradients (only the images do)
    model = view(model)
    f = PixelSpaceModel(model, mean, std)
    with torch.enable_grad():
        if method == "saliency":
            maps = Saliency(f).attribute(x, target=targets, abs=True).sum(1)
        elif method == "integrated-gradients":
            attr = IntegratedGradients(f).attribute(
                x, baselines=torch.zeros_like(x), target=targets, n_steps=steps
            )
            maps = attr.abs().sum(1)
        elif method == "layer-gradcam":
            name = _gradcam_layer(model, layer)
            cam = LayerGradCam(f, model.get_submodule(name)).attribute(
                x, target=targets, relu_attributions=True
            )
            cam = LayerAttribution.interpolate(cam, (h, w), interpolate_mode="bilinear")
            maps = cam.sum(1).clamp_min(0.0)
        else:
            window = max(3, min(h, w) // 10)
            stride = 1 if min(h, w) <= 32 else 2
            attr = Occlusion(f).attribute(
                x,
                sliding_window_shapes=(c, window, window),
                strides=(c, stride, stride),
                baselines=0.0,
                target=targets,
                perturbations_per_eval=32,
            )
            maps = attr.abs().sum(1)
    return maps.detach().float().nan_to_num(0.0, 0.0, 0.0).clamp_min(0.0).cpu()


def mass_in_region(maps: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Share of each map's total attribution inside ``region`` (``(N,)``; 0 for an empty map)."""
    if not isinstance(maps, torch.Tensor) or maps.dim() != 3:
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else None
        raise DataError(f"Attribution maps must be shaped (N, H, W); got {shape}.")
    region = torch.as_tensor(region, device=maps.device).bool()
    if tuple(region.shape) != tuple(maps.shape[1:]):
        raise DataError(
            f"The region mask is {tuple(region.shape)} but the maps are "
            f"{tuple(maps.shape[1:])}; make the mask for the same image size."
        )
    m = maps.double()
    total = m.sum(dim=(1, 2))
    inside = (m * region).sum(dim=(1, 2))
    share = torch.where(total > 0, inside / total.clamp_min(1e-300), torch.zeros_like(total))
    return share.float()


def overlay(image01: torch.Tensor, attribution: torch.Tensor, alpha: float = 0.7) -> np.ndarray:
    """The image (grey or colour) with the attribution blended in red, uint8 ``(H, W, 3)``."""
    if not isinstance(image01, torch.Tensor) or image01.dim() != 3:
        raise DataError("overlay takes one image shaped (C, H, W).")
    img = image01.detach().float().cpu().clamp(0, 1)
    attr = attribution.detach().float().cpu()
    if tuple(attr.shape) != tuple(img.shape[1:]):
        raise DataError(
            f"The attribution is {tuple(attr.shape)} but the image is {tuple(img.shape[1:])}."
        )
    rgb = img[:3] if img.shape[0] >= 3 else img.mean(0, keepdim=True).expand(3, -1, -1)
    a = attr.clamp_min(0)
    peak = float(a.max()) if a.numel() else 0.0
    a = a / peak if peak > 0 else torch.zeros_like(a)
    a = (alpha * a).unsqueeze(0)
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    out = rgb * (1 - a) + red * a
    return np.ascontiguousarray(
        (out.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    )
