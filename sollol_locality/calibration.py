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

**Merging on save.** Several processes may learn into one file. A :class:`Calibration` keeps a
journal of what changed since it was read (or last saved): every sample pushed, every entry
forgotten or set. :func:`write_merged` takes the lock, reads the file as it is *now* (another
process may have saved meanwhile), replays the journal onto it, writes the result and returns it,
so the caller continues from the merged state with an empty journal. Per kind of section
(:data:`SECTIONS`):

* sample windows (``task_seconds``, ``contention``, ``host_overhead``, ``dispatch``,
  ``batching``): the samples pushed since the read are appended, in order, to the file's window
  of the same key, which keeps its newest :data:`SAMPLES_KEPT`; a key forgotten since the read
  (a calibration run re-measuring it) is dropped from the file's copy first. Nothing is applied
  twice: after a save the journal is empty, so saving again adds nothing.
* counters (``observations``): the file's count plus this calibration's increase since the read.
* tables of records (``colocation``): each key set since the read replaces the file's record,
  through :data:`TABLE_MERGE` when the section registers a function there
  (``merge(on_file, ours) -> record``, e.g. one that keeps the newer measurement).
* a section registered in :data:`SECTION_MERGE` is merged whole instead, journal or not:
  ``merge(on_file_section, our_section) -> section`` (it must be commutative and idempotent,
  as ``ColocationFacts.merge`` is, so that saving twice or in any order agrees).
* ``priors``: the saver's.

A new section plugs in by adding its field to :class:`Calibration`, its kind to
:data:`SECTIONS`, its form to :func:`to_dict` / :func:`from_dict`, and writing only through
:meth:`Calibration.push`, :meth:`Calibration.push_k`, :meth:`Calibration.set_entry` or
:meth:`Calibration.forget_entry` (a direct write is kept in memory but not merged).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ._errors import CalibrationError
from ._nodefields import is_number
from .colocation import ColocationFacts

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MIN_CONTENTION",
    "PRIOR_BOUNDS",
    "SAMPLES_KEPT",
    "SECTIONS",
    "SECTION_MERGE",
    "TABLE_MERGE",
    "Calibration",
    "from_dict",
    "merge",
    "read",
    "to_dict",
    "write",
    "write_merged",
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
    "cpu_batch_cost": (0.0, False),
    "gpu_batch_cost": (0.0, False),
}
_LOCK_TIMEOUT_SECONDS: Final = 30.0

Samples = deque[float]

SECTIONS: Final[Mapping[str, str]] = {
    # section -> kind: "window" (one sample window), "windows" (key -> window), "windows_k"
    # (key -> stream count -> window), "table" (key -> a plain-data record).
    "task_seconds": "windows",
    "contention": "windows_k",
    "host_overhead": "windows",
    "dispatch": "window",
    "batching": "windows_k",
    "colocation": "table",
}
"""How each section of a :class:`Calibration` is merged on save (see the module docstring)."""

SECTION_MERGE: dict[str, Callable[[Any, Any], Any]] = {
    "colocation": lambda on_file, ours: on_file.merge(ours),
}
"""Per section merged whole, ``merge(on_file_section, our_section) -> section`` (commutative
and idempotent); its journal entries are then not replayed. Measured co-location merges as
:meth:`ColocationFacts.merge <sollol_locality.colocation.ColocationFacts.merge>` does: every
pair either side knows, the newer measurement where both know one."""

TABLE_MERGE: dict[str, Callable[[Any, Any], Any]] = {}
"""Per ``"table"`` section, ``merge(on_file, ours) -> record`` for a key set since the read
(``on_file`` is ``None`` when the file has no record there); without one, ours replaces it."""

# A journal entry: ("push", section, key, k, value), ("forget", section, key, None, None) or
# ("set", section, key, None, record); key and k are None where the section has none.
_Change = tuple[str, str, Any, Any, Any]


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
        batching: instance label -> concurrent requests ``k`` -> wall seconds of ``k``
            requests sent to that instance together (``k = 1``: one alone); the batching curve
            ``ratio(k)`` is computed on read, as the median at ``k`` over the median at 1.
        colocation: what measurements found about pairs of instances (keyed by
            :attr:`~sollol_locality.topology.Instance.label`): which share a unit, how strongly,
            which are independent, when measured (:class:`~sollol_locality.colocation.
            ColocationFacts`; the file's top-level ``"colocation"`` is its ``to_dict()``).
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
    colocation: ColocationFacts = field(default_factory=ColocationFacts)
    priors: dict[str, float] = field(default_factory=dict)
    observations: int = 0
    model: str | None = None
    instances: list[str] = field(default_factory=list)
    # What changed since the file was read or last saved (see the module docstring), and the
    # observation count then: what a merged save adds to the file.
    journal: list[_Change] = field(default_factory=list, repr=False, compare=False)
    synced_observations: int = field(default=0, repr=False, compare=False)

    def __bool__(self) -> bool:
        """Whether any measured figure is held."""
        return bool(self.task_seconds or self.contention or self.host_overhead or self.dispatch
                    or self.batching or self.colocation)

    def _section_of(self, table: object) -> str:
        for name in SECTIONS:
            if getattr(self, name) is table:
                return name
        raise ValueError("the table is not a section of this calibration")

    def push(self, table: dict[str, Samples], key: str, value: float) -> None:
        """Add one sample to ``table[key]`` (``table`` one of this calibration's sections)."""
        table.setdefault(key, samples()).append(value)
        self.journal.append(("push", self._section_of(table), key, None, value))

    def push_k(self, table: dict[str, dict[int, Samples]], key: str, k: int,
               value: float) -> None:
        """Add one sample to ``table[key][k]``."""
        table.setdefault(key, {}).setdefault(k, samples()).append(value)
        self.journal.append(("push", self._section_of(table), key, k, value))

    def push_dispatch(self, value: float) -> None:
        """Add one sample of the dispatch overhead."""
        self.dispatch.append(value)
        self.journal.append(("push", "dispatch", None, None, value))

    def set_entry(self, section: str, key: str, record: Any) -> None:
        """Set ``key`` of a ``"table"`` section (``colocation``) to a plain-data record."""
        if SECTIONS.get(section) != "table":
            raise ValueError(f"section {section!r} is not a table of records")
        getattr(self, section)[key] = record
        self.journal.append(("set", section, key, None, record))

    def forget_entry(self, section: str, key: str | None = None) -> None:
        """Drop ``key`` of ``section`` (the whole window for ``dispatch``)."""
        table = getattr(self, section)
        if SECTIONS[section] == "window":
            table.clear()
        else:
            table.pop(key, None)
        self.journal.append(("forget", section, key, None, None))

    def forget(self, *, units: Iterable[str] = (), hosts: Iterable[str] = (),
               dispatch: bool = False, instances: Iterable[str] = ()) -> None:
        """Drop what is known about these units and hosts (and the dispatch overhead), and the
        batching curves of these instances."""
        for label in instances:
            self.batching.pop(label, None)
        for label in units:
            self.forget_entry("task_seconds", label)
            self.forget_entry("contention", label)
        for host in hosts:
            self.forget_entry("host_overhead", host)
        if dispatch:
            self.forget_entry("dispatch")

    def synced(self) -> None:
        """Mark this calibration as what its file holds: the journal starts afresh."""
        self.journal.clear()
        self.synced_observations = self.observations


def merge(on_file: Calibration, ours: Calibration) -> Calibration:
    """``on_file`` (read now) with what ``ours`` learned since it was read replayed onto it; see
    the module docstring for the rule per section. ``on_file`` is changed and returned, synced.
    """
    for op, section, key, k, value in ours.journal:
        if section in SECTION_MERGE:
            continue
        kind = SECTIONS[section]
        table = getattr(on_file, section)
        if op == "forget":
            if kind == "window":
                table.clear()
            else:
                table.pop(key, None)
        elif op == "set":
            merge_record = TABLE_MERGE.get(section)
            table[key] = value if merge_record is None else merge_record(table.get(key), value)
        elif kind == "window":
            table.append(value)
        elif kind == "windows":
            table.setdefault(key, samples()).append(value)
        else:
            table.setdefault(key, {}).setdefault(k, samples()).append(value)
    for section, merge_section in SECTION_MERGE.items():
        setattr(on_file, section, merge_section(getattr(on_file, section),
                                                getattr(ours, section)))
    on_file.observations += max(0, ours.observations - ours.synced_observations)
    on_file.synced()
    return on_file


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
        "colocation": cal.colocation.to_dict(),
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
    """Write ``cal`` to ``path`` atomically, under ``path.lock``; returns the path.

    The ``"colocation"`` section is merged, under the lock, with the one the file holds then:
    :meth:`ColocationFacts.merge <sollol_locality.colocation.ColocationFacts.merge>` (every pair
    either knows; where both know one, the newer measurement wins), so two processes that
    learned about different pairs both keep theirs, whatever the order of their saves. ``cal``
    itself is not changed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target):
        content = to_dict(cal, priors)
        content["colocation"] = _file_colocation(target).merge(cal.colocation).to_dict()
        _replace(target, json.dumps(content, indent=2, sort_keys=True))
    return target


def write_merged(path: str | os.PathLike[str], cal: Calibration,
                 priors: Mapping[str, float] | None = None) -> Calibration:
    """Merge what ``cal`` learned since it was read into the file at ``path`` as it is now,
    under the writers' lock, and write the result atomically; returns the merged calibration
    (synced: its journal is empty). A missing file counts as an empty one.

    Raises:
        CalibrationError: the file exists but is not a calibration file (it is left as it is).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target):
        on_file = read(target) if target.exists() else Calibration()
        merged = merge(on_file, cal)
        merged.priors = dict(cal.priors if priors is None else priors)
        _replace(target, json.dumps(to_dict(merged), indent=2, sort_keys=True))
    return merged


def _replace(target: Path, data: str) -> None:
    """Replace ``target`` by a file holding ``data``: temporary file, fsync, rename."""
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
        cal.colocation = _colocation(data.get("colocation"), shown)
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
        cal.synced_observations = cal.observations
    except (AttributeError, TypeError, ValueError) as exc:
        raise CalibrationError(f"{shown} is malformed: {exc}") from exc
    return cal


def _colocation(raw: object, shown: str) -> ColocationFacts:
    """The file's ``"colocation"`` section (missing: nothing measured)."""
    if raw is None:
        return ColocationFacts()
    try:
        return ColocationFacts.from_dict(raw)
    except CalibrationError as exc:
        raise CalibrationError(f"{shown}: {exc}") from None


def _file_colocation(target: Path) -> ColocationFacts:
    """The co-location facts the file at ``target`` holds now (nothing when it is missing or
    unreadable: the write replaces an unreadable file as it always has)."""
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return ColocationFacts()
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return ColocationFacts()
    try:
        return _colocation(data.get("colocation"), os.fspath(target))
    except CalibrationError:
        return ColocationFacts()


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
