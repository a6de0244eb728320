"""Threat scenarios: what data the student is distilled on, and what the defender holds.

- ``clean``: the distillation set is clean (a control: plain KD should not transfer much).
- ``untrusted``: a fraction of the distillation images carry the trigger, labels untouched;
  the defender does not know which.
- ``teacher-train``: distillation on the teacher's own poisoned training set.

In every scenario the defender also holds a small trusted clean set, disjoint from the
distillation set, and a validation split for choosing hyper-parameters (never the test set).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from robustkd.data import ImageDataset, load_dataset
from robustkd.errors import ConfigError
from robustkd.poison import poison_dataset
from robustkd.triggers import Trigger, trigger_from_dict

SCENARIOS = ("clean", "untrusted", "teacher-train")


@dataclasses.dataclass
class Scenario:
    name: str
    distill: ImageDataset
    poisoned_mask: torch.Tensor  # ground truth for reports only; the defender never sees it
    trusted: ImageDataset
    validation: ImageDataset
    test: ImageDataset
    trigger: Trigger | None
    target: int | None
    mode: str
    info: dict[str, Any]


def build_scenario(
    name: str,
    teacher_meta: dict[str, Any],
    rate: float = 0.1,
    trusted_size: int = 1000,
    distill_size: int | None = 20000,
    test_size: int | None = None,
    seed: int = 0,
    trigger: Trigger | None = None,
    data_root: str | None = None,
) -> Scenario:
    """Assemble the data of scenario ``name`` for a teacher described by ``teacher_meta``."""
    if name not in SCENARIOS:
        raise ConfigError(f"Unknown scenario {name!r}; choose one of: {', '.join(SCENARIOS)}.")
    if not 0 <= rate <= 1:
        raise ConfigError(f"The poisoning rate must lie between 0 and 1; got {rate}.")
    if trusted_size < 4:
        raise ConfigError(
            f"The trusted clean set needs at least 4 images (100+ advised); got {trusted_size}."
        )
    if trigger is None and teacher_meta.get("trigger"):
        trigger = trigger_from_dict(teacher_meta["trigger"])
    target = teacher_meta.get("target")
    mode = teacher_meta.get("attack_mode") or "all-to-one"
    if name != "clean" and (trigger is None or target is None):
        raise ConfigError(
            f"Scenario {name!r} needs a trigger and a target class, and the teacher records "
            "none; pass --trigger and --target, or use scenario 'clean'."
        )
    dataset = teacher_meta.get("dataset") or "fashion-mnist"
    train = load_dataset(dataset, "train", data_root)
    val = load_dataset(dataset, "val", data_root)
    test = load_dataset(dataset, "test", data_root)
    norm = teacher_meta.get("normalization")
    if norm:  # every image set is normalised as the teacher expects
        train, val, test = (
            d.replace(mean=tuple(norm["mean"]), std=tuple(norm["std"])) for d in (train, val, test)
        )
    if test_size is not None:
        test = test.subset(range(min(test_size, len(test))))
    g = torch.Generator().manual_seed(seed)

    if name == "teacher-train":
        distill, poisoned = _teacher_training_set(train, teacher_meta, trigger, data_root)
        if distill_size is not None and distill_size < len(distill):
            keep = torch.randperm(len(distill), generator=g)[:distill_size].sort().values
            distill, poisoned = distill.subset(keep), poisoned[keep]
        if trusted_size >= len(val):
            raise ConfigError(
                f"Scenario 'teacher-train' draws the trusted set from the {len(val)} validation "
                f"images; choose a trusted size below that (got {trusted_size})."
            )
        trusted, validation = (
            val.subset(range(trusted_size)),
            val.subset(range(trusted_size, len(val))),
        )
    else:
        size = len(train) - trusted_size if distill_size is None else distill_size
        if size < 1 or size + trusted_size > len(train):
            raise ConfigError(
                f"The distillation set ({size}) and the trusted set ({trusted_size}) must fit in "
                f"the {len(train)} training images; choose smaller sizes."
            )
        order = torch.randperm(len(train), generator=g)
        distill = train.subset(order[:size].sort().values)
        trusted = train.subset(order[size : size + trusted_size].sort().values)
        validation = val
        poisoned = torch.zeros(len(distill), dtype=torch.bool)
        if name == "untrusted" and rate > 0:
            assert trigger is not None and target is not None
            result = poison_dataset(
                distill, trigger, rate, target, mode=mode, keep_labels=True, seed=seed
            )
            distill, poisoned = result.dataset, result.poisoned_mask
    info = {
        "scenario": name,
        "rate": rate if name == "untrusted" else None,
        "trusted_size": len(trusted),
        "distill_size": len(distill),
        "n_poisoned": int(poisoned.sum()),
        "validation_size": len(validation),
        "test_size": len(test),
        "dataset": dataset,
        "seed": seed,
    }
    return Scenario(name, distill, poisoned, trusted, validation, test, trigger, target, mode, info)


def scenario_from_plan(
    plan: dict[str, Any],
    teacher_meta: dict[str, Any],
    seed: int = 0,
    data_root: str | None = None,
) -> Scenario:
    """The scenario a preset's distillation plan names (its ``scenario``, ``rate``,
    ``trusted_size``, ``distill_size`` and optional ``test_size``)."""
    return build_scenario(
        plan["scenario"],
        teacher_meta,
        rate=plan["rate"],
        trusted_size=plan["trusted_size"],
        distill_size=plan["distill_size"],
        test_size=plan.get("test_size"),
        seed=seed,
        data_root=data_root,
    )


def _teacher_training_set(
    train: ImageDataset, meta: dict[str, Any], trigger: Trigger | None, data_root: str | None
) -> tuple[ImageDataset, torch.Tensor]:
    """Rebuild the teacher's poisoned training set from its recorded configuration."""
    config = meta.get("config") or {}
    attack = meta.get("attack") or {}
    if not config or not attack or trigger is None:
        raise ConfigError(
            "Scenario 'teacher-train' needs a teacher trained by robustkd (its training set is "
            "rebuilt from the recorded config); use scenario 'untrusted' for other teachers."
        )
    seed = int(config.get("train", {}).get("seed", 0))
    size = config.get("train_size")
    if size is not None:
        g = torch.Generator().manual_seed(seed)
        train = train.subset(torch.randperm(len(train), generator=g)[:size])
    result = poison_dataset(
        train,
        trigger,
        float(attack["rate"]),
        int(attack["target"]),
        mode=attack["mode"],
        clean_label=bool(attack.get("clean_label", False)),
        seed=seed,
    )
    return result.dataset, result.poisoned_mask
