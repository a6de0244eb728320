"""The ``distill`` and ``compare`` verbs (one or several methods on one scenario, into a run
folder) and ``resume``, which continues such a run where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from robustkd.cli.parser import _options_from, _trigger_dict
from robustkd.cli.progress import _TrainBar
from robustkd.errors import ConfigError, RobustKDError
from robustkd.models.checkpoints import DEFAULT_TEACHER
from robustkd.training import distributed


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
        "reverse_share",
        "reverse_max_mask",
        "reverse_steps",
        "seed",
        "device",
        "screen_policy",
        "compile",
    ):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.no_screen:
        values["screen"] = False
    if args.no_label_screen:
        values["screen_labels"] = False
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
    # as typed, however it was started (``robustkd …``, ``python -m robustkd …``, a worker)
    command = "robustkd " + shlex.join(a for a in args.argv if a != "--quiet")
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


def _resume(args: argparse.Namespace, rerun: Callable[[list[str]], int]) -> int:
    """Continue a run in place: ``rerun`` (the command line's ``main``) runs its saved argv."""
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
        return rerun(argv)


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
