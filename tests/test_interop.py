"""Teachers saved by other backdoor toolkits load into our models and compute the same logits.

Each toolkit's network is re-implemented here from its published source (module names, shapes
and forward pass as there), given random weights and random BatchNorm statistics (so a wrong
mapping shows), saved the way that toolkit saves it, then loaded through ``read_foreign`` →
``create_model(arch, **model_args_for(...))`` → ``adapt_state_dict`` → strict
``load_state_dict`` and compared with the source, logits against logits.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.transforms import Normalize

from robustkd.errors import CheckpointError, ConfigError
from robustkd.models import create_model
from robustkd.models.interop import (
    LAYOUTS,
    adapt_state_dict,
    closest_fits,
    infer_io,
    model_args_for,
    read_foreign,
)

CIFAR_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR_STD = [0.247, 0.243, 0.261]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def images() -> Tensor:
    """Three 32×32 RGB images in [0, 1], what every toolkit here feeds its CIFAR models."""
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------
# BackdoorBench models/preact_resnet.py: PreActResNet18


class BenchPreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.ind = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class BenchPreActResNet18(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        cin = 64
        for i, (width, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
            blocks = [BenchPreActBlock(cin, width, stride), BenchPreActBlock(width, width, 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            cin = width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.avgpool(out).view(out.size(0), -1))


# ----------------------------------------------------------------------------------------------
# BackdoorBox core/models/resnet.py (ResNet(18)) and core/models/vgg.py (vgg16_bn)


class BoxBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class BoxResNet18(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (width, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
            blocks = [BoxBasicBlock(cin, width, stride), BoxBasicBlock(width, width, 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            cin = width
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.avg_pool2d(out, 4).view(out.size(0), -1))


BOX_VGG_CFG: dict[str, list[Any]] = {
    "vgg11_bn": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16_bn": [
        *(64, 64, "M", 128, 128, "M", 256, 256, 256, "M"),
        *(512, 512, 512, "M", 512, 512, 512, "M"),
    ],
}


class BoxVGGBN(nn.Module):
    def __init__(self, name: str = "vgg16_bn", num_classes: int = 43) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in BOX_VGG_CFG[name]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


# ----------------------------------------------------------------------------------------------
# TrojanZoo trojanzoo/models.py _Model + trojanvision/models/torchvision/{resnet,mobilenet}.py


class ZooImageModel(nn.Module):
    """preprocess (Normalize, no weights) → features → pool → flatten → classifier."""

    def __init__(self, features: nn.Module, classifier: nn.Sequential) -> None:
        super().__init__()
        self.preprocess = Normalize(CIFAR_MEAN, CIFAR_STD)
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten()
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.preprocess(x))
        return self.classifier(self.flatten(self.pool(x)))


def zoo_resnet(comp: bool, depth: int = 18, num_classes: int = 10) -> ZooImageModel:
    """``resnetNN_comp`` (3×3 stride-1 stem, no max-pool) or ``resnetNN``."""
    net = getattr(torchvision.models, f"resnet{depth}")(num_classes=num_classes)
    parts: list[tuple[str, nn.Module]]
    if comp:
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        parts = [("conv1", net.conv1), ("bn1", net.bn1), ("relu", net.relu)]
    else:
        parts = [("conv1", net.conv1), ("bn1", net.bn1), ("relu", net.relu)]
        parts.append(("maxpool", net.maxpool))
    parts += [(f"layer{i}", getattr(net, f"layer{i}")) for i in range(1, 5)]
    classifier = nn.Sequential(OrderedDict([("fc", net.fc)]))
    return ZooImageModel(nn.Sequential(OrderedDict(parts)), classifier)


def zoo_mobilenet_v2_comp(num_classes: int = 10) -> ZooImageModel:
    """``mobilenet_v2_comp``: the CIFAR stage strides and a stride-1 stem."""
    setting = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2]]
    setting += [[6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    net = torchvision.models.mobilenet_v2(
        num_classes=num_classes, inverted_residual_setting=setting
    )
    stem = net.features[0][0]
    net.features[0][0] = nn.Conv2d(3, stem.out_channels, 3, 1, stem.padding, bias=False)
    return ZooImageModel(net.features, net.classifier)


# ----------------------------------------------------------------------------------------------
# The RobustKD paper's code: models/resnet_nole.py (resnet18) and models/WideResNet.py


class PaperBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, downsample: Any = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu2(out + identity)


class PaperResNet18(nn.Module):
    def __init__(self, num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        cin = 64
        for i, (width, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
            down = None
            if stride != 1 or cin != width:
                down = nn.Sequential(
                    nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width)
                )
            blocks = [PaperBasicBlock(cin, width, stride, down), PaperBasicBlock(width, width)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            cin = width
        self.avgpool = nn.AvgPool2d(kernel_size=4)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).view(x.size(0), -1))


class PaperWideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equalInOut = cin == cout
        self.convShortcut = None if self.equalInOut else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.equalInOut:
            out = self.relu1(self.bn1(x))
        else:
            x = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class PaperWRN(nn.Module):
    def __init__(self, depth: int = 16, widen_factor: int = 2, num_classes: int = 100) -> None:
        super().__init__()
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        for i, stride in enumerate([1, 2, 2], start=1):
            group = nn.Module()
            cins = [widths[i - 1]] + [widths[i]] * (n - 1)
            strides = [stride] + [1] * (n - 1)
            blocks = [PaperWideBlock(c, widths[i], s) for c, s in zip(cins, strides, strict=True)]
            group.layer = nn.Sequential(*blocks)
            self.add_module(f"block{i}", group)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        self.channels = widths[3]

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        for i in (1, 2, 3):
            out = getattr(self, f"block{i}").layer(out)
        out = F.avg_pool2d(self.relu(self.bn1(out)), 8)
        return self.fc(out.view(-1, self.channels))


# ----------------------------------------------------------------------------------------------
# helpers


def randomised(model: nn.Module) -> nn.Module:
    """Random BatchNorm affine parameters and running statistics, then eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(100)
    return model.eval()


def backdoorbench_result(
    model: nn.Module, model_name: str, num_classes: int, clean_data: str
) -> dict[str, Any]:
    """An attack_result.pt dict as utils/save_load_attack.py writes it (numpy state included)."""

    def dataset_state(n: int) -> dict[str, Any]:
        return {
            "bd_data_container": {
                "save_folder_path": "./record/x/bd_test_dataset",
                "data_dict": {
                    int(i): {"path": f"./record/x/{i}.png", "other_info": [np.int64(0), i, 1]}
                    for i in range(3)
                },
                "save_file_format": ".png",
            },
            "getitem_all": True,
            "getitem_all_switch": False,
            "original_index_array": np.arange(n),
            "poison_indicator": np.zeros(n),
            "save_folder_path": "./record/x/bd_test_dataset",
        }

    return {
        "model_name": model_name,
        "num_classes": num_classes,
        "model": model.state_dict(),
        "data_path": f"./data/{clean_data}",
        "img_size": (32, 32, 3),
        "clean_data": clean_data,
        "bd_train": dataset_state(50),
        "bd_test": dataset_state(10),
    }


def load(path: Path, arch: str | None = None, layout: str = "auto") -> tuple[nn.Module, str, dict]:
    """The path a user's checkpoint takes: read, build with the layout's options, rename, load."""
    foreign = read_foreign(path)
    arch = arch or foreign.hints["architecture"]
    if layout == "auto":
        layout = foreign.hints.get("layout", "auto")
    io_shape = infer_io(foreign.state)
    # Model options travel in JSON metadata: build from what survives a round trip.
    args = json.loads(json.dumps(model_args_for(arch, layout)))
    model = create_model(arch, **io_shape, image_size=32, **args)
    state, used = adapt_state_dict(foreign.state, arch, layout, model)
    model.load_state_dict(state, strict=True)
    return model.eval(), used, foreign.hints


def assert_same_logits(source: nn.Module, ours: nn.Module, images: Tensor, ours_input=None) -> None:
    with torch.no_grad():
        expected = source(images)
        got = ours(images if ours_input is None else ours_input)
    assert expected.shape == got.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def first_sentence_only(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and ". " not in message


# ----------------------------------------------------------------------------------------------
# BackdoorBench


def test_backdoorbench_attack_result_preactresnet18(tmp_path: Path, images: Tensor) -> None:
    source = randomised(BenchPreActResNet18(num_classes=10))
    path = tmp_path / "attack_result.pt"
    torch.save(backdoorbench_result(source, "preactresnet18", 10, "cifar10"), path)
    before = set(map(repr, torch.serialization.get_safe_globals()))
    with pytest.raises(Exception, match="numpy"):  # why this needs more than a plain load
        torch.load(path, weights_only=True)

    model, used, hints = load(path)

    assert hints == {
        "layout": "backdoorbench",
        "architecture": "preact-resnet18",
        "num_classes": 10,
        "image_size": [32, 32],
        "in_channels": 3,
        "normalization": {"mean": CIFAR_MEAN, "std": CIFAR_STD},
        "dataset": "cifar10",
    }
    assert used == "backdoorbench"
    assert_same_logits(source, model, images)
    # The numpy allowance lasted for that one load only.
    assert set(map(repr, torch.serialization.get_safe_globals())) == before
    with pytest.raises(Exception, match="numpy"):
        torch.load(path, weights_only=True)


def test_backdoorbench_file_written_with_numpy_1(tmp_path: Path, images: Tensor) -> None:
    # numpy 1.x pickles arrays under numpy.core.*, numpy 2 under numpy._core.*.
    source = randomised(BenchPreActResNet18(num_classes=10))
    buffer = io.BytesIO()
    torch.save(backdoorbench_result(source, "preactresnet18", 10, "cifar10"), buffer)
    path = tmp_path / "attack_result.pt"
    original = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in original.infolist():
            data = original.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray\n" in data
                data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
            out.writestr(info, data)

    model, _, hints = load(path)

    assert hints["architecture"] == "preact-resnet18"
    assert_same_logits(source, model, images)


def test_backdoorbench_torchvision_resnet18_on_gtsrb(tmp_path: Path, images: Tensor) -> None:
    source = randomised(torchvision.models.resnet18(num_classes=43))
    path = tmp_path / "attack_result.pt"
    torch.save(backdoorbench_result(source, "resnet18", 43, "gtsrb"), path)

    model, used, hints = load(path)

    assert hints["architecture"] == "tv-resnet18" and hints["num_classes"] == 43
    assert hints["normalization"] == "none" and hints["dataset"] == "gtsrb"
    assert used == "backdoorbench"
    assert_same_logits(source, model, images)


def test_backdoorbench_torchvision_vgg19_bn(tmp_path: Path, images: Tensor) -> None:
    source = randomised(torchvision.models.vgg19_bn(num_classes=10))
    path = tmp_path / "attack_result.pt"
    torch.save(backdoorbench_result(source, "vgg19_bn", 10, "cifar10"), path)

    model, _, hints = load(path)

    assert hints["architecture"] == "tv-vgg19_bn"
    assert_same_logits(source, model, images)


def test_backdoorbench_torchvision_googlenet_without_its_training_heads(
    tmp_path: Path, images: Tensor
) -> None:
    # torchvision's default GoogLeNet carries two auxiliary heads that act in training only.
    source = randomised(torchvision.models.googlenet(num_classes=10, init_weights=True))
    assert any(k.startswith("aux1.") for k in source.state_dict())
    path = tmp_path / "attack_result.pt"
    torch.save(backdoorbench_result(source, "googlenet", 10, "cifar10"), path)

    model, used, hints = load(path)

    assert hints["architecture"] == "tv-googlenet" and used == "backdoorbench"
    assert_same_logits(source, model, images)


def test_backdoorbench_defense_result_mobilenet_v2_with_module_prefix(
    tmp_path: Path, images: Tensor
) -> None:
    source = randomised(torchvision.models.mobilenet_v2(num_classes=10))
    wrapped = nn.DataParallel(source)  # trained on several GPUs: keys start with "module."
    path = tmp_path / "defense_result.pt"
    torch.save(
        {"model_name": "mobilenet_v2", "num_classes": 10, "model": wrapped.state_dict()}, path
    )

    model, used, hints = load(path)

    assert hints == {
        "layout": "backdoorbench",
        "architecture": "tv-mobilenet_v2",
        "num_classes": 10,
    }
    assert used == "backdoorbench"
    assert_same_logits(source, model, images)


# ----------------------------------------------------------------------------------------------
# BackdoorBox


def test_backdoorbox_resnet18(tmp_path: Path, images: Tensor) -> None:
    source = randomised(BoxResNet18(num_classes=10))
    path = tmp_path / "ckpt_epoch_200.pth"
    torch.save(source.state_dict(), path)

    model, used, hints = load(path, "resnet18")

    assert hints == {} and used == "plain"
    assert_same_logits(source, model, images)


@pytest.mark.parametrize("layout", ["backdoorbox", "auto"])
@pytest.mark.parametrize(("name", "arch"), [("vgg16_bn", "vgg16-bn"), ("vgg11_bn", "vgg11-bn")])
def test_backdoorbox_vgg_bn(
    tmp_path: Path, images: Tensor, name: str, arch: str, layout: str
) -> None:
    source = randomised(BoxVGGBN(name, num_classes=43))
    path = tmp_path / "ckpt_epoch_200.pth"
    torch.save(source.state_dict(), path)

    model, used, _ = load(path, arch, layout)

    assert used == "backdoorbox"
    assert_same_logits(source, model, images)


# ----------------------------------------------------------------------------------------------
# TrojanZoo (normalises inside the model: we normalise the images before ours instead)


@pytest.mark.parametrize("depth", [18, 50])
def test_trojanzoo_resnet_comp(tmp_path: Path, images: Tensor, depth: int) -> None:
    source = randomised(zoo_resnet(comp=True, depth=depth))
    path = tmp_path / f"resnet{depth}_comp.pth"
    torch.save(source.state_dict(), path)

    model, used, hints = load(path, f"resnet{depth}")

    assert hints == {"layout": "trojanzoo", "normalization": "dataset"}
    assert used == "trojanzoo"
    normalised = Normalize(CIFAR_MEAN, CIFAR_STD)(images)
    assert_same_logits(source, model, images, ours_input=normalised)


def test_trojanzoo_resnet18_with_imagenet_stem(tmp_path: Path, images: Tensor) -> None:
    source = randomised(zoo_resnet(comp=False))
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)

    model, used, _ = load(path, "tv-resnet18")

    assert used == "trojanzoo"
    normalised = Normalize(CIFAR_MEAN, CIFAR_STD)(images)
    assert_same_logits(source, model, images, ours_input=normalised)


@pytest.mark.parametrize("arch", ["mobilenetv2", "tv-mobilenet_v2"])
def test_trojanzoo_mobilenet_v2_comp(tmp_path: Path, images: Tensor, arch: str) -> None:
    source = randomised(zoo_mobilenet_v2_comp())
    path = tmp_path / "mobilenet_v2_comp.pth"
    torch.save(source.state_dict(), path)

    model, used, _ = load(path, arch, "trojanzoo")

    assert used == "trojanzoo"
    normalised = Normalize(CIFAR_MEAN, CIFAR_STD)(images)
    assert_same_logits(source, model, images, ours_input=normalised)


def test_trojanzoo_mobilenet_v2_comp_needs_its_layout(tmp_path: Path, images: Tensor) -> None:
    # Its names are torchvision's, so the plain tv-mobilenet_v2 loads strictly, but with
    # ImageNet strides it is another function: only the layout can say which one is meant.
    source = randomised(zoo_mobilenet_v2_comp())
    path = tmp_path / "mobilenet_v2_comp.pth"
    torch.save(source.state_dict(), path)
    assert model_args_for("tv-mobilenet_v2", "trojanzoo") == {"cifar_strides": True}

    model, used, _ = load(path, "tv-mobilenet_v2", "plain")

    assert used == "plain"
    with torch.no_grad():
        wrong = model(Normalize(CIFAR_MEAN, CIFAR_STD)(images))
        assert not torch.allclose(wrong, source(images), atol=1e-3)


# ----------------------------------------------------------------------------------------------
# The RobustKD paper's code


def test_paper_resnet18(tmp_path: Path, images: Tensor) -> None:
    source = randomised(PaperResNet18(num_classes=100))
    path = tmp_path / "CIFAR-100-resnet18.pt"
    torch.save(source.state_dict(), path)

    model, used, _ = load(path, "resnet18")

    assert used == "torchvision"
    assert_same_logits(source, model, images)


def test_paper_wrn_16_2_in_a_model_wrapper(tmp_path: Path, images: Tensor) -> None:
    source = randomised(PaperWRN(depth=16, widen_factor=2, num_classes=100))
    path = tmp_path / "WRN16-2.pt"
    torch.save({"model": source.state_dict(), "epoch": 200}, path)

    model, used, _ = load(path, "wrn-16-2")

    assert used == "plain"
    assert_same_logits(source, model, images)


# ----------------------------------------------------------------------------------------------
# safety, inference and errors


class RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_pickle_referencing_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "attack_result.pt"
    state = randomised(BoxResNet18()).state_dict()
    torch.save({"model_name": "resnet18", "model": state, "x": RunsACommand(marker)}, path)

    with pytest.raises(CheckpointError) as info:
        read_foreign(path)

    assert not marker.exists()
    message = str(info.value)
    assert "system" in message and first_sentence_only(message)


def test_safetensors_file_reads_without_hints(tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in BoxResNet18().state_dict().items()}
    path = tmp_path / "teacher.safetensors"
    save_file(state, str(path))

    foreign = read_foreign(path)

    assert foreign.hints == {} and foreign.state.keys() == state.keys()


def test_unreadable_files_give_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    (tmp_path / "weights.npz").write_bytes(b"")
    torch.save({"epoch": 3}, tmp_path / "no_weights.pt")
    for name in ("junk.pt", "weights.npz", "no_weights.pt", "missing.pt"):
        with pytest.raises(CheckpointError) as info:
            read_foreign(tmp_path / name)
        assert first_sentence_only(str(info.value)), str(info.value)


def test_infer_io_reads_channels_and_classes() -> None:
    assert infer_io(PaperResNet18(num_classes=100).state_dict()) == {
        "in_channels": 3,
        "num_classes": 100,
    }
    gray = create_model("small-cnn", num_classes=7, in_channels=1, image_size=28)
    assert infer_io(gray.state_dict()) == {"in_channels": 1, "num_classes": 7}
    assert infer_io({"bn.running_mean": torch.zeros(3)}) == {}


def test_closest_fits_names_the_architecture_a_wrong_arch_misses(tmp_path: Path) -> None:
    state = randomised(zoo_resnet(comp=True)).state_dict()

    fits = closest_fits(state, 10, 3, (32, 32))
    assert fits[0] == ("resnet18", "trojanzoo", 1.0)
    assert len(fits) == 3 and all(0 <= s <= 1 for _, _, s in fits)
    assert [s for _, _, s in fits] == sorted((s for _, _, s in fits), reverse=True)

    wrong = create_model("tv-resnet18", num_classes=10, in_channels=3, image_size=32)
    with pytest.raises(CheckpointError) as info:
        adapt_state_dict(state, "tv-resnet18", "auto", wrong)
    message = str(info.value)
    assert "--arch resnet18 --layout trojanzoo" in message and first_sentence_only(message)


def test_torchvision_names_rank_plain_torchvision_first() -> None:
    state = torchvision.models.mobilenet_v2(num_classes=10).state_dict()
    fits = closest_fits(state, 10, 3, (32, 32), limit=5)
    assert fits[0] == ("tv-mobilenet_v2", "plain", 1.0)


def test_explicit_wrong_layout_gives_one_sentence() -> None:
    box_vgg = randomised(BoxVGGBN(num_classes=43)).state_dict()
    ours = create_model("vgg16-bn", num_classes=43, in_channels=3, image_size=32)
    with pytest.raises(CheckpointError) as info:  # TrojanZoo has no rule for our VGG
        adapt_state_dict(box_vgg, "vgg16-bn", "trojanzoo", ours)
    message = str(info.value)
    assert "--layout backdoorbox" in message and first_sentence_only(message)

    zoo = randomised(zoo_resnet(comp=True)).state_dict()
    resnet = create_model("resnet18", num_classes=10, in_channels=3, image_size=32)
    with pytest.raises(CheckpointError) as info:  # a rule that exists but does not fit
        adapt_state_dict(zoo, "resnet18", "torchvision", resnet)
    message = str(info.value)
    assert "unexpected features.conv1.weight" in message
    assert "--arch resnet18 --layout trojanzoo" in message and first_sentence_only(message)


def test_unknown_layout_lists_the_valid_ones() -> None:
    model = create_model("resnet18", num_classes=10, in_channels=3, image_size=32)
    with pytest.raises(ConfigError, match="backdoorbench"):
        adapt_state_dict(model.state_dict(), "resnet18", "mmdet", model)
    with pytest.raises(ConfigError):
        model_args_for("resnet18", "timm")
    assert set(LAYOUTS) == {
        "auto",
        "backdoorbench",
        "backdoorbox",
        "trojanzoo",
        "torchvision",
        "plain",
    }


def test_cifar_strides_only_where_it_means_something() -> None:
    args = {"num_classes": 10, "in_channels": 3, "image_size": 32, "cifar_strides": True}
    model = create_model("tv-mobilenet_v2", **args)
    assert model.features[0][0].stride == (1, 1)
    with torch.no_grad():
        assert model.features(torch.zeros(1, 3, 32, 32)).shape[-1] == 4  # 1 with ImageNet strides
    with pytest.raises(ConfigError, match="cifar_strides"):
        create_model("tv-resnet18", num_classes=10, in_channels=3, cifar_strides=True)


def test_checkpoints_from_old_pytorch_without_bn_counters_load(
    tmp_path: Path, images: Tensor
) -> None:
    # PyTorch < 0.4.1 saved no BatchNorm num_batches_tracked.
    source = randomised(PaperWRN(depth=16, widen_factor=2, num_classes=10))
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pt"
    torch.save(state, path)

    model, _, _ = load(path, "wrn-16-2")

    assert_same_logits(source, model, images)


@pytest.fixture(autouse=True, scope="module")
def _two_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)
