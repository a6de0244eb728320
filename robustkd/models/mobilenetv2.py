"""MobileNetV2 (Sandler et al., 2018) adapted to small images.

The standard inverted-residual network, with two CIFAR adaptations: the stem convolution has
stride 1 and the second stage (24 channels) keeps stride 1, so a 32×32 input ends at 4×4
instead of 1×1. Shortcuts are identities only (no projection shortcuts), as in the paper, so the
10-class model has ≈2.24M parameters.
"""

from __future__ import annotations

from torch import Tensor, nn

from robustkd.errors import ConfigError
from robustkd.models import register_model

# (expansion t, output channels c, repeats n, first stride s); strides already CIFAR-adapted.
_CONFIG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 on ImageNet
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(value: float, divisor: int = 8) -> int:
    # Channel counts are rounded to multiples of 8 (hardware-friendly), never down by >10 %.
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1×1 expand, 3×3 depthwise (strided), 1×1 linear projection; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(cin * expand_ratio)
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn(cin, hidden, 1))
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """CIFAR-style MobileNetV2.

    ``layers`` holds the seven bottleneck stages (``layers.0`` … ``layers.6``). The stage
    features are the last module at each resolution: ``layers.1`` (stride 1), ``layers.2``
    (stride 2), ``layers.4`` (stride 4) and ``conv_last`` (stride 8, 1280 channels).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: tuple[int, int] = (32, 32),
        width_mult: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        del image_size  # global pooling makes the network size-agnostic
        if width_mult <= 0:
            raise ConfigError(f"width_mult must be positive; got {width_mult}.")
        cin = _make_divisible(32 * width_mult)
        # The last layer never shrinks below 1280 channels, as in the reference design.
        last = _make_divisible(1280 * max(1.0, width_mult))
        self.stem = _conv_bn(in_channels, cin, 3, stride=1)
        stages = []
        for t, c, n, s in _CONFIG:
            cout = _make_divisible(c * width_mult)
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.conv_last = _conv_bn(cin, last, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        self.feature_layers = ["layers.1", "layers.2", "layers.4", "conv_last"]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_last(self.layers(self.stem(x)))
        return self.classifier(self.avgpool(x).flatten(1))


@register_model("mobilenetv2")
def mobilenetv2(**kwargs) -> MobileNetV2:
    """MobileNetV2 for small images; ``width_mult`` scales the widths (default 1.0)."""
    return MobileNetV2(**kwargs)
