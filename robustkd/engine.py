"""Training engine: seeded, resumable supervised training on an in-memory ImageDataset.

Deterministic on the CPU for a given seed (each epoch's shuffle and augmentation come from a
generator seeded by (seed, epoch), so a resumed run replays the same batches). On CUDA it
uses bf16 autocast and channels_last. A training state is written after every epoch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.data import ImageDataset, normalize, to_float
from robustkd.device import resolve_device
from robustkd.errors import CheckpointError, ConfigError, RobustKDError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "paper", "constant")
AUGMENTS = ("none", "crop", "crop-flip")


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


def augment_batch(
    x: torch.Tensor, mode: str, padding: int, generator: torch.Generator
) -> torch.Tensor:
    """Random crops with zero padding (and horizontal flips), batched, on x's device."""
    if mode == "none" or x.shape[0] == 0:
        return x
    n, _, h, w = x.shape
    if padding > 0:
        shifts = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(x.device)
        padded = F.pad(x, (padding, padding, padding, padding))
        rows = torch.arange(h, device=x.device)[None, :] + shifts[0][:, None]  # (n, h)
        cols = torch.arange(w, device=x.device)[None, :] + shifts[1][:, None]  # (n, w)
        batch = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
        x = x.permute(0, 3, 1, 2)
    if mode == "crop-flip":
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous()


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


@dataclasses.dataclass
class TrainResult:
    history: list[dict[str, Any]]
    seconds: float
    resumed_from: int  # epochs already done when this call started


def train_model(
    model: nn.Module,
    train_set: ImageDataset,
    config: TrainConfig,
    *,
    loss_fn: LossFn | None = None,
    evaluate: EvalFn | None = None,
    progress: ProgressFn | None = None,
    state_path: str | Path | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train ``model`` in place on ``train_set``.

    ``loss_fn(model, inputs, labels, indices)`` defaults to cross-entropy; ``evaluate(model)`` runs
    after each epoch and its dict joins the history; with ``state_path`` the full training
    state is saved after every epoch and ``resume=True`` continues from it.
    """
    config.validate()
    if len(train_set) == 0:
        raise ConfigError("The training set is empty; give it at least one image.")
    device = resolve_device(config.device)
    cuda = device.type == "cuda"
    model.to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
    data = train_set.to(device) if cuda else train_set
    optimizer = make_optimizer(model.parameters(), config, device)
    steps = math.ceil(len(data) / config.batch_size)
    total_steps = steps * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(config.schedule, min(1.0, i / total_steps))
    )
    if loss_fn is None:
        smoothing = config.label_smoothing

        def loss_fn(
            m: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor
        ) -> torch.Tensor:
            return F.cross_entropy(m(x), y, label_smoothing=smoothing)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume and state_path is not None and Path(state_path).exists():
        start_epoch, history = _load_state(Path(state_path), model, optimizer, scheduler, config)
    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        model.train()
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        order = torch.randperm(len(data), generator=generator).to(data.device)
        for step, start in enumerate(range(0, len(data), config.batch_size), start=1):
            idx = order[start : start + config.batch_size]
            images, labels = data.images[idx], data.labels[idx]
            x = augment_batch(to_float(images), config.augment, config.crop_padding, generator)
            x = normalize(x, data.mean, data.std)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = loss_fn(model, x, labels, idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach().float() * labels.shape[0]
            seen += labels.shape[0]
            if progress is not None and not cuda:  # on CUDA avoid a host sync every step
                progress(
                    TrainEvent("step", epoch + 1, config.epochs, step, steps, float(loss.detach()))
                )
        mean_loss = float(loss_sum) / max(1, seen)
        if not math.isfinite(mean_loss):
            raise DivergedError(
                f"The loss became {mean_loss} in epoch {epoch + 1}; lower the learning rate. "
                "The last good epoch's state is kept."
            )
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": mean_loss,
            "lr": optimizer.param_groups[0]["lr"],
        }
        if evaluate is not None:
            record.update(evaluate(model))
        record["seconds"] = time.perf_counter() - epoch_start
        history.append(record)
        if state_path is not None:
            _save_state(Path(state_path), model, optimizer, scheduler, config, epoch + 1, history)
        if progress is not None:
            progress(
                TrainEvent(
                    "epoch",
                    epoch + 1,
                    config.epochs,
                    steps,
                    steps,
                    mean_loss,
                    dict(record),
                    record["seconds"],
                )
            )
    model.eval()
    if cuda:
        model.to(memory_format=torch.contiguous_format)
    return TrainResult(history, time.perf_counter() - started, start_epoch)


def _save_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: TrainConfig,
    epoch: int,
    history: list[dict[str, Any]],
) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "config": config.to_dict(),
        "history": history,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: TrainConfig,
) -> tuple[int, list[dict[str, Any]]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"Cannot resume from {path} ({exc}); delete it to start the run afresh."
        ) from exc
    saved = dict(state.get("config", {}))
    mine = config.to_dict()
    # Only the epoch count may change on resume (to extend a run); the rest must match.
    diff = [k for k in mine if k not in ("epochs", "device") and saved.get(k) != mine[k]]
    if diff:
        raise CheckpointError(
            f"Cannot resume from {path}: its training options differ ({', '.join(diff)}); "
            "use the same options or delete the state file to start afresh."
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), list(state.get("history", []))
