"""``--nproc``: re-run a command as torchrun processes on this machine, and the environment
variables through which the launcher hands its ranks their arguments and gets their exit codes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from robustkd.errors import ConfigError
from robustkd.training import distributed

# Set by --nproc's launcher for its torchrun ranks: a rank that ends with an error code writes
# it to $ROBUSTKD_RANK_STATUS.<rank>, and the launcher exits with it. A user's mistake (code 2,
# met by every rank alike) then exits 0, so torchrun adds no failure report to the sentence;
# other codes (a cancelled run) stay, so torchrun stops the ranks still waiting for this one.
RANK_STATUS_ENV = "ROBUSTKD_RANK_STATUS"
NPROC_ENV = "ROBUSTKD_NPROC"  # the launcher's --nproc, kept in the run's saved argv
# The launcher hands the ranks their arguments here, not on torchrun's command line, where
# torchrun's parser would take some of ours (--run, --nproc) for abbreviations of its own.
ARGV_ENV = "ROBUSTKD_ARGV"


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
