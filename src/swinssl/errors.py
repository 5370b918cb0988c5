"""Errors that swinssl reports to users as one clear line.

The CLI prints ``error: <message>`` for these and exits with the code below; any
other exception is a bug and keeps its traceback.
"""


class SwinsslError(Exception):
    """Base class: a problem with the user's input, reported without a traceback."""

    exit_code = 1


class DataError(SwinsslError, ValueError):
    """A volume, label or dataset file is unreadable, malformed or inconsistent.

    The message starts with the offending path.
    """

    exit_code = 3


class ConfigError(SwinsslError, ValueError):
    """A configuration file or a ``key=value`` override is invalid.

    The message names the key and, where it helps, the allowed values.
    """

    exit_code = 2


class CheckpointError(SwinsslError, ValueError):
    """A checkpoint is unreadable, unsafe, or does not fit the model.

    The message starts with the checkpoint path (or ``<state dict>``).
    """

    exit_code = 3


class DependencyError(SwinsslError, RuntimeError):
    """An optional dependency is missing or of a version swinssl was not tested with (e.g.
    nnU-Net for ``swinssl nnunet``); the message names it and the tested range."""

    exit_code = 2


class OutputError(SwinsslError, OSError):
    """An output folder cannot be created or written (a file in the way, no permission,
    read-only or full disk). Checked before the work starts; the message names the folder."""

    exit_code = 5


class TrainingError(SwinsslError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""

    exit_code = 4
