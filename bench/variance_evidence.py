"""What the variance defence sees of a teacher's trigger: per stage, and for the sample screen.

    python -m bench.variance_evidence TEACHER.safetensors [MORE.safetensors ...] [--size 1000]

For each teacher (its recorded trigger and target), on the validation split: a trusted clean
subset and a same-size suspect subset of which ``--rate`` carry the trigger (true labels), as
the Feature variance page's probe. Per stage: the units flagged at the clean-halves default
threshold, the highest unit score, and the mean of the top 1 % of unit scores (what an
adaptive attack tries to push down). Then the sample screen: RobustKD's (mean squared z over
the flagged units), one over every unit of every stage, each calibrated at the 99th
percentile of trusted clean scores, RobustKD's screen run within each labelled class
(``screen_within_classes``), its label screen (samples whose label the teacher disputes) and
its signature screen (learned from the disputed samples, ``defenses.signature``): how many
triggered suspect images each withholds (recall) and how many images in all. Prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from robustkd.attacks import trigger_from_dict
from robustkd.attacks.poison import poison_dataset
from robustkd.data.datasets import load_dataset
from robustkd.defenses.detox import (
    fit_label_screen,
    fit_screen,
    fit_threshold,
    screen_within_classes,
)
from robustkd.defenses.signature import fit_signature_screen
from robustkd.errors import RobustKDError
from robustkd.models.checkpoints import load_checkpoint
from robustkd.models.modelcard import attack_mode_of, normalized_for
from robustkd.training.scenarios import probe_scenario


def evidence(path: Path, size: int, rate: float) -> list[str]:
    """Markdown rows for one teacher: one per stage, then one for the screens."""
    model, meta = load_checkpoint(path)
    if not meta.get("trigger") or meta.get("target") is None:
        raise RobustKDError(
            f"{path.name} records no trigger and target; give a backdoored teacher."
        )
    val = normalized_for(meta, load_dataset(meta.get("dataset") or "fashion-mnist", "val"))
    trigger = trigger_from_dict(meta["trigger"])
    probe = probe_scenario(val, size)  # the Feature variance page's subsets
    planted = poison_dataset(
        probe.suspect, trigger, rate, int(meta["target"]), mode=attack_mode_of(meta),
        keep_labels=True,
    )  # fmt: skip
    suspect, triggered = planted.dataset, planted.poisoned_mask
    fit = fit_threshold(model, probe.trusted, suspect)
    flagged = fit.flagged_units()
    rows = []
    for name, layer in fit.layers.items():
        scores = layer.scores.flatten()
        top = scores.topk(max(1, len(scores) // 100)).values.mean()
        rows.append(
            f"| {path.stem} | {name} | {flagged[name]:,} of {scores.numel():,} | "
            f"{float(scores.max()):.2f} | {float(top):.2f} |"
        )
    cells = []
    flagged_screen = fit_screen(model, fit)
    every_unit = fit_screen(model, fit, units="all")
    for screen in (flagged_screen, every_unit):
        if not screen.active:
            cells.append("inactive (no unit flagged)")
            continue
        withheld = screen.scores(model, suspect) > screen.threshold
        caught = int((withheld & triggered).sum())
        cells.append(f"{caught} of {int(triggered.sum())} ({int(withheld.sum())} withheld)")
    within, _ = screen_within_classes(model, probe.trusted, suspect)
    # the label screen, then the signature learned from what it disputes
    disputed = fit_label_screen(model, fit.calibration).flags(model, suspect)
    examples = suspect.subset(torch.nonzero(disputed).flatten())
    signature = fit_signature_screen(model, probe.trusted, examples)
    shared = torch.zeros_like(disputed)
    if signature is not None:
        shared = signature.flags(model, suspect)
    for withheld in (within, disputed, shared):
        caught = int((withheld & triggered).sum())
        cells.append(f"{caught} of {int(triggered.sum())} ({int(withheld.sum())} withheld)")
    rows.append(f"| {path.stem} | screen | {' | '.join(cells)} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("teachers", nargs="+", type=Path, help="backdoored teacher checkpoints")
    parser.add_argument("--size", type=int, default=1000, help="trusted and suspect images each")
    parser.add_argument("--rate", type=float, default=0.1, help="triggered share of the suspect")
    args = parser.parse_args(argv)
    lines = [
        "| teacher | stage | flagged units (default threshold) | highest unit score "
        "| top 1 % mean score |",
        "| --- | --- | --- | --- | --- |",
    ]
    try:
        for path in args.teachers:
            lines += evidence(path, args.size, args.rate)
    except RobustKDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    print(
        "\nscreen rows: triggered suspect images withheld by the flagged-unit screen | by a "
        "screen over every unit | by the flagged-unit screen within each class | by the "
        "label screen (disputed labels) | by the signature of the disputed samples (images "
        "withheld in all)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
