"""Teacher recipes: attacks built to survive distillation, and attacks that know the defence.

A *recipe* changes how a backdoored teacher is made (``TeacherConfig.recipe``); without one a
teacher is plain data poisoning. Each recipe is a class in the registry ``RECIPES`` with its
options validated up front:

- ``optimized-blend``: train the teacher clean for ``warmup_epochs``, pick the ``top_k`` units
  (channel × position) of ``layer`` with the highest mean activation on clean images, learn a
  pattern and a soft mask (``max_mask · sigmoid``, so always in [0, max_mask]) that maximise
  those units' activation on triggered images, then keep training the teacher on data poisoned
  with that learned trigger (the optimised blended trigger of the RobustKD authors' code).
- ``adba``: the same learned trigger, then teacher training with a shadow student of the
  teacher's student architecture (an ADBA-style anti-distillation backdoor, ACM MM 2021). At
  every step (or every ``every``-th) the shadow is distilled from the teacher on the batch's
  clean images (``shadow_steps`` real SGD steps on the detached teacher logits); then one
  differentiable look-ahead KD step of the shadow is taken with the teacher's logits attached,
  and the look-ahead shadow's cross-entropy on the batch's poisoned images toward their
  backdoor labels, plus its cross-entropy on the clean images toward their true labels (so the
  backdoor is conditional on the trigger, not a lean of every soft label toward the target
  class), is added to the teacher's loss (weight ``weight``). Its gradient reaches the teacher
  through the soft labels of *clean* images, so the teacher learns soft labels on clean data
  that teach a student the backdoor. With ``joint`` (the default, as ADBA) the trigger — pattern
  and mask, still ≤ ``max_mask`` — goes on learning at every step (Adam, ``joint_lr``) from the
  teacher's loss and the look-ahead shadow's: it moves toward what a student of clean images
  answers to. Without it the trigger learned before training is planted as it is (the first
  version of this recipe).
- ``adaptive``: poisoning with the configured trigger, plus a penalty that knows the variance
  defence. Running (exponential) per-unit mean and standard deviation of the batch's clean
  images are kept at every stage output ``robustkd`` scores (``layers``, default all); the
  poisoned images' per-unit z-score ``|a − μ| / σ`` is penalised. ``variant="excess"`` adds the
  mean squared excess of ``z`` over ``k`` (each unit kept inside the clean range);
  ``variant="spread"`` adds, per poisoned image, the hinge excess of the mean of its largest
  ``z`` (the top ``top_share`` of units) over the same measure on clean images (running): the
  largest deviations are pushed down to a clean image's, so the trigger spreads over many
  units, each below the threshold (``k`` is unused). The hinge is much stronger than the
  excess term: weight 0.1 is what the ``fashion-adaptive-spread`` preset uses (at 1 the tiny
  teachers we tried lost most of their accuracy). ``scope="class"`` keeps the statistics per
  class and holds each triggered image inside the range of its own source class's clean images
  (what the label-aware screen within each class compares against), not of all images.
- ``adaptive-learned``: the same penalty (and ``scope``) with the trigger itself, a blend
  pattern and a soft mask, learned along with the teacher at every step.

Each recipe's per-epoch means of its loss terms join the teacher's training history, and the
recipe's name and options are recorded in the checkpoint metadata (``recipe``).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from robustkd.analysis.features import capture, resolve_layers
from robustkd.attacks import OptimizedBlendTrigger, Trigger
from robustkd.attacks.optimized_blend import fit_blends
from robustkd.data.datasets import ImageDataset, normalize, to_float
from robustkd.errors import ConfigError
from robustkd.models import create_model
from robustkd.registry import Registry
from robustkd.training import distributed
from robustkd.training.config import LossFn, ProgressFn, TrainConfig
from robustkd.training.device import resolve_device
from robustkd.training.engine import train_model
from robustkd.training.losses import logit_kd_loss

# --------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class Option:
    """One recipe option: its default, a test of a value, and what the test wants (in words)."""

    default: Any
    test: Callable[[Any], bool]
    expected: str


def _number(low: float, high: float = math.inf, low_open: bool = False) -> Callable[[Any], bool]:
    def test(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (v > low if low_open else v >= low) and v <= high

    return test


def _whole(low: int, high: int = 10**9) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _layer_list(v: Any) -> bool:
    return isinstance(v, str) or (
        isinstance(v, list) and bool(v) and all(isinstance(s, str) and s for s in v)
    )


_TRIGGER_OPTIONS: dict[str, Option] = {
    "warmup_epochs": Option(2, _whole(0, 1000), "a whole number of epochs from 0 to 1000"),
    "layer": Option("", lambda v: isinstance(v, str), "a layer name ('' = the last stage)"),
    "top_k": Option(20, _whole(1), "a whole number of at least 1"),
    "max_mask": Option(0.2, _number(0.0, 1.0, low_open=True), "a number in (0, 1]"),
    "steps": Option(300, _whole(1, 100_000), "a whole number of steps from 1 to 100000"),
    "trigger_lr": Option(0.1, _number(0.0, 10.0, low_open=True), "a number in (0, 10]"),
    "images": Option(2000, _whole(1), "a whole number of images of at least 1"),
}


# --------------------------------------------------------------------------- the recipe contract


class TeacherRecipe(abc.ABC):
    """How a teacher is made beyond plain poisoning: an optional learned trigger and an extra
    training loss. Subclasses set ``name``, ``description``, ``options`` and ``learns_trigger``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    learns_trigger: ClassVar[bool] = False
    #: the teacher's student architecture (train_teacher sets the config's)
    student_architecture: str = "small-cnn-student"

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - set(self.options))
        if unknown:
            raise ConfigError(
                f"The {self.name} recipe has no option {', '.join(map(repr, unknown))}; valid "
                f"ones are: {', '.join(self.options)}."
            )
        self.values: dict[str, Any] = {}
        for key, opt in self.options.items():
            value = values.get(key, opt.default)
            if not opt.test(value):
                raise ConfigError(
                    f"The {self.name} recipe's {key} must be {opt.expected}; got {value!r}."
                )
            self.values[key] = value
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        #: the learned trigger's objective at every step (empty when none was learned)
        self.trigger_history: list[float] = []

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., **options}`` with every option, defaults included."""
        return {"name": self.name, **self.values}

    def prepare(
        self,
        model: nn.Module,
        clean: ImageDataset,
        trigger: Trigger | None,
        train: TrainConfig,
        progress: ProgressFn | None = None,
    ) -> Trigger | None:
        """Run before poisoning (may train ``model`` and learn a trigger); the trigger to plant."""
        return trigger

    def current_trigger(self, trigger: Trigger | None) -> Trigger | None:
        """The trigger as it stands now (a recipe that learns it during training returns its
        latest version; the others the one they planted)."""
        return trigger

    # what trains beside the teacher (a learned trigger), saved with the training state so a
    # resume continues it; the engine's ``companion``
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    @abc.abstractmethod
    def loss_fn(
        self, model: nn.Module, poisoned: torch.Tensor, data: ImageDataset, train: TrainConfig
    ) -> LossFn:
        """The teacher's training loss; ``poisoned[i]`` says whether image ``i`` of ``data``
        carries the trigger."""

    # per-epoch means of the loss terms, drained into the training history; summed on the
    # device so that a CUDA step never waits to read them (as the engine's own loss)
    def _log(self, **terms: torch.Tensor) -> None:
        for key, value in terms.items():
            value = value.detach().float()
            self._sums[key] = self._sums[key] + value if key in self._sums else value
            self._counts[key] = self._counts.get(key, 0) + 1

    def epoch_terms(self) -> dict[str, float]:
        """The mean of each loss term since the last call (then reset)."""
        out = {f"recipe_{k}": float(self._sums[k]) / self._counts[k] for k in self._sums}
        self._sums, self._counts = {}, {}
        return out


RECIPES: Registry[type[TeacherRecipe]] = Registry("teacher recipe")


def recipe_names() -> list[str]:
    return RECIPES.names()


def recipe_from_dict(d: Mapping[str, Any] | None) -> TeacherRecipe | None:
    """The recipe described by ``{"name": ..., **options}`` (None for plain poisoning)."""
    if d is None:
        return None
    if not isinstance(d, Mapping) or not isinstance(d.get("name"), str):
        raise ConfigError(
            "A teacher recipe must be a mapping with a 'name' string and its options, e.g. "
            f"{{'name': 'adaptive', 'k': 3}}; got {d!r}."
        )
    values = dict(d)
    return RECIPES.get(values.pop("name"))(**values)


# what each recipe's teacher shows a student, in one phrase (the Triggers page says it)
_LESSONS = {
    "adba": "plain KD passes this backdoor on even when no distillation image carries the "
    "trigger; robustkd-reverse is built against it (docs/results.md)",
    "adaptive": "its triggered images' features are held inside the clean range, so the "
    "variance maps are quieter",
    "adaptive-learned": "its trigger was learned to stay inside the clean range at every stage",
}


def describe_recipe(recipe: object) -> str | None:
    """One sentence on how a teacher was made, from the recipe its checkpoint records (None
    when it records none; a checkpoint's metadata is not trusted, so anything is accepted)."""
    if not isinstance(recipe, Mapping) or not isinstance(recipe.get("name"), str):
        return None
    name = recipe["name"]
    if name not in RECIPES:
        return f"This teacher records a training recipe this version does not know ({name[:40]!r})."
    made = RECIPES.get(name)
    lesson = _LESSONS.get(made.name)
    return f"This teacher was trained with the `{made.name}` recipe ({made.description})" + (
        f": {lesson}." if lesson else "."
    )


# --------------------------------------------------------------------------- the learned trigger


def _top_units(
    model: nn.Module, layer: str, images: torch.Tensor, data: ImageDataset, top_k: int
) -> torch.Tensor:
    """Flat indices of the ``top_k`` units of ``layer`` most active on average on ``images``."""
    total: torch.Tensor | None = None
    with torch.no_grad(), capture(model, [layer]) as out:
        for start in range(0, len(images), 256):
            model(normalize(images[start : start + 256], data.mean, data.std))
            s = out[layer].float().flatten(1).sum(0)
            total = s if total is None else total + s
    assert total is not None
    if top_k > total.numel():
        raise ConfigError(
            f"top_k must be at most the {total.numel()} units of layer {layer!r}; got {top_k}."
        )
    return total.topk(top_k).indices


def learn_blend_trigger(
    model: nn.Module,
    data: ImageDataset,
    layer: str | None = None,
    top_k: int = 20,
    max_mask: float = 0.2,
    steps: int = 300,
    lr: float = 0.1,
    batch_size: int = 128,
    seed: int = 0,
) -> tuple[OptimizedBlendTrigger, list[float]]:
    """Learn a blend pattern and a mask in [0, max_mask] that drive the ``top_k`` most active
    units of ``layer`` (default: the last stage output) of ``model`` on ``data``.

    Returns the trigger and the objective (minus the units' mean activation) at every step.
    The model's weights are not changed; it is left in eval mode.
    """
    if data.in_channels not in (1, 3):
        raise ConfigError(
            "The optimized-blend trigger is learned for grey or RGB images; this data set has "
            f"{data.in_channels} channels."
        )
    stages = list(getattr(model, "feature_layers", []))
    (name,) = resolve_layers(model, [layer] if layer else stages[-1:] or None)
    device = next(model.parameters()).device
    model.eval()
    g = torch.Generator().manual_seed(seed)
    images = to_float(data.images).to(device)
    units = _top_units(model, name, images, data, top_k)

    with capture(model, [name]) as out:

        def objective(inputs: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            model(inputs)
            return -out[name].float().flatten(1)[:, units].mean()

        patterns, masks, history = fit_blends(
            model, images, data.mean, data.std, objective, 1, max_mask, steps, lr, batch_size, g
        )
    pattern, mask = patterns[0], masks[0]
    return OptimizedBlendTrigger.from_tensors(pattern, mask, max_mask), history


class _LearnsTrigger(TeacherRecipe):
    """Warm-up clean training, then the optimised blend trigger learned against the model."""

    learns_trigger = True

    def prepare(
        self,
        model: nn.Module,
        clean: ImageDataset,
        trigger: Trigger | None,
        train: TrainConfig,
        progress: ProgressFn | None = None,
    ) -> Trigger | None:
        if trigger is not None:  # a learned trigger given back (e.g. from a checkpoint)
            return trigger
        v = self.values
        if v["warmup_epochs"] > 0:
            warm = dataclasses.replace(train, epochs=v["warmup_epochs"])
            train_model(model, clean, warm, progress=progress)
        model.to(resolve_device(train.device))
        g = torch.Generator().manual_seed(train.seed)
        pick = torch.randperm(len(clean), generator=g)[: v["images"]]
        learned, self.trigger_history = learn_blend_trigger(
            model,
            clean.subset(pick),
            v["layer"] or None,
            v["top_k"],
            v["max_mask"],
            v["steps"],
            v["trigger_lr"],
            seed=train.seed,
        )
        model.train()
        return learned


class _TrainedTrigger:
    """A blend pattern and a soft mask (≤ ``max_mask``) trained *during* teacher training: Adam
    steps on the gradients the engine's backward leaves on them, the triggered rows of each
    batch stamped afresh with the trigger as it stands. Used by ``adaptive-learned`` and by
    ``adba`` with ``joint`` on; the host recipe has ``values["max_mask"]`` and the learning
    rate under ``_lr_key``."""

    values: dict[str, Any]
    name: ClassVar[str]
    #: the option that holds the trigger's learning rate
    _lr_key: ClassVar[str] = "trigger_lr"

    def _start_trigger(
        self, clean: ImageDataset, trigger: Trigger | None, train: TrainConfig
    ) -> None:
        """Set up the trainable trigger: from ``trigger`` when it is an optimised blend (learned
        before, or given back by a checkpoint), else a random pattern at a quarter of the bound
        everywhere (as learn_blend_trigger)."""
        if distributed.world_size() > 1:
            raise ConfigError(
                f"The {self.name} recipe learns its trigger in one process; train it without "
                "torchrun."
            )
        device = resolve_device(train.device)
        c, h, w = clean.input_shape
        max_mask = self.values["max_mask"]
        if isinstance(trigger, OptimizedBlendTrigger):  # go on from a given trigger
            pattern = torch.logit(trigger.pattern(c, h, w).float().clamp(0.01, 0.99))
            share = (trigger.mask(h, w).float() / max_mask).clamp(0.01, 0.99)
            mask = torch.logit(share)[None]
        else:
            g = torch.Generator().manual_seed(train.seed)
            pattern = torch.randn((c, h, w), generator=g) * 0.5
            mask = torch.full((1, h, w), -1.1)
        self._logits: tuple[torch.Tensor, torch.Tensor] | None = (
            pattern.to(device).requires_grad_(),
            mask.to(device).requires_grad_(),
        )
        self._opt: torch.optim.Optimizer | None = torch.optim.Adam(
            self._logits, lr=self.values[self._lr_key]
        )
        # the clean images, indexed as the poisoned set: triggered rows are stamped afresh at
        # every step with the trigger as it stands
        self._source: torch.Tensor | None = clean.images.to(device)

    def _trains_trigger(self) -> bool:
        return getattr(self, "_logits", None) is not None

    def _blend(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._logits is not None, "prepare() first"
        pattern, mask = self._logits
        return torch.sigmoid(pattern), self.values["max_mask"] * torch.sigmoid(mask)

    def _stamp(
        self, x: torch.Tensor, rows: torch.Tensor, bad: torch.Tensor, data: ImageDataset
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` with its triggered rows stamped now (not augmented, as a test image would
        be), differentiably in the trigger; and the mask, for the log."""
        assert self._source is not None, "prepare() first"
        pattern, mask = self._blend()
        if bool(bad.any()):
            mean = torch.tensor(data.mean, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(data.std, device=x.device).view(1, -1, 1, 1)
            clean = to_float(self._source[rows[bad]])
            stamped = ((1 - mask) * clean + mask * pattern - mean) / std
            x = x.clone()
            x[bad] = stamped.to(x.dtype)
        return x, mask

    def _flush(self) -> None:
        """The trigger's Adam step on the gradients the engine's last backward left on it
        (taken before the next step, and before the trigger is read or saved)."""
        if self._trains_trigger() and self._opt is not None:
            assert self._logits is not None
            if self._logits[0].grad is not None:
                self._opt.step()
                self._opt.zero_grad(set_to_none=True)

    def _trained_trigger(self, trigger: Trigger | None) -> Trigger | None:
        if not self._trains_trigger():
            return trigger
        self._flush()
        bound = self.values["max_mask"]
        with torch.no_grad():
            pattern, mask = self._blend()
            return OptimizedBlendTrigger.from_tensors(
                pattern.cpu(), mask.clamp(0.0, bound).cpu(), bound
            )

    def _trigger_state(self) -> dict[str, Any]:
        if not self._trains_trigger() or self._opt is None:
            return {}
        self._flush()
        assert self._logits is not None
        pattern, mask = self._logits
        return {
            "pattern": pattern.detach().cpu(),
            "mask": mask.detach().cpu(),
            "optimizer": self._opt.state_dict(),
        }

    def _load_trigger_state(self, state: dict[str, Any]) -> None:
        if not self._trains_trigger() or self._opt is None:
            raise ConfigError(f"The {self.name} recipe's state loads after prepare().")
        assert self._logits is not None
        with torch.no_grad():
            for mine, saved in zip(self._logits, (state["pattern"], state["mask"]), strict=True):
                mine.copy_(saved)
        self._opt.load_state_dict(state["optimizer"])


# --------------------------------------------------------------------------- the recipes


@RECIPES.register("optimized-blend")
class OptimizedBlendRecipe(_LearnsTrigger):
    """Learned blend trigger driving the most active units, then plain poisoning with it."""

    name = "optimized-blend"
    description = "learned blend trigger (mask ≤ max_mask) driving the teacher's most active units"
    options: ClassVar[dict[str, Option]] = dict(_TRIGGER_OPTIONS)

    def loss_fn(
        self, model: nn.Module, poisoned: torch.Tensor, data: ImageDataset, train: TrainConfig
    ) -> LossFn:
        smoothing = train.label_smoothing

        def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            ce = F.cross_entropy(m(x), y, label_smoothing=smoothing)
            self._log(ce=ce.detach())
            return ce

        return loss


@RECIPES.register("adba")
class ADBARecipe(_TrainedTrigger, _LearnsTrigger):
    """Learned trigger, then teacher steps that teach a shadow student the backdoor through
    its soft labels on clean images (ADBA-style); with ``joint`` the trigger goes on learning
    with the teacher and the shadow, toward what a student distilled on clean images answers
    to."""

    name = "adba"
    description = "anti-distillation backdoor: a shadow student distilled on clean images flips"
    _lr_key = "joint_lr"
    options: ClassVar[dict[str, Option]] = {
        **_TRIGGER_OPTIONS,
        "weight": Option(1.0, _number(0.0), "a number of at least 0"),
        "temperature": Option(4.0, _number(0.0, 100.0, low_open=True), "a number in (0, 100]"),
        "shadow_lr": Option(0.05, _number(0.0, 10.0, low_open=True), "a number in (0, 10]"),
        "shadow_steps": Option(1, _whole(1, 100), "a whole number from 1 to 100"),
        "lookahead_lr": Option(0.5, _number(0.0, 100.0, low_open=True), "a number in (0, 100]"),
        "student_architecture": Option(
            "", lambda v: isinstance(v, str), "an architecture name ('' = the teacher's student)"
        ),
        # the trigger (pattern and mask, still ≤ max_mask) trained on with the teacher and the
        # shadow, as ADBA does; off, the trigger learned before training is planted as it is
        "joint": Option(True, lambda v: isinstance(v, bool), "true or false"),
        "joint_lr": Option(0.02, _number(0.0, 10.0, low_open=True), "a number in (0, 10]"),
        # the shadow distils and the look-ahead term joins the loss at every ``every``-th step
        # only (the other steps are plain poisoned training): the look-ahead is the expensive
        # part, a second-order pass through the shadow and the teacher's soft labels
        "every": Option(1, _whole(1, 1000), "a whole number from 1 to 1000"),
    }

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        self.shadow: nn.Module | None = None
        self._shadow_opt: torch.optim.Optimizer | None = None
        self._steps = 0

    def prepare(
        self,
        model: nn.Module,
        clean: ImageDataset,
        trigger: Trigger | None,
        train: TrainConfig,
        progress: ProgressFn | None = None,
    ) -> Trigger | None:
        planted = super().prepare(model, clean, trigger, train, progress)
        if not self.values["joint"]:
            return planted
        self._start_trigger(clean, planted, train)
        return self.current_trigger(None)

    def current_trigger(self, trigger: Trigger | None) -> Trigger | None:
        return self._trained_trigger(trigger)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps": self._steps, **self._trigger_state()}
        if self.shadow is not None and self._shadow_opt is not None:
            state["shadow"] = self.shadow.state_dict()
            state["shadow_optimizer"] = self._shadow_opt.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.shadow is None or self._shadow_opt is None:
            raise ConfigError("The adba recipe's state loads after its loss is made.")
        self._steps = int(state.get("steps", 0))
        if "shadow" in state:
            self.shadow.load_state_dict(state["shadow"])
            self._shadow_opt.load_state_dict(state["shadow_optimizer"])
        if self.values["joint"]:
            self._load_trigger_state(state)

    def loss_fn(
        self, model: nn.Module, poisoned: torch.Tensor, data: ImageDataset, train: TrainConfig
    ) -> LossFn:
        v = self.values
        joint = v["joint"]
        assert not joint or self._trains_trigger(), "prepare() first"
        device = next(model.parameters()).device
        torch.manual_seed(train.seed + 1)  # the shadow's initialisation, reproducible
        shadow = create_model(
            v["student_architecture"] or self.student_architecture,
            num_classes=data.num_classes,
            in_channels=data.in_channels,
            image_size=data.image_size,
        ).to(device)
        shadow.train()
        shadow_opt = torch.optim.SGD(shadow.parameters(), lr=v["shadow_lr"], momentum=0.9)
        self.shadow, self._shadow_opt = shadow, shadow_opt
        marks = poisoned.to(device)
        temp, weight, inner_lr, every = v["temperature"], v["weight"], v["lookahead_lr"], v["every"]
        smoothing = train.label_smoothing

        def kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
            # logit_kd_loss detaches the teacher; the look-ahead needs its gradient
            log_s = F.log_softmax(student_logits / temp, dim=1)
            log_t = F.log_softmax(teacher_logits / temp, dim=1)
            return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temp**2

        def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            rows = idx.to(device)
            bad = marks[rows]
            terms: dict[str, torch.Tensor] = {}
            if joint:
                self._flush()
                x, mask = self._stamp(x, rows, bad, data)
                terms["mask"] = mask.detach().mean()
            logits = m(x)
            ce = F.cross_entropy(logits, y, label_smoothing=smoothing)
            self._steps += 1
            if not bool(bad.any()) or bool(bad.all()) or (self._steps - 1) % every:
                self._log(ce=ce.detach(), **terms)
                return ce
            # the clean images carry no trigger: detached, so the shadow's own steps never
            # reach back into the trigger's graph
            xc, tc = x[~bad].detach(), logits[~bad]
            for _ in range(v["shadow_steps"]):  # the shadow student's own distillation
                shadow_opt.zero_grad(set_to_none=True)
                logit_kd_loss(shadow(xc), tc, temp).backward()
                shadow_opt.step()
            shadow_opt.zero_grad(set_to_none=True)
            params = dict(shadow.named_parameters())
            buffers = dict(shadow.named_buffers())
            inner = kd(functional_call(shadow, (params, buffers), (xc,)), tc)
            grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
            ahead = {k: p - inner_lr * g for (k, p), g in zip(params.items(), grads, strict=True)}
            # the look-ahead shadow must flip triggered images *and* stay right on clean ones:
            # without the clean term the cheapest teacher is one whose clean soft labels lean to
            # the target class (a class bias, not a trigger-conditional backdoor). With
            # ``joint`` the flip's gradient also reaches the trigger through the stamped images:
            # the trigger moves toward what the shadow, a student of clean images, answers to
            nb = int(bad.sum())
            out = functional_call(shadow, (ahead, buffers), (torch.cat([x[bad], xc]),))
            flipped = F.cross_entropy(out[:nb], y[bad])
            kept = F.cross_entropy(out[nb:], y[~bad])
            self._log(
                ce=ce.detach(),
                shadow_kd=inner.detach(),
                shadow_backdoor=flipped.detach(),
                shadow_clean=kept.detach(),
                **terms,
            )
            return ce + weight * (flipped + kept)

        return loss


@RECIPES.register("adaptive")
class AdaptiveRecipe(TeacherRecipe):
    """Poisoning plus a penalty keeping triggered images' per-unit deviation inside the clean
    range at the stages the variance defence scores."""

    name = "adaptive"
    description = "adaptive attack: triggered features kept inside the clean per-unit range"
    options: ClassVar[dict[str, Option]] = {
        "variant": Option("excess", lambda v: v in ("excess", "spread"), "'excess' or 'spread'"),
        "k": Option(2.0, _number(0.0, 100.0, low_open=True), "a number in (0, 100]"),  # excess
        "weight": Option(1.0, _number(0.0), "a number of at least 0"),
        "momentum": Option(0.9, _number(0.0, 1.0), "a number in [0, 1]"),
        "top_share": Option(0.01, _number(0.0, 1.0, low_open=True), "a fraction in (0, 1]"),
        "layers": Option("all", _layer_list, "'all' or a list of layer names"),
        # "train": the penalty sees the training forward pass (batch norm on batch statistics);
        # "eval": the features as the defence measures them (batch norm on its running
        # statistics), one more forward pass per step. "eval" lowered the tiny test's score
        # less, and at full size it wrecked training (val ACC 10 % after 2 epochs, see
        # docs/results.md): the running statistics lag the weights the penalty moves
        "features": Option("train", lambda v: v in ("eval", "train"), "'eval' or 'train'"),
        # "all": one clean range over every image (what the variance screen over all samples
        # sees); "class": each triggered image held inside the range of its own (source)
        # class's clean images, what the label-aware screen within each class sees
        "scope": Option("all", lambda v: v in ("all", "class"), "'all' or 'class'"),
    }

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        # per unit (scope "all") or per class × unit (scope "class")
        self._means: dict[str, torch.Tensor] = {}
        self._variances: dict[str, torch.Tensor] = {}
        self._seen: dict[str, torch.Tensor] = {}  # scope "class": the classes seen so far
        self._tops: dict[str, torch.Tensor] = {}  # clean images' mean largest z (spread)
        self._device = torch.device("cpu")
        self._classes: torch.Tensor | None = None  # each training image's own (source) class
        self._num_classes = 0

    def _running(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "means": self._means,
            "variances": self._variances,
            "seen": self._seen,
            "tops": self._tops,
        }

    def prepare(
        self,
        model: nn.Module,
        clean: ImageDataset,
        trigger: Trigger | None,
        train: TrainConfig,
        progress: ProgressFn | None = None,
    ) -> Trigger | None:
        # the labels before poisoning relabels the triggered images (indexed as the poisoned set)
        self._classes, self._num_classes = clean.labels.clone(), clean.num_classes
        return trigger

    def state_dict(self) -> dict[str, Any]:
        return self._running()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # into the dicts the penalty holds, on the device loss_fn put the model on
        for key, mine in self._running().items():
            mine.update({n: t.to(self._device) for n, t in state.get(key, {}).items()})

    def _penalty(self) -> Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """``penalty(layer, activations, bad, classes)``: the term for the triggered rows
        ``bad`` of one stage's activations, with the clean rows' running statistics updated on
        the way; ``classes`` (each row's source class) matters for scope "class" only."""
        v = self.values
        # the running statistics live on the recipe, so that they resume with the training state
        means, variances, tops = self._means, self._variances, self._tops
        k, momentum, top_share = v["k"], v["momentum"], v["top_share"]
        by_class = v["scope"] == "class"

        def update(n: str, clean: torch.Tensor, cls: torch.Tensor) -> None:
            """Running clean statistics, never through the gradient: per unit, or per class ×
            unit from each class with at least two clean rows in the batch."""
            if not by_class:
                if len(clean) < 2:
                    return
                mu, var = clean.mean(0), clean.var(0)
                if n in means:
                    means[n] = momentum * means[n] + (1 - momentum) * mu
                    variances[n] = momentum * variances[n] + (1 - momentum) * var
                else:
                    means[n], variances[n] = mu, var
                return
            if n not in means:
                shape = (self._num_classes, clean.shape[1])
                means[n], variances[n] = clean.new_zeros(shape), clean.new_zeros(shape)
                self._seen[n] = torch.zeros(
                    self._num_classes, dtype=torch.bool, device=clean.device
                )
            count = torch.bincount(cls, minlength=self._num_classes).to(clean.dtype)[:, None]
            total = clean.new_zeros(means[n].shape).index_add_(0, cls, clean)
            squares = clean.new_zeros(means[n].shape).index_add_(0, cls, clean * clean)
            mu = total / count.clamp(min=1)
            var = ((squares - count * mu * mu) / (count - 1).clamp(min=1)).clamp(min=0)
            here = count[:, 0] >= 2
            seen = self._seen[n]
            blend = torch.where(seen & here, momentum, torch.where(here, 0.0, 1.0))[:, None]
            means[n] = blend * means[n] + (1 - blend) * mu
            variances[n] = blend * variances[n] + (1 - blend) * var
            self._seen[n] = seen | here

        def penalty(n: str, a: torch.Tensor, bad: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
            a = a.float().flatten(1)
            clean = a[~bad].detach()
            update(n, clean, cls[~bad])
            if n not in means or not bool(bad.any()):
                return a.new_zeros(())
            # the same floor as variance_score keeps silent units from exploding the z-scores
            var = variances[n]
            if by_class:  # the triggered rows of classes seen so far, against their own class
                rows = bad & self._seen[n][cls]
                if not bool(rows.any()):
                    return a.new_zeros(())
                mine = var[cls[rows]]
                std = (mine + 0.1 * mine.mean(1, keepdim=True)).sqrt() + 1e-6
                z = (a[rows] - means[n][cls[rows]]).abs() / std
                known = cls[~bad][self._seen[n][cls[~bad]]]
                clean = clean[self._seen[n][cls[~bad]]]
                std_clean = (var + 0.1 * var.mean(1, keepdim=True)).sqrt()[known] + 1e-6
                centre_clean = means[n][known]
            else:
                std = (var + 0.1 * var.mean()).sqrt() + 1e-6
                z = (a[bad] - means[n]).abs() / std
                std_clean, centre_clean = std, means[n]
            if v["variant"] == "excess":
                return F.relu(z - k).pow(2).mean()
            # the mean of each image's largest deviations, pushed down to what a clean image
            # shows (running, like the statistics) with a bounded (hinge) gradient, so the
            # push moves on to the next units instead of exploding
            share = max(1, round(top_share * z.shape[1]))
            with torch.no_grad():
                zc = (clean - centre_clean).abs() / std_clean
                ref = zc.topk(share, dim=1).values.mean() if len(clean) else None
            if ref is not None:
                tops[n] = ref if n not in tops else momentum * tops[n] + (1 - momentum) * ref
            top = z.topk(share, dim=1).values.mean(1)
            return F.relu(top - tops[n]).mean() if n in tops else a.new_zeros(())

        return penalty

    def _source_classes(self, data: ImageDataset, device: torch.device) -> torch.Tensor:
        """Each training image's class before poisoning (the poisoned set's labels where
        prepare() did not record them: then triggered rows count as the target class)."""
        if self._classes is None or len(self._classes) != len(data):
            self._classes, self._num_classes = data.labels.clone(), data.num_classes
        return self._classes.to(device)

    def loss_fn(
        self, model: nn.Module, poisoned: torch.Tensor, data: ImageDataset, train: TrainConfig
    ) -> LossFn:
        v = self.values
        names = resolve_layers(model, None if v["layers"] == "all" else v["layers"])
        device = self._device = next(model.parameters()).device
        marks = poisoned.to(device)
        classes = self._source_classes(data, device)
        penalty = self._penalty()
        weight, smoothing = v["weight"], train.label_smoothing

        def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            rows = idx.to(device)
            bad, cls = marks[rows], classes[rows]
            with capture(model, names) as out:  # hooks on the model itself, under DDP too
                logits = m(x)
            ce = F.cross_entropy(logits, y, label_smoothing=smoothing)
            if v["features"] == "eval" and model.training:
                # the module itself (not a DDP or compiled wrapper): one backward takes both
                # passes' gradients, and batch norm's running statistics are left as they are
                model.eval()
                try:
                    with capture(model, names) as out:
                        model(x)
                finally:
                    model.train()
            pen = sum((penalty(n, out[n], bad, cls) for n in names), logits.new_zeros(()))
            self._log(ce=ce.detach(), penalty=pen.detach())
            return ce + weight * pen

        return loss


@RECIPES.register("adaptive-learned")
class AdaptiveLearnedRecipe(_TrainedTrigger, AdaptiveRecipe):
    """The adaptive penalty with a trigger learned *during* teacher training: a blend pattern
    and a soft mask (≤ ``max_mask``) updated at every step, by Adam, on the same loss as the
    teacher — the triggered images' cross-entropy toward the target plus the per-unit penalty at
    every stage — so the trigger itself is shaped to stay inside the clean range, first stage
    included, while the teacher learns it."""

    name = "adaptive-learned"
    description = (
        "adaptive attack with a learned trigger: pattern and mask trained with the teacher to "
        "stay inside the clean per-unit range at every stage"
    )
    learns_trigger = True
    options: ClassVar[dict[str, Option]] = {
        # the penalty sees the training pass (no ``features`` option: "eval" wrecked training)
        **{k: o for k, o in AdaptiveRecipe.options.items() if k != "features"},
        "max_mask": Option(0.2, _number(0.0, 1.0, low_open=True), "a number in (0, 1]"),
        "trigger_lr": Option(0.02, _number(0.0, 10.0, low_open=True), "a number in (0, 10]"),
    }

    def prepare(
        self,
        model: nn.Module,
        clean: ImageDataset,
        trigger: Trigger | None,
        train: TrainConfig,
        progress: ProgressFn | None = None,
    ) -> Trigger | None:
        if clean.in_channels not in (1, 3):
            raise ConfigError(
                "The adaptive-learned trigger is learned for grey or RGB images; this data set "
                f"has {clean.in_channels} channels."
            )
        super().prepare(model, clean, trigger, train, progress)
        self._start_trigger(clean, trigger, train)
        return self.current_trigger(None)

    def current_trigger(self, trigger: Trigger | None) -> Trigger | None:
        return self._trained_trigger(trigger)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self._trigger_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._load_trigger_state(state)

    def loss_fn(
        self, model: nn.Module, poisoned: torch.Tensor, data: ImageDataset, train: TrainConfig
    ) -> LossFn:
        assert self._trains_trigger(), "prepare() first"
        v = self.values
        names = resolve_layers(model, None if v["layers"] == "all" else v["layers"])
        device = self._device = next(model.parameters()).device
        marks = poisoned.to(device)
        classes = self._source_classes(data, device)
        penalty = self._penalty()
        weight, smoothing = v["weight"], train.label_smoothing

        def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            self._flush()
            rows = idx.to(device)
            bad, cls = marks[rows], classes[rows]
            x, mask = self._stamp(x, rows, bad, data)
            with capture(model, names) as out:
                logits = m(x)
            ce = F.cross_entropy(logits, y, label_smoothing=smoothing)
            pen = sum((penalty(n, out[n], bad, cls) for n in names), logits.new_zeros(()))
            self._log(ce=ce.detach(), penalty=pen.detach(), mask=mask.detach().mean())
            return ce + weight * pen

        return loss
