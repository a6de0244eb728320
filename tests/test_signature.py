"""The trigger-signature screen: learned from the disputed samples, it finds the triggered
samples the teacher agrees with (its target class's own), on the shipped weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from robustkd.attacks import trigger_from_dict
from robustkd.attacks.poison import poison_dataset
from robustkd.data.datasets import ImageDataset, load_dataset
from robustkd.defenses.detox import fit_label_screen, split_halves
from robustkd.defenses.signature import MIN_EXAMPLES, fit_signature_screen
from robustkd.errors import ConfigError
from robustkd.models.checkpoints import DEFAULT_TEACHER, load_checkpoint

LEARNED = DEFAULT_TEACHER.parent / "examples" / "adaptive-learned.safetensors"


@pytest.fixture(scope="module")
def images() -> tuple[ImageDataset, ImageDataset]:
    test = load_dataset("fashion-mnist", "test")
    return test.subset(range(1000)), test.subset(range(1000, 3000))


@pytest.mark.parametrize("path", [LEARNED, DEFAULT_TEACHER], ids=["adaptive-learned", "badnets"])
def test_the_signature_of_the_disputed_samples_finds_the_target_class_own_triggered_ones(
    path, images
) -> None:
    """10 % of 2,000 images triggered, true labels kept: the label screen withholds those the
    teacher turns to the target; the signature learned from them finds the triggered images
    *of the target class* (which the label screen cannot see: the teacher agrees with their
    label) and leaves clean images of that class alone."""
    trusted, pool = images
    model, meta = load_checkpoint(path)
    trigger, target = trigger_from_dict(meta["trigger"]), meta["target"]
    mixed = poison_dataset(pool, trigger, 0.1, target, keep_labels=True, seed=0)
    labels = fit_label_screen(model, split_halves(trusted, 0)[1])
    disputed = labels.flags(model, mixed.dataset)
    examples = mixed.dataset.subset(torch.nonzero(disputed).flatten())
    screen = fit_signature_screen(model, trusted, examples)
    assert screen is not None and screen.examples == int(disputed.sum())
    triggered = mixed.poisoned_mask
    flags = screen.flags(model, mixed.dataset)
    assert int((flags & triggered).sum()) >= 0.95 * int(triggered.sum())
    assert int((flags & ~triggered).sum()) <= 0.03 * int((~triggered).sum())
    # the target class, all of it triggered and all of it clean
    own = pool.subset(torch.nonzero(pool.labels == target).flatten())
    stamped = poison_dataset(own, trigger, 1.0, target, keep_labels=True, seed=0).dataset
    assert float(labels.flags(model, stamped).float().mean()) < 0.1  # the teacher agrees
    assert float(screen.flags(model, stamped).float().mean()) >= 0.9
    assert float(screen.flags(model, own).float().mean()) <= 0.05


def test_too_few_examples_give_no_signature_and_unlabelled_samples_are_never_flagged(
    images,
) -> None:
    trusted, pool = images
    model, _ = load_checkpoint(DEFAULT_TEACHER)
    few = pool.subset(range(MIN_EXAMPLES - 1))
    assert fit_signature_screen(model, trusted, few) is None
    screen = fit_signature_screen(model, trusted, pool.subset(range(200)))
    assert screen is not None
    unlabelled = dataclasses.replace(pool.subset(range(50)), labels=torch.full((50,), -1))
    assert not bool(screen.flags(model, unlabelled).any())
    assert fit_signature_screen(model, trusted, unlabelled) is None  # no labelled example
    # a class the trusted set has no image of (the last one, so the highest label): its
    # samples are never flagged, and nothing fails
    no_boots = trusted.subset(torch.nonzero(trusted.labels != 9).flatten())
    examples = pool.subset(torch.nonzero(pool.labels != 9).flatten()[:200])
    partial = fit_signature_screen(model, no_boots, examples)
    assert partial is not None and not bool(partial.present[9]) and len(partial.present) == 10
    boots = pool.subset(torch.nonzero(pool.labels == 9).flatten())
    assert not bool(partial.scores(model, boots).any())


def test_signature_mistakes_say_one_sentence(images) -> None:
    trusted, pool = images
    model, _ = load_checkpoint(DEFAULT_TEACHER)
    screen = fit_signature_screen(model, trusted, pool.subset(range(100)))
    assert screen is not None
    wrong = dataclasses.replace(pool.subset(range(10)), labels=torch.full((10,), 12))
    with pytest.raises(ConfigError, match="labels up to 12") as info:
        screen.scores(model, wrong)
    assert "\n" not in str(info.value)
    unlabelled_trusted = dataclasses.replace(
        trusted.subset(range(100)), labels=torch.full((100,), -1)
    )
    with pytest.raises(ConfigError, match="unlabelled"):
        fit_signature_screen(model, unlabelled_trusted, pool.subset(range(100)))
    with pytest.raises(ConfigError, match="quantile"):
        fit_signature_screen(model, trusted, pool.subset(range(100)), quantile=1.0)
