"""The calibration store: what has been learned about a cluster, and its JSON file (layer 2).

:class:`Calibration` is plain data: bounded windows of measured samples, per execution unit
(time per task, contention by stream count), per host (same-host overhead), for dispatch across
machines, and room for what later measurements add: per instance (batching curves: the time of
``k`` concurrent requests on one instance) and per pair of instances (measured co-location).
Units, instances and hosts are keyed by their labels (``"host/cpu"``, ``"host:port"``), so this
module needs nothing from the layers that compute them. The cost model reads it; ``probe`` and
recorded runs fill it.

The file (``format = "sollol-locality-calibration"``) is written atomically (temporary file,
fsync, rename) under an exclusive lock on its directory, so two writers never interleave.
Reading never changes the file: a corrupt one raises :class:`~sollol_locality.CalibrationError`
naming the file and the reason, and stays where it is for a person to look at.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ._errors import CalibrationError
from ._nodefields import is_number

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MIN_CONTENTION",
    "PRIOR_BOUNDS",
    "SAMPLES_KEPT",
    "Calibration",
    "from_dict",
    "read",
    "to_dict",
    "write",
]

FORMAT: Final = "sollol-locality-calibration"
FORMAT_VERSION: Final = 1
SAMPLES_KEPT: Final = 25
"""Samples kept per figure: each figure is the median of its last 25 measurements."""
MIN_CONTENTION: Final = -0.9
"""The most a unit can gain from concurrency, as a contention figure."""
PRIOR_BOUNDS: Final[Mapping[str, tuple[float, bool]]] = {
    # What a file's priors may hold: (bound, whether the bound itself is excluded).
    "cpu_contention": (MIN_CONTENTION, False),
    "gpu_contention": (MIN_CONTENTION, False),
    "same_host_overhead": (0.0, False),
    "dispatch_overhead": (0.0, False),
    "gpu_speed_factor": (0.0, True),
    "min_samples": (0.0, False),
    "min_concurrency_gain": (0.0, False),
}
_LOCK_TIMEOUT_SECONDS: Final = 30.0

Samples = deque[float]


def samples(values: Iterable[float] = ()) -> Samples:
    """A bounded window of samples (the newest :data:`SAMPLES_KEPT`)."""
    return deque(values, maxlen=SAMPLES_KEPT)


@dataclass
class Calibration:
    """What observed runs taught: bounded sample windows, keyed by label.

    Attributes:
        task_seconds: unit label -> seconds per task alone.
        contention: unit label -> stream count ``k`` -> contention ``c``.
        host_overhead: host id -> same-host overhead between its units.
        dispatch: dispatch overhead of parallel runs across machines.
        batching: instance label -> concurrent requests ``k`` -> time of ``k`` together / one
            alone (the instance's batching curve; filled by later measurements).
        colocation: ``"instance|instance"`` (sorted) -> what a measurement found about the pair
            (plain JSON data: whether they share a unit, how strongly, when measured).
        priors: prior values the file carried (checked against :data:`PRIOR_BOUNDS`).
        observations: how many finished runs taught it.
        model: the model the measurements ran (``calibrate`` records it), ``None`` when not
            known (runs recorded through ``observe``): a decision for another model does not
            use the measured figures.
        instances: the instances (``"host:port"``) measured, sorted; for people and for
            telling what a file covers (the figures themselves are keyed by unit and host).
    """

    task_seconds: dict[str, Samples] = field(default_factory=dict)
    contention: dict[str, dict[int, Samples]] = field(default_factory=dict)
    host_overhead: dict[str, Samples] = field(default_factory=dict)
    dispatch: Samples = field(default_factory=samples)
    batching: dict[str, dict[int, Samples]] = field(default_factory=dict)
    colocation: dict[str, dict[str, Any]] = field(default_factory=dict)
    priors: dict[str, float] = field(default_factory=dict)
    observations: int = 0
    model: str | None = None
    instances: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        """Whether any measured figure is held."""
        return bool(self.task_seconds or self.contention or self.host_overhead or self.dispatch
                    or self.batching or self.colocation)

    def push(self, table: dict[str, Samples], key: str, value: float) -> None:
        """Add one sample to ``table[key]``."""
        table.setdefault(key, samples()).append(value)

    def push_k(self, table: dict[str, dict[int, Samples]], key: str, k: int,
               value: float) -> None:
        """Add one sample to ``table[key][k]``."""
        table.setdefault(key, {}).setdefault(k, samples()).append(value)

    def forget(self, *, units: Iterable[str] = (), hosts: Iterable[str] = (),
               dispatch: bool = False) -> None:
        """Drop what is known about these units and hosts (and the dispatch overhead)."""
        for label in units:
            self.task_seconds.pop(label, None)
            self.contention.pop(label, None)
        for host in hosts:
            self.host_overhead.pop(host, None)
        if dispatch:
            self.dispatch.clear()


def to_dict(cal: Calibration, priors: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The calibration as plain JSON-able data (``priors`` replaces the ones it carries)."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "observations": cal.observations,
        "model": cal.model,
        "instances": sorted(cal.instances),
        "priors": dict(cal.priors if priors is None else priors),
        "task_seconds": {k: list(v) for k, v in cal.task_seconds.items()},
        "contention": _nested_out(cal.contention),
        "host_overhead": {k: list(v) for k, v in cal.host_overhead.items()},
        "dispatch_overhead": list(cal.dispatch),
        "batching": _nested_out(cal.batching),
        "colocation": {k: dict(v) for k, v in cal.colocation.items()},
    }


def _nested_out(table: Mapping[str, Mapping[int, Samples]]) -> dict[str, dict[str, list[float]]]:
    return {key: {str(k): list(v) for k, v in by_k.items()} for key, by_k in table.items()}


def read(path: str | os.PathLike[str]) -> Calibration:
    """The calibration saved at ``path``. The file is only read, never changed.

    Raises:
        CalibrationError: the file cannot be read or is not a calibration file; the message
            names the file and the reason.
    """
    shown = os.fspath(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read calibration file {shown}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise CalibrationError(
            f"calibration file {shown} is not valid JSON (line {exc.lineno}): {exc.msg}"
        ) from exc
    except RecursionError as exc:
        raise CalibrationError(f"calibration file {shown} is nested too deeply") from exc
    return from_dict(data, shown)


def write(path: str | os.PathLike[str], cal: Calibration,
          priors: Mapping[str, float] | None = None) -> Path:
    """Write ``cal`` to ``path`` atomically, under ``path.lock``; returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(to_dict(cal, priors), indent=2, sort_keys=True)
    with _locked(target):
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return target


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Hold the writers' lock of ``target``: an exclusive ``flock`` on its directory where the
    platform has one (nothing is left behind in the directory), else a lock file beside it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        from filelock import FileLock

        with FileLock(str(target.with_name(f".{target.name}.lock")),
                      timeout=_LOCK_TIMEOUT_SECONDS):
            yield
        return
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _samples(value: object, where: str, low: float | None = None) -> Samples:
    if not isinstance(value, list) or not all(is_number(v) for v in value):
        raise CalibrationError(f"{where} must be a list of numbers")
    if low is not None and any(v < low for v in value):
        # Outside what can be learned: a hand-edited or damaged file, which would make
        # predictions meaningless (or divide by zero).
        raise CalibrationError(f"{where} must be at least {low:g}")
    return samples(float(v) for v in value[-SAMPLES_KEPT:])


def _nested_in(raw: object, shown: str, name: str, low: float | None,
               min_k: int) -> dict[str, dict[int, Samples]]:
    result: dict[str, dict[int, Samples]] = {}
    for key, by_k in (raw or {}).items():  # type: ignore[attr-defined]
        if not isinstance(by_k, dict):
            raise CalibrationError(f"{shown}: {name}[{key!r}] must be a table")
        if any(int(k) < min_k for k in by_k):
            raise CalibrationError(f"{shown}: {name}[{key!r}] stream counts must be at least "
                                   f"{min_k}")
        result[str(key)] = {int(k): _samples(v, f"{shown}: {name}[{key!r}][{k!r}]", low)
                            for k, v in by_k.items()}
    return result


def from_dict(data: object, shown: str = "<calibration>") -> Calibration:
    """Parse and check the JSON form of a calibration (``shown`` names it in errors).

    Raises:
        CalibrationError: not a calibration, or a figure out of range.
    """
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CalibrationError(f"{shown} is not a sollol-locality calibration file")
    try:
        cal = Calibration()
        for key, values in (data.get("task_seconds") or {}).items():
            window = _samples(values, f"{shown}: task_seconds[{key!r}]")
            if any(v <= 0 for v in window):
                raise CalibrationError(f"{shown}: task_seconds[{key!r}] must be positive")
            cal.task_seconds[str(key)] = window
        cal.contention = _nested_in(data.get("contention"), shown, "contention",
                                    MIN_CONTENTION, 2)
        for host, values in (data.get("host_overhead") or {}).items():
            cal.host_overhead[str(host)] = _samples(values, f"{shown}: host_overhead[{host!r}]",
                                                    0.0)
        cal.dispatch = _samples(data.get("dispatch_overhead") or [], f"{shown}: dispatch", 0.0)
        cal.batching = _nested_in(data.get("batching"), shown, "batching", 0.0, 1)
        colocation = data.get("colocation")
        colocation = {} if colocation is None else colocation
        if not isinstance(colocation, dict) or not all(isinstance(v, dict)
                                                       for v in colocation.values()):
            raise CalibrationError(f"{shown}: colocation must be a table of tables")
        cal.colocation = {str(k): dict(v) for k, v in colocation.items()}
        cal.priors = _priors(data.get("priors"), shown)
        observations = data.get("observations", 0)
        cal.observations = int(observations) if is_number(observations) else 0
        model = data.get("model")
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise CalibrationError(f"{shown}: model must be a non-empty string or null")
        cal.model = model
        instances = data.get("instances") or []
        if not isinstance(instances, list) or not all(isinstance(i, str) for i in instances):
            raise CalibrationError(f"{shown}: instances must be a list of strings")
        cal.instances = sorted(set(instances))
    except (AttributeError, TypeError, ValueError) as exc:
        raise CalibrationError(f"{shown} is malformed: {exc}") from exc
    return cal


def _priors(raw: object, shown: str) -> dict[str, float]:
    if not isinstance(raw, dict):
        return {}
    values: dict[str, float] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not is_number(value):
            continue
        low, strict = PRIOR_BOUNDS.get(name, (-math.inf, False))
        if value < low or (strict and value == low):
            raise CalibrationError(f"{shown}: prior {name} = {value!r} is out of range "
                                   f"(expected {'more than' if strict else 'at least'} "
                                   f"{low:g})")
        values[name] = value
    return values
