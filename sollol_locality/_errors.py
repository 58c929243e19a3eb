"""Exceptions raised by sollol_locality.

The hierarchy::

    LocalityError                       root of everything this library raises
    ├── InvalidNodeAddress  (ValueError) a node that cannot be parsed into host and port
    ├── ConfigError         (ValueError) a bad configuration value or environment variable
    │   └── TopologyFileError            a malformed topology file (names the file and line)
    ├── CalibrationError                 a calibration run or file that cannot be used
    └── DispatchError                    a batch that ended with tasks that got no result

Bad input is also a ``ValueError`` so that callers' existing handlers keep working.
Messages name the offending input with ``!r`` (credentials removed) and say what was expected.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CalibrationError",
    "ConfigError",
    "DispatchError",
    "InvalidNodeAddress",
    "LocalityError",
    "TopologyFileError",
]


class LocalityError(Exception):
    """Root of every exception raised by sollol_locality."""


class InvalidNodeAddress(LocalityError, ValueError):
    """A node (string, mapping or object) that cannot be parsed into a node address.

    ``node`` is a safe description of the input (credentials removed, long input shortened),
    ``reason`` says what is wrong with it.
    """

    def __init__(self, node: str, reason: str) -> None:
        self.node = node
        self.reason = reason
        super().__init__(f"Invalid node address {node}: {reason}")


class ConfigError(LocalityError, ValueError):
    """A configuration value (argument or environment variable) that cannot be used."""

    def __init__(self, message: str, *, variable: str | None = None, value: object = None) -> None:
        self.variable = variable
        self.value = value
        super().__init__(message)


class TopologyFileError(ConfigError):
    """A topology file that cannot be read or does not follow the documented layout."""

    def __init__(self, path: str, reason: str, *, line: int | None = None) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        where = f"{path}, line {line}" if line is not None else path
        super().__init__(f"Invalid topology file {where}: {reason}", variable=None, value=path)


class CalibrationError(LocalityError):
    """A calibration run or calibration file that cannot be used."""


class DispatchError(LocalityError):
    """A batch that ended with some tasks that got no result: every usable node failed, a task ran
    out of attempts, or the batch was cancelled. Nothing is lost silently: the error carries what
    did finish.

    Attributes:
        results: one entry per task, in task order: the task's result, or ``None`` for a task
            listed in ``failed_tasks``.
        failed_tasks: indices of the tasks that got no result, in order.
        node_errors: ``(node_key, error)`` for every node that failed during the batch, in the
            order they failed (``node_key`` is the node's registry key, its URL by default).
        task_errors: ``(task_index, error)``: the last error of each failed task that ran at
            least once.
        attempts: every call made, in the order they started (the dispatcher's attempt records).
        cancelled: whether the batch stopped because it was cancelled.
    """

    def __init__(
        self, message: str, *, results: tuple[Any, ...] = (),
        failed_tasks: tuple[int, ...] = (),
        node_errors: tuple[tuple[str, BaseException], ...] = (),
        task_errors: tuple[tuple[int, BaseException], ...] = (),
        attempts: tuple[Any, ...] = (), cancelled: bool = False,
    ) -> None:  # fmt: skip
        self.results = results
        self.failed_tasks = failed_tasks
        self.node_errors = node_errors
        self.task_errors = task_errors
        self.attempts = attempts
        self.cancelled = cancelled
        super().__init__(message)
