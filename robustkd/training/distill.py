"""The distillation engine every method shares: its settings, the student's training against
a (possibly detoxified) teacher, fine-tuning and fine-pruning, and the final measurement.

The methods themselves (defences and baselines) are classes in ``robustkd.defenses``, one
module per family, in the registry ``METHODS``; ``robustkd.defenses.run_method`` runs one of
them by name.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.analysis.features import capture, resolve_layers
from robustkd.analysis.metrics import evaluate
from robustkd.data.datasets import ImageDataset, normalize
from robustkd.errors import ConfigError
from robustkd.models import create_model
from robustkd.models.complexity import count_flops, count_parameters
from robustkd.training.config import ProgressFn, TrainConfig, check_options, seed_everything
from robustkd.training.engine import train_model
from robustkd.training.losses import (
    FeatureDistiller,
    logit_kd_loss,
    nad_loss,
    salt_and_pepper,
    variance_alignment_loss,
    weighted_mean,
)
from robustkd.training.scenarios import Scenario


class TeacherFilter(Protocol):
    """What the student's training needs of a detoxifier (``robustkd.defenses.detox``): it
    moves to a device and, attached to the teacher, rewrites its features while it is read."""

    def to(self, device: torch.device) -> Any: ...

    def attach(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]: ...


class Found(Protocol):
    """What a method found in the teacher that a run folder keeps beside the report
    (``robustkd-reverse``'s reversed triggers)."""

    def save(self, path: str | Path) -> Path: ...


SCREEN_POLICIES = ("ce-only", "drop")


@dataclasses.dataclass
class DistillConfig:
    """Everything a distillation method needs beyond the scenario's data."""

    student: str | None = None  # default: the teacher's recorded student architecture
    epochs: int = 4
    batch_size: int = 128
    lr: float = 0.05
    schedule: str = "cosine"
    augment: str = "crop"
    seed: int = 0
    device: str = "auto"
    compile: str = "off"  # torch.compile mode of the training steps (see TrainConfig)
    layers: str = "all"  # teacher stages used for detox, screening and feature KD
    threshold: float | None = None  # None: the clean-halves threshold per layer
    granularity: str = "unit"
    blend: float = 1.0
    screen: bool = True
    screen_policy: str = "ce-only"
    screen_quantile: float = 0.99
    # robustkd also withholds samples whose own label the teacher disputes, and samples that
    # deviate within their labelled class (labelled data only)
    screen_labels: bool = True
    tau: float = 0.05
    learned_epochs: int = 5
    temperature: float = 4.0
    logit_weight: float = 1.0
    feature_weight: float = 1.0
    variance_weight: float = 0.0
    # salt-and-pepper on the student's input; None: the method's own (robustkd-paper 0.1,
    # every other method 0)
    noise_rate: float | None = None
    # robustkd-reverse: one blend trigger per class reversed from the teacher on the trusted
    # set (mask ≤ reverse_max_mask, reverse_steps Adam steps); reverse_share of each batch
    # reaches the student stamped with one of them while the teacher reads it clean
    reverse_max_mask: float = 0.2
    reverse_steps: int = 100
    reverse_share: float = 0.5
    nad_weight: float = 5000.0
    finetune_epochs: int = 10
    finetune_lr: float = 0.01
    finetune_batch_size: int = 64  # small: the trusted set may hold only a few hundred images
    prune_max_acc_drop: float = 0.05
    eval_size: int = 1000  # test images evaluated after each epoch (curves); final: all

    def validate(self) -> DistillConfig:
        self.train_config().validate()
        if self.threshold is not None and not 0 < self.threshold < 1e6:
            raise ConfigError(
                f"The variance threshold must be a positive ratio (e.g. 3.0); got {self.threshold}."
            )
        if not 0 < self.tau <= 1:
            raise ConfigError(f"τ must lie in (0, 1]; got {self.tau}.")
        if self.noise_rate is not None and not 0 <= self.noise_rate <= 1:
            raise ConfigError(f"The noise rate must lie in [0, 1]; got {self.noise_rate}.")
        if not 0 < self.reverse_max_mask <= 1:
            raise ConfigError(
                "The reversed triggers' mask bound must lie in (0, 1]; got "
                f"{self.reverse_max_mask}."
            )
        if not 1 <= self.reverse_steps <= 100_000:
            raise ConfigError(
                f"The reversal's steps must be a whole number from 1 to 100000; got "
                f"{self.reverse_steps}."
            )
        if not 0 <= self.reverse_share <= 1:
            raise ConfigError(
                f"The share of stamped student inputs must lie in [0, 1]; got {self.reverse_share}."
            )
        if not 0 <= self.blend <= 1:
            raise ConfigError(f"The blend weight must lie in [0, 1]; got {self.blend}.")
        if self.screen_policy not in SCREEN_POLICIES:
            raise ConfigError(
                f"Unknown screening policy {self.screen_policy!r}; choose one of: "
                f"{', '.join(SCREEN_POLICIES)}."
            )
        if self.finetune_batch_size < 1:
            raise ConfigError(
                f"The fine-tuning batch size must be at least 1; got {self.finetune_batch_size}."
            )
        for key in ("logit_weight", "feature_weight", "variance_weight", "nad_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be ≥ 0; got {getattr(self, key)}.")
        return self

    def train_config(self, **changes: Any) -> TrainConfig:
        values = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "schedule": self.schedule,
            "augment": self.augment,
            "seed": self.seed,
            "device": self.device,
            "compile": self.compile,
        }
        values.update(changes)
        return TrainConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DistillConfig:
        check_options(cls, values, "distillation")
        return cls(**values)


@dataclasses.dataclass
class MethodResult:
    """A method's trained model, its final metrics and training history, and what it found."""

    method: str
    model: nn.Module
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    detoxifier: TeacherFilter | None = None
    # robustkd's sample screen: per distillation sample, its score and whether it was withheld
    screen_scores: torch.Tensor | None = None
    withheld: torch.Tensor | None = None
    found: Found | None = None


# --------------------------------------------------------------------------- helpers


def student_for(
    teacher: nn.Module, scenario: Scenario, config: DistillConfig, teacher_meta: dict[str, Any]
) -> nn.Module:
    """A freshly initialised student (seeded) for the scenario's input shape and classes."""
    name = config.student or teacher_meta.get("student_architecture")
    if not name:
        raise ConfigError("Name a student architecture (--student); the teacher records none.")
    data = scenario.distill
    seed_everything(config.seed)
    student = create_model(
        name,
        num_classes=scenario.test.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
    )
    try:
        with torch.no_grad():
            student.eval()(torch.zeros(1, *data.input_shape))
    except Exception as exc:
        raise ConfigError(
            f"Student {name!r} cannot take the teacher's input shape {data.input_shape} ({exc}); "
            "choose another student architecture."
        ) from exc
    return student


def _stage_channels(model: nn.Module, layers: list[str], shape: tuple[int, ...]) -> list[int]:
    # Probe on the model's own device: the teacher may already sit on the GPU (the detox fit
    # moves it there), the student may not yet.
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.no_grad(), capture(model, layers) as out:
        was = model.training
        model.eval()(torch.zeros(2, *shape, device=device))
        model.train(was)
    return [int(out[n].shape[1]) for n in layers]


class _Harness(nn.Module):
    """The student plus the trainable parts of its losses (connectors), optimised together."""

    def __init__(self, student: nn.Module, extra: nn.Module | None = None) -> None:
        super().__init__()
        self.student = student
        self.extra = extra if extra is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


def _evaluator(scenario: Scenario, size: int) -> Callable[[nn.Module], dict[str, Any]]:
    subset = scenario.test.subset(range(min(size, len(scenario.test))))

    def run(model: nn.Module) -> dict[str, Any]:
        ev = evaluate(model, subset, scenario.trigger, scenario.target, scenario.mode)
        return {"test_acc": ev.acc, "test_asr": ev.asr}

    return run


def teacher_predictions(
    teacher: nn.Module, scenario: Scenario, shared: dict[str, Any]
) -> torch.Tensor:
    """The teacher's test-set predictions, computed once per comparison (cached in ``shared``)."""
    if "teacher_preds" not in shared:
        from robustkd.analysis.metrics import predict

        test = scenario.test
        shared["teacher_preds"] = predict(teacher.eval(), test.images, test.mean, test.std, None)
    return shared["teacher_preds"]


def final_metrics(
    model: nn.Module,
    scenario: Scenario,
    method: str,
    config: DistillConfig,
    teacher_preds: torch.Tensor | None = None,
) -> dict[str, Any]:
    """ACC, ASR, agreement with the teacher, size and the data behind them, on the test set."""
    from robustkd.analysis.metrics import predict

    model = model.cpu().eval()
    ev = evaluate(model, scenario.test, scenario.trigger, scenario.target, scenario.mode)
    agreement = None
    if teacher_preds is not None:  # how often the model predicts what the teacher predicts
        test = scenario.test
        preds = predict(model, test.images, test.mean, test.std, None)
        agreement = float((preds.cpu() == teacher_preds.cpu()).float().mean())
    return {
        "method": method,
        "acc": ev.acc,
        "asr": ev.asr,
        "agreement": agreement,
        "n_clean": ev.n_clean,
        "n_triggered": ev.n_triggered,
        "per_class_acc": ev.per_class_acc,
        "params": count_parameters(model),
        "flops": count_flops(model, scenario.test.input_shape),
        "scenario": scenario.name,
        "seed": config.seed,
        "trusted_size": scenario.info["trusted_size"],
        "rate": scenario.info["rate"],
        "distill_size": scenario.info["distill_size"],
    }


# --------------------------------------------------------------------------- distillation


def distill_student(
    teacher: nn.Module,
    student: nn.Module,
    scenario: Scenario,
    config: DistillConfig,
    *,
    detoxifier: TeacherFilter | None = None,
    withheld: torch.Tensor | None = None,
    logit_weight: float = 0.0,
    feature_weight: float = 0.0,
    nad_weight: float = 0.0,
    noise_rate: float = 0.0,
    student_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: ProgressFn | None = None,
    state_path: Path | None = None,
) -> list[dict[str, Any]]:
    """Train ``student`` on the scenario's distillation set against ``teacher``.

    ``withheld`` (bool per distillation sample) marks samples that get no teacher signal
    (cross-entropy only); ``detoxifier`` is attached to the teacher while it is read;
    ``student_input`` changes the student's input (after the noise), never the teacher's.
    """
    from robustkd.training.device import resolve_device

    device = resolve_device(config.device)
    teacher.to(device)
    if detoxifier is not None:
        detoxifier.to(device)
    data = scenario.distill
    use_teacher = logit_weight > 0 or feature_weight > 0 or nad_weight > 0
    t_layers = resolve_layers(teacher, config.layers) if feature_weight or nad_weight else []
    s_layers = list(getattr(student, "feature_layers", []))
    if t_layers and len(s_layers) < len(t_layers):
        raise ConfigError(
            f"The student names {len(s_layers)} stages but {len(t_layers)} teacher layers are "
            "distilled; choose fewer layers or another student."
        )
    s_layers = s_layers[-len(t_layers) :] if t_layers else []
    distiller = None
    if feature_weight > 0:
        t_ch = _stage_channels(teacher, t_layers, data.input_shape)
        s_ch = _stage_channels(student, s_layers, data.input_shape)
        distiller = FeatureDistiller(s_ch, t_ch)
    harness = _Harness(student, distiller)
    withheld = withheld.to(device) if withheld is not None else None
    labelled = data.labelled  # unlabelled distillation data: teacher signal only, no CE
    if not labelled and not use_teacher:
        raise ConfigError(
            "The distillation set is unlabelled, so training on it needs the teacher's signal; "
            "this method uses labels only (give labelled data, or choose a KD method)."
        )
    low = normalize(torch.zeros(1, data.in_channels, 1, 1), data.mean, data.std).flatten()
    high = normalize(torch.ones(1, data.in_channels, 1, 1), data.mean, data.std).flatten()
    low, high = low.to(device), high.to(device)
    noise_gen = torch.Generator(device=device).manual_seed(config.seed + 7)
    drop = withheld is not None and config.screen_policy == "drop"
    teacher.eval()

    # No step here waits for the GPU: withheld samples are weighted out of the teacher's
    # losses (weight 0) instead of being cut out of the batch by a boolean mask.
    def loss_fn(h: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        xs = salt_and_pepper(x, noise_rate, low, high, noise_gen) if noise_rate > 0 else x
        if student_input is not None:
            xs = student_input(xs)
        logits = h(xs)
        keep = None if withheld is None else (~withheld[idx]).float()
        if not labelled:
            loss = logits.new_zeros(())
        elif drop:
            loss = weighted_mean(F.cross_entropy(logits, y, reduction="none"), keep)
        else:
            loss = F.cross_entropy(logits, y)
        if not use_teacher:
            return loss
        # The teacher runs once per batch; its logits and captured features feed every loss.
        with torch.inference_mode():
            t_logits = teacher(x)
            t_feats = [t_out[n] for n in t_layers]
        s_feats = [s_out[n] for n in s_layers]
        if logit_weight > 0:
            kd = logit_kd_loss(logits, t_logits, config.temperature, keep)
            loss = loss + logit_weight * kd
        if distiller is not None:
            loss = loss + feature_weight * distiller(s_feats, t_feats, keep)
            if config.variance_weight > 0:
                pairs = zip(distiller.connected(s_feats, t_feats), t_feats, strict=True)
                loss = loss + config.variance_weight * sum(
                    variance_alignment_loss(s, t, keep) for s, t in pairs
                )
        if nad_weight > 0:
            loss = loss + nad_weight * sum(
                nad_loss(s, t, weights=keep) for s, t in zip(s_feats, t_feats, strict=True)
            )
        return loss

    detox_ctx = detoxifier.attach(teacher) if detoxifier is not None else contextlib.nullcontext()
    with detox_ctx, capture(teacher, t_layers) as t_out, capture(student, s_layers) as s_out:
        result = train_model(
            harness,
            data,
            config.train_config(),
            loss_fn=loss_fn,
            evaluate=_evaluator(scenario, config.eval_size),
            progress=progress,
            state_path=state_path,
            resume=state_path is not None,
        )
    return result.history


def fine_tune(
    model: nn.Module,
    data: ImageDataset,
    config: DistillConfig,
    scenario: Scenario,
    progress: ProgressFn | None = None,
    state_path: Path | None = None,
) -> list[dict[str, Any]]:
    """Fine-tune ``model`` in place on the defender's trusted clean set."""
    cfg = config.train_config(
        epochs=config.finetune_epochs, lr=config.finetune_lr, batch_size=config.finetune_batch_size
    )
    return train_model(
        model,
        data,
        cfg,
        evaluate=_evaluator(scenario, config.eval_size),
        progress=progress,
        state_path=state_path,
        resume=state_path is not None,
    ).history


@torch.no_grad()
def _prune_order(model: nn.Module, layer: str, data: ImageDataset) -> torch.Tensor:
    """Channels of ``layer`` sorted by mean activation on clean data, least active first."""
    from robustkd.analysis.features import feature_stats

    stats = feature_stats(model, data, [layer], per_unit=False)[layer]
    return stats.channel_mean.argsort()


class ChannelMask(nn.Module):
    """Zeroes pruned output channels of a layer (attached by a forward hook)."""

    def __init__(self, keep: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("keep", keep.float())

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        return out * self.keep.view(1, -1, *([1] * (out.dim() - 2))).to(out.dtype)


def fine_prune(
    teacher: nn.Module,
    scenario: Scenario,
    config: DistillConfig,
    progress: ProgressFn | None = None,
    state_path: Path | None = None,
) -> tuple[nn.Module, list[dict[str, Any]], int]:
    """Fine-pruning (Liu et al. 2018): prune the last stage's least active channels while the
    clean validation ACC drops by at most ``prune_max_acc_drop``, then fine-tune.

    Validation ACC for each pruning level comes from the stage's cached activations and the
    network's tail (one forward pass in all), not from a full evaluation per level.
    """
    from robustkd.analysis.features import activations, tail_from

    model = copy.deepcopy(teacher).cpu().eval()
    layer = resolve_layers(model, "all")[-1]
    order = _prune_order(model, layer, scenario.trusted)
    channels = order.numel()
    val = scenario.validation.subset(range(min(2000, len(scenario.validation))))
    tail = tail_from(model, layer)
    mask = ChannelMask(torch.ones(channels))
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda _m, _i, out: mask(out))
    if tail is not None:
        acts = activations(model, val, layer)  # hook is a no-op while nothing is pruned

        def val_acc() -> float:
            with torch.no_grad():
                return float((tail(mask(acts)).argmax(1) == val.labels).float().mean())
    else:

        def val_acc() -> float:
            return evaluate(model, val).acc

    base = val_acc()
    pruned = 0
    for k in range(1, channels):
        keep = torch.ones(channels)
        keep[order[:k]] = 0
        mask.keep.copy_(keep)
        if base - val_acc() > config.prune_max_acc_drop:
            break
        pruned = k
    keep = torch.ones(channels)
    keep[order[:pruned]] = 0
    mask.keep.copy_(keep)
    history = fine_tune(model, scenario.trusted, config, scenario, progress, state_path)
    # Fold the mask into the classifier so the saved weights are the pruned model: with a
    # global-pooling + linear head, a zero input column is exactly a removed channel.
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.in_features == channels]
    if heads:
        with torch.no_grad():
            heads[-1].weight[:, order[:pruned]] = 0
        handle.remove()
    else:
        model.prune_hook = handle  # no foldable head: keep the hook alive with the model
    return model, history, pruned


# --------------------------------------------------------------------------- entry point


def screen_report(
    flags: torch.Tensor, truth: torch.Tensor | None, threshold: float
) -> dict[str, Any]:
    """How many samples the screen withheld and, in a simulation, its recall and precision."""
    flags = flags.cpu().bool()
    out: dict[str, Any] = {
        "flagged_samples": int(flags.sum()),
        "screen_threshold": threshold,
        "screen_recall": None,
        "screen_precision": None,
    }
    if truth is not None:  # ground truth is known to a simulation, never to the defence
        truth = truth.cpu().bool()
        hit = int((flags & truth).sum())
        out["screen_recall"] = hit / int(truth.sum()) if truth.any() else None
        out["screen_precision"] = hit / int(flags.sum()) if flags.any() else None
    return out
