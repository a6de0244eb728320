"""The incremental network tail: logits after a change at a few positions equal a dense
re-run of the tail, for every operation it handles sparsely and for those it does not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkd.analysis.features import tail_from
from robustkd.analysis.incremental import IncrementalTail


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():  # statistics far from the identity, so BN matters
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), _bn(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.bn1(self.conv1(x)))))


class Mixed(nn.Module):
    """Every sparsely handled operation once: strides, dilation, groups (depthwise too),
    paddings, both poolings, a residual sum, functional and module activations."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn1, self.act1 = _bn(12), nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(12, 12, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(12, 16, 3, padding=2, dilation=2, groups=4)
        self.act3 = nn.Hardswish()
        self.block = Residual(16)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pool2 = nn.AvgPool2d(3, stride=1, padding=1)
        self.pool3 = nn.MaxPool2d(3, stride=1, padding=1)  # pads with -inf
        self.conv4 = nn.Conv2d(16, 20, (1, 3), padding=(0, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.pool1(self.act1(self.bn1(self.conv1(x))))
        x = self.act3(self.conv3(torch.relu(self.conv2(x))))
        x = self.pool3(self.pool2(self.depthwise(self.block(x))))
        return self.fc(self.pool(F.leaky_relu(self.conv4(x), 0.1)).flatten(1))


class MeanHead(nn.Module):
    """A mean over the spatial dimensions; or an operation with no sparse form (a roll), which
    the tail runs densely; or a pooled map that stays 4-D, into a 1×1 convolution."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        self.head = nn.Conv2d(6, 4, 1)
        self.variant = variant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.sigmoid(self.conv(self.stem(x)))
        if self.variant == "roll":
            x = torch.roll(x, 1, dims=3)
        if self.variant == "conv head":
            return self.head(F.adaptive_avg_pool2d(x, 1)).flatten(1)
        return self.fc(x.mean((2, 3)))


def _case(model: nn.Module, size: int = 96, n: int = 13) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = model.eval()
    tail = tail_from(model, "stem")
    assert tail is not None
    with torch.no_grad():
        base = model.stem(torch.randn(n, 3, size, size))
    return tail, base.contiguous(memory_format=torch.channels_last)


def _edit(vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Change some channels at each position, depending on the position (as a detox does)."""
    channels = torch.arange(vals.shape[2])
    which = (channels[None, :] + idx[:, None]) % 3 != 0  # (k, C)
    return torch.where(which, 0.5 * vals + 0.1 * idx[:, None].float(), vals)


def _expected(tail: nn.Module, base: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    n, c, h, w = base.shape
    flat = base.permute(0, 2, 3, 1).reshape(n, h * w, c).clone()
    idx = torch.unique(positions)
    flat[:, idx] = _edit(flat[:, idx], idx)
    with torch.no_grad():
        return tail(flat.view(n, h, w, c).permute(0, 3, 1, 2).contiguous())


def _positions(kind: str, h: int, w: int) -> torch.Tensor:
    if kind == "none":
        return torch.zeros(0, dtype=torch.long)
    if kind == "one":
        return torch.tensor([(h // 2) * w + 3])
    if kind == "corner":  # a trigger-like block in the bottom-right corner
        return torch.tensor([r * w + c for r in range(h - 3, h) for c in range(w - 3, w)])
    if kind == "corner+outliers":  # the block and a few scattered units
        corner = [r * w + c for r in range(h - 3, h) for c in range(w - 3, w)]
        return torch.tensor([*corner, 0, w + 7, 5 * w + 1])
    if kind == "edges":  # first and last column, with padding on both sides
        return torch.tensor([r * w for r in range(h)] + [r * w + w - 1 for r in range(h)])
    if kind == "most":
        return torch.arange(0, h * w, 1)[: int(0.9 * h * w)]
    raise ValueError(kind)


KINDS = ["none", "one", "corner", "corner+outliers", "edges", "most"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "model",
    [Mixed, lambda: MeanHead("mean"), lambda: MeanHead("roll"), lambda: MeanHead("conv head")],
    ids=["mixed", "mean", "roll", "conv-head"],
)
def test_incremental_logits_equal_a_dense_rerun(model, kind: str) -> None:
    tail, base = _case(model())
    _, _, h, w = base.shape
    positions = _positions(kind, h, w)
    expected = _expected(tail, base, positions)
    for chunk in (None, 5):
        inc = IncrementalTail(tail, base, chunk=chunk)
        plan = inc.plan(positions)
        got = inc.logits(plan, _edit)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        part = inc.logits(plan, _edit, slice(3, 12))  # rows across chunk borders
        torch.testing.assert_close(part, expected[3:12], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(inc.base_logits, _expected(tail, base, positions[:0]))
    assert inc.base_logits.shape == (base.shape[0], expected.shape[1])


def test_small_changes_run_sparsely_and_wide_ones_densely() -> None:
    tail, base = _case(Mixed())
    inc = IncrementalTail(tail, base)
    _, _, h, w = base.shape
    # one changed position stays sparse through every windowed operation and the residual sum
    one = inc.plan(_positions("one", h, w))
    windowed = {n.name for n in inc.nodes if inc.kind[n] in ("conv", "maxpool", "avgpool")}
    assert {n.name for n in one.windows} == windowed
    assert all(one.support[n] is not None for n in inc.nodes if inc.kind[n] == "add")
    assert 0 < one.cost < 0.5 * one.dense_cost
    # the corner block: sparse at first, dense once the change covers most of a map
    corner = inc.plan(_positions("corner", h, w))
    assert {"conv1", "pool1", "conv2"} <= {n.name for n in corner.windows}
    assert 0 < corner.cost < corner.dense_cost
    wide = inc.plan(_positions("most", h, w))
    assert wide.support[inc.input] is None and not wide.windows
    assert wide.cost == pytest.approx(wide.dense_cost)
    assert inc.plan(torch.zeros(0, dtype=torch.long)).empty


def test_window_tables_follow_the_convolution_geometry() -> None:
    tail, base = _case(Mixed())
    inc = IncrementalTail(tail, base)
    w = base.shape[3]
    plan = inc.plan(torch.tensor([0]))  # top-left position only
    by_name = {n.name: win for n, win in plan.windows.items()}
    # conv1 (3×3, padding 1) changes the 2×2 block at the corner; pool1 (2×2) one position
    assert by_name["conv1"].out_idx.tolist() == [0, 1, w, w + 1]
    assert by_name["pool1"].out_idx.tolist() == [0]


def test_rejects_maps_without_images() -> None:
    tail, base = _case(Mixed())
    with pytest.raises(ValueError):
        IncrementalTail(tail, base[:0])
    with pytest.raises(ValueError):
        IncrementalTail(tail, base.flatten(1))
