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
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

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


def fit_screen(
    teacher: nn.Module, fit: ThresholdFit, threshold: float | None = None, quantile: float = 0.99
) -> SampleScreen:
    """A sample screen on the units flagged at ``threshold``, calibrated on trusted half B."""
    if not 0.5 <= quantile < 1:
        raise ConfigError(f"The screening quantile must lie in [0.5, 1); got {quantile}.")
    masks = {n: f.mask(threshold) for n, f in fit.layers.items()}
    means = {n: f.reference.unit_mean for n, f in fit.layers.items()}
    stds = {n: f.reference.unit_var.clamp_min(1e-8).sqrt() + 1e-3 for n, f in fit.layers.items()}
    screen = SampleScreen(masks, means, stds, float("inf"), quantile)
    if screen.active:
        clean = screen.scores(teacher, fit.calibration)
        screen.threshold = float(torch.quantile(clean.double(), quantile))
    return screen


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


@dataclasses.dataclass(frozen=True)
class Preview:
    acc: float
    asr: float | None
    flagged_units: int
    n_clean: int
    n_triggered: int


class DetoxPreview:
    """ACC/ASR of the threshold-detoxified teacher at one layer, from cached activations.

    The layer's activations on the clean and triggered evaluation images are computed once;
    each call re-runs only the rest of the network (see ``features.tail_from``). ``mode`` is
    the attack's (``all-to-one`` or ``all-to-all``, as ``metrics.backdoor_targets``). The
    preview keeps a private view of the teacher (``sharing.view``) and never hooks it, so one
    preview may serve several callers at once.
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
    ) -> None:
        from robustkd.analysis.features import activations, tail_from
        from robustkd.analysis.metrics import backdoor_targets

        if layer not in fit.layers:
            raise ConfigError(
                f"Layer {layer!r} was not scored; choose one of: {', '.join(fit.layers)}."
            )
        self.fit = fit.layers[layer]
        self.teacher, self.layer, self.batch_size = view(teacher), layer, batch_size
        self.mode = mode
        self.tail = tail_from(self.teacher, layer)
        self.labels = data.labels.cpu()
        self.clean = activations(self.teacher, data, layer)
        self.triggered = None
        self.trigger_targets = None
        if trigger is not None and target is not None:
            targets = backdoor_targets(self.labels, target, mode, data.num_classes)
            keep = torch.nonzero(self.labels != targets).flatten()
            self.trigger_targets = targets[keep]
            if len(keep):  # none when every image is of the target class: ASR 0, as evaluate
                self.triggered = activations(self.teacher, data.subset(keep), layer, trigger)
        # without a target there is no ASR (as on the fast path), so no trigger either
        self._data, self._target = data, target
        self._trigger = trigger if self.trigger_targets is not None else None

    def _stack(self) -> torch.Tensor:
        """Clean and triggered activations in one channels_last tensor (built once)."""
        if getattr(self, "_acts", None) is None:
            parts = [self.clean] + ([self.triggered] if self.triggered is not None else [])
            acts = torch.cat(parts)
            if acts.dim() == 4:  # oneDNN convolutions run faster on channels_last on CPU
                # (only the activations: the tail's weights are the teacher's own, shared with
                # every other user of the model, and stay as they are)
                acts = acts.contiguous(memory_format=torch.channels_last)
            self._acts = acts
        return self._acts

    @torch.no_grad()
    def _predict(self, detox: ThresholdDetox) -> torch.Tensor:
        """Predictions for every cached image (clean first, then triggered)."""
        acts = self._stack()
        mask = detox.mask.bool()
        if mask.any() and detox.blend > 0:  # only the flagged units change: touch only them
            acts = acts.clone(memory_format=torch.preserve_format)
            flagged = acts[:, mask]
            acts[:, mask] = flagged + detox.blend * (detox.clean_mean[mask] - flagged)
        preds = [
            self.tail(acts[start : start + self.batch_size]).argmax(1)
            for start in range(0, acts.shape[0], self.batch_size)
        ]
        return torch.cat(preds)

    def __call__(self, threshold: float | None = None, blend: float = 1.0) -> Preview:
        check_threshold(threshold)
        detox = ThresholdDetox(self.fit.mask(threshold), self.fit.clean_mean, blend)
        if self.tail is None:  # untraceable model: full forward passes with the hook attached
            from robustkd.analysis.metrics import evaluate

            d = Detoxifier({self.layer: detox}, "threshold")
            model = view(self.teacher)  # per call: other callers may preview at the same time
            with d.attach(model):
                ev = evaluate(model, self._data, self._trigger, self._target, self.mode)
            return Preview(ev.acc, ev.asr, detox.flagged, ev.n_clean, ev.n_triggered)
        preds = self._predict(detox)
        n_clean = int(self.clean.shape[0])
        acc = float((preds[:n_clean] == self.labels).float().mean())
        asr = None
        n_trig = 0
        if self.trigger_targets is not None:
            n_trig = int(self.trigger_targets.shape[0])
            # no triggered image outside the target class: undefined, as in evaluate
            if self.triggered is not None and n_trig:
                asr = float((preds[n_clean:] == self.trigger_targets).float().mean())
        return Preview(acc, asr, detox.flagged, int(self.clean.shape[0]), n_trig)


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
