"""Teachers trained by other backdoor toolkits: read their files, rename their weights to ours.

Three steps, each a function a test can call:

1. ``read_foreign(path)`` reads a ``.pt``/``.pth``/``.bin`` file with ``torch.load(weights_only=
   True)`` (plus numpy's array-rebuilding globals and nothing else, for BackdoorBench's result
   files) or a ``.safetensors`` file, unwraps the weights and reports what the file itself says
   (``hints``: toolkit, architecture, classes, input shape, normalisation, data set).
2. ``model_args_for(arch, layout)`` gives the extra ``create_model`` options a layout needs.
3. ``adapt_state_dict(state, arch, layout, model)`` renames the weights to ``model``'s keys by
   the registered rule of that (layout, architecture); ``"auto"`` tries the identity, then every
   rule known for the architecture. When nothing fits, the error names the closest
   (architecture, layout) found by ``closest_fits``.

A rule only renames: it is registered for an architecture only where the toolkit's network
computes the same function as ours (checked, logits against logits, in the tests).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from robustkd.errors import CheckpointError, ConfigError, RobustKDError
from robustkd.models import create_model, model_names

LAYOUTS = ("auto", "backdoorbench", "backdoorbox", "trojanzoo", "torchvision", "plain")
PT_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"

# Keys under which toolkits and training scripts nest the state dict.
# Among equally good fits, the layout that assumes least comes first.
_PREFERENCE = ("plain", "torchvision", "backdoorbench", "backdoorbox", "trojanzoo")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
_BN_COUNTER = "num_batches_tracked"


@dataclasses.dataclass
class ForeignFile:
    """The weights of a foreign checkpoint and what the file itself says about them.

    ``state`` is unwrapped (no wrapper dict, no DataParallel ``module.`` prefix) but keeps the
    source's names. ``hints`` holds only what is known: ``layout``, ``architecture`` (our
    registry name), ``num_classes``, ``in_channels``, ``image_size`` (``[h, w]``),
    ``normalization`` (``"none"``, ``"dataset"`` or ``{"mean": [...], "std": [...]}``) and
    ``dataset`` (our data set name).
    """

    state: dict[str, Tensor]
    hints: dict[str, Any]


# --------------------------------------------------------------------------- reading files


def read_foreign(path: str | Path) -> ForeignFile:
    """Read a foreign checkpoint safely; refuse any pickle that needs code to rebuild."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist; check the path.")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        try:
            return ForeignFile(state=dict(load_file(str(path))), hints={})
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{path.name} is not a readable safetensors file; re-save it with "
                "safetensors.torch.save_file(model.state_dict(), path)."
            ) from exc
    if suffix not in PT_SUFFIXES:
        raise CheckpointError(
            f"{path.name} is neither a .safetensors nor a .pt/.pth/.bin file; rename it to the "
            "suffix of the format it was saved in."
        )
    obj = _load_pickle(path)
    hints = _backdoorbench_hints(obj)
    state = _unwrap(obj, path)
    for key, value in _hints_from_names(state).items():
        hints.setdefault(key, value)
    return ForeignFile(state=state, hints=hints)


# torch's allowlist is process-wide: the lock stops one thread's exit from removing the numpy
# globals while another is still loading (other loads meanwhile may rebuild numpy arrays too,
# which is harmless).
_NUMPY_LOCK = threading.Lock()


@functools.cache
def _numpy_globals() -> tuple[Any, ...]:
    """Exactly what rebuilding numpy arrays, dtypes and scalars needs, under old and new names."""
    reconstruct = np.zeros(0).__reduce__()[0]  # numpy.(_)core.multiarray._reconstruct
    scalar = np.float64(0).__reduce__()[0]  # numpy.(_)core.multiarray.scalar
    dtype_classes = [
        obj
        for obj in vars(np.dtypes).values()
        if isinstance(obj, type) and issubclass(obj, np.dtype)
    ]
    named = [
        (fn, f"{module}.{fn.__name__}")
        for fn in (reconstruct, scalar)
        # numpy 1.x saved these as numpy.core.*, numpy 2 as numpy._core.*.
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    ]
    return (*named, np.ndarray, np.dtype, *dtype_classes)


def _load_pickle(path: Path) -> Any:
    wanted = _numpy_globals()
    with _NUMPY_LOCK:
        present = set(map(_global_id, torch.serialization.get_safe_globals()))
        added = [g for g in wanted if _global_id(g) not in present]
        try:
            with torch.serialization.safe_globals(added):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            found = re.search(r"GLOBAL ([\w.]+)", str(exc)) or re.search(
                r"got <class '([\w.]+)'>", str(exc)
            )
            if found is None:
                raise CheckpointError(
                    f"{path.name} is not a PyTorch file we can read; re-save its weights with "
                    "torch.save(model.state_dict(), path)."
                ) from exc
            raise CheckpointError(
                f"{path.name} holds more than tensors and numpy arrays (it references "
                f"{found.group(1)}) and we never run code from a checkpoint; re-save its "
                "weights with torch.save(model.state_dict(), path)."
            ) from exc


def _global_id(entry: Any) -> Any:
    # Allowlist entries are objects or (object, "full.name") pairs; compare by what they name.
    if isinstance(entry, tuple):
        return entry[1]
    return f"{getattr(entry, '__module__', '')}.{getattr(entry, '__qualname__', '')}"


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, Mapping) and not _is_state(obj):
        for key in _WRAPPER_KEYS:
            if _is_state(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state(obj):
        raise CheckpointError(
            f"{path.name} holds no state dict of tensors; save one with "
            "torch.save(model.state_dict(), path)."
        )
    state = dict(obj)
    prefix = "module."  # DataParallel / DistributedDataParallel
    if all(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _is_state(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


# BackdoorBench (utils/save_load_attack.py) writes attack_result.pt / defense_result.pt as
# {"model_name", "num_classes", "model": state dict, "img_size": (h, w, c), "clean_data", ...}.
# Its own CIFAR models by their names; every other name is torchvision's builder of that name
# (utils/aggregate_block/model_trainer_generate.py).
_BACKDOORBENCH_OWN = {"preactresnet18": "preact-resnet18"}
# Its ViTs are wrapped as Sequential(Resize(224), vit); SENet-18 and ResNeXt-29 have no
# counterpart here.
_BACKDOORBENCH_UNSUPPORTED = ("vit_", "senet18", "resnext29")
# utils/aggregate_block/dataset_and_transform_generate.py: get_dataset_normalization.
_BACKDOORBENCH_NORMALIZATION: dict[str, Any] = {
    "cifar10": {"mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.243, 0.261]},
    "cifar100": {"mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762]},
    "mnist": {"mean": [0.5], "std": [0.5]},
    "tiny": {"mean": [0.4802, 0.4481, 0.3975], "std": [0.2302, 0.2265, 0.2262]},
    "imagenet": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "gtsrb": "none",
    "celeba": "none",
}
# BackdoorBench data set names that are also ours.
_BACKDOORBENCH_DATASETS = ("cifar10", "cifar100", "gtsrb")


def _backdoorbench_hints(obj: Any) -> dict[str, Any]:
    """What a BackdoorBench result dict records; every field type-checked, bad ones dropped."""
    if not (
        isinstance(obj, Mapping)
        and isinstance(obj.get("model_name"), str)
        and _is_state(obj.get("model"))
    ):
        return {}
    hints: dict[str, Any] = {"layout": "backdoorbench"}
    arch = _backdoorbench_architecture(obj["model_name"])
    if arch is not None:
        hints["architecture"] = arch
    classes = obj.get("num_classes")
    if _is_int(classes) and 2 <= classes <= 1_000_000:
        hints["num_classes"] = int(classes)
    size = obj.get("img_size")
    if (
        isinstance(size, list | tuple)
        and len(size) in (2, 3)
        and all(_is_int(v) and 1 <= v <= 100_000 for v in size)
    ):
        hints["image_size"] = [int(size[0]), int(size[1])]
        if len(size) == 3:
            hints["in_channels"] = int(size[2])
    data = obj.get("clean_data")
    if isinstance(data, str):
        if data in _BACKDOORBENCH_NORMALIZATION:
            norm = _BACKDOORBENCH_NORMALIZATION[data]
            hints["normalization"] = norm if isinstance(norm, str) else {**norm}
        if data in _BACKDOORBENCH_DATASETS:
            hints["dataset"] = data
    return hints


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _backdoorbench_architecture(name: str) -> str | None:
    from robustkd.models.tv import PREFIX, torchvision_names

    if name in _BACKDOORBENCH_OWN:
        return _BACKDOORBENCH_OWN[name]
    if name.startswith(_BACKDOORBENCH_UNSUPPORTED) or name not in torchvision_names():
        return None
    return PREFIX + name


def _hints_from_names(state: Mapping[str, Tensor]) -> dict[str, Any]:
    # TrojanZoo's models split into `features` and a `classifier` whose linear layers are named
    # fc / fc1…; no torchvision model has `classifier.fc`. It normalises inside the model.
    keys = list(state)
    if any(k.startswith("classifier.fc") for k in keys) and all(
        k.startswith(("features.", "classifier.")) for k in keys
    ):
        return {"layout": "trojanzoo", "normalization": "dataset"}
    return {}


# --------------------------------------------------------------------------- input / output


def infer_io(state: Mapping[str, Tensor]) -> dict[str, int]:
    """``in_channels`` and ``num_classes`` as far as the weights show them.

    The channels come from the first convolution's weight and the classes from the last linear
    layer's, in the file's key order (safetensors files keep keys sorted by name).
    """
    out: dict[str, int] = {}
    weights = [v for k, v in state.items() if k.endswith("weight")]
    conv = next((w for w in weights if w.dim() == 4), None)
    if conv is not None:
        out["in_channels"] = int(conv.shape[1])
    linear = next((w for w in reversed(weights) if w.dim() == 2), None)
    if linear is not None:
        out["num_classes"] = int(linear.shape[0])
    return out


# --------------------------------------------------------------------------- layout rules

Renamer = Callable[[Mapping[str, Tensor], nn.Module], dict[str, Tensor]]


@dataclasses.dataclass(frozen=True)
class _Rule:
    """How one toolkit names the weights of one family of our architectures."""

    layout: str
    patterns: tuple[str, ...]  # fnmatch patterns over our architecture names
    rename: Renamer
    model_args: tuple[tuple[str, Any], ...] = ()

    def covers(self, arch: str) -> bool:
        return any(fnmatch.fnmatchcase(arch.lower(), p) for p in self.patterns)

    @property
    def is_identity(self) -> bool:
        return self.rename is _identity and not self.model_args


_RULES: list[_Rule] = []


def _register(
    layout: str, *patterns: str, model_args: Mapping[str, Any] | None = None
) -> Callable[[Renamer], Renamer]:
    """Register ``rename`` as ``layout``'s rule for architectures matching ``patterns``."""
    assert layout in LAYOUTS and layout != "auto"

    def decorator(rename: Renamer) -> Renamer:
        _RULES.append(_Rule(layout, patterns, rename, tuple(sorted((model_args or {}).items()))))
        return rename

    return decorator


def _rules_for(arch: str, layout: str) -> list[_Rule]:
    return [r for r in _RULES if r.covers(arch) and (layout == "auto" or r.layout == layout)]


def _rename_modules(state: Mapping[str, Tensor], mapping: Mapping[str, str]) -> dict[str, Tensor]:
    """Replace the longest module path of each key found in ``mapping``."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:n])
            if head in mapping:
                key = ".".join([mapping[head], *parts[n:]])
                break
        out[key] = value
    return out


def _identity(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    return dict(state)


# Same names as ours: anything saved from our own models or an identical re-implementation.
_register("plain", "*")(_identity)
# torchvision's builders are our tv-* models.
_register("torchvision", "tv-*")(_identity)
# BackdoorBench: its PreAct-ResNet18 (models/preact_resnet.py) has our names; the rest are
# torchvision models.
_register("backdoorbench", "preact-resnet18", "tv-*")(_identity)
# BackdoorBox core/models/resnet.py: the kuangliu CIFAR layout, as ours.
_register("backdoorbox", "resnet18", "resnet34", "resnet50")(_identity)


@_register("backdoorbox", "vgg11-bn", "vgg16-bn")
def _backdoorbox_vgg(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    # BackdoorBox core/models/vgg.py: one flat `features` Sequential of conv-BN-ReLU triples
    # and a max-pool after each stage, then `classifier` = Linear(512, classes) on the 1×1 map
    # that 32×32 inputs leave, which is what our global pooling computes there.
    mapping: dict[str, str] = {}
    index = 0
    for name, child in model.named_children():
        if name.startswith("stage"):
            for j in range(len(child)):  # type: ignore[arg-type]
                mapping[f"features.{index + j}"] = f"{name}.{j}"
            index += len(child)  # type: ignore[arg-type]
        elif name.startswith("pool"):
            index += 1
    return _rename_modules(state, mapping)


@_register("torchvision", "resnet18", "resnet34", "resnet50")
def _torchvision_resnet(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    # torchvision-style names on a CIFAR ResNet (3×3 stem, no max-pool), as in the RobustKD
    # paper's resnet18/50: `downsample` is our `shortcut`, `fc` our `linear`.
    out = {}
    for key, value in state.items():
        key = re.sub(r"^(layer\d+\.\d+)\.downsample\.", r"\1.shortcut.", key)
        out[re.sub(r"^fc\.", "linear.", key)] = value
    return out


def _strip_trojanzoo(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # TrojanZoo's _ImageModel: `features.<torchvision names>` and `classifier.fc`.
    return {re.sub(r"^(features|classifier)\.", "", k): v for k, v in state.items()}


@_register("trojanzoo", "resnet18", "resnet34", "resnet50")
def _trojanzoo_resnet(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    # resnetNN_comp: torchvision's ResNet with a 3×3 stride-1 stem and no max-pool, i.e. ours.
    return _torchvision_resnet(_strip_trojanzoo(state), model)


@_register("trojanzoo", "tv-resnet*", "tv-resnext*", "tv-wide_resnet*")
def _trojanzoo_torchvision_resnet(
    state: Mapping[str, Tensor], model: nn.Module
) -> dict[str, Tensor]:
    # resnetNN without `_comp`: torchvision's own ResNet (7×7 stem, max-pool) inside the wrapper.
    return _strip_trojanzoo(state)


@_register("trojanzoo", "mobilenetv2")
def _trojanzoo_mobilenet(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    # mobilenet_v2_comp: torchvision's MobileNetV2 with our CIFAR strides; its flat
    # features.1…17 are our layers.<stage>.<block>.
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.Sequential):
        return dict(state)
    blocks = [f"layers.{s}.{b}" for s, stage in enumerate(layers) for b in range(len(stage))]  # type: ignore[arg-type]
    mapping = {f"features.{i + 1}": name for i, name in enumerate(blocks)}
    mapping.update({"features.0": "stem", f"features.{len(blocks) + 1}": "conv_last"})
    return _rename_modules(state, mapping)


@_register("backdoorbench", "tv-googlenet", "tv-inception_v3")
def _without_aux_heads(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    # BackdoorBench builds these with torchvision's default auxiliary heads, which only act in
    # training mode; ours have none.
    return {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2.", "AuxLogits."))}


# mobilenet_v2_comp keeps torchvision's names: only the strides differ, so tv-mobilenet_v2
# needs the option that sets them.
_register("trojanzoo", "tv-mobilenet_v2", model_args={"cifar_strides": True})(_identity)


def model_args_for(arch: str, layout: str) -> dict[str, Any]:
    """Extra ``create_model`` keyword arguments that ``layout``'s rule for ``arch`` needs."""
    _check_layout(layout)
    rules = _rules_for(arch, layout) if layout not in ("auto", "plain") else []
    return dict(rules[0].model_args) if rules else {}


# --------------------------------------------------------------------------- fitting


def adapt_state_dict(
    state: Mapping[str, Tensor], arch: str, layout: str, model: nn.Module
) -> tuple[dict[str, Tensor], str]:
    """Rename ``state`` to ``model``'s keys; return it and the layout that fit.

    ``model`` must be built with ``model_args_for(arch, layout)``. ``"auto"`` tries ``"plain"``
    first, then each rule known for ``arch`` that needs no extra model options.
    """
    _check_layout(layout)
    own = _signature(model.state_dict())
    if layout == "auto":
        seen_identity = False
        rules = []
        for rule in _rules_for(arch, "auto"):
            if rule.model_args or (rule.is_identity and seen_identity):
                continue
            seen_identity |= rule.is_identity
            rules.append(rule)
    else:
        rules = _rules_for(arch, layout)
        if not rules:
            covered = sorted({p for r in _RULES if r.layout == layout for p in r.patterns})
            raise CheckpointError(
                f"Layout {layout!r} has no rule for architecture {arch!r} (it covers "
                f"{', '.join(covered)}); {_suggestion(state, model, arch, layout)}."
            )
    attempts = []
    for rule in rules:
        renamed = rule.rename(state, model)
        diff = _difference(renamed, own)
        if not any(diff):
            return _with_bn_counters(renamed, model), rule.layout
        attempts.append(diff)
    missing, unexpected, shapes = min(attempts, key=lambda d: sum(map(len, d)))
    parts = [
        f"{label} {_few(items)}"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shapes differ at", shapes),
        )
        if items
    ]
    raise CheckpointError(
        f"The weights do not fit {arch!r} with layout {layout!r} ({'; '.join(parts)}); "
        f"{_suggestion(state, model, arch, layout)}."
    )


def closest_fits(
    state: Mapping[str, Tensor],
    num_classes: int,
    in_channels: int,
    image_size: tuple[int, int],
    limit: int = 3,
) -> list[tuple[str, str, float]]:
    """The (architecture, layout, score) that fit ``state`` best, best first.

    Every registered architecture is tried under the identity and under each layout rule known
    for it; the score is the fraction of tensors (keys with their shapes, union of both sides)
    that agree after the renaming. Candidate models are built on the meta device.
    """
    size = (int(image_size[0]), int(image_size[1]))
    scored: list[tuple[float, str, str]] = []
    for arch in model_names():
        seen_identity = False
        for rule in _rules_for(arch, "auto"):
            if rule.is_identity:
                if seen_identity:
                    continue
                seen_identity = True
            model = _candidate(arch, rule.model_args, num_classes, in_channels, size)
            if model is None:
                continue
            own = _signature(model.state_dict())
            theirs = _signature(rule.rename(state, model))
            union = own.keys() | theirs.keys()
            agree = sum(1 for k in own.keys() & theirs.keys() if own[k] == theirs[k])
            score = agree / len(union) if union else 0.0
            layout = "plain" if rule.is_identity else rule.layout
            scored.append((score, arch, layout))
    # Ties go to the layout that assumes least (plain first), then to the name.
    scored.sort(key=lambda s: (-s[0], _PREFERENCE.index(s[2]), s[1]))
    return [(arch, layout, round(score, 4)) for score, arch, layout in scored[: max(limit, 0)]]


@functools.lru_cache(maxsize=512)
def _candidate(
    arch: str,
    model_args: tuple[tuple[str, Any], ...],
    num_classes: int,
    in_channels: int,
    size: tuple[int, int],
) -> nn.Module | None:
    # Meta tensors have shapes but no storage, so building every candidate costs ~nothing;
    # a model whose builder needs real data (RegNet's) is built on the CPU, then moved to meta
    # so that the cache holds no weights. Cached models are only read, never changed.
    args = dict(model_args, num_classes=num_classes, in_channels=in_channels, image_size=size)
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                return create_model(arch, **args).to("meta")
        except (RobustKDError, RuntimeError, NotImplementedError, ValueError, TypeError):
            continue
    return None


def _signature(state: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    # BatchNorm's step counter is optional: PyTorch < 0.4.1 did not save it.
    return {k: tuple(v.shape) for k, v in state.items() if not k.endswith(_BN_COUNTER)}


def _difference(
    state: Mapping[str, Tensor], own: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    theirs = _signature(state)
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [
        f"{k} ({_shape(theirs[k])} vs {_shape(own[k])})"
        for k in own
        if k in theirs and theirs[k] != own[k]
    ]
    return missing, unexpected, shapes


def _with_bn_counters(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    for key, value in model.state_dict().items():
        if key.endswith(_BN_COUNTER) and key not in state:
            state[key] = torch.zeros_like(value, device="cpu")
    return state


def _suggestion(state: Mapping[str, Tensor], model: nn.Module, arch: str, layout: str) -> str:
    io = infer_io(state)
    classes = io.get("num_classes") or next(
        (m.out_features for m in reversed(list(model.modules())) if isinstance(m, nn.Linear)), 10
    )
    channels = io.get("in_channels") or next(
        (m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3
    )
    fits = [
        f
        for f in closest_fits(state, max(int(classes), 2), int(channels), (32, 32), limit=4)
        if (f[0], f[1]) != (arch, layout)
    ]
    if not fits or fits[0][2] <= 0:
        return "pass the architecture (--arch) and layout (--layout) it was trained with"
    best, how, score = fits[0]
    if score >= 1.0:
        return f"it fits --arch {best} --layout {how}, so pass those"
    return (
        f"the closest known fit is --arch {best} --layout {how} ({100 * score:.0f}% of "
        "tensors agree), so check the architecture it was trained with"
    )


def _few(items: Iterable[str], shown: int = 2) -> str:
    items = list(items)
    more = f" (+{len(items) - shown} more)" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) or "scalar"


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ConfigError(f"Unknown source layout {layout!r}; choose one of: {', '.join(LAYOUTS)}.")
