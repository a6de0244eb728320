"""Exception types for mistakes a user can make (bad names, files, values).

The CLI and the app show ``str(error)`` alone, never a traceback, so every message is one
sentence that says what is wrong and what to do.
"""

from __future__ import annotations

import re


class RobustKDError(Exception):
    """Base class of every error caused by user input; its message is shown as is."""


class UnknownNameError(RobustKDError, KeyError):
    """A name (model, trigger, dataset, preset, layer …) that no registry knows."""

    def __str__(self) -> str:  # KeyError would add quotes around the message
        return str(self.args[0]) if self.args else ""


class DataError(RobustKDError):
    """Missing, unreadable or corrupt data files or folders."""


class CheckpointError(RobustKDError):
    """A file that is not a checkpoint, or one that does not fit the requested model."""


class ConfigError(RobustKDError, ValueError):
    """An out-of-range or inconsistent configuration value."""


# an absolute POSIX path of two or more parts, not part of a URL or a relative path
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[\w.@+-]+/)+([\w.@+-]+)")


def redact_paths(text: str) -> str:
    """``text`` with every absolute path cut to its last part (``/srv/runs/x.pt`` → ``…/x.pt``).

    For what other people see (the app, downloadable reports): a server's folders are none of
    their business, and the file's name still says what is meant.
    """
    return _ABSOLUTE_PATH.sub(lambda m: f"…/{m.group(1)}", str(text))
