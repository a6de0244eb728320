"""RobustKD Studio: backdoor analysis for knowledge distillation.

What a notebook needs, in the order of a study — load a teacher, build a scenario, run a
method, evaluate::

    from robustkd import DistillConfig, build_scenario, evaluate, load_model, run_method

    teacher, meta = load_model("assets/default_teacher.safetensors")  # any checkpoint
    scenario = build_scenario("untrusted", meta, rate=0.1, distill_size=2000)
    print(evaluate(teacher, scenario.test, scenario.trigger, scenario.target, scenario.mode))
    result = run_method("robustkd", teacher, meta, scenario, DistillConfig(epochs=1))
    print(result.metrics["acc"], result.metrics["asr"])

``method_names()`` lists the defences and baselines, ``trigger_names()`` the attacks;
``docs/architecture.md`` shows where everything else lives.
"""

from __future__ import annotations

__version__ = "0.1.0"

from robustkd.analysis.metrics import der, evaluate
from robustkd.attacks import create_trigger, trigger_from_dict, trigger_names
from robustkd.attacks.poison import poison_dataset
from robustkd.data.datasets import ImageDataset, defender_subset, load_dataset
from robustkd.data.userdata import load_user_data
from robustkd.defenses import method_names, run_method
from robustkd.errors import RobustKDError
from robustkd.models import create_model, model_names
from robustkd.models.checkpoints import load_checkpoint, read_metadata, save_checkpoint
from robustkd.models.importer import ModelOptions, load_model
from robustkd.training.distill import DistillConfig, MethodResult
from robustkd.training.scenarios import DataSources, Scenario, build_scenario

__all__ = [
    "DataSources",
    "DistillConfig",
    "ImageDataset",
    "MethodResult",
    "ModelOptions",
    "RobustKDError",
    "Scenario",
    "build_scenario",
    "create_model",
    "create_trigger",
    "defender_subset",
    "der",
    "evaluate",
    "load_checkpoint",
    "load_dataset",
    "load_model",
    "load_user_data",
    "method_names",
    "model_names",
    "poison_dataset",
    "read_metadata",
    "run_method",
    "save_checkpoint",
    "trigger_from_dict",
    "trigger_names",
]
