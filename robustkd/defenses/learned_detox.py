"""``robustkd-paper``, the paper's recipe: a learned detox mask, feature KD, noisy inputs."""

from __future__ import annotations

from robustkd.defenses.base import Context, Recipe, StudentMethod, register_method
from robustkd.defenses.detox import fit_learned

PAPER_NOISE_RATE = 0.1  # salt-and-pepper on the student's input, unless the user sets one


@register_method
class LearnedDetox(StudentMethod):
    """Learned detox mask (τ) on the trusted set + feature KD + cross-entropy, noisy inputs."""

    name = "robustkd-paper"
    description = "student, learned detox mask + feature KD + salt-and-pepper noise"
    order = 50
    options = ("layers", "tau", "learned_epochs", "feature_weight", "variance_weight", "noise_rate")

    def recipe(self, ctx: Context) -> Recipe:
        """Learn the detox mask on the trusted set, then distil features through it."""
        config = ctx.config
        detox = fit_learned(
            ctx.teacher,
            ctx.scenario.trusted,
            config.layers,
            config.tau,
            epochs=config.learned_epochs,
            seed=config.seed,
        )
        noise = config.noise_rate if config.noise_rate is not None else PAPER_NOISE_RATE
        return Recipe(
            ctx.teacher, feature_weight=config.feature_weight, noise_rate=noise, detoxifier=detox
        )
