"""Uploaded files, kept per content under the runs folder, and the rule that removes old ones.

The app keeps every upload in a folder named after its content's hash,
``<runs root>/uploads/<digest>/`` (data sets in ``uploads/data/<digest>/``), so two uploads never
overwrite each other. Left alone they would fill the disk; the rule, applied each time a new
upload is saved:

- an upload folder is removed when nothing has been uploaded into it (the same content again
  counts) for ``$ROBUSTKD_UPLOAD_DAYS`` days (default 7; fractions allowed, 0 removes every
  unused upload at once),
- but never one that a run's ``config.json`` mentions (queued, running or finished: resuming
  and re-running need the files), nor one in use by the session saving the upload.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from robustkd.errors import ConfigError

UPLOADS = "uploads"  # sub-folder of the runs root
UPLOAD_DAYS_ENV = "ROBUSTKD_UPLOAD_DAYS"
DEFAULT_UPLOAD_DAYS = 7.0
_DIGEST = re.compile(r"^[0-9a-f]{16,64}$")  # an upload folder's name: its content's hash
_CONFIG = "config.json"


def upload_days() -> float:
    """How long an unused upload is kept, in days: ``$ROBUSTKD_UPLOAD_DAYS``, else 7."""
    raw = os.environ.get(UPLOAD_DAYS_ENV, "").strip()
    if not raw:
        return DEFAULT_UPLOAD_DAYS
    try:
        days = float(raw)
    except ValueError:
        days = -1.0
    if not 0 <= days < float("inf"):
        raise ConfigError(
            f"${UPLOAD_DAYS_ENV} must be a number of days, 0 or more (got {raw!r}); fix it or "
            f"unset it for the default of {DEFAULT_UPLOAD_DAYS:g}."
        )
    return days


def upload_folders(root: str | Path) -> list[Path]:
    """The per-content upload folders under ``root/uploads`` (one level of kinds, e.g. data/)."""
    base = Path(root) / UPLOADS
    found: list[Path] = []
    with contextlib.suppress(OSError):
        for entry in base.iterdir():
            if entry.is_symlink() or not entry.is_dir():
                continue
            if _DIGEST.match(entry.name):
                found.append(entry)
                continue
            with contextlib.suppress(OSError):
                found += [
                    e
                    for e in entry.iterdir()
                    if _DIGEST.match(e.name) and e.is_dir() and not e.is_symlink()
                ]
    return sorted(found)


def _run_configs_text(root: str | Path) -> str:
    """The text of every run config under ``root``, damaged ones included, to search for an
    upload's digest (a raw search: a config too corrupt to parse still protects its files)."""
    texts = []
    with contextlib.suppress(OSError):
        for entry in Path(root).iterdir():
            if entry.name == UPLOADS:
                continue
            with contextlib.suppress(OSError):
                texts.append((entry / _CONFIG).read_text(encoding="utf-8", errors="replace"))
    return "\n".join(texts)


def clean_uploads(
    root: str | Path,
    keep: Iterable[str | Path | None] = (),
    max_age_days: float | None = None,
    now: float | None = None,
) -> list[Path]:
    """Remove the upload folders the rule above allows; return the ones removed.

    ``keep``: files or folders in use (the current session's teacher and data); the upload
    folders holding them stay. Folders that cannot be removed are left for the next time.
    """
    days = upload_days() if max_age_days is None else max_age_days
    limit = (time.time() if now is None else now) - days * 86_400
    kept: list[Path] = []
    for item in keep:
        if item:
            with contextlib.suppress(OSError, ValueError):
                kept.append(Path(item).resolve())
    configs: str | None = None  # read only when some folder is old enough to matter
    removed: list[Path] = []
    for folder in upload_folders(root):
        try:
            if folder.stat().st_mtime > limit:
                continue
            real = folder.resolve()
        except OSError:
            continue
        if any(k == real or k.is_relative_to(real) for k in kept):
            continue
        if configs is None:
            configs = _run_configs_text(root)
        if folder.name in configs:
            continue
        try:
            if folder.stat().st_mtime > limit:  # uploaded again just now by another session
                continue
            shutil.rmtree(folder)
        except OSError:
            continue
        removed.append(folder)
    return removed


def touch(folder: str | Path) -> None:
    """Mark an upload folder as just used (its age counts from its last upload)."""
    with contextlib.suppress(OSError):
        os.utime(folder)
