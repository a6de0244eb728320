"""Small helpers several test modules share."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from robustkd.cli.main import main


def wait_for(predicate: Callable[[], object], timeout: float) -> bool:
    """Poll ``predicate`` every 50 ms until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``robustkd ARGS`` in this process: its exit status, standard output and error."""
    try:
        code = main(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err
