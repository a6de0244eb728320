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
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.atomic import atomic_write
from robustkd.data.datasets import ImageDataset, normalize, to_float
from robustkd.errors import CheckpointError, ConfigError, RobustKDError
from robustkd.training import distributed
from robustkd.training.device import resolve_device

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


@dataclasses.dataclass
class AugmentDraw:
    """The random part of a batch's augmentation: crop offsets (2, N) and flips (N,)."""

    shifts: torch.Tensor | None
    flips: torch.Tensor | None

    def __getitem__(self, index: Any) -> AugmentDraw:
        """The draw of some samples of the batch (a rank's shard, say)."""
        return AugmentDraw(
            None if self.shifts is None else self.shifts[:, index],
            None if self.flips is None else self.flips[index],
        )


def draw_augment(n: int, mode: str, padding: int, generator: torch.Generator) -> AugmentDraw:
    """Draw crop offsets and flips for ``n`` images on the generator's device."""
    device = generator.device
    shifts = flips = None
    if mode != "none" and padding > 0:
        shifts = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=device)
    if mode == "crop-flip":
        flips = torch.rand(n, generator=generator, device=device) < 0.5
    return AugmentDraw(shifts, flips)


def apply_augment(x: torch.Tensor, draw: AugmentDraw, padding: int) -> torch.Tensor:
    """Zero-padded random crops and horizontal flips of ``x`` (N, C, H, W), batched."""
    if x.shape[0] == 0 or (draw.shifts is None and draw.flips is None):
        return x
    n, _, h, w = x.shape
    if draw.shifts is not None:
        shifts = draw.shifts.to(x.device)
        padded = F.pad(x, (padding, padding, padding, padding))
        rows = torch.arange(h, device=x.device)[None, :] + shifts[0][:, None]  # (n, h)
        cols = torch.arange(w, device=x.device)[None, :] + shifts[1][:, None]  # (n, w)
        batch = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
        x = x.permute(0, 3, 1, 2)
    if draw.flips is not None:
        x = torch.where(draw.flips.to(x.device)[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def augment_batch(
    x: torch.Tensor, mode: str, padding: int, generator: torch.Generator
) -> torch.Tensor:
    """Random crops with zero padding (and horizontal flips), batched, on x's device."""
    if mode == "none" or x.shape[0] == 0:
        return x
    return apply_augment(x, draw_augment(x.shape[0], mode, padding, generator), padding)


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
    state is saved after every epoch and ``resume=True`` continues from it. On CUDA, step
    events carry no loss (reading it would make the host wait for the GPU every step).
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
        start_epoch, history = _load_state(Path(state_path), model, optimizer, scheduler, config)
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
            _save_state(Path(state_path), model, optimizer, scheduler, config, epoch + 1, history)
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


class _Batches:
    """Each epoch's batches: (uint8 images, labels, indices, augmentation draw) on the device.

    The permutation and augmentation come from a generator seeded by (seed, epoch), so a
    resumed run replays the same batches; under DDP every rank draws the same global batch
    and keeps its shard, and a last global batch smaller than the world size is skipped.
    Images live on the device when they fit (or ``data_placement="device"``); otherwise
    pinned host batches are gathered by DataLoader workers and copied without blocking.
    """

    def __init__(self, data: ImageDataset, config: TrainConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.world = distributed.world_size()
        self.rank = distributed.rank()
        n = len(data)
        size = config.batch_size
        self.bounds = [(s, min(s + size, n)) for s in range(0, n, size)]
        if self.world > 1:
            self.bounds = [(a, b) for a, b in self.bounds if b - a >= self.world]
            if not self.bounds:
                raise ConfigError(
                    f"{n} training images cannot be split over {self.world} processes; "
                    "use fewer processes or more images."
                )
        self.steps = len(self.bounds)
        self.resident = _resident(data, config, device)
        self.data = data.to(device) if self.resident else data
        self.n = n

    def _generator(self, epoch: int) -> torch.Generator:
        gen_device = self.device if self.resident else torch.device("cpu")
        seed = self.config.seed * 100_003 + epoch
        return torch.Generator(device=gen_device).manual_seed(seed)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]]:
        config = self.config
        generator = self._generator(epoch)
        order = torch.randperm(self.n, generator=generator, device=generator.device)
        plan = []
        for a, b in self.bounds:
            draw = draw_augment(b - a, config.augment, config.crop_padding, generator)
            mine = slice(self.rank, None, self.world)
            plan.append((order[a:b][mine], draw[mine]))
        if self.resident:
            for idx, draw in plan:
                yield self.data.images[idx], self.data.labels[idx], idx, draw
            return
        for (images, labels, idx), (_, draw) in zip(self._host_batches(plan), plan, strict=True):
            yield (
                images.to(self.device, non_blocking=True),
                labels.to(self.device, non_blocking=True),
                idx.to(self.device, non_blocking=True),
                draw,
            )

    def _host_batches(self, plan: list[tuple[torch.Tensor, Any]]) -> Any:
        from torch.utils.data import DataLoader

        workers = min(4, max(1, (os.cpu_count() or 2) - 1))
        return DataLoader(
            _Gather(self.data, [idx for idx, _ in plan]),
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )


class _Gather(torch.utils.data.Dataset):
    """Item i: the images, labels and indices of the i-th planned batch (host memory)."""

    def __init__(self, data: ImageDataset, batches: list[torch.Tensor]) -> None:
        self.data = data
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = self.batches[i]
        return self.data.images[idx], self.data.labels[idx], idx


def _resident(data: ImageDataset, config: TrainConfig, device: torch.device) -> bool:
    """Whether the images should live on ``device`` (the CPU's own memory: always, in auto)."""
    if config.data_placement != "auto":
        return config.data_placement == "device"
    if device.type == "cpu":
        return True
    need = data.images.numel() * data.images.element_size()
    free, _total = torch.cuda.mem_get_info(device)
    return need <= free // 4  # leave most of the memory to activations and the models


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
    atomic_write(path, lambda fh: torch.save(state, fh))  # a reader never sees half a file


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
    diff = [k for k in mine if k not in RUNTIME_OPTIONS and saved.get(k) != mine[k]]
    if diff:
        raise CheckpointError(
            f"Cannot resume from {path}: its training options differ ({', '.join(diff)}); "
            "use the same options or delete the state file to start afresh."
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), list(state.get("history", []))
