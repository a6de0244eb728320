"""The ``list`` verb: the names the registries know (models, triggers, data sets, presets,
methods, teacher recipes, checkpoint layouts)."""

from __future__ import annotations

import argparse
import sys


def _list(args: argparse.Namespace) -> int:
    from robustkd.attacks import trigger_names
    from robustkd.data.datasets import dataset_names
    from robustkd.defenses import METHODS, method_names
    from robustkd.experiments.presets import preset_names
    from robustkd.experiments.survive import RECIPES, recipe_names
    from robustkd.models import model_names
    from robustkd.models.interop import LAYOUTS

    names = {
        "models": model_names,
        "triggers": trigger_names,
        "datasets": dataset_names,
        "presets": preset_names,
        "methods": lambda: [f"{m:<16} {METHODS.get(m).description}" for m in method_names()],
        "recipes": lambda: [f"{r:<16} {RECIPES.get(r).description}" for r in recipe_names()],
        "layouts": lambda: list(LAYOUTS),
    }[args.what]()
    print("\n".join(names))
    if args.what == "models":
        from robustkd.models import unavailable_families

        for family, reason in unavailable_families().items():
            note = f"robustkd: note: the {family} models are unavailable ({reason})."
            print(note, file=sys.stderr)
    return 0
