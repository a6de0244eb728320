"""Choosing the compute device: CUDA when present, CPU otherwise."""

from __future__ import annotations

import os

import torch

from robustkd.errors import ConfigError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → the first CUDA GPU if there is one, else the CPU; ``cpu`` / ``cuda[:N]``.

    Under torchrun, ``auto`` and ``cuda`` mean this process's GPU (``cuda:$LOCAL_RANK``).
    """
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and os.environ.get("LOCAL_RANK") is not None:
        name = f"cuda:{os.environ['LOCAL_RANK']}"  # under torchrun: one GPU per local rank
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"Unknown device {name!r}; use auto, cpu or cuda[:N].") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device {name!r} was asked for but no CUDA GPU is visible; use cpu.")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"Device type {device.type!r} is not supported; use auto, cpu or cuda.")
    return device


def device_label(device: torch.device) -> str:
    """A human name for the device: ``CPU`` or the GPU's product name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"
