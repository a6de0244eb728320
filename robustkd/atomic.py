"""The one atomic file writer: readers see the old file or the new one, never half of either.

Data goes to a temporary file in the destination's folder, is flushed and fsynced to disk, then
renamed over the destination; on any error the temporary file is removed and the destination
is left as it was. Run folders, checkpoints, training states, reports and uploads all use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Replace ``path`` with what ``write`` writes to the binary file object it is given."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        _replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` with ``data``."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8, ``\\n`` line ends)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _replace(src: str, dst: Path) -> None:
    if os.name != "nt":
        os.replace(src, dst)
        return
    for attempt in range(20):  # pragma: no cover - Windows refuses while a reader has dst open
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if attempt == 19:
                raise
            time.sleep(0.025)
