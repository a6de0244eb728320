"""Threat scenarios: what data the student is distilled on, and what the defender holds.

- ``clean``: the distillation set is clean (a control: plain KD should not transfer much).
- ``untrusted``: a fraction of the distillation images carry the trigger, labels untouched;
  the defender does not know which.
- ``teacher-train``: distillation on the teacher's own poisoned training set.
- ``as-is``: the real case — the distillation data exactly as given (a user's own folder or
  file, or a data set's training split), poisoned or not; nothing is planted and the trigger
  may be unknown.

The first three are simulations for research and teaching. Any of the three image sets
(distillation, trusted, test) may be the user's own data (``DataSources``); what is not given
comes from the teacher's named data set. In every scenario the defender also holds a small
trusted clean set, disjoint from the distillation set, and a validation split for choosing
hyper-parameters (never the test set).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from robustkd.attacks import Trigger, trigger_from_dict
from robustkd.attacks.poison import poison_dataset
from robustkd.data.datasets import ImageDataset, defender_subset, load_dataset
from robustkd.errors import ConfigError

SCENARIOS = ("clean", "untrusted", "teacher-train", "as-is")


@dataclasses.dataclass
class DataSources:
    """The user's own image sets; ``None`` takes the teacher's named data set instead."""

    distill: ImageDataset | None = None
    trusted: ImageDataset | None = None
    test: ImageDataset | None = None

    def any(self) -> bool:
        return any(d is not None for d in (self.distill, self.trusted, self.test))


@dataclasses.dataclass
class Scenario:
    name: str
    distill: ImageDataset
    # ground truth for reports only (the defender never sees it); None when unknown (as-is)
    poisoned_mask: torch.Tensor | None
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
    sources: DataSources | None = None,
    target: int | None = None,
) -> Scenario:
    """Assemble the data of scenario ``name`` for a teacher described by ``teacher_meta``.

    ``sources`` holds the user's own image sets (used exactly as given, never subsampled);
    ``trigger``/``target`` override what the teacher records.
    """
    from robustkd.models.modelcard import check_fits_data, normalized_for

    if name not in SCENARIOS:
        raise ConfigError(f"Unknown scenario {name!r}; choose one of: {', '.join(SCENARIOS)}.")
    if not 0 <= rate <= 1:
        raise ConfigError(f"The poisoning rate must lie between 0 and 1; got {rate}.")
    sources = sources or DataSources()
    if trusted_size < 4 and sources.trusted is None:
        raise ConfigError(
            f"The trusted clean set needs at least 4 images (100+ advised); got {trusted_size}."
        )
    if trigger is None and teacher_meta.get("trigger"):
        trigger = trigger_from_dict(teacher_meta["trigger"])
    if target is None:
        target = teacher_meta.get("target")
    mode = teacher_meta.get("attack_mode") or "all-to-one"
    if name in ("untrusted", "teacher-train") and (trigger is None or target is None):
        raise ConfigError(
            f"Scenario {name!r} needs a trigger and a target class to plant, and the teacher "
            "records none; pass --trigger and --target, or use scenario 'as-is' or 'clean'."
        )
    if trigger is not None and target is None:
        raise ConfigError("A trigger needs its target class to measure ASR; pass --target N.")
    dataset = teacher_meta.get("dataset")
    if dataset is None and not sources.any():
        dataset = "fashion-mnist"
    named = _NamedSplits(dataset, data_root)
    if name == "teacher-train" and sources.distill is not None:
        raise ConfigError(
            "Scenario 'teacher-train' rebuilds the teacher's own training set; use 'as-is' to "
            "distil on your own data."
        )
    g = torch.Generator().manual_seed(seed)
    test = sources.test if sources.test is not None else named.get("test", "--test-data")
    poisoned: torch.Tensor | None
    if name == "teacher-train":
        train = named.get("train", "--distill-data")
        distill, poisoned = _teacher_training_set(train, teacher_meta, trigger, data_root)
        if distill_size is not None and distill_size < len(distill):
            keep = torch.randperm(len(distill), generator=g)[:distill_size].sort().values
            distill, poisoned = distill.subset(keep), poisoned[keep]
        val = named.get("val", "--trusted-data")
        if trusted_size >= len(val):
            raise ConfigError(
                f"Scenario 'teacher-train' draws the trusted set from the {len(val)} validation "
                f"images; choose a trusted size below that (got {trusted_size})."
            )
        trusted, validation = (
            val.subset(range(trusted_size)),
            val.subset(range(trusted_size, len(val))),
        )
        if sources.trusted is not None:
            trusted = sources.trusted
    else:
        distill, trusted = sources.distill, sources.trusted
        if distill is None or trusted is None:
            train = named.get("train", "--distill-data and --trusted-data")
            order = torch.randperm(len(train), generator=g)
            n_trusted = 0 if trusted is not None else trusted_size
            if distill is None:
                size = len(train) - n_trusted if distill_size is None else distill_size
                if size < 1 or size + n_trusted > len(train):
                    raise ConfigError(
                        f"The distillation set ({size}) and the trusted set ({n_trusted}) must "
                        f"fit in the {len(train)} training images; choose smaller sizes."
                    )
                distill = train.subset(order[:size].sort().values)
                order = order[size:]
            if trusted is None:
                if trusted_size > len(order):
                    raise ConfigError(
                        f"Cannot draw a trusted set of {trusted_size} from the {len(order)} "
                        "training images left; choose a smaller --trusted-size."
                    )
                trusted = train.subset(order[:trusted_size].sort().values)
        validation = named.get("val", None) if named.available else None
        if validation is None:
            validation = trusted  # the defender's only clean data
        poisoned = None if name == "as-is" else torch.zeros(len(distill), dtype=torch.bool)
        if name == "untrusted" and rate > 0:
            assert trigger is not None and target is not None
            result = poison_dataset(
                distill, trigger, rate, target, mode=mode, keep_labels=True, seed=seed
            )
            distill, poisoned = result.dataset, result.poisoned_mask
    if test_size is not None:
        test = test.subset(range(min(test_size, len(test))))
    for what, d in (("trusted set", trusted), ("test set", test), ("validation set", validation)):
        if not d.labelled:
            raise ConfigError(
                f"The {what} holds unlabelled images; only the distillation set may be "
                "unlabelled (give an ImageFolder tree or an .npz with labels)."
            )
    for what, d in (("distillation set", distill), ("trusted set", trusted)):
        _check_same_classes(d, test, what)
    labelled = distill.labelled
    if not distill.classes:  # unlabelled: the student still predicts the test set's classes
        distill = distill.replace(classes=test.classes)
    sets = {"distillation set": distill, "trusted set": trusted, "test set": test}
    sets["validation set"] = validation
    for what, d in sets.items():
        check_fits_data(teacher_meta, d, what)
    distill, trusted, validation, test = (
        normalized_for(teacher_meta, d) for d in (distill, trusted, validation, test)
    )
    if trigger is not None and not 0 <= int(target) < test.num_classes:  # type: ignore[arg-type]
        raise ConfigError(
            f"The target class must lie between 0 and {test.num_classes - 1}; got {target}."
        )
    info = {
        "scenario": name,
        "rate": rate if name == "untrusted" else None,
        "trusted_size": len(trusted),
        "distill_size": len(distill),
        "n_poisoned": int(poisoned.sum()) if poisoned is not None else None,
        "validation_size": len(validation),
        "test_size": len(test),
        "dataset": dataset if not sources.any() else _describe(sources, dataset),
        "labelled": labelled,
        "trigger_known": trigger is not None,
        "seed": seed,
    }
    return Scenario(name, distill, poisoned, trusted, validation, test, trigger, target, mode, info)


PROBE_SEEDS = {"trusted": 0, "suspect": 1, "validation": 2}  # three disjoint subsets


@dataclasses.dataclass
class Probe:
    """A small defender's view drawn from one labelled split (the Feature variance page's):
    trusted clean images, a suspect set of the same size with a share triggered (labels kept,
    as in ``untrusted``), and validation images for choosing a threshold; all three disjoint."""

    trusted: ImageDataset
    suspect: ImageDataset
    validation: ImageDataset


def probe_scenario(
    data: ImageDataset,
    size: int,
    trigger: Trigger | None = None,
    target: int | None = None,
    rate: float = 0.0,
    mode: str = "all-to-one",
) -> Probe:
    """Three disjoint seeded subsets of ``size`` images of ``data`` (the same for every call);
    ``rate`` of the suspect ones carry ``trigger`` (none without a trigger)."""
    if not 0 <= rate <= 1:
        raise ConfigError(f"The triggered share must lie between 0 and 1; got {rate}.")
    trusted, t_idx = defender_subset(data, size, seed=PROBE_SEEDS["trusted"])
    suspect, s_idx = defender_subset(data, size, seed=PROBE_SEEDS["suspect"], exclude=t_idx)
    used = torch.cat([t_idx, s_idx])
    validation = defender_subset(data, size, seed=PROBE_SEEDS["validation"], exclude=used)[0]
    if trigger is not None and rate > 0:
        if target is None:
            raise ConfigError("A trigger needs its target class; pass the target.")
        planted = poison_dataset(suspect, trigger, rate, target, mode=mode, keep_labels=True)
        suspect = planted.dataset
    return Probe(trusted, suspect, validation)


def _check_same_classes(data: ImageDataset, test: ImageDataset, what: str) -> None:
    """Both sets must name the same classes in the same order (ImageFolder: sorted folders).

    Classes known only by number (an ``.npz`` without names) are compared by count.
    """
    if not data.classes:
        return
    numbered = tuple(str(i) for i in range(max(len(data.classes), len(test.classes))))
    same = len(data.classes) == len(test.classes)
    if same and numbered[: len(data.classes)] not in (tuple(data.classes), tuple(test.classes)):
        same = tuple(data.classes) == tuple(test.classes)
    if not same:
        raise ConfigError(
            f"The {what}'s classes ({', '.join(data.classes[:4])}, …) differ from the test "
            f"set's ({', '.join(test.classes[:4])}, …); give both the same classes in the same "
            "order."
        )


class _NamedSplits:
    """The teacher's named data set, loaded only for the splits the scenario needs."""

    def __init__(self, dataset: str | None, data_root: str | None) -> None:
        self.dataset = dataset
        self.data_root = data_root
        self._cache: dict[str, ImageDataset] = {}

    @property
    def available(self) -> bool:
        return self.dataset is not None

    def get(self, split: str, option: str | None) -> ImageDataset:
        if self.dataset is None:
            raise ConfigError(
                f"The teacher records no data set to take its {split} images from; give "
                f"{option} (or import the teacher with --dataset NAME)."
            )
        if split not in self._cache:
            self._cache[split] = load_dataset(self.dataset, split, self.data_root)
        return self._cache[split]


def _describe(sources: DataSources, dataset: str | None) -> str:
    parts = []
    for what, d in (("distill", sources.distill), ("trusted", sources.trusted),
                    ("test", sources.test)):  # fmt: skip
        parts.append(f"{what}: {d.name if d is not None else dataset}")
    return "; ".join(parts)


def scenario_from_plan(
    plan: dict[str, Any],
    teacher_meta: dict[str, Any],
    seed: int = 0,
    data_root: str | None = None,
    sources: DataSources | None = None,
    trigger: Trigger | None = None,
    target: int | None = None,
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
        sources=sources,
        trigger=trigger,
        target=target,
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
