"""Co-location the addresses hide: found by measurement, remembered as measured facts.

Two Ollama instances on different addresses can share one CPU or GPU (two VMs of one hypervisor,
two pods of one Kubernetes node, two bridged containers, one machine behind two NAT'd addresses).
No address, DNS or interface probe sees that; timing does. This module holds the pure part:

* :func:`slowdowns` / :func:`slowed_nodes`: per-node slowdown of a concurrent run against each
  node's solo time, and which nodes slowed beyond the noise tolerance;
* :func:`detect_colocation`: finds which nodes share a unit with few runs, driven through an
  injected ``measure(group)`` callable (the live probe implements it with real requests);
* :class:`ColocationFacts`: what was measured, per unordered pair of instances (co-located or
  independent, how strongly, when, how), JSON round-trip, merge, units, staleness;
* :class:`RecordedEvidence`: the same conclusion drawn from recorded production runs (per-task
  start and end times), with a stated rule so that one noisy run never flips it;
* :func:`simulated_run_counts`: the detector's run count on simulated clusters, for the benchmark.

Layer 2 (just below :mod:`~sollol_locality.calibration`, which holds and merges its facts):
plain data and pure algorithms. No I/O, no network; it imports only ``_errors`` and the
standard library. Instances are identified by opaque keys: any hashable value for the detector,
strings (e.g. ``"10.0.0.5:11434"``) for what is stored, since the facts are written as JSON.

**The model of interference assumed throughout.** Sharing is symmetric (when ``a`` slows ``b``,
``b`` slows ``a``) and monotone (adding nodes to a run never makes a node faster). So a node that
runs at its solo speed in a concurrent run shares its unit with no other node of that run, and
every pair it formed in that run is measured independent. Nodes that share a unit form one unit
with all its nodes (sharing is transitive), which is why the stored units are the connected
components of the co-located pairs.
"""

from __future__ import annotations

import math
import random
import statistics
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Generic, Literal, TypeVar

from ._errors import CalibrationError, ConfigError

__all__ = [
    "UNIT_STRENGTH",
    "DEFAULT_MAX_AGE",
    "DEFAULT_TOLERANCE",
    "ColocationFacts",
    "ColocationGroup",
    "ColocationReport",
    "ColocationRun",
    "PairEvidence",
    "PairFact",
    "RecordedEvidence",
    "describe_colocation",
    "detect_colocation",
    "facts_from_report",
    "simulated_measure",
    "simulated_run_counts",
    "slowdowns",
    "slowed_nodes",
]

K = TypeVar("K", bound=Hashable)

#: A node whose time together is below ``DEFAULT_TOLERANCE`` times its solo time shares nothing.
#:
#: Why 1.15: repeated solo runs of one generate on an idle node differ by a few percent (5 to 10%
#: between the fastest and the slowest of three), and a run across separate machines pays a small
#: dispatch overhead (about 5%). Real sharing costs far more: two nodes of one CPU take about 2x
#: each, two nodes of one GPU 1.3x to 1.5x. 1.15 sits above noise plus dispatch and below the
#: weakest real sharing. Two GPUs of one host (5 to 10%) stay below it: they are separate units,
#: which is what the model already calls them.
DEFAULT_TOLERANCE = 1.15

#: A measurement older than this (seconds) is shown as stale; it is still used.
UNIT_STRENGTH = 1.6
"""The slowdown together from which a co-located pair is one execution unit. Two nodes that
time-share one CPU core each take about 2x as long (measured 1.75x-1.97x by the dispatch
benchmark's shared-core scenarios on a loaded 2-core VM); two emulators on separate cores of one
VM slowed each other 1.43x-1.51x there (memory bandwidth), which is interference between units
of one host, not one unit. Sharing one GPU (1.3x-1.5x) falls below this figure too: a shared GPU
is found from the processes' visible devices or declared, not inferred from a slowdown."""

DEFAULT_MAX_AGE = 7 * 24 * 3600.0

Source = Literal["calibrate", "recorded"]
_SOURCES: tuple[str, ...] = ("calibrate", "recorded")
_FORMAT_VERSION = 1


def _pair(a: K, b: K) -> frozenset[K]:
    return frozenset((a, b))


def _check_tolerance(tolerance: float) -> None:
    if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and tolerance > 1.0):
        raise ConfigError(f"Invalid tolerance {tolerance!r}: expected a number above 1.0",
                          value=tolerance)


def _positive(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


# -- 1. slowdown from per-node times --------------------------------------------------------------

def slowdowns(solo: Mapping[K, float], together: Mapping[K, float]) -> dict[K, float]:
    """Each node's time in a concurrent run divided by its solo time (median of solo runs).

    ``1.0`` means the node ran as fast together as alone; ``2.0`` that it took twice as long.
    Only nodes present in ``together`` are returned, in its order.

    Raises:
        CalibrationError: a node in ``together`` has no solo time, or a time is not a positive
            finite number.
    """
    result: dict[K, float] = {}
    for key, seconds in together.items():
        if key not in solo:
            raise CalibrationError(f"node {key!r} has a concurrent time but no solo time")
        alone = solo[key]
        if not _positive(alone):
            raise CalibrationError(f"solo time of node {key!r} is {alone!r}: expected a "
                                   "positive number of seconds")
        if not _positive(seconds):
            raise CalibrationError(f"concurrent time of node {key!r} is {seconds!r}: expected a "
                                   "positive number of seconds")
        result[key] = seconds / alone
    return result


def slowed_nodes(factors: Mapping[K, float], tolerance: float = DEFAULT_TOLERANCE) -> set[K]:
    """The nodes whose slowdown reaches ``tolerance`` (see :data:`DEFAULT_TOLERANCE`)."""
    _check_tolerance(tolerance)
    return {key for key, factor in factors.items() if factor >= tolerance}


# -- 2. the detector ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ColocationRun(Generic[K]):
    """One concurrent measurement the detector made.

    Attributes:
        purpose: ``"all"`` (every node together), ``"test"`` (one node with one representative
            of each unit found so far) or ``"confirm"`` (a suspected pair alone).
        members: the nodes run together, in the order given to ``measure``.
        slowdowns: ``(node, time together / solo time)`` for each member.
        slowed: the members whose slowdown, divided by ``baseline``, reaches the tolerance.
        baseline: the slowdown every member of the run shared (1.0 unless the run held two or
            more representatives: see :func:`detect_colocation`).
    """

    purpose: str
    members: tuple[K, ...]
    slowdowns: tuple[tuple[K, float], ...]
    slowed: frozenset[K]
    baseline: float = 1.0


@dataclass(frozen=True, slots=True)
class ColocationGroup(Generic[K]):
    """Nodes that share one execution unit.

    Attributes:
        members: the nodes of the unit.
        strength: the measured interference: the median, over the confirmed pairs of the group,
            of the pair's mean slowdown when the two ran together (2.0: each took twice as long).
        pairs: the confirmed pairs and each one's strength; every member is in at least one.
    """

    members: frozenset[K]
    strength: float
    pairs: tuple[tuple[frozenset[K], float], ...]


@dataclass(frozen=True, slots=True)
class ColocationReport(Generic[K]):
    """What :func:`detect_colocation` found.

    Attributes:
        nodes: the nodes examined, in input order.
        groups: the units of two or more nodes found, ordered by their first node in ``nodes``.
        independent: pairs measured independent (directly, or through a member of a unit).
        untested_pairs: pairs neither confirmed co-located nor measured independent (the budget
            ran out first).
        untested_nodes: slowed nodes whose unit was not looked for before the budget ran out.
        runs: every run made, in order (for logs).
        tolerance: the slowdown threshold used.
        budget_exhausted: whether the run or time budget stopped the search early.
        interference: pairs of separate units measured together that slowed each other beyond
            the tolerance but less than one unit's nodes do, each with its strength (their mean
            slowdown together), ordered by the nodes' input order.
    """

    nodes: tuple[K, ...]
    groups: tuple[ColocationGroup[K], ...]
    independent: frozenset[frozenset[K]]
    untested_pairs: frozenset[frozenset[K]]
    untested_nodes: tuple[K, ...]
    runs: tuple[ColocationRun[K], ...]
    tolerance: float
    budget_exhausted: bool
    interference: tuple[tuple[frozenset[K], float], ...] = ()

    @property
    def run_count(self) -> int:
        """How many concurrent runs the search took."""
        return len(self.runs)

    def unit_of(self, node: K) -> frozenset[K]:
        """The nodes sharing ``node``'s unit, ``node`` included (itself alone if none)."""
        for group in self.groups:
            if node in group.members:
                return group.members
        return frozenset((node,))


class _Budget:
    def __init__(self, max_runs: int | None, max_seconds: float | None,
                 clock: Callable[[], float]) -> None:
        self.max_runs = max_runs
        self.max_seconds = max_seconds
        self.clock = clock
        self.start = clock()
        self.runs = 0

    def allows(self, estimate: float) -> bool:
        if self.max_runs is not None and self.runs >= self.max_runs:
            return False
        if self.max_seconds is not None:
            return (self.clock() - self.start) + estimate <= self.max_seconds
        return True


class _UnionFind(Generic[K]):
    def __init__(self, keys: Iterable[K]) -> None:
        self.parent: dict[K, K] = {k: k for k in keys}

    def find(self, key: K) -> K:
        root = key
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[key] != root:
            self.parent[key], key = root, self.parent[key]
        return root

    def union(self, a: K, b: K) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _baseline(independent: Sequence[float]) -> float:
    """The slowdown a run imposed on members that share nothing with each other.

    At most one of them shares a unit with the node under test, so the highest is left out and
    the lower median of the rest is taken (the lowest, for two); never below 1.0.
    """
    if len(independent) < 2:
        return 1.0
    return max(1.0, statistics.median_low(sorted(independent)[:-1]))


def detect_colocation(
    nodes: Sequence[K],
    solo: Mapping[K, float],
    measure: Callable[[Sequence[K]], Mapping[K, float]],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    max_runs: int | None = None,
    max_seconds: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    max_confirmations_per_node: int = 2,
    unit_strength: float = UNIT_STRENGTH,
) -> ColocationReport[K]:
    """Find which of ``nodes`` share an execution unit, with few concurrent runs.

    ``solo`` gives each node's solo time (the median of its solo runs); ``measure(group)`` runs
    the nodes of ``group`` at once and returns each one's time (a time per node, not the wall).

    The search:

    1. **All together, once.** A node that keeps its solo speed shares with no one: it is
       cleared, with every pair it is in.
    2. **Each slowed node against the units found so far.** The slowed nodes are taken in turn.
       Each is run together with one representative of each unit found so far (the
       representatives share nothing with each other). If it shares a unit with one of them,
       exactly that representative slows with it; if nothing slows, it shares with none of them
       and starts a unit of its own. One run places a node, however many units exist.
       A big run can slow every member a little (the machine sending the requests, a shared
       network link): slowdowns in a test run are measured against the one its representatives
       share (see :attr:`ColocationRun.baseline`), so that slowdown is not taken for sharing.
    3. **Confirmation.** A suspected pair is confirmed by running the two alone, which also
       measures the pair's interference strength. When the test run held a single
       representative it was that pair run already, and is not repeated. At most
       ``max_confirmations_per_node`` suspects (the most slowed) are confirmed per node. A unit
       therefore always rests on two runs in which both nodes slowed (the all-nodes run and the
       pair run), never on one.
    4. **Unit or interference.** A confirmed pair whose strength reaches ``unit_strength``
       (default :data:`UNIT_STRENGTH`) shares one unit. A weaker slowdown, beyond the tolerance
       but below that, is interference between separate units (two VMs on separate cores of one
       host share its memory bandwidth): the pair is reported in
       :attr:`ColocationReport.interference` with its strength, the node starts a unit of its
       own, and it is tested against the others like any node, so a weak link never chains two
       units into one and a unit-mate further down the list is still found.

    **Bound.** With ``s`` slowed nodes in the first run (``s <= N``) and ``u`` units found among
    them, the search takes at most ``1 + (s - 1) + (s - u) <= 2 * N - 1`` runs when sharing is
    unit-like (a node slows at most one representative): one all-nodes run, one test run per
    slowed node after the first, one confirmation per node that joins a unit. Under arbitrary
    noise it is at most ``1 + (s - 1) * (1 + max_confirmations_per_node)`` (``3N - 2`` by
    default). Simulated with 5% noise: N independent nodes take 1 run; N nodes with one hidden
    pair, 2 (the pair's test run is its pair run); every node slowed by two units of N/2
    interleaved (the worst case), ``2N - 2`` (58 for N = 30, against 435 pair runs).

    **Budget.** ``max_runs`` caps the number of runs; ``max_seconds`` caps the time spent, read
    from ``clock`` (monotonic seconds): a run is started only when the time spent so far plus its
    estimate fits. A run's estimate is the longest time any of its members has taken so far,
    which the all-nodes run bounds (monotonicity: no member is slower in a smaller run); the
    first run's is the longest solo time. What was not reached is reported in
    ``untested_nodes`` (the slowed nodes whose unit was not settled) and ``untested_pairs``.

    Raises:
        ConfigError: bad arguments (duplicate nodes, a tolerance not above 1, a negative budget).
        CalibrationError: a solo time is missing or not positive, or ``measure`` returned no
            positive time for a node it ran.
    """
    _check_tolerance(tolerance)
    order = tuple(nodes)
    if len(set(order)) != len(order):
        raise ConfigError(f"Invalid nodes {list(order)!r}: each node must be given once")
    if max_runs is not None and (not isinstance(max_runs, int) or max_runs < 0):
        raise ConfigError(f"Invalid max_runs {max_runs!r}: expected a whole number >= 0",
                          value=max_runs)
    if max_seconds is not None and not (_positive(max_seconds) or max_seconds == 0):
        raise ConfigError(f"Invalid max_seconds {max_seconds!r}: expected seconds >= 0",
                          value=max_seconds)
    if not (isinstance(unit_strength, int | float) and math.isfinite(unit_strength)
            and unit_strength >= tolerance):
        raise ConfigError(f"Invalid unit_strength {unit_strength!r}: expected a number not "
                          f"below the tolerance {tolerance!r}", value=unit_strength)
    if not isinstance(max_confirmations_per_node, int) or max_confirmations_per_node < 1:
        raise ConfigError(f"Invalid max_confirmations_per_node {max_confirmations_per_node!r}: "
                          "expected a whole number >= 1", value=max_confirmations_per_node)
    for key in order:
        if key not in solo:
            raise CalibrationError(f"node {key!r} has no solo time")
        if not _positive(solo[key]):
            raise CalibrationError(f"solo time of node {key!r} is {solo[key]!r}: expected a "
                                   "positive number of seconds")

    budget = _Budget(max_runs, max_seconds, clock)
    runs: list[ColocationRun[K]] = []
    independent: set[frozenset[K]] = set()
    confirmed: dict[frozenset[K], float] = {}
    interfering: dict[frozenset[K], float] = {}
    worst: dict[K, float] = {k: solo[k] for k in order}  # longest time seen, for estimates

    def run(purpose: str, members: Sequence[K],
            independent_of_each_other: Sequence[K] = ()) -> ColocationRun[K]:
        members = tuple(members)
        times = measure(members)
        budget.runs += 1
        for key in members:
            value = times.get(key) if isinstance(times, Mapping) else None
            if not _positive(value):
                raise CalibrationError(f"measure() gave {value!r} for node {key!r} in a run of "
                                       f"{list(members)!r}: expected its time in seconds")
        factors = slowdowns(solo, {k: times[k] for k in members})
        baseline = _baseline([factors[k] for k in independent_of_each_other])
        slowed = frozenset(k for k, f in factors.items() if f / baseline >= tolerance)
        for key in members:
            worst[key] = max(worst[key], times[key])
        # An unslowed member shares with nobody in this run: all its pairs here are independent.
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                if a not in slowed or b not in slowed:
                    independent.add(_pair(a, b))
        record = ColocationRun(purpose, members, tuple(factors.items()), slowed, baseline)
        runs.append(record)
        return record

    def estimate(members: Iterable[K]) -> float:
        return max(worst[k] for k in members)

    untested: list[K] = []
    exhausted = False
    units = _UnionFind(order)
    if len(order) >= 2:
        if budget.allows(estimate(order)):
            first = run("all", order)
            suspects = [k for k in order if k in first.slowed]
        else:
            exhausted, suspects = True, []
            untested = list(order)
        representatives: list[K] = []
        for index, node in enumerate(suspects):
            if not representatives:
                representatives.append(node)
                continue
            members = [node, *representatives]
            if not budget.allows(estimate(members)):
                exhausted = True
                untested = suspects[index:]
                break
            test = run("test", members, representatives)
            factors = dict(test.slowdowns)
            hits = sorted((r for r in representatives if r in test.slowed and node in test.slowed),
                          key=lambda r: -factors[r])[:max_confirmations_per_node]
            joined: list[K] = []
            strengths: dict[K, float] = {}
            if len(representatives) == 1 and hits:  # the test run was the pair run
                strengths[hits[0]] = (factors[node] + factors[hits[0]]) / 2
            else:
                for rep in hits:
                    if not budget.allows(estimate((node, rep))):
                        exhausted = True
                        break
                    check = run("confirm", (node, rep))
                    if check.slowed == frozenset((node, rep)):
                        pair_factors = dict(check.slowdowns)
                        strengths[rep] = (pair_factors[node] + pair_factors[rep]) / 2
            for rep, strength in strengths.items():
                if strength >= unit_strength:
                    confirmed[_pair(node, rep)] = strength
                    joined.append(rep)
                else:  # slowed, but less than one unit's nodes do: separate units
                    interfering[_pair(node, rep)] = strength
            for rep in joined:
                units.union(rep, node)
            if not joined:
                representatives.append(node)
            elif len(joined) > 1:  # the node bridges two units: they are one now
                keep = joined[0]
                representatives = [r for r in representatives if r == keep or r not in joined]
            if exhausted:  # this node's suspects were not all confirmed: it is left too
                untested = suspects[index:]
                break
    return _report(order, units, confirmed, independent, untested, runs, tolerance, exhausted,
                   interfering)


def _report(order: tuple[K, ...], units: _UnionFind[K],
            confirmed: Mapping[frozenset[K], float], independent: set[frozenset[K]],
            untested: Sequence[K], runs: Sequence[ColocationRun[K]], tolerance: float,
            exhausted: bool, interfering: Mapping[frozenset[K], float]
            ) -> ColocationReport[K]:
    for pair in confirmed:
        a, b = tuple(pair)
        units.union(a, b)
    members: dict[K, list[K]] = {}
    for key in order:
        members.setdefault(units.find(key), []).append(key)
    component = {k: units.find(k) for k in order}
    # Units measured apart: one independent cross pair makes all their cross pairs independent.
    apart: set[frozenset[K]] = set()
    for pair in [*independent, *interfering]:
        a, b = tuple(pair)
        if component[a] != component[b]:
            apart.add(_pair(component[a], component[b]))
    all_independent: set[frozenset[K]] = set()
    untested_pairs: set[frozenset[K]] = set()
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            ca, cb = component[a], component[b]
            if ca == cb:
                continue
            if _pair(a, b) in interfering:
                continue
            if _pair(ca, cb) in apart:
                all_independent.add(_pair(a, b))
            else:
                untested_pairs.add(_pair(a, b))
    groups: list[ColocationGroup[K]] = []
    for root, keys in members.items():
        if len(keys) < 2:
            continue
        pairs = tuple((p, s) for p, s in confirmed.items() if component[next(iter(p))] == root)
        groups.append(ColocationGroup(frozenset(keys), statistics.median(s for _, s in pairs),
                                      pairs))
    position = {k: i for i, k in enumerate(order)}
    weak = tuple(sorted(((p, s) for p, s in interfering.items()
                         if len({component[k] for k in p}) == 2),  # not joined since
                        key=lambda item: sorted(position[k] for k in item[0])))
    return ColocationReport(order, tuple(groups), frozenset(all_independent),
                            frozenset(untested_pairs), tuple(untested), tuple(runs), tolerance,
                            exhausted, weak)


# -- 3. remembered as measured facts -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PairFact:
    """What was measured about one unordered pair of instances.

    Attributes:
        a, b: the two instance keys, ``a < b``.
        colocated: ``True`` when they share a unit, ``False`` when they are separate units.
        strength: the slowdown when the two ran together (their mean time together / alone), or
            ``None`` when independence was inferred without a pair measurement. On separate
            units it is their interference (1.0: none; 1.4: each took 1.4x as long while the
            other was busy), which the cost model applies while both are busy.
        measured_at: when, in wall-clock seconds since the epoch.
        source: ``"calibrate"`` (the detector's runs) or ``"recorded"`` (production runs).
        runs: how many runs support it.
    """

    a: str
    b: str
    colocated: bool
    strength: float | None
    measured_at: float
    source: Source
    runs: int = 1

    def __post_init__(self) -> None:
        _validate_fact(self.a, self.b, self.colocated, self.strength, self.measured_at,
                       self.source, self.runs, where="PairFact")

    @property
    def pair(self) -> tuple[str, str]:
        """``(a, b)``: the key of this fact in :attr:`ColocationFacts.pairs`."""
        return (self.a, self.b)

    def is_stale(self, now: float, max_age: float = DEFAULT_MAX_AGE) -> bool:
        """Whether the measurement is older than ``max_age`` seconds at ``now`` (epoch seconds)."""
        return now - self.measured_at > max_age

    def describe(self, now: float, max_age: float = DEFAULT_MAX_AGE) -> str:
        """How it was measured, for a plan's reason or the hosts listing:
        ``"measured 2026-12-01, 1.93x, from 3 recorded runs, stale"`` (the date in UTC; the
        source only for recorded runs; ``stale`` when older than ``max_age`` at ``now``)."""
        day = datetime.fromtimestamp(self.measured_at, UTC).strftime("%Y-%m-%d")
        strength = f", {self.strength:.2f}x" if self.strength is not None else ""
        how = f", from {self.runs} recorded runs" if self.source == "recorded" else ""
        stale = ", stale" if self.is_stale(now, max_age) else ""
        return f"measured {day}{strength}{how}{stale}"

    def other(self, key: str) -> str:
        """The other instance of the pair."""
        return self.b if key == self.a else self.a

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "colocated": self.colocated, "strength": self.strength,
                "measured_at": self.measured_at, "source": self.source, "runs": self.runs}


def _validate_fact(a: object, b: object, colocated: object, strength: object,
                   measured_at: object, source: object, runs: object, *, where: str) -> None:
    def bad(name: str, value: object, expected: str) -> CalibrationError:
        return CalibrationError(f"{where}.{name} is {value!r}: expected {expected}")

    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, str) or not value:
            raise bad(name, value, "an instance key (a non-empty string)")
    assert isinstance(a, str) and isinstance(b, str)
    if not a < b:
        raise bad("b", b, f"a key sorting after a = {a!r} (one fact per unordered pair)")
    if not isinstance(colocated, bool):
        raise bad("colocated", colocated, "true or false")
    if strength is not None and not _positive(strength):
        raise bad("strength", strength, "a positive number or null")
    if not (_positive(measured_at) or measured_at == 0) or isinstance(measured_at, bool):
        raise bad("measured_at", measured_at, "seconds since the epoch (a number >= 0)")
    if source not in _SOURCES:
        raise bad("source", source, f"one of {', '.join(map(repr, _SOURCES))}")
    if not isinstance(runs, int) or isinstance(runs, bool) or runs < 1:
        raise bad("runs", runs, "a whole number >= 1")


def _newer(x: PairFact, y: PairFact) -> PairFact:
    """The newer of two facts about one pair; on a tie, a fixed order (merge is commutative)."""
    def rank(f: PairFact) -> tuple[float, bool, int, float, str]:
        return (f.measured_at, f.colocated, f.runs, f.strength or 0.0, f.source)
    return x if rank(x) >= rank(y) else y


@dataclass(frozen=True, slots=True)
class ColocationFacts:
    """Measured co-location and measured independence, per unordered pair of instance keys.

    Build one with :meth:`of`; it is immutable and compares by content. ``pairs`` maps
    ``(a, b)`` with ``a < b`` to its :class:`PairFact`.
    """

    pairs: Mapping[tuple[str, str], PairFact] = field(
        default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        for key, fact in self.pairs.items():
            if not isinstance(fact, PairFact) or key != fact.pair:
                raise CalibrationError(f"ColocationFacts.pairs[{key!r}] is {_short(fact)}: "
                                       "expected the PairFact of that pair")
        if not isinstance(self.pairs, MappingProxyType):
            object.__setattr__(self, "pairs", MappingProxyType(dict(self.pairs)))

    @classmethod
    def of(cls, facts: Iterable[PairFact]) -> ColocationFacts:
        """Facts from a list; of two facts about one pair the newer is kept."""
        table: dict[tuple[str, str], PairFact] = {}
        for fact in facts:
            known = table.get(fact.pair)
            table[fact.pair] = fact if known is None else _newer(known, fact)
        return cls(MappingProxyType(dict(sorted(table.items()))))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ColocationFacts) and dict(self.pairs) == dict(other.pairs)

    def __hash__(self) -> int:
        return hash(frozenset(self.pairs.items()))

    def __len__(self) -> int:
        return len(self.pairs)

    def fact(self, a: str, b: str) -> PairFact | None:
        """What is known about ``a`` and ``b`` (in either order), or ``None``."""
        return self.pairs.get((a, b) if a < b else (b, a))

    def colocated(self, a: str, b: str) -> bool:
        """Whether ``a`` and ``b`` are in one measured unit (directly or through others)."""
        if a == b:
            return True
        return any(a in g and b in g for g in self.groups())

    def merge(self, other: ColocationFacts) -> ColocationFacts:
        """Both sets of facts; where both know a pair, the newer measurement wins.

        Commutative, associative and idempotent, so two processes saving into one file agree
        whatever the order of their saves.
        """
        return ColocationFacts.of([*self.pairs.values(), *other.pairs.values()])

    def groups(self) -> tuple[frozenset[str], ...]:
        """The measured units: connected components of the co-located pairs (two or more keys),
        ordered by their smallest key."""
        keys = sorted({k for f in self.pairs.values() if f.colocated for k in f.pair})
        units = _UnionFind(keys)
        for fact in self.pairs.values():
            if fact.colocated:
                units.union(fact.a, fact.b)
        members: dict[str, set[str]] = {}
        for key in keys:
            members.setdefault(units.find(key), set()).add(key)
        return tuple(sorted((frozenset(m) for m in members.values()), key=min))

    def units(self, min_strength: float | None = None) -> tuple[frozenset[str], ...]:
        """The measured units the cost model and the topology use: the connected components of
        the co-located pairs that slowed each other at least ``min_strength`` (default
        :data:`UNIT_STRENGTH`; a pair with no strength recorded counts). A weaker slowdown is
        interference between separate units (two VMs that share a host's memory bandwidth),
        which must not chain a third node into a unit with a pair that shares a core."""
        floor = UNIT_STRENGTH if min_strength is None else min_strength
        strong = [f for f in self.pairs.values()
                  if f.colocated and (f.strength is None or f.strength >= floor)]
        return ColocationFacts.of(strong).groups() if strong else ()

    def partners(self, key: str) -> tuple[PairFact, ...]:
        """The co-located facts that name ``key``, newest first."""
        found = [f for f in self.pairs.values() if f.colocated and key in f.pair]
        return tuple(sorted(found, key=lambda f: (-f.measured_at, f.other(key))))

    def is_stale(self, now: float, max_age: float = DEFAULT_MAX_AGE) -> bool:
        """Whether any fact is older than ``max_age`` seconds at ``now`` (epoch seconds)."""
        return any(f.is_stale(now, max_age) for f in self.pairs.values())

    def stale(self, now: float, max_age: float = DEFAULT_MAX_AGE) -> tuple[PairFact, ...]:
        """The facts older than ``max_age`` seconds at ``now``."""
        return tuple(f for f in self.pairs.values() if f.is_stale(now, max_age))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: ``{"version": 1, "pairs": [fact, ...]}``, pairs sorted."""
        return {"version": _FORMAT_VERSION,
                "pairs": [f.to_dict() for _, f in sorted(self.pairs.items())]}

    @classmethod
    def from_dict(cls, data: object) -> ColocationFacts:
        """Facts from :meth:`to_dict`'s shape. Unknown keys are ignored (a newer minor writer).

        Raises:
            CalibrationError: a field is missing or invalid (the message names it, e.g.
                ``colocation.pairs[2].strength``), the version is unknown, or a pair is given
                twice.
        """
        if not isinstance(data, Mapping):
            raise CalibrationError(f"colocation is {_short(data)}: expected an object")
        version = data.get("version")
        if version != _FORMAT_VERSION:
            raise CalibrationError(f"colocation.version is {version!r}: expected "
                                   f"{_FORMAT_VERSION}")
        raw = data.get("pairs")
        if not isinstance(raw, list):
            raise CalibrationError(f"colocation.pairs is {_short(raw)}: expected a list")
        facts: dict[tuple[str, str], PairFact] = {}
        for index, item in enumerate(raw):
            where = f"colocation.pairs[{index}]"
            if not isinstance(item, Mapping):
                raise CalibrationError(f"{where} is {_short(item)}: expected an object")
            for name in ("a", "b", "colocated", "strength", "measured_at", "source", "runs"):
                if name not in item:
                    raise CalibrationError(f"{where}.{name} is missing")
            values = {n: item[n] for n in ("a", "b", "colocated", "strength", "measured_at",
                                           "source", "runs")}
            _validate_fact(*values.values(), where=where)
            fact = PairFact(values["a"], values["b"], values["colocated"],
                            None if values["strength"] is None else float(values["strength"]),
                            float(values["measured_at"]), values["source"], values["runs"])
            if fact.pair in facts:
                raise CalibrationError(f"{where} repeats the pair {fact.a!r}, {fact.b!r}")
            facts[fact.pair] = fact
        return cls.of(facts.values())


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def facts_from_report(report: ColocationReport[str], measured_at: float, *,
                      source: Source = "calibrate") -> ColocationFacts:
    """The facts a detector run established: its confirmed pairs (with their strength), the
    interfering pairs of separate units (``colocated=False`` with their strength) and every
    pair it measured independent. Pairs inside a unit that were not measured as a pair are left
    out: :meth:`ColocationFacts.groups` rebuilds the unit from the confirmed ones.

    Raises:
        CalibrationError: a node key is not a non-empty string.
    """
    facts: list[PairFact] = []
    for group in report.groups:
        for pair, strength in group.pairs:
            a, b = sorted(pair)
            facts.append(PairFact(a, b, True, strength, measured_at, source))
    for pair in report.independent:
        a, b = sorted(pair)
        facts.append(PairFact(a, b, False, None, measured_at, source))
    for pair, strength in report.interference:
        a, b = sorted(pair)
        facts.append(PairFact(a, b, False, strength, measured_at, source))
    return ColocationFacts.of(facts)


def describe_colocation(facts: ColocationFacts, key: str, *, now: float,
                        max_age: float = DEFAULT_MAX_AGE) -> tuple[str, ...]:
    """One line per other member of ``key``'s measured unit, for ``sollol-locality hosts``.

    A partner measured with ``key`` directly:
    ``"shares a unit with 10.0.0.6:11434 (measured 2026-12-01, 1.93x)"`` (``", from 3 recorded
    runs"`` when learned from production runs), with ``", stale"`` when the measurement is older
    than ``max_age`` seconds at ``now`` (epoch seconds). A member joined only through others:
    ``"shares a unit with 10.0.0.7:11434 (through 10.0.0.6:11434)"``.
    """
    lines = []
    direct = set()
    for fact in facts.partners(key):
        direct.add(fact.other(key))
        lines.append(f"shares a unit with {fact.other(key)} ({fact.describe(now, max_age)})")
    unit = next((g for g in facts.groups() if key in g), frozenset())
    for other in sorted(unit - direct - {key}):
        via = sorted(k for k in direct
                     if (link := facts.fact(k, other)) is not None and link.colocated)
        lines.append(f"shares a unit with {other} (through {', '.join(via) or 'others'})")
    return tuple(lines)


# -- 4. from production runs -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PairEvidence:
    """What recorded runs said about one pair since its last decision.

    Attributes:
        slowed: runs where the two overlapped and both slowed beyond the tolerance, each the
            other's only unexplained suspect.
        contradicting: runs where they overlapped and did not both slow.
        strengths: the pair's mean slowdown in each ``slowed`` run (the latest 15).
    """

    slowed: int = 0
    contradicting: int = 0
    strengths: tuple[float, ...] = ()


def _union_length(intervals: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _overlap(x: Sequence[tuple[float, float]], y: Sequence[tuple[float, float]]) -> float:
    total, i, j = 0.0, 0, 0
    while i < len(x) and j < len(y):
        total += max(0.0, min(x[i][1], y[j][1]) - max(x[i][0], y[j][0]))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


_KEPT_STRENGTHS = 15  # the latest slowdowns kept per pair: a pair's strength is their median


class RecordedEvidence:
    """Co-location learned from recorded parallel runs (``record_execution(..., timings=...)``).

    Each run gives, per task, ``(node, start_s, end_s)`` and, per node, the time one task takes
    there alone (the solo or expected time). For every pair of nodes whose busy time overlapped,
    the run is evidence one way or the other:

    * **slowed**: the two overlapped for at least ``min_overlap`` of the shorter one's busy time,
      and both slowed, over their tasks that ran mostly during the other's busy time, by at
      least ``tolerance``; and each is the other's only suspect in that run: no other slowed
      node overlapped either of them, apart from nodes already known to share a unit with them.
      Several slowed suspects at once (two co-located pairs running together) are ambiguous and
      give no evidence at all; the calibration detector resolves those.
    * **contradicting**: they overlapped that much and did not both slow.
    * **clean**: both kept their solo speed (below ``tolerance``) while overlapping for at least
      ``clean_overlap`` of the shorter busy time. A clean run is also contradicting.

    **The rule.** A pair becomes one unit after at least ``min_runs`` (3) slowed runs, with
    contradicting runs at most ``max_contradicting`` (a quarter) of its runs with evidence, and
    a median slowdown of at least ``unit_strength`` (:data:`UNIT_STRENGTH`): a single noisy run
    never merges. A pair with that evidence but a weaker median slowdown is recorded as
    interference between separate units (``colocated=False`` with its strength), which the cost
    model applies while both are busy; it is reported again only when its strength moves by
    more than 5%. A merge is undone by **one** clean run: noise slows nodes
    (another process, a pause, a cold cache) but never makes two nodes sharing one unit both
    keep their solo speed while overlapping for most of their time, so one clean run is stronger
    evidence than any number of slowed ones. An undone merge needs ``min_runs`` new slowed runs
    to come back. A merge known beforehand (``known``, e.g. from calibration) is undone the
    same way. A clean run replaces the pair's own fact; when the two are joined only through a
    chain of other co-located pairs, the unit stays until a link of the chain is measured
    independent too.

    Decisions are kept as :class:`PairFact` (``source="recorded"``) stamped with the run's
    ``measured_at``; :meth:`facts` returns them, to be merged into the calibration file's (the
    newer measurement wins there). Safe to share between threads.
    """

    def __init__(self, *, tolerance: float = DEFAULT_TOLERANCE, min_runs: int = 3,
                 max_contradicting: float = 0.25, min_overlap: float = 0.5,
                 clean_overlap: float = 0.8, known: ColocationFacts | None = None,
                 unit_strength: float = UNIT_STRENGTH) -> None:
        _check_tolerance(tolerance)
        if not (isinstance(unit_strength, int | float) and math.isfinite(unit_strength)
                and unit_strength >= tolerance):
            raise ConfigError(f"Invalid unit_strength {unit_strength!r}: expected a number not "
                              f"below the tolerance {tolerance!r}", value=unit_strength)
        self.unit_strength = unit_strength
        if not isinstance(min_runs, int) or min_runs < 1:
            raise ConfigError(f"Invalid min_runs {min_runs!r}: expected a whole number >= 1",
                              value=min_runs)
        for name, value in (("max_contradicting", max_contradicting),
                            ("min_overlap", min_overlap), ("clean_overlap", clean_overlap)):
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise ConfigError(f"Invalid {name} {value!r}: expected a fraction from 0 to 1",
                                  value=value)
        self.tolerance = tolerance
        self.min_runs = min_runs
        self.max_contradicting = max_contradicting
        self.min_overlap = min_overlap
        self.clean_overlap = clean_overlap
        self._lock = threading.Lock()
        self._known = known if known is not None else ColocationFacts()
        self._decided: dict[tuple[str, str], PairFact] = {}
        self._evidence: dict[tuple[str, str], PairEvidence] = {}

    def know(self, facts: ColocationFacts) -> None:
        """Take facts learned elsewhere (the calibration file as another process saved it);
        where they and this accumulator's decisions know a pair, the newer wins."""
        with self._lock:
            self._known = self._known.merge(facts)

    def evidence(self, a: str, b: str) -> PairEvidence:
        """The evidence gathered about ``a`` and ``b`` since their last decision."""
        with self._lock:
            return self._evidence.get((a, b) if a < b else (b, a), PairEvidence())

    def facts(self) -> ColocationFacts:
        """The decisions made from recorded runs, merged over what was known beforehand."""
        with self._lock:
            return self._current()

    def colocated(self, a: str, b: str) -> bool:
        """Whether ``a`` and ``b`` are one unit now."""
        return self.facts().colocated(a, b)

    def _current(self) -> ColocationFacts:
        return self._known.merge(ColocationFacts.of(self._decided.values()))

    def add_run(self, timings: Iterable[tuple[str, float, float]], expected: Mapping[str, float],
                *, measured_at: float) -> tuple[PairFact, ...]:
        """Take one recorded run; return the decisions it changed (merges and undone merges).

        ``timings``: one ``(node, start_s, end_s)`` per task, seconds from the batch's start;
        ``expected``: per node, the seconds one task takes there with no other node busy (at the
        concurrency the plan gave that node: its solo time, or its batching curve's time when it
        was sent several tasks at once); ``measured_at``: when the run happened, wall-clock
        seconds since the epoch.

        Raises:
            CalibrationError: a timing is malformed (end before start, not finite) or a node
                has no positive expected time.
        """
        tasks: dict[str, list[tuple[float, float]]] = {}
        for item in timings:
            try:
                node, start, end = item
            except (TypeError, ValueError):
                raise CalibrationError(f"timing {_short(item)}: expected (node, start_s, "
                                       "end_s)") from None
            if not isinstance(node, str) or not node:
                raise CalibrationError(f"timing {_short(item)}: node must be an instance key")
            if not (isinstance(start, int | float) and isinstance(end, int | float)
                    and math.isfinite(start) and math.isfinite(end) and end >= start):
                raise CalibrationError(f"timing {_short(item)}: expected finite times with "
                                       "end_s >= start_s")
            if not _positive(expected.get(node)):
                raise CalibrationError(f"node {node!r} has no positive expected time "
                                       f"(got {expected.get(node)!r})")
            tasks.setdefault(node, []).append((float(start), float(end)))
        if not (_positive(measured_at) or measured_at == 0):
            raise CalibrationError(f"measured_at is {measured_at!r}: expected seconds since the "
                                   "epoch")
        with self._lock:
            return self._add(tasks, expected, measured_at)

    def _add(self, tasks: Mapping[str, list[tuple[float, float]]],
             expected: Mapping[str, float], measured_at: float) -> tuple[PairFact, ...]:
        nodes = sorted(tasks)
        busy = {n: _union_length(tasks[n]) for n in nodes}
        length = {n: sum(e - s for s, e in busy[n]) for n in nodes}
        current = self._current()
        unit = {n: next((g for g in current.groups() if n in g), frozenset((n,))) for n in nodes}

        def slowdown(node: str, other: str) -> float | None:
            # the node's tasks that ran mostly while the other was busy
            ratios = [(e - s) / expected[node] for s, e in tasks[node]
                      if e > s and _overlap([(s, e)], busy[other]) >= (e - s) / 2]
            return statistics.median(ratios) if ratios else None

        # per overlapping pair: (overlap fraction, slowdown of first, slowdown of second)
        seen: dict[tuple[str, str], tuple[float, float, float]] = {}
        for i, a in enumerate(nodes):
            for b in nodes[i + 1:]:
                shorter = min(length[a], length[b])
                if shorter <= 0:
                    continue
                fraction = _overlap(busy[a], busy[b]) / shorter
                sa, sb = slowdown(a, b), slowdown(b, a)
                if fraction >= self.min_overlap and sa is not None and sb is not None:
                    seen[(a, b)] = (fraction, sa, sb)
        suspects: dict[str, set[str]] = {n: set() for n in nodes}
        for (a, b), (_, sa, sb) in seen.items():
            if sa >= self.tolerance and sb >= self.tolerance:
                suspects[a].add(b)
                suspects[b].add(a)

        def unexplained(node: str, partner: str) -> set[str]:
            # suspects of node other than partner and its known unit-mates
            return {s for s in suspects[node] if s != partner and s not in unit[node]}

        changed: list[PairFact] = []
        for (a, b), (fraction, sa, sb) in seen.items():
            evidence = self._evidence.get((a, b), PairEvidence())
            both = sa >= self.tolerance and sb >= self.tolerance
            clean = sa < self.tolerance and sb < self.tolerance and fraction >= self.clean_overlap
            if both:
                if unexplained(a, b) or unexplained(b, a):
                    continue  # ambiguous: no evidence either way
                strengths = (*evidence.strengths, (sa + sb) / 2)[-_KEPT_STRENGTHS:]
                evidence = PairEvidence(evidence.slowed + 1, evidence.contradicting, strengths)
            else:
                evidence = PairEvidence(evidence.slowed, evidence.contradicting + 1,
                                        evidence.strengths)
            merged = unit[a] == unit[b] and len(unit[a]) > 1
            fact: PairFact | None = None
            if clean and merged:
                fact = PairFact(a, b, False, (sa + sb) / 2, measured_at, "recorded")
                evidence = PairEvidence()
            elif clean:
                fact = PairFact(a, b, False, (sa + sb) / 2, measured_at, "recorded")
            elif (not merged and evidence.slowed >= self.min_runs
                  and evidence.contradicting
                  <= self.max_contradicting * (evidence.slowed + evidence.contradicting)):
                strength = statistics.median(evidence.strengths)
                fact = PairFact(a, b, strength >= self.unit_strength, strength, measured_at,
                                "recorded", runs=evidence.slowed)
            self._evidence[(a, b)] = evidence
            if fact is not None:
                before = current.fact(a, b)
                self._decided[(a, b)] = fact
                if fact.colocated or merged:
                    changed.append(fact)
                elif fact.strength is not None and fact.strength >= self.tolerance and (
                        before is None or before.strength is None
                        or abs(before.strength - fact.strength) > 0.05 * before.strength):
                    changed.append(fact)  # interference between separate units, new or moved
        return tuple(changed)


# -- 5. run-count figures ------------------------------------------------------------------------

def simulated_measure(units: Mapping[K, Hashable], solo: Mapping[K, float], *,
                      contention: float = 0.0, jitter: float = 0.0,
                      interference: float = 0.0, rng: random.Random | None = None
                      ) -> Callable[[Sequence[K]], Mapping[K, float]]:
    """A ``measure`` for :func:`detect_colocation` over simulated nodes.

    ``units`` maps each node to its (hidden) unit; in a run, a node sharing its unit with
    ``k - 1`` other members takes ``solo * k * (1 + contention)`` when ``k >= 2``, else its solo
    time; that is multiplied by ``1 + interference`` per other unit busy in the run (separate
    units of one host sharing its memory bandwidth), then by a random factor in
    ``[1, 1 + jitter]`` from ``rng`` (noise only ever slows).
    """
    draw = rng if rng is not None else random.Random(0)

    def measure(group: Sequence[K]) -> Mapping[K, float]:
        counts: dict[Hashable, int] = {}
        for key in group:
            counts[units[key]] = counts.get(units[key], 0) + 1
        times: dict[K, float] = {}
        for key in group:
            k = counts[units[key]]
            factor = k * (1.0 + contention) if k >= 2 else 1.0
            factor *= 1.0 + interference * (len(counts) - 1)
            times[key] = solo[key] * factor * (1.0 + draw.uniform(0.0, jitter))
        return times

    return measure


def simulated_run_counts(sizes: Iterable[int] = (4, 8, 16, 30), *, jitter: float = 0.05,
                         seed: int = 0) -> dict[int, dict[str, int]]:
    """The detector's run count on simulated clusters of each size ``N``.

    Per size: ``"independent"`` (N nodes, each its own unit), ``"one_pair"`` (one hidden pair,
    the last two nodes) and ``"two_units"`` (every node slowed: two units of N/2 nodes,
    interleaved, the detector's worst case). Solo times are 1.0 s, noise up to ``jitter``.
    """
    figures: dict[int, dict[str, int]] = {}
    for n in sizes:
        if not isinstance(n, int) or n < 2:
            raise ConfigError(f"Invalid size {n!r}: expected a whole number >= 2", value=n)
        nodes = [f"node-{i}" for i in range(n)]
        solo = dict.fromkeys(nodes, 1.0)
        layouts: dict[str, dict[str, int]] = {
            "independent": {k: i for i, k in enumerate(nodes)},
            "one_pair": {k: min(i, n - 2) for i, k in enumerate(nodes)},
            "two_units": {k: i % 2 for i, k in enumerate(nodes)},
        }
        figures[n] = {}
        for name, units in layouts.items():
            measure = simulated_measure(units, solo, jitter=jitter, rng=random.Random(seed))
            figures[n][name] = detect_colocation(nodes, solo, measure).run_count
    return figures
