"""Model cost on this machine: latency per image, checkpoint size, and the comparison table that
shows them next to a report's ACC, ASR and DER."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkd.errors import ConfigError
from robustkd.models.sharing import view


def latency_per_image(
    model: nn.Module, input_shape: Sequence[int], batch: int = 1, repeats: int = 20
) -> float:
    """Median seconds per image of an eval-mode forward pass on the model's device."""
    if len(input_shape) != 3 or not all(isinstance(v, int) and v > 0 for v in input_shape):
        raise ConfigError(
            f"The input shape must be (C, H, W) with positive sizes; got {input_shape}."
        )
    for name, value in (("batch", batch), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"Latency needs a whole-number {name} of at least 1; got {value!r}.")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.rand(batch, *input_shape, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = view(model)  # eval mode without switching the caller's (maybe shared) model
    times = []
    with torch.inference_mode():
        for _ in range(2):  # warm-up: first calls pay for allocation and kernel choice
            model(x)
        sync()
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - start)
    return max(statistics.median(times) / batch, 1e-9)


def _pct(value: Any) -> float | None:
    return round(100 * value, 2) if isinstance(value, (int, float)) else None


def report_rows(
    report: dict[str, Any],
    latency: Callable[[Path], float | None] | None = None,
    folder: str | Path | None = None,
    teacher: str | Path | None = None,
) -> list[dict[str, Any]]:
    """One row per model of a comparison report (the teacher first), in display units.

    Columns: model, ACC (%), ASR (%), DER, params, FLOPs, checkpoint (MB), latency (ms / image).
    ``latency(path)`` measures a checkpoint file (None when it cannot); sizes and latencies of
    missing files are None. A report names its checkpoints relative to its run ``folder`` and
    the teacher by name only, so the teacher's file is ``teacher`` when given.
    """
    base = Path(folder) if folder is not None else Path()
    models = [("teacher", report["teacher"], teacher or report.get("teacher_path"))]
    models += [
        (name, row, base / row["checkpoint"] if row.get("checkpoint") else None)
        for name, row in report["methods"].items()
    ]
    rows = []
    for name, row, file in models:
        path = Path(file) if file else None
        exists = path is not None and path.is_file()
        seconds = latency(path) if exists and latency is not None else None
        der = row.get("der")
        rows.append(
            {
                "model": name,
                "ACC (%)": _pct(row.get("acc")),
                "ASR (%)": _pct(row.get("asr")),
                "DER": round(der, 3) if isinstance(der, (int, float)) else None,
                "params": row.get("params"),
                "FLOPs": row.get("flops"),
                "checkpoint (MB)": round(path.stat().st_size / 1e6, 3) if exists else None,
                "latency (ms / image)": round(1000 * seconds, 3) if seconds is not None else None,
            }
        )
    return rows
