"""Feature statistics at named layers, through forward hooks (the model is never rewritten).

Per layer: per-channel mean and variance across images of the spatially pooled activation,
and per-unit (channel × position) mean and variance, streamed over batches with an exact
merge of batch moments (Chan et al.). A *variance score* compares a set's variance with a
clean reference's. Results are cached by (model, data, layer, trigger) so a UI can reuse them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn

from robustkd.attacks import Trigger
from robustkd.data.datasets import ImageDataset, normalize, to_float
from robustkd.errors import ConfigError, UnknownNameError
from robustkd.models.sharing import view

# --------------------------------------------------------------------------- layers and hooks


def layer_names(model: nn.Module) -> list[str]:
    """Every named sub-module a hook can attach to."""
    return [name for name, _ in model.named_modules() if name]


def resolve_layers(model: nn.Module, layers: str | Sequence[str] | None) -> list[str]:
    """Validate layer names; ``None``/``"all"`` means the model's stage outputs."""
    if layers is None or layers == "all":
        names = list(getattr(model, "feature_layers", []))
        if not names:
            raise ConfigError("This model names no stage outputs; pass the layer names to use.")
        return names
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    modules = dict(model.named_modules())
    for name in layers:
        if not name or name not in modules:
            stages = list(getattr(model, "feature_layers", []))
            valid = stages or layer_names(model)[:20]
            raise UnknownNameError(
                f"Layer {name!r} does not exist in this model; valid layers include: "
                f"{', '.join(valid)}."
            )
    if not layers:
        raise ConfigError("Give at least one layer name.")
    return list(layers)


@contextlib.contextmanager
def forward_hooks(
    model: nn.Module, hooks: dict[str, Callable[[torch.Tensor], Any]]
) -> Iterator[nn.Module]:
    """Within the block, ``hooks[layer](output)`` runs after each forward of that layer; a
    non-None return value replaces the layer's output. Hooks are removed on exit.

    The hooks go on ``model`` itself: pass a private model or a ``sharing.view`` of a shared
    one (a shared model refuses hooks).
    """
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda _m, _i, output, fn=fn: fn(output))
        for name, fn in hooks.items()
    ]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture(model: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, ``out[layer]`` holds the layer's output of the last forward pass."""
    out: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> Callable[[torch.Tensor], None]:
        def record(output: torch.Tensor) -> None:
            out[name] = output

        return record

    with forward_hooks(model, {name: recorder(name) for name in layers}):
        yield out


@torch.no_grad()
def layer_outputs(
    model: nn.Module,
    data: ImageDataset,
    layers: Sequence[str],
    trigger: Trigger | None = None,
    batch_size: int = 500,
    device: torch.device | str | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield, batch by batch, the outputs of ``layers`` on ``data`` (triggered if asked).

    Runs an eval-mode view of ``model`` (``sharing.view``): ``model`` itself gets no hook and
    no mode switch, so other callers may use it meanwhile. ``layers`` must already be valid
    names (see ``resolve_layers``).
    """
    if len(data) == 0:
        raise ConfigError(f"The image set {data.name!r} is empty; give it at least one image.")
    device = torch.device(device) if device else next(model.parameters()).device
    own = view(model)
    with capture(own, layers) as out:
        for images, _ in data.batches(batch_size):
            x = to_float(images.to(device))
            if trigger is not None:
                x = trigger.apply(x)
            own(normalize(x, data.mean, data.std))
            yield out


# --------------------------------------------------------------------------- streaming moments


class RunningMoments:
    """Mean and (population) variance over dim 0, merged exactly batch by batch (Chan et al.)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, batch: torch.Tensor) -> RunningMoments:
        # Batch moments in the batch's precision (two-pass, so stable); the merge in float64.
        x = batch.detach()
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        nb = x.shape[0]
        if nb == 0:
            return self
        bmean = x.mean(0)
        bm2 = ((x - bmean) ** 2).sum(0)
        return self.merge_moments(nb, bmean.double(), bm2.double())

    def merge_moments(self, nb: int, bmean: torch.Tensor, bm2: torch.Tensor) -> RunningMoments:
        if self.n == 0 or self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = nb, bmean.clone(), bm2.clone()
            return self
        n = self.n + nb
        delta = bmean - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + bm2 + delta**2 * (self.n * nb / n)
        self.n = n
        return self

    def merge(self, other: RunningMoments) -> RunningMoments:
        if other.n and other.mean is not None and other.m2 is not None:
            self.merge_moments(other.n, other.mean, other.m2)
        return self

    @property
    def var(self) -> torch.Tensor:
        if self.m2 is None or self.n == 0:
            raise ConfigError("No data was seen; give at least one image.")
        return self.m2 / self.n


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Statistics of one layer's activations over a set of images (float32, on the CPU)."""

    layer: str
    n: int
    channel_mean: torch.Tensor  # (C,)
    channel_var: torch.Tensor  # (C,) variance of the spatially pooled activation
    unit_mean: torch.Tensor | None  # (C, H, W)
    unit_var: torch.Tensor | None  # (C, H, W)

    @property
    def channels(self) -> int:
        return int(self.channel_mean.numel())

    def spatial_variance_map(self) -> torch.Tensor:
        """(H, W): the unit variance averaged over channels — where the image varies most."""
        if self.unit_var is None:
            raise ConfigError("These statistics were computed without per-unit values.")
        return self.unit_var.mean(0)


def _pool(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x


@torch.no_grad()
def feature_stats(
    model: nn.Module,
    data: ImageDataset,
    layers: str | Sequence[str] | None = None,
    trigger: Trigger | None = None,
    per_unit: bool = True,
    batch_size: int = 500,
    device: torch.device | str | None = None,
) -> dict[str, LayerStats]:
    """Per-layer statistics of ``model`` on ``data`` (triggered when ``trigger`` is given)."""
    names = resolve_layers(model, layers)
    chan = {n: RunningMoments() for n in names}
    unit = {n: RunningMoments() for n in names}
    for out in layer_outputs(model, data, names, trigger, batch_size, device):
        for n in names:
            a = out[n].float()
            chan[n].update(_pool(a))
            if per_unit:
                unit[n].update(a)
    result = {}
    for n in names:
        result[n] = LayerStats(
            layer=n,
            n=chan[n].n,
            channel_mean=chan[n].mean.float().cpu(),
            channel_var=chan[n].var.float().cpu(),
            unit_mean=unit[n].mean.float().cpu() if per_unit else None,
            unit_var=unit[n].var.float().cpu() if per_unit else None,
        )
    return result


@torch.no_grad()
def activations(
    model: nn.Module,
    data: ImageDataset,
    layer: str,
    trigger: Trigger | None = None,
    batch_size: int = 500,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """All of ``layer``'s activations on ``data``, ``(N, C, H, W)`` float32 on the CPU."""
    (name,) = resolve_layers(model, [layer])
    chunks = [
        out[name].float().cpu()
        for out in layer_outputs(model, data, [name], trigger, batch_size, device)
    ]
    return torch.cat(chunks)


# --------------------------------------------------------------------------- scores


VARIANCE_FLOOR = 0.1  # × the layer's mean reference variance; see variance_score


def variance_score(
    stats: LayerStats,
    reference: LayerStats,
    per_unit: bool = False,
    floor: float = VARIANCE_FLOOR,
) -> torch.Tensor:
    """``var / (reference var + floor · mean reference var)`` per channel, or per unit.

    The floor keeps nearly silent units (sparse ReLU outputs) from producing huge, noisy
    ratios: on the default teacher, without it the largest clean-vs-clean score is ~240 and
    hides the trigger's units; with 0.1 it is ~5 and the trigger's units stand out.
    """
    if per_unit:
        if stats.unit_var is None or reference.unit_var is None:
            raise ConfigError("Per-unit scores need statistics computed with per_unit=True.")
        if stats.unit_var.shape != reference.unit_var.shape:
            raise ConfigError("The two statistics come from layers of different shapes.")
        base = floor * float(reference.unit_var.mean()) + 1e-12
        return stats.unit_var / (reference.unit_var + base)
    base = floor * float(reference.channel_var.mean()) + 1e-12
    return stats.channel_var / (reference.channel_var + base)


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` highest scores and their flat indices (``unravel`` them for units)."""
    flat = scores.flatten()
    k = max(0, min(int(k), flat.numel()))
    values, idx = flat.topk(k)
    return values, idx


# --------------------------------------------------------------------------- cache


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's architecture and weights (changes when any weight changes)."""
    h = hashlib.sha1(type(model).__name__.encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def data_fingerprint(data: ImageDataset) -> str:
    h = hashlib.sha1(f"{data.name}|{len(data)}|{data.mean}|{data.std}".encode())
    h.update(data.labels.cpu().numpy().tobytes())
    # every image: a sample of them would let two sets differing elsewhere (e.g. a few
    # poisoned images) share a key, and the cache would return the other set's statistics
    h.update(data.images.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class StatsCache:
    """An LRU cache of ``feature_stats`` results keyed by (model, data, layer, trigger)."""

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[tuple, LayerStats] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(
        self,
        model: nn.Module,
        data: ImageDataset,
        layers: str | Sequence[str] | None = None,
        trigger: Trigger | None = None,
        per_unit: bool = True,
    ) -> dict[str, LayerStats]:
        names = resolve_layers(model, layers)
        mkey, dkey = model_fingerprint(model), data_fingerprint(data)
        tkey = repr(sorted(trigger.to_dict().items())) if trigger is not None else ""
        keys = {n: (mkey, dkey, n, tkey, per_unit) for n in names}
        missing = [n for n, k in keys.items() if k not in self._items]
        self.hits += len(names) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = feature_stats(model, data, missing, trigger, per_unit)
            for n in missing:
                self._items[keys[n]] = fresh[n]
        out = {}
        for n, k in keys.items():
            self._items.move_to_end(k)
            out[n] = self._items[k]
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)
        return out


# --------------------------------------------------------------------------- network tails

# fx patches nn.Module.__call__ and __getattr__ for the whole process while it traces, so
# traces take turns (two at once could leave the patch in place) and _TailTracer lets the
# forward passes of other threads (other sessions) through untouched meanwhile.
_TRACE_LOCK = threading.Lock()


class _TailTracer(fx.Tracer):
    """Traces with ``layer`` as a leaf. A forward pass of another thread during the trace
    runs as usual (the stock tracer would record it, or fail: "not installed as a
    submodule")."""

    def __init__(self, layer: str) -> None:
        super().__init__()
        self.layer = layer
        self.thread = threading.get_ident()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname == self.layer or super().is_leaf_module(m, qualname)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict
    ) -> Any:
        if threading.get_ident() != self.thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if threading.get_ident() != self.thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def tail_from(model: nn.Module, layer: str) -> nn.Module | None:
    """The part of ``model`` after ``layer``: a module mapping that layer's output to logits.

    Built by tracing the model (torch.fx) and keeping only what follows the layer, so a
    preview can re-run just the rest of the network on cached activations. ``None`` when the
    model cannot be traced or something after the layer also reads earlier values (a skip
    connection across it). The tail runs the modules of a private view of ``model``
    (``sharing.view``), never ``model``'s own.
    """
    own = view(model)
    try:
        with _TRACE_LOCK:
            graph_in = _TailTracer(layer).trace(own)
        traced = fx.GraphModule(own, graph_in)
    except Exception:  # untraceable control flow: the caller falls back to full forwards
        return None
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    found = False
    output_ok = False
    for node in traced.graph.nodes:
        if node.op == "call_module" and node.target == layer and not found:
            env[node] = graph.placeholder("features")
            found = True
            continue
        if node.op == "get_attr":  # parameters/buffers read directly: always available
            env[node] = graph.node_copy(node)
            continue
        if not found or node.op == "placeholder":
            continue
        inputs = node.all_input_nodes
        if all(n in env for n in inputs):
            env[node] = graph.node_copy(node, lambda n: env[n])
            if node.op == "output":
                output_ok = True
    if not (found and output_ok):
        return None
    tail = fx.GraphModule(traced, graph)
    tail.graph.eliminate_dead_code()
    tail.recompile()
    return tail.eval()
