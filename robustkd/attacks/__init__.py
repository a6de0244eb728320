"""Attacks: backdoor triggers, one per module, registered by name in ``TRIGGERS``, and poisoning.

``base`` holds the ``Trigger`` base class, the registry and the helpers the triggers share;
``badnets``, ``blend``, ``sig``, ``wanet``, ``custom`` and ``optimized_blend`` hold one
trigger each, and ``poison`` plants any registered trigger in a dataset. Importing this package
registers every trigger.
Adding an attack: one new module here with a ``Trigger`` subclass decorated with
``@TRIGGERS.register("name")``, imported below, and its tests; ``create_trigger``, the CLI, the
app and poisoning pick it up by name.
"""

from __future__ import annotations

from robustkd.attacks.badnets import PATCH_PATTERNS, POSITIONS, BadNetsTrigger
from robustkd.attacks.base import (
    TRIGGERS,
    Trigger,
    create_trigger,
    trigger_from_dict,
    trigger_names,
)
from robustkd.attacks.blend import BlendTrigger
from robustkd.attacks.custom import CustomTrigger
from robustkd.attacks.optimized_blend import OptimizedBlendTrigger
from robustkd.attacks.sig import SIGTrigger
from robustkd.attacks.wanet import WaNetTrigger

__all__ = [
    "PATCH_PATTERNS",
    "POSITIONS",
    "TRIGGERS",
    "BadNetsTrigger",
    "BlendTrigger",
    "CustomTrigger",
    "OptimizedBlendTrigger",
    "SIGTrigger",
    "Trigger",
    "WaNetTrigger",
    "create_trigger",
    "trigger_from_dict",
    "trigger_names",
]
