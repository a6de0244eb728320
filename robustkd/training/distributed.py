"""Data-parallel training under ``torchrun``: one process per GPU (or CPU worker), one shard each.

``torchrun --nproc-per-node N -m robustkd train-teacher …`` (or the CLI's ``--nproc N``,
which runs exactly that) starts N copies of the command. Each calls :func:`setup`, which joins
the process group from torchrun's environment (NCCL on GPUs, gloo on the CPU). The engine then
wraps the model in DistributedDataParallel, gives every rank its slice of each global batch,
reduces the loss across ranks, evaluates and writes checkpoints on rank 0 only, and hands rank
0's evaluation to the others so every rank keeps the same history (and can resume from the
same state file). Outside torchrun every function here is a cheap no-op: rank 0 of 1.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from robustkd.errors import ConfigError, RobustKDError

T = TypeVar("T")

WORLD_ENV = "WORLD_SIZE"


def launched() -> bool:
    """True inside a process that torchrun started as one of several ranks."""
    try:
        return int(os.environ.get(WORLD_ENV, "1")) > 1
    except ValueError:
        return False


def active() -> bool:
    """True once this process has joined a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that prints, evaluates and writes files."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def setup(device: str | None = "auto") -> bool:
    """Join torchrun's process group when launched by it; return whether this is a DDP run.

    GPUs use NCCL, one GPU per local rank; ``device="cpu"`` (or no GPU) uses gloo.
    """
    if not launched() or active():
        return active()
    if not dist.is_available():
        raise ConfigError("This PyTorch build has no torch.distributed; run without --nproc.")
    use_cuda = torch.cuda.is_available() and (device or "auto") != "cpu"
    if use_cuda:
        if local_rank() >= torch.cuda.device_count():
            raise ConfigError(
                f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes on this "
                f"node but only {torch.cuda.device_count()} GPU(s) are visible; lower "
                "--nproc-per-node."
            )
        torch.cuda.set_device(local_rank())
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo", timeout=dt.timedelta(minutes=30)
    )
    return True


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op outside DDP)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects only)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 alone, its result handed to every rank. A mistake it raises (a
    RobustKDError, or an OSError such as an unwritable folder) is raised on every rank, so
    none is left waiting for the others."""
    if not active():
        return fn()
    result: Any = None
    error: BaseException | None = None
    if is_main():
        try:
            result = fn()
        except (RobustKDError, OSError) as exc:
            error = exc
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def barrier() -> None:
    if active():
        dist.barrier()


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_nproc(nproc: int) -> int:
    """Validate a requested process count (the launcher checks it against the GPUs)."""
    if not 1 <= nproc <= 1024:
        raise ConfigError(f"--nproc must be between 1 and 1024; got {nproc}.")
    return nproc


def torchrun_command(nproc: int, argv: Sequence[str], module: str = "robustkd") -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m robustkd …``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={int(nproc)}",
        "-m",
        module,
        *argv,
    ]
