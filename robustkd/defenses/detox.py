"""Detoxification of a teacher's intermediate features, and screening of suspect samples.

Two modes share one interface — a per-layer module mapping features to detoxified features,
attached to the teacher through forward hooks:

- *threshold* (interactive, no training): units (channel × position, or whole channels) whose
  variance on the distillation data exceeds ``threshold`` × their variance on the trusted clean
  set are blended toward their trusted clean mean. The default threshold per layer is the
  largest score seen between two halves of the trusted set (clean against clean).
- *learned* (the paper's): ``F' = (1 − m) ⊙ F + m ⊙ p`` with a detox feature ``p`` (initialised
  to the clean mean feature) and a mask ``m`` clamped to ``[0, τ]``, optimised with cross-entropy
  plus a feature-variance loss, teacher weights frozen.

The same variance signal screens *samples*: a sample whose activations deviate strongly on the
flagged units (mean squared z-score against the trusted set) is flagged, so distillation can
withhold the teacher's signal on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from robustkd.analysis.features import (
    LayerStats,
    capture,
    feature_stats,
    forward_hooks,
    layer_outputs,
    resolve_layers,
    variance_score,
)
from robustkd.analysis.incremental import IncrementalTail, TailPlan
from robustkd.analysis.metrics import predict
from robustkd.attacks import Trigger
from robustkd.data.datasets import ImageDataset, normalize, to_float
from robustkd.errors import CheckpointError, ConfigError
from robustkd.models.sharing import view

GRANULARITIES = ("unit", "channel")


# --------------------------------------------------------------------------- detox modules


class ThresholdDetox(nn.Module):
    """Blend flagged units toward their clean mean: ``F + blend · mask · (mean − F)``."""

    def __init__(self, mask: torch.Tensor, clean_mean: torch.Tensor, blend: float = 1.0) -> None:
        super().__init__()
        if not 0 <= blend <= 1:
            raise ConfigError(f"The blend weight must lie in [0, 1]; got {blend}.")
        self.blend = float(blend)
        self.register_buffer("mask", mask.float())
        self.register_buffer("clean_mean", clean_mean.float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        w = (self.blend * self.mask).to(features.dtype)
        return features + w * (self.clean_mean.to(features.dtype) - features)

    @property
    def flagged(self) -> int:
        return int(self.mask.sum())


class LearnedDetox(nn.Module):
    """``(1 − m) ⊙ F + m ⊙ p`` with ``m`` clamped to ``[0, τ]`` (RobustKD's detox layer)."""

    def __init__(self, clean_mean: torch.Tensor, tau: float = 0.05) -> None:
        super().__init__()
        if not 0 < tau <= 1:
            raise ConfigError(f"τ must lie in (0, 1]; got {tau}.")
        self.tau = float(tau)
        self.p = nn.Parameter(clean_mean.detach().clone().float())
        self.m = nn.Parameter(torch.full_like(self.p, tau / 2))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        m = self.m.clamp(0, self.tau).to(features.dtype)
        return (1 - m) * features + m * self.p.to(features.dtype)

    @torch.no_grad()
    def project(self) -> None:
        self.m.clamp_(0, self.tau)


class Detoxifier(nn.Module):
    """Per-layer detox modules, attached to a model with ``with detox.attach(model): …``."""

    def __init__(self, layers: dict[str, nn.Module], mode: str, info: dict | None = None) -> None:
        super().__init__()
        self.names = list(layers)
        self.mode = mode
        self.info = dict(info or {})
        self.detox = nn.ModuleList(layers.values())

    def items(self) -> Iterator[tuple[str, nn.Module]]:
        return zip(self.names, self.detox, strict=True)

    def attach(self, model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
        """``with detox.attach(teacher): …`` — the listed layers' outputs are detoxified.

        Hooks ``model`` itself: give it a private model or a ``sharing.view`` of a shared one
        (a shared model refuses hooks).
        """
        resolve_layers(model, self.names)
        return forward_hooks(model, dict(self.items()))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"mode": self.mode, "layers": self.names, "info": self.info}
        meta["params"] = [
            {"blend": d.blend} if isinstance(d, ThresholdDetox) else {"tau": d.tau}
            for _, d in self.items()
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"robustkd-detox": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> Detoxifier:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {})["robustkd-detox"])
            tensors = load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path} is not a saved detoxifier; re-run the detox.") from exc
        layers: dict[str, nn.Module] = {}
        for i, (name, params) in enumerate(zip(meta["layers"], meta["params"], strict=True)):
            if meta["mode"] == "threshold":
                layers[name] = ThresholdDetox(
                    tensors[f"detox.{i}.mask"], tensors[f"detox.{i}.clean_mean"], params["blend"]
                )
            else:
                d = LearnedDetox(tensors[f"detox.{i}.p"], params["tau"])
                d.m.data.copy_(tensors[f"detox.{i}.m"])
                layers[name] = d
        return cls(layers, meta["mode"], meta.get("info"))


# --------------------------------------------------------------------------- threshold fit


def split_halves(data: ImageDataset, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Two disjoint random halves of a trusted set (A is the reference, B calibrates)."""
    if len(data) < 4:
        raise ConfigError(
            f"The trusted clean set has {len(data)} images; give it at least 4 (100+ advised)."
        )
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    half = len(data) // 2
    return data.subset(order[:half].sort().values), data.subset(order[half:].sort().values)


@dataclasses.dataclass
class LayerFit:
    """What the threshold fit saw at one layer."""

    layer: str
    granularity: str
    scores: torch.Tensor  # suspect variance / trusted-A variance, (C,H,W) or (C,)
    clean_scores: torch.Tensor  # trusted-B variance / trusted-A variance, same shape
    default_threshold: float  # max of clean_scores
    reference: LayerStats  # trusted half A
    clean_mean: torch.Tensor  # (C, H, W): trusted mean, the replacement value

    def mask(self, threshold: float | None = None) -> torch.Tensor:
        """Flagged units (C, H, W) at ``threshold`` (default: the clean-halves threshold)."""
        t = self.default_threshold if threshold is None else float(threshold)
        flagged = self.scores > t
        if self.granularity == "channel":
            flagged = flagged[:, None, None].expand_as(self.clean_mean)
        return flagged


@dataclasses.dataclass
class ThresholdFit:
    """Scores per layer, and the detoxifier/screen they give at a threshold."""

    layers: dict[str, LayerFit]
    granularity: str
    calibration: ImageDataset  # trusted half B (clean), calibrates the sample screen

    def thresholds(self, threshold: float | None = None) -> dict[str, float]:
        return {
            n: (f.default_threshold if threshold is None else float(threshold))
            for n, f in self.layers.items()
        }

    def flagged_units(self, threshold: float | None = None) -> dict[str, int]:
        return {n: int(f.mask(threshold).sum()) for n, f in self.layers.items()}

    def detoxifier(self, threshold: float | None = None, blend: float = 1.0) -> Detoxifier:
        mods = {
            n: ThresholdDetox(f.mask(threshold), f.clean_mean, blend)
            for n, f in self.layers.items()
        }
        info = {
            "thresholds": self.thresholds(threshold),
            "granularity": self.granularity,
            "flagged_units": self.flagged_units(threshold),
        }
        return Detoxifier(mods, "threshold", info)


def check_threshold(threshold: float | None) -> None:
    if threshold is not None and not (threshold > 0 and threshold < 1e6):
        raise ConfigError(
            f"The variance threshold must be a positive score ratio (e.g. 2.5); got {threshold}."
        )


def fit_threshold(
    teacher: nn.Module,
    trusted: ImageDataset,
    suspect: ImageDataset,
    layers: str | Sequence[str] | None = None,
    granularity: str = "unit",
    seed: int = 0,
) -> ThresholdFit:
    """Score every unit (or channel) of ``layers``: variance on ``suspect`` / on trusted half A."""
    if granularity not in GRANULARITIES:
        raise ConfigError(
            f"Unknown granularity {granularity!r}; choose one of: {', '.join(GRANULARITIES)}."
        )
    if len(suspect) == 0:
        raise ConfigError("The distillation set is empty; give it at least one image.")
    names = resolve_layers(teacher, layers)
    half_a, half_b = split_halves(trusted, seed)
    stats_a = feature_stats(teacher, half_a, names)
    stats_b = feature_stats(teacher, half_b, names)
    stats_s = feature_stats(teacher, suspect, names)
    per_unit = granularity == "unit"
    fits = {}
    for n in names:
        clean = variance_score(stats_b[n], stats_a[n], per_unit)
        fits[n] = LayerFit(
            layer=n,
            granularity=granularity,
            scores=variance_score(stats_s[n], stats_a[n], per_unit),
            clean_scores=clean,
            default_threshold=float(clean.max()),
            reference=stats_a[n],
            clean_mean=(stats_a[n].unit_mean * stats_a[n].n + stats_b[n].unit_mean * stats_b[n].n)
            / (stats_a[n].n + stats_b[n].n),
        )
    return ThresholdFit(fits, granularity, half_b)


# --------------------------------------------------------------------------- sample screening


@dataclasses.dataclass
class SampleScreen:
    """Per-sample deviation on the flagged units; samples above ``threshold`` are flagged."""

    masks: dict[str, torch.Tensor]  # layer → bool (C,H,W) flagged units
    means: dict[str, torch.Tensor]  # trusted-A mean per unit
    stds: dict[str, torch.Tensor]  # trusted-A std per unit
    threshold: float
    quantile: float

    @property
    def active(self) -> bool:
        return any(bool(m.any()) for m in self.masks.values())

    @torch.no_grad()
    def scores(
        self,
        model: nn.Module,
        data: ImageDataset,
        trigger: Trigger | None = None,
        batch_size: int = 500,
    ) -> torch.Tensor:
        """Mean squared z-score of each sample over all flagged units (0 when none)."""
        if not self.active:
            return torch.zeros(len(data))
        names = [n for n, m in self.masks.items() if m.any()]
        count = sum(int(self.masks[n].sum()) for n in names)
        out_scores = []
        for out in layer_outputs(model, data, names, trigger, batch_size):
            total = 0.0
            for n in names:
                m = self.masks[n]
                z = (out[n].float().cpu()[:, m] - self.means[n][m]) / self.stds[n][m]
                total = total + (z**2).sum(1)
            out_scores.append(total / count)
        return torch.cat(out_scores)

    def flags(self, model: nn.Module, data: ImageDataset) -> torch.Tensor:
        return self.scores(model, data) > self.threshold


def _check_quantile(quantile: float) -> None:
    if not 0.5 <= quantile < 1:
        raise ConfigError(f"The screening quantile must lie in [0.5, 1); got {quantile}.")


def fit_screen(
    teacher: nn.Module,
    fit: ThresholdFit,
    threshold: float | None = None,
    quantile: float = 0.99,
    units: str = "flagged",
) -> SampleScreen:
    """A sample screen on the units flagged at ``threshold`` (``units="all"``: on every unit
    of every layer, for comparison), calibrated on trusted half B."""
    _check_quantile(quantile)
    if units not in ("flagged", "all"):
        raise ConfigError(f"Screen the 'flagged' units or 'all' of them; got {units!r}.")
    masks = {
        n: torch.ones_like(f.mask(threshold)) if units == "all" else f.mask(threshold)
        for n, f in fit.layers.items()
    }
    means = {n: f.reference.unit_mean for n, f in fit.layers.items()}
    stds = {n: f.reference.unit_var.clamp_min(1e-8).sqrt() + 1e-3 for n, f in fit.layers.items()}
    screen = SampleScreen(masks, means, stds, float("inf"), quantile)
    if screen.active:
        clean = screen.scores(teacher, fit.calibration)
        screen.threshold = float(torch.quantile(clean.double(), quantile))
    return screen


@dataclasses.dataclass
class LabelScreen:
    """Samples whose own label the teacher disputes: its cross-entropy on a sample's label above
    the ``quantile`` of the same on trusted clean images. It needs labelled distillation data,
    and sees a backdoor however quiet its features are (an adaptive trigger that keeps every
    unit inside the clean range still turns the teacher's answer to the target class)."""

    threshold: float
    quantile: float

    @torch.no_grad()
    def scores(self, model: nn.Module, data: ImageDataset, batch_size: int = 500) -> torch.Tensor:
        """The teacher's cross-entropy on each sample's own label (0 for unlabelled ones)."""
        labels = data.labels.cpu().long()
        known = labels >= 0
        probs = predict(
            model, data.images, data.mean, data.std, batch_size=batch_size, return_probs=True
        )
        if known.any() and int(labels[known].max()) >= probs.shape[1]:
            raise ConfigError(
                f"These images have labels up to {int(labels[known].max())}, but the teacher "
                f"predicts {probs.shape[1]} classes; give data labelled with the teacher's classes."
            )
        picked = probs.gather(1, labels.clamp_min(0)[:, None])[:, 0].double()
        return torch.where(known, -torch.log(picked.clamp_min(1e-12)), torch.zeros_like(picked))

    def flags(self, model: nn.Module, data: ImageDataset) -> torch.Tensor:
        return self.scores(model, data) > self.threshold


def fit_label_screen(
    teacher: nn.Module, calibration: ImageDataset, quantile: float = 0.99
) -> LabelScreen:
    """A label screen calibrated on trusted clean images (``fit.calibration``, half B)."""
    _check_quantile(quantile)
    screen = LabelScreen(float("inf"), quantile)
    clean = screen.scores(teacher, calibration)
    screen.threshold = float(torch.quantile(clean, quantile))
    return screen


def screen_within_classes(
    teacher: nn.Module,
    trusted: ImageDataset,
    suspect: ImageDataset,
    layers: str | Sequence[str] | None = None,
    granularity: str = "unit",
    seed: int = 0,
    threshold: float | None = None,
    quantile: float = 0.99,
    min_trusted: int = 20,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The variance fit and sample screen run within each labelled class: the suspect images
    of class ``c`` against the trusted images of class ``c``. A trigger held inside the clean
    range of all images together can stand far outside one class's much narrower range.

    Returns which suspect images are withheld, and per class (by name) the flagged units and
    the images withheld; classes with fewer than ``min_trusted`` trusted images are skipped
    (and named). Unlabelled suspect images are never withheld here."""
    withheld = torch.zeros(len(suspect), dtype=torch.bool)
    per_class: dict[str, dict[str, int]] = {}
    skipped: list[str] = []
    labels, known = suspect.labels.cpu(), trusted.labels.cpu()
    names = list(suspect.classes) if suspect.classes else []
    for c in sorted(int(v) for v in labels.unique() if v >= 0):
        name = names[c] if c < len(names) else str(c)
        rows = torch.nonzero(labels == c).flatten()
        ref = torch.nonzero(known == c).flatten()
        if len(ref) < min_trusted:
            skipped.append(name)
            continue
        part = suspect.subset(rows)
        fit = fit_threshold(teacher, trusted.subset(ref), part, layers, granularity, seed)
        screen = fit_screen(teacher, fit, threshold, quantile)
        caught = torch.zeros(len(rows), dtype=torch.bool)
        if screen.active:
            caught = screen.scores(teacher, part) > screen.threshold
        withheld[rows[caught]] = True
        per_class[name] = {
            "flagged_units": sum(fit.flagged_units(threshold).values()),
            "withheld": int(caught.sum()),
        }
    return withheld, {"classes": per_class, "skipped": skipped}


# --------------------------------------------------------------------------- learned mode


def fit_learned(
    teacher: nn.Module,
    trusted: ImageDataset,
    layers: str | Sequence[str] | None = None,
    tau: float = 0.05,
    variance_weight: float = 1.0,
    epochs: int = 5,
    lr: float = 0.01,
    batch_size: int = 128,
    seed: int = 0,
) -> Detoxifier:
    """Optimise ``p`` and ``m`` per layer with CE + across-sample feature variance (frozen teacher).

    Our reading of the paper's "CE+variance" objective (its script is not public): keep the
    teacher's clean predictions right while shrinking the across-sample variance of the
    detoxified features, normalised by the clean variance so layers weigh alike.
    """
    if not 0 < tau <= 1:
        raise ConfigError(f"τ must lie in (0, 1]; got {tau}.")
    if len(trusted) == 0:
        raise ConfigError("The trusted clean set is empty; give it at least one image.")
    names = resolve_layers(teacher, layers)
    stats = feature_stats(teacher, trusted, names)
    detox = Detoxifier(
        {n: LearnedDetox(stats[n].unit_mean, tau) for n in names},
        "learned",
        {"tau": tau, "variance_weight": variance_weight, "epochs": epochs},
    )
    device = next(teacher.parameters()).device
    detox.to(device)
    ref_var = {n: stats[n].unit_var.mean().clamp_min(1e-8).to(device) for n in names}
    # an eval-mode view with frozen weights: the teacher itself is never hooked or switched
    model = view(teacher)
    opt = torch.optim.Adam(detox.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    with detox.attach(model), capture(model, names) as out:
        for _ in range(epochs):
            for images, labels in trusted.batches(batch_size, shuffle=True, generator=g):
                x = normalize(to_float(images.to(device)), trusted.mean, trusted.std)
                logits = model(x)
                var_loss = sum(out[n].float().var(0).mean() / ref_var[n] for n in names)
                loss = F.cross_entropy(logits, labels.to(device)) + variance_weight * var_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for _, d in detox.items():
                    d.project()
    return detox.eval()


# --------------------------------------------------------------------------- preview


# what an interactive preview call should take at most (the Feature variance page's slider)
INTERACTIVE_MS = 150.0


@dataclasses.dataclass(frozen=True)
class Preview:
    """ACC/ASR of a detoxified teacher. ``complete`` is False for a first answer within a time
    budget: then ``n_clean``/``n_triggered`` say how many (class-stratified) images it used."""

    acc: float
    asr: float | None
    flagged_units: int
    n_clean: int
    n_triggered: int
    complete: bool = True


def stratified_order(labels: torch.Tensor) -> torch.Tensor:
    """An order of ``labels``' indices whose every prefix holds the classes in about their
    overall shares (each class's images keep their order): the ``r``-th image of a class of
    ``n`` sorts at ``(r + ½) / n``."""
    labels = labels.cpu()
    if labels.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    rank = torch.zeros(labels.numel(), dtype=torch.float64)
    for c in range(counts.numel()):
        members = torch.nonzero(inverse == c).flatten()
        rank[members] = (torch.arange(members.numel(), dtype=torch.float64) + 0.5) / members.numel()
    return torch.sort(rank, stable=True).indices


@dataclasses.dataclass
class _Progress:
    """The predictions for one flagged-unit mask so far: rows ``[0, done[0])`` of the clean
    part and ``[0, done[1])`` of the triggered part are computed."""

    preds: torch.Tensor
    plan: TailPlan | None
    edit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    done: list[int]
    s_per_row: float = 0.0  # seconds, as the last step took
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class DetoxPreview:
    """ACC/ASR of the threshold-detoxified teacher at one layer, from cached activations.

    The layer's activations on the clean and triggered evaluation images are computed once;
    each call re-runs only the rest of the network (``features.tail_from``), and of that only
    what the flagged units reach (``incremental.IncrementalTail``: the detox changes a few
    positions of the map). ``mode`` is the attack's (``all-to-one`` or ``all-to-all``, as
    ``metrics.backdoor_targets``). The preview keeps a private view of the teacher
    (``sharing.view``) and never hooks it, so one preview may serve several callers at once.

    ``preview(threshold)`` evaluates every image. ``preview(threshold, budget_ms=…)`` stops
    once the budget is spent and answers from the images done (``Preview.complete`` False;
    the images run in a class-stratified order, clean and triggered ones alike, so any part
    is a stratified sample); a later call for the same flagged units carries on from there.
    The last ``remember`` masks' predictions are kept (0: none).
    """

    def __init__(
        self,
        teacher: nn.Module,
        fit: ThresholdFit,
        layer: str,
        data: ImageDataset,
        trigger: Trigger | None,
        target: int | None,
        batch_size: int = 2048,
        mode: str = "all-to-one",
        remember: int = 64,
    ) -> None:
        from robustkd.analysis.features import activations, tail_from
        from robustkd.analysis.metrics import backdoor_targets

        if layer not in fit.layers:
            raise ConfigError(
                f"Layer {layer!r} was not scored; choose one of: {', '.join(fit.layers)}."
            )
        self.fit = fit.layers[layer]
        self.teacher, self.layer, self.batch_size = view(teacher), layer, batch_size
        self.mode, self.remember = mode, int(remember)
        self.tail = tail_from(self.teacher, layer)
        # the images in a class-stratified order (see __call__'s budget)
        labels = data.labels.cpu()
        order = stratified_order(labels)
        self.labels = labels[order]
        parts = [activations(self.teacher, data.subset(order), layer)]
        self.trigger_targets = None
        if trigger is not None and target is not None:
            targets = backdoor_targets(labels, target, mode, data.num_classes)
            keep = torch.nonzero(labels != targets).flatten()
            keep = keep[stratified_order(labels[keep])]
            self.trigger_targets = targets[keep]
            if len(keep):  # none when every image is of the target class: ASR 0, as evaluate
                parts.append(activations(self.teacher, data.subset(keep), layer, trigger))
        acts = torch.cat(parts) if len(parts) > 1 else parts[0]
        if acts.dim() == 4:  # oneDNN convolutions run faster on channels_last on CPU
            # (only the activations: the tail's weights are the teacher's own, shared with
            # every other user of the model, and stay as they are)
            acts = acts.contiguous(memory_format=torch.channels_last)
        self._acts = acts
        n_clean = len(self.labels)
        self.clean = acts[:n_clean]  # views of one tensor, in the stratified order
        self.triggered = acts[n_clean:] if len(parts) > 1 else None
        self.engine = None
        if self.tail is not None and acts.dim() == 4:
            self.engine = IncrementalTail(self.tail, acts, max_chunk=batch_size)
        # without a target there is no ASR (as on the fast path), so no trigger either
        self._data, self._target = data, target
        self._trigger = trigger if self.trigger_targets is not None else None
        self._lock = threading.Lock()
        self._memo: OrderedDict[tuple[bytes, float], _Progress] = OrderedDict()

    @property
    def n_images(self) -> int:
        """Clean and triggered images a complete answer evaluates."""
        return int(self._acts.shape[0])

    @property
    def n_clean(self) -> int:
        """Clean images a complete answer evaluates (its ``Preview.n_clean``)."""
        return len(self.labels)

    @property
    def n_triggered(self) -> int:
        """Triggered images a complete answer evaluates (0 without a trigger and target)."""
        return 0 if self.trigger_targets is None else len(self.trigger_targets)

    def __call__(
        self, threshold: float | None = None, blend: float = 1.0, budget_ms: float | None = None
    ) -> Preview:
        start = time.perf_counter()
        check_threshold(threshold)
        detox = ThresholdDetox(self.fit.mask(threshold), self.fit.clean_mean, blend)
        if self.tail is None:  # untraceable model: full forward passes with the hook attached
            from robustkd.analysis.metrics import evaluate

            d = Detoxifier({self.layer: detox}, "threshold")
            model = view(self.teacher)  # per call: other callers may preview at the same time
            with d.attach(model):
                ev = evaluate(model, self._data, self._trigger, self._target, self.mode)
            return Preview(ev.acc, ev.asr, detox.flagged, ev.n_clean, ev.n_triggered)
        progress = self._progress(detox)
        with progress.lock:
            deadline = None if budget_ms is None else start + budget_ms / 1000
            self._advance(progress, detox, deadline)
            return self._summary(progress, detox.flagged)

    # ------------------------------------------------------------------ internals

    def _progress(self, detox: ThresholdDetox) -> _Progress:
        mask = detox.mask.bool()
        changes = bool(mask.any()) and detox.blend > 0
        key = (hashlib.sha1(mask.numpy().tobytes()).digest() if changes else b"", detox.blend)
        with self._lock:
            progress = self._memo.get(key)
            if progress is not None:
                self._memo.move_to_end(key)
                return progress
        plan = edit = None
        if changes and self.engine is not None:
            c, h, w = mask.shape
            flagged = mask.permute(1, 2, 0).reshape(h * w, c)
            mean = detox.clean_mean.permute(1, 2, 0).reshape(h * w, c)
            blend = detox.blend

            def edit(vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
                # as ThresholdDetox, on the flagged units only
                m, target = flagged[idx], mean[idx]
                return torch.where(m, vals + blend * (target - vals), vals)

            plan = self.engine.plan(torch.nonzero(flagged.any(1)).flatten())
        preds = torch.full((self.n_images,), -1, dtype=torch.long)
        progress = _Progress(preds, plan, edit, [0, 0])
        if self.remember > 0:
            with self._lock:
                progress = self._memo.setdefault(key, progress)
                self._memo.move_to_end(key)
                while len(self._memo) > self.remember:
                    self._memo.popitem(last=False)
        return progress

    def _parts(self) -> list[tuple[int, int]]:
        """(first row, rows) of the clean and the triggered part."""
        n_clean = len(self.labels)
        return [(0, n_clean), (n_clean, self.n_images - n_clean)]

    @torch.no_grad()
    def _advance(self, progress: _Progress, detox: ThresholdDetox, deadline: float | None) -> None:
        """Compute more rows of ``progress``: all, or until the next step would end after
        ``deadline`` (``time.perf_counter()`` seconds); at least one step of each part."""
        largest = self.engine.chunk if self.engine is not None else self.batch_size
        # against a deadline, small steps first (a first answer soon), then larger ones
        step = largest if deadline is None else min(largest, max(32, largest // 8))
        parts = self._parts()
        while True:
            todo = [i for i, (_, n) in enumerate(parts) if progress.done[i] < n]
            if not todo:
                return
            # the part least done next, so both stay about equally far along
            i = min(todo, key=lambda j: progress.done[j] / parts[j][1])
            first, n = parts[i]
            rows = slice(first + progress.done[i], first + min(n, progress.done[i] + step))
            started = all(progress.done[j] > 0 for j, (_, m) in enumerate(parts) if m)
            if deadline is not None and started:
                ahead = progress.s_per_row * (rows.stop - rows.start)
                if time.perf_counter() + ahead > deadline:
                    return
            t0 = time.perf_counter()
            progress.preds[rows] = self._logits(progress, detox, rows).argmax(1).cpu()
            progress.s_per_row = (time.perf_counter() - t0) / (rows.stop - rows.start)
            progress.done[i] = rows.stop - first
            if all(progress.done[j] > 0 for j, (_, m) in enumerate(parts) if m):
                step = min(largest, 2 * step)

    def _logits(self, progress: _Progress, detox: ThresholdDetox, rows: slice) -> torch.Tensor:
        assert self.tail is not None
        if self.engine is not None:
            if progress.plan is None:  # nothing flagged (or blend 0): the teacher's own
                return self.engine.base_logits[rows]
            assert progress.edit is not None
            return self.engine.logits(progress.plan, progress.edit, rows)
        acts = self._acts[rows]  # not a 4-D map: re-run the tail on the detoxified rows
        mask = detox.mask.bool()
        if mask.any() and detox.blend > 0:
            acts = acts.clone()
            flagged = acts[:, mask]
            acts[:, mask] = flagged + detox.blend * (detox.clean_mean[mask] - flagged)
        return self.tail(acts)

    def _summary(self, progress: _Progress, flagged_units: int) -> Preview:
        (_, n_clean), (first_trig, n_trig) = self._parts()
        done_clean, done_trig = progress.done
        preds = progress.preds
        acc = float((preds[:done_clean] == self.labels[:done_clean]).float().mean())
        asr = None  # no triggered image outside the target class: undefined, as in evaluate
        if self.trigger_targets is not None and done_trig:
            hits = preds[first_trig : first_trig + done_trig] == self.trigger_targets[:done_trig]
            asr = float(hits.float().mean())
        n_triggered = done_trig if self.trigger_targets is not None else 0
        complete = done_clean == n_clean and done_trig == n_trig
        return Preview(acc, asr, flagged_units, done_clean, n_triggered, complete)


def auto_threshold(
    teacher: nn.Module,
    fit: ThresholdFit,
    validation: ImageDataset,
    max_acc_drop: float = 0.01,
    candidates: Sequence[float] | None = None,
) -> float:
    """The lowest threshold whose detoxified teacher keeps clean validation ACC within
    ``max_acc_drop`` of the undetoxified teacher's — chosen on the defender's validation
    data (no trigger, no test images); ``candidates`` default to multiples of the clean one.
    """
    from robustkd.analysis.metrics import evaluate

    if len(validation) == 0:
        raise ConfigError("The validation set is empty; give it at least one image.")
    base = evaluate(teacher, validation).acc
    model = view(teacher)  # the candidates' hooks go on a private view, never on the teacher
    default = max(f.default_threshold for f in fit.layers.values())
    grid = sorted(candidates or [default * f for f in (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)])
    for t in grid:
        with fit.detoxifier(t).attach(model):
            acc = evaluate(model, validation).acc
        if base - acc <= max_acc_drop:
            return float(t)
    raise ConfigError(
        f"No candidate threshold ({grid[0]:g} … {grid[-1]:g}) keeps the clean validation ACC "
        f"within {100 * max_acc_drop:g} points of the teacher's; allow a larger ACC drop or "
        "pick the threshold by hand."
    )
