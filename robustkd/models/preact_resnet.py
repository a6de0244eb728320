"""Pre-activation ResNet-18 (He et al., 2016b) in the CIFAR layout used by BackdoorBench.

Each block applies BN → ReLU before its convolutions, and the shortcut branches off after the
first BN-ReLU when it needs a projection. As in BackdoorBench (and ``kuangliu/pytorch-cifar``)
there is no final BN-ReLU before pooling, and the names (``conv1``, ``layer1``…``layer4``,
``bn1``/``conv1``/``bn2``/``conv2``/``shortcut`` per block, ``linear``) match that layout so its
checkpoints load without renaming.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from robustkd.models import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv3×3, BN-ReLU-conv3×3, plus the (projected) input."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * self.expansion, 1, stride=stride, bias=False)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        # The projection sees the pre-activated input, the identity the raw one (He et al.).
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet with stages of widths 64-128-256-512.

    The stage features are the outputs of ``layer1`` … ``layer4``.
    """

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: tuple[int, int] = (32, 32),
    ) -> None:
        super().__init__()
        del image_size  # global pooling makes the network size-agnostic
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * PreActBlock.expansion, num_classes)
        self.feature_layers = ["layer1", "layer2", "layer3", "layer4"]

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes * PreActBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.avgpool(out).flatten(1))


@register_model("preact-resnet18")
def preact_resnet18(**kwargs) -> PreActResNet:
    """PreAct-ResNet-18 (≈11.17M parameters with 10 classes)."""
    return PreActResNet((2, 2, 2, 2), **kwargs)
