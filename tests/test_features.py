"""Feature statistics: streaming moments, hooks, variance scores, the stats cache, net tails."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from robustkd.analysis.features import (
    LayerStats,
    RunningMoments,
    StatsCache,
    capture,
    feature_stats,
    resolve_layers,
    tail_from,
    top_k,
    variance_score,
)
from robustkd.attacks import create_trigger
from robustkd.attacks.poison import poison_dataset
from robustkd.data.datasets import ImageDataset, normalize, to_float
from robustkd.errors import ConfigError, UnknownNameError
from robustkd.models import create_model

LAYERS = ["block1", "block2", "block3"]


def _model(arch: str = "small-cnn-student", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(arch)
    # non-trivial BatchNorm statistics, so eval mode is not the identity
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return _model()


def _hand_activations(model: nn.Module, data: ImageDataset, layers: list[str], trigger=None):
    """Each layer's activations on ``data`` in one forward pass, captured by our own hooks."""
    modules = dict(model.named_modules())
    acts: dict[str, torch.Tensor] = {}
    handles = [
        modules[n].register_forward_hook(
            lambda _m, _i, out, n=n: acts.__setitem__(n, out.detach().clone())
        )
        for n in layers
    ]
    try:
        with torch.no_grad():
            x = to_float(data.images)
            if trigger is not None:
                x = trigger.apply(x)
            model(normalize(x, data.mean, data.std))
    finally:
        for h in handles:
            h.remove()
    return acts


# --------------------------------------------------------------------------- RunningMoments


def _stream(data: torch.Tensor, cuts: list[int]) -> RunningMoments:
    rm = RunningMoments()
    bounds = [0, *sorted(cuts), data.shape[0]]
    for lo, hi in itertools.pairwise(bounds):
        rm.update(data[lo:hi])
    return rm


def test_running_moments_streaming_equals_numpy() -> None:
    g = torch.Generator().manual_seed(1)
    data = torch.randn(97, 3, 4, generator=g) * 2.0 + 0.5
    ref = data.double().numpy()
    for trial in range(5):
        cuts = torch.randint(0, 98, (trial + 1,), generator=g).tolist()
        rm = _stream(data, cuts)
        assert rm.n == 97
        np.testing.assert_allclose(rm.mean.numpy(), ref.mean(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(rm.var.numpy(), ref.var(0, ddof=0), rtol=1e-5)


def test_running_moments_merge_equals_one_pass() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(40, 5, generator=g) + 3.0
    b = torch.randn(13, 5, generator=g) * 0.2 - 1.0  # different mean and spread
    left = _stream(a, [7, 20])
    right = _stream(b, [5])
    merged = left.merge(right)
    everything = torch.cat([a, b]).double().numpy()
    assert merged.n == 53
    np.testing.assert_allclose(merged.mean.numpy(), everything.mean(0), rtol=1e-5)
    np.testing.assert_allclose(merged.var.numpy(), everything.var(0), rtol=1e-5)
    # merging an empty accumulator changes nothing; merging into one copies
    before = merged.mean.clone()
    merged.merge(RunningMoments())
    assert merged.n == 53 and torch.equal(merged.mean, before)
    fresh = RunningMoments().merge(merged)
    assert fresh.n == 53 and torch.allclose(fresh.var, merged.var)


def test_running_moments_without_data_raises() -> None:
    rm = RunningMoments().update(torch.empty(0, 3))
    assert rm.n == 0
    with pytest.raises(ConfigError):
        _ = rm.var


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    trailing=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=6),
    split=st.integers(0, 40),
    seed=st.integers(0, 2**16),
    offset=st.floats(-50, 50),
)
def test_running_moments_property(n, trailing, cuts, split, seed, offset) -> None:
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(n, *trailing, generator=g, dtype=torch.float64) * 3 + offset
    cuts = [min(c, n) for c in cuts]
    ref = data.numpy()
    rm = _stream(data, cuts)
    assert rm.n == n
    np.testing.assert_allclose(rm.mean.numpy(), ref.mean(0), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(rm.var.numpy(), ref.var(0), rtol=1e-5, atol=1e-8)
    # two accumulators over a split, merged, give the same
    k = min(split, n)
    merged = _stream(data[:k], []).merge(_stream(data[k:], []))
    assert merged.n == n
    np.testing.assert_allclose(merged.mean.numpy(), ref.mean(0), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(merged.var.numpy(), ref.var(0), rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------- feature_stats


def test_feature_stats_match_hand_computation(model: nn.Module, small_test: ImageDataset) -> None:
    acts = _hand_activations(model, small_test, LAYERS)
    stats = feature_stats(model, small_test, LAYERS, batch_size=64)
    assert list(stats) == LAYERS
    for name in LAYERS:
        a = acts[name].double()
        s = stats[name]
        pooled = a.mean(dim=(2, 3))
        assert s.n == len(small_test) and s.layer == name
        assert s.channels == a.shape[1]
        assert s.channel_mean.dtype == torch.float32
        torch.testing.assert_close(s.channel_mean.double(), pooled.mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(
            s.channel_var.double(), pooled.var(0, unbiased=False), rtol=1e-4, atol=1e-7
        )
        torch.testing.assert_close(s.unit_mean.double(), a.mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(
            s.unit_var.double(), a.var(0, unbiased=False), rtol=1e-4, atol=1e-7
        )
        # the statistics are not trivial (a constant layer would pass the comparisons above)
        assert float(s.unit_var.max()) > 1e-3


def test_feature_stats_independent_of_batch_size(
    model: nn.Module, small_test: ImageDataset
) -> None:
    a = feature_stats(model, small_test, "block1,block3", batch_size=7)
    b = feature_stats(model, small_test, "block1,block3", batch_size=300)
    for name in ("block1", "block3"):
        for field in ("channel_mean", "channel_var", "unit_mean", "unit_var"):
            torch.testing.assert_close(
                getattr(a[name], field), getattr(b[name], field), rtol=1e-5, atol=1e-7
            )


def test_feature_stats_with_trigger_equal_stats_of_stamped_images(
    model: nn.Module, small_test: ImageDataset
) -> None:
    data = small_test.subset(range(60))
    trigger = create_trigger("badnets")
    stamped = poison_dataset(data, trigger, 1.0, 0, keep_labels=True).dataset
    triggered = feature_stats(model, data, ["block1"], trigger=trigger)["block1"]
    direct = feature_stats(model, stamped, ["block1"])["block1"]
    plain = feature_stats(model, data, ["block1"])["block1"]
    torch.testing.assert_close(triggered.unit_var, direct.unit_var)
    torch.testing.assert_close(triggered.unit_mean, direct.unit_mean)
    assert not torch.allclose(triggered.unit_mean, plain.unit_mean)


def test_feature_stats_restore_mode_and_leave_buffers(small_test: ImageDataset) -> None:
    model = _model()
    model.train()
    bn = model.block1[1]
    before = bn.running_mean.clone()
    feature_stats(model, small_test.subset(range(20)), ["block2"])
    assert model.training
    assert torch.equal(bn.running_mean, before)  # ran in eval mode
    assert not any(m._forward_hooks for m in model.modules())


def test_feature_stats_without_units_and_empty_data(
    model: nn.Module, small_test: ImageDataset
) -> None:
    s = feature_stats(model, small_test.subset(range(10)), ["block2"], per_unit=False)["block2"]
    assert s.unit_mean is None and s.unit_var is None
    with pytest.raises(ConfigError):
        s.spatial_variance_map()
    with pytest.raises(ConfigError):
        feature_stats(model, small_test.subset([]), ["block2"])


# --------------------------------------------------------------------------- layers and hooks


def test_resolve_layers(model: nn.Module) -> None:
    assert resolve_layers(model, None) == model.feature_layers
    assert resolve_layers(model, "all") == model.feature_layers
    assert resolve_layers(model, "block1, block3") == ["block1", "block3"]
    assert resolve_layers(model, ["block2", "fc"]) == ["block2", "fc"]
    assert resolve_layers(model, "block1.0") == ["block1.0"]
    with pytest.raises(UnknownNameError) as err:
        resolve_layers(model, "block1,blok2")
    message = str(err.value)
    assert "'blok2'" in message
    for name in model.feature_layers:
        assert name in message
    with pytest.raises(ConfigError):
        resolve_layers(model, " , ")
    plain = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ConfigError):
        resolve_layers(plain, None)


def test_capture_holds_last_outputs_and_removes_hooks(model: nn.Module) -> None:
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad(), capture(model, ["block1", "block3"]) as out:
        model(x)
        first = out["block1"].clone()
        model(x[:1])
        assert out["block1"].shape[0] == 1
        assert out["block3"].shape == (1, 64, 7, 7)
    assert torch.allclose(first[:1], out["block1"])
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError), capture(model, ["block2"]):
        raise RuntimeError("boom")
    assert not any(m._forward_hooks for m in model.modules())


# --------------------------------------------------------------------------- scores


def _stats(unit_var: torch.Tensor, channel_var: torch.Tensor | None = None) -> LayerStats:
    c = unit_var.shape[0]
    return LayerStats(
        layer="x",
        n=10,
        channel_mean=torch.zeros(c),
        channel_var=unit_var.mean((1, 2)) if channel_var is None else channel_var,
        unit_mean=torch.zeros_like(unit_var),
        unit_var=unit_var,
    )


def test_variance_score_formula() -> None:
    g = torch.Generator().manual_seed(3)
    ref_var = torch.rand(4, 5, 6, generator=g) + 0.05
    sus_var = ref_var.clone()
    sus_var[2, 3, 4] *= 2.0  # one unit's variance doubles
    ref, sus = _stats(ref_var), _stats(sus_var)
    score = variance_score(sus, ref, per_unit=True)
    assert score.shape == (4, 5, 6)
    floor = 0.1 * float(ref_var.mean())
    r = float(ref_var[2, 3, 4])
    expected = 2.0 * r / (r + floor)
    assert float(score[2, 3, 4]) == pytest.approx(expected, rel=1e-5)
    assert float(score[2, 3, 4]) == pytest.approx(2.0 / (1.0 + floor / r), rel=1e-5)
    others = torch.ones_like(score, dtype=torch.bool)
    others[2, 3, 4] = False
    torch.testing.assert_close(score[others], (ref_var / (ref_var + floor))[others])
    assert int(score.flatten().argmax()) == np.ravel_multi_index((2, 3, 4), (4, 5, 6))
    # uniform reference variance 1: the doubled unit scores 2 / 1.1, the rest 1 / 1.1
    flat = variance_score(_stats(torch.full((2, 3, 3), 2.0)), _stats(torch.ones(2, 3, 3)), True)
    torch.testing.assert_close(flat, torch.full((2, 3, 3), 2.0 / 1.1))
    # floor=0 gives the plain ratio
    torch.testing.assert_close(
        variance_score(sus, ref, per_unit=True, floor=0.0), sus_var / ref_var, rtol=1e-5, atol=0
    )


def test_variance_score_per_channel_and_errors() -> None:
    ref = _stats(torch.ones(3, 2, 2), channel_var=torch.tensor([1.0, 2.0, 3.0]))
    sus = _stats(torch.ones(3, 2, 2), channel_var=torch.tensor([2.0, 2.0, 3.0]))
    score = variance_score(sus, ref)
    assert score.shape == (3,)
    torch.testing.assert_close(score, torch.tensor([2.0, 2.0, 3.0]) / (ref.channel_var + 0.2))
    no_units = LayerStats("x", 10, torch.zeros(3), torch.ones(3), None, None)
    with pytest.raises(ConfigError):
        variance_score(no_units, ref, per_unit=True)
    with pytest.raises(ConfigError):
        variance_score(sus, no_units, per_unit=True)
    with pytest.raises(ConfigError):
        variance_score(_stats(torch.ones(3, 4, 4)), ref, per_unit=True)


def test_top_k_and_spatial_map() -> None:
    scores = torch.tensor([[0.5, 3.0, 1.0], [2.0, -1.0, 4.0]])
    values, idx = top_k(scores, 3)
    assert values.tolist() == [4.0, 3.0, 2.0]
    assert idx.tolist() == [5, 1, 3]
    assert top_k(scores, 100)[0].numel() == 6
    assert top_k(scores, 0)[0].numel() == 0
    assert top_k(scores, -2)[0].numel() == 0
    unit_var = torch.rand(4, 7, 5)
    smap = _stats(unit_var).spatial_variance_map()
    assert smap.shape == (7, 5)
    torch.testing.assert_close(smap, unit_var.mean(0))


# --------------------------------------------------------------------------- cache


def test_stats_cache_hits_and_invalidation(small_test: ImageDataset) -> None:
    model = _model()
    data = small_test.subset(range(200))
    cache = StatsCache()
    first = cache.get(model, data, "block1")
    assert (cache.hits, cache.misses) == (0, 1)
    torch.testing.assert_close(
        first["block1"].unit_var, feature_stats(model, data, ["block1"])["block1"].unit_var
    )
    again = cache.get(model, data, "block1")
    assert (cache.hits, cache.misses) == (1, 1)
    assert again["block1"] is first["block1"]
    # one more layer: one hit, one miss
    cache.get(model, data, "block1,block2")
    assert (cache.hits, cache.misses) == (2, 2)
    # a trigger is part of the key
    cache.get(model, data, "block1", trigger=create_trigger("badnets"))
    assert cache.misses == 3
    # changed weights: a miss, and the new statistics differ
    with torch.no_grad():
        model.block1[0].weight[0, 0, 0, 0] += 1.0
    changed = cache.get(model, data, "block1")
    assert cache.misses == 4
    assert not torch.allclose(changed["block1"].unit_mean, first["block1"].unit_mean)
    # changed data: a single image, anywhere in the set, makes a miss
    for i in (1, 199):
        images = data.images.clone()
        images[i] = 255 - images[i]
        cache.get(model, data.replace(images=images), "block1")
    assert cache.misses == 6
    relabelled = data.replace(labels=(data.labels + 1) % 10)
    cache.get(model, relabelled, "block1")
    assert cache.misses == 7


def test_stats_cache_lru_eviction(small_test: ImageDataset) -> None:
    model = _model()
    data = small_test.subset(range(10))
    cache = StatsCache(max_entries=2)
    cache.get(model, data, "block1")  # miss
    cache.get(model, data, "block2")  # miss
    cache.get(model, data, "block1")  # hit: block1 is now the most recent
    assert (cache.hits, cache.misses) == (1, 2)
    cache.get(model, data, "block3")  # miss, evicts block2 (least recently used)
    assert len(cache._items) == 2
    cache.get(model, data, "block1")  # still there
    assert (cache.hits, cache.misses) == (2, 3)
    cache.get(model, data, "block2")  # evicted: a miss
    assert (cache.hits, cache.misses) == (2, 4)
    assert len(cache._items) == 2


# --------------------------------------------------------------------------- tails


@pytest.mark.parametrize("arch", ["small-cnn", "small-cnn-student"])
def test_tail_from_reproduces_the_model(arch: str) -> None:
    model = _model(arch, seed=4)
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(x)
        for layer in LAYERS:
            acts = {}
            handle = model.get_submodule(layer).register_forward_hook(
                lambda _m, _i, out, acts=acts: acts.__setitem__("a", out.detach().clone())
            )
            model(x)
            handle.remove()
            tail = tail_from(model, layer)
            assert tail is not None
            torch.testing.assert_close(tail(acts["a"]), logits, atol=1e-5, rtol=0)
            # the tail really reads the features it is given
            assert not torch.allclose(tail(acts["a"] * 0.5 + 0.3), logits, atol=1e-3)


class SkipNet(nn.Module):
    """Uses its input again after ``conv1``: a skip connection across it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        return self.fc((self.conv2(h) + x).flatten(1))


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if h.sum() > 0:
            h = -h
        return self.fc(h.flatten(1))


def test_tail_from_skip_connection_and_untraceable() -> None:
    torch.manual_seed(0)
    net = SkipNet().eval()
    assert tail_from(net, "conv1") is None
    assert tail_from(net, "conv2") is None
    x = torch.randn(2, 1, 4, 4)
    fc_tail = tail_from(net, "fc")  # nothing earlier is read after the last layer
    assert fc_tail is not None
    out = net(x)
    torch.testing.assert_close(fc_tail(out), out)
    assert tail_from(Branchy(), "conv") is None
