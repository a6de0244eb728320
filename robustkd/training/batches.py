"""Where the training images live and how each epoch's batches reach the device: seeded
per-epoch shuffles and augmentation draws, a rank's shard of every global batch under DDP,
images resident on the device when they fit, else pinned host batches gathered by DataLoader
workers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

from robustkd.data.datasets import ImageDataset
from robustkd.errors import ConfigError
from robustkd.training import distributed
from robustkd.training.augment import draw_augment
from robustkd.training.config import TrainConfig


class _Batches:
    """Each epoch's batches: (uint8 images, labels, indices, augmentation draw) on the device.

    The permutation and augmentation come from a generator seeded by (seed, epoch), so a
    resumed run replays the same batches; under DDP every rank draws the same global batch
    and keeps its shard, and a last global batch smaller than the world size is skipped.
    Images live on the device when they fit (or ``data_placement="device"``); otherwise
    pinned host batches are gathered by DataLoader workers and copied without blocking.
    """

    def __init__(self, data: ImageDataset, config: TrainConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.world = distributed.world_size()
        self.rank = distributed.rank()
        n = len(data)
        size = config.batch_size
        self.bounds = [(s, min(s + size, n)) for s in range(0, n, size)]
        if self.world > 1:
            self.bounds = [(a, b) for a, b in self.bounds if b - a >= self.world]
            if not self.bounds:
                raise ConfigError(
                    f"{n} training images cannot be split over {self.world} processes; "
                    "use fewer processes or more images."
                )
        self.steps = len(self.bounds)
        self.resident = _resident(data, config, device)
        self.data = data.to(device) if self.resident else data
        self.n = n

    def _generator(self, epoch: int) -> torch.Generator:
        gen_device = self.device if self.resident else torch.device("cpu")
        seed = self.config.seed * 100_003 + epoch
        return torch.Generator(device=gen_device).manual_seed(seed)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]]:
        config = self.config
        generator = self._generator(epoch)
        order = torch.randperm(self.n, generator=generator, device=generator.device)
        plan = []
        for a, b in self.bounds:
            draw = draw_augment(b - a, config.augment, config.crop_padding, generator)
            mine = slice(self.rank, None, self.world)
            plan.append((order[a:b][mine], draw[mine]))
        if self.resident:
            for idx, draw in plan:
                yield self.data.images[idx], self.data.labels[idx], idx, draw
            return
        for (images, labels, idx), (_, draw) in zip(self._host_batches(plan), plan, strict=True):
            yield (
                images.to(self.device, non_blocking=True),
                labels.to(self.device, non_blocking=True),
                idx.to(self.device, non_blocking=True),
                draw,
            )

    def _host_batches(self, plan: list[tuple[torch.Tensor, Any]]) -> Any:
        from torch.utils.data import DataLoader

        workers = min(4, max(1, (os.cpu_count() or 2) - 1))
        return DataLoader(
            _Gather(self.data, [idx for idx, _ in plan]),
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )


class _Gather(torch.utils.data.Dataset):
    """Item i: the images, labels and indices of the i-th planned batch (host memory)."""

    def __init__(self, data: ImageDataset, batches: list[torch.Tensor]) -> None:
        self.data = data
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = self.batches[i]
        return self.data.images[idx], self.data.labels[idx], idx


def _resident(data: ImageDataset, config: TrainConfig, device: torch.device) -> bool:
    """Whether the images should live on ``device`` (the CPU's own memory: always, in auto)."""
    if config.data_placement != "auto":
        return config.data_placement == "device"
    if device.type == "cpu":
        return True
    need = data.images.numel() * data.images.element_size()
    free, _total = torch.cuda.mem_get_info(device)
    return need <= free // 4  # leave most of the memory to activations and the models
