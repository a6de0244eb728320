"""ACC, ASR, per-class accuracy, confusion matrix and DER.

ASR counts only triggered test images whose true class is not the attack target (images of
the target class would count as "successes" without any backdoor).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from robustkd.attacks import Trigger
from robustkd.attacks.poison import backdoor_targets
from robustkd.data.datasets import ImageDataset, normalize, to_float
from robustkd.errors import ConfigError
from robustkd.models.sharing import view

__all__ = ["backdoor_targets", "confusion_matrix", "der", "evaluate", "predict"]


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    trigger: Trigger | None = None,
    batch_size: int = 1000,
    device: torch.device | str | None = None,
    return_probs: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Class predictions (or softmax probabilities) for uint8 or [0, 1] float images.

    Runs an eval-mode view of ``model`` (``sharing.view``), so ``model``'s own mode is never
    switched: it may be shared, or in the middle of training.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    own = view(model)
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        x = to_float(images[start : start + batch_size].to(device))
        if trigger is not None:
            x = trigger.apply(x)
        logits = own(normalize(x, mean, std)).float()
        outputs.append(logits.softmax(1).cpu() if return_probs else logits.argmax(1).cpu())
        if on_batch is not None:
            on_batch(int(x.shape[0]))
    if not outputs:
        return torch.empty((0,) if not return_probs else (0, 0))
    return torch.cat(outputs)


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``M[i, j]`` = number of images of true class i predicted as j."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    totals = confusion.sum(1).clamp_min(1)
    return (confusion.diag().double() / totals).tolist()


def der(acc_before: float, asr_before: float, acc_after: float, asr_after: float) -> float:
    """Defence effectiveness rating (BackdoorBench): (max(0, ΔASR) − max(0, ΔACC) + 1) / 2."""
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1.0) / 2.0


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """ACC and ASR with the counts behind them (fractions in [0, 1])."""

    acc: float
    n_clean: int
    n_correct: int
    asr: float | None
    n_triggered: int
    n_attack_success: int
    per_class_acc: list[float]
    confusion: list[list[int]]
    data: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def evaluate(
    model: nn.Module,
    dataset: ImageDataset,
    trigger: Trigger | None = None,
    target: int | None = None,
    mode: str = "all-to-one",
    batch_size: int = 1000,
    device: torch.device | str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Evaluation:
    """ACC on ``dataset`` and, with a trigger and target, ASR on its triggered images."""
    k = dataset.num_classes
    preds = predict(
        model,
        dataset.images,
        dataset.mean,
        dataset.std,
        None,
        batch_size,
        device,
        on_batch=on_batch,
    )
    labels = dataset.labels.cpu()
    confusion = confusion_matrix(preds, labels, k)
    n_correct = int((preds == labels).sum())
    asr, n_trig, n_hit = None, 0, 0
    if trigger is not None:
        if target is None or not 0 <= target < k:
            raise ConfigError(
                f"ASR needs a target class between 0 and {k - 1}; got {target}. "
                "Pass --target or use a checkpoint that records it."
            )
        targets = backdoor_targets(labels, target, mode, k)
        keep = labels != targets  # images already of the target class say nothing
        idx = torch.nonzero(keep).flatten()
        sub = dataset.images[idx.to(dataset.images.device)]
        trig_preds = predict(
            model, sub, dataset.mean, dataset.std, trigger, batch_size, device, on_batch=on_batch
        )
        n_trig = int(idx.numel())
        n_hit = int((trig_preds == targets[idx]).sum())
        # no triggered image outside the target class: the rate is undefined, not 0
        asr = n_hit / n_trig if n_trig else None
    return Evaluation(
        acc=n_correct / max(1, len(dataset)),
        n_clean=len(dataset),
        n_correct=n_correct,
        asr=asr,
        n_triggered=n_trig,
        n_attack_success=n_hit,
        per_class_acc=per_class_accuracy(confusion),
        confusion=confusion.tolist(),
        data=f"{dataset.name} ({len(dataset)} images)",
    )
