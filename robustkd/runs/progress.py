"""Progress of a run for the user: ``RunProgress`` (the training callback that keeps a run's
status and metrics current and raises ``RunCancelled`` on request), ``eta_seconds``,
``progress_fraction`` and ``run_label`` (a run's state as listings show it)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from robustkd.runs.store import TERMINAL_STATES, Run, RunCancelled, _now


def run_label(status: Mapping[str, Any], position: int | None = None) -> str:
    """A run's state as listings show it: ``queued (position N)`` while it waits its turn."""
    state = str(status.get("state"))
    return f"{state} (position {position})" if state == "queued" and position else state


def eta_seconds(elapsed: float, done: int, total: int) -> float | None:
    """Seconds left if the remaining ``total - done`` units go at the rate seen so far."""
    try:
        if done <= 0 or total <= 0 or elapsed < 0 or not math.isfinite(elapsed):
            return None
    except TypeError:
        return None
    if done >= total:
        return 0.0
    return elapsed / done * (total - done)


class RunProgress:
    """Progress callback for ``train_model`` that keeps a run's status and metrics current.

    ``step`` events update ``status.json`` at most every ``interval`` seconds; ``epoch``
    events append ``{"phase", "epoch", **metrics}`` to ``metrics.jsonl`` and update the
    status. Raises ``RunCancelled`` once the run's cancel was requested. ``inner`` (a tqdm
    bar's callback, say) receives every event first.
    """

    def __init__(
        self,
        run: Run,
        phase: str = "",
        inner: Callable[[Any], Any] | None = None,
        *,
        interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run = run
        self.phase = phase
        self.inner = inner
        self.interval = interval
        self._clock = clock
        self._started = clock()
        self._last_write = -math.inf
        self._base_units: int | None = None  # units already done when we first heard

    def __call__(self, event: Any) -> None:
        if self.inner is not None:
            self.inner(event)
        kind = getattr(event, "kind", None)
        if kind in ("step", "epoch"):
            now = self._clock()
            if kind == "epoch":
                self._on_epoch(event, now)
            elif now - self._last_write >= self.interval:
                self._write_status(event, now)
        if self.run.cancel_requested():
            raise RunCancelled()

    def _on_epoch(self, event: Any, now: float) -> None:
        metrics = dict(getattr(event, "metrics", None) or {})
        record: dict[str, Any] = {"phase": self.phase, "epoch": event.epoch}
        if not metrics:
            record.update(loss=getattr(event, "loss", None), seconds=getattr(event, "seconds", 0))
        record.update(metrics)
        record.setdefault("time", _now())
        self.run.log_metrics(record)
        self._write_status(event, now)

    def _write_status(self, event: Any, now: float) -> None:
        epoch, epochs = int(event.epoch), int(event.epochs)
        step, steps = int(event.step), int(event.steps)
        done = (epoch - 1) * steps + step
        if self._base_units is None:  # e.g. resumed at a later epoch: time only what we saw
            self._base_units = done - (steps if event.kind == "epoch" else 1)
        eta = eta_seconds(
            now - self._started, done - self._base_units, epochs * steps - self._base_units
        )
        self.run.update_status(
            phase=self.phase,
            epoch=epoch,
            epochs=epochs,
            step=step,
            steps=steps,
            loss=getattr(event, "loss", None),
            eta_seconds=None if eta is None else round(eta, 1),
        )
        self._last_write = now


def progress_fraction(status: Mapping[str, Any]) -> float:
    """Progress of a run's current phase in [0, 1], from its status (1 when it is over)."""
    if status.get("state") in TERMINAL_STATES:
        return 1.0
    epoch, epochs = status.get("epoch") or 0, status.get("epochs") or 0
    step, steps = status.get("step") or 0, status.get("steps") or 0
    if not epochs:
        return 0.0
    done = max(0, epoch - 1) + (step / steps if steps else 0)
    return max(0.0, min(1.0, done / epochs))
