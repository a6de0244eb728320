"""What a model says about a few images: labelled top-k probabilities, and trigger flips.

``top_k_predictions`` labels a model's most likely classes per image; ``flip_grid`` stamps a
trigger on a seeded sample of test images whose true class is not their attack target and
counts how many the model then assigns to it (the images behind one ASR estimate). The attack
target of an image is ``target`` (all-to-one) or the class after its own (all-to-all), as in
``metrics.backdoor_targets``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from robustkd.analysis.metrics import backdoor_targets, predict
from robustkd.attacks import Trigger
from robustkd.attacks.poison import MODES
from robustkd.data.datasets import ImageDataset, to_float
from robustkd.errors import ConfigError, DataError


def top_k_predictions(
    model: nn.Module,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    classes: Sequence[str],
    k: int = 3,
) -> list[list[tuple[str, float]]]:
    """Per image, the ``k`` most likely ``(class name, probability)`` pairs, most likely first.

    ``images`` are uint8 or float [0, 1], shaped ``(N, C, H, W)`` or a single ``(C, H, W)``.
    """
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(f"Give images shaped (N, C, H, W) or (C, H, W); got {shape}.")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a whole number of at least 1; got {k!r}.")
    batch = images.unsqueeze(0) if images.dim() == 3 else images
    probs = predict(model, batch, mean, std, return_probs=True)
    if probs.shape[0] and len(classes) != probs.shape[1]:
        raise ConfigError(
            f"The model predicts {probs.shape[1]} classes but {len(classes)} class names were "
            "given; pass the checkpoint's class list."
        )
    values, idx = probs.topk(min(k, probs.shape[1]) if probs.shape[0] else 0, dim=1)
    return [
        [(str(classes[int(c)]), float(p)) for p, c in zip(row_p, row_c, strict=True)]
        for row_p, row_c in zip(values, idx, strict=True)
    ]


@dataclasses.dataclass(frozen=True)
class FlipGrid:
    """Clean and triggered versions of ``n`` test images and the model's answers on both.

    Only images whose true class is not their attack target are drawn (as for ASR), so
    ``n_flipped / n`` estimates the ASR on this sample.
    """

    indices: torch.Tensor  # (N,) positions in the data set
    labels: torch.Tensor  # (N,) true classes
    clean: torch.Tensor  # (N, C, H, W) float in [0, 1]
    triggered: torch.Tensor  # (N, C, H, W) float in [0, 1]
    clean_preds: torch.Tensor  # (N,)
    triggered_preds: torch.Tensor  # (N,)
    clean_conf: torch.Tensor  # (N,) probability of the clean prediction
    triggered_conf: torch.Tensor  # (N,) probability of the triggered prediction
    target: int
    targets: torch.Tensor  # (N,) each image's attack target
    mode: str = "all-to-one"

    @property
    def n(self) -> int:
        return int(self.indices.numel())

    @property
    def flipped(self) -> torch.Tensor:
        """Bool ``(N,)``: the triggered image is classified as its attack target."""
        return self.triggered_preds == self.targets

    @property
    def n_flipped(self) -> int:
        return int(self.flipped.sum())

    def to_dict(self) -> dict[str, Any]:
        """Indices, labels, predictions and counts as plain lists (images left out)."""
        return {
            "indices": self.indices.tolist(),
            "labels": self.labels.tolist(),
            "clean_preds": self.clean_preds.tolist(),
            "triggered_preds": self.triggered_preds.tolist(),
            "flipped": self.flipped.tolist(),
            "n": self.n,
            "n_flipped": self.n_flipped,
            "target": self.target,
            "targets": self.targets.tolist(),
            "mode": self.mode,
        }


def flip_grid(
    model: nn.Module,
    data: ImageDataset,
    trigger: Trigger,
    target: int,
    n: int,
    seed: int = 0,
    mode: str = "all-to-one",
) -> FlipGrid:
    """Stamp ``trigger`` on ``n`` seeded random images of ``data`` not of their attack target
    (``target`` for all-to-one; for all-to-all the class after their own)."""
    if not isinstance(trigger, Trigger):
        raise ConfigError(
            f"flip_grid needs a Trigger object, got {type(trigger).__name__}; build one with "
            "robustkd.attacks.create_trigger."
        )
    k = data.num_classes
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < k:
        raise ConfigError(f"The target class must lie between 0 and {k - 1}; got {target!r}.")
    if mode not in MODES:
        raise ConfigError(f"Unknown attack mode {mode!r}; use {' or '.join(MODES)}.")
    labels = data.labels.cpu()
    all_targets = backdoor_targets(labels, target, mode, k)
    eligible = torch.nonzero(labels != all_targets).flatten()
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(eligible):
        which = f"those not of class {target}" if mode == "all-to-one" else "all-to-all"
        raise ConfigError(f"Choose between 1 and {len(eligible)} images ({which}); got {n!r}.")
    order = torch.randperm(len(eligible), generator=torch.Generator().manual_seed(int(seed)))
    idx = eligible[order[:n]]
    clean = to_float(data.images[idx.to(data.images.device)].cpu())
    triggered = trigger.apply(clean)
    p_clean = predict(model, clean, data.mean, data.std, return_probs=True)
    p_trig = predict(model, triggered, data.mean, data.std, return_probs=True)
    clean_conf, clean_preds = p_clean.max(1)
    trig_conf, trig_preds = p_trig.max(1)
    return FlipGrid(
        indices=idx,
        labels=data.labels.cpu()[idx],
        clean=clean,
        triggered=triggered,
        clean_preds=clean_preds,
        triggered_preds=trig_preds,
        clean_conf=clean_conf,
        triggered_conf=trig_conf,
        target=target,
        targets=all_targets[idx],
        mode=mode,
    )
