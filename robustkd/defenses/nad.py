"""NAD (Li et al. 2021): attention distillation from the teacher fine-tuned on the trusted set."""

from __future__ import annotations

import copy

from robustkd.defenses.base import Context, Recipe, StudentMethod, register_method
from robustkd.training.distill import fine_tune


@register_method
class NAD(StudentMethod):
    """The student imitates the attention maps of the teacher fine-tuned on clean data."""

    name = "nad"
    description = "student, attention distillation from the fine-tuned teacher"
    order = 60
    options = ("layers", "nad_weight", "finetune_epochs", "finetune_lr", "finetune_batch_size")

    def recipe(self, ctx: Context) -> Recipe:
        """Fine-tune a copy of the teacher (once per comparison) and distil its attention."""
        if "nad_teacher" not in ctx.shared:
            tuned = copy.deepcopy(ctx.teacher)
            fine_tune(
                tuned,
                ctx.scenario.trusted,
                ctx.config,
                ctx.scenario,
                state_path=ctx.state_path("-teacher"),
            )
            ctx.shared["nad_teacher"] = tuned.eval()
        return Recipe(ctx.shared["nad_teacher"], nad_weight=ctx.config.nad_weight)
