"""RobustKD Studio: backdoor analysis for knowledge distillation.

A workflow reads data → model → attack → defence → evaluate::

    from robustkd import load_dataset, create_trigger, load_checkpoint, evaluate
    test = load_dataset("fashion-mnist", "test")
    teacher, meta = load_checkpoint("assets/default_teacher.safetensors")
    print(evaluate(teacher, test, create_trigger("badnets"), target=0))
"""

from __future__ import annotations

__version__ = "0.1.0"

from robustkd.analysis.metrics import der, evaluate
from robustkd.attacks import create_trigger, trigger_from_dict
from robustkd.attacks.poison import poison_dataset
from robustkd.data.datasets import ImageDataset, defender_subset, load_dataset
from robustkd.errors import RobustKDError
from robustkd.models import create_model, model_names
from robustkd.models.checkpoints import load_checkpoint, read_metadata, save_checkpoint

__all__ = [
    "ImageDataset",
    "RobustKDError",
    "create_model",
    "create_trigger",
    "defender_subset",
    "der",
    "evaluate",
    "load_checkpoint",
    "load_dataset",
    "model_names",
    "poison_dataset",
    "read_metadata",
    "save_checkpoint",
    "trigger_from_dict",
]
