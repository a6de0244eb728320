"""Speed of the interactive pieces on the shipped teacher: variance statistics and the
threshold preview (what the Feature variance page's slider calls).

    python -m bench.detox_speed [--repeats 7] [--json runs/bench/detox_speed.json]
                                [--threads N] [--clock wall|cpu]

Per layer, at 5 thresholds (0.5 to 2 × the clean-halves default), median milliseconds of:
the previous preview (the detoxified activations re-run through the whole tail at once,
kept here for comparison), the preview now on every image (the incremental tail), and its
first answer within the interactive budget with the images it used. The previous and the
current predictions are compared at each threshold. Prints a table; the figures and the
machine go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from robustkd.analysis.features import feature_stats
from robustkd.defenses.detox import INTERACTIVE_MS, DetoxPreview, ThresholdDetox, fit_threshold
from robustkd.models.checkpoints import DEFAULT_TEACHER, load_checkpoint
from robustkd.training.scenarios import build_scenario

FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _times_ms(
    fn: Callable[[], object], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> list[float]:
    fn()  # warm-up (allocator, oneDNN kernels)
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        times.append(1000 * (clock() - t))
    return times


@torch.no_grad()
def previous_predictions(preview: DetoxPreview, threshold: float) -> torch.Tensor:
    """The preview as it was: every cached activation detoxified in one copy, then the whole
    tail re-run on it (2,048 images at a time)."""
    assert preview.tail is not None
    detox = ThresholdDetox(preview.fit.mask(threshold), preview.fit.clean_mean)
    acts = torch.cat(
        [preview.clean] + ([preview.triggered] if preview.triggered is not None else [])
    )
    acts = acts.contiguous(memory_format=torch.channels_last)
    mask = detox.mask.bool()
    if mask.any():
        flagged = acts[:, mask]
        acts[:, mask] = flagged + (detox.clean_mean[mask] - flagged)
    return torch.cat(
        [preview.tail(acts[s : s + 2048]).argmax(1) for s in range(0, len(acts), 2048)]
    )


def _numbers(preview: DetoxPreview, preds: torch.Tensor) -> tuple[float, float | None]:
    n = preview.n_clean
    acc = float((preds[:n] == preview.labels).float().mean())
    targets = preview.trigger_targets
    asr = (
        float((preds[n:] == targets).float().mean())
        if targets is not None and len(targets)
        else None
    )
    return acc, asr


def _at_threshold(
    preview: DetoxPreview, threshold: float, repeats: int, clock: Callable[[], float]
) -> tuple[float, float, float, int, bool]:
    """Milliseconds of the previous preview, the current one on all images and its first
    answer (interleaved, so that a change of the machine's load hits all three alike); the
    images that first answer used; whether ACC/ASR equal the previous preview's."""
    calls: list[Callable[[], object]] = [
        lambda: previous_predictions(preview, threshold),
        lambda: preview(threshold),
        lambda: preview(threshold, budget_ms=INTERACTIVE_MS),
    ]
    times: list[list[float]] = [[], [], []]
    for fn in calls:
        fn()  # warm-up (allocator, oneDNN kernels)
    for _ in range(repeats):
        for fn, column in zip(calls, times, strict=True):
            t = clock()
            fn()
            column.append(1000 * (clock() - t))
    before, now, first = (statistics.median(column) for column in times)
    quick = preview(threshold, budget_ms=INTERACTIVE_MS)
    full = preview(threshold)
    same = (full.acc, full.asr) == _numbers(preview, previous_predictions(preview, threshold))
    return before, now, first, quick.n_clean + quick.n_triggered, same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: the process's CPU time (with --threads 1, a comparison "
        "that holds on a busy machine; the first answer still stops on elapsed time)",
    )
    args = parser.parse_args(argv)
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, meta = load_checkpoint(DEFAULT_TEACHER)
    scenario = build_scenario("untrusted", meta, distill_size=5000, trusted_size=1000)
    fit = fit_threshold(teacher, scenario.trusted, scenario.distill)
    stats_set = scenario.test.subset(range(1000))
    preview_set = scenario.test.subset(range(1000))  # 1,000 clean + ~900 triggered images
    rows = []
    for layer in teacher.feature_layers:
        stats_ms = statistics.median(
            _times_ms(
                lambda layer=layer: feature_stats(teacher, stats_set, [layer]), args.repeats, clock
            )
        )
        start = clock()
        # remember=0: every call computes (the page's preview also remembers recent masks)
        preview = DetoxPreview(
            teacher, fit, layer, preview_set, scenario.trigger, scenario.target, remember=0
        )
        prepare_ms = 1000 * (clock() - start)
        assert preview.engine is not None
        cache_mb = sum(t.numel() * t.element_size() for t in preview.engine.cache.values()) / 2**20
        base = fit.layers[layer].default_threshold
        timed = [_at_threshold(preview, base * f, args.repeats, clock) for f in FACTORS]
        before, now, first, used, same = (list(column) for column in zip(*timed, strict=True))
        rows.append(
            {
                "layer": layer,
                "stats_1000_images_ms": round(stats_ms, 1),
                "prepare_ms": round(prepare_ms),
                "cache_mb": round(cache_mb),
                "thresholds": [round(base * f, 3) for f in FACTORS],
                "previous_ms_each": [round(v, 1) for v in before],
                "exact_ms_each": [round(v, 1) for v in now],
                "first_answer_ms_each": [round(v, 1) for v in first],
                "first_answer_images_each": used,
                "previous_ms": round(statistics.median(before), 1),
                "previous_slowest_ms": round(max(before), 1),
                "exact_ms": round(statistics.median(now), 1),
                "exact_slowest_ms": round(max(now), 1),
                "first_answer_ms": round(statistics.median(first), 1),
                "first_answer_images": [min(used), max(used)],
                "images": preview.n_images,
                "same_as_previous": f"{sum(same)}/{len(FACTORS)}",
            }
        )
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "clock": args.clock,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "budget_ms": INTERACTIVE_MS,
        "rows": rows,
    }
    print(
        f"torch {info['torch']}, {info['threads']} threads, {info['cpus']} CPUs, "
        f"{args.clock} clock, load average {info['load_average_1min']} (at the end)"
    )
    print(
        "| layer | variance stats, 1,000 images (ms) | preview before (ms, median / slowest) | "
        "preview now, all images (ms, median / slowest) | first answer (ms) | its images | "
        "images | "
        "same ACC/ASR as before | prepare (ms) | extra cache (MB) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['layer']} | {r['stats_1000_images_ms']} | {r['previous_ms']} / "
            f"{r['previous_slowest_ms']} | "
            f"{r['exact_ms']} / {r['exact_slowest_ms']} | {r['first_answer_ms']} | "
            f"{'–'.join(map(str, r['first_answer_images']))} | {r['images']} | "
            f"{r['same_as_previous']} | "
            f"{r['prepare_ms']} | {r['cache_mb']} |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
