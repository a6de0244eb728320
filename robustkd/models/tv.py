"""torchvision classification models as ``tv-<name>``, e.g. ``tv-resnet18``.

Any name in ``torchvision.models.list_models(module=torchvision.models)`` works after the
``tv-`` prefix; a few that suit small images are also registered so that they are listed by
``model_names()``. The architectures are torchvision's own (ImageNet stems included), with:

* ``weights=None`` always: nothing is ever downloaded, weights are randomly initialised;
* the classifier sized for ``num_classes`` (torchvision's builders take ``num_classes``);
* the first 3-channel convolution replaced when ``in_channels != 3``;
* ViT / MaxViT told the image size, and GoogLeNet / Inception-v3 built without auxiliary heads,
  so that ``model(x)`` always returns plain logits.

``cifar_strides=True`` (``tv-mobilenet_v2`` only) builds the small-image variant that TrojanZoo
calls ``mobilenet_v2_comp``: a stride-1 stem and a stride-1 second stage, so a 32×32 input ends
at 4×4 instead of 1×1. The parameter names and shapes are unchanged, so only this option tells
the two apart; it is a plain bool and so survives a JSON round trip in ``model_args``.

Each build first runs a dry forward pass on the ``meta`` device (shapes only, no compute or
memory), so an image size that an architecture cannot take (e.g. 28×28 for ``tv-vit_b_16``,
whose patch size is 16) fails early with a ``ConfigError``.

``feature_layers`` are per family: ``layer1``…``layer4`` for ResNet/ResNeXt/Wide-ResNet, the
stages of RegNet, ShuffleNet, ConvNeXt, Swin, MaxViT and DenseNet, the inception blocks of
GoogLeNet / Inception-v3 and four evenly spaced encoder blocks of ViT (whose outputs are token
sequences ``(N, 1 + patches, dim)``, not maps). For MobileNet, EfficientNet, MNASNet, VGG,
AlexNet and SqueezeNet they are found from the dry run: the last child of ``features`` (or
``layers``) at each spatial resolution, stem excluded. Unknown families get ``[]``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from robustkd.errors import ConfigError, UnknownNameError
from robustkd.models import register_model

PREFIX = "tv-"

# Registered (listed) names: they build with any in_channels and work on 28×28 and 32×32.
# Others (ConvNeXt, DenseNet, torchvision VGG, ViT …) need larger images but stay reachable
# through the generic ``tv-<name>`` path.
LISTED = (
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "shufflenet_v2_x1_0",
    "regnet_y_400mf",
)

# MobileNetV2 stages (t, c, n, s) with the second stage at stride 1 (2 on ImageNet).
_CIFAR_MOBILENET_V2 = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
CIFAR_STRIDES_ARCHS = ("mobilenet_v2",)


@functools.cache
def torchvision_names() -> tuple[str, ...]:
    """Names of torchvision's classification models (without the ``tv-`` prefix)."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


def torchvision_factory(arch: str) -> Callable[..., nn.Module]:
    """The model factory for torchvision model ``arch``; unknown names list the valid ones."""
    arch = arch.lower()
    if arch not in torchvision_names():
        valid = ", ".join(PREFIX + n for n in torchvision_names())
        raise UnknownNameError(
            f"Unknown torchvision model {PREFIX + arch!r}; choose one of: {valid}."
        )
    factory = functools.partial(build_torchvision, arch)
    factory.__doc__ = f"torchvision ``{arch}`` (random weights)."
    return factory


def build_torchvision(
    arch: str,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: tuple[int, int] = (224, 224),
    **kwargs: Any,
) -> nn.Module:
    """Build torchvision model ``arch`` for ``(in_channels, *image_size)`` inputs.

    Extra ``kwargs`` go to the torchvision builder (e.g. ``dropout`` for EfficientNet), except
    ``cifar_strides`` (see the module docstring).
    """
    if kwargs.pop("weights", None) is not None:
        raise ConfigError("Pretrained torchvision weights are not supported; use weights=None.")
    cifar_strides = kwargs.pop("cifar_strides", False)
    if not isinstance(cifar_strides, bool):
        raise ConfigError(f"cifar_strides must be true or false; got {cifar_strides!r}.")
    if cifar_strides and arch not in CIFAR_STRIDES_ARCHS:
        raise ConfigError(
            f"cifar_strides is available for {', '.join(PREFIX + a for a in CIFAR_STRIDES_ARCHS)}"
            f" only, not {PREFIX + arch}; drop the option or pick a CIFAR model such as resnet18."
        )
    height, width = image_size
    kwargs = {**_arch_defaults(arch, (height, width)), **kwargs}
    if cifar_strides:
        kwargs.setdefault("inverted_residual_setting", [list(s) for s in _CIFAR_MOBILENET_V2])
    builder = torchvision.models.get_model_builder(arch)

    def build() -> nn.Module:
        try:
            model = builder(weights=None, num_classes=num_classes, **kwargs)
        except (TypeError, ValueError, AssertionError) as exc:
            raise ConfigError(f"Cannot build torchvision model {arch!r}: {exc}") from exc
        if cifar_strides:
            # Same weights, stride 1: the stem convolution keeps its shape.
            model.features[0][0].stride = (1, 1)  # type: ignore[index]
        if in_channels != 3:
            _replace_first_conv(model, in_channels)
        return model

    layers: list[str] | None = None
    try:
        # A dry run on the meta device checks the image size for free, before real allocation.
        with torch.device("meta"):
            probe_model = build()
        layers = _probe(probe_model, arch, in_channels, (height, width))
    except Exception:
        # A bad size or option, or an operator without a meta kernel (RegNet's builder, for
        # one): the real model below tells which, and raises the user-facing error.
        pass
    model = build()
    if layers is None:
        try:
            layers = _probe(model, arch, in_channels, (height, width))
        except _ProbeError as exc:
            raise ConfigError(
                f"torchvision model {arch!r} does not accept {in_channels}×{height}×{width} "
                f"inputs ({exc})."
            ) from exc
    model.feature_layers = layers
    return model


class _ProbeError(Exception):
    """The dry forward pass failed."""


def _arch_defaults(arch: str, size: tuple[int, int]) -> dict[str, Any]:
    height, width = size
    if arch.startswith("vit_"):
        if height != width:
            raise ConfigError(f"torchvision ViTs need square images; got {height}×{width}.")
        return {"image_size": height}
    if arch.startswith("maxvit"):
        return {"input_size": (height, width)}
    if arch in ("googlenet", "inception_v3"):
        # Auxiliary heads make train-mode forward return a tuple; ImageNet input transform
        # assumes 3 ImageNet-normalised channels.
        return {"aux_logits": False, "transform_input": False, "init_weights": True}
    return {}


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first 3-channel ``Conv2d`` (the stem) for one taking ``in_channels``."""
    found = next(
        (
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.in_channels == 3
        ),
        None,
    )
    if found is None:
        raise ConfigError("Found no 3-channel input convolution to adapt to in_channels.")
    name, module = found
    new = nn.Conv2d(
        in_channels,
        module.out_channels,
        module.kernel_size,  # type: ignore[arg-type]
        stride=module.stride,  # type: ignore[arg-type]
        padding=module.padding,  # type: ignore[arg-type]
        dilation=module.dilation,  # type: ignore[arg-type]
        groups=module.groups,
        bias=module.bias is not None,
        padding_mode=module.padding_mode,
        device=module.weight.device,
        dtype=module.weight.dtype,
    )
    if module.weight.device.type != "meta":
        with torch.no_grad():
            # Keep the family's own initialisation scale rather than PyTorch's default.
            new.weight.normal_(0.0, float(module.weight.std()))
            if module.bias is not None:
                new.bias.copy_(module.bias)  # type: ignore[union-attr]
    parent_name, _, child = name.rpartition(".")
    model.get_submodule(parent_name).register_module(child, new)


def _probe(model: nn.Module, arch: str, in_channels: int, size: tuple[int, int]) -> list[str]:
    """Run one eval-mode forward pass; return the feature layers (found or fixed per family)."""
    fixed, candidates = _layer_candidates(model, arch)
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, Tensor):
                shapes[name] = tuple(output.shape)

        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in candidates]
    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    # Eval mode: BatchNorm would reject a batch of one at 1×1 resolution in training mode.
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels, *size, device=device))
    except Exception as exc:  # any failure means "this input does not fit"
        message = str(exc).strip()
        raise _ProbeError(message.splitlines()[0] if message else repr(exc)) from exc
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    if fixed is not None:
        return fixed
    return _last_per_resolution(candidates, shapes)


def _layer_candidates(model: nn.Module, arch: str) -> tuple[list[str] | None, list[str]]:
    """``(fixed feature layers or None, modules to watch in the dry run)``."""
    names = {n for n, _ in model.named_modules()}

    def children(prefix: str) -> list[str]:
        return [f"{prefix}.{n}" for n, _ in model.get_submodule(prefix).named_children()]

    fixed: list[str] | None = None
    if all(f"layer{i}" in names for i in range(1, 5)):  # ResNet, ResNeXt, Wide-ResNet
        fixed = [f"layer{i}" for i in range(1, 5)]
    elif arch.startswith("regnet"):
        fixed = children("trunk_output")
    elif arch.startswith("shufflenet"):
        fixed = ["stage2", "stage3", "stage4"]
    elif arch.startswith("densenet"):
        fixed = [f"features.denseblock{i}" for i in range(1, 5)]
    elif arch.startswith(("convnext", "swin")):
        fixed = [f"features.{i}" for i in (1, 3, 5, 7)]  # stages between downsamplings
    elif arch.startswith("maxvit"):
        fixed = children("blocks")
    elif arch == "googlenet":
        fixed = ["inception3b", "inception4e", "inception5b"]
    elif arch == "inception_v3":
        fixed = ["Mixed_5d", "Mixed_6e", "Mixed_7c"]
    elif arch.startswith("vit_"):
        blocks = children("encoder.layers")
        fixed = [blocks[math.ceil(len(blocks) * q / 4) - 1] for q in range(1, 5)]
    if fixed is not None:
        return [n for n in fixed if n in names], []
    for prefix in ("features", "layers"):  # MobileNet, EfficientNet, VGG, … / MNASNet
        if prefix in names and isinstance(model.get_submodule(prefix), nn.Sequential):
            return None, children(prefix)[1:]  # [0] is the stem
    return [], []


def _last_per_resolution(candidates: list[str], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    # A stage ends where the spatial size is about to change (or at the last module).
    seen = [n for n in candidates if n in shapes and len(shapes[n]) == 4]
    return [
        n
        for i, n in enumerate(seen)
        if i + 1 == len(seen) or shapes[seen[i + 1]][2:] != shapes[n][2:]
    ]


for _arch in LISTED:
    register_model(PREFIX + _arch)(torchvision_factory(_arch))
