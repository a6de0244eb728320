"""``robustkd-reverse``: RobustKD, and a student taught to ignore triggers reversed from a teacher.

An attack built to survive distillation (the ``adba`` recipe) needs no triggered image in the
distillation data: the teacher's soft labels on clean images teach the student its trigger.
Then there is nothing for the variance to see — the distillation data are as clean as the
trusted set — and ``robustkd`` is plain KD. What the defender can still do is question the
teacher. For every class ``c`` a blend trigger (a pattern and a soft mask in [0,
``reverse_max_mask``], the optimised blend attack's form) is learned on the trusted images so
that the teacher answers ``c`` on the images it gives another class (a trigger reversal in the
manner of Neural Cleanse, one per class, all at once). During distillation a share
``reverse_share`` of each batch reaches the student stamped with one of those triggers, drawn
at random, while the teacher, its logits and its features read the image clean and the label
stays the image's own: the student is taught to answer a stamped image as the teacher answers
the clean one, so a trigger the reversal comes near is one the student learns to ignore. The
threshold, the detoxification and the screens are ``robustkd``'s.
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustkd.analysis.metrics import predict
from robustkd.atomic import atomic_write
from robustkd.attacks.optimized_blend import fit_blends
from robustkd.data.datasets import ImageDataset, to_float
from robustkd.defenses.base import Context, Recipe, register_method
from robustkd.defenses.variance_detox import VarianceDetox
from robustkd.errors import ConfigError, DataError
from robustkd.training.device import resolve_device

# ten triggers are learned in one batch of ten times the images; a thousand would not fit
MAX_CLASSES = 100
# a saved set of reversed triggers, unpacked: 100 classes of 3×224×224 float32 is 77 MB
MAX_FILE_BYTES = 256 * 2**20


@dataclasses.dataclass
class ReversedTriggers:
    """One blend trigger per class, learned to turn the teacher's answer to that class."""

    patterns: torch.Tensor  # (K, C, H, W) in [0, 1]
    masks: torch.Tensor  # (K, 1, H, W) in [0, max_mask]
    flip_rates: list[float]  # per class: trusted images of other classes the teacher then calls it
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def summary(self) -> list[dict[str, Any]]:
        """Per class: the share of trusted images the trigger turns, and its mask's mean."""
        return [
            {"target": k, "flip_rate": round(f, 4), "mask_mean": round(float(m.mean()), 4)}
            for k, (f, m) in enumerate(zip(self.flip_rates, self.masks, strict=True))
        ]

    def save(self, path: str | Path) -> Path:
        """Patterns, masks, flip rates and normalisation as an ``.npz`` (no pickles), atomically."""
        arrays = {
            "patterns": self.patterns.detach().cpu().float().numpy(),
            "masks": self.masks.detach().cpu().float().numpy(),
            "flip_rates": np.asarray(self.flip_rates, dtype=np.float32),
            "mean": np.asarray(self.mean, dtype=np.float32),
            "std": np.asarray(self.std, dtype=np.float32),
        }
        return atomic_write(path, lambda fh: np.savez(fh, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> ReversedTriggers:
        """What ``save`` wrote; anything else is refused in one sentence (a run folder is
        untrusted input: every array's dtype, shape and range is checked)."""
        name = Path(path).name
        keys = ("patterns", "masks", "flip_rates", "mean", "std")
        try:
            with zipfile.ZipFile(path) as z:  # sizes first: nothing huge is unpacked
                if sum(i.file_size for i in z.infolist()) > MAX_FILE_BYTES:
                    raise ValueError("too large")
            with np.load(path, allow_pickle=False) as npz:
                a = {k: np.asarray(npz[k]) for k in keys}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(
                f"{name} is missing or is not a file of reversed triggers ({type(exc).__name__}); "
                "run robustkd-reverse again to write it."
            ) from exc
        p, m, f = a["patterns"], a["masks"], a["flip_rates"]
        ok = (
            all(v.dtype == np.float32 for v in a.values())
            and p.ndim == 4
            and 1 <= len(p) <= MAX_CLASSES
            and m.shape == (len(p), 1, *p.shape[2:])
            and f.shape == (len(p),)
            and a["mean"].shape == a["std"].shape == (p.shape[1],)
            and all(np.isfinite(v).all() for v in a.values())
            and 0 <= p.min() <= p.max() <= 1
            and 0 <= m.min() <= m.max() <= 1
            and 0 <= f.min() <= f.max() <= 1
            and bool((a["std"] > 0).all())
        )
        if not ok:
            raise DataError(
                f"{name} holds arrays of the wrong type, shape or range for reversed triggers; "
                "run robustkd-reverse again to write it."
            )
        return cls(
            torch.from_numpy(p),
            torch.from_numpy(m),
            [float(v) for v in f],
            tuple(float(v) for v in a["mean"]),
            tuple(float(v) for v in a["std"]),
        )

    def pictures(self) -> np.ndarray:
        """Per class, what its trigger adds to a black image (mask × pattern), each scaled to
        its own brightest pixel so that a faint one shows: uint8, (K, H, W, C)."""
        added = (self.masks * self.patterns).detach().cpu().float()
        peak = added.flatten(1).amax(1).clamp(min=1e-8).view(-1, 1, 1, 1)
        scaled = (added / peak * 255).round().clamp(0, 255).to(torch.uint8)
        return scaled.permute(0, 2, 3, 1).numpy()

    def stamp(self, pixels: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """``pixels`` (in [0, 1]) stamped, row ``i`` with trigger ``which[i]``."""
        m = self.masks.to(pixels.device, pixels.dtype)[which]
        p = self.patterns.to(pixels.device, pixels.dtype)[which]
        return (1 - m) * pixels + m * p


def reverse_triggers(
    teacher: nn.Module,
    trusted: ImageDataset,
    max_mask: float = 0.2,
    steps: int = 100,
    lr: float = 0.1,
    batch_size: int = 64,
    seed: int = 0,
) -> ReversedTriggers:
    """For every class, a blend trigger (mask ≤ ``max_mask``) learned on ``trusted`` so that
    ``teacher`` answers that class on the images it gives another; labels are not needed (the
    teacher's own answers on the clean images say which images count)."""
    if len(trusted) < 2:
        raise ConfigError("Reversing triggers needs a trusted set of at least 2 images.")
    device = next(teacher.parameters()).device
    images = to_float(trusted.images).to(device)
    teacher.eval()
    # the teacher's own classes (a teacher trained elsewhere may answer more than the data name)
    probs = predict(teacher, images, trusted.mean, trusted.std, return_probs=True)
    answers, k = probs.argmax(1).to(device), int(probs.shape[1])
    if k > MAX_CLASSES:
        raise ConfigError(
            f"robustkd-reverse learns one trigger per class, at most {MAX_CLASSES}; this teacher "
            f"answers {k} classes. Use robustkd for it."
        )
    classes = torch.arange(k, device=device)

    def objective(inputs: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
        logits = teacher(inputs)
        targets = classes.repeat_interleave(len(pick))
        ce = F.cross_entropy(logits, targets, reduction="none").view(k, len(pick))
        # only the images the teacher gives another class count toward each trigger
        others = (answers[pick.to(device)][None, :] != classes[:, None]).float()
        return ((ce * others).sum(1) / others.sum(1).clamp(min=1)).sum()

    g = torch.Generator().manual_seed(seed)
    patterns, masks, _ = fit_blends(
        teacher, images, trusted.mean, trusted.std, objective, k, max_mask, steps, lr,
        batch_size, g,
    )  # fmt: skip
    triggers = ReversedTriggers(patterns, masks, [], tuple(trusted.mean), tuple(trusted.std))
    for c in range(k):
        rest = images[answers != c]
        if len(rest) == 0:
            triggers.flip_rates.append(0.0)
            continue
        which = torch.full((len(rest),), c, dtype=torch.long, device=device)
        stamped = triggers.stamp(rest, which)
        turned = predict(teacher, stamped, trusted.mean, trusted.std) == c
        triggers.flip_rates.append(float(turned.float().mean()))
    return triggers


class TriggerStamp:
    """The student's input during distillation: each row, with probability ``share``, stamped
    with one of the reversed triggers drawn at random (inputs and outputs normalised)."""

    def __init__(self, triggers: ReversedTriggers, share: float, seed: int) -> None:
        self.triggers = triggers
        self.share = share
        self._gen = torch.Generator().manual_seed(seed)
        self._norm = (
            torch.tensor(triggers.mean).view(1, -1, 1, 1),
            torch.tensor(triggers.std).view(1, -1, 1, 1),
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        rows = (torch.rand(n, generator=self._gen) < self.share).to(x.device)
        which = torch.randint(len(self.triggers.masks), (n,), generator=self._gen).to(x.device)
        mean, std = (t.to(x.device, x.dtype) for t in self._norm)
        stamped = (self.triggers.stamp(x * std + mean, which) - mean) / std
        return torch.where(rows[:, None, None, None], stamped, x)


@register_method
class ReverseDetox(VarianceDetox):
    """``robustkd``, with the student taught to ignore the triggers reversed from the teacher."""

    name = "robustkd-reverse"
    description = "student, robustkd + consistency on triggers reversed from the teacher"
    order = 45
    options = (*VarianceDetox.options, "reverse_max_mask", "reverse_steps", "reverse_share")

    def recipe(self, ctx: Context) -> Recipe:
        """``robustkd``'s recipe, the reversal (once per comparison) and the stamped inputs."""
        recipe = super().recipe(ctx)
        config = ctx.config
        if "reversed" not in ctx.shared:
            ctx.teacher.to(resolve_device(config.device))
            ctx.shared["reversed"] = reverse_triggers(
                ctx.teacher,
                ctx.scenario.trusted,
                config.reverse_max_mask,
                config.reverse_steps,
                seed=config.seed,
            )
        triggers: ReversedTriggers = ctx.shared["reversed"]
        recipe.student_input = TriggerStamp(triggers, config.reverse_share, config.seed + 11)
        recipe.found = triggers  # kept in the run folder (METHOD-triggers.npz), shown by the app
        recipe.extra["reversed_triggers"] = triggers.summary()
        return recipe
