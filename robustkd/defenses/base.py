"""The contract every method (defence or baseline) fulfils, and the registry that names them.

A method is a class with a ``name``, a one-line ``description``, an ``order`` (its place in
the CLI's default list, the app's picker and the reports), what it ``produces`` (a student, or
a repaired teacher) and the ``DistillConfig`` fields it reads (``options``). ``Method.run`` is
the one verb: it measures whatever the subclass's ``train`` returns, the same way for all.
Students distilled from a teacher subclass ``StudentMethod`` and say only how (a ``Recipe``).
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import nn

from robustkd.defenses.detox import Detoxifier
from robustkd.registry import Registry
from robustkd.training.config import ProgressFn
from robustkd.training.distill import (
    DistillConfig,
    Found,
    MethodResult,
    distill_student,
    final_metrics,
    student_for,
    teacher_predictions,
)
from robustkd.training.scenarios import Scenario

Produces = Literal["student", "teacher"]
PRODUCES: tuple[Produces, ...] = ("student", "teacher")
OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(DistillConfig))


@dataclasses.dataclass
class Context:
    """What one call of a method works with: the teacher, the data, the settings, the caches."""

    method: str
    teacher: nn.Module
    teacher_meta: dict[str, Any]
    scenario: Scenario
    config: DistillConfig
    progress: ProgressFn | None
    shared: dict[str, Any]  # reused by the methods of one comparison (the threshold fit …)
    state_dir: Path | None

    def state_path(self, phase: str = "") -> Path | None:
        """Where training ``phase`` saves its state after each epoch; None: nowhere."""
        if self.state_dir is None:
            return None
        return self.state_dir / f"{self.method}{phase}.state.pt"


@dataclasses.dataclass
class Trained:
    """What a method's training returns, before it is measured."""

    model: nn.Module
    history: list[dict[str, Any]]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # added to the metrics
    detoxifier: Detoxifier | None = None
    screen_scores: torch.Tensor | None = None
    withheld: torch.Tensor | None = None
    found: Found | None = None


class Method(abc.ABC):
    """One defence or baseline; subclasses set the class attributes and implement ``train``."""

    name: ClassVar[str]
    description: ClassVar[str]
    order: ClassVar[int]
    produces: ClassVar[Produces] = "student"
    # the DistillConfig fields this method reads beyond the training schedule (epochs, lr, …)
    options: ClassVar[tuple[str, ...]] = ()

    def run(
        self,
        teacher: nn.Module,
        teacher_meta: dict[str, Any],
        scenario: Scenario,
        config: DistillConfig,
        progress: ProgressFn | None = None,
        shared: dict[str, Any] | None = None,
        state_dir: Path | None = None,
    ) -> MethodResult:
        """Train on ``scenario`` and measure the result on its test set."""
        config.validate()
        shared = {} if shared is None else shared
        preds = teacher_predictions(teacher, scenario, shared)
        ctx = Context(
            self.name, teacher.eval(), teacher_meta, scenario, config, progress, shared, state_dir
        )
        started = time.perf_counter()
        out = self.train(ctx)
        metrics = final_metrics(out.model, scenario, self.name, config, preds)
        metrics.update(out.extra)
        metrics["train_seconds"] = round(time.perf_counter() - started, 1)
        return MethodResult(
            self.name,
            out.model,
            metrics,
            out.history,
            out.detoxifier,
            out.screen_scores,
            out.withheld,
            out.found,
        )

    @abc.abstractmethod
    def train(self, ctx: Context) -> Trained:
        """Produce this method's model (a student or a repaired teacher) from ``ctx``."""


@dataclasses.dataclass
class Recipe:
    """How a student is distilled: the teacher it reads, the loss weights, what was found."""

    teacher: nn.Module
    logit_weight: float = 0.0
    feature_weight: float = 0.0
    nad_weight: float = 0.0
    noise_rate: float = 0.0
    # changes the student's input (never the teacher's): robustkd-reverse's stamped triggers
    student_input: Callable[[torch.Tensor], torch.Tensor] | None = None
    detoxifier: Detoxifier | None = None  # attached to the teacher while it is read
    withheld: torch.Tensor | None = None  # per distillation sample: no teacher signal
    screen_scores: torch.Tensor | None = None
    found: Found | None = None  # kept in the run folder: robustkd-reverse's triggers
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


class StudentMethod(Method):
    """A method whose result is a new student trained on the distillation set."""

    produces: ClassVar[Produces] = "student"

    def train(self, ctx: Context) -> Trained:
        """Build the student, then distil it as ``recipe`` says."""
        # the student first: its seeded initialisation comes before any fit the recipe makes
        student = student_for(ctx.teacher, ctx.scenario, ctx.config, ctx.teacher_meta)
        r = self.recipe(ctx)
        history = distill_student(
            r.teacher,
            student,
            ctx.scenario,
            ctx.config,
            detoxifier=r.detoxifier,
            withheld=r.withheld,
            logit_weight=r.logit_weight,
            feature_weight=r.feature_weight,
            nad_weight=r.nad_weight,
            noise_rate=r.noise_rate,
            student_input=r.student_input,
            progress=ctx.progress,
            state_path=ctx.state_path(),
        )
        return Trained(
            student, history, r.extra, r.detoxifier, r.screen_scores, r.withheld, r.found
        )

    @abc.abstractmethod
    def recipe(self, ctx: Context) -> Recipe:
        """The teacher, losses and defence this method distils the student with."""


METHODS: Registry[type[Method]] = Registry("method")
M = TypeVar("M", bound=type[Method])


def register_method(cls: M) -> M:
    """Class decorator: check ``cls``'s attributes and register it under ``cls.name``."""
    for attr in ("name", "description", "order"):
        if not hasattr(cls, attr):
            raise TypeError(f"Method class {cls.__name__} sets no {attr!r}.")
    if inspect.isabstract(cls):
        missing = sorted(cls.__abstractmethods__)
        raise TypeError(f"Method class {cls.__name__} does not implement {missing}.")
    if cls.name != cls.name.lower():
        raise TypeError(f"Method names are lower case; got {cls.name!r}.")
    if cls.produces not in PRODUCES:
        raise TypeError(f"Method {cls.name!r} produces {cls.produces!r}; not one of {PRODUCES}.")
    unknown = sorted(set(cls.options) - OPTION_NAMES)
    if unknown:
        raise TypeError(f"Method {cls.name!r} reads unknown DistillConfig fields {unknown}.")
    return METHODS.register(cls.name)(cls)


def method_names() -> list[str]:
    """The registered methods' names in their ``order`` (CLI default, app picker, reports)."""
    return sorted(METHODS, key=lambda name: (METHODS.get(name).order, name))


def run_method(
    method: str,
    teacher: nn.Module,
    teacher_meta: dict[str, Any],
    scenario: Scenario,
    config: DistillConfig,
    progress: ProgressFn | None = None,
    shared: dict[str, Any] | None = None,
    state_dir: Path | None = None,
) -> MethodResult:
    """Run the registered method ``method`` on ``scenario`` and measure it on its test set.

    ``shared`` caches what several methods reuse (the threshold fit) within one comparison;
    with ``state_dir`` every training phase saves its state after each epoch there and
    continues from it when called again (resuming a killed run). Import ``robustkd.defenses``
    (not this module alone) so that every family has registered its methods.
    """
    return METHODS.get(method)().run(
        teacher, teacher_meta, scenario, config, progress, shared, state_dir
    )
