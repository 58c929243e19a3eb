"""The parallelism cost model: what running a batch concurrently really costs.

The model predicts the makespan (wall time until the last task ends) of ``num_tasks`` equal tasks

* run one after another on the fastest node (*sequential*), and
* run concurrently across a set of nodes, each node working through its share one task at a time
  as Ollama does by default (*parallel*).

**Execution unit.** One physical host's CPU, or one GPU on it. Nodes on the same unit contend;
nodes on different units do not (apart from a small same-host overhead, below). Nodes of one GPU
host that declare no device share one unit. Two aliases of the same instance (same host and port)
are one instance and never count as two streams.

**Contention.** When ``k >= 2`` nodes of one unit run at once, each of their tasks takes
``k * (1 + c)`` times as long as alone: the unit's capacity is shared ``k`` ways, plus an overhead
``c`` (context switches, cache and memory-bandwidth thrash, VRAM pressure). ``c = 1.0`` makes two
nodes of one CPU host run at 0.5x the sequential speed; a negative ``c`` (measured on a many-core
host running small instances) means the unit gains from concurrency. Units of one host slow each
other by ``same_host_overhead`` per additional busy unit; a parallel dispatch to two or more nodes
across two or more machines costs ``dispatch_overhead`` of its makespan.

**Speed.** Each node's time per task comes, in order, from calibration (measured runs), from the
latency the node already carries (SynapticLlamas ``metrics.avg_response_time`` seconds with
``metrics.total_requests``, SOLLOL ``metrics.avg_latency`` milliseconds, a mapping's
``latency_ms``) once it has ``min_samples`` requests, or from a prior: a CPU node is the reference
task time and a GPU node is ``gpu_speed_factor`` times faster. An instance of this machine that
its process shows pinned or limited to part of it (``HostIdentity.cpu_share``: ``min(len(cpus),
cpu_quota) / os.cpu_count()``) takes that share of the speed of an unpinned instance of this
machine, which is the reference: pinned to 2 of 8 cores, its prior task time is 4 references.
When no node has data, times are in units of one task on a reference CPU node
(``time_unit == "tasks"``), else in seconds.

All the numbers live in :class:`CostPriors`; :meth:`ParallelismCostModel.observe` moves them toward
what finished runs measured.
"""

from __future__ import annotations

import heapq
import logging
import os
import statistics
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeGuard

from . import _nodefields, calibration
from ._errors import CalibrationError, InvalidNodeAddress
from .calibration import MIN_CONTENTION as _MIN_CONTENTION
from .calibration import Calibration
from .config import LocalityConfig

if TYPE_CHECKING:
    from .topology import ExecutionUnit, HostIdentity, Instance, NodeTopology

__all__ = [
    "CostPriors",
    "NodeProfile",
    "ParallelismCostModel",
    "SpeedupEstimate",
    ]

logger = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class CostPriors:
    """Every number the cost model assumes before calibration, in one documented place.

    The defaults follow the figures measured in the original proposal for this library:
    same host, CPU: about 50% slower in parallel (two nodes: 0.5x); one GPU shared: 20% slower
    (0.8x, "30 to 50% overhead" at its upper end relative to ideal); different GPUs of one host:
    5 to 10% overhead; different hosts: near-ideal, minus a dispatch overhead.

    Beside each prior below: what ``python -m benchmarks.dispatch`` measured (docs/benchmark.md;
    Ollama emulators on a 2-core VM, one pinned CPU per simulated machine, 256 MB of weights,
    4 chunks of 32 tokens). The emulator is one cluster, not the clusters these priors are for,
    so no prior was changed to match it; ``sollol-locality calibrate`` measures the cluster it
    runs on and replaces them.

    Attributes:
        cpu_contention: ``c`` for nodes sharing one host's CPU (1.0: two nodes run at 0.5x).
            Emulator: c = +0.011 to +0.020 for two nodes time-sharing one core (sequential and
            all-parallel makespans within 2%), so the prior predicted 0.50x where 0.98x to 0.99x
            happened. Kept: each emulator is one thread pinned to one core, which shows
            time-sharing but not the thread oversubscription of two llama.cpp instances that
            each start a thread per core (published llama.cpp measurements: 20% to 3.6x
            slower); 0.5x is inside that range, and this is the figure calibration exists to
            replace.
        gpu_contention: ``c`` for nodes sharing one GPU (0.25: two nodes run at 0.8x). Not
            measured (no GPU here).
        same_host_overhead: slowdown of each busy unit per other busy unit of the same host
            (0.075, the middle of "5 to 10%"). GPUs: not measured (no GPU here). CPU sets: two
            instances of one machine pinned to disjoint cores (separate units from their
            processes' CPU sets, sharing memory bandwidth) were measured 1.5x faster in
            parallel than sequential on a real machine (an overhead of 0.33); the prior
            predicts 2 / 1.075 = 1.86x. Kept: both decide parallel, and what a machine's
            memory bandwidth costs is what ``calibrate`` measures per host (``host_overhead``)
            and puts in place of this figure.
        dispatch_overhead: fraction of a parallel makespan lost to dispatching to and collecting
            from several machines (0.05: two tasks on two hosts give 1.90x). Emulator: 0.001 to
            0.020 between namespaces on separate cores (two machines: 1.95x measured, 1.98x
            predicted after calibration); 0.98 for two namespaces sharing one core (scenario
            (f): "two machines" that are one; calibration absorbs it here, and the plan runs
            sequentially). Kept: a real LAN adds request latency that loopback and veth links
            do not.
        gpu_speed_factor: how many times faster a GPU node without data is assumed to be than a
            CPU node without data. Not measured (no GPU here).
        min_samples: requests a node's own latency needs before it is trusted.
        min_concurrency_gain: how much faster (as a fraction) ``k`` nodes of one unit must have
            been measured running together than one after another (``c <= -0.05``) before
            the planner runs several streams on that unit. Set from the benchmark: calibrations
            of two nodes on one core, whose true ``c`` is close to 0, learned from -0.04 to +0.07
            across six runs (``python -m benchmarks.dispatch [--quick]``, some with other
            processes busy on the VM); with no margin, one of them (-0.009) sent a job parallel
            on one core and it ran 3% slower.
    """

    cpu_contention: float = 1.0
    gpu_contention: float = 0.25
    same_host_overhead: float = 0.075
    dispatch_overhead: float = 0.05
    gpu_speed_factor: float = 4.0
    min_samples: int = 3
    min_concurrency_gain: float = 0.05


@dataclass(frozen=True, slots=True)
class SpeedupEstimate:
    """A prediction for one way of running a batch.

    Attributes:
        speedup: sequential makespan / parallel makespan (below 1.0: parallel is slower).
        sequential_seconds: predicted makespan running the tasks one after another on the
            fastest node.
        parallel_seconds: predicted makespan running them concurrently across the nodes.
        units: the distinct execution units used, as ``"host/cpu"``, ``"host/gpu"`` or
            ``"host/gpu:ID"``.
        reason: one sentence on what drives the estimate.
        time_unit: ``"seconds"`` when any node's speed is measured, else ``"tasks"`` (units of
            one task on a reference node).
        tasks_per_node: how many tasks each given node gets in the parallel run (input order;
            0 for a node that gets none or could not be parsed).
    """

    speedup: float
    sequential_seconds: float
    parallel_seconds: float
    units: tuple[str, ...]
    reason: str
    time_unit: str = "tasks"
    tasks_per_node: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeProfile:
    """One node as the cost model sees it."""

    index: int
    identity: HostIdentity
    instance: Instance
    unit: ExecutionUnit
    task_time: float
    speed_source: str

    @property
    def node(self) -> Any:
        return self.identity.node

    @property
    def unit_label(self) -> str:
        return self.unit.label

    @property
    def is_gpu(self) -> bool:
        return self.unit.is_gpu


def _is_number(value: object) -> TypeGuard[int | float]:
    return _nodefields.is_number(value)


@dataclass(frozen=True, slots=True)
class _Trial:
    """A candidate value for one figure while :meth:`ParallelismCostModel._learn` fits it:
    ``kind`` ``"contention"`` (``key`` a unit label, for ``k`` streams) or ``"host"`` (``key`` a
    host id, the same-host overhead)."""

    kind: str
    key: str
    k: int
    value: float


def _fit(predict: Callable[[float], float], target: float, *, low: float) -> float | None:
    """The ``x >= low`` at which the non-decreasing ``predict(x)`` equals ``target``
    (``low`` when even ``low`` predicts too much), or ``None`` when ``predict`` does not depend
    on ``x`` (the run says nothing about the figure).

    Regula falsi with the Illinois modification: exact in one step where ``predict`` is linear in
    ``x`` (as it is between the model's event boundaries), never leaving the bracket.
    """
    f_low = predict(low) - target
    high = max(1.0, low + 1.0)
    f_high = predict(high) - target
    if f_high - f_low <= 1e-12 * max(1.0, abs(target)):
        return None
    if f_low >= 0:
        return low
    while f_high < 0:
        if high > 1e6:  # a stalled run; the bound keeps the figure finite
            return high
        low, f_low = high, f_high
        high *= 2.0
        f_high = predict(high) - target
    side = 0
    x = high
    for _ in range(100):
        x = (low * f_high - high * f_low) / (f_high - f_low)
        f_x = predict(x) - target
        if abs(f_x) <= 1e-12 * max(1.0, abs(target)) or high - low <= 1e-12 * max(1.0, abs(x)):
            return x
        if f_x < 0:
            low, f_low = x, f_x
            if side == -1:
                f_high /= 2.0
            side = -1
        else:
            high, f_high = x, f_x
            if side == 1:
                f_low /= 2.0
            side = 1
    return x


def _median(samples: Iterable[float] | None) -> float | None:
    values = list(samples or ())
    return statistics.median(values) if values else None


class ParallelismCostModel:
    """Predicts sequential and parallel makespans and learns from finished runs.

    The model is pure: it predicts from node profiles (identities a :class:`NodeTopology`
    described, which the caller passes in) and does no I/O of its own, apart from the
    calibration file: the one ``config.calibration_file`` names (or, while that does not exist,
    ``config.calibration_fallback``) is read on first use, never in the constructor. A file
    that cannot be used is left untouched: one warning is logged and the priors decide.

    Args:
        config: settings (only the calibration file is used).
        priors: the assumptions before calibration (:class:`CostPriors`).
        model: the model the decisions are for; measured figures of a calibration that
            recorded another model are not used (the priors decide). ``None``: any calibration
            applies.
    """

    def __init__(self, config: LocalityConfig | None = None, *,
                 priors: CostPriors | None = None, model: str | None = None) -> None:
        self.config = config if config is not None else LocalityConfig.from_env()
        self.model = model
        self.priors = priors if priors is not None else CostPriors()
        self._cal = Calibration()
        self._lock = threading.RLock()
        self._version = 0
        self._loaded_from: Path | None = None
        self._pending_load = self.config.calibration_file is not None

    # -- calibration state ------------------------------------------------------------------

    def _ensure_loaded(self) -> None:
        """Read the configured calibration file, once, on first use."""
        if not self._pending_load:
            return
        with self._lock:
            if not self._pending_load:
                return
            self._pending_load = False
            path = self.config.calibration_file
            fallback = self.config.calibration_fallback
            if path is not None and not Path(path).exists():
                path = fallback if fallback is not None and Path(fallback).exists() else None
            if path is None:
                return
            try:
                self._install(calibration.read(path), Path(path))
            except CalibrationError as exc:
                logger.warning("%s; the file is left as it is, deciding with priors", exc,
                               extra={"event": "calibration_corrupt", "path": os.fspath(path)})

    @property
    def calibration(self) -> Calibration:
        """What the model has learned (loading the configured file on first use). The object
        is the model's own: change it only under :meth:`observe`."""
        self._ensure_loaded()
        return self._cal

    @property
    def applies(self) -> bool:
        """Whether the calibration's measured figures apply to :attr:`model` (always when
        either is unknown)."""
        recorded = self.calibration.model
        return self.model is None or recorded is None or recorded == self.model

    def _learned(self) -> Calibration:
        """The calibration the predictions use: empty when it measured another model."""
        return self.calibration if self.applies else _NOTHING_LEARNED

    @property
    def version(self) -> int:
        """Changes whenever calibration changes (used to invalidate cached decisions)."""
        self._ensure_loaded()
        return self._version

    @property
    def observations(self) -> int:
        """How many finished runs the model has learned from (including loaded ones)."""
        return self.calibration.observations

    @property
    def calibrated(self) -> bool:
        """Whether any measured figure is in use."""
        return bool(self._learned())

    def contention(self, unit: ExecutionUnit, k: int, *, trial: _Trial | None = None) -> float:
        """``c`` for ``k`` concurrent nodes on ``unit``: measured if known (nearest measured
        ``k``), else the CPU or GPU prior. ``trial`` (learning only) stands a candidate value in
        for one stream count of one unit, as if it had been measured."""
        # A copy: observe() may add a stream count from another thread while this one decides.
        by_k: dict[int, Any] = dict(self._learned().contention.get(unit.label) or {})
        if trial is not None and trial.kind == "contention" and trial.key == unit.label:
            by_k[trial.k] = (trial.value,)
        if by_k:
            nearest = min(by_k, key=lambda known: (abs(known - k), -known))
            value = _median(by_k[nearest])
            if value is not None:
                return value
        return self.priors.gpu_contention if unit.is_gpu else self.priors.cpu_contention

    def gains_from_concurrency(self, unit: ExecutionUnit) -> int:
        """The largest measured number of concurrent nodes that made ``unit`` faster (1 if none)
        by more than noise: their contention must be at most ``-priors.min_concurrency_gain``."""
        by_k = dict(self._learned().contention.get(unit.label) or {})  # a copy, as above
        best = 1
        margin = self.priors.min_concurrency_gain
        for k, samples in by_k.items():
            value = _median(samples)
            if value is not None and value < 0 and value <= -margin and k > best:
                best = k
        return best

    def host_overhead(self, host: str, *, trial: _Trial | None = None) -> float:
        if trial is not None and trial.kind == "host" and trial.key == host:
            return trial.value
        value = _median(self._learned().host_overhead.get(host))
        return self.priors.same_host_overhead if value is None else value

    def dispatch_overhead(self) -> float:
        value = _median(self._learned().dispatch)
        return self.priors.dispatch_overhead if value is None else value

    def measured_task_seconds(self, unit: ExecutionUnit) -> float | None:
        return _median(self._learned().task_seconds.get(unit.label))

    # -- profiles ---------------------------------------------------------------------------

    def profiles(self, identities: Sequence[HostIdentity | InvalidNodeAddress]
                 ) -> tuple[list[NodeProfile], str]:
        """Node profiles for described nodes (invalid ones skipped) and the time unit."""
        priors = self.priors
        raw: list[tuple[int, HostIdentity, Instance, ExecutionUnit, float | None, str]] = []
        for index, identity in enumerate(identities):
            if isinstance(identity, InvalidNodeAddress):
                continue
            unit = identity.unit
            seconds: float | None = self.measured_task_seconds(unit)
            source = "calibration"
            if seconds is None:
                seconds = _nodefields.latency(identity.node, priors.min_samples)
                source = "metrics" if seconds is not None else "prior"
            instance = identity.instance
            raw.append((index, identity, instance, unit, seconds, source))
        # The reference speed for nodes without data: the median over distinct instances, so
        # that listing one instance under several names never shifts it.
        distinct: dict[Instance, tuple[float, bool]] = {}
        for _, _, instance, unit, seconds, _ in raw:
            if seconds is not None:
                distinct.setdefault(instance, (seconds, unit.is_gpu))
        known = list(distinct.values())
        if known:
            time_unit = "seconds"
            as_cpu = [s * priors.gpu_speed_factor if gpu else s for s, gpu in known]
            reference = statistics.median(as_cpu)
        else:
            time_unit, reference = "tasks", 1.0
        result = []
        for index, identity, instance, unit, known_seconds, source in raw:
            task_time = known_seconds
            if task_time is None:
                task_time = reference / priors.gpu_speed_factor if unit.is_gpu else reference
                share = identity.cpu_share
                if share is not None and share > 0 and not unit.is_gpu:
                    task_time /= share  # pinned to part of this machine: that share of its speed
            result.append(NodeProfile(index, identity, instance, unit, task_time, source))
        return result, time_unit

    # -- prediction -------------------------------------------------------------------------

    def sequential_makespan(self, num_tasks: int, profiles: Sequence[NodeProfile]) -> float:
        if not profiles or num_tasks <= 0:
            return 0.0
        return num_tasks * min(p.task_time for p in profiles)

    def parallel_makespan(self, num_tasks: int, profiles: Sequence[NodeProfile]
                          ) -> tuple[float, list[int]]:
        """Makespan of running the tasks concurrently across ``profiles`` and the tasks each
        profile gets.

        Tasks are balanced by speed (each goes to the node that would finish it first, given the
        contention of the nodes working), then the run is simulated event by event: while ``k``
        streams of a unit are busy each runs at ``1 / (k * (1 + c))`` of its solo speed, and a
        stream left alone speeds back up.
        """
        count = len(profiles)
        if count == 0 or num_tasks <= 0:
            return 0.0, [0] * count
        # Aliases of one instance are one server: only the first of each instance works.
        seen: set[Instance] = set()
        usable = []
        for i, profile in enumerate(profiles):
            if profile.instance not in seen:
                seen.add(profile.instance)
                usable.append(i)
        active = set(usable)
        best: tuple[float, list[int]] | None = None
        for _ in range(6):
            estimate = self._per_task_times(profiles, active, usable)
            shares = _assign(num_tasks, [(i, estimate[i]) for i in usable])
            now_active = {i for i in usable if shares[i] > 0}
            makespan = self._simulate(profiles, shares)
            if len({profiles[i].unit.host for i in now_active}) > 1:
                makespan *= 1.0 + self.dispatch_overhead()
            if best is None or makespan < best[0] - 1e-12:
                best = (makespan, [shares.get(i, 0) for i in range(count)])
            if now_active == active:
                break
            active = now_active
        assert best is not None
        return best

    def _per_task_times(self, profiles: Sequence[NodeProfile], active: set[int],
                        targets: Iterable[int], trial: _Trial | None = None
                        ) -> dict[int, float]:
        """Time per task of each target while the ``active`` nodes (plus itself) are busy."""
        streams: dict[ExecutionUnit, int] = {}
        host_units: dict[str, set[ExecutionUnit]] = {}
        for i in active:
            unit = profiles[i].unit
            streams[unit] = streams.get(unit, 0) + 1
            host_units.setdefault(unit.host, set()).add(unit)
        times = {}
        factors: dict[tuple[ExecutionUnit, int], float] = {}  # every node of a unit shares it
        for i in targets:
            profile = profiles[i]
            unit = profile.unit
            k = streams.get(unit, 0) + (0 if i in active else 1)
            factor = factors.get((unit, k))
            if factor is None:
                factor = 1.0
                if k > 1:
                    factor = k * max(0.05, 1.0 + self.contention(unit, k, trial=trial))
                units_busy = host_units.get(unit.host, set()) | {unit}
                if len(units_busy) > 1:
                    factor *= (1.0 + self.host_overhead(unit.host, trial=trial)
                               * (len(units_busy) - 1))
                factors[(unit, k)] = factor
            times[i] = profile.task_time * factor
        return times

    def dispatch_all_makespan(self, num_tasks: int, profiles: Sequence[NodeProfile]) -> float:
        """Makespan of dispatching to every node at once, as "parallel whenever two nodes are
        healthy" does: the first ``num_tasks`` distinct instances (in the order given) start one
        task each, and whenever a node finishes a task it takes the next one left, however slow
        it is. Contention is simulated as in :meth:`parallel_makespan`; unlike it, no node is
        spared, so a node many times slower than the rest still holds up the batch."""
        seen: set[Instance] = set()
        workers = []
        for i, profile in enumerate(profiles):
            if profile.instance not in seen:
                seen.add(profile.instance)
                workers.append(i)
        if not workers or num_tasks <= 0:
            return 0.0
        busy = {i: 0.0 for i in workers[:num_tasks]}  # node -> progress through its task
        waiting = num_tasks - len(busy)
        hosts = {profiles[i].unit.host for i in busy}
        clock = 0.0
        while busy:
            times = self._per_task_times(profiles, set(busy), busy)
            step = min((1.0 - busy[i]) * times[i] for i in busy)
            clock += step
            for i in list(busy):
                busy[i] += step / times[i]
                if busy[i] >= 1.0 - 1e-9:
                    if waiting > 0:
                        waiting -= 1
                        busy[i] = 0.0
                    else:
                        del busy[i]
        if len(hosts) > 1:
            clock *= 1.0 + self.dispatch_overhead()
        return clock

    def _simulate(self, profiles: Sequence[NodeProfile], shares: Mapping[int, int],
                  trial: _Trial | None = None) -> float:
        """Wall time until every node has worked through its share, contention included."""
        left = {i: n for i, n in shares.items() if n > 0}
        progress = dict.fromkeys(left, 0.0)
        clock = 0.0
        while left:
            times = self._per_task_times(profiles, set(left), left, trial)
            step = min((1.0 - progress[i]) * times[i] for i in left)
            clock += step
            for i in list(left):
                progress[i] += step / times[i]
                if progress[i] >= 1.0 - 1e-9:
                    left[i] -= 1
                    progress[i] = 0.0
                    if left[i] == 0:
                        del left[i]
                        del progress[i]
        return clock

    def estimate(self, num_tasks: int, nodes: Iterable[Any],
                 topology: NodeTopology) -> SpeedupEstimate:
        """Predict running ``num_tasks`` concurrently across exactly ``nodes`` (described by
        ``topology``) against running them one after another on the fastest of them.

        Nodes that cannot be parsed are left out (and named in ``reason``).
        """
        if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 0:
            raise ValueError(f"num_tasks must be a non-negative integer, got {num_tasks!r}")
        identities = topology.describe_many(list(nodes))
        return self.estimate_profiles(num_tasks, identities)

    def estimate_profiles(self, num_tasks: int,
                          identities: Sequence[HostIdentity | InvalidNodeAddress]
                          ) -> SpeedupEstimate:
        """:meth:`estimate` on nodes already described by a topology."""
        profiles, time_unit = self.profiles(identities)
        invalid = len(identities) - len(profiles)
        if not profiles:
            return SpeedupEstimate(1.0, 0.0, 0.0, (), "no usable node", time_unit,
                                   (0,) * len(identities))
        sequential = self.sequential_makespan(num_tasks, profiles)
        parallel, shares = self.parallel_makespan(num_tasks, profiles)
        used = [p for p, n in zip(profiles, shares, strict=True) if n > 0]
        units = tuple(dict.fromkeys(p.unit_label for p in used))
        speedup = sequential / parallel if parallel > 0 else 1.0
        per_node = [0] * len(identities)
        for profile, share in zip(profiles, shares, strict=True):
            per_node[profile.index] = share
        reason = self._explain(num_tasks, profiles, used, speedup)
        if invalid:
            reason += f" ({invalid} node(s) could not be parsed and were left out)"
        return SpeedupEstimate(speedup, sequential, parallel, units, reason, time_unit,
                               tuple(per_node))

    def estimate_parallel_benefit(self, num_tasks: int, nodes: Iterable[Any],
                                  topology: NodeTopology) -> float:
        """The speedup of :meth:`estimate` as a bare float (below 1.0: parallel is slower)."""
        return self.estimate(num_tasks, nodes, topology).speedup

    def _explain(self, num_tasks: int, profiles: Sequence[NodeProfile],
                 used: Sequence[NodeProfile], speedup: float) -> str:
        units = {p.unit for p in used}
        hosts = {p.unit.host for p in used}
        if num_tasks < 2:
            return "a single task gains nothing from parallelism"
        if len(used) <= 1:
            return "one node takes every task; the others are too slow to help"
        if len(units) == 1:
            (unit,) = units
            kind = "GPU" if unit.is_gpu else "CPU"
            return (f"{len(used)} nodes share one {kind} on {unit.host} and contend for it "
                    f"(predicted {speedup:.2f}x)")
        if len(hosts) == 1:
            return (f"{len(units)} separate units of one host {next(iter(hosts))} "
                    f"(predicted {speedup:.2f}x)")
        return f"{len(used)} nodes on {len(hosts)} machines (predicted {speedup:.2f}x)"

    # -- learning ---------------------------------------------------------------------------

    def observe(self, mode: str, nodes: Sequence[Any], num_tasks: int, wall_seconds: float, *,
                topology: NodeTopology | None = None,
                identities: Sequence[HostIdentity] | None = None) -> None:
        """Learn from a finished run: ``num_tasks`` tasks took ``wall_seconds`` on ``nodes``.

        ``mode`` is ``"sequential"`` (all tasks one after another on ``nodes[0]``) or
        ``"parallel"`` (concurrently across ``nodes``). A sequential run teaches the unit's time
        per task; a parallel run on one unit teaches its contention; on units of one host, the
        same-host overhead; on separate hosts, the dispatch overhead. A parallel sample is the
        value at which the model, simulating that very run (its nodes, its task count, the
        units' measured times), predicts the measured wall time, so runs of any task count
        teach the same figure; a run in which nothing ran concurrently teaches nothing. Each
        figure is the median of the last 25 samples, so a few outliers do not move it.

        Raises:
            ValueError: an impossible observation (unknown mode, no nodes, non-positive time).
        """
        if mode not in ("sequential", "parallel"):
            raise ValueError(f"mode must be 'sequential' or 'parallel', got {mode!r}")
        if (not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1):
            raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
        if not _is_number(wall_seconds) or wall_seconds <= 0:
            raise ValueError(f"wall_seconds must be a positive number, got {wall_seconds!r}")
        node_list = list(nodes)
        if not node_list:
            raise ValueError("observe() needs the nodes the run used")
        if identities is None:
            if topology is None:
                raise ValueError("observe() needs the topology that describes the nodes, or "
                                 "their identities")
            described = topology.describe_many(node_list)
            identities = [i for i in described if not isinstance(i, InvalidNodeAddress)]
        if not identities:
            raise ValueError("observe(): none of the nodes could be parsed")
        with self._lock:
            self._ensure_loaded()
            self._learn(mode, list(identities), num_tasks, float(wall_seconds))
            self._cal.observations += 1
            self._version += 1

    def _learn(self, mode: str, identities: list[HostIdentity], num_tasks: int,
               wall: float) -> None:
        """Move the calibration toward one finished run.

        Every figure is learned the same way: it is the value at which the model, simulating
        the run it was told about (same nodes, same task count, the other figures as they
        are), predicts exactly the measured wall time. So a run of 3 tasks on 2 nodes of one
        unit, where the third task runs alone at full speed, teaches the same contention as a
        run of 2 tasks would, and the figures stay consistent with how the model predicts.
        """
        cal = self._cal
        if mode == "sequential" or len(identities) == 1:
            unit = identities[0].unit
            cal.push(cal.task_seconds, unit.label, wall / num_tasks)
            logger.debug("calibration: %s takes %.3fs per task", unit.label,
                         wall / num_tasks)
            return
        instances: dict[Instance, HostIdentity] = {}
        for identity in identities:
            instances.setdefault(identity.instance, identity)
        members = list(instances.values())
        units = {m.unit for m in members}
        hosts = {m.unit.host for m in members}
        k = len(members)
        by_unit: dict[ExecutionUnit, float] = {}
        for unit in units:
            seconds = self.measured_task_seconds(unit)
            if seconds is None:
                logger.debug("calibration: no solo time for %s yet; parallel run not used",
                             unit.label)
                return
            by_unit[unit] = seconds
        profiles = [NodeProfile(i, m, m.instance, m.unit, by_unit[m.unit], "calibration")
                    for i, m in enumerate(members)]
        if num_tasks <= k:  # one task each on the first nodes, as such a run is dispatched
            shares = {i: int(i < num_tasks) for i in range(k)}
        else:
            times = self._per_task_times(profiles, set(range(k)), range(k))
            shares = _assign(num_tasks, [(i, times[i]) for i in range(k)])
        streams = sum(1 for n in shares.values() if n > 0)
        if streams < 2:  # one node did everything: nothing ran concurrently
            return

        def simulated(trial: _Trial | None = None) -> float:
            return self._simulate(profiles, shares, trial)

        if len(units) == 1:
            label = next(iter(units)).label
            c = _fit(lambda x: simulated(_Trial("contention", label, streams, x)), wall,
                     low=_MIN_CONTENTION)
            if c is not None:
                cal.push_k(cal.contention, label, streams, c)
                logger.debug("calibration: %s with %d streams: contention %.3f", label,
                             streams, c)
            return
        if len(hosts) == 1 and len(units) == k:
            host = next(iter(hosts))
            overhead = _fit(lambda x: simulated(_Trial("host", host, 0, x)), wall, low=0.0)
            if overhead is not None:
                cal.push(cal.host_overhead, host, overhead)
                logger.debug("calibration: %d units of %s: same-host overhead %.3f", streams,
                             host, overhead)
            return
        if len(units) == k and len(hosts) == k:
            ideal = simulated()
            if ideal > 0:
                cal.dispatch.append(max(0.0, wall / ideal - 1.0))

    def _forget(self, *, units: Iterable[str] = (), hosts: Iterable[str] = (),
                dispatch: bool = False) -> None:
        """Drop what was learned about these units (time per task, contention) and hosts
        (same-host overhead), and the dispatch overhead when ``dispatch``: a calibration run
        about to measure them again replaces them instead of mixing old samples in."""
        with self._lock:
            self._ensure_loaded()
            self._cal.forget(units=units, hosts=hosts, dispatch=dispatch)
            self._version += 1

    # -- persistence (the file format is :mod:`sollol_locality.calibration`'s) -------------

    def to_dict(self) -> dict[str, Any]:
        """The calibration as plain JSON-able data."""
        with self._lock:
            return calibration.to_dict(self.calibration, asdict(self.priors))

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the calibration as JSON, atomically (temporary file, then rename).

        ``path`` defaults to ``config.calibration_file``.
        """
        target = path if path is not None else self.config.calibration_file
        if target is None:
            raise CalibrationError("no calibration file configured and no path given")
        with self._lock:
            return calibration.write(target, self.calibration, asdict(self.priors))

    def load(self, path: str | os.PathLike[str]) -> None:
        """Replace the calibration with the one saved at ``path`` (the file is only read).

        Raises:
            CalibrationError: the file cannot be read or is not a calibration file; the
                message names the file and the reason.
        """
        cal = calibration.read(path)
        with self._lock:
            self._pending_load = False
            self._install(cal, Path(path))

    def _install(self, cal: Calibration, path: Path) -> None:
        known = {f.name for f in fields(CostPriors)}
        values = {k: v for k, v in cal.priors.items() if k in known}
        priors = self.priors
        if values:
            try:
                priors = CostPriors(**{**asdict(self.priors), **values})
            except TypeError:
                priors = self.priors
        with self._lock:
            self._cal = cal
            self.priors = priors
            self._loaded_from = path
            self._version += 1


_NOTHING_LEARNED: Final = Calibration()


def _assign(num_tasks: int, workers: Sequence[tuple[int, float]]) -> dict[int, int]:
    """Give each task to the worker that would finish it first (equal tasks, greedy)."""
    shares = {i: 0 for i, _ in workers}
    heap = [(t, position, i, t) for position, (i, t) in enumerate(workers)]
    heapq.heapify(heap)
    for _ in range(num_tasks):
        finish, position, i, t = heapq.heappop(heap)
        shares[i] += 1
        heapq.heappush(heap, (finish + t, position, i, t))
    return shares
