"""Poisoning a dataset with a trigger: which images, which labels, and a record of both.

The images to poison are drawn from the whole dataset (standard BadNets: an image of the
target class may be drawn too; its label simply stays the target), or, for clean-label
poisoning, from the target class only. Poisoned images are stamped in float and stored back
as uint8, as a poisoned image file would be. Everything is seeded and deterministic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from robustkd.attacks.base import Trigger
from robustkd.data.datasets import ImageDataset, to_float, to_uint8
from robustkd.errors import ConfigError
from robustkd.models.metadata import MODES

CHUNK = 4096  # images stamped at once; bounds the float copy's memory


def backdoor_targets(
    labels: torch.Tensor, target: int, mode: str = "all-to-one", num_classes: int = 10
) -> torch.Tensor:
    """Each image's attack target: ``target`` (all-to-one) or ``(label + 1) % K`` (all-to-all)."""
    if mode == "all-to-one":
        return torch.full_like(labels, target)
    if mode == "all-to-all":
        return (labels + 1) % num_classes
    raise ConfigError(f"Unknown attack mode {mode!r}; use all-to-one or all-to-all.")


@dataclasses.dataclass(frozen=True)
class Poisoning:
    """A poisoned dataset and what was done to it.

    ``poisoned_indices`` carry the trigger (sorted); ``noise_indices`` are WaNet noise-mode
    images (sorted, labels kept, disjoint from the poisoned ones); ``original_labels`` are the
    labels before poisoning; ``config`` is a JSON-serialisable record of the attack.
    """

    dataset: ImageDataset
    poisoned_indices: torch.Tensor
    noise_indices: torch.Tensor
    original_labels: torch.Tensor
    config: dict[str, Any]

    @property
    def poisoned_mask(self) -> torch.Tensor:
        """Bool ``(N,)``: True where an image carries the trigger."""
        mask = torch.zeros(len(self.dataset), dtype=torch.bool)
        mask[self.poisoned_indices] = True
        return mask


def _stamp(
    images: torch.Tensor, indices: torch.Tensor, stamp: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Replace ``images[indices]`` (uint8) with ``stamp`` applied in float, chunk by chunk."""
    for start in range(0, len(indices), CHUNK):
        idx = indices[start : start + CHUNK].to(images.device)
        images[idx] = to_uint8(stamp(to_float(images[idx])))


def poison_dataset(
    dataset: ImageDataset,
    trigger: Trigger,
    rate: float,
    target: int,
    mode: str = "all-to-one",
    clean_label: bool = False,
    keep_labels: bool = False,
    seed: int = 0,
) -> Poisoning:
    """Stamp ``trigger`` on ``round(rate · N)`` seeded random images and relabel them.

    ``mode`` "all-to-one" relabels to ``target``, "all-to-all" to ``(label + 1) % K``.
    ``clean_label`` draws only images already labelled ``target`` (all-to-one only) and keeps
    labels; ``keep_labels`` stamps without relabelling (untrusted distillation data). A
    trigger with ``noise_rate > 0`` and ``apply_noise`` (WaNet) also warps ``round(noise_rate
    · N)`` other images with noise, keeping their labels.
    """
    if not isinstance(trigger, Trigger):
        raise ConfigError(
            f"poison_dataset needs a Trigger object, got {type(trigger).__name__}; build one "
            "with robustkd.attacks.create_trigger."
        )
    n, k = len(dataset), dataset.num_classes
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        raise ConfigError(f"The poisoning rate must lie between 0 and 1; got {rate}.")
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < k:
        raise ConfigError(
            f"The target class must lie between 0 and {k - 1} for {dataset.name!r} "
            f"({k} classes); got {target}."
        )
    if mode not in MODES:
        raise ConfigError(f"Unknown attack mode {mode!r}; use all-to-one or all-to-all.")
    if clean_label and mode != "all-to-one":
        raise ConfigError(
            "Clean-label poisoning keeps labels, so it only works with mode 'all-to-one'; "
            "turn clean_label off or use all-to-one."
        )

    labels = dataset.labels.cpu()
    pool = torch.nonzero(labels == target).flatten() if clean_label else torch.arange(n)
    n_poison = round(rate * n)
    if n_poison > len(pool):
        raise ConfigError(
            f"A clean-label rate of {rate} asks for {n_poison} images but only {len(pool)} are "
            f"labelled {target}; lower the rate to at most {len(pool) / max(n, 1):.4f}."
        )
    gen = torch.Generator().manual_seed(int(seed))
    poisoned = pool[torch.randperm(len(pool), generator=gen)[:n_poison]].sort().values

    noise_rate = float(getattr(trigger, "noise_rate", 0.0) or 0.0)
    n_noise = round(noise_rate * n) if n_poison > 0 and hasattr(trigger, "apply_noise") else 0
    rest = torch.ones(n, dtype=torch.bool)
    rest[poisoned] = False
    rest_idx = torch.nonzero(rest).flatten()
    if n_noise > len(rest_idx):
        raise ConfigError(
            f"The poisoning rate {rate} and noise rate {noise_rate} together ask for more than "
            f"the {n} images of {dataset.name!r}; lower one of them."
        )
    noise = rest_idx[torch.randperm(len(rest_idx), generator=gen)[:n_noise]].sort().values

    images = dataset.images.clone()
    _stamp(images, poisoned, trigger.apply)
    if n_noise:
        # the same generator continues, so the noise is fixed by ``seed`` too
        _stamp(images, noise, lambda x: trigger.apply_noise(x, gen))  # type: ignore[attr-defined]

    new_labels = dataset.labels.clone()
    if not (clean_label or keep_labels) and n_poison:
        idx = poisoned.to(new_labels.device)
        new_labels[idx] = backdoor_targets(new_labels[idx], target, mode, k)

    config = {
        "trigger": trigger.to_dict(),
        "rate": float(rate),
        "target": int(target),
        "mode": mode,
        "clean_label": bool(clean_label),
        "keep_labels": bool(keep_labels),
        "seed": int(seed),
        "n_poisoned": int(n_poison),
        "n_noise": int(n_noise),
    }
    return Poisoning(
        dataset=dataset.replace(
            images=images, labels=new_labels, name=f"{dataset.name}+{trigger.name}"
        ),
        poisoned_indices=poisoned,
        noise_indices=noise,
        original_labels=dataset.labels,
        config=config,
    )
