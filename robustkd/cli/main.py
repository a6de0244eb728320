"""The ``robustkd`` command line: train a teacher, evaluate a model, inspect a checkpoint.

A user's mistake ends with one sentence on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustkd import __version__
from robustkd.errors import ConfigError, RobustKDError
from robustkd.models.checkpoints import DEFAULT_TEACHER
from robustkd.training import distributed


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
        description="List registered models, triggers, datasets, presets or methods.",
    )
    p.add_argument(
        "what", choices=["models", "triggers", "datasets", "presets", "methods", "layouts"]
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
        "--screen-policy",
        choices=["ce-only", "drop"],
        help="what screened samples get: cross-entropy only (default) or nothing",
    )
    p.add_argument("--tau", type=float, help="upper clamp of the learned detox mask")
    p.add_argument("--noise-rate", type=float, help="salt-and-pepper rate on the student input")
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


# Set by --nproc's launcher for its torchrun ranks: a rank that ends with an error code writes
# it to $ROBUSTKD_RANK_STATUS.<rank>, and the launcher exits with it. A user's mistake (code 2,
# met by every rank alike) then exits 0, so torchrun adds no failure report to the sentence;
# other codes (a cancelled run) stay, so torchrun stops the ranks still waiting for this one.
RANK_STATUS_ENV = "ROBUSTKD_RANK_STATUS"
NPROC_ENV = "ROBUSTKD_NPROC"  # the launcher's --nproc, kept in the run's saved argv
# The launcher hands the ranks their arguments here, not on torchrun's command line, where
# torchrun's parser would take some of ours (--run, --nproc) for abbreviations of its own.
ARGV_ENV = "ROBUSTKD_ARGV"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv and distributed.launched() and os.environ.get(ARGV_ENV):
        argv = json.loads(os.environ[ARGV_ENV])  # a rank started by --nproc's launcher
    args = build_parser().parse_args(argv)
    args.argv = argv
    if distributed.launched() and os.environ.get(NPROC_ENV):
        args.argv = [*argv, "--nproc", os.environ[NPROC_ENV]]  # as the user typed it
    code = _main(args, argv)
    if not distributed.launched():
        return code
    status = os.environ.get(RANK_STATUS_ENV)
    if status and code:
        Path(f"{status}.{os.environ.get('RANK', '0')}").write_text(str(code))
        if code == 2:  # a mistake every rank met alike: no torchrun report on top of it
            code = 0
    # A rank leaves at once: tearing the process group down at interpreter exit could abort
    # (SIGABRT from a communication thread) after the work was done and the files written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        nproc = getattr(args, "nproc", None)
        if nproc is not None:
            distributed.check_nproc(nproc)
        if (nproc or 1) > 1 and not distributed.launched():
            return _launch_torchrun(args, argv)
        if distributed.launched():
            distributed.setup(getattr(args, "device", None))
            args.quiet = args.quiet or not distributed.is_main()
        return {
            "train-teacher": _train_teacher,
            "evaluate": _evaluate,
            "info": _info,
            "import": _import,
            "list": _list,
            "distill": _distill,
            "compare": _distill,
            "runs": _runs,
            "resume": _resume,
        }[args.verb](args)
    except RobustKDError as exc:
        if distributed.is_main():  # under torchrun every rank meets the same mistake
            print(f"robustkd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robustkd: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the machine, not the user's input: full disk, unwritable folder
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        print(
            f"robustkd: error: cannot read or write{where} ({exc.strerror or exc}); free some "
            "disk space or choose a writable folder.",
            file=sys.stderr,
        )
        return 1


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _launch_torchrun(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-run this very command as ``--nproc`` torchrun processes on this machine."""
    import subprocess

    from robustkd.runs.queue import add_source_path
    from robustkd.training.device import resolve_device

    nproc = args.nproc  # checked by _main
    device = resolve_device(getattr(args, "device", None) or "auto")
    gpus = distributed.gpu_count()
    if device.type == "cuda" and nproc > gpus:
        raise ConfigError(
            f"--nproc {nproc} needs one GPU per process but {gpus} are visible; use "
            f"--nproc {gpus} or --device cpu."
        )
    env = add_source_path(dict(os.environ))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    with tempfile.TemporaryDirectory(prefix="robustkd-ranks-") as folder:
        env[RANK_STATUS_ENV] = str(Path(folder) / "code")
        env[NPROC_ENV] = str(nproc)
        env[ARGV_ENV] = json.dumps(_without_nproc(argv))
        code = subprocess.call(distributed.torchrun_command(nproc, []), env=env)
        codes = [int(f.read_text() or 1) for f in sorted(Path(folder).glob("code.*"))]
    if codes:  # a rank ended with a handled error (or a cancel); it printed why
        return max(codes)
    if code:  # a crash: torchrun's report above names the rank and its traceback
        print(
            f"robustkd: error: the {nproc} training processes failed (exit code {code}); "
            "see the messages above.",
            file=sys.stderr,
        )
    return code


# --------------------------------------------------------------------------- verbs


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
    trig = _trigger_dict(args)
    if trig is not None:
        values["trigger"] = trig or None
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
    if card.metrics and card.metrics.get("acc") is not None:
        asr = card.metrics.get("asr")
        print(
            f"measured       ACC {100 * card.metrics['acc']:.2f} %"
            + (f", ASR {100 * asr:.2f} %" if asr is not None else "")
            + f" on {card.metrics.get('data')}"
        )
    return 0


def _list(args: argparse.Namespace) -> int:
    from robustkd.attacks import trigger_names
    from robustkd.data.datasets import dataset_names
    from robustkd.defenses import METHODS, method_names
    from robustkd.experiments.presets import preset_names
    from robustkd.models import model_names
    from robustkd.models.interop import LAYOUTS

    names = {
        "models": model_names,
        "triggers": trigger_names,
        "datasets": dataset_names,
        "presets": preset_names,
        "methods": lambda: [f"{m:<16} {METHODS.get(m).description}" for m in method_names()],
        "layouts": lambda: list(LAYOUTS),
    }[args.what]()
    print("\n".join(names))
    if args.what == "models":
        from robustkd.models import unavailable_families

        for family, reason in unavailable_families().items():
            note = f"robustkd: note: the {family} models are unavailable ({reason})."
            print(note, file=sys.stderr)
    return 0


def _distill(args: argparse.Namespace) -> int:
    from robustkd.attacks import trigger_from_dict
    from robustkd.defenses import METHODS, method_names
    from robustkd.experiments.compare import compare
    from robustkd.experiments.presets import distill_plan
    from robustkd.models.importer import load_model
    from robustkd.runs.progress import RunProgress
    from robustkd.runs.store import Run, RunCancelled, check_teacher, file_sha256
    from robustkd.training.distill import DistillConfig
    from robustkd.training.scenarios import DataSources, scenario_from_plan

    plan = distill_plan(args.preset)
    values = dict(plan.get("config", {}))
    for key in (
        "student",
        "epochs",
        "batch_size",
        "lr",
        "layers",
        "threshold",
        "granularity",
        "tau",
        "noise_rate",
        "seed",
        "device",
        "screen_policy",
        "compile",
    ):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.no_screen:
        values["screen"] = False
    config = DistillConfig.from_dict(values).validate()
    if args.verb == "distill":
        methods = [args.method]
    else:
        methods = args.methods.split(",") if args.methods else method_names()
    methods = [METHODS.get(m.strip()).name for m in methods]  # unknown names refused here
    sources = DataSources(
        distill=_user_data(args.distill_data, "distillation set"),
        trusted=_user_data(args.trusted_data, "trusted set"),
        test=_user_data(args.test_data, "test set"),
    )
    teacher_path = Path(args.teacher) if args.teacher else DEFAULT_TEACHER
    reference = next(
        (d for d in (sources.test, sources.trusted, sources.distill) if d is not None), None
    )
    teacher, meta = load_model(teacher_path, _options_from(args), reference)
    meta["path"] = str(teacher_path)
    trig = _trigger_dict(args)
    trigger = trigger_from_dict(trig) if trig else None
    if trig == {}:  # --trigger none: measure no ASR even if the teacher records a trigger
        meta.pop("trigger", None)
    known = trigger is not None or bool(meta.get("trigger"))
    if args.scenario is None and (sources.distill is not None or not known):
        plan["scenario"] = "as-is"  # the user's data as given / no trigger to plant
    elif plan["scenario"] is None:
        plan["scenario"] = "untrusted"
    for key in ("scenario", "rate", "trusted_size", "distill_size", "test_size"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    if not args.quiet and distributed.is_main():
        print(
            f"plan: {plan['source']}: scenario {plan['scenario']}, trusted set "
            f"{plan['trusted_size']}, distillation set "
            f"{'as given' if sources.distill is not None else plan['distill_size']}"
            + (f", triggered fraction {plan['rate']}" if plan["scenario"] == "untrusted" else ""),
            file=sys.stderr,
        )
    scenario = scenario_from_plan(
        plan,
        meta,
        seed=config.seed,
        data_root=args.data_root,
        sources=sources,
        trigger=trigger,
        target=args.target,
    )
    command = "robustkd " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("robustkd") else ""
    full_config = {
        "argv": [a for a in args.argv if a != "--quiet"],
        "verb": args.verb,
        "teacher": str(teacher_path),
        "teacher_sha256": file_sha256(teacher_path),  # resume refuses a rebuilt teacher
        "methods": methods,
        "plan": plan,
        "distill": config.to_dict(),
    }
    writer = distributed.is_main()  # under torchrun, rank 0 keeps the run folder
    if args.run:
        run = Run.open(None, args.run)
        try:
            if writer:
                check_teacher(run, teacher_path)
        except RobustKDError as exc:
            if not args.continue_run:  # a queued run whose teacher changed while it waited
                run.fail(str(exc))
            raise
        if args.continue_run and writer:
            run.update_status(message="")
    else:
        out = Path(args.out) if args.out else None
        run = distributed.on_main(  # under torchrun: rank 0 creates it, the others use it
            lambda: Run.create(
                out.parent if out else None,
                args.verb,
                full_config,
                run_id=out.name if out else None,
            )
        )
    if writer:
        run.start(epochs=config.epochs * len(methods))
    bars: list[_TrainBar] = []

    def progress_for(method: str) -> RunProgress | None:
        if not writer:
            return None
        if bars:
            bars[-1].__exit__()
        bar = _TrainBar(disable=args.quiet, desc=method)
        bars.append(bar)
        return RunProgress(run, phase=method, inner=bar)

    try:
        report = compare(
            teacher,
            meta,
            scenario,
            methods,
            config,
            run,
            progress_for,
            command,
            resume=args.continue_run,
        )
    except RunCancelled:
        run.mark_cancelled()
        print(f"cancelled; partial results in {run.path}", file=sys.stderr)
        return 1
    except RobustKDError as exc:
        if writer:
            run.fail(str(exc))
        raise
    except BaseException as exc:
        with contextlib.suppress(OSError):  # on a full disk even the failure may not be written
            if writer:
                run.fail(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if bars:
            bars[-1].__exit__()
    if not writer:
        return 0
    run.finish(report)
    from robustkd.experiments.compare import report_markdown

    print(report_markdown(report))
    print(f"run folder: {run.path}")
    return 0


def _user_data(path: str | None, what: str) -> Any:
    from robustkd.data.userdata import load_user_data

    if path is None:
        return None
    return load_user_data(path, allow_unlabelled=what == "distillation set")


def _resume(args: argparse.Namespace) -> int:
    from robustkd.runs.liveness import refresh_state
    from robustkd.runs.store import ACTIVE_STATES, RUNS_ENV, Run, default_runs_root

    root = Path(args.root) if args.root else default_runs_root()
    run = Run.open(root, args.run_id)
    # held until the resumed work ends: a second resume (a double click) is refused at once
    with run.worker_lock():
        status = refresh_state(run)
        state = status.get("state")
        # queued with our own pid: the app queued this resume and started us for it
        if state in ACTIVE_STATES and status.get("pid") != os.getpid():
            raise ConfigError(f"Run {run.id} is still {state}; wait for it or cancel it first.")
        if state == "done":
            raise ConfigError(f"Run {run.id} is already done; nothing to resume.")
        saved = run.config.get("argv")
        if not saved or saved[0] not in ("distill", "compare"):
            raise ConfigError(
                f"Run {run.id} was not started by distill or compare; it cannot resume."
            )
        argv, skip = [], False
        for a in saved:  # drop where the first attempt wrote: this one continues in place
            if skip:
                skip = False
            elif a in ("--out", "--run"):
                skip = True
            else:
                argv.append(a)
        _check_saved_teacher(run, argv)
        os.environ[RUNS_ENV] = str(root.resolve())
        argv += ["--run", run.id, "--continue-run"] + (["--quiet"] if args.quiet else [])
        return main(argv)


def _check_saved_teacher(run: Any, argv: list[str]) -> None:
    """Refuse to resume with a teacher file other than the one the run started with."""
    from robustkd.runs.store import check_teacher

    teacher = str(DEFAULT_TEACHER)
    for i, a in enumerate(argv):
        if a == "--teacher" and i + 1 < len(argv):
            teacher = argv[i + 1]
        elif a.startswith("--teacher="):
            teacher = a.split("=", 1)[1]
    if not check_teacher(run, teacher):
        print(
            f"robustkd: note: run {run.id} recorded no teacher hash (an older version made "
            "it), so the teacher file cannot be checked.",
            file=sys.stderr,
        )


def _runs(args: argparse.Namespace) -> int:
    from robustkd.runs.liveness import refresh_state
    from robustkd.runs.progress import run_label
    from robustkd.runs.queue import queue_positions
    from robustkd.runs.store import DAMAGED, default_runs_root, list_damaged_runs, list_runs

    root = args.root or default_runs_root()
    rows = []
    positions = queue_positions(root)
    for run in list_runs(root):
        try:
            status = refresh_state(run)
        except RobustKDError as exc:  # damaged since it was listed
            status = {"state": DAMAGED, "message": str(exc)}
        rows.append(
            {
                "id": run.id,
                "state": run_label(status, positions.get(run.id)),
                "kind": status.get("kind"),
                "phase": status.get("phase"),
                "message": status.get("message"),
                "path": str(run.path),
            }
        )
    for damaged in list_damaged_runs(root):  # shown, not hidden: the user decides what to do
        rows.append(
            {
                "id": damaged.id,
                "state": DAMAGED,
                "kind": None,
                "phase": None,
                "message": damaged.reason,
                "path": str(damaged.path),
            }
        )
    if args.json:
        print(json.dumps(rows))
    elif not rows:
        print("no runs yet")
    for r in rows if not args.json else []:
        extra = f" ({r['message']})" if r.get("message") else ""
        print(f"{r['id']:<45} {r['state']:<10} {r.get('phase') or ''}{extra}")
    return 0


_SHOWN = ("loss", "val_acc", "val_asr", "test_acc", "test_asr")


class _TrainBar:
    """A tqdm bar over all training steps, with the last epoch's metrics as postfix."""

    def __init__(self, disable: bool = False, desc: str = "") -> None:
        self.disable = disable
        self.desc = desc
        self.bar: Any = None

    def __enter__(self) -> _TrainBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self, event: Any) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(
                total=event.steps * event.epochs,
                unit="step",
                disable=self.disable,
                initial=(event.epoch - 1) * event.steps + event.step - 1,
                desc=self.desc or "training",
                dynamic_ncols=True,
            )
        if event.kind == "step":
            self.bar.update(1)
            self.bar.set_description(f"{self.desc} epoch {event.epoch}/{event.epochs}".strip())
        else:
            shown = {
                k: f"{v:.3f}"
                for k, v in event.metrics.items()
                if k in ("loss", "val_acc", "val_asr", "test_acc", "test_asr")
                and isinstance(v, float)
            }
            self.bar.set_postfix(shown)
            if self.bar.n < event.epoch * event.steps:  # CUDA reports epochs only
                self.bar.update(event.epoch * event.steps - self.bar.n)


if __name__ == "__main__":
    sys.exit(main())
