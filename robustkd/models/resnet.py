"""CIFAR-style ResNets (He et al., 2016) for small images.

Unlike the ImageNet version, the stem is a single 3×3 stride-1 convolution with no max-pooling,
so a 32×32 input reaches ``layer4`` at 4×4. Global average pooling makes any size ≥ 8 work.
Parameter names follow the widely used ``kuangliu/pytorch-cifar`` layout (``conv1``, ``bn1``,
``layer1``…``layer4``, ``shortcut``, ``linear``), so such checkpoints load without renaming.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from robustkd.models import register_model


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with an identity (or 1×1 projection) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (strided), 1×1 expand ×4, with an identity or projection shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _projection(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _projection(cin: int, cout: int, stride: int) -> nn.Sequential:
    # An empty Sequential is the identity; a projection is needed only when the shape changes.
    if stride == 1 and cin == cout:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
        nn.BatchNorm2d(cout),
    )


class ResNet(nn.Module):
    """ResNet with four stages of widths 64-128-256-512 (× block expansion).

    The stage features are the outputs of ``layer1`` … ``layer4``.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: tuple[int, int, int, int],
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: tuple[int, int] = (32, 32),
    ) -> None:
        super().__init__()
        del image_size  # global pooling makes the network size-agnostic
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        self.feature_layers = ["layer1", "layer2", "layer3", "layer4"]
        _init_weights(self)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.avgpool(out).flatten(1))


def _init_weights(model: nn.Module) -> None:
    # He initialisation for convolutions, as in the original ResNet paper.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@register_model("resnet18")
def resnet18(**kwargs) -> ResNet:
    """ResNet-18 for CIFAR (≈11.17M parameters with 10 classes)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model("resnet34")
def resnet34(**kwargs) -> ResNet:
    """ResNet-34 for CIFAR (≈21.28M parameters with 10 classes)."""
    return ResNet(BasicBlock, (3, 4, 6, 3), **kwargs)


@register_model("resnet50")
def resnet50(**kwargs) -> ResNet:
    """ResNet-50 (bottleneck blocks) for CIFAR (≈23.52M parameters with 10 classes)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)
