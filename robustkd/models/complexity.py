"""Model size and cost: parameter counts and FLOPs per image.

FLOPs follow ``torch.utils.flop_counter``: a multiply-add counts as 2 FLOPs (so a linear layer
``in → out`` costs ``2·in·out``, a convolution ``2 · out elements · in/groups · kh · kw``);
biases, normalisation, activations and pooling are not counted.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from robustkd.models.sharing import view


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones once); only those with ``requires_grad`` if asked."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """FLOPs of one eval-mode forward pass of a single ``(C, H, W)`` image.

    Runs an eval-mode view of the model (``sharing.view``: the model's own modes are never
    switched) on its device and dtype under ``torch.no_grad``.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        view(model)(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    return int(counter.get_total_flops())


def model_summary(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, Any]:
    """``params``, ``flops`` (per image), ``input_shape`` and ``feature_layers`` of a model."""
    return {
        "params": count_parameters(model),
        "flops": count_flops(model, input_shape),
        "input_shape": tuple(input_shape),
        "feature_layers": list(getattr(model, "feature_layers", [])),
    }
