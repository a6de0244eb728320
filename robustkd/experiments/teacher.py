"""Training a (backdoored) teacher: data, trigger, poisoning, training, evaluation, checkpoint.

A ``recipe`` (``robustkd.experiments.survive``) changes how the teacher is made: a learned
trigger, a shadow student, or a penalty against the variance defence.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkd import __version__
from robustkd.analysis.metrics import evaluate
from robustkd.attacks import trigger_from_dict
from robustkd.attacks.poison import poison_dataset
from robustkd.data.datasets import load_dataset
from robustkd.errors import ConfigError
from robustkd.experiments.survive import recipe_from_dict
from robustkd.models import create_model
from robustkd.models.checkpoints import save_checkpoint
from robustkd.models.complexity import count_flops, count_parameters
from robustkd.training import distributed
from robustkd.training.config import ProgressFn, TrainConfig, check_options, seed_everything
from robustkd.training.device import resolve_device
from robustkd.training.engine import train_model


@dataclasses.dataclass
class TeacherConfig:
    """Everything that defines a teacher: data, architecture, attack, training."""

    dataset: str = "fashion-mnist"
    architecture: str = "small-cnn"
    trigger: dict[str, Any] | None = dataclasses.field(default_factory=lambda: {"name": "badnets"})
    rate: float = 0.1
    target: int = 0
    mode: str = "all-to-one"
    clean_label: bool = False
    train_size: int | None = None  # None = the whole training split
    eval_size: int | None = None  # None = the whole test split
    student_architecture: str = "small-cnn-student"
    data_root: str | None = None
    # None = plain poisoning; else {"name": recipe, **options} (see experiments.survive)
    recipe: dict[str, Any] | None = None
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train"] = self.train.to_dict()
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TeacherConfig:
        values = dict(values)
        train = TrainConfig.from_dict(values.pop("train", {}))
        check_options(cls, values, "teacher")
        return cls(train=train, **values)


def train_teacher(
    config: TeacherConfig,
    out: str | Path,
    progress: ProgressFn | None = None,
    resume: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a teacher as ``config`` says, evaluate it on the test split, save it to ``out``.

    The training state is kept beside ``out`` (``*.state.pt``) after every epoch so an
    interrupted job resumes with ``resume=True``; it is removed once the checkpoint is saved.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"The output file must end in .safetensors; got {out.name}.")
    config.train.validate()
    recipe = recipe_from_dict(config.recipe)
    if recipe is not None and recipe.learns_trigger:
        given = config.trigger or {}
        if given.get("name") != "optimized-blend":
            raise ConfigError(
                f"The {recipe.name} recipe learns an optimized-blend trigger; set the trigger to "
                "optimized-blend (--trigger optimized-blend), not "
                f"{given.get('name') or 'none'}."
            )
        # the bare name means "learn it"; a full description (a learned one) is used as given
        trigger = trigger_from_dict(given) if set(given) != {"name"} else None
    else:
        trigger = trigger_from_dict(config.trigger) if config.trigger else None
        if recipe is not None and trigger is None:
            raise ConfigError(f"The {recipe.name} recipe needs a trigger to plant; give one.")
    if recipe is not None and config.rate <= 0:
        raise ConfigError(
            f"The {recipe.name} recipe needs a poisoning rate above 0; got {config.rate}."
        )
    train_set = load_dataset(config.dataset, "train", config.data_root)
    if not 0 <= config.target < train_set.num_classes:
        raise ConfigError(
            f"The target class must lie between 0 and {train_set.num_classes - 1}; "
            f"got {config.target}."
        )
    if config.train_size is not None:
        if not 1 <= config.train_size <= len(train_set):
            raise ConfigError(
                f"train_size must be between 1 and {len(train_set)}; got {config.train_size}."
            )
        g = torch.Generator().manual_seed(config.train.seed)
        train_set = train_set.subset(
            torch.randperm(len(train_set), generator=g)[: config.train_size]
        )
    val_set = load_dataset(config.dataset, "val", config.data_root)
    val_set = val_set.subset(range(min(2000, len(val_set))))
    test_set = load_dataset(config.dataset, "test", config.data_root)
    if config.eval_size is not None:
        test_set = test_set.subset(range(min(config.eval_size, len(test_set))))

    seed_everything(config.train.seed)
    model = create_model(
        config.architecture,
        num_classes=train_set.num_classes,
        in_channels=train_set.in_channels,
        image_size=train_set.image_size,
    )
    if recipe is not None:
        # on a resume the warm-up and the trigger are recomputed (seeded), then the state loads
        model.to(resolve_device(config.train.device))
        trigger = recipe.prepare(model, train_set, trigger, config.train, progress)

    attack: dict[str, Any] | None = None
    poisoned = torch.zeros(len(train_set), dtype=torch.bool)
    if trigger is not None and config.rate > 0:
        poisoning = poison_dataset(
            train_set,
            trigger,
            config.rate,
            config.target,
            mode=config.mode,
            clean_label=config.clean_label,
            seed=config.train.seed,
        )
        train_set = poisoning.dataset
        attack = poisoning.config
        poisoned = poisoning.poisoned_mask
    loss_fn = None
    if recipe is not None:
        recipe.student_architecture = config.student_architecture
        model.to(resolve_device(config.train.device))
        loss_fn = recipe.loss_fn(model, poisoned, train_set, config.train)
        learned = recipe.trigger_history
        if learned and attack is not None:
            attack["trigger_objective"] = [learned[0], learned[-1]]

    def on_epoch(m: nn.Module) -> dict[str, Any]:
        now = recipe.current_trigger(trigger) if recipe is not None else trigger
        ev = evaluate(m, val_set, now, config.target if now else None, config.mode)
        record: dict[str, Any] = {"val_acc": ev.acc, "val_asr": ev.asr}
        if recipe is not None:
            record.update(recipe.epoch_terms())
        return record

    started = time.perf_counter()
    result = train_model(
        model,
        train_set,
        config.train,
        loss_fn=loss_fn,
        evaluate=on_epoch,
        progress=progress,
        state_path=out.with_suffix(".state.pt"),
        resume=resume,
        identity={"recipe": recipe.to_dict() if recipe is not None else None},
        companion=recipe,
    )
    if recipe is not None:  # a trigger learned during training: the one it ended with
        learned_now = recipe.current_trigger(trigger)
        if learned_now is not trigger and attack is not None and learned_now is not None:
            attack["trigger"] = learned_now.to_dict()
        trigger = learned_now
    model.cpu().eval()
    final = evaluate(model, test_set, trigger, config.target if trigger else None, config.mode)
    metadata = {
        "kind": "teacher",
        "architecture": config.architecture,
        "model_args": {
            "num_classes": train_set.num_classes,
            "in_channels": train_set.in_channels,
            "image_size": list(train_set.image_size),
        },
        "dataset": config.dataset,
        "classes": list(train_set.classes),
        "input_shape": list(train_set.input_shape),
        "normalization": train_set.normalization(),
        "trigger": trigger.to_dict() if trigger else None,
        "target": config.target if trigger else None,
        "attack_mode": config.mode if trigger else None,
        "attack": attack,
        "recipe": recipe.to_dict() if recipe is not None else None,
        "student_architecture": config.student_architecture,
        "params": count_parameters(model),
        "flops": count_flops(model, train_set.input_shape),
        "metrics": {
            "acc": final.acc,
            "asr": final.asr,
            "n_clean": final.n_clean,
            "n_triggered": final.n_triggered,
            "n_correct": final.n_correct,
            "n_attack_success": final.n_attack_success,
            "data": f"{config.dataset} test split ({final.n_clean} images)",
        },
        "history": result.history,
        "config": config.to_dict(),
        "train_seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "robustkd": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if distributed.is_main():  # under torchrun: one rank writes
        save_checkpoint(out, model, metadata)
        out.with_suffix(".state.pt").unlink(missing_ok=True)
    return model, metadata
