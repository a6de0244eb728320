"""Exception types for mistakes a user can make (bad names, files, values).

The CLI and the app show ``str(error)`` alone, never a traceback, so every message is one
sentence that says what is wrong and what to do.
"""

from __future__ import annotations


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
