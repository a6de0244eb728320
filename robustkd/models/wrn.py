"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis, 2016) for small images.

Depth ``d = 6n + 4``: a 3×3 stem with 16 channels, then three groups of ``n`` pre-activation
basic blocks with widths ``16k``, ``32k``, ``64k`` (strides 1, 2, 2), a final BN-ReLU, global
pooling and a linear layer. Names follow the common PyTorch port (``conv1``, ``block1``…``block3``
each holding ``layer``, ``bn1``, ``fc``) used by many distillation code bases.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.nn import functional as F

from robustkd.errors import ConfigError
from robustkd.models import register_model


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3×3 (strided), BN-ReLU-dropout-conv3×3, plus the (projected) input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.dropout = nn.Dropout(p=dropout)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        # Not in place on x: the identity shortcut still needs the raw input.
        out = F.relu(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + shortcut


class NetworkBlock(nn.Module):
    """One group of ``n`` wide blocks; only the first changes width or resolution."""

    def __init__(
        self, n: int, in_planes: int, out_planes: int, stride: int, dropout: float
    ) -> None:
        super().__init__()
        blocks = [WideBasicBlock(in_planes, out_planes, stride, dropout)]
        blocks += [WideBasicBlock(out_planes, out_planes, 1, dropout) for _ in range(n - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor. The stage features are the outputs of ``block1`` … ``block3``."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 4,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: tuple[int, int] = (32, 32),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        del image_size  # global pooling makes the network size-agnostic
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ConfigError(f"Wide ResNet depth must be 6n+4 (10, 16, 22, 28, …); got {depth}.")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1); got {dropout}.")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, dropout)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, dropout)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_layers = ["block1", "block2", "block3"]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(self.avgpool(out).flatten(1))


def _wrn(depth: int, widen_factor: int) -> Callable[..., WideResNet]:
    def factory(**kwargs) -> WideResNet:
        return WideResNet(depth=depth, widen_factor=widen_factor, **kwargs)

    factory.__name__ = f"wrn_{depth}_{widen_factor}"
    factory.__doc__ = f"WRN-{depth}-{widen_factor}; ``dropout`` (default 0) between the convs."
    return factory


for _depth, _k in [(16, 2), (16, 4), (28, 2), (28, 4)]:
    register_model(f"wrn-{_depth}-{_k}")(_wrn(_depth, _k))
