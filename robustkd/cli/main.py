"""The ``robustkd`` command line's entry point: ``main`` parses the arguments, hands the verb to
its module (imported only when that verb runs) and turns every failure into one sentence.

A user's mistake ends with one sentence on stderr and exit code 2, never a traceback; a reader
that closes the output early (``robustkd list methods | head -1``) ends it quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from robustkd.cli.launch import ARGV_ENV, NPROC_ENV, RANK_STATUS_ENV, _launch_torchrun
from robustkd.cli.parser import build_parser
from robustkd.errors import RobustKDError
from robustkd.training import distributed

# how a shell reports a command that SIGPIPE ended: 128 + 13
BROKEN_PIPE_CODE = 141


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv and distributed.launched() and os.environ.get(ARGV_ENV):
        argv = json.loads(os.environ[ARGV_ENV])  # a rank started by --nproc's launcher
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:  # --help, --version or a mistake: argparse has written its text
        _flush_stdout()
        raise
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
        code = _verb(args.verb)(args)
        sys.stdout.flush()  # a reader that has gone shows here, not at interpreter exit
        return code
    except RobustKDError as exc:
        if distributed.is_main():  # under torchrun every rank meets the same mistake
            print(f"robustkd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robustkd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout's reader closed it (| head): stop quietly, like other tools
        _drop_stdout()
        return BROKEN_PIPE_CODE
    except OSError as exc:  # the machine, not the user's input: full disk, unwritable folder
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        print(
            f"robustkd: error: cannot read or write{where} ({exc.strerror or exc}); free some "
            "disk space or choose a writable folder.",
            file=sys.stderr,
        )
        return 1


def _verb(name: str) -> Callable[[argparse.Namespace], int]:
    """The function that runs verb ``name``; only its module is imported."""
    if name in ("train-teacher", "evaluate", "info", "import"):
        from robustkd.cli import teacher

        return {
            "train-teacher": teacher._train_teacher,
            "evaluate": teacher._evaluate,
            "info": teacher._info,
            "import": teacher._import,
        }[name]
    if name == "list":
        from robustkd.cli.listing import _list

        return _list
    if name == "runs":
        from robustkd.cli.runs import _runs

        return _runs
    from robustkd.cli.distill import _distill, _resume

    if name == "resume":
        return lambda args: _resume(args, main)  # the saved command runs through main again
    return {"distill": _distill, "compare": _distill}[name]


def _flush_stdout() -> None:
    """Flush stdout; when its reader has gone, quietly (see ``_drop_stdout``)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _drop_stdout()


def _drop_stdout() -> None:
    """Point stdout at devnull, so the flush at exit does not fail again on the closed pipe."""
    with contextlib.suppress(OSError, ValueError):  # a stdout without a file (a test's capture)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
