"""Exceptions raised by sollol_locality.

The hierarchy::

    LocalityError                       root of everything this library raises
    ├── InvalidNodeAddress  (ValueError) a node that cannot be parsed into host and port
    ├── ConfigError         (ValueError) a bad configuration value or environment variable
    │   └── TopologyFileError            a malformed topology file (names the file and line)
    └── CalibrationError                 a calibration run or file that cannot be used

Bad input is also a ``ValueError`` so that callers' existing handlers keep working.
Messages name the offending input with ``!r`` (credentials removed) and say what was expected.
"""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "ConfigError",
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
