from __future__ import annotations

import pytest
import torch
from torch import nn

from robustkd.analysis.metrics import (
    backdoor_targets,
    confusion_matrix,
    der,
    evaluate,
    per_class_accuracy,
    predict,
)
from robustkd.attacks import create_trigger
from robustkd.data.datasets import ImageDataset
from robustkd.errors import ConfigError


class Constant(nn.Module):
    """Always predicts one class."""

    def __init__(self, cls: int, k: int = 10) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(k))
        self.bias.data[cls] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], -1)


class PatchDetector(nn.Module):
    """Predicts class 0 when the bottom-right pixel is bright, else class 1."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x[:, 0, -2, -2] > 2.0).float()
        return torch.stack([bright, 1 - bright], 1) + 0 * self.w


def test_confusion_and_per_class() -> None:
    preds = torch.tensor([0, 1, 1, 2, 2, 2])
    labels = torch.tensor([0, 1, 2, 2, 2, 0])
    m = confusion_matrix(preds, labels, 3)
    assert m.tolist() == [[1, 0, 1], [0, 1, 0], [0, 1, 2]]
    assert per_class_accuracy(m) == pytest.approx([0.5, 1.0, 2 / 3])


def test_der_matches_backdoorbench_definition() -> None:
    assert der(0.90, 0.95, 0.88, 0.02) == pytest.approx((0.93 - 0.02 + 1) / 2)
    assert der(0.90, 0.95, 0.92, 0.99) == pytest.approx(0.5)  # no ASR drop, ACC gain ignored
    assert der(0.9, 1.0, 0.9, 0.0) == pytest.approx(1.0)


def test_backdoor_targets() -> None:
    y = torch.tensor([0, 3, 9])
    assert backdoor_targets(y, 2, "all-to-one", 10).tolist() == [2, 2, 2]
    assert backdoor_targets(y, 0, "all-to-all", 10).tolist() == [1, 4, 0]
    with pytest.raises(ConfigError):
        backdoor_targets(y, 0, "one-to-one", 10)


def test_asr_excludes_target_class_images(small_test: ImageDataset) -> None:
    trigger = create_trigger("badnets")
    n_target = int((small_test.labels == 0).sum())
    always0 = evaluate(Constant(0), small_test, trigger, target=0)
    assert always0.n_triggered == len(small_test) - n_target
    assert always0.asr == 1.0 and always0.acc == pytest.approx(n_target / len(small_test))
    always1 = evaluate(Constant(1), small_test, trigger, target=0)
    assert always1.asr == 0.0
    clean_only = evaluate(Constant(1), small_test)
    assert clean_only.asr is None and clean_only.n_triggered == 0


def test_asr_follows_the_trigger(small_test: ImageDataset) -> None:
    model = PatchDetector()
    with_patch = evaluate(model, small_test, create_trigger("badnets", value=1.0), target=0)
    assert with_patch.asr == 1.0
    invisible = evaluate(model, small_test, create_trigger("badnets", value=0.0), target=0)
    assert invisible.asr < 0.5


def test_asr_needs_a_valid_target(small_test: ImageDataset) -> None:
    with pytest.raises(ConfigError, match="target class between 0 and 9"):
        evaluate(Constant(0), small_test, create_trigger("badnets"), target=10)


def test_predict_probabilities(small_test: ImageDataset) -> None:
    probs = predict(
        Constant(3), small_test.images[:5], small_test.mean, small_test.std, return_probs=True
    )
    assert probs.shape == (5, 10) and torch.allclose(probs.sum(1), torch.ones(5))
    assert probs.argmax(1).tolist() == [3] * 5
