"""Defences and baselines, one module per family, registered by name in ``METHODS``.

Adding a method: a module with a ``Method`` (or ``StudentMethod``) subclass decorated with
``@register_method``, imported below; the CLI, the app and the reports pick it up.
"""

# importing the families registers their methods
from robustkd.defenses import (  # noqa: F401
    baselines,
    learned_detox,
    nad,
    repair,
    reverse,
    variance_detox,
)
from robustkd.defenses.base import (
    METHODS,
    Context,
    Method,
    Recipe,
    StudentMethod,
    Trained,
    method_names,
    register_method,
    run_method,
)

__all__ = [
    "METHODS",
    "Context",
    "Method",
    "Recipe",
    "StudentMethod",
    "Trained",
    "method_names",
    "register_method",
    "run_method",
]
