"""The progress bar the training verbs show: one tqdm bar over every step, with the last
epoch's metrics beside it."""

from __future__ import annotations

from typing import Any

_SHOWN = ("loss", "val_acc", "val_asr", "test_acc", "test_asr")


class _TrainBar:
    """A tqdm bar over all training steps, with the last epoch's metrics as postfix."""

    def __init__(self, disable: bool = False, desc: str = "") -> None:
        self.disable = disable
        self.desc = desc
        self.bar: Any = None

    def __enter__(self) -> _TrainBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self, event: Any) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(
                total=event.steps * event.epochs,
                unit="step",
                disable=self.disable,
                initial=(event.epoch - 1) * event.steps + event.step - 1,
                desc=self.desc or "training",
                dynamic_ncols=True,
            )
        if event.kind == "step":
            self.bar.update(1)
            self.bar.set_description(f"{self.desc} epoch {event.epoch}/{event.epochs}".strip())
        else:
            shown = {
                k: f"{v:.3f}"
                for k, v in event.metrics.items()
                if k in _SHOWN and isinstance(v, float)
            }
            self.bar.set_postfix(shown)
            if self.bar.n < event.epoch * event.steps:  # CUDA reports epochs only
                self.bar.update(event.epoch * event.steps - self.bar.n)
