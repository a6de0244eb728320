"""Baselines without a defence: a student trained from scratch, logit KD and plain feature KD."""

from __future__ import annotations

from robustkd.defenses.base import Context, Recipe, StudentMethod, register_method


@register_method
class Scratch(StudentMethod):
    """The student trained with cross-entropy only, never reading the teacher: the ASR floor."""

    name = "scratch"
    description = "student, cross-entropy only"
    order = 10

    def recipe(self, ctx: Context) -> Recipe:
        """Cross-entropy only: every teacher loss weighted 0."""
        return Recipe(ctx.teacher)


@register_method
class LogitKD(StudentMethod):
    """Hinton's KD from the teacher's logits, plus cross-entropy."""

    name = "logit-kd"
    description = "student, Hinton KD + CE"
    order = 20
    options = ("logit_weight", "temperature")

    def recipe(self, ctx: Context) -> Recipe:
        """Logit KD at the configured temperature and weight."""
        return Recipe(ctx.teacher, logit_weight=ctx.config.logit_weight)


@register_method
class FeatureKD(StudentMethod):
    """Plain KD (overhaul feature KD + logit KD + CE, no defence): every defence's reference."""

    name = "feature-kd"
    description = "student, plain KD: feature + logit KD + CE, no defence"
    order = 30
    options = ("layers", "logit_weight", "temperature", "feature_weight", "variance_weight")

    def recipe(self, ctx: Context) -> Recipe:
        """Feature and logit KD from the teacher as it is."""
        c = ctx.config
        return Recipe(ctx.teacher, logit_weight=c.logit_weight, feature_weight=c.feature_weight)
