"""Small CNNs sized for 28×28 inputs: the default teacher and its ≥4× smaller student."""

from __future__ import annotations

from torch import nn

from robustkd.models import register_model


def _block(cin: int, cout: int, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [
            nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Three conv blocks (each followed by 2×2 max-pooling but the last), global pooling, FC.

    The stage features are the outputs of ``block1``, ``block2`` and ``block3``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: tuple[int, int] = (28, 28),
        widths: tuple[int, int, int] = (32, 64, 128),
        convs_per_block: int = 2,
    ) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.block1 = _block(in_channels, w1, convs_per_block)
        self.pool1 = nn.MaxPool2d(2)
        self.block2 = _block(w1, w2, convs_per_block)
        self.pool2 = nn.MaxPool2d(2)
        self.block3 = _block(w2, w3, convs_per_block)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        self.feature_layers = ["block1", "block2", "block3"]

    def forward(self, x):
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block3(x)
        return self.fc(self.pool(x).flatten(1))


@register_model("small-cnn")
def small_cnn(**kwargs) -> SmallCNN:
    """The default teacher: widths 32-64-128, two convs per block."""
    return SmallCNN(**kwargs)


@register_model("small-cnn-student")
def small_cnn_student(**kwargs) -> SmallCNN:
    """The default student: widths 16-32-64, one conv per block (≈10× fewer parameters)."""
    kwargs.setdefault("widths", (16, 32, 64))
    kwargs.setdefault("convs_per_block", 1)
    return SmallCNN(**kwargs)
