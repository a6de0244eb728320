"""Training speed: a plain PyTorch loop against our fast path, the floor, and the default pipeline.

    python -m bench.train_speed --data-root DIR --out DIR [--device auto] [--quick]

``DIR`` holds Fashion-MNIST's four IDX files (``train-images-idx3-ubyte.gz`` …). On one GPU the
whole run takes a few minutes; it installs and downloads nothing. It prints a table last and
writes ``train_speed.json`` and ``train_speed.log`` to ``--out``. ``--quick`` shrinks every
part (a check that the script works, e.g. on a CPU; its figures mean nothing).

What is measured, on the same models (the shipped teacher's small-cnn, the small-cnn-student)
and the same data:

- images/s of teacher training and of RobustKD distillation (detoxified teacher forward +
  student forward/backward + feature and logit KD) for (a) a plain loop — float32 CPU tensors
  through a DataLoader with 4 workers, fp32, a per-step ``loss.item()`` — and (b) our engine;
- the floor: the same training step on one pre-resident random batch and nothing else
  (eager; captured in a CUDA graph; and at a batch 8× larger), so the fast path's overhead
  over pure forward + backward is known;
- the fast path with ``torch.compile`` (default and reduce-overhead, i.e. CUDA graphs);
- the default pipeline end to end: train the ``fashion-badnets`` teacher, fit the detox,
  distil the RobustKD student with the preset's plan, with the wall time and ACC/ASR.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.analysis.features import capture, resolve_layers
from robustkd.data.datasets import ImageDataset, load_dataset, normalize, to_float
from robustkd.defenses import run_method
from robustkd.defenses.detox import fit_screen, fit_threshold
from robustkd.experiments.presets import preset
from robustkd.experiments.teacher import TeacherConfig, train_teacher
from robustkd.models import create_model
from robustkd.models.checkpoints import DEFAULT_TEACHER, load_checkpoint
from robustkd.training.config import TrainConfig, make_optimizer
from robustkd.training.device import device_label, resolve_device
from robustkd.training.distill import DistillConfig, distill_student
from robustkd.training.engine import train_model
from robustkd.training.losses import FeatureDistiller, logit_kd_loss
from robustkd.training.scenarios import build_scenario, scenario_from_plan

LOG: list[str] = []


def log(line: str) -> None:
    LOG.append(line)
    print(line, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images_per_s(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else float("nan")


def _fresh(name: str, data: ImageDataset, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(
        name, num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size
    )


# --------------------------------------------------------------------------- (a) plain loops


def _plain_loader(data: ImageDataset, batch: int, workers: int) -> torch.utils.data.DataLoader:
    x = normalize(to_float(data.images), data.mean, data.std)  # float32 on the CPU
    dataset = torch.utils.data.TensorDataset(x, data.labels)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True
    )


def _timed_loop(
    loader: torch.utils.data.DataLoader,
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    steps: int,
    warmup: int,
) -> float:
    """images/s of ``step`` over ``steps`` batches after ``warmup`` ones (loader restarted as
    needed), with a ``loss.item()`` each step as a plain loop has for its log."""
    done = seen = 0
    started = 0.0
    while done < warmup + steps:
        for x, y in loader:
            if done == warmup:
                _sync(device)
                started = time.perf_counter()
                seen = 0
            x, y = x.to(device), y.to(device)
            step(x, y).item()
            seen += y.shape[0]
            done += 1
            if done >= warmup + steps:
                break
    _sync(device)
    return _images_per_s(seen, time.perf_counter() - started)


def plain_teacher(data: ImageDataset, batch: int, device: torch.device, steps: int, workers: int):
    model = _fresh("small-cnn", data).to(device).train()
    opt = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
    )

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return _timed_loop(_plain_loader(data, batch, workers), step, device, steps, warmup=5)


def plain_distill(
    scenario: Any, teacher: nn.Module, detox: Any, batch: int, device, steps, workers
):
    data = scenario.distill
    student = _fresh("small-cnn-student", data).to(device).train()
    teacher = teacher.to(device).eval()
    detox.to(device)
    t_layers = resolve_layers(teacher, "all")
    s_layers = list(student.feature_layers)[-len(t_layers) :]
    with torch.no_grad(), capture(teacher, t_layers) as t_out, capture(student, s_layers) as s_out:
        probe = torch.zeros(2, *data.input_shape, device=device)
        teacher(probe)
        student.eval()(probe)
        t_ch = [int(t_out[n].shape[1]) for n in t_layers]
        s_ch = [int(s_out[n].shape[1]) for n in s_layers]
    student.train()
    distiller = FeatureDistiller(s_ch, t_ch).to(device)
    params = list(student.parameters()) + list(distiller.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    hooks = (detox.attach(teacher), capture(teacher, t_layers), capture(student, s_layers))
    with hooks[0], hooks[1] as t_out, hooks[2] as s_out:

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = student(x)
            with torch.no_grad():
                t_logits = teacher(x)
            s_feats = [s_out[n] for n in s_layers]
            t_feats = [t_out[n] for n in t_layers]
            loss = F.cross_entropy(logits, y)
            loss = loss + logit_kd_loss(logits, t_logits) + distiller(s_feats, t_feats)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        loader = _plain_loader(data, batch, workers)
        return _timed_loop(loader, step, device, steps, warmup=5)


# --------------------------------------------------------------------------- (b) our engine


def _best_epoch_rate(history: list[dict[str, Any]]) -> float:
    """images/s of the steady epochs (the first pays for warm-up and compilation)."""
    steady = history[1:] or history
    return statistics.median(_images_per_s(h["images"], h["train_seconds"]) for h in steady)


def fast_teacher(data: ImageDataset, batch: int, device, epochs: int, compile_mode: str = "off"):
    config = TrainConfig(
        epochs=epochs, batch_size=batch, device=str(device), augment="crop", compile=compile_mode
    )
    history = train_model(_fresh("small-cnn", data), data, config).history
    return _best_epoch_rate(history)


def fast_distill(
    scenario: Any, teacher: nn.Module, fit: Any, batch: int, device, epochs: int, compile_mode: str
):
    config = DistillConfig(
        epochs=epochs, batch_size=batch, device=str(device), compile=compile_mode, eval_size=200
    )
    screen = fit_screen(teacher, fit, None, config.screen_quantile)
    withheld = screen.flags(teacher, scenario.distill)
    history = distill_student(
        teacher,
        _fresh("small-cnn-student", scenario.distill),
        scenario,
        config,
        detoxifier=fit.detoxifier(None, 1.0),
        withheld=withheld,
        logit_weight=1.0,
        feature_weight=1.0,
    )
    return _best_epoch_rate(history)


# --------------------------------------------------------------------------- the floor


def floor(data: ImageDataset, batch: int, device: torch.device, steps: int, graph: bool) -> float:
    """The training step alone on one pre-resident random batch: bf16 + channels_last +
    fused SGD on CUDA (as our engine), optionally replayed from a CUDA graph."""
    cuda = device.type == "cuda"
    if graph and not cuda:
        raise RuntimeError("CUDA graphs need a GPU")
    model = _fresh("small-cnn", data).to(device).train()
    if cuda:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model.parameters(), TrainConfig(device=str(device)), device)
    x = torch.randn(batch, *data.input_shape, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, data.num_classes, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=False)  # graph replay needs the same .grad tensors
        # no autocast cache: a graph must not keep casts made during its warm-up
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda, cache_enabled=False):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        run = g.replay
    else:
        for _ in range(3):
            step()
        run = step
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        run()
    _sync(device)
    return _images_per_s(batch * steps, time.perf_counter() - started)


# --------------------------------------------------------------------------- the pipeline


def pipeline(data_root: str | None, out: Path, device: torch.device, quick: bool) -> dict:
    """fashion-badnets end to end: teacher training, detox fit, RobustKD student."""
    values = preset("fashion-badnets")
    plan = values.pop("distill")
    train = dict(values.pop("train"))
    train["device"] = str(device)
    if quick:
        values["train_size"], train["epochs"] = 2000, 1
        plan.update(distill_size=1000, trusted_size=200, test_size=500)
        plan["config"] = {**plan["config"], "epochs": 1}
    values["data_root"] = data_root
    config = TeacherConfig.from_dict({**values, "train": train})
    _sync(device)
    started = time.perf_counter()
    teacher, meta = train_teacher(config, out / "pipeline-teacher.safetensors")
    teacher_s = time.perf_counter() - started
    scenario = scenario_from_plan(plan, meta, data_root=data_root)
    dconfig = DistillConfig.from_dict({**plan["config"], "device": str(device)})
    result = run_method("robustkd", teacher, meta, scenario, dconfig)
    _sync(device)
    total = time.perf_counter() - started
    return {
        "seconds_total": total,
        "seconds_teacher": teacher_s,
        "teacher_acc": meta["metrics"]["acc"],
        "teacher_asr": meta["metrics"]["asr"],
        "student_acc": result.metrics["acc"],
        "student_asr": result.metrics["asr"],
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", help="folder with Fashion-MNIST's IDX files")
    parser.add_argument("--out", required=True, help="folder for train_speed.json and the log")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=128, help="the presets' batch size")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers, plain loop")
    parser.add_argument("--steps", type=int, help="timed steps per plain loop and floor (300)")
    parser.add_argument("--epochs", type=int, help="epochs per fast-path measurement (4)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    quick = args.quick
    batch = args.batch_size
    steps = args.steps or (4 if quick else 300)
    epochs = args.epochs or (2 if quick else 4)
    workers = 0 if quick else args.workers
    facts = {
        "device": device_label(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "batch_size": batch,
        "quick": quick,
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m bench.train_speed "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    log(json.dumps(facts))
    train = load_dataset("fashion-mnist", "train", args.data_root)
    if quick:
        train = train.subset(range(1024))
    rows: list[tuple[str, float | None, str]] = []
    figures: dict[str, Any] = {"facts": facts}

    def record(key: str, label: str, value: float | None, note: str = "") -> None:
        figures[key] = value
        rows.append((label, value, note))
        log(f"{label}: {'-' if value is None else f'{value:,.0f}'} {note}".rstrip())

    def attempt(key: str, label: str, fn: Callable[[], float], note: str = "") -> None:
        try:
            record(key, label, fn(), note)
        except Exception as exc:  # e.g. CUDA graphs or compile unavailable: report, go on
            record(key, label, None, f"failed: {type(exc).__name__}: {exc}".splitlines()[0])

    record(
        "teacher_plain",
        "teacher, plain loop (img/s)",
        plain_teacher(train, batch, device, steps, workers),
    )
    record("teacher_fast", "teacher, fast path (img/s)", fast_teacher(train, batch, device, epochs))
    for mode in () if args.no_compile else ("default", "reduce-overhead"):
        attempt(
            f"teacher_fast_compile_{mode}",
            f"teacher, fast path + compile {mode} (img/s)",
            lambda mode=mode: fast_teacher(train, batch, device, epochs, mode),
        )
    record(
        "floor_eager",
        "floor: step on resident batch, eager (img/s)",
        floor(train, batch, device, steps, False),
    )
    attempt(
        "floor_graph",
        "floor: same step as a CUDA graph (img/s)",
        lambda: floor(train, batch, device, steps, True),
    )
    attempt(
        "floor_eager_8x",
        f"floor: eager at batch {8 * batch} (img/s)",
        lambda: floor(train, 8 * batch, device, steps, False),
    )
    attempt(
        "teacher_fast_8x",
        f"teacher, fast path at batch {8 * batch} (img/s)",
        lambda: fast_teacher(train, 8 * batch, device, epochs),
    )

    teacher, meta = load_checkpoint(DEFAULT_TEACHER)
    sizes = {"distill_size": 1000, "trusted_size": 200} if quick else {"distill_size": 20000}
    scenario = build_scenario("untrusted", meta, data_root=args.data_root, **sizes)
    fit = fit_threshold(teacher, scenario.trusted, scenario.distill)
    record(
        "distill_plain",
        "RobustKD distillation, plain loop (img/s)",
        plain_distill(scenario, teacher, fit.detoxifier(None, 1.0), batch, device, steps, workers),
    )
    record(
        "distill_fast",
        "RobustKD distillation, fast path (img/s)",
        fast_distill(scenario, teacher, fit, batch, device, epochs, "off"),
    )
    if not args.no_compile:
        attempt(
            "distill_fast_compile",
            "RobustKD distillation, fast path + compile reduce-overhead (img/s)",
            lambda: fast_distill(scenario, teacher, fit, batch, device, epochs, "reduce-overhead"),
        )
    figures["speedup_teacher"] = figures["teacher_fast"] / figures["teacher_plain"]
    figures["speedup_distill"] = figures["distill_fast"] / figures["distill_plain"]
    figures["overhead_vs_floor"] = figures["floor_eager"] / figures["teacher_fast"] - 1
    if not args.skip_pipeline:
        figures["pipeline"] = pipeline(args.data_root, out, device, quick)
        log(json.dumps(figures["pipeline"]))

    (out / "train_speed.json").write_text(json.dumps(figures, indent=2))
    table = [
        "",
        f"| measurement ({facts['device']}, torch {facts['torch']}, batch {batch}) | value |",
        "| --- | ---: |",
    ]
    for label, value, note in rows:
        shown = note if value is None else f"{value:,.0f}" + (f" ({note})" if note else "")
        table.append(f"| {label} | {shown} |")
    table += [
        f"| speed-up teacher (fast / plain) | {figures['speedup_teacher']:.1f}× |",
        f"| speed-up distillation (fast / plain) | {figures['speedup_distill']:.1f}× |",
        f"| fast path vs eager floor (overhead) | {100 * figures['overhead_vs_floor']:+.0f} % |",
    ]
    if "pipeline" in figures:
        p = figures["pipeline"]
        table.append(
            f"| fashion-badnets pipeline end to end | {p['seconds_total']:.1f} s (teacher "
            f"{p['seconds_teacher']:.1f} s; teacher ACC/ASR {100 * p['teacher_acc']:.2f}/"
            f"{100 * p['teacher_asr']:.2f}; RobustKD ACC/ASR {100 * p['student_acc']:.2f}/"
            f"{100 * p['student_asr']:.2f}) |"
        )
    for line in table:
        log(line)
    (out / "train_speed.log").write_text("\n".join(LOG) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
