"""Defences of the teacher itself on the trusted set: the result is a repaired teacher, not a
compressed student."""

from __future__ import annotations

import copy

from robustkd.defenses.base import Context, Method, Trained, register_method
from robustkd.training.distill import fine_prune, fine_tune

FINETUNE_OPTIONS = ("finetune_epochs", "finetune_lr", "finetune_batch_size")


@register_method
class FineTuning(Method):
    """The teacher fine-tuned on the defender's trusted clean set."""

    name = "fine-tuning"
    description = "teacher fine-tuned on the trusted set"
    order = 70
    produces = "teacher"
    options = FINETUNE_OPTIONS

    def train(self, ctx: Context) -> Trained:
        """Fine-tune a copy of the teacher."""
        model = copy.deepcopy(ctx.teacher)
        history = fine_tune(
            model, ctx.scenario.trusted, ctx.config, ctx.scenario, ctx.progress, ctx.state_path()
        )
        return Trained(model, history)


@register_method
class FinePruning(Method):
    """Fine-pruning (Liu et al. 2018): the last stage's least active channels pruned, fine-tuned."""

    name = "fine-pruning"
    description = "teacher pruned (last stage) and fine-tuned on the trusted set"
    order = 80
    produces = "teacher"
    options = ("prune_max_acc_drop", *FINETUNE_OPTIONS)

    def train(self, ctx: Context) -> Trained:
        """Prune a copy of the teacher, then fine-tune it."""
        model, history, pruned = fine_prune(
            ctx.teacher, ctx.scenario, ctx.config, ctx.progress, ctx.state_path()
        )
        return Trained(model, history, {"pruned_channels": pruned})
