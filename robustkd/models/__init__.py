"""Model zoo: ``create_model(name, num_classes, in_channels, image_size)`` over a registry.

Models are plain ``nn.Module``s with no training logic. Each one names its stage outputs in
``model.feature_layers`` (module names for forward hooks), from shallow to deep.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from robustkd.errors import ConfigError
from robustkd.registry import Registry

ModelFactory = Callable[..., nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")
register_model = MODELS.register


# family module → why it could not be imported (its models are then not listed)
UNAVAILABLE: dict[str, str] = {}


def model_names() -> list[str]:
    _load_families()
    return MODELS.names()


def unavailable_families() -> dict[str, str]:
    """Model families that failed to import, with the reason (e.g. a missing package)."""
    _load_families()
    return dict(UNAVAILABLE)


def create_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int | tuple[int, int] = 28,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model for inputs ``(in_channels, image_size, image_size)``."""
    _load_families()
    factory = _resolve(name)
    if num_classes < 2:
        raise ConfigError(f"A classifier needs at least 2 classes; got {num_classes}.")
    if in_channels < 1:
        raise ConfigError(f"in_channels must be at least 1; got {in_channels}.")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if min(size) < 8:
        raise ConfigError(f"Images must be at least 8×8 pixels; got {size[0]}×{size[1]}.")
    model = factory(num_classes=num_classes, in_channels=in_channels, image_size=size, **kwargs)
    if not hasattr(model, "feature_layers"):
        model.feature_layers = []
    return model


def _resolve(name: str) -> ModelFactory:
    # Any torchvision classifier is reachable as "tv-<name>", registered or not.
    if name not in MODELS and str(name).lower().startswith("tv-"):
        from robustkd.models.tv import torchvision_factory

        return torchvision_factory(str(name)[3:])
    return MODELS.get(name)


def _load_families() -> None:
    # Importing a family module registers its models; done lazily to keep import light.
    from robustkd.models import small_cnn  # noqa: F401

    # One import per family, so that one failing (e.g. no torchvision) leaves the others.
    for family in ("mobilenetv2", "preact_resnet", "resnet", "tv", "vgg", "wrn"):
        try:
            importlib.import_module(f"robustkd.models.{family}")
        except ImportError as exc:
            UNAVAILABLE[family] = str(exc) or type(exc).__name__
