"""Errors that swinssl reports to users as one clear line.

The CLI prints ``error: <message>`` for these and exits with the code below (``--debug`` adds the
traceback); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

# PyTorch re-raises an error of a DataLoader worker as ``type(err)(text)`` where the text is
# "Caught <Type> in DataLoader worker process <n>.\nOriginal Traceback ..." ending with the original
# "<module>.<Type>: <message>" (torch.utils._utils.ExceptionWrapper).
_WORKER_WRAPPED = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


class SwinsslError(Exception):
    """Base class: a problem with the user's input, reported without a traceback.

    Raised in a data worker, it reaches the main process with its own message (the worker's
    traceback kept in ``worker_traceback`` for ``--debug``), so workers or none, the user reads
    the same line.
    """

    exit_code = 1

    def __init__(self, *args):
        self.worker_traceback = ""
        if len(args) == 1 and isinstance(args[0], str) and _WORKER_WRAPPED.match(args[0]):
            self.worker_traceback = args[0]
            args = (_original_message(args[0], type(self)),)
        super().__init__(*args)


def _original_message(wrapped: str, kind: type) -> str:
    """The message of the worker's exception: what follows its last ``<module>.<Type>: `` line."""
    marker = f"{kind.__module__}.{kind.__qualname__}: "
    at = wrapped.rfind("\n" + marker)
    return wrapped[at + 1 + len(marker):].rstrip("\n") if at >= 0 else wrapped


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
