"""Model zoo: every registered model builds and runs, features hook, sizes match the references."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from robustkd.errors import ConfigError, UnknownNameError
from robustkd.models import create_model, model_names
from robustkd.models.complexity import count_flops, count_parameters, model_summary

# (num_classes, in_channels, image_size): Fashion-MNIST-like and CIFAR-100-like inputs.
CONFIGS = [(10, 1, 28), (100, 3, 32)]

EXPECTED_NAMES = {
    "small-cnn",
    "small-cnn-student",
    "resnet18",
    "resnet34",
    "resnet50",
    "preact-resnet18",
    "wrn-16-2",
    "wrn-16-4",
    "wrn-28-2",
    "wrn-28-4",
    "mobilenetv2",
    "vgg11-bn",
    "vgg16-bn",
    "tv-resnet18",
    "tv-mobilenet_v3_small",
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These forward passes are tiny: one thread avoids OpenMP thrashing when other test
    # processes share the cores, which made this file several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_expected_models_are_registered() -> None:
    names = model_names()
    assert set(names) >= EXPECTED_NAMES
    assert names == sorted(names)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}cls-{c[1]}ch-{c[2]}px")
@pytest.mark.parametrize("name", model_names())
def test_model_forward_and_feature_hooks(name: str, config: tuple[int, int, int]) -> None:
    num_classes, in_channels, size = config
    model = create_model(name, num_classes=num_classes, in_channels=in_channels, image_size=size)
    modules = dict(model.named_modules())
    assert model.feature_layers, f"{name} names no feature layers"
    assert set(model.feature_layers) <= set(modules)

    outputs: dict[str, tuple[int, ...]] = {}
    handles = [
        modules[layer].register_forward_hook(
            lambda _m, _i, out, layer=layer: outputs.__setitem__(layer, tuple(out.shape))
        )
        for layer in model.feature_layers
    ]
    logits = model(torch.randn(2, in_channels, size, size))
    for handle in handles:
        handle.remove()

    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()
    assert list(outputs) == model.feature_layers  # every hook fired, in order
    shapes = [outputs[layer] for layer in model.feature_layers]
    assert all(len(s) == 4 and s[0] == 2 for s in shapes)
    heights = [s[2] for s in shapes]
    assert heights == sorted(heights, reverse=True), "features must go shallow → deep"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet18", 11_173_962),
        ("preact-resnet18", 11_171_146),
        ("resnet50", 23_520_842),
        ("wrn-28-4", 5_850_000),
        ("wrn-16-2", 691_674),
        ("vgg16-bn", 14_728_266),
    ],
)
def test_parameter_counts_match_reference_architectures(name: str, expected: int) -> None:
    model = create_model(name, num_classes=10, in_channels=3, image_size=32)
    assert count_parameters(model) == pytest.approx(expected, rel=0.01)


def test_mobilenetv2_size_and_width_mult() -> None:
    full = count_parameters(create_model("mobilenetv2", num_classes=10, in_channels=3))
    assert 2_230_000 <= full <= 2_300_000  # ≈2.24M (paper design); 2.30M with projections
    half = count_parameters(
        create_model("mobilenetv2", num_classes=10, in_channels=3, width_mult=0.5)
    )
    assert half < full


def test_student_is_at_least_four_times_smaller() -> None:
    teacher = count_parameters(create_model("small-cnn"))
    student = count_parameters(create_model("small-cnn-student"))
    assert teacher >= 4 * student


def test_count_parameters_by_hand() -> None:
    layer = nn.Linear(3, 2)
    assert count_parameters(layer) == 3 * 2 + 2
    layer.weight.requires_grad_(False)
    assert count_parameters(layer, trainable_only=True) == 2
    assert count_parameters(layer) == 8
    shared = nn.Sequential(layer, layer)  # a shared module counts once
    assert count_parameters(shared) == 8


def test_count_flops_by_hand() -> None:
    # Linear 3 → 2 on one vector: 3·2 multiply-adds = 12 FLOPs (bias not counted).
    assert count_flops(nn.Linear(3, 2), (1, 1, 3)) == 2 * 3 * 2
    # Conv 1 → 2 channels, 3×3, on 5×5: 2·3·3 outputs × 9 multiply-adds each, ×2.
    conv = nn.Conv2d(1, 2, 3)
    assert count_flops(conv, (1, 5, 5)) == 2 * (2 * 3 * 3) * (1 * 3 * 3)
    # Then flatten + Linear 18 → 4 adds 2·18·4.
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(18, 4))
    assert count_flops(net, (1, 5, 5)) == 324 + 2 * 18 * 4


def test_count_flops_restores_modes_and_grad() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
    net.train()
    net[1].eval()  # a frozen BatchNorm must stay frozen
    count_flops(net, (1, 8, 8))
    assert net.training and net[0].training and net[2].training
    assert not net[1].training
    assert torch.is_grad_enabled()


def test_resnet18_flops_are_standard() -> None:
    # The CIFAR ResNet-18 is ≈0.56 G multiply-adds per 32×32 image.
    model = create_model("resnet18", num_classes=10, in_channels=3, image_size=32)
    assert count_flops(model, (3, 32, 32)) == pytest.approx(2 * 0.556e9, rel=0.02)


def test_model_summary() -> None:
    model = create_model("small-cnn")
    summary = model_summary(model, (1, 28, 28))
    assert set(summary) == {"params", "flops", "input_shape", "feature_layers"}
    assert summary["params"] == count_parameters(model)
    assert summary["flops"] > 0
    assert summary["input_shape"] == (1, 28, 28)
    assert summary["feature_layers"] == ["block1", "block2", "block3"]


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        create_model("resnet-9000")
    message = str(info.value)
    assert "resnet-9000" in message
    for name in ("small-cnn", "resnet18", "wrn-28-4", "tv-resnet18"):
        assert name in message


def test_unknown_torchvision_name_lists_torchvision_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        create_model("tv-not_a_model")
    assert "tv-resnet18" in str(info.value) and "tv-convnext_tiny" in str(info.value)


@pytest.mark.parametrize("num_classes", [1, 0, -3])
def test_too_few_classes_is_a_config_error(num_classes: int) -> None:
    with pytest.raises(ConfigError):
        create_model("small-cnn", num_classes=num_classes)


def test_any_torchvision_name_works_with_prefix() -> None:
    assert "tv-shufflenet_v2_x0_5" not in model_names()
    model = create_model("TV-shufflenet_v2_x0_5", num_classes=5, in_channels=2, image_size=32)
    assert model.conv1[0].in_channels == 2
    assert model.feature_layers == ["stage2", "stage3", "stage4"]
    assert model(torch.randn(2, 2, 32, 32)).shape == (2, 5)


def test_torchvision_first_conv_and_head_are_adapted() -> None:
    model = create_model("tv-resnet18", num_classes=7, in_channels=1, image_size=28)
    assert model.conv1.in_channels == 1
    assert model.fc.out_features == 7
    assert model.feature_layers == ["layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize(("name", "size"), [("tv-vit_b_16", 28), ("tv-densenet121", 28)])
def test_torchvision_image_too_small_is_a_config_error(name: str, size: int) -> None:
    with pytest.raises(ConfigError, match=name.removeprefix("tv-")):
        create_model(name, num_classes=10, in_channels=1, image_size=size)


def test_torchvision_weights_are_refused() -> None:
    with pytest.raises(ConfigError):
        create_model("tv-resnet18", weights="DEFAULT")


def test_wrn_options() -> None:
    model = create_model("wrn-16-2", dropout=0.3)
    rates = {m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    assert rates == {0.3}
    assert {m.p for m in create_model("wrn-16-2").modules() if isinstance(m, nn.Dropout)} == {0.0}
    with pytest.raises(ConfigError):
        create_model("wrn-16-2", dropout=1.5)


def test_vgg_handles_28px_without_collapsing() -> None:
    model = create_model("vgg16-bn", num_classes=10, in_channels=1, image_size=28)
    x = torch.randn(2, 1, 28, 28)
    for i in range(1, 6):
        x = getattr(model, f"pool{i}")(getattr(model, f"stage{i}")(x))
    assert x.shape[-2:] == (1, 1)
