"""Training engine: seeded, resumable supervised training on an in-memory ImageDataset.

Deterministic on the CPU for a given seed (each epoch's shuffle and augmentation come from a
generator seeded by (seed, epoch), so a resumed run replays the same batches). A training state
is written after every epoch.

The CUDA fast path: the uint8 images live on the GPU when they fit (else pinned host batches
come through a DataLoader with workers), shuffling, augmentation and normalisation run there in
batches from a GPU generator, the step runs under bf16 autocast with channels_last and a fused
optimiser, optionally through ``torch.compile`` (falling back to eager if it fails), and nothing
in the step waits for the GPU: the loss is summed on the device and read once per epoch.

Under torchrun (see ``robustkd.training.distributed``) the model is wrapped in
DistributedDataParallel, each rank trains on its slice of every global batch, the loss is summed
across ranks, and rank 0 evaluates, reports progress and writes the state.

This module holds the loop and its state file; the options and callback types live in
``robustkd.training.config``, the augmentation in ``robustkd.training.augment``, and the data
placement and batching in ``robustkd.training.batches``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.atomic import atomic_write
from robustkd.data.datasets import ImageDataset, normalize, to_float
from robustkd.errors import CheckpointError, ConfigError
from robustkd.training import distributed
from robustkd.training.augment import apply_augment
from robustkd.training.batches import _Batches
from robustkd.training.config import (
    RUNTIME_OPTIONS,
    DivergedError,
    EvalFn,
    LossFn,
    ProgressFn,
    TrainConfig,
    TrainEvent,
    lr_factor,
    make_optimizer,
)
from robustkd.training.device import resolve_device


class Companion(Protocol):
    """Something trained beside the model whose state a resume must restore."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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
    identity: dict[str, Any] | None = None,
    companion: Companion | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``train_set``.

    ``loss_fn(model, inputs, labels, indices)`` defaults to cross-entropy; ``evaluate(model)`` runs
    after each epoch and its dict joins the history; with ``state_path`` the full training
    state is saved after every epoch and ``resume=True`` continues from it. ``identity`` (plain
    JSON-like values, e.g. a teacher recipe and its options) is what else makes the run what it
    is: it is saved with the state, and a resume with a different one is refused. ``companion``
    is whatever else trains beside the model (a teacher recipe's learned trigger and its
    optimiser): its ``state_dict()`` is saved with the state and loaded back on a resume. On
    CUDA, step events carry no loss (reading it would make the host wait for the GPU every step).
    """
    config.validate()
    if len(train_set) == 0:
        raise ConfigError("The training set is empty; give it at least one image.")
    device = resolve_device(config.device)
    cuda = device.type == "cuda"
    world, rank = distributed.world_size(), distributed.rank()
    main = rank == 0
    model.to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
    batches = _Batches(train_set, config, device)
    optimizer = make_optimizer(model.parameters(), config, device)
    steps = batches.steps
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
        start_epoch, history = _load_state(
            Path(state_path), model, optimizer, scheduler, config, identity or {}, companion
        )
    net: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # A 1-channel conv's gradient may come back in another (equivalent) stride layout.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
        net = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    runner = _Compiled(net, config.compile)
    mean = torch.tensor(train_set.mean, device=device)  # on the device once, not every step
    std = torch.tensor(train_set.std, device=device)
    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        model.train()
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        seen = torch.zeros((), device=device)
        for step, (images, labels, idx, draw) in enumerate(batches.epoch(epoch), start=1):
            x = apply_augment(to_float(images), draw, config.crop_padding)
            x = normalize(x, mean, std)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = runner.step(_forward_backward, loss_fn, optimizer, x, labels, idx, device)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach().float() * labels.shape[0]
            seen += labels.shape[0]
            if progress is not None and main:
                shown = None if cuda else float(loss.detach())
                progress(TrainEvent("step", epoch + 1, config.epochs, step, steps, shown))
        distributed.all_reduce_sum(loss_sum)
        distributed.all_reduce_sum(seen)
        mean_loss = float(loss_sum) / max(1.0, float(seen))  # the epoch's one wait for the GPU
        train_seconds = time.perf_counter() - epoch_start
        if not math.isfinite(mean_loss):
            raise DivergedError(
                f"The loss became {mean_loss} in epoch {epoch + 1}; lower the learning rate. "
                "The last good epoch's state is kept."
            )
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": mean_loss,
            "lr": optimizer.param_groups[0]["lr"],
            "images": int(seen),
            "train_seconds": train_seconds,  # the steps alone, before evaluation
        }
        if evaluate is not None and main:
            record.update(evaluate(model))
        record["seconds"] = time.perf_counter() - epoch_start
        record = distributed.broadcast_object(record)  # every rank keeps rank 0's history
        history.append(record)
        if state_path is not None and main:
            _save_state(
                Path(state_path),
                model,
                optimizer,
                scheduler,
                config,
                epoch + 1,
                history,
                identity or {},
                companion,
            )
        if progress is not None and main:
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
    distributed.barrier()  # the last state is written before any rank moves on
    model.eval()
    if cuda:
        model.to(memory_format=torch.contiguous_format)
    return TrainResult(history, time.perf_counter() - started, start_epoch)


def _forward_backward(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    labels: torch.Tensor,
    idx: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = loss_fn(model, x, labels, idx)
    loss.backward()
    return loss


class _Compiled:
    """Runs the training step through ``torch.compile`` when asked, falling back to eager.

    Compilation happens (and can fail: no compiler, an unsupported operation) in the first
    step's forward and backward; then a warning is printed and every step, that one included
    (its gradients are cleared and recomputed), runs eagerly.
    """

    def __init__(self, net: nn.Module, mode: str) -> None:
        self.eager = net
        self.model: nn.Module = net
        self.pending = mode != "off"
        self.mode = mode
        if self.pending:
            try:
                compiled = torch.compile(net, mode=None if mode == "default" else mode)
            except Exception as exc:  # e.g. torch.compile unsupported on this Python
                self._give_up(exc)
            else:
                self.model = compiled  # type: ignore[assignment]

    def _give_up(self, exc: BaseException) -> None:
        warnings.warn(
            f"torch.compile (mode {self.mode}) failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); training continues without it.",
            RuntimeWarning,
            stacklevel=3,
        )
        self.model = self.eager
        self.pending = False

    def step(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        """``fn(model, *args)`` with the compiled model, or the eager one."""
        if not self.pending:
            return fn(self.model, *args)
        try:
            loss = fn(self.model, *args)
        except Exception as exc:
            self._give_up(exc)
            return fn(self.model, *args)
        self.pending = False
        return loss


def _save_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: TrainConfig,
    epoch: int,
    history: list[dict[str, Any]],
    identity: dict[str, Any],
    companion: Companion | None = None,
) -> None:
    state = {
        "identity": identity,
        "companion": companion.state_dict() if companion is not None else {},
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "config": config.to_dict(),
        "history": history,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: torch.save(state, fh))  # a reader never sees half a file


def _load_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: TrainConfig,
    identity: dict[str, Any],
    companion: Companion | None = None,
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
    diff = [k for k in mine if k not in RUNTIME_OPTIONS and saved.get(k) != mine[k]]
    if diff:
        raise CheckpointError(
            f"Cannot resume from {path}: its training options differ ({', '.join(diff)}); "
            "use the same options or delete the state file to start afresh."
        )
    saved_identity = state.get("identity", identity)  # a state saved before identities: as now
    if not isinstance(saved_identity, dict):
        raise CheckpointError(
            f"Cannot resume from {path}: its record of how the run was made is not readable; "
            "delete the state file to start afresh."
        )
    if saved_identity != identity:
        keys = sorted(k for k in {*saved_identity, *identity}
                      if saved_identity.get(k) != identity.get(k))  # fmt: skip
        raise CheckpointError(
            f"Cannot resume from {path}: it was made with other {', '.join(keys)} options "
            f"({saved_identity.get(keys[0])!r} there, {identity.get(keys[0])!r} now); use the "
            "same ones or delete the state file to start afresh."
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if companion is not None and state.get("companion"):
        try:
            companion.load_state_dict(state["companion"])
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"Cannot resume from {path}: what it saved beside the model (a learned trigger "
                "or running statistics) is not readable; delete it to start afresh."
            ) from exc
    return int(state["epoch"]), list(state.get("history", []))
