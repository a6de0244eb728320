from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from robustkd.analysis.metrics import evaluate
from robustkd.data.datasets import ImageDataset
from robustkd.errors import CheckpointError, ConfigError
from robustkd.models import create_model
from robustkd.training.augment import augment_batch
from robustkd.training.config import DivergedError, TrainConfig, lr_factor
from robustkd.training.engine import train_model


def _config(**kw: object) -> TrainConfig:
    base = {"epochs": 2, "batch_size": 64, "lr": 0.05, "seed": 0, "device": "cpu"}
    return TrainConfig(**{**base, **kw})


def _fresh() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("small-cnn-student")


def test_training_learns(small_train: ImageDataset, small_test: ImageDataset) -> None:
    model = _fresh()
    events = []
    result = train_model(
        model,
        small_train,
        _config(epochs=3),
        progress=events.append,
        evaluate=lambda m: {"val_acc": evaluate(m, small_test).acc},
    )
    acc = evaluate(model, small_test).acc
    assert acc > 0.5, acc  # 10 classes: chance is 0.1
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[-1]["val_acc"] == pytest.approx(acc)
    steps = [e for e in events if e.kind == "step"]
    assert len(steps) == 3 * 10 and steps[-1].step == steps[-1].steps == 10
    assert result.history[0]["loss"] > result.history[-1]["loss"]


def test_same_seed_same_weights(small_train: ImageDataset) -> None:
    a, b = _fresh(), _fresh()
    train_model(a, small_train, _config(epochs=1))
    train_model(b, small_train, _config(epochs=1))
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)


def test_resume_replays_the_same_run(small_train: ImageDataset, tmp_path: Path) -> None:
    full = _fresh()
    train_model(full, small_train, _config(epochs=2))

    class StopError(Exception):
        pass

    def crash_after_first_epoch(event) -> None:
        if event.kind == "epoch" and event.epoch == 1:
            raise StopError

    state = tmp_path / "run.state.pt"
    interrupted = _fresh()
    with pytest.raises(StopError):
        train_model(
            interrupted,
            small_train,
            _config(epochs=2),
            state_path=state,
            progress=crash_after_first_epoch,
        )
    assert state.exists()
    resumed = _fresh()
    result = train_model(resumed, small_train, _config(epochs=2), state_path=state, resume=True)
    assert result.resumed_from == 1 and len(result.history) == 2
    for pa, pb in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(pa.float(), pb.float(), atol=1e-6)


def test_resume_refuses_other_options(small_train: ImageDataset, tmp_path: Path) -> None:
    state = tmp_path / "s.pt"
    train_model(_fresh(), small_train.subset(range(64)), _config(epochs=1), state_path=state)
    with pytest.raises(Exception, match="training options differ"):
        train_model(
            _fresh(),
            small_train.subset(range(64)),
            _config(epochs=2, lr=0.1),
            state_path=state,
            resume=True,
        )


def test_resume_refuses_another_identity(small_train: ImageDataset, tmp_path: Path) -> None:
    """What else made the run (a teacher recipe's options) must match too; a state saved
    without one resumes as before."""
    state, data = tmp_path / "s.pt", small_train.subset(range(64))
    made = {"recipe": {"name": "adaptive", "variant": "excess", "k": 2.0}}
    train_model(_fresh(), data, _config(epochs=1), state_path=state, identity=made)
    other = {"recipe": {"name": "adaptive", "variant": "excess", "k": 3.0}}
    with pytest.raises(CheckpointError, match="made with other recipe options") as exc:
        train_model(_fresh(), data, _config(epochs=2), state_path=state, resume=True,
                    identity=other)  # fmt: skip
    assert "\n" not in str(exc.value) and "delete the state file" in str(exc.value)
    result = train_model(_fresh(), data, _config(epochs=2), state_path=state, resume=True,
                         identity=made)  # fmt: skip
    assert result.resumed_from == 1
    saved = torch.load(state, weights_only=True)
    torch.save({**saved, "identity": ["not", "a", "dict"]}, state)  # a tampered file
    with pytest.raises(CheckpointError, match="not readable"):
        train_model(_fresh(), data, _config(epochs=3), state_path=state, resume=True,
                    identity=made)  # fmt: skip
    del saved["identity"]  # as written before identities were saved
    torch.save(saved, state)
    result = train_model(_fresh(), data, _config(epochs=3), state_path=state, resume=True,
                         identity=other)  # fmt: skip
    assert result.resumed_from == 2


def test_nan_loss_stops_with_a_message(small_train: ImageDataset) -> None:
    def bad_loss(m, x, y, idx):
        return m(x).sum() * float("nan")

    with pytest.raises(DivergedError, match="lower the learning rate"):
        train_model(_fresh(), small_train.subset(range(64)), _config(epochs=1), loss_fn=bad_loss)


@pytest.mark.parametrize(
    "kw",
    [
        {"epochs": 0},
        {"lr": -1.0},
        {"optimizer": "lbfgs"},
        {"schedule": "warm"},
        {"augment": "mixup"},
        {"batch_size": 0},
    ],
)
def test_config_validation(kw: dict) -> None:
    with pytest.raises(ConfigError):
        _config(**kw).validate()


def test_unknown_option_in_dict() -> None:
    with pytest.raises(ConfigError, match="epochz"):
        TrainConfig.from_dict({"epochz": 3})


def test_augment_crop_shifts_and_keeps_shape() -> None:
    x = torch.zeros(8, 1, 6, 6)
    x[:, :, 2:4, 2:4] = 1.0
    g = torch.Generator().manual_seed(0)
    y = augment_batch(x, "crop", 2, g)
    assert y.shape == x.shape and torch.all(y.sum((1, 2, 3)) == 4)  # the square stays inside
    assert not torch.equal(y, x)
    assert torch.equal(augment_batch(x, "none", 2, g), x)
    assert torch.equal(augment_batch(x, "crop", 0, g), x)


def test_lr_schedules() -> None:
    assert lr_factor("cosine", 0.0) == 1.0 and lr_factor("cosine", 1.0) == pytest.approx(0.0)
    assert [lr_factor("paper", p) for p in (0.1, 0.6, 0.8)] == [1.0, 0.1, 0.01]
    assert lr_factor("constant", 0.9) == 1.0


def _weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(pa, pb)
        for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_host_batches_through_workers_match_resident_data(small_train: ImageDataset) -> None:
    # The path for data sets too large for the GPU: the same batches, gathered by DataLoader
    # workers from host memory.
    a, b = _fresh(), _fresh()
    train_model(a, small_train, _config(epochs=2, data_placement="device"))
    train_model(b, small_train, _config(epochs=2, data_placement="host"))
    assert _weights_equal(a, b)


def test_compiled_steps_match_eager(small_train: ImageDataset) -> None:
    a, b = _fresh(), _fresh()
    ra = train_model(a, small_train, _config(epochs=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback: it really compiled
        rb = train_model(b, small_train, _config(epochs=1, compile="default"))
    assert rb.history[0]["loss"] == pytest.approx(ra.history[0]["loss"], rel=1e-4)


def test_a_failing_compile_falls_back_to_eager(
    small_train: ImageDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch._dynamo
    import torch._inductor.config as inductor

    torch._dynamo.reset()  # forget graphs compiled by other tests
    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))  # as on a machine without one
    a, b = _fresh(), _fresh()
    train_model(a, small_train, _config(epochs=1))
    with pytest.warns(RuntimeWarning, match="training continues without it"):
        train_model(b, small_train, _config(epochs=1, compile="default"))
    assert _weights_equal(a, b)  # the failed first step was redone eagerly
    torch._dynamo.reset()


@pytest.mark.parametrize("key,value", [("compile", "fast"), ("data_placement", "gpu")])
def test_unknown_speed_options_are_refused(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match="choose one of"):
        _config(**{key: value}).validate()


def test_speed_options_may_change_on_resume(small_train: ImageDataset, tmp_path: Path) -> None:
    state = tmp_path / "s.state.pt"
    train_model(_fresh(), small_train, _config(epochs=1), state_path=state)
    result = train_model(
        _fresh(),
        small_train,
        _config(epochs=2, data_placement="host"),
        state_path=state,
        resume=True,
    )
    assert result.resumed_from == 1 and len(result.history) == 2
