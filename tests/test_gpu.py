"""The CUDA fast path: skipped where no GPU is visible (``make test`` passes without one).

On a GPU these check that no training step waits for the device (a host-device sync inside
the step raises under ``torch.cuda.set_sync_debug_mode("error")``), and that bf16 training on
the GPU lands where float32 training on the CPU does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robustkd.analysis.metrics import evaluate
from robustkd.data.datasets import ImageDataset
from robustkd.defenses import run_method
from robustkd.models import create_model
from robustkd.models.checkpoints import load_checkpoint
from robustkd.training.config import TrainConfig, TrainEvent
from robustkd.training.distill import DistillConfig
from robustkd.training.engine import train_model
from robustkd.training.scenarios import build_scenario

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _NoSyncInsideEpochs:
    """Progress callback: host-device syncs are errors from each epoch's first step event
    to its last one (the epoch's end reads the loss once, on purpose)."""

    def __init__(self) -> None:
        self.checked_steps = 0

    def __call__(self, event: TrainEvent) -> None:
        if event.kind != "step":
            return
        if event.step == 1:
            torch.cuda.set_sync_debug_mode("error")
        elif event.step == event.steps:
            torch.cuda.set_sync_debug_mode("default")
        else:
            self.checked_steps += 1
            assert event.loss is None  # reading it would sync


def _fresh() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("small-cnn-student")


def test_teacher_steps_never_wait_for_the_gpu(small_train: ImageDataset) -> None:
    watch = _NoSyncInsideEpochs()
    config = TrainConfig(epochs=2, batch_size=64, device="cuda", augment="crop-flip")
    try:
        train_model(_fresh(), small_train, config, progress=watch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert watch.checked_steps >= 2 * 7


@pytest.mark.parametrize("method", ["robustkd", "robustkd-reverse"])
def test_robustkd_distillation_steps_never_wait_for_the_gpu(tiny_teacher: Path, method) -> None:
    """Also with robustkd-reverse's stamped rows, drawn on the host and chosen by torch.where."""
    teacher, meta = load_checkpoint(tiny_teacher)
    scenario = build_scenario(
        "untrusted", meta, rate=0.2, distill_size=600, trusted_size=200, test_size=200
    )
    config = DistillConfig(epochs=1, batch_size=64, device="cuda", eval_size=100, noise_rate=0.1)
    watch = _NoSyncInsideEpochs()
    try:
        result = run_method(method, teacher, meta, scenario, config, progress=watch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert watch.checked_steps >= 7 and result.metrics["flagged_samples"] is not None


def test_bf16_gpu_training_lands_where_cpu_training_does(
    small_train: ImageDataset, small_test: ImageDataset
) -> None:
    accs = {}
    for device in ("cpu", "cuda"):
        model = _fresh()
        train_model(model, small_train, TrainConfig(epochs=3, batch_size=64, device=device))
        accs[device] = evaluate(model.cpu(), small_test).acc
    assert abs(accs["cpu"] - accs["cuda"]) < 0.08, accs


def test_host_batches_on_the_gpu_match_resident_ones(small_train: ImageDataset) -> None:
    losses = {}
    for placement in ("device", "host"):
        config = TrainConfig(epochs=2, batch_size=64, device="cuda", data_placement=placement)
        history = train_model(_fresh(), small_train, config).history
        losses[placement] = [h["loss"] for h in history]
    # different generators (GPU vs host), same training: close, not equal
    assert losses["host"][-1] == pytest.approx(losses["device"][-1], rel=0.15)
