"""VGG with batch normalisation (Simonyan & Zisserman, 2015), CIFAR style.

Five conv stages (3×3 conv-BN-ReLU) separated by 2×2 max-pooling, then global average pooling
and a single linear layer instead of the 4096-wide ImageNet head. Pooling uses ``ceil_mode``
so that a spatial size of 1 stays 1: 28×28 inputs go 28→14→7→4→2→1 instead of reaching 0.
"""

from __future__ import annotations

from torch import Tensor, nn

from robustkd.models import register_model

# Output channels of each conv, one tuple per stage.
_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
}


def _stage(cin: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for cout in widths:
        layers += [
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]
        cin = cout
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG-BN; the stage features are the outputs of ``stage1`` … ``stage5`` (before pooling)."""

    def __init__(
        self,
        config: tuple[tuple[int, ...], ...],
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: tuple[int, int] = (32, 32),
    ) -> None:
        super().__init__()
        del image_size  # ceil-mode pooling and global pooling make the network size-agnostic
        cin = in_channels
        for i, widths in enumerate(config, start=1):
            self.add_module(f"stage{i}", _stage(cin, widths))
            self.add_module(f"pool{i}", nn.MaxPool2d(2, 2, ceil_mode=True))
            cin = widths[-1]
        self.num_stages = len(config)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        self.feature_layers = [f"stage{i}" for i in range(1, self.num_stages + 1)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"pool{i}")(getattr(self, f"stage{i}")(x))
        return self.classifier(self.avgpool(x).flatten(1))


@register_model("vgg11-bn")
def vgg11_bn(**kwargs) -> VGG:
    """VGG-11 with BatchNorm (≈9.23M parameters with 10 classes)."""
    return VGG(_CONFIGS["vgg11"], **kwargs)


@register_model("vgg16-bn")
def vgg16_bn(**kwargs) -> VGG:
    """VGG-16 with BatchNorm (≈14.73M parameters with 10 classes)."""
    return VGG(_CONFIGS["vgg16"], **kwargs)
