"""Speed of the interactive pieces on the shipped teacher: variance statistics and the
threshold preview (what the Feature variance page's slider calls).

    python -m bench.detox_speed [--repeats 7] [--json runs/bench/detox_speed.json]

Prints a table; the figures and the machine go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from robustkd.analysis.features import feature_stats
from robustkd.defenses.detox import DetoxPreview, fit_threshold
from robustkd.models.checkpoints import DEFAULT_TEACHER, load_checkpoint
from robustkd.training.scenarios import build_scenario


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, oneDNN kernels)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    teacher, meta = load_checkpoint(DEFAULT_TEACHER)
    scenario = build_scenario("untrusted", meta, distill_size=5000, trusted_size=1000)
    fit = fit_threshold(teacher, scenario.trusted, scenario.distill)
    stats_set = scenario.test.subset(range(1000))
    preview_set = scenario.test.subset(range(1000))  # 1,000 clean + ~900 triggered images
    rows = []
    for layer in teacher.feature_layers:
        stats_ms = _median_ms(
            lambda layer=layer: feature_stats(teacher, stats_set, [layer]), args.repeats
        )
        preview = DetoxPreview(teacher, fit, layer, preview_set, scenario.trigger, scenario.target)
        base = fit.layers[layer].default_threshold
        thresholds = [base * f for f in (0.5, 0.75, 1.0, 1.5, 2.0)]
        cycle = iter(thresholds * (args.repeats + 1))
        preview_ms = _median_ms(lambda p=preview, c=cycle: p(next(c)), args.repeats)
        n_images = preview.clean.shape[0] + (
            preview.triggered.shape[0] if preview.triggered is not None else 0
        )
        rows.append(
            {
                "layer": layer,
                "stats_1000_images_ms": round(stats_ms, 1),
                "preview_ms": round(preview_ms, 1),
                "preview_images": n_images,
            }
        )
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "rows": rows,
    }
    print(f"torch {info['torch']}, {info['threads']} threads")
    print("| layer | variance stats, 1,000 images (ms) | threshold preview (ms) | images |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['layer']} | {r['stats_1000_images_ms']} | {r['preview_ms']} | "
            f"{r['preview_images']} |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
