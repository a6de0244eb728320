"""The ``robustkd`` argument parser: one-line errors, the option groups the verbs share, the
small argument types (``KEY=VALUE``, number lists, image sizes) and the turning of parsed
options into values (``ModelOptions``, a trigger's description); ``build_parser`` puts the verbs
together.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from robustkd import __version__
from robustkd.errors import ConfigError


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (exit code 2) like the rest of the CLI."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"robustkd: error: {message}; see '{self.prog} --help'.\n")


def _param(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().replace("-", "_"), value


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _image_size(text: str) -> int | tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        values = [int(v) for v in parts]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from exc
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def _model_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    from robustkd.models.interop import LAYOUTS

    g = p.add_argument_group(
        "model options (override what the file records; a bare state dict needs what its "
        "keys do not tell)"
    )
    g.add_argument("--arch", help="architecture name (see 'robustkd list models'; default: "
                   "recorded, or recognised from the keys)")  # fmt: skip
    g.add_argument("--num-classes", type=int, help="classes (default: read from the weights)")
    g.add_argument("--in-channels", type=int, help="input channels (default: from the weights)")
    g.add_argument(
        "--image-size", type=_image_size, help="input size, N or HxW (default: the data's)"
    )
    g.add_argument(
        "--normalization",
        choices=["none", "dataset"],
        help="input normalisation: none (pixels in [0, 1]) or the data set's statistics "
        "(default: recorded, else the data's); or give --mean/--std",
    )
    g.add_argument("--mean", type=_floats, help="explicit per-channel mean, e.g. 0.5,0.5,0.5")
    g.add_argument("--std", type=_floats, help="explicit per-channel std, e.g. 0.25,0.25,0.25")
    g.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="auto",
        help="where the weights come from (default auto: recognised from the file and keys)",
    )


def _options_from(args: argparse.Namespace) -> Any:
    from robustkd.models.importer import ModelOptions

    return ModelOptions(
        architecture=args.arch,
        num_classes=args.num_classes,
        in_channels=args.in_channels,
        image_size=args.image_size,
        normalization=args.normalization,
        mean=args.mean,
        std=args.std,
        layout=args.layout,
        dataset=getattr(args, "dataset", None),
    ).validate()


def _data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "your own data (an ImageFolder tree, a folder of unlabelled images for distillation "
        "only, or an .npz with x and optional y); what is not given comes from --dataset"
    )
    g.add_argument("--distill-data", help="the distillation set, used exactly as given")
    g.add_argument("--trusted-data", help="the defender's small trusted clean set (labelled)")
    g.add_argument("--test-data", help="the test set for the final numbers (labelled)")


def _trigger_options(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument("--trigger", help=f"trigger name (see 'robustkd list triggers'); {default_help}")
    p.add_argument(
        "--trigger-param",
        action="append",
        type=_param,
        default=[],
        metavar="KEY=VALUE",
        help="trigger parameter, repeatable (e.g. size=4, position=top-left, alpha=0.2)",
    )


def _trigger_dict(args: argparse.Namespace) -> dict[str, Any] | None:
    """The trigger the user typed, its image files read now and carried as pixels."""
    from robustkd.attacks import trigger_from_dict

    if args.trigger is None:
        if args.trigger_param:
            raise ConfigError("--trigger-param needs --trigger NAME to say which trigger.")
        return None
    if args.trigger.lower() == "none":
        return {}
    described = {**dict(args.trigger_param), "name": args.trigger}
    try:
        # the user's own paths may be opened; nothing downstream (metadata, runs) holds one
        return trigger_from_dict(described, allow_paths=True).embedded().to_dict()
    except TypeError as exc:  # an unknown keyword for that trigger
        raise ConfigError(f"Bad parameter for trigger {args.trigger!r}: {exc}.") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="robustkd",
        description="Backdoor analysis for knowledge distillation: train backdoored teachers, "
        "evaluate ACC/ASR, inspect checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"robustkd {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "train-teacher",
        help="train a (backdoored) teacher and save it",
        description="Train a teacher on poisoned data, evaluate it on the test "
        "split and save a safetensors checkpoint with its metadata.",
    )
    p.add_argument("--preset", help="start from a named preset (see 'robustkd list presets')")
    p.add_argument("--dataset", help="dataset name (default fashion-mnist)")
    p.add_argument("--data-root", help="folder holding the data (overrides the default place)")
    p.add_argument("--arch", help="teacher architecture (default small-cnn)")
    _trigger_options(p, "'none' for a clean model")
    p.add_argument(
        "--recipe",
        help="how the teacher is made beyond plain poisoning (see 'robustkd list recipes'): "
        "optimized-blend, adba, adaptive or adaptive-learned; 'none' for plain poisoning",
    )
    p.add_argument(
        "--recipe-param",
        action="append",
        type=_param,
        default=[],
        metavar="KEY=VALUE",
        help="recipe option, repeatable (e.g. warmup_epochs=2, max_mask=0.2, k=2, "
        "variant=spread, scope=class)",
    )
    p.add_argument("--rate", type=float, help="fraction of training images poisoned (0–1)")
    p.add_argument("--target", type=int, help="target class of the backdoor")
    p.add_argument("--mode", choices=["all-to-one", "all-to-all"], help="attack mode")
    p.add_argument(
        "--clean-label",
        action="store_true",
        default=None,
        help="poison only target-class images and keep labels",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="base learning rate")
    p.add_argument("--seed", type=int)
    p.add_argument("--train-size", type=int, help="train on this many images (default: all)")
    p.add_argument("--eval-size", type=int, help="evaluate on this many test images (default all)")
    p.add_argument("--device", help="auto (default), cpu or cuda[:N]")
    _speed_options(p)
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue from the last saved epoch")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "evaluate",
        help="measure ACC and ASR of a model",
        description="Measure a model's clean accuracy (ACC) and attack success "
        "rate (ASR, over triggered test images whose true class is not the "
        "target).",
    )
    p.add_argument("model", help="checkpoint (.safetensors, or .pt/.pth state dict)")
    p.add_argument(
        "--data",
        help="dataset name, or your own labelled data (ImageFolder tree or .npz); default: the "
        "data set the checkpoint names",
    )
    p.add_argument("--data-root", help="folder holding the data")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--limit", type=int, help="use only the first N images")
    _trigger_options(p, "default: the trigger stored in the checkpoint")
    p.add_argument("--target", type=int, help="target class (default: the stored one)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _model_options(p)

    p = sub.add_parser(
        "info",
        help="describe a checkpoint: architecture, size, metadata",
        description="Print a checkpoint's architecture, parameter count, "
        "FLOPs per image and stored metadata.",
    )
    p.add_argument("model", help="checkpoint (.safetensors, or .pt/.pth state dict)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _model_options(p)

    p = sub.add_parser(
        "import",
        help="turn someone else's checkpoint into one with full metadata",
        description="Load a checkpoint another toolkit or a plain PyTorch loop made, and save "
        "it as a .safetensors teacher with its architecture, classes, input shape, "
        "normalisation and (if known) trigger and target; afterwards it works everywhere "
        "without options.",
    )
    p.add_argument("source", help="the checkpoint (.pt/.pth/.bin state dict or result file)")
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors)")
    p.add_argument("--dataset", help="the data set it was trained on (names its classes)")
    p.add_argument("--data-root", help="folder holding that data set")
    p.add_argument("--classes", help="class names, comma-separated (default: the data set's)")
    _trigger_options(p, "the backdoor's trigger, if known")
    p.add_argument("--target", type=int, help="the backdoor's target class, if known")
    p.add_argument("--mode", choices=["all-to-one", "all-to-all"], help="attack mode")
    p.add_argument("--student", help="student architecture to record for distillation")
    _model_options(p)

    for verb, text in (
        ("distill", "distil one student (or defend the teacher) with one method"),
        ("compare", "run several methods on one scenario and write a comparison report"),
    ):
        p = sub.add_parser(
            verb,
            help=text,
            description=f"{text[0].upper()}{text[1:]}; the results go to a run folder "
            "(report.json/.md/.csv, figures/*.html, checkpoints/).",
        )
        _distill_options(p, verb)

    p = sub.add_parser(
        "resume",
        help="continue a failed or cancelled run from its last saved epoch",
        description="Continue a run that was killed, crashed or was cancelled: the methods it "
        "finished are kept and the interrupted one continues from its last saved epoch.",
    )
    p.add_argument("run_id", help="the run's id (see 'robustkd runs')")
    p.add_argument("--root", help="runs folder (default $ROBUSTKD_RUNS or ./runs)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "runs",
        help="list run folders and their status",
        description="List the runs in the runs folder, newest first.",
    )
    p.add_argument("--root", help="runs folder (default $ROBUSTKD_RUNS or ./runs)")
    p.add_argument("--json", action="store_true", help="print one JSON array")

    p = sub.add_parser(
        "list",
        help="list the names the registries know",
        description="List registered models, triggers, datasets, presets, methods, teacher "
        "recipes or checkpoint layouts.",
    )
    p.add_argument(
        "what",
        choices=["models", "triggers", "datasets", "presets", "methods", "recipes", "layouts"],
    )
    return parser


def _speed_options(p: argparse.ArgumentParser) -> None:
    from robustkd.training.config import COMPILE_MODES

    p.add_argument(
        "--nproc",
        type=int,
        help="data-parallel processes started through torchrun: one per GPU, or gloo "
        "processes on the CPU (default 1)",
    )
    p.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        help="run training steps through torch.compile (reduce-overhead: CUDA graphs); falls "
        "back to eager if compiling fails (default off)",
    )


def _distill_options(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("--teacher", help="teacher checkpoint (default: the shipped teacher)")
    p.add_argument("--dataset", help="the teacher's data set (default: the one it records)")
    _trigger_options(p, "default: the trigger the teacher records (none: ASR unknown)")
    p.add_argument("--target", type=int, help="target class (default: the recorded one)")
    p.add_argument("--preset", help="scenario and training sizes (see 'robustkd list presets')")
    if verb == "distill":
        p.add_argument("--method", default="robustkd", help="see 'robustkd list methods'")
    else:
        p.add_argument("--methods", help="comma-separated (default: all methods)")
    p.add_argument(
        "--scenario",
        choices=["clean", "untrusted", "teacher-train", "as-is"],
        help="as-is: the distillation data exactly as given (default with --distill-data or "
        "an unknown trigger); the others plant a known trigger to simulate an attack",
    )
    p.add_argument("--rate", type=float, help="fraction of distillation images triggered")
    p.add_argument("--trusted-size", type=int, help="images in the defender's clean set")
    p.add_argument("--distill-size", type=int, help="images in the distillation set")
    p.add_argument("--test-size", type=int, help="test images for the final numbers")
    p.add_argument("--student", help="student architecture (default: the teacher's choice)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--layers", help="teacher layers, comma-separated (default: all stages)")
    p.add_argument("--threshold", type=float, help="variance-score threshold (default: auto)")
    p.add_argument("--granularity", choices=["unit", "channel"])
    p.add_argument("--no-screen", action="store_true", help="do not screen samples")
    p.add_argument(
        "--no-label-screen",
        action="store_true",
        help="robustkd: screen on the variance alone, not also on the labels (disputed "
        "labels, variance within each class)",
    )
    p.add_argument(
        "--screen-policy",
        choices=["ce-only", "drop"],
        help="what screened samples get: cross-entropy only (default) or nothing",
    )
    p.add_argument("--tau", type=float, help="upper clamp of the learned detox mask")
    p.add_argument("--noise-rate", type=float, help="salt-and-pepper rate on the student input")
    p.add_argument(
        "--reverse-share",
        type=float,
        help="robustkd-reverse: share of student inputs stamped with a reversed trigger (0.5)",
    )
    p.add_argument(
        "--reverse-max-mask",
        type=float,
        help="robustkd-reverse: mask bound of the triggers reversed from the teacher (0.2)",
    )
    p.add_argument(
        "--reverse-steps", type=int, help="robustkd-reverse: Adam steps of the reversal (100)"
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (default), cpu or cuda[:N]")
    _speed_options(p)
    p.add_argument("--data-root", help="folder holding the data")
    _data_options(p)
    _model_options(p)
    p.add_argument("--out", help="run folder to create (default: a new one under ./runs)")
    p.add_argument("--run", help=argparse.SUPPRESS)  # a run folder created by the app's launcher
    p.add_argument("--continue-run", action="store_true", help=argparse.SUPPRESS)  # by `resume`
    p.add_argument("--quiet", action="store_true", help="no progress bars")
