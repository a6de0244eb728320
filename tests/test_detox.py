"""Feature detoxification (threshold and learned), sample screening, previews, auto-threshold."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from robustkd.analysis.features import activations, feature_stats, variance_score
from robustkd.analysis.metrics import Evaluation, backdoor_targets, evaluate
from robustkd.attacks import Trigger, create_trigger
from robustkd.attacks.poison import Poisoning, poison_dataset
from robustkd.data.datasets import ImageDataset
from robustkd.defenses.detox import (
    Detoxifier,
    DetoxPreview,
    LearnedDetox,
    ThresholdDetox,
    ThresholdFit,
    auto_threshold,
    fit_label_screen,
    fit_learned,
    fit_screen,
    fit_threshold,
    screen_within_classes,
    split_halves,
    stratified_order,
)
from robustkd.errors import CheckpointError, ConfigError
from robustkd.models.checkpoints import load_checkpoint

TARGET = 0


@pytest.fixture(scope="module")
def teacher(tiny_teacher: Path) -> nn.Module:
    model, _ = load_checkpoint(tiny_teacher)
    return model


@pytest.fixture(scope="module")
def trigger() -> Trigger:
    return create_trigger("badnets", size=3)  # the tiny teacher's trigger (bottom-right)


@pytest.fixture(scope="module")
def trusted(small_train: ImageDataset) -> ImageDataset:
    return small_train.subset(range(300))


@pytest.fixture(scope="module")
def clean_suspect(small_train: ImageDataset) -> ImageDataset:
    """Clean images disjoint from the trusted set."""
    return small_train.subset(range(300, 600))


@pytest.fixture(scope="module")
def poisoning(small_test: ImageDataset, trigger: Trigger) -> Poisoning:
    """300 distillation images, 30 % of them carrying the trigger (labels kept)."""
    return poison_dataset(small_test, trigger, 0.3, TARGET, keep_labels=True, seed=0)


@pytest.fixture(scope="module")
def fit(teacher: nn.Module, trusted: ImageDataset, poisoning: Poisoning) -> ThresholdFit:
    return fit_threshold(teacher, trusted, poisoning.dataset)


@pytest.fixture(scope="module")
def clean_fit(
    teacher: nn.Module, trusted: ImageDataset, clean_suspect: ImageDataset
) -> ThresholdFit:
    return fit_threshold(teacher, trusted, clean_suspect)


def _no_hooks(model: nn.Module) -> bool:
    return not any(m._forward_hooks for m in model.modules())


def _logits(model: nn.Module, n: int = 8) -> torch.Tensor:
    x = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x)


# --------------------------------------------------------------------------- detox modules


def test_threshold_detox_blends_flagged_units_only() -> None:
    g = torch.Generator().manual_seed(1)
    features = torch.randn(4, 3, 5, 5, generator=g)
    mask = torch.rand(3, 5, 5, generator=g) > 0.6
    mean = torch.randn(3, 5, 5, generator=g)
    full = ThresholdDetox(mask, mean, blend=1.0)
    assert full.flagged == int(mask.sum()) > 0
    out = full(features)
    keep = ~mask.expand_as(features)
    assert torch.equal(out[keep], features[keep])
    torch.testing.assert_close(out[:, mask], mean[mask].expand(4, -1))
    half = ThresholdDetox(mask, mean, blend=0.5)(features)
    assert torch.equal(half[keep], features[keep])
    torch.testing.assert_close(half[:, mask], (features[:, mask] + mean[mask]) / 2)
    none = ThresholdDetox(mask, mean, blend=0.0)(features)
    assert torch.equal(none, features)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError):
            ThresholdDetox(mask, mean, blend=bad)


def test_learned_detox_clamps_mask() -> None:
    tau = 0.2
    mean = torch.randn(2, 3, 3)
    d = LearnedDetox(mean, tau=tau)
    torch.testing.assert_close(d.m.data, torch.full_like(mean, tau / 2))
    torch.testing.assert_close(d.p.data, mean)
    raw = torch.tensor([-1.0, 0.05, 0.5]).repeat(6)  # below, inside, above [0, τ]
    d.m.data.copy_(raw.view(2, 3, 3))
    features = torch.randn(5, 2, 3, 3)
    m = raw.clamp(0, tau).view(2, 3, 3)
    torch.testing.assert_close(d(features), (1 - m) * features + m * mean)
    d.project()
    torch.testing.assert_close(d.m.data, m)
    assert bool((d.m >= 0).all() and (d.m <= tau).all())  # τ as float32, as m is
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError):
            LearnedDetox(mean, tau=bad)


def test_attach_changes_output_only_inside(teacher: nn.Module) -> None:
    before = _logits(teacher)
    mean = torch.zeros(16, 28, 28)
    detox = Detoxifier({"block1": ThresholdDetox(torch.ones(16, 28, 28), mean)}, "threshold")
    with detox.attach(teacher) as model:
        assert model is teacher
        inside = _logits(teacher)
    assert not torch.allclose(inside, before)
    assert _no_hooks(teacher)
    assert torch.equal(_logits(teacher), before)
    with pytest.raises(RuntimeError), detox.attach(teacher):
        raise RuntimeError("boom")
    assert _no_hooks(teacher)
    bad = Detoxifier({"nope": ThresholdDetox(torch.ones(1), torch.zeros(1))}, "threshold")
    with pytest.raises(KeyError), bad.attach(teacher):
        pass
    assert _no_hooks(teacher)


def test_save_load_threshold_round_trip(
    teacher: nn.Module, fit: ThresholdFit, tmp_path: Path
) -> None:
    detox = fit.detoxifier(2.0, blend=0.5)
    path = detox.save(tmp_path / "sub" / "detox.safetensors")
    loaded = Detoxifier.load(path)
    assert loaded.mode == "threshold"
    assert loaded.names == detox.names
    assert loaded.info == detox.info
    for (_, a), (_, b) in zip(detox.items(), loaded.items(), strict=True):
        assert isinstance(b, ThresholdDetox) and b.blend == 0.5
        assert torch.equal(a.mask, b.mask) and torch.equal(a.clean_mean, b.clean_mean)
    with detox.attach(teacher):
        expected = _logits(teacher)
    with loaded.attach(teacher):
        got = _logits(teacher)
    assert torch.equal(expected, got)
    assert not torch.allclose(expected, _logits(teacher))  # the detox does something


def test_load_rejects_other_files(tiny_teacher: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        Detoxifier.load(tiny_teacher)  # a model checkpoint, not a detoxifier
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        Detoxifier.load(junk)
    with pytest.raises(CheckpointError):
        Detoxifier.load(tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------- threshold fit


def _indexed(n: int) -> ImageDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 8, 8).clone()
    return ImageDataset(
        images, torch.arange(n) % 10, tuple("abcdefghij"), (0.5,), (0.5,), "indexed"
    )


def test_split_halves() -> None:
    data = _indexed(11)
    a, b = split_halves(data, seed=3)
    ids_a = set(a.images[:, 0, 0, 0].tolist())
    ids_b = set(b.images[:, 0, 0, 0].tolist())
    assert (len(a), len(b)) == (5, 6)
    assert len(ids_a) == 5 and len(ids_b) == 6
    assert not ids_a & ids_b
    assert ids_a | ids_b == set(range(11))
    again = split_halves(data, seed=3)[0]
    assert torch.equal(again.images, a.images)
    others = [set(split_halves(data, seed=s)[0].images[:, 0, 0, 0].tolist()) for s in range(8)]
    assert any(o != ids_a for o in others)  # the seed matters
    with pytest.raises(ConfigError):
        split_halves(_indexed(3))


def _bottom_right_fraction(mask: torch.Tensor) -> float:
    _, h, w = mask.shape
    pos = mask.nonzero()
    inside = (pos[:, 1] >= h // 2) & (pos[:, 2] >= w // 2)
    return float(inside.float().mean())


def test_fit_threshold_flags_trigger_units(fit: ThresholdFit, clean_fit: ThresholdFit) -> None:
    assert list(fit.layers) == ["block1", "block2", "block3"]
    flagged = fit.flagged_units()
    clean_flagged = clean_fit.flagged_units()
    assert flagged["block1"] > 0
    mask1 = fit.layers["block1"].mask()
    assert mask1.shape == (16, 28, 28) and mask1.dtype == torch.bool
    # the trigger sits in the bottom-right corner, and so do the flagged units
    assert _bottom_right_fraction(mask1) > 0.5
    assert _bottom_right_fraction(fit.layers["block2"].mask()) > 0.5
    # a clean distillation set flags far fewer units
    assert sum(clean_flagged.values()) * 5 < sum(flagged.values())
    for name, f in fit.layers.items():
        assert f.default_threshold == pytest.approx(float(f.clean_scores.max()))
        assert float(f.scores.max()) > float(clean_fit.layers[name].scores.max())
        assert fit.thresholds()[name] == f.default_threshold
        assert fit.thresholds(3.0)[name] == 3.0
        assert int(f.mask(3.0).sum()) == int((f.scores > 3.0).sum())
    # a higher threshold never flags more
    assert fit.flagged_units(50.0)["block1"] <= fit.flagged_units(2.0)["block1"]


def test_fit_threshold_scores_and_clean_mean(
    teacher: nn.Module, fit: ThresholdFit, trusted: ImageDataset, poisoning: Poisoning
) -> None:
    half_a, half_b = split_halves(trusted, 0)
    assert torch.equal(fit.calibration.images, half_b.images)
    sa = feature_stats(teacher, half_a, ["block2"])["block2"]
    ss = feature_stats(teacher, poisoning.dataset, ["block2"])["block2"]
    f = fit.layers["block2"]
    torch.testing.assert_close(f.scores, variance_score(ss, sa, per_unit=True))
    whole = feature_stats(teacher, trusted, ["block2"])["block2"]
    torch.testing.assert_close(f.clean_mean, whole.unit_mean, rtol=1e-4, atol=1e-5)
    assert f.reference.n == len(half_a)


def test_fit_threshold_channel_granularity(
    teacher: nn.Module, trusted: ImageDataset, poisoning: Poisoning
) -> None:
    fit_c = fit_threshold(teacher, trusted, poisoning.dataset, "block1,block2", "channel")
    assert fit_c.granularity == "channel"
    for f in fit_c.layers.values():
        c = f.clean_mean.shape[0]
        assert f.scores.shape == (c,)
        for t in (None, 0.5, 1.5):
            mask = f.mask(t)
            assert mask.shape == f.clean_mean.shape
            per_channel = mask.flatten(1)
            assert torch.equal(per_channel.all(1), per_channel.any(1))  # whole channels
            expected = f.scores > (f.default_threshold if t is None else t)
            assert torch.equal(per_channel.any(1), expected)
    assert fit_c.flagged_units(0.5)["block1"] > 0
    assert fit_c.flagged_units(0.5)["block1"] % (28 * 28) == 0


def test_fit_threshold_errors(
    teacher: nn.Module, trusted: ImageDataset, poisoning: Poisoning
) -> None:
    with pytest.raises(ConfigError):
        fit_threshold(teacher, trusted, poisoning.dataset, granularity="pixel")
    with pytest.raises(ConfigError):
        fit_threshold(teacher, trusted, poisoning.dataset.subset([]))
    with pytest.raises(ConfigError):
        fit_threshold(teacher, trusted.subset(range(3)), poisoning.dataset)


# --------------------------------------------------------------------------- screening


def test_fit_screen_separates_triggered_samples(
    teacher: nn.Module, fit: ThresholdFit, poisoning: Poisoning
) -> None:
    screen = fit_screen(teacher, fit)
    assert screen.active
    data = poisoning.dataset
    scores = screen.scores(teacher, data)
    assert scores.shape == (len(data),)
    poisoned = poisoning.poisoned_mask
    assert float(scores[poisoned].mean()) > 10 * float(scores[~poisoned].mean())
    flags = screen.flags(teacher, data)
    assert torch.equal(flags, scores > screen.threshold)
    assert float(flags[poisoned].float().mean()) > 0.8  # recall
    assert float(flags[~poisoned].float().mean()) < 0.1  # false positives
    calib = screen.scores(teacher, fit.calibration)
    assert screen.threshold == pytest.approx(float(torch.quantile(calib.double(), 0.99)))
    # by hand: mean squared z-score over all flagged units
    total, count = torch.zeros(len(data)), 0
    for name, mask in screen.masks.items():
        if mask.any():
            a = activations(teacher, data, name)[:, mask]
            z = (a - screen.means[name][mask]) / screen.stds[name][mask]
            total += (z**2).sum(1)
            count += int(mask.sum())
    torch.testing.assert_close(scores, total / count, rtol=1e-4, atol=1e-4)


def test_fit_screen_without_flagged_units(
    teacher: nn.Module, fit: ThresholdFit, poisoning: Poisoning
) -> None:
    screen = fit_screen(teacher, fit, threshold=1e9)
    assert not screen.active
    assert math.isinf(screen.threshold)
    scores = screen.scores(teacher, poisoning.dataset)
    assert torch.equal(scores, torch.zeros(len(poisoning.dataset)))
    assert not screen.flags(teacher, poisoning.dataset).any()
    for q in (0.3, 1.0, 1.5):
        with pytest.raises(ConfigError):
            fit_screen(teacher, fit, quantile=q)
    # on every unit, for comparison: active even where nothing is flagged, calibrated
    every = fit_screen(teacher, fit, threshold=1e9, units="all")
    assert every.active and all(bool(m.all()) for m in every.masks.values())
    assert math.isfinite(every.threshold)
    with pytest.raises(ConfigError, match="'flagged' units or 'all'"):
        fit_screen(teacher, fit, units="some")


def test_label_screen_scores_calibration_and_mistakes(
    teacher: nn.Module, fit: ThresholdFit, poisoning: Poisoning
) -> None:
    """The teacher's cross-entropy on each sample's own label, calibrated on trusted half B;
    unlabelled samples score 0; labels the teacher cannot predict get one sentence."""
    screen = fit_label_screen(teacher, fit.calibration, quantile=0.9)
    clean = screen.scores(teacher, fit.calibration)
    assert math.isfinite(screen.threshold) and bool((clean >= 0).all())
    assert float((clean > screen.threshold).double().mean()) <= 0.1 + 1e-9  # its quantile
    data = poisoning.dataset
    unlabelled = data.replace(labels=torch.full_like(data.labels, -1))
    assert not screen.scores(teacher, unlabelled).any()
    assert not screen.flags(teacher, unlabelled).any()
    with pytest.raises(ConfigError, match="teacher predicts 10 classes") as info:
        screen.scores(teacher, data.replace(labels=torch.full_like(data.labels, 12)))
    assert "\n" not in str(info.value)
    for q in (0.3, 1.0):
        with pytest.raises(ConfigError):
            fit_label_screen(teacher, fit.calibration, quantile=q)


def test_screen_within_classes_skips_thin_classes_and_unlabelled_images(
    teacher: nn.Module, trusted: ImageDataset, poisoning: Poisoning
) -> None:
    data = poisoning.dataset
    withheld, info = screen_within_classes(teacher, trusted, data, min_trusted=20)
    assert withheld.dtype == torch.bool and len(withheld) == len(data)
    assert set(info["classes"]) | set(info["skipped"]) == {
        data.classes[c] for c in data.labels.unique().tolist()
    }
    assert sum(c["withheld"] for c in info["classes"].values()) == int(withheld.sum())
    thin, info = screen_within_classes(teacher, trusted, data, min_trusted=10_000)
    assert not thin.any() and info["classes"] == {} and len(info["skipped"]) == 10
    unlabelled = data.replace(labels=torch.full_like(data.labels, -1))
    none, info = screen_within_classes(teacher, trusted, unlabelled)
    assert not none.any() and info == {"classes": {}, "skipped": []}


# --------------------------------------------------------------------------- preview


def _reference(
    teacher: nn.Module,
    fit: ThresholdFit,
    layer: str,
    threshold: float | None,
    data: ImageDataset,
    trigger: Trigger | None,
    mode: str = "all-to-one",
    blend: float = 1.0,
) -> Evaluation:
    """The straightforward computation: full forward passes with ``layer`` detoxified."""
    full = fit.detoxifier(threshold, blend)
    only = Detoxifier({layer: full.detox[full.names.index(layer)]}, "threshold")
    with only.attach(teacher):
        return evaluate(teacher, data, trigger, TARGET if trigger is not None else None, mode)


def _positions(fit: ThresholdFit, layer: str, threshold: float | None) -> torch.Tensor:
    """Flat positions holding a flagged unit."""
    return torch.nonzero(fit.layers[layer].mask(threshold).any(0).flatten()).flatten()


@pytest.mark.parametrize("mode", ["all-to-one", "all-to-all"])
@pytest.mark.parametrize("layer", ["block1", "block2", "block3"])
def test_preview_matches_full_evaluation(
    teacher: nn.Module,
    fit: ThresholdFit,
    small_test: ImageDataset,
    trigger: Trigger,
    layer: str,
    mode: str,
) -> None:
    preview = DetoxPreview(teacher, fit, layer, small_test, trigger, TARGET, mode=mode)
    assert preview.tail is not None and preview.engine is not None  # the fast path is tested
    base = evaluate(teacher, small_test, trigger, TARGET, mode)
    default = fit.layers[layer].default_threshold
    differs = sparse = False
    # the clean default, a wider mask, the lowest slider stop (most units), and none flagged
    for threshold in (2.0, None, 0.5 * default, 1.0, 1e5):
        got = preview(threshold)
        ev = _reference(teacher, fit, layer, threshold, small_test, trigger, mode)
        assert got.complete
        assert got.acc == pytest.approx(ev.acc, abs=1e-6)
        assert got.asr == pytest.approx(ev.asr, abs=1e-6)
        assert got.n_clean == ev.n_clean == preview.n_clean
        assert got.n_triggered == ev.n_triggered == preview.n_triggered
        assert got.flagged_units == fit.flagged_units(threshold)[layer]
        differs |= (ev.acc, ev.asr) != (base.acc, base.asr)
        plan = preview.engine.plan(_positions(fit, layer, threshold))
        sparse |= not plan.empty and plan.support[preview.engine.input] is not None
    untouched = preview(1e5)  # no unit flagged: the teacher itself
    assert untouched.flagged_units == 0 and untouched.complete
    assert (untouched.acc, untouched.asr) == pytest.approx((base.acc, base.asr), abs=1e-6)
    assert sparse  # some threshold took the incremental path (not only dense re-runs)
    assert _no_hooks(teacher)
    if layer != "block3":  # at block3 the tiny teacher's prediction may not budge
        assert differs


def test_preview_per_channel_and_partial_blend(
    teacher: nn.Module,
    trusted: ImageDataset,
    poisoning: Poisoning,
    small_test: ImageDataset,
    trigger: Trigger,
) -> None:
    """Whole flagged channels (every position changes: dense re-runs) and a half blend."""
    fit = fit_threshold(teacher, trusted, poisoning.dataset, granularity="channel")
    for layer in ("block1", "block2"):
        preview = DetoxPreview(teacher, fit, layer, small_test, trigger, TARGET)
        for threshold, blend in ((None, 1.0), (None, 0.5), (1.5, 1.0), (None, 0.0)):
            got = preview(threshold, blend)
            ev = _reference(teacher, fit, layer, threshold, small_test, trigger, blend=blend)
            assert (got.acc, got.asr) == pytest.approx((ev.acc, ev.asr), abs=1e-6)


def test_stratified_order_keeps_class_shares_in_every_prefix() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 15 + [3] * 5)[torch.randperm(100)]
    order = stratified_order(labels)
    assert sorted(order.tolist()) == list(range(100))
    shares = torch.bincount(labels, minlength=4).double() / 100
    for m in range(1, 101):
        counts = torch.bincount(labels[order[:m]], minlength=4).double()
        assert (counts - m * shares).abs().max() <= 1.0, m
    for c in range(4):  # each class keeps its own order
        members = order[labels[order] == c]
        assert torch.equal(members, members.sort().values)
    assert stratified_order(torch.zeros(0, dtype=torch.long)).numel() == 0


@pytest.mark.parametrize("mode", ["all-to-one", "all-to-all"])
def test_preview_budget_answers_on_a_stratified_part_then_completes(
    teacher: nn.Module, fit: ThresholdFit, small_test: ImageDataset, trigger: Trigger, mode: str
) -> None:
    layer = "block1"
    threshold = 0.5 * fit.layers[layer].default_threshold
    preview = DetoxPreview(
        teacher, fit, layer, small_test, trigger, TARGET, batch_size=32, mode=mode
    )
    quick = preview(threshold, budget_ms=0.0)  # no time at all: one chunk of each part
    assert not quick.complete
    assert (quick.n_clean, quick.n_triggered) == (32, 32)
    assert quick.flagged_units == fit.flagged_units(threshold)[layer]
    # the part is the first images of the class-stratified orders, and its numbers are theirs
    labels = small_test.labels
    clean = stratified_order(labels)[: quick.n_clean]
    shares = torch.bincount(labels, minlength=10).double() / len(labels)
    assert (torch.bincount(labels[clean], minlength=10) - quick.n_clean * shares).abs().max() <= 1
    ev = _reference(teacher, fit, layer, threshold, small_test.subset(clean), None)
    assert quick.acc == pytest.approx(ev.acc, abs=1e-6)
    targets = backdoor_targets(labels, TARGET, mode, small_test.num_classes)
    keep = torch.nonzero(labels != targets).flatten()
    keep = keep[stratified_order(labels[keep])][: quick.n_triggered]
    ev = _reference(teacher, fit, layer, threshold, small_test.subset(keep), trigger, mode)
    assert quick.asr == pytest.approx(ev.asr, abs=1e-6)
    assert preview(threshold, budget_ms=0.0) == quick  # still no time: nothing more
    # a call without a budget carries on from there, to every image
    full = preview(threshold)
    ev = _reference(teacher, fit, layer, threshold, small_test, trigger, mode)
    assert full.complete and (full.n_clean, full.n_triggered) == (ev.n_clean, ev.n_triggered)
    assert (full.acc, full.asr) == pytest.approx((ev.acc, ev.asr), abs=1e-6)
    assert preview(threshold, budget_ms=0.0) == full  # done: the complete answer at once
    fresh = DetoxPreview(teacher, fit, layer, small_test, trigger, TARGET, mode=mode)
    assert fresh(threshold, budget_ms=1e9) == full  # a budget that suffices: complete at once


def test_preview_remembers_recent_masks(
    teacher: nn.Module, fit: ThresholdFit, small_test: ImageDataset, trigger: Trigger
) -> None:
    data = small_test.subset(range(120))
    preview = DetoxPreview(teacher, fit, "block2", data, trigger, TARGET, remember=2)
    assert preview.engine is not None
    runs: list[int] = []
    logits = preview.engine.logits
    preview.engine.logits = lambda *a, **k: runs.append(1) or logits(*a, **k)  # type: ignore[method-assign]

    def computed(threshold: float) -> int:
        before = len(runs)
        preview(threshold)
        return len(runs) - before

    scores = fit.layers["block2"].scores.flatten().unique().sort().values
    low, mid, high = (float(scores[-k]) for k in (12, 6, 3))  # three different masks
    assert computed(low) > 0 and computed(low) == 0  # a revisit: remembered
    nearby = float(scores[-12] + 0.5 * (scores[-11] - scores[-12]))  # the same units flagged
    assert computed(nearby) == 0
    assert computed(mid) > 0 and computed(high) > 0  # low is now the oldest of three
    assert computed(mid) == 0 and computed(low) > 0
    once = DetoxPreview(teacher, fit, "block2", data, trigger, TARGET, remember=0)
    assert once(low) == once(low) == preview(low)
    assert not once._memo


def test_preview_errors(
    teacher: nn.Module, fit: ThresholdFit, small_test: ImageDataset, trigger: Trigger
) -> None:
    with pytest.raises(ConfigError):
        DetoxPreview(teacher, fit, "fc", small_test, trigger, TARGET)
    preview = DetoxPreview(teacher, fit, "block2", small_test.subset(range(50)), None, None)
    assert preview(3.0).asr is None
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError):
            preview(bad)


class Untraceable(nn.Module):
    """The teacher behind data-dependent control flow: previews fall back to full passes."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.feature_layers = [f"net.{n}" for n in net.feature_layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError("expected a batch of images")
        return self.net(x)


def test_preview_fallback_agrees_with_fast_path(
    teacher: nn.Module,
    trusted: ImageDataset,
    poisoning: Poisoning,
    small_test: ImageDataset,
    trigger: Trigger,
) -> None:
    wrapped = Untraceable(teacher).eval()
    fit_fast = fit_threshold(teacher, trusted, poisoning.dataset, "block1")
    fit_slow = fit_threshold(wrapped, trusted, poisoning.dataset, "net.block1")
    data = small_test.subset(range(120))
    cases = [
        (data, TARGET),  # ACC and ASR
        (data, None),  # a trigger without a target: no ASR on either path
        (data.subset(torch.nonzero(data.labels == TARGET).flatten()), TARGET),  # no ASR images
    ]
    for sub, target in cases:
        fast = DetoxPreview(teacher, fit_fast, "block1", sub, trigger, target)
        slow = DetoxPreview(wrapped, fit_slow, "net.block1", sub, trigger, target)
        assert fast.tail is not None and slow.tail is None
        for threshold in (2.0, None):
            a, b = fast(threshold), slow(threshold)
            assert a.acc == pytest.approx(b.acc, abs=1e-6)
            assert (a.asr is None) == (b.asr is None)
            if a.asr is not None:
                assert a.asr == pytest.approx(b.asr, abs=1e-6)
            assert (a.flagged_units, a.n_clean, a.n_triggered) == (
                b.flagged_units,
                b.n_clean,
                b.n_triggered,
            )
        if target is None:
            assert a.asr is None and a.n_triggered == 0
    # evaluation images all of the target class: ASR 0 over no images, as evaluate says
    only_target = cases[2][0]
    assert len(only_target) > 0
    ev = evaluate(teacher, only_target, trigger, TARGET)
    got = DetoxPreview(teacher, fit_fast, "block1", only_target, trigger, TARGET)(1e5)
    assert (got.asr, got.n_triggered) == (ev.asr, ev.n_triggered) == (None, 0)  # undefined, never 0
    assert got.acc == pytest.approx(ev.acc, abs=1e-6)
    assert _no_hooks(teacher)


# --------------------------------------------------------------------------- auto threshold


def test_auto_threshold(teacher: nn.Module, fit: ThresholdFit, clean_suspect: ImageDataset) -> None:
    validation = clean_suspect
    base = evaluate(teacher, validation).acc
    default = max(f.default_threshold for f in fit.layers.values())
    grid = [default * f for f in (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)]
    drop = 0.01
    chosen = auto_threshold(teacher, fit, validation, max_acc_drop=drop)
    assert _no_hooks(teacher)
    assert any(chosen == pytest.approx(t) for t in grid)
    accs = {}
    for t in grid:
        with fit.detoxifier(t).attach(teacher):
            accs[t] = evaluate(teacher, validation).acc
    ok = [t for t in grid if base - accs[t] <= drop]
    assert ok, "some candidate should keep the clean accuracy"
    assert chosen == pytest.approx(min(ok))  # the lowest acceptable one
    with fit.detoxifier(chosen).attach(teacher):
        assert base - evaluate(teacher, validation).acc <= drop
    # explicit candidates (unsorted); the tiny ones replace nearly every unit and lose ACC
    candidates = [1e5, 0.01, default, 0.5]
    ok = []
    for t in sorted(candidates):
        with fit.detoxifier(t).attach(teacher):
            if base - evaluate(teacher, validation).acc <= drop:
                ok.append(t)
    assert ok and min(ok) > 0.01
    assert auto_threshold(teacher, fit, validation, drop, candidates) == pytest.approx(min(ok))
    # nothing acceptable is said, never replaced by the largest candidate
    assert auto_threshold(teacher, fit, validation, 0.01, [1e5, 3e5]) == 1e5
    with pytest.raises(ConfigError, match="No candidate threshold"):
        auto_threshold(teacher, fit, validation, -1.0, [2.0, 7.0])
    with pytest.raises(ConfigError):
        auto_threshold(teacher, fit, validation.subset([]))


# --------------------------------------------------------------------------- learned mode


def test_fit_learned(teacher: nn.Module, trusted: ImageDataset, tmp_path: Path) -> None:
    model = copy.deepcopy(teacher)
    first = next(model.parameters())
    first.requires_grad_(False)  # a mixed pattern, to be restored as it was
    grads = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tau = 0.05
    detox = fit_learned(model, trusted.subset(range(200)), tau=tau, epochs=1, lr=0.05)
    assert detox.mode == "learned" and detox.names == ["block1", "block2", "block3"]
    assert not detox.training
    for _, d in detox.items():
        assert isinstance(d, LearnedDetox)
        assert bool((d.m >= 0).all() and (d.m <= tau).all())
        assert not torch.allclose(d.m, torch.full_like(d.m, tau / 2))  # it learned
    # the large step drives some masks to the bounds: the projection is what keeps them in
    all_m = torch.cat([d.m.detach().flatten() for _, d in detox.items()])
    assert bool((all_m == tau).any() or (all_m == 0).any())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [p.requires_grad for p in model.parameters()] == grads
    assert _no_hooks(model)
    with detox.attach(model):
        detoxed = _logits(model)
    assert not torch.allclose(detoxed, _logits(model))
    # save/load round trip
    loaded = Detoxifier.load(detox.save(tmp_path / "learned.safetensors"))
    assert loaded.mode == "learned"
    for (_, a), (_, b) in zip(detox.items(), loaded.items(), strict=True):
        assert b.tau == tau and torch.equal(a.m, b.m) and torch.equal(a.p, b.p)
    with loaded.attach(model):
        assert torch.equal(_logits(model), detoxed)


def test_fit_learned_errors(teacher: nn.Module, trusted: ImageDataset) -> None:
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError):
            fit_learned(teacher, trusted, tau=bad, epochs=1)
    with pytest.raises(ConfigError):
        fit_learned(teacher, trusted.subset([]), epochs=1)
