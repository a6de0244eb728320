"""``robustkd``, our default recipe: KD from the threshold-detoxified teacher, samples screened.

Units whose variance on the distillation data exceeds the clean-halves threshold are replaced
by their trusted clean mean at every stage, and samples deviating on those units get
cross-entropy only (or are dropped, ``screen_policy``). With labelled data (``screen_labels``)
so do samples whose own label the teacher disputes more than it does on trusted clean images,
and samples that the same variance screen, run within their labelled class, finds deviating:
an adaptive trigger held inside the clean range of all images together hides from neither.
Last, samples whose deviation from their own class's trusted mean points the way the disputed
samples' does (``defenses.signature``): the target class's own triggered samples, which the
teacher agrees with, and a trigger held inside every class's range too.
"""

from __future__ import annotations

from typing import Any

import torch

from robustkd.defenses.base import Context, Recipe, StudentMethod, register_method
from robustkd.defenses.detox import (
    fit_label_screen,
    fit_screen,
    fit_threshold,
    screen_within_classes,
)
from robustkd.defenses.signature import fit_signature_screen
from robustkd.training.distill import screen_report


@register_method
class VarianceDetox(StudentMethod):
    """Feature + logit KD from the teacher detoxified by the variance threshold, screened."""

    name = "robustkd"
    description = "student, KD from the threshold-detoxified teacher + sample screening"
    order = 40
    options = (
        "layers",
        "threshold",
        "granularity",
        "blend",
        "screen",
        "screen_policy",
        "screen_quantile",
        "screen_labels",
        "logit_weight",
        "temperature",
        "feature_weight",
        "variance_weight",
        "noise_rate",
    )

    def recipe(self, ctx: Context) -> Recipe:
        """Fit the threshold (once per comparison), detoxify, and screen the samples."""
        teacher, scenario, config = ctx.teacher, ctx.scenario, ctx.config
        if "fit" not in ctx.shared:
            ctx.shared["fit"] = fit_threshold(
                teacher,
                scenario.trusted,
                scenario.distill,
                config.layers,
                config.granularity,
                config.seed,
            )
        fit = ctx.shared["fit"]
        detox = fit.detoxifier(config.threshold, config.blend)
        extra: dict[str, Any] = {}
        screen_scores = withheld = None
        if config.screen:
            screen = fit_screen(teacher, fit, config.threshold, config.screen_quantile)
            screen_scores = screen.scores(teacher, scenario.distill)
            withheld = screen_scores > screen.threshold
            if config.screen_labels and scenario.distill.labelled:
                labels = fit_label_screen(teacher, fit.calibration, config.screen_quantile)
                disputed = labels.flags(teacher, scenario.distill)
                within, per_class = screen_within_classes(
                    teacher,
                    scenario.trusted,
                    scenario.distill,
                    config.layers,
                    config.granularity,
                    config.seed,
                    config.threshold,
                    config.screen_quantile,
                )
                # what the disputed samples share, looked for in those the teacher agrees with
                # (the target class's own triggered samples)
                signature = fit_signature_screen(
                    teacher,
                    scenario.trusted,
                    scenario.distill.subset(torch.nonzero(disputed).flatten()),
                    config.layers,
                    config.seed,
                    config.screen_quantile,
                )
                shared = torch.zeros_like(disputed)
                if signature is not None:
                    shared = signature.flags(teacher, scenario.distill)
                by_labels = disputed | within | shared
                extra["label_screen"] = {
                    "threshold": labels.threshold,
                    "disputed": int(disputed.sum()),
                    "within_classes": int(within.sum()),
                    "signature": int(shared.sum()),
                    "signature_examples": signature.examples if signature is not None else 0,
                    "only_by_labels": int((by_labels & ~withheld).sum()),
                    **per_class,
                }
                withheld = withheld | by_labels
            extra.update(screen_report(withheld, scenario.poisoned_mask, screen.threshold))
        extra["flagged_units"] = fit.flagged_units(config.threshold)
        extra["thresholds"] = fit.thresholds(config.threshold)
        return Recipe(
            teacher,
            logit_weight=config.logit_weight,
            feature_weight=config.feature_weight,
            noise_rate=config.noise_rate if config.noise_rate is not None else 0.0,
            detoxifier=detox,
            withheld=withheld,
            screen_scores=screen_scores,
            extra=extra,
        )
