"""Training options and their small types: the option tuples, ``TrainConfig`` and its checks,
the progress event and the callback types, the divergence error, the learning-rate schedule,
the optimiser and the seeding of a run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from robustkd.errors import ConfigError, RobustKDError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "paper", "constant")
AUGMENTS = ("none", "crop", "crop-flip")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
PLACEMENTS = ("auto", "device", "host")
# Options that change how fast a run goes, not what it computes: a resumed run may change them.
RUNTIME_OPTIONS = ("epochs", "device", "compile", "data_placement")


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters of one training job; serialises to a flat dict."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    augment: str = "crop"
    crop_padding: int = 2
    label_smoothing: float = 0.0
    seed: int = 0
    device: str = "auto"
    compile: str = "off"  # torch.compile mode; "reduce-overhead" uses CUDA graphs
    data_placement: str = "auto"  # images on the GPU ("device") or in pinned host memory

    def validate(self) -> TrainConfig:
        if not 1 <= self.epochs <= 10_000:
            raise ConfigError(f"epochs must be between 1 and 10000; got {self.epochs}.")
        if not 1 <= self.batch_size <= 1_000_000:
            raise ConfigError(f"batch size must be a positive integer; got {self.batch_size}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"learning rate must be a positive number; got {self.lr}.")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"Unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}."
            )
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"Unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}."
            )
        if self.augment not in AUGMENTS:
            raise ConfigError(
                f"Unknown augmentation {self.augment!r}; choose one of: {', '.join(AUGMENTS)}."
            )
        if self.compile not in COMPILE_MODES:
            raise ConfigError(
                f"Unknown compile mode {self.compile!r}; choose one of: {', '.join(COMPILE_MODES)}."
            )
        if self.data_placement not in PLACEMENTS:
            raise ConfigError(
                f"Unknown data placement {self.data_placement!r}; choose one of: "
                f"{', '.join(PLACEMENTS)}."
            )
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label smoothing must lie in [0, 1); got {self.label_smoothing}.")
        if self.weight_decay < 0:
            raise ConfigError(f"weight decay must be ≥ 0; got {self.weight_decay}.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        check_options(cls, values, "training")
        return cls(**values)


def check_options(cls: type, values: dict[str, Any], what: str) -> None:
    """Refuse keys that are not fields of the config dataclass ``cls``, naming the valid ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"Unknown {what} option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}."
        )


@dataclasses.dataclass
class TrainEvent:
    """What the progress callback receives: after each step and after each epoch."""

    kind: str  # "step" or "epoch"
    epoch: int  # 1-based
    epochs: int
    step: int  # 1-based within the epoch
    steps: int
    loss: float | None = None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


# loss_fn(model, inputs, labels, indices): indices point into the training set, so a loss can
# look up per-sample facts (e.g. which samples were screened out of distillation).
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ProgressFn = Callable[[TrainEvent], None]
EvalFn = Callable[[nn.Module], dict[str, Any]]


class DivergedError(RobustKDError):
    """The loss became NaN or infinite; the last good epoch's state is kept."""


def seed_everything(seed: int) -> None:
    """Seed torch's global generator (model initialisation) for a reproducible run."""
    torch.manual_seed(seed)


def lr_factor(schedule: str, progress: float) -> float:
    """Multiplier of the base learning rate at ``progress`` ∈ [0, 1] of training."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule in ("step", "paper"):  # the paper's: ÷10 at 50 %, ÷100 at 75 %
        return 1.0 if progress < 0.5 else 0.1 if progress < 0.75 else 0.01
    return 1.0


def make_optimizer(params: Any, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    fused = {"fused": True} if device.type == "cuda" else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=config.nesterov and config.momentum > 0,
            **fused,
        )
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay, **fused)
