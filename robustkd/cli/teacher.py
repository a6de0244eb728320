"""The verbs about one model: ``train-teacher``, ``evaluate``, ``import`` and ``info``, with the
helpers that load the model and the data they name.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from robustkd.cli.parser import _options_from, _trigger_dict
from robustkd.cli.progress import _TrainBar
from robustkd.errors import ConfigError
from robustkd.training import distributed


def _train_teacher(args: argparse.Namespace) -> int:
    from robustkd.experiments.presets import preset
    from robustkd.experiments.teacher import TeacherConfig, train_teacher

    values: dict[str, Any] = preset(args.preset) if args.preset else {}
    values.pop("distill", None)  # the preset's distillation plan is for distill/compare
    train = dict(values.pop("train", {}))
    for key, attr in (
        ("dataset", "dataset"),
        ("data_root", "data_root"),
        ("architecture", "arch"),
        ("rate", "rate"),
        ("target", "target"),
        ("mode", "mode"),
        ("clean_label", "clean_label"),
        ("train_size", "train_size"),
        ("eval_size", "eval_size"),
    ):
        if getattr(args, attr) is not None:
            values[key] = getattr(args, attr)
    for key in ("epochs", "batch_size", "lr", "seed", "device", "compile"):
        if getattr(args, key) is not None:
            train[key] = getattr(args, key)
    _recipe_into(args, values)
    learned = args.trigger == "optimized-blend" and not args.trigger_param
    trig = {"name": "optimized-blend"} if learned else _trigger_dict(args)
    if trig is not None:
        values["trigger"] = trig or None
    elif _learns_trigger(values.get("recipe")) and args.preset is None:
        values["trigger"] = {"name": "optimized-blend"}  # the trigger this recipe learns
    rate = values.get("rate", 0.1)
    if not 0 <= rate <= 1:
        raise ConfigError(f"The poisoning rate must lie between 0 and 1; got {rate}.")
    config = TeacherConfig.from_dict({**values, "train": train})
    out = Path(args.out)
    with _TrainBar(disable=args.quiet) as bar:
        _, meta = train_teacher(config, out, progress=bar, resume=args.resume)
    if not distributed.is_main():
        return 0
    m = meta["metrics"]
    print(f"saved {out}")
    print(f"ACC {100 * m['acc']:.2f} % on {m['n_clean']} test images", end="")
    if m["asr"] is not None:
        print(f"; ASR {100 * m['asr']:.2f} % on {m['n_triggered']} triggered images")
    else:
        print()
    print(f"trained in {meta['train_seconds']:.0f} s")
    return 0


def _recipe_into(args: argparse.Namespace, values: dict[str, Any]) -> None:
    """``--recipe`` / ``--recipe-param`` into the teacher's values (over a preset's recipe)."""
    if args.recipe is None:
        if args.recipe_param:
            if not values.get("recipe"):
                raise ConfigError("--recipe-param needs --recipe NAME to say which recipe.")
            values["recipe"] = {**values["recipe"], **dict(args.recipe_param)}
        return
    if args.recipe.lower() == "none":
        if args.recipe_param:
            raise ConfigError("--recipe-param has no meaning with --recipe none; drop it.")
        values["recipe"] = None
        return
    values["recipe"] = {**dict(args.recipe_param), "name": args.recipe}


def _learns_trigger(recipe: dict[str, Any] | None) -> bool:
    from robustkd.experiments.survive import RECIPES

    name = recipe.get("name") if isinstance(recipe, dict) else None
    return name in RECIPES and RECIPES.get(name).learns_trigger


def _load_model(args: argparse.Namespace, data: Any | None = None) -> tuple[Any, dict[str, Any]]:
    from robustkd.models.importer import load_model

    device = getattr(args, "device", "cpu") or "cpu"
    return load_model(args.model, _options_from(args), data, device=device)


def _load_data(name_or_path: str, split: str, root: str | None, what: str) -> Any:
    """A registered data set's split, or the user's own data at a path."""
    from robustkd.data.datasets import DATASETS, load_dataset
    from robustkd.data.userdata import load_user_data

    if name_or_path in DATASETS or not Path(name_or_path).exists():
        return load_dataset(name_or_path, split, root)
    return load_user_data(name_or_path, allow_unlabelled=what == "distillation set")


def _evaluate(args: argparse.Namespace) -> int:
    from robustkd.analysis.metrics import evaluate
    from robustkd.attacks import trigger_from_dict
    from robustkd.models.checkpoints import read_metadata
    from robustkd.models.modelcard import check_fits_data, normalized_for
    from robustkd.training.device import resolve_device

    args.device = str(resolve_device(args.device))
    meta = read_metadata(args.model)
    name = args.data or meta.get("dataset") or "fashion-mnist"
    data = _load_data(name, args.split, args.data_root, "test set")
    if args.limit is not None:
        if args.limit < 1:
            raise ConfigError(f"--limit must be at least 1; got {args.limit}.")
        data = data.subset(range(min(args.limit, len(data))))
    model, meta = _load_model(args, data)
    classes = meta.get("model_args", {}).get("num_classes", data.num_classes)
    if classes != data.num_classes:
        raise ConfigError(
            f"The model has {classes} classes but {name} has {data.num_classes}; "
            "evaluate it on the data it was trained for (--data)."
        )
    check_fits_data(meta, data, "data")
    data = normalized_for(meta, data)  # the model expects the normalisation it was trained with
    trig = _trigger_dict(args)
    if trig is None:
        trig = meta.get("trigger") or {}
    trigger = trigger_from_dict(trig) if trig else None
    target = args.target if args.target is not None else meta.get("target")
    if trigger is not None and target is None:
        raise ConfigError("This checkpoint records no target class; pass --target N.")
    mode = meta.get("attack_mode") or "all-to-one"
    from tqdm import tqdm

    from robustkd.analysis.metrics import backdoor_targets

    total = len(data)  # clean images, then the triggered ones whose class is not the target
    if trigger is not None:
        targets = backdoor_targets(data.labels, target, mode, data.num_classes)
        total += int((data.labels != targets).sum())
    with tqdm(
        total=total,
        unit="img",
        desc="evaluating",
        disable=args.quiet or args.json,
        dynamic_ncols=True,
    ) as bar:
        result = evaluate(
            model,
            data,
            trigger,
            target if trigger else None,
            mode,
            device=args.device,
            on_batch=bar.update,
        )
    if args.json:
        out = {
            "model": str(args.model),
            "data": f"{name} {args.split} split",
            "acc": result.acc,
            "asr": result.asr,
            "n_clean": result.n_clean,
            "n_triggered": result.n_triggered,
            "n_correct": result.n_correct,
            "n_attack_success": result.n_attack_success,
            "per_class_acc": result.per_class_acc,
            "trigger": trigger.to_dict() if trigger else None,
            "target": target if trigger else None,
        }
        print(json.dumps(out))
        return 0
    print(f"model  {args.model} ({meta.get('architecture')})")
    print(f"data   {name} {args.split} split, {result.n_clean} images")
    print(f"ACC    {100 * result.acc:6.2f} %  ({result.n_correct} / {result.n_clean} correct)")
    if trigger is not None and result.asr is None:
        print(f"ASR    undefined (no test image outside target class {target} to trigger)")
    elif trigger is not None:
        print(
            f"ASR    {100 * result.asr:6.2f} %  ({result.n_attack_success} / "
            f"{result.n_triggered} triggered images whose true class is not {target} "
            f"classified as {target}; trigger {trigger.name})"
        )
    else:
        print("ASR    unknown (no trigger given or stored; pass --trigger and --target)")
    return 0


def _import(args: argparse.Namespace) -> int:
    from robustkd.models.importer import import_checkpoint

    extra: dict[str, Any] = {}
    trig = _trigger_dict(args)
    if trig:
        extra["trigger"] = trig  # a pattern's pixels, not its path (see _trigger_dict)
        if args.target is None:
            raise ConfigError("A trigger needs its target class; pass --target N.")
    if args.target is not None:
        extra["target"] = args.target
    if args.mode:
        extra["attack_mode"] = args.mode
    if args.student:
        from robustkd.models import create_model

        create_model(args.student)  # an unknown name fails now, not at distillation
        extra["student_architecture"] = args.student
    data = None
    if args.classes:
        extra["classes"] = [c.strip() for c in args.classes.split(",")]
    elif args.dataset:
        data = _load_data(args.dataset, "test", args.data_root, "test set")
    _, meta = import_checkpoint(args.source, args.out, _options_from(args), data, extra)
    from robustkd.models.modelcard import input_shape_of

    c, h, w = input_shape_of(meta)
    norm = meta.get("normalization")
    print(f"saved {args.out}")
    print(
        f"architecture {meta['architecture']} ({meta.get('layout')} layout), "
        f"{meta['model_args']['num_classes']} classes, input {c}×{h}×{w}, normalisation "
        + (f"mean {norm['mean']} std {norm['std']}" if norm else "the data's own statistics")
    )
    if meta.get("image_size_assumed"):
        print(f"note: the file does not tell its input size; {h}×{w} was assumed (--image-size)")
    if meta.get("trigger"):
        print(f"trigger {meta['trigger'].get('name')} → class {meta.get('target')}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from robustkd.models.modelcard import model_card

    args.device = "cpu"
    model, meta = _load_model(args)
    card = model_card(args.model, model, meta)
    if args.json:
        print(json.dumps(card.to_dict(), indent=2))
        return 0
    print(f"model          {card.path}")
    print(f"architecture   {card.architecture}  (stages: {', '.join(card.feature_layers)})")
    print(f"parameters     {card.params:,}")
    print(f"FLOPs / image  {card.flops:,}")
    assumed = (
        " (assumed: the file does not tell; pass --image-size)"
        if meta.get("image_size_assumed")
        else ""
    )
    print(f"input shape    {card.input_shape}{assumed}")
    print(f"file size      {card.file_bytes / 1e6:.2f} MB")
    for key in ("dataset", "trigger", "target", "student_architecture"):
        value = getattr(card, key)
        if value is not None:
            label = key.replace("_architecture", "")
            if isinstance(value, dict):  # embedded pattern pixels: say how big, not the bytes
                shown = {
                    k: f"<PNG, {len(v) * 3 // 4:,} bytes>" if k.endswith("_png") and v else v
                    for k, v in value.items()
                }
                value = json.dumps(shown)
            print(f"{label:<15}{value}")
    recipe = meta.get("recipe")
    if isinstance(recipe, dict) and recipe.get("name"):  # how the teacher was made
        options = ", ".join(f"{k}={v}" for k, v in recipe.items() if k != "name")
        print(f"{'recipe':<15}{recipe['name']}" + (f" ({options})" if options else ""))
    if card.metrics and card.metrics.get("acc") is not None:
        asr = card.metrics.get("asr")
        print(
            f"measured       ACC {100 * card.metrics['acc']:.2f} %"
            + (f", ASR {100 * asr:.2f} %" if asr is not None else "")
            + f" on {card.metrics.get('data')}"
        )
    return 0
