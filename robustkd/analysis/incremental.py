"""Re-running a network tail when its input changes at a few spatial positions.

``IncrementalTail(tail, base)`` runs ``tail`` (a ``torch.fx`` module mapping a layer's output
to logits, see ``features.tail_from``) once on ``base``, the cached ``(N, C, H, W)``
activations, and keeps what later runs read. ``logits(plan(positions), edit, rows)`` then gives
the logits of ``base`` changed at ``positions`` only (flat ``h·W + w`` indices; ``edit`` maps
the ``(n, k, C)`` values there to the new ones), re-computing only what the change reaches: a
3×3 convolution widens the changed region by one position on each side, a 2×2 pooling halves
it, a global average pooling corrects the cached mean by the changed values. Where the changed
region covers most of a map, or at an operation not listed below, the rest runs densely, on the
cached map with the changes written in. Images run ``chunk`` at a time (``CHUNK``), so that
what a sparse step gathers stays in the cache.

Handled sparsely: ``Conv2d`` (zero padding, any stride, dilation, groups), ``MaxPool2d``,
``AvgPool2d`` (no ``ceil_mode``; no padding, or padding counted), element-wise activations and
eval-mode ``BatchNorm2d``, sums of two changed maps of one shape (residual connections), and a
global average pooling (``AdaptiveAvgPool2d(1)``, ``F.adaptive_avg_pool2d(x, 1)``, or a mean
over both spatial dimensions). The logits equal a dense run's up to float rounding (sums run
in another order), so a prediction can differ only where two logits tie to ~1e-6.

Memory: besides ``base`` (kept, not copied), the cached output of each operation whose
neighbours or cached values a later run reads: for the default teacher's first stage, about
twice that stage's activations.
"""

from __future__ import annotations

import dataclasses
import operator
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

# element-wise modules: applied to the changed values alone
_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.PReLU,
    nn.Identity,
)
_EVAL_POINTWISE: tuple[type[nn.Module], ...] = (nn.BatchNorm2d, nn.Dropout, nn.Dropout2d)
_POINTWISE_FUNCTIONS: frozenset[Any] = frozenset(
    (
        F.relu,
        F.relu_,
        torch.relu,
        torch.relu_,
        F.relu6,
        F.leaky_relu,
        F.elu,
        F.gelu,
        F.silu,
        F.hardswish,
        F.hardsigmoid,
        F.hardtanh,
        F.sigmoid,
        F.tanh,
        torch.sigmoid,
        torch.tanh,
    )
)
_POINTWISE_METHODS = frozenset(("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"))
_ADD_FUNCTIONS: frozenset[Any] = frozenset((operator.add, operator.iadd, torch.add))
_WINDOWED = ("conv", "maxpool", "avgpool")

# a change covering more than this share of a map is carried on densely: a sparse convolution
# gathers its inputs first, and at about this share the gather costs what it saves
DENSE_FROM = 0.5
# images per run: on the default teacher 128 to 512 took alike on one thread, 1,024 up to 1.5×
# as long (a sparse run from the second stage; the gathered windows fall out of the cache);
# the largest of the fast sizes, as each operation is a parallel region, and on an
# oversubscribed machine each of those waits for a descheduled thread
CHUNK = 512


@dataclasses.dataclass
class _Changed:
    """A map equal to ``node``'s cached output but at ``idx`` (sorted flat positions), where
    it holds ``vals`` ``(n, k, C)``."""

    node: fx.Node
    idx: torch.Tensor
    vals: torch.Tensor


@dataclasses.dataclass(frozen=True)
class _Window:
    """A sparse convolution or pooling: the output positions it computes, the unchanged input
    positions it reads from the cache (``keep``), and its gather table (``order``, ``(k_out,
    kh·kw)``) into ``cat([cached at keep, changed values, padding value])``."""

    out_idx: torch.Tensor
    keep: torch.Tensor
    order: torch.Tensor


@dataclasses.dataclass(frozen=True)
class TailPlan:
    """What one change (a set of input positions) reaches: per node its changed positions
    (``None``: dense from there), and the windows of the sparse convolutions and poolings."""

    positions: torch.Tensor
    support: dict[fx.Node, torch.Tensor | None]
    windows: dict[fx.Node, _Window]
    cost: float  # multiply-accumulates per image, the sparse gathers counted in
    dense_cost: float  # the same for a dense run

    @property
    def empty(self) -> bool:
        return self.positions.numel() == 0


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class IncrementalTail:
    """A network tail that re-runs only what a change of a few input positions reaches.

    ``tail`` maps ``(N, C, H, W)`` features to logits (an ``fx.GraphModule``, as
    ``features.tail_from`` builds); ``base`` holds the unchanged features (kept, not copied;
    channels_last runs faster). Images run ``chunk`` at a time (default ``CHUNK``, at most
    ``max_chunk``). Construction runs the tail once over ``base`` (``dense_ms`` says
    how long it took) and keeps the logits (``base_logits``).
    """

    def __init__(
        self,
        tail: fx.GraphModule,
        base: torch.Tensor,
        chunk: int | None = None,
        max_chunk: int | None = None,
    ) -> None:
        if base.dim() != 4 or base.shape[0] == 0:
            raise ValueError("IncrementalTail needs (N, C, H, W) features of at least one image.")
        self.tail, self.base = tail, base
        chunk = int(chunk or CHUNK)
        self.chunk = max(1, min(chunk, int(max_chunk or chunk)))
        self.nodes = list(tail.graph.nodes)
        self.modules = dict(tail.named_modules())
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ValueError("The tail must take exactly one input.")
        self.input = placeholders[0]
        self.output = next(n for n in self.nodes if n.op == "output")
        self.kind = {n: self._kind(n) for n in self.nodes}
        self.last_use: dict[fx.Node, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                self.last_use[a] = i
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.cache: dict[fx.Node, torch.Tensor] = {}  # (N, H·W, C) maps, (N, …) others
        self.base_flat = self._flat(base)
        self._weights: dict[fx.Node, torch.Tensor] = {}
        start = time.perf_counter()
        self._record()
        self.dense_ms = 1000 * (time.perf_counter() - start)
        self.base_logits = self.cache[self.output]
        self.macs = {n: self._macs(n) for n in self.nodes}

    # ------------------------------------------------------------------ graph analysis

    def _kind(self, n: fx.Node) -> str:
        if n.op == "call_module":
            return self._module_kind(self.modules[str(n.target)])
        if n.op == "call_function":
            if n.target in _POINTWISE_FUNCTIONS and self._only_first_is_node(n):
                return "pointwise"
            if n.target in _ADD_FUNCTIONS and len(n.args) == 2 and not n.kwargs:
                return "add"
            if n.target is F.adaptive_avg_pool2d and n.args[1:] in ((1,), ((1, 1),)):
                return "global"
            if n.target is torch.mean and self._spatial_mean(n.args[1:], n.kwargs):
                return "global"
            return "dense"
        if n.op == "call_method":
            if n.target in _POINTWISE_METHODS and self._only_first_is_node(n):
                return "pointwise"
            if n.target in ("add", "add_") and len(n.args) == 2 and not n.kwargs:
                return "add"
            if n.target == "mean" and self._spatial_mean(n.args[1:], n.kwargs):
                return "global"
            return "dense"
        return str(n.op)  # placeholder, get_attr, output

    @staticmethod
    def _module_kind(m: nn.Module) -> str:
        if isinstance(m, _POINTWISE_MODULES) or (isinstance(m, _EVAL_POINTWISE) and not m.training):
            return "pointwise"
        if (
            isinstance(m, nn.Conv2d)
            and m.padding_mode == "zeros"
            and not isinstance(m.padding, str)
        ):
            return "conv"
        if isinstance(m, nn.MaxPool2d) and not m.return_indices:
            return "maxpool"
        if (
            isinstance(m, nn.AvgPool2d)
            and m.divisor_override is None
            and not m.ceil_mode
            and (m.count_include_pad or _pair(m.padding) == (0, 0))
        ):
            return "avgpool"
        if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
            return "global"
        return "dense"

    @staticmethod
    def _only_first_is_node(n: fx.Node) -> bool:
        rest = [*n.args[1:], *n.kwargs.values()]
        return (
            bool(n.args)
            and isinstance(n.args[0], fx.Node)
            and not any(isinstance(a, fx.Node) for a in rest)
        )

    @staticmethod
    def _spatial_mean(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        dims = args[0] if args else kwargs.get("dim")
        if set(kwargs) - {"dim", "keepdim"} or len(args) > 2 or not isinstance(dims, list | tuple):
            return False
        return sorted(int(d) % 4 for d in dims) == [2, 3]

    def _keeps(self, n: fx.Node) -> bool:
        """Whether a later run may read ``n``'s cached output: a consumer that is not
        element-wise reads it (neighbours, a written-out map, a sum, a mean)."""
        return self.kind[n] == "global" or any(self.kind[u] != "pointwise" for u in n.users)

    def _macs(self, n: fx.Node) -> float:
        """Multiply-accumulates per image of a dense run of ``n`` (element count otherwise)."""
        shape = self.shapes.get(n)
        if shape is None:
            return 0.0
        size = float(torch.Size(shape).numel())
        if n.op == "call_module":
            m = self.modules[str(n.target)]
            if isinstance(m, nn.Conv2d):
                return size * m.weight[0].numel()
            if isinstance(m, nn.Linear):
                return size * m.in_features
        return size

    # ------------------------------------------------------------------ the dense record

    @torch.no_grad()
    def _record(self) -> None:
        """One dense run over ``base``, keeping each output a later run reads."""
        parts: dict[fx.Node, list[torch.Tensor]] = {}
        for r0 in range(0, self.base.shape[0], self.chunk):
            rows = slice(r0, r0 + self.chunk)
            env: dict[fx.Node, Any] = {}
            for i, n in enumerate(self.nodes):
                value = self.base[rows] if n is self.input else self._dense_node(n, env, rows)
                env[n] = value
                if isinstance(value, torch.Tensor) and n.op not in ("get_attr", "placeholder"):
                    self.shapes.setdefault(n, tuple(value.shape[1:]))
                    if n is self.output or self._keeps(n):
                        # a mean's output as it is: only the mean correction reads it
                        keep = value if self.kind[n] == "global" else self._flat(value)
                        parts.setdefault(n, []).append(keep.clone())
                self._free(env, i)
        self.shapes[self.input] = tuple(self.base.shape[1:])
        for n, chunks in parts.items():
            self.cache[n] = torch.cat(chunks)

    @staticmethod
    def _flat(x: torch.Tensor) -> torch.Tensor:
        """``(n, C, H, W)`` → ``(n, H·W, C)`` (a view for channels_last); others unchanged."""
        if x.dim() != 4:
            return x
        n, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(n, h * w, c)

    @staticmethod
    def _unflat(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        c, h, w = shape
        return x.view(x.shape[0], h, w, c).permute(0, 3, 1, 2)

    def _free(self, env: dict[fx.Node, Any], i: int) -> None:
        for a in self.nodes[i].all_input_nodes:
            if self.last_use.get(a) == i:
                env.pop(a, None)

    def _cached(self, n: fx.Node, rows: slice) -> torch.Tensor:
        return self.base_flat[rows] if n is self.input else self.cache[n][rows]

    # ------------------------------------------------------------------ dense evaluation

    def _attr(self, target: str) -> Any:
        obj: Any = self.tail
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def _dense(self, value: Any, rows: slice) -> Any:
        """A changed map written out in full: the cached map with the changes put in."""
        if not isinstance(value, _Changed):
            return value
        full = self._cached(value.node, rows).clone()
        full[:, value.idx] = value.vals.to(full.dtype)
        return self._unflat(full, self.shapes[value.node])

    def _dense_node(self, n: fx.Node, env: dict[fx.Node, Any], rows: slice) -> Any:
        if n.op == "get_attr":
            return self._attr(str(n.target))
        args = fx.node.map_arg(n.args, lambda a: self._dense(env[a], rows))
        kwargs = fx.node.map_arg(n.kwargs, lambda a: self._dense(env[a], rows))
        if n.op == "call_module":
            return self.modules[str(n.target)](*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)  # type: ignore[operator]
        if n.op == "call_method":
            return getattr(args[0], str(n.target))(*args[1:], **kwargs)
        if n.op == "output":
            return args[0]
        raise RuntimeError(f"Unexpected node {n.format_node()} in a network tail.")

    # ------------------------------------------------------------------ planning

    def plan(self, positions: torch.Tensor) -> TailPlan:
        """What changing ``base`` at ``positions`` (flat spatial indices) reaches."""
        positions = torch.unique(positions.detach().long().cpu())
        support: dict[fx.Node, torch.Tensor | None] = {}
        windows: dict[fx.Node, _Window] = {}
        cost = 0.0
        for n in self.nodes:
            kind, src = self.kind[n], self._arg_support(n, support)
            s: torch.Tensor | None = None
            if n is self.input:
                s = self._sparse_enough(n, positions)
            elif kind == "pointwise":
                s = src
            elif kind in _WINDOWED and src is not None:
                window = self._window(n, src)
                if window is not None:
                    windows[n] = window
                    s = window.out_idx
            elif kind == "add":
                a, b = (support.get(x) if isinstance(x, fx.Node) else None for x in n.args)
                same = self.shapes.get(n.args[0]) == self.shapes.get(n.args[1])  # type: ignore[arg-type]
                if a is not None and b is not None and same:
                    s = self._sparse_enough(n, torch.unique(torch.cat([a, b])))
            support[n] = s
            if s is not None:  # the changed share of the work; a sparse gather costs ~⅓ more
                share = s.numel() / self._area(n)
                cost += self.macs[n] * share * (1.35 if n in windows else 1.0)
            elif not (kind == "global" and src is not None):  # dense (a mean corrects cheaply)
                cost += self.macs[n]
        dense_cost = sum(self.macs.values())
        device = self.base.device
        if device.type != "cpu":
            support = {k: (v.to(device) if v is not None else None) for k, v in support.items()}
            windows = {
                k: _Window(w.out_idx.to(device), w.keep.to(device), w.order.to(device))
                for k, w in windows.items()
            }
        return TailPlan(positions.to(device), support, windows, cost, dense_cost)

    def _arg_support(
        self, n: fx.Node, support: dict[fx.Node, torch.Tensor | None]
    ) -> torch.Tensor | None:
        first = n.args[0] if n.args else None
        return support.get(first) if isinstance(first, fx.Node) else None

    def _area(self, n: fx.Node) -> int:
        shape = self.shapes.get(n, ())
        return shape[1] * shape[2] if len(shape) == 3 else 0

    def _sparse_enough(self, n: fx.Node, idx: torch.Tensor) -> torch.Tensor | None:
        return idx if self._area(n) > 0 and idx.numel() <= DENSE_FROM * self._area(n) else None

    def _window(self, n: fx.Node, src: torch.Tensor) -> _Window | None:
        m = self.modules[str(n.target)]
        _, h, w = self.shapes[n.args[0]]  # type: ignore[index]
        shape = self.shapes[n]
        if len(shape) != 3:
            return None
        _, ho, wo = shape
        kh, kw = _pair(m.kernel_size)
        sh, sw = _pair(m.stride if m.stride is not None else m.kernel_size)
        ph, pw = _pair(m.padding)
        dh, dw = _pair(getattr(m, "dilation", 1))
        # input position read by output (i, j) at tap (a, b); h·w stands for the padding
        rows = torch.arange(ho)[:, None, None, None] * sh - ph
        rows = rows + torch.arange(kh)[None, None, :, None] * dh
        cols = torch.arange(wo)[None, :, None, None] * sw - pw
        cols = cols + torch.arange(kw)[None, None, None, :] * dw
        rows, cols = torch.broadcast_tensors(rows, cols)  # (ho, wo, kh, kw)
        inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        table = torch.where(inside, rows * w + cols, h * w).reshape(ho * wo, kh * kw)
        changed = torch.zeros(h * w + 1, dtype=torch.bool)
        changed[src] = True
        out_idx = torch.nonzero(changed[table].any(1)).flatten()
        if out_idx.numel() > DENSE_FROM * ho * wo:
            return None
        table = table[out_idx]
        needed = torch.unique(table[table < h * w])
        keep = needed[~changed[needed]]
        where = torch.full((h * w + 1,), -1, dtype=torch.long)
        where[keep] = torch.arange(keep.numel())
        where[src] = keep.numel() + torch.arange(src.numel())
        where[h * w] = keep.numel() + src.numel()
        return _Window(out_idx, keep, where[table])

    # ------------------------------------------------------------------ sparse evaluation

    @torch.no_grad()
    def logits(
        self,
        plan: TailPlan,
        edit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        rows: slice | None = None,
    ) -> torch.Tensor:
        """Logits of ``base[rows]`` (default: all) with the values at ``plan.positions``
        replaced by ``edit(values, positions)`` (``(n, k, C)`` and ``(k,)`` in, ``(n, k, C)``
        out)."""
        start, stop, _ = (rows or slice(None)).indices(self.base.shape[0])
        if plan.empty or stop <= start:
            return self.base_logits[start:stop].clone()
        out = []
        for r0 in range(start, stop, self.chunk):
            chunk = slice(r0, min(r0 + self.chunk, stop))
            env: dict[fx.Node, Any] = {}
            for i, n in enumerate(self.nodes):
                env[n] = self._sparse_node(n, env, chunk, plan, edit)
                self._free(env, i)
            out.append(self._dense(env[self.output], chunk))
        return torch.cat(out)

    def _sparse_node(
        self,
        n: fx.Node,
        env: dict[fx.Node, Any],
        rows: slice,
        plan: TailPlan,
        edit: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> Any:
        kind = self.kind[n]
        if n is self.input:
            idx = plan.support[n]
            if idx is None:  # a wide change: dense from the start
                full = self.base_flat[rows].clone()
                full[:, plan.positions] = edit(full[:, plan.positions], plan.positions)
                return self._unflat(full, self.shapes[n])
            return _Changed(n, idx, edit(self.base_flat[rows].index_select(1, idx), idx))
        first = n.args[0] if n.args else None
        x = env.get(first) if isinstance(first, fx.Node) else None
        if not isinstance(x, _Changed):
            return self._dense_node(n, env, rows)
        if kind == "pointwise":
            v4 = x.vals.permute(0, 2, 1).unsqueeze(-1)  # (n, C, k, 1), channels_last
            if n.op == "call_module":
                y = self.modules[str(n.target)](v4)
            elif n.op == "call_function":
                y = n.target(v4, *n.args[1:], **n.kwargs)  # type: ignore[operator]
            else:
                y = getattr(v4, str(n.target))(*n.args[1:], **n.kwargs)
            return _Changed(n, x.idx, y.squeeze(-1).permute(0, 2, 1))
        if kind in _WINDOWED and n in plan.windows:
            window = plan.windows[n]
            return _Changed(n, window.out_idx, self._window_op(n, x, window, rows))
        if kind == "add" and plan.support[n] is not None:
            other = env.get(n.args[1])  # type: ignore[arg-type]
            if isinstance(other, _Changed):
                idx = plan.support[n]
                assert idx is not None
                return _Changed(n, idx, self._at(x, idx, rows) + self._at(other, idx, rows))
        if kind == "global":
            _, h, w = self.shapes[x.node]
            delta = (x.vals - self._cached(x.node, rows).index_select(1, x.idx)).sum(1)
            cached = self.cache[n][rows]
            return cached + (delta / (h * w)).view(cached.shape)
        return self._dense_node(n, env, rows)

    def _at(self, x: _Changed, idx: torch.Tensor, rows: slice) -> torch.Tensor:
        """``x``'s values at ``idx``, a sorted superset of its changed positions."""
        if x.idx.numel() == idx.numel():
            return x.vals
        vals = self._cached(x.node, rows).index_select(1, idx)
        vals[:, torch.searchsorted(idx, x.idx)] = x.vals.to(vals.dtype)
        return vals

    def _window_op(self, n: fx.Node, x: _Changed, win: _Window, rows: slice) -> torch.Tensor:
        m = self.modules[str(n.target)]
        cached = self._cached(x.node, rows)
        nrows, channels = cached.shape[0], cached.shape[2]
        fill = float("-inf") if self.kind[n] == "maxpool" else 0.0
        src = torch.cat(
            [
                cached.index_select(1, win.keep),
                x.vals.to(cached.dtype),
                cached.new_full((nrows, 1, channels), fill),
            ],
            1,
        )
        k_out, taps = win.order.shape
        patches = src.index_select(1, win.order.flatten()).view(nrows, k_out, taps, channels)
        if self.kind[n] == "maxpool":
            return patches.amax(2)
        if self.kind[n] == "avgpool":
            return patches.mean(2)
        weight = self._weight(n, m)
        if m.groups == 1:
            y = patches.view(nrows * k_out, taps * channels) @ weight
        else:
            g = m.groups
            p = patches.view(nrows * k_out, taps, g, channels // g).permute(2, 0, 1, 3)
            y = torch.bmm(p.reshape(g, nrows * k_out, -1), weight).permute(1, 0, 2)
            y = y.reshape(nrows * k_out, -1)
        if m.bias is not None:
            y = y + m.bias.detach()
        return y.view(nrows, k_out, -1)

    def _weight(self, n: fx.Node, m: nn.Conv2d) -> torch.Tensor:
        """The weight as a ``(taps·C_in, C_out)`` matrix (per group), matching the patches."""
        weight = self._weights.get(n)
        if weight is None:
            w = m.weight.detach()  # (C_out, C_in/g, kh, kw)
            cout, cin_g, kh, kw = w.shape
            g = m.groups
            if g == 1:
                weight = w.permute(2, 3, 1, 0).reshape(kh * kw * cin_g, cout).contiguous()
            else:
                wg = w.view(g, cout // g, cin_g, kh, kw).permute(0, 3, 4, 2, 1)
                weight = wg.reshape(g, kh * kw * cin_g, cout // g).contiguous()
            self._weights[n] = weight
        return weight
