"""One teacher shared by every session of the app: the page computations, run from several
threads at once on ONE shared model, give exactly what they give alone, and the model is never
changed (no hook, no mode switch, no move; see ``robustkd.models.sharing``). Then two real browser
sessions against one ``streamlit run`` server, and a teacher recorded as all-to-all measured
as all-to-all on the pages."""

from __future__ import annotations

import copy
import dataclasses
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import fx, nn

from robustkd.analysis.attribution import attribute
from robustkd.analysis.features import activations, capture, feature_stats, tail_from
from robustkd.analysis.metrics import evaluate, predict
from robustkd.analysis.predictions import flip_grid
from robustkd.attacks import trigger_from_dict
from robustkd.attacks.poison import poison_dataset
from robustkd.data.datasets import ImageDataset, load_dataset, to_float
from robustkd.defenses.detox import (
    Detoxifier,
    DetoxPreview,
    ThresholdDetox,
    ThresholdFit,
    auto_threshold,
    fit_threshold,
)
from robustkd.errors import RobustKDError
from robustkd.models.checkpoints import load_checkpoint, save_checkpoint
from robustkd.models.modelcard import normalized_for
from robustkd.models.sharing import SharedModelError, is_shared, share, view
from tests.test_e2e_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    _slider,
    server,  # noqa: F401  (the streamlit server fixture)
)

LAYER = "block2"  # the Feature variance page's default layer for the tiny teacher
THREADS = 6


@pytest.fixture(scope="module")
def shared(tiny_teacher: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The tiny teacher as the app's cached loader hands it to every session."""
    model, meta = load_checkpoint(tiny_teacher)
    return share(model), meta


@pytest.fixture(scope="module")
def defender_sets(small_train: ImageDataset) -> tuple[ImageDataset, ...]:
    """Trusted, suspect (10 % triggered, labels kept) and validation images, 200 each."""
    trusted, suspect, validation = (small_train.subset(range(i, i + 200)) for i in (0, 200, 400))
    trigger = trigger_from_dict({"name": "badnets", "size": 3})
    suspect = poison_dataset(suspect, trigger, 0.1, 0, keep_labels=True).dataset
    return trusted, suspect, validation


def _safe(fn: Callable[..., Any], *args: Any) -> Any:
    """The result, or the user-facing message (the same message is the same outcome)."""
    try:
        return fn(*args)
    except RobustKDError as exc:
        return f"error: {exc}"


def _page_computations(
    model: nn.Module, meta: dict[str, Any], data: ImageDataset, sets: tuple[ImageDataset, ...]
) -> dict[str, Callable[[], Any]]:
    """What the Teacher, Triggers, Feature variance and Attributions pages compute."""
    trusted, suspect, validation = sets
    trigger, target = trigger_from_dict(meta["trigger"]), int(meta["target"])
    fit = fit_threshold(model, trusted, suspect, LAYER)
    one = ThresholdFit({LAYER: fit.layers[LAYER]}, fit.granularity, fit.calibration)
    images = to_float(data.images[:6])
    preds = predict(model, images, data.mean, data.std)

    def stats() -> list[Any]:
        return [feature_stats(model, data, [LAYER], t)[LAYER] for t in (None, trigger)]

    def maps() -> list[torch.Tensor]:  # the page's activation maps, one image at a time
        return [activations(model, data.subset([i]), LAYER, t)[0] for i in range(3)
                for t in (None, trigger)]  # fmt: skip

    def preview() -> list[Any]:  # built (traced) and called, as a fresh cache entry is
        p = DetoxPreview(model, fit, LAYER, data, trigger, target)
        return [p(t) for t in (None, 1.0, 3.0, 1e5)]

    def attributions() -> list[torch.Tensor]:
        return [
            attribute(model, images, preds, method, data.mean, data.std, layer=LAYER)
            for method in ("layer-gradcam", "saliency")
        ]

    return {
        "feature_stats": stats,
        "activation maps": maps,
        "auto threshold": lambda: _safe(auto_threshold, model, one, validation),
        "evaluate with trigger": lambda: evaluate(model, data, trigger, target),
        "detox preview": preview,
        "attribution": attributions,
        "flip grid": lambda: flip_grid(model, data, trigger, target, 16, 0).to_dict(),
        "threshold fit": lambda: fit_threshold(model, trusted, suspect, LAYER).layers[LAYER].scores,
    }


def _same(a: Any, b: Any) -> bool:
    """Exact equality through tensors, dataclasses and containers."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(
            _same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
        )
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _hooks(model: nn.Module) -> int:
    return sum(
        len(d)
        for m in model.modules()
        for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                  m._backward_pre_hooks)
    )  # fmt: skip


def test_page_computations_at_once_on_one_shared_teacher(
    shared: tuple[nn.Module, dict[str, Any]],
    small_test: ImageDataset,
    defender_sets: tuple[ImageDataset, ...],
) -> None:
    model, meta = shared
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    module_call, module_getattr = nn.Module.__call__, nn.Module.__getattr__
    jobs = _page_computations(model, meta, small_test, defender_sets)
    alone = {name: job() for name, job in jobs.items()}
    assert alone["evaluate with trigger"].asr > 0.2  # a backdoor to lose, were hooks shared
    assert not str(alone["auto threshold"]).startswith("error")

    order = [name for name in jobs for _ in range(2)]
    random.Random(0).shuffle(order)
    with ThreadPoolExecutor(THREADS) as pool:
        together = list(pool.map(lambda name: (name, jobs[name]()), order))
    wrong = [name for name, result in together if not _same(result, alone[name])]
    assert not wrong, f"different results beside other sessions: {wrong}"

    # the shared model as it was: no hook left, eval mode, same weights, nothing patched
    assert _hooks(model) == 0
    assert not any(m.training for m in model.modules())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(p.grad is None for p in model.parameters())
    assert nn.Module.__call__ is module_call and nn.Module.__getattr__ is module_getattr


class _PauseWhileTraced(nn.Module):
    """Holds a torch.fx trace open (fx patches nn.Module for the whole process meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.tracing, self.resume = threading.Event(), threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, fx.Proxy):
            self.tracing.set()
            assert self.resume.wait(30)
        return x


def test_forward_passes_while_another_thread_traces_a_tail(
    shared: tuple[nn.Module, dict[str, Any]], small_test: ImageDataset
) -> None:
    model, _ = shared
    images = small_test.images[:50]
    expected = predict(model, images, small_test.mean, small_test.std, return_probs=True)
    pause = _PauseWhileTraced()
    net = nn.Sequential(nn.Conv2d(1, 4, 3), pause, nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    net(torch.zeros(1, 1, 28, 28))
    with ThreadPoolExecutor(1) as pool:
        tail = pool.submit(tail_from, net, "0")
        assert pause.tracing.wait(30)
        try:  # a forward of the shared teacher in the middle of the trace
            during = predict(model, images, small_test.mean, small_test.std, return_probs=True)
        finally:
            pause.resume.set()
        assert tail.result() is not None
    assert torch.equal(during, expected)
    assert nn.Module.__call__ is nn.Module._wrapped_call_impl  # fx took its patch back


def test_a_shared_model_refuses_changes_and_views_cost_no_weights(
    shared: tuple[nn.Module, dict[str, Any]],
) -> None:
    model, _ = shared
    assert is_shared(model)
    detox = Detoxifier({LAYER: ThresholdDetox(torch.ones(1), torch.zeros(1))}, "threshold")
    changes: list[Callable[[], Any]] = [
        lambda: model.register_forward_hook(lambda *a: None),
        lambda: model.get_submodule(LAYER).register_forward_pre_hook(lambda *a: None),
        lambda: model.train(),
        lambda: model.to(torch.float64),
        lambda: model.requires_grad_(False),
        lambda: detox.attach(model).__enter__(),
        lambda: capture(model, [LAYER]).__enter__(),
    ]
    for change in changes:
        with pytest.raises(SharedModelError, match="shared between sessions"):
            change()
    assert model.eval() is model and _hooks(model) == 0  # already eval: allowed, a no-op

    own = view(model)
    assert not is_shared(own) and not own.training
    for (name, p), q in zip(model.named_parameters(), own.parameters(), strict=True):
        assert q.data_ptr() == p.data_ptr() and not q.requires_grad, name  # aliases, frozen
    x = torch.rand(4, 1, 28, 28)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    running = bn.running_mean.clone()
    with capture(own.train(), [LAYER]) as out:  # a train-mode forward of the view …
        own(x)
    assert LAYER in out and _hooks(own) == 0
    assert torch.equal(bn.running_mean, running) and not bn.training  # … leaves the model be

    mine = copy.deepcopy(model)  # a deep copy is the caller's own, changeable model
    assert not is_shared(mine) and mine.train().training
    mine.to(torch.float64)
    assert next(model.parameters()).dtype == torch.float32


# --------------------------------------------------------------------------- two browsers


def _metrics(page: Any) -> list[str]:
    return page.locator('[data-testid="stMetric"]').all_inner_texts()


_STATE = "document.querySelector('[data-testid=stApp]')?.getAttribute('data-test-script-state')"


def _act(page: Any, action: Callable[[], Any]) -> None:
    """Do ``action`` and return at once; ``_done`` waits for the script run it starts."""
    page.evaluate(
        "state => { window.__ran = false; const app = document.querySelector("
        "'[data-testid=stApp]'); new MutationObserver(() => { if (eval(state) !== 'notRunning')"
        " window.__ran = true; }).observe(app, {attributes: true}); }",
        _STATE,
    )
    action()


def _done(page: Any, fresh: bool = False) -> None:
    """Wait until the script run started by ``_act`` (or by loading the page) has finished."""
    if not fresh:
        page.wait_for_function("() => window.__ran === true")
    page.wait_for_function(f"() => {_STATE} === 'notRunning'", timeout=120_000)
    assert page.locator('[data-testid="stException"]').count() == 0
    assert "Traceback" not in page.inner_text("body")


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make browser)")
def test_two_browser_sessions_at_once_see_what_one_sees(server: str) -> None:  # noqa: F811
    """One session works the Feature variance page (auto threshold, threshold slider: hooks
    and detoxified forwards) while another reloads the Teacher page (ACC/ASR on triggered
    images) on the same server; each sees the numbers it sees alone."""
    from playwright.sync_api import sync_playwright

    auto = "Auto threshold (validation data)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        one, two = (browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
                    for _ in range(2))  # fmt: skip
        for page in (one, two):
            page.set_default_timeout(60_000)
        one.goto(server)  # the Teacher page, on its own
        one.wait_for_selector('[data-testid="stMetric"]:has-text("ASR")')
        _done(one, fresh=True)
        alone = _metrics(one)
        two.goto(f"{server}/variance?var_tab=Threshold")  # the tab, opened by its address
        two.wait_for_selector("text=Flagged units")
        _done(two, fresh=True)

        seen = []
        steps = [
            lambda: two.get_by_role("button", name=auto).click(),
            lambda: _slider(two, "Variance threshold (log scale)", "Home"),
        ]
        for i, step in enumerate(steps):  # both sessions run their scripts at the same time
            _act(two, step)
            one.reload()
            one.wait_for_selector('[data-testid="stMetric"]:has-text("ASR")')
            _done(one, fresh=True)
            _done(two)
            assert _metrics(one) == alone, f"the Teacher page beside the variance page ({i})"
            seen.append(_metrics(two))
        assert seen[0] != seen[1]  # the threshold moved

        # the variance session's steps again, with the other session idle
        for step, expected in zip(steps, seen, strict=True):
            _act(two, step)
            _done(two)
            assert _metrics(two) == expected
        browser.close()


# --------------------------------------------------------------------------- all-to-all


@pytest.fixture(scope="module")
def all_to_all_teacher(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny teacher's weights recorded as an all-to-all attack.

    Its backdoor sends every triggered image to class 0, so measured all-to-all (target: the
    class after the image's own) its ASR is about one in ten, measured all-to-one it is high:
    a page that ignores the recorded mode shows the wrong one.
    """
    model, meta = load_checkpoint(tiny_teacher)
    out = tmp_path_factory.mktemp("all-to-all") / "a2a.safetensors"
    return save_checkpoint(out, model, {**meta, "attack_mode": "all-to-all"})


def _metric(at: Any, label: str) -> Any:
    return next(m for m in at.metric if m.label == label)


def test_all_to_all_teacher_is_measured_all_to_all(
    all_to_all_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_pages_triggers_variance import open_page, open_tab

    monkeypatch.setenv("ROBUSTKD_TEACHER", str(all_to_all_teacher))
    model, meta = load_checkpoint(all_to_all_teacher)
    trigger, target = trigger_from_dict(meta["trigger"]), int(meta["target"])
    data = normalized_for(meta, load_dataset("fashion-mnist", "test"))  # as the pages see it

    def asr(sub: ImageDataset, mode: str) -> float:
        result = evaluate(model, sub, trigger, target, mode).asr
        assert result is not None
        return result

    first = data.subset(range(1000))  # the Teacher page's default sample
    assert asr(first, "all-to-one") - asr(first, "all-to-all") > 0.1  # the modes disagree

    at = open_page("teacher.py")
    assert not at.exception and not at.error
    assert _metric(at, "ASR").value == f"{100 * asr(first, 'all-to-all'):.2f} %"
    assert "class after their own" in _metric(at, "ASR").help

    at = open_page("triggers.py")
    assert not at.exception and not at.error and at.radio(key="trig_mode").value == "all-to-all"
    grid = flip_grid(model, data, trigger, target, 8, 0, "all-to-all")
    assert torch.equal(grid.targets, (grid.labels + 1) % 10)
    flips = next(m.value for m in at.markdown if "flipped to" in m.value)
    assert flips.startswith(f"**{grid.n_flipped} of 8 flipped to the class after their own")

    # the Feature variance page's preview and its teacher-alone figure
    sub = data.subset(range(100))
    trusted, suspect = data.subset(range(1000, 1200)), data.subset(range(1200, 1400))
    fit = fit_threshold(model, trusted, suspect, LAYER)
    preview = DetoxPreview(model, fit, LAYER, sub, trigger, target, mode="all-to-all")
    untouched = preview(1e5)  # no unit flagged: the teacher itself
    assert untouched.flagged_units == 0 and untouched.asr == asr(sub, "all-to-all")
    at = open_tab(open_page("variance.py"), "Threshold")
    at.select_slider(key="var_n").set_value(100)
    at.number_input(key="var_trusted").set_value(100)
    at.run()
    assert not at.exception and not at.error
    assert "all-to-all" in next(c.value for c in at.caption if c.value.startswith("Trigger `"))
    alone = f"the teacher alone: {100 * asr(sub, 'all-to-all'):.2f} %"
    assert alone in _metric(at, "Detoxified ASR").help
