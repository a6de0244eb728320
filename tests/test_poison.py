"""Poisoning: counts, recorded indices, labels per mode, untouched images, determinism."""

from __future__ import annotations

import json

import pytest
import torch

from robustkd.attacks import BadNetsTrigger, BlendTrigger, WaNetTrigger
from robustkd.attacks.poison import Poisoning, backdoor_targets, poison_dataset
from robustkd.data.datasets import ImageDataset, to_float, to_uint8
from robustkd.errors import ConfigError

N, K = 300, 10


@pytest.fixture(scope="module")
def data() -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    return ImageDataset(
        images=torch.randint(0, 200, (N, 1, 16, 16), dtype=torch.uint8, generator=g),
        labels=torch.randint(0, K, (N,), generator=g),
        classes=tuple(f"c{i}" for i in range(K)),
        mean=(0.4,),
        std=(0.2,),
        name="toy",
    )


def _unchanged(p: Poisoning, data: ImageDataset, changed: torch.Tensor) -> None:
    """Images outside ``changed`` are byte-identical to the originals."""
    keep = torch.ones(N, dtype=torch.bool)
    keep[changed] = False
    assert torch.equal(p.dataset.images[keep], data.images[keep])


@pytest.mark.parametrize("rate", [0.1, 0.25, 1.0])
def test_all_to_one(data: ImageDataset, rate: float) -> None:
    trigger = BadNetsTrigger()
    p = poison_dataset(data, trigger, rate, target=3, seed=1)
    idx = p.poisoned_indices
    assert len(idx) == round(rate * N) == p.config["n_poisoned"]
    assert idx.dtype == torch.long and torch.equal(idx, idx.sort().values)
    assert len(idx.unique()) == len(idx)
    assert torch.equal(p.original_labels, data.labels)
    assert (p.dataset.labels[idx] == 3).all()
    others = ~p.poisoned_mask
    assert torch.equal(p.dataset.labels[others], data.labels[others])
    _unchanged(p, data, idx)
    # poisoned images are exactly the stamped originals, stored as uint8
    expected = to_uint8(trigger.apply(to_float(data.images[idx])))
    assert torch.equal(p.dataset.images[idx], expected)
    assert p.dataset.name == "toy+badnets" and p.dataset.classes == data.classes
    assert len(p.noise_indices) == 0
    # the input dataset is left alone
    assert data.images.max() < 200


def test_all_to_all_labels(data: ImageDataset) -> None:
    p = poison_dataset(data, BlendTrigger(), 0.2, target=0, mode="all-to-all")
    idx = p.poisoned_indices
    assert torch.equal(p.dataset.labels[idx], (data.labels[idx] + 1) % K)
    assert torch.equal(p.dataset.labels[~p.poisoned_mask], data.labels[~p.poisoned_mask])
    _unchanged(p, data, idx)


def test_clean_label_draws_only_target_images_and_keeps_labels(data: ImageDataset) -> None:
    target = 4
    pool = int((data.labels == target).sum())
    rate = (pool // 2) / N
    p = poison_dataset(data, BadNetsTrigger(), rate, target, clean_label=True)
    assert len(p.poisoned_indices) == round(rate * N)
    assert (data.labels[p.poisoned_indices] == target).all()
    assert torch.equal(p.dataset.labels, data.labels)
    assert not torch.equal(p.dataset.images[p.poisoned_indices], data.images[p.poisoned_indices])
    with pytest.raises(ConfigError, match="clean-label"):
        poison_dataset(data, BadNetsTrigger(), (pool + 1) / N, target, clean_label=True)
    with pytest.raises(ConfigError, match="all-to-one"):
        poison_dataset(data, BadNetsTrigger(), 0.1, target, mode="all-to-all", clean_label=True)


def test_keep_labels_stamps_without_relabelling(data: ImageDataset) -> None:
    p = poison_dataset(data, BadNetsTrigger(), 0.3, target=2, keep_labels=True)
    assert len(p.poisoned_indices) == 90
    assert torch.equal(p.dataset.labels, data.labels)
    assert (p.dataset.images[p.poisoned_indices][:, :, -4:-1, -4:-1] == 255).all()
    _unchanged(p, data, p.poisoned_indices)


def test_deterministic_per_seed(data: ImageDataset) -> None:
    a = poison_dataset(data, WaNetTrigger(noise_rate=0.1), 0.1, target=0, seed=7)
    b = poison_dataset(data, WaNetTrigger(noise_rate=0.1), 0.1, target=0, seed=7)
    c = poison_dataset(data, WaNetTrigger(noise_rate=0.1), 0.1, target=0, seed=8)
    assert torch.equal(a.poisoned_indices, b.poisoned_indices)
    assert torch.equal(a.noise_indices, b.noise_indices)
    assert torch.equal(a.dataset.images, b.dataset.images)
    assert torch.equal(a.dataset.labels, b.dataset.labels)
    assert a.config == b.config
    assert not torch.equal(a.poisoned_indices, c.poisoned_indices)


def test_rate_zero_changes_nothing(data: ImageDataset) -> None:
    p = poison_dataset(data, WaNetTrigger(noise_rate=0.2), 0.0, target=0)
    assert len(p.poisoned_indices) == 0 and len(p.noise_indices) == 0
    assert torch.equal(p.dataset.images, data.images)
    assert torch.equal(p.dataset.labels, data.labels)


def test_wanet_noise_mode(data: ImageDataset) -> None:
    trigger = WaNetTrigger(noise_rate=0.2)
    p = poison_dataset(data, trigger, 0.1, target=5, seed=3)
    poisoned, noise = p.poisoned_indices, p.noise_indices
    assert len(poisoned) == 30 and len(noise) == 60 == p.config["n_noise"]
    assert torch.equal(noise, noise.sort().values)
    assert not set(poisoned.tolist()) & set(noise.tolist())
    # noise images keep their labels and differ from both the original and the plain warp
    assert torch.equal(p.dataset.labels[noise], data.labels[noise])
    assert (p.dataset.labels[poisoned] == 5).all()
    warped = to_uint8(trigger.apply(to_float(data.images[noise])))
    assert not torch.equal(p.dataset.images[noise], warped)
    assert not torch.equal(p.dataset.images[noise], data.images[noise])
    _unchanged(p, data, torch.cat([poisoned, noise]))


def test_config_is_json_serialisable(data: ImageDataset) -> None:
    p = poison_dataset(data, BadNetsTrigger(position=[2, 3]), 0.05, target=1, seed=4)
    config = json.loads(json.dumps(p.config))
    assert config == p.config
    assert config["trigger"] == {
        "name": "badnets",
        "size": 3,
        "position": [2, 3],
        "pattern": "solid",
        "value": 1.0,
        "margin": 1,
    }
    assert config["rate"] == 0.05 and config["target"] == 1 and config["seed"] == 4
    assert config["mode"] == "all-to-one" and config["n_poisoned"] == 15
    assert config["clean_label"] is False and config["keep_labels"] is False


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
def test_rate_out_of_range(data: ImageDataset, rate: float) -> None:
    with pytest.raises(ConfigError, match="between 0 and 1"):
        poison_dataset(data, BadNetsTrigger(), rate, target=0)


@pytest.mark.parametrize("target", [-1, K, 99])
def test_target_out_of_range(data: ImageDataset, target: int) -> None:
    with pytest.raises(ConfigError, match=f"between 0 and {K - 1}"):
        poison_dataset(data, BadNetsTrigger(), 0.1, target=target)


def test_bad_mode_or_trigger(data: ImageDataset) -> None:
    with pytest.raises(ConfigError, match="all-to-one"):
        poison_dataset(data, BadNetsTrigger(), 0.1, target=0, mode="one-to-one")
    with pytest.raises(ConfigError, match="Trigger"):
        poison_dataset(data, "badnets", 0.1, target=0)  # type: ignore[arg-type]


def test_backdoor_targets() -> None:
    labels = torch.tensor([0, 3, 9, 5])
    assert torch.equal(backdoor_targets(labels, 2, "all-to-one", 10), torch.full((4,), 2))
    assert torch.equal(backdoor_targets(labels, 2, "all-to-all", 10), torch.tensor([1, 4, 0, 6]))
    with pytest.raises(ConfigError):
        backdoor_targets(labels, 2, "sideways", 10)
