"""The trigger-signature screen: what the disputed samples have in common, looked for in all.

The label screen (``LabelScreen``) catches the triggered samples whose label the teacher
disputes, but not those of the backdoor's own target class: their label is the one the
trigger asks for, so the teacher agrees, and plain feature KD on them still teaches the
trigger. An attacker can also hold each triggered image inside its own class's per-unit
range (``adaptive`` with ``scope="class"``), so that no single unit stands out, not even
within a class. What such a trigger cannot hide is that it moves every triggered image the
same way: the disputed samples, expressed as per-unit deviations from the trusted mean of
their *labelled* class, share a direction. This screen learns that direction from the disputed
samples (the signature) and withholds every sample whose own-class deviation projects onto it
more than trusted clean images do (the same quantile as the other screens, calibrated on the
other trusted half).

Statistics: trusted half A gives the per-class mean of every unit and a pooled within-class
standard deviation; half B calibrates each layer's projection (centre and spread) and the
threshold on the mean over layers. Unlabelled samples get score 0 (never withheld here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from robustkd.analysis.features import layer_outputs, resolve_layers
from robustkd.data.datasets import ImageDataset
from robustkd.defenses.detox import _check_quantile, split_halves
from robustkd.errors import ConfigError

#: fewer disputed samples than this give no signature (the screen is skipped and says so)
MIN_EXAMPLES = 20


def _labels(data: ImageDataset) -> torch.Tensor:
    return data.labels.cpu().long()


def _by_batch(
    model: nn.Module, data: ImageDataset, names: Sequence[str]
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Each batch's flattened float outputs of ``names`` (on the CPU), with its labels."""
    labels, start = _labels(data), 0
    for out in layer_outputs(model, data, names):
        flat = {n: out[n].float().cpu().flatten(1) for n in names}
        rows = labels[start : start + len(next(iter(flat.values())))]
        start += len(rows)
        yield flat, rows


@torch.no_grad()
def _class_moments(
    model: nn.Module, data: ImageDataset, names: Sequence[str], classes: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Per layer: the mean of every unit per class ``(classes, units)`` and the pooled
    within-class standard deviation ``(units,)`` (floored like the variance score); and
    which classes have at least two images to take a mean from."""
    sums: dict[str, torch.Tensor] = {}  # per class × unit
    squares: dict[str, torch.Tensor] = {}  # per unit: the pooled variance needs no more
    for flat, rows in _by_batch(model, data, names):
        for n in names:
            a = flat[n].double()
            if n not in sums:
                sums[n] = a.new_zeros((classes, a.shape[1]))
                squares[n] = a.new_zeros(a.shape[1])
            sums[n].index_add_(0, rows, a)
            squares[n] += (a * a).sum(0)
    count = torch.bincount(_labels(data), minlength=classes).double()[:, None]
    means, stds = {}, {}
    for n in names:
        mu = sums[n] / count.clamp(min=1)
        # within-class sum of squares: Σ x² − Σ_c n_c μ_c²
        within = (squares[n] - (count * mu * mu).sum(0)).clamp(min=0)
        var = within / max(1.0, float(count.sum()) - int((count > 0).sum()))
        # the same floor as variance_score: silent units do not explode the deviations
        stds[n] = (var + 0.1 * var.mean()).sqrt().float() + 1e-6
        means[n] = mu.float()
    return means, stds, count[:, 0] >= 2


@dataclasses.dataclass
class SignatureScreen:
    """Samples whose deviation from their own class's trusted mean points the way the
    disputed samples' does; ``threshold`` on the mean over layers of each layer's projection,
    standardised on trusted half B."""

    layers: list[str]
    class_means: dict[str, torch.Tensor]  # (classes, units), trusted half A
    stds: dict[str, torch.Tensor]  # (units,), pooled within-class, trusted half A
    directions: dict[str, torch.Tensor]  # (units,), unit length: the signature
    present: torch.Tensor  # (classes,) bool: classes with a trusted mean (others score 0)
    centres: dict[str, float]  # each layer's projection on trusted half B: mean
    spreads: dict[str, float]  # ... and standard deviation
    threshold: float
    quantile: float
    examples: int  # the disputed samples the signature was learned from

    @torch.no_grad()
    def _projections(self, model: nn.Module, data: ImageDataset) -> dict[str, torch.Tensor]:
        """Each labelled sample's own-class z-vector projected on the signature, per layer."""
        labels = _labels(data)
        known = self._known(labels)
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}
        for flat, rows in _by_batch(model, data, self.layers):
            rows = rows.clamp(min=0)
            for n in self.layers:
                z = (flat[n] - self.class_means[n][rows]) / self.stds[n]
                parts[n].append(z @ self.directions[n])
        return {n: torch.where(known, torch.cat(p), torch.zeros(())) for n, p in parts.items()}

    def _known(self, labels: torch.Tensor) -> torch.Tensor:
        """Which samples carry a label whose class has a trusted mean."""
        classes = len(self.present)
        labelled = labels >= 0
        if labelled.any() and int(labels[labelled].max()) >= classes:
            raise ConfigError(
                f"These images have labels up to {int(labels[labelled].max())}, but the "
                f"trusted set has {classes} classes; give data labelled with the teacher's "
                "classes."
            )
        return labelled & self.present[labels.clamp(min=0)]

    def scores(self, model: nn.Module, data: ImageDataset) -> torch.Tensor:
        """Mean over layers of the standardised projection (0 for unlabelled samples and for
        classes the trusted set has no mean of)."""
        proj = self._projections(model, data)
        total = sum((proj[n] - self.centres[n]) / self.spreads[n] for n in self.layers)
        known = self._known(_labels(data))
        return torch.where(known, total / len(self.layers), torch.zeros(()))

    def flags(self, model: nn.Module, data: ImageDataset) -> torch.Tensor:
        return self.scores(model, data) > self.threshold


def fit_signature_screen(
    teacher: nn.Module,
    trusted: ImageDataset,
    examples: ImageDataset,
    layers: str | Sequence[str] | None = None,
    seed: int = 0,
    quantile: float = 0.99,
    min_examples: int = MIN_EXAMPLES,
) -> SignatureScreen | None:
    """The signature of ``examples`` (the disputed samples, with their own labels) against
    the labelled trusted set; None when there are fewer than ``min_examples`` of them."""
    _check_quantile(quantile)
    if int((_labels(examples) >= 0).sum()) < min_examples:
        return None
    if bool((_labels(trusted) < 0).any()):
        raise ConfigError("The trusted clean set has unlabelled images; label every one of them.")
    names = resolve_layers(teacher, layers)
    half_a, half_b = split_halves(trusted, seed)
    # every class the data name (a class the trusted set lacks gets no mean, and scores 0)
    labelled_max = max(int(_labels(trusted).max()), int(_labels(examples).max())) + 1
    classes = max(trusted.num_classes, examples.num_classes, labelled_max)
    means, stds, present = _class_moments(teacher, half_a, names, classes)
    # the examples whose class has a trusted mean to deviate from
    labels = _labels(examples)
    examples = examples.subset(
        torch.nonzero((labels >= 0) & present[labels.clamp(min=0)]).flatten()
    )
    if len(examples) < min_examples:
        return None
    # the signature: the disputed samples' mean own-class z-vector, per layer
    sums = {n: torch.zeros_like(stds[n]) for n in names}
    with torch.no_grad():
        for flat, rows in _by_batch(teacher, examples, names):
            for n in names:
                sums[n] += ((flat[n] - means[n][rows]) / stds[n]).sum(0)
    directions = {n: s / s.norm().clamp(min=1e-12) for n, s in sums.items()}
    screen = SignatureScreen(
        names, means, stds, directions, present, {}, {}, float("inf"), quantile, len(examples)
    )
    clean = screen._projections(teacher, half_b)
    for n in names:
        screen.centres[n] = float(clean[n].mean())
        screen.spreads[n] = float(clean[n].std()) + 1e-6
    calibrated = screen.scores(teacher, half_b)
    screen.threshold = float(torch.quantile(calibrated.double(), quantile))
    return screen
