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
Shares count relative to the largest local instance of the decision (a remote machine's size is
unknown): two instances pinned to half the machine each are each a reference.
When no node has data, times are in units of one task on a reference CPU node
(``time_unit == "tasks"``), else in seconds.

All the numbers live in :class:`CostPriors`; :meth:`ParallelismCostModel.observe` moves them toward
what finished runs measured.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeGuard

from . import _allocation, _nodefields, calibration
from ._allocation import Allocation, BatchingCurve, Contention, SlotInstance
from ._errors import CalibrationError, InvalidNodeAddress
from .calibration import MIN_CONTENTION as _MIN_CONTENTION
from .calibration import Calibration
from .colocation import UNIT_STRENGTH, ColocationFacts
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
            on one core and it ran 3% slower. Calibration also stops measuring an instance's
            batching curve once sending twice as many requests at once raises its throughput
            by no more than this.
        cpu_batch_cost: the cost of each extra concurrent request on a CPU instance whose
            slots are known (topology file, node object, process) but whose batching curve is
            not yet measured, as a fraction of one task alone (0.35: 4 at once take 2.05x one).
            CPU decode is memory-bandwidth bound, so batching pays, but each sequence adds
            matrix work and a CPU has little compute headroom; public figures range from
            sequences nearly free (llama.cpp issue 4064: 4, 8 and 16 tokens/s at batch 1, 2
            and 4 on an x86 CPU) to no gain at all on a phone. An estimate between the two, on
            the cautious side of the x86 figure.
        gpu_batch_cost: the same for a GPU instance (0.15: 4 at once take 1.45x one). From
            ``llama-batched-bench`` in llama.cpp pull request 16894 (7B Q8_0, GPU offload):
            32 tokens take 0.405 s, 0.469 s and 0.570 s at batch 1, 2 and 4 (ratios 1.16 and
            1.41; 1.20 and 1.53 with a 4096-token prompt). Prompt-heavy tasks batch worse.
    """

    cpu_contention: float = 1.0
    gpu_contention: float = 0.25
    same_host_overhead: float = 0.075
    dispatch_overhead: float = 0.05
    gpu_speed_factor: float = 4.0
    min_samples: int = 3
    min_concurrency_gain: float = 0.05
    cpu_batch_cost: float = _allocation.CPU_BATCH_COST
    gpu_batch_cost: float = _allocation.GPU_BATCH_COST


@dataclass(frozen=True, slots=True)
class Batching:
    """How one instance serves concurrent requests, as the model plans it.

    Attributes:
        slots: requests it serves at once.
        slots_source: where ``slots`` came from (a ``HostIdentity.facts`` source:
            ``"topology file"``, ``"measured"``, ``"process"``, ``"node"``, ``"prior"``).
        curve: its batching curve (:meth:`BatchingCurve.none` with one slot).
        curve_source: ``"measured"`` (calibration's points), ``"prior"`` (the priors' cost per
            extra request: slots known, curve not measured) or ``"none"`` (one slot).
    """

    slots: int
    slots_source: str
    curve: BatchingCurve
    curve_source: str

    def describe(self) -> str | dict[str, float]:
        """``"prior"``, ``"none"``, or the measured points as ``{"k": ratio}`` (JSON-ready)."""
        if self.curve_source != "measured":
            return self.curve_source
        return {str(k): round(r, 4) for k, r in self.curve.points}


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
        # The file the calibration is in step with (saves to it merge), else None.
        self._synced: Path | None = None
        self._kept: deque[_Pending] = deque(maxlen=_KEPT_RUNS)
        self._optimistic = threading.local()

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
                self._synced = Path(path)  # in step with an empty file: all it will get is new
                path = fallback if fallback is not None and Path(fallback).exists() else None
                if path is not None:
                    self._synced = None  # the fallback's samples are not in the journal
            if path is None:
                return
            try:
                self._install(calibration.read(path), Path(path))
                if path == self.config.calibration_file:
                    self._synced = Path(path)
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

    def colocation_facts(self) -> ColocationFacts:
        """The measured co-location the calibration holds (loading the file on first use); the
        planner gives this to its topology, so both read one calibration."""
        return self.calibration.colocation

    def update_colocation(self, facts: ColocationFacts) -> bool:
        """Merge ``facts`` into the calibration's co-location (the newer measurement of a pair
        wins); returns whether anything changed (then :attr:`version` changes too)."""
        with self._lock:
            self._ensure_loaded()
            merged = self._cal.colocation.merge(facts)
            if merged == self._cal.colocation:
                return False
            self._cal.colocation = merged
            self._version += 1
            return True

    def colocation_strength(self, unit: ExecutionUnit) -> float | None:
        """For a measured unit, the slowdown ``s`` of two of its nodes together (the median of
        its measured pairs' strengths), else ``None``."""
        if unit.measured is None:
            return None
        facts = self.calibration.colocation
        group = next((g for g in facts.units() if unit.measured in g), None)
        if group is None:
            return None
        strengths = [f.strength for f in facts.pairs.values()
                     if f.colocated and f.a in group and f.b in group and f.strength is not None
                     and f.strength >= UNIT_STRENGTH]
        return statistics.median(strengths) if strengths else None

    def contention(self, unit: ExecutionUnit, k: int, *, trial: _Trial | None = None) -> float:
        """``c`` for ``k`` concurrent nodes on ``unit``: measured if known (nearest measured
        ``k``); for a measured co-located unit without its own contention, ``s / 2 - 1`` from
        the pair's measured slowdown ``s`` (two together each take ``s`` times as long:
        ``2 * (1 + c) = s``); else the CPU or GPU prior. ``trial`` (learning only) stands a
        candidate value in for one stream count of one unit, as if it had been measured."""
        # A copy: observe() may add a stream count from another thread while this one decides.
        by_k: dict[int, Any] = dict(self._learned().contention.get(unit.label) or {})
        if trial is not None and trial.kind == "contention" and trial.key == unit.label:
            by_k[trial.k] = (trial.value,)
        if by_k:
            nearest = min(by_k, key=lambda known: (abs(known - k), -known))
            value = _median(by_k[nearest])
            if value is not None:
                return value
        strength = self.colocation_strength(unit)
        if strength is not None:
            return max(_MIN_CONTENTION, strength / 2.0 - 1.0)
        return self.priors.gpu_contention if unit.is_gpu else self.priors.cpu_contention

    def gains_from_concurrency(self, unit: ExecutionUnit) -> int:
        """The largest measured number of concurrent nodes that made ``unit`` faster (1 if none)
        by more than noise: their contention must be at most ``-priors.min_concurrency_gain``."""
        by_k = dict(self._learned().contention.get(unit.label) or {})  # a copy, as above
        best = 1
        margin = self.priors.min_concurrency_gain
        if not by_k and unit.measured is not None:
            # A measured co-located unit whose nodes slow each other by less than two nodes of
            # one CPU would (two VMs that share memory bandwidth, not cores): running them
            # together still gains, by as much as their measured slowdown says.
            strength = self.colocation_strength(unit)
            if strength is not None and strength / 2.0 - 1.0 <= -margin:
                group = next((g for g in self.calibration.colocation.units()
                              if unit.measured in g), ())
                return max(2, len(group))
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

    def known_task_seconds(self, identity: HostIdentity) -> float | None:
        """The time of one task alone on ``identity`` as far as anything measured says: its own
        unit's measured time per task (a node of a measured unit keeps its own speed), else its
        measured unit's; else, for an instance seen only in batches (``k`` tasks at once, never
        one alone), the batch's time over the prior curve's ratio at ``k`` (the largest ``k``
        seen), so that what it does at that ``k`` is predicted as measured; else ``None``."""
        seconds = self.measured_task_seconds(identity.own_unit)
        if seconds is None and identity.unit.measured is not None:
            seconds = self.measured_task_seconds(identity.unit)
        if seconds is None:
            seconds = self._seconds_from_batches(identity)
        return seconds

    def _seconds_from_batches(self, identity: HostIdentity) -> float | None:
        windows = self._learned().batching.get(identity.instance.label)
        if not windows:
            return None
        by_k = dict(windows)
        alone = _median(by_k.get(1))
        if alone is not None:
            return alone
        ks = [k for k in by_k if k >= 2 and _median(by_k[k]) is not None]
        if not ks:
            return None
        k = max(ks)
        wall = _median(by_k[k])
        assert wall is not None
        return wall / self._prior_curve(identity).ratio(k)

    def _prior_curve(self, identity: HostIdentity) -> BatchingCurve:
        """The priors' batching curve for ``identity``'s instance (CPU or GPU cost)."""
        return _allocation.prior_curve(identity.unit.is_gpu,
                                       cpu_cost=max(0.0, self.priors.cpu_batch_cost),
                                       gpu_cost=max(0.0, self.priors.gpu_batch_cost))

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
            seconds: float | None = self.known_task_seconds(identity)
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
        # Shares are relative to the largest local instance given (an unpinned one is the whole
        # machine): how big a remote machine is, nothing here says, so two instances pinned to
        # half of this machine each are as fast as a remote node without data, and a quarter
        # beside a half is half as fast.
        shares = [i.cpu_share or 1.0 for _, i, _, u, s, _ in raw
                  if i.is_local and s is None and not u.is_gpu]
        top = max(shares) if shares else 1.0
        for index, identity, instance, unit, known_seconds, source in raw:
            task_time = known_seconds
            if task_time is None:
                task_time = reference / priors.gpu_speed_factor if unit.is_gpu else reference
                share = identity.cpu_share
                if share is not None and share > 0 and not unit.is_gpu:
                    task_time /= share / top  # pinned to part of this machine: its share
            result.append(NodeProfile(index, identity, instance, unit, task_time, source))
        return result, time_unit

    # -- prediction -------------------------------------------------------------------------

    def sequential_makespan(self, num_tasks: int, profiles: Sequence[NodeProfile]) -> float:
        if not profiles or num_tasks <= 0:
            return 0.0
        return num_tasks * min(p.task_time for p in profiles)

    # -- slots and contention, as the allocation engine takes them -------------------------

    def measured_batching(self, identity: HostIdentity) -> dict[int, float]:
        """``k -> ratio`` calibration measured for ``identity``'s instance (``k >= 2``; empty
        when nothing is measured): the median wall time of ``k`` requests sent together over
        the median of one alone, both from the instance's ``batching`` windows (one alone: the
        unit's time per task when the instance has no window of its own)."""
        windows = self._learned().batching.get(identity.instance.label)
        if not windows:
            return {}
        by_k = dict(windows)  # a copy: observe() may add a point from another thread
        solo = _median(by_k.get(1))
        if solo is None:
            solo = self.measured_task_seconds(identity.unit)
        if solo is None:  # seen only in batches: the prior curve's ratio at its largest k
            solo = self._seconds_from_batches(identity)
        if solo is None or solo <= 0:
            return {}
        result = {}
        for k, window in by_k.items():
            wall = _median(window)
            if k >= 2 and wall is not None:
                result[k] = max(wall / solo, 1e-9)
        return result

    def measured_slots(self, identity: HostIdentity) -> int | None:
        """The slot count calibration measured for ``identity``'s instance: the largest ``k`` whose
        throughput (``k / ratio(k)``) rose by more than ``priors.min_concurrency_gain`` over
        every smaller ``k`` measured (1 when sending several at once gained nothing), or
        ``None`` when no curve is measured."""
        points = self.measured_batching(identity)
        return self._slots_from(points) if points else None

    def _slots_from(self, points: dict[int, float]) -> int:
        margin = self.priors.min_concurrency_gain
        best_k, best_rate = 1, 1.0
        for k in sorted(points):
            rate = k / points[k]
            if rate > best_rate * (1.0 + margin):
                best_k, best_rate = k, rate
        return best_k

    @contextlib.contextmanager
    def optimistic_batching(self) -> Iterator[None]:
        """While inside (this thread only), an instance whose batching curve is not measured
        is planned as if batching were free (``k`` tasks at once take one task's time): the
        most it could gain. A run that plans so sends such an instance as many tasks at once
        as it might serve well, and so measures its curve (see
        :meth:`ExecutionPlanner.run`)."""
        self._optimistic.on = True
        try:
            yield
        finally:
            self._optimistic.on = False

    def batching(self, identity: HostIdentity) -> Batching:
        """The slots and batching curve the model plans ``identity``'s instance with.

        Slots, most trusted first: the topology file, calibration (:meth:`measured_slots`),
        then what the identity carries (the local process, the node object, the prior of one).
        The curve: calibration's points when measured, else, for an instance with more than
        one slot, the prior cost per extra request (``priors.cpu_batch_cost`` or
        ``gpu_batch_cost``), so that declared slots change the plan before any calibration.
        """
        source = identity.facts.get("slots", "prior")
        slots = identity.slots
        points = (self.measured_batching(identity)
                  if self._learned().batching else {})  # (the common case: none measured)
        if points and source != "topology file":
            slots, source = self._slots_from(points), "measured"
        if slots <= 1:
            return _ONE_SLOT.get(source) or Batching(1, source, BatchingCurve.none(), "none")
        if points:
            return Batching(slots, source, BatchingCurve.measured(points), "measured")
        if getattr(self._optimistic, "on", False):
            return Batching(slots, source, BatchingCurve.prior(0.0), "prior")
        return Batching(slots, source, self._prior_curve(identity), "prior")

    def slot_instance(self, profile: NodeProfile) -> SlotInstance:
        """``profile`` as the allocation engine sees it (keyed by its instance label)."""
        # A profile built by hand may carry no identity: one slot, as before slots existed.
        identity: HostIdentity | None = profile.identity
        batching = (self.batching(identity) if identity is not None
                    else Batching(1, "prior", BatchingCurve.none(), "none"))
        unit = profile.unit
        return SlotInstance(profile.instance.label, unit.label, unit.host, profile.task_time,
                            batching.slots, batching.curve, unit.is_gpu)

    def contention_table(self, profiles: Iterable[NodeProfile], *,
                         trial: _Trial | None = None) -> Contention:
        """The contention figures for the units and hosts of ``profiles``: the priors, with
        what calibration measured in their place (``trial`` stands a candidate value in for one
        figure, as :meth:`contention` does)."""
        priors = self.priors
        profiles = list(profiles)
        units = {p.unit for p in profiles}
        measured: dict[str, dict[int, float]] = {}
        host_measured: dict[str, float] = {}
        streams: dict[str, int] = {}
        margin = 0.0
        cal = self._learned()
        between = self.interference(profiles)
        interfering = {label for pair in between for label in pair}
        for unit in units:  # a measured co-located unit: its pairs' slowdown, unless measured
            strength = self.colocation_strength(unit)
            if strength is not None and not cal.contention.get(unit.label):
                measured[unit.label] = {2: max(_MIN_CONTENTION, strength / 2.0 - 1.0)}
                gains = self.gains_from_concurrency(unit)
                if unit.label in interfering:
                    # Its nodes time-share it at no gain alone, but the interference of a busy
                    # neighbour is paid per task, not per stream (_allocation._factors_between):
                    # every node of it is a candidate, and the search weighs one stream per
                    # unit against all of them, trusting a gain above noise only.
                    members = len(distinct_instances(q for q in profiles if q.unit == unit))
                    if members > gains:
                        gains, margin = members, priors.min_concurrency_gain
                if gains > 1:
                    streams[unit.label] = gains
        for unit in units if cal.contention or trial is not None else ():
            by_k = dict(cal.contention.get(unit.label) or {})
            table = {k: v for k, v in ((k, _median(w)) for k, w in by_k.items())
                     if v is not None}
            if trial is not None and trial.kind == "contention" and trial.key == unit.label:
                table[trial.k] = trial.value
            if table:
                measured[unit.label] = table
            gains = self.gains_from_concurrency(unit)
            if gains > 1:
                streams[unit.label] = gains
        for host in {u.host for u in units} if cal.host_overhead or trial is not None else ():
            value = self.host_overhead(host, trial=trial)
            if value != priors.same_host_overhead:
                host_measured[host] = value
        return Contention(priors.cpu_contention, priors.gpu_contention,
                          priors.same_host_overhead, self.dispatch_overhead(), measured,
                          host_measured, streams, between, margin)

    def interference(self, profiles: Iterable[NodeProfile]) -> dict[frozenset[str], float]:
        """Measured interference between the separate units of ``profiles``: per pair of unit
        labels, ``s - 1`` for the median slowdown ``s`` of their instances' measured pairs that
        are not one unit (weaker than :data:`~sollol_locality.colocation.UNIT_STRENGTH`);
        pairs with no measured slowdown are left to the same-host and dispatch overheads."""
        facts = self.calibration.colocation
        if not facts.pairs:
            return {}
        unit_of = {p.instance.label: p.unit.label for p in profiles}
        samples: dict[frozenset[str], list[float]] = {}
        for fact in facts.pairs.values():
            if fact.strength is None or (fact.colocated and fact.strength >= UNIT_STRENGTH):
                continue
            a, b = unit_of.get(fact.a), unit_of.get(fact.b)
            if a is None or b is None or a == b:
                continue
            samples.setdefault(frozenset((a, b)), []).append(fact.strength)
        return {pair: max(0.0, statistics.median(values) - 1.0)
                for pair, values in samples.items()}

    def allocation_across(self, num_tasks: int, profiles: Sequence[NodeProfile]
                          ) -> Allocation:
        """The engine's allocation of ``num_tasks`` across exactly the distinct instances of
        ``profiles`` (every one may get tasks), against sequential on the fastest."""
        distinct = distinct_instances(profiles)
        return _allocation.allocate_across(num_tasks, [self.slot_instance(p) for p in distinct],
                                           self.contention_table(distinct))

    def parallel_makespan(self, num_tasks: int, profiles: Sequence[NodeProfile]
                          ) -> tuple[float, list[int]]:
        """Makespan of running the tasks concurrently across ``profiles`` and the tasks each
        profile gets (aliases of one instance: the first listed).

        Tasks are balanced by speed (each goes to the node that would finish it first, given the
        contention of the nodes working and the batching of each node's slots), then the run is
        simulated as nodes finish: while ``k`` streams of a unit are busy each runs at
        ``1 / (k * (1 + c))`` of its solo speed, and a stream left alone speeds back up. The
        cost does not depend on ``num_tasks`` (:func:`~sollol_locality._allocation.
        allocate_across`).
        """
        count = len(profiles)
        if count == 0 or num_tasks <= 0:
            return 0.0, [0] * count
        allocation = self.allocation_across(num_tasks, profiles)
        tasks = allocation.tasks_per_instance
        shares = [0] * count
        seen: set[Instance] = set()
        for i, profile in enumerate(profiles):
            if profile.instance not in seen:
                seen.add(profile.instance)
                shares[i] = tasks.get(profile.instance.label, 0)
        return allocation.makespan, shares

    def dispatch_all_makespan(self, num_tasks: int, profiles: Sequence[NodeProfile]) -> float:
        """Makespan of dispatching to every node at once, as "parallel whenever two nodes are
        healthy" does: the first ``num_tasks`` distinct instances (in the order given) start one
        task each, and whenever a node finishes a task it takes the next one left, however slow
        it is. Contention is modelled as in :meth:`parallel_makespan`; unlike it, no node is
        spared, so a node many times slower than the rest still holds up the batch. Computed in
        closed form (:func:`~sollol_locality._allocation.dispatch_all`)."""
        distinct = distinct_instances(profiles)
        if not distinct or num_tasks <= 0:
            return 0.0
        instances = [self.slot_instance(p) for p in distinct]
        return _allocation.dispatch_all(num_tasks, instances, self.contention_table(distinct))

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
        if num_tasks >= 2 and any(self.batching(p.identity).slots > 1 for p in used
                                  if p.identity is not None):
            allocation = self.allocation_across(num_tasks, profiles)
            if any(a.concurrency > 1 for a in allocation.assignments):
                names = {p.instance.label: p.identity.address.url for p in profiles}
                reason = _allocation.describe_allocation(allocation, names)
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
                identities: Sequence[HostIdentity] | None = None,
                timings: Sequence[tuple[HostIdentity, float, float]] | None = None,
                as_planned: bool = True) -> None:
        """Learn from a finished run: ``num_tasks`` tasks took ``wall_seconds`` on ``nodes``.

        ``timings``, when given, is one ``(identity, start_s, end_s)`` per task (seconds from
        the batch's start): the model then learns from the per-task times themselves. Per
        execution unit, a task no other task of its unit overlapped ran alone: the median of
        those tasks' durations is a sample of the unit's time per task (tasks of other units
        of its machine running meanwhile are counted in it: the same-host overhead). A task
        that overlapped tasks of other instances of its unit (one task each at a time) teaches
        the unit's contention: the model runs each of ``k`` busy instances at
        ``1 / (k * (1 + c))`` of its solo speed, so a task of solo time ``s`` that ran while
        ``k(t)`` instances were busy had ``integral(dt / k(t)) = s * (1 + c)``; the ``c`` this
        gives is filed under the ``k`` that lasted longest. Tasks sent to one instance together
        and served together, while no other instance was busy, are a point of its batching
        curve (:meth:`_learn_batches`); an instance seen only in batches gets its time per task
        from them (:meth:`known_task_seconds`). A parallel run some of whose nodes have no time
        per task yet teaches its overheads once they have one (the latest four are kept). With
        ``as_planned`` (the run went as its plan said: same nodes, same shares) the wall time
        then teaches what per-task times cannot (same-host and dispatch overheads); without it
        (a node failed, tasks were retried elsewhere) only the per-task times are used.

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
            if timings is not None:
                self._learn_timings(timings)
                if as_planned:
                    ran = _ran(timings)
                    run = _Pending(mode, tuple(identities), num_tasks, float(wall_seconds),
                                   True, ran)
                    self._learn_or_keep(run)
            else:
                self._learn_or_keep(_Pending(mode, tuple(identities), num_tasks,
                                             float(wall_seconds), False, None))
            self._replay()
            self._cal.observations += 1
            if self._synced is None:  # no file to merge into: nothing to keep a journal for
                self._cal.synced()
            self._version += 1

    def _learn_or_keep(self, run: _Pending) -> None:
        """Learn from ``run``; a parallel run some of whose nodes have no time per task yet is
        kept (the latest :data:`_KEPT_RUNS`) and learned from once they have one."""
        if self._learn(run.mode, list(run.identities), run.num_tasks, run.wall,
                       overheads_only=run.overheads_only, ran=run.ran) == "no solo time":
            self._kept.append(run)

    def _replay(self) -> None:
        """Learn from the kept runs whose nodes all have a time per task now."""
        for run in list(self._kept):
            if all(self.known_task_seconds(i) is not None for i in run.identities):
                self._kept.remove(run)
                self._learn(run.mode, list(run.identities), run.num_tasks, run.wall,
                            overheads_only=run.overheads_only, ran=run.ran)

    def _learn_timings(self, timings: Sequence[tuple[HostIdentity, float, float]]) -> None:
        """Solo times, batching points and contention from per-task times (see
        :meth:`observe`)."""
        cal = self._cal
        by_unit: dict[ExecutionUnit, list[tuple[HostIdentity, float, float]]] = {}
        for identity, start, end in timings:
            by_unit.setdefault(identity.unit, []).append((identity, float(start), float(end)))
        self._learn_batches(timings)
        solo: dict[str, list[float]] = {}
        for entries in by_unit.values():
            for position, (identity, start, end) in enumerate(entries):
                alone = all(not (s < end and e > start)
                            for j, (_, s, e) in enumerate(entries) if j != position)
                if alone and end > start:
                    solo.setdefault(identity.unit.label, []).append(end - start)
        for label, durations in solo.items():
            cal.push(cal.task_seconds, label, statistics.median(durations))
            logger.debug("calibration: %s takes %.3fs per task (%d solo task(s) of a run)",
                         label, statistics.median(durations), len(durations))
        contention: dict[tuple[str, int], list[float]] = {}
        for unit, entries in by_unit.items():
            for identity, start, end in entries:
                seconds = self.known_task_seconds(identity)
                if seconds is None or end <= start:
                    continue
                others = [(i, s, e) for i, s, e in entries
                          if s < end and e > start
                          and (s, e, i.instance) != (start, end, identity.instance)]
                if not others:
                    continue
                fitted = _contention_of(identity, start, end, others, seconds)
                if fitted is not None:
                    contention.setdefault((unit.label, fitted[0]), []).append(fitted[1])
        for (label, k), values in contention.items():
            c = max(_MIN_CONTENTION, statistics.median(values))
            cal.push_k(cal.contention, label, k, c)
            logger.debug("calibration: %s with %d streams: contention %.3f (from task times)",
                         label, k, c)

    def _learn_batches(self, timings: Sequence[tuple[HostIdentity, float, float]]) -> None:
        """Points of batching curves from a run over several instances: ``k >= 2`` tasks sent
        to one instance together (started within a tenth of their time of each other) and
        served together (the first done took at least :data:`SERVED_TOGETHER` of the last
        one's time) while no other instance was busy for more than a fifth of it (whatever
        slowed the batch from outside is not its curve), took the batch's wall time. A run on
        one instance is learned from its wall time (:meth:`_learn`)."""
        by_instance: dict[Instance, list[tuple[HostIdentity, float, float]]] = {}
        for identity, start, end in timings:
            by_instance.setdefault(identity.instance, []).append((identity, start, end))
        if len(by_instance) < 2:
            return
        for instance, entries in by_instance.items():
            others = [(s, e) for i, s, e in timings if i.instance != instance and e > s]
            for batch in _batches_of(entries):
                k = len(batch)
                first = min(s for _, s, _ in batch)
                last = max(e for _, _, e in batch)
                wall = last - first
                if wall <= 0 or served_in_turn([e - s for _, s, e in batch]):
                    continue
                outside = sum(max(0.0, min(e, last) - max(s, first)) for s, e in others)
                if outside > 0.2 * wall:
                    continue
                identity = batch[0][0]
                if k > self.batching(identity).slots and self.measured_batching(identity):
                    continue  # more than its measured slots at once: not a point of the curve
                self._cal.push_k(self._cal.batching, instance.label, k, wall)
                logger.debug("calibration: %s ran %d at once in %.3fs (from task times)",
                             instance.label, k, wall)

    def _learn(self, mode: str, identities: list[HostIdentity], num_tasks: int,
               wall: float, *, overheads_only: bool = False,
               ran: Mapping[Instance, tuple[int, int]] | None = None) -> str | None:
        """Move the calibration toward one finished run.

        Every figure is learned the same way: it is the value at which the model, simulating
        the run it was told about (same nodes, same task count, the other figures as they
        are), predicts exactly the measured wall time. So a run of 3 tasks on 2 nodes of one
        unit, where the third task runs alone at full speed, teaches the same contention as a
        run of 2 tasks would, and the figures stay consistent with how the model predicts.
        ``ran``: per instance, the tasks it ran and the most at once (from per-task times).

        Returns ``"no solo time"`` when a parallel run's node has no time per task yet (then
        nothing is learned; :meth:`_learn_or_keep` keeps the run for later), else ``None``.
        """
        cal = self._cal
        if mode == "parallel" and len({i.instance for i in identities}) == 1:
            if ran is not None and max((c for _, c in ran.values()), default=1) < 2:
                return None  # one instance, one task at a time: nothing ran concurrently
            identity = identities[0]
            slots = self.batching(identity).slots
            if slots > 1:  # the tasks were batched on one instance: a point of its curve
                label = identity.instance.label
                if 2 <= num_tasks <= slots:
                    cal.push_k(cal.batching, label, num_tasks, wall)
                    logger.debug("calibration: %s ran %d at once in %.3fs", label, num_tasks,
                                 wall)
                else:
                    logger.debug("calibration: %d tasks on %s (%d slots) ran in rounds; not "
                                 "used", num_tasks, label, slots)
                return None
        if mode == "sequential" or len(identities) == 1:
            if overheads_only:  # the per-task times taught the unit's time per task
                return None
            unit = identities[0].own_unit  # a node's own speed, also inside a measured unit
            cal.push(cal.task_seconds, unit.label, wall / num_tasks)
            logger.debug("calibration: %s takes %.3fs per task", unit.label,
                         wall / num_tasks)
            return None
        distinct: dict[Instance, HostIdentity] = {}
        for identity in identities:
            distinct.setdefault(identity.instance, identity)
        members = list(distinct.values())
        units = {m.unit for m in members}
        hosts = {m.unit.host for m in members}
        k = len(members)
        solo: list[float] = []
        for member in members:  # each node's own solo time (a measured unit's nodes too)
            seconds = self.known_task_seconds(member)
            if seconds is None:
                logger.debug("calibration: no solo time for %s yet; parallel run kept until "
                             "it has one", member.own_unit.label)
                return "no solo time"
            solo.append(seconds)
        profiles = [NodeProfile(i, m, m.instance, m.unit, solo[i], "calibration")
                    for i, m in enumerate(members)]
        instances = [self.slot_instance(p) for p in profiles]
        plan: dict[str, tuple[int, int]]
        if ran is not None:  # the tasks each instance really ran, and how many at once
            plan = {inst.key: _within(ran.get(m.instance, (0, 1)), inst.slots)
                    for inst, m in zip(instances, members, strict=True)}
        elif num_tasks <= k:  # one task each on the first nodes, as such a run is dispatched
            plan = {inst.key: (int(i < num_tasks), 1) for i, inst in enumerate(instances)}
        else:  # as the model would have planned it (a bounded search, whatever num_tasks)
            plan = _allocation.allocate_across(num_tasks, instances,
                                               self.contention_table(profiles)).by_instance
        streams = sum(1 for n, _ in plan.values() if n > 0)
        if streams < 2:  # one node did everything: nothing ran concurrently
            return None

        def simulated(trial: _Trial | None = None) -> float:
            contention = replace(self.contention_table(profiles, trial=trial), dispatch=0.0)
            return _allocation.predict(instances, plan, contention)

        if len(units) == 1:
            if overheads_only:  # the per-task times taught the unit's contention
                return None
            label = next(iter(units)).label
            c = _fit(lambda x: simulated(_Trial("contention", label, streams, x)), wall,
                     low=_MIN_CONTENTION)
            if c is not None:
                cal.push_k(cal.contention, label, streams, c)
                logger.debug("calibration: %s with %d streams: contention %.3f", label,
                             streams, c)
            return None
        if len(hosts) == 1 and len(units) == k:
            host = next(iter(hosts))
            overhead = _fit(lambda x: simulated(_Trial("host", host, 0, x)), wall, low=0.0)
            if overhead is not None:
                cal.push(cal.host_overhead, host, overhead)
                logger.debug("calibration: %d units of %s: same-host overhead %.3f", streams,
                             host, overhead)
            return None
        if len(units) == k and len(hosts) == k:
            ideal = simulated()
            if ideal > 0:
                cal.push_dispatch(max(0.0, wall / ideal - 1.0))
        return None

    def observe_batching(self, identity: HostIdentity, k: int, wall_seconds: float) -> None:
        """Learn one point of an instance's batching curve: ``k`` requests sent to it together
        took ``wall_seconds`` (``k = 1``: one alone, the curve's reference).

        Raises:
            ValueError: ``k`` below 1 or a non-positive time.
        """
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if not _is_number(wall_seconds) or wall_seconds <= 0:
            raise ValueError(f"wall_seconds must be a positive number, got {wall_seconds!r}")
        with self._lock:
            self._ensure_loaded()
            self._cal.push_k(self._cal.batching, identity.instance.label, k, float(wall_seconds))
            self._version += 1

    def _forget(self, *, units: Iterable[str] = (), hosts: Iterable[str] = (),
                dispatch: bool = False, instances: Iterable[str] = ()) -> None:
        """Drop what was learned about these units (time per task, contention) and hosts
        (same-host overhead), the dispatch overhead when ``dispatch``, and the batching curves
        of these instances: a calibration run about to measure them again replaces them
        instead of mixing old samples in."""
        with self._lock:
            self._ensure_loaded()
            self._cal.forget(units=units, hosts=hosts, dispatch=dispatch, instances=instances)
            self._version += 1

    # -- persistence (the file format is :mod:`sollol_locality.calibration`'s) -------------

    def to_dict(self) -> dict[str, Any]:
        """The calibration as plain JSON-able data."""
        with self._lock:
            return calibration.to_dict(self.calibration, asdict(self.priors))

    @property
    def synced_path(self) -> Path | None:
        """The file this model's calibration is in step with (a save there merges), if any."""
        self._ensure_loaded()
        return self._synced

    @property
    def unsaved(self) -> bool:
        """Whether the model learned something since it last read or saved its file."""
        cal = self.calibration
        return bool(cal.journal) or cal.observations != cal.synced_observations

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the calibration as JSON, atomically (temporary file, then rename).

        ``path`` defaults to ``config.calibration_file``. Saving to the file the model read
        (its configured file, or the one :meth:`load` read, or the one it last saved to) merges
        under the file's lock: what the model learned since then is added to what the file
        holds now, so what another process saved meanwhile is kept, and the model goes on from
        the merged calibration (:func:`sollol_locality.calibration.write_merged`). Saving
        anywhere else writes the model's calibration as it is.

        Raises:
            CalibrationError: no path, or the file to merge into is not a calibration file
                (it is left as it is).
        """
        target = path if path is not None else self.config.calibration_file
        if target is None:
            raise CalibrationError("no calibration file configured and no path given")
        with self._lock:
            self._ensure_loaded()
            where = Path(target)
            if self._synced is not None and _same_file(where, self._synced):
                self._cal = calibration.write_merged(where, self._cal, asdict(self.priors))
                self._version += 1
            else:
                calibration.write(where, self._cal, asdict(self.priors))
                self._cal.synced()
            self._synced = where
            return where

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
            self._synced = Path(path)

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
SERVED_TOGETHER: Final = 0.75
"""Requests sent to one instance together were served together (batched) when the first to
finish took at least this fraction of the last one's time: a batch finishes together (within
arrival jitter), a queue one request after another (the first at about half the last's time for
two). Below it they were served in turn: the instance has fewer slots than were sent."""

def served_in_turn(times: Sequence[float]) -> bool:
    """Whether requests sent to one instance at once (each one's own time) were answered one
    after another rather than together (:data:`SERVED_TOGETHER`)."""
    done = [t for t in times if t > 0]
    return len(done) >= 2 and min(done) < SERVED_TOGETHER * max(done)


_KEPT_RUNS: Final = 4  # parallel runs kept until their nodes have a time per task


@dataclass(frozen=True, slots=True)
class _Pending:
    """A finished run, as :meth:`ParallelismCostModel._learn` takes it."""

    mode: str
    identities: tuple[HostIdentity, ...]
    num_tasks: int
    wall: float
    overheads_only: bool
    ran: Mapping[Instance, tuple[int, int]] | None


def _ran(timings: Sequence[tuple[HostIdentity, float, float]]
         ) -> dict[Instance, tuple[int, int]]:
    """Per instance, the tasks it ran and the most it ran at once."""
    spans: dict[Instance, list[tuple[float, float]]] = {}
    for identity, start, end in timings:
        spans.setdefault(identity.instance, []).append((float(start), float(end)))
    result: dict[Instance, tuple[int, int]] = {}
    for instance, items in spans.items():
        events = sorted([(s, 1) for s, e in items if e > s] + [(e, -1) for s, e in items if e > s])
        busy = most = 0
        for _, step in events:  # an end before a start at the same instant
            busy += step
            most = max(most, busy)
        result[instance] = (len(items), max(1, most))
    return result


def _within(ran: tuple[int, int], slots: int) -> tuple[int, int]:
    tasks, at_once = ran
    return tasks, max(1, min(at_once, slots, max(1, tasks)))


def _batches_of(entries: Sequence[tuple[HostIdentity, float, float]]
                ) -> list[list[tuple[HostIdentity, float, float]]]:
    """Tasks of one instance sent together: each group starts with a task, and takes every
    later task that started within a tenth of that task's time of it (groups of two or more)."""
    ordered = sorted((e for e in entries if e[2] > e[1]), key=lambda e: e[1])
    groups: list[list[tuple[HostIdentity, float, float]]] = []
    for entry in ordered:
        head = groups[-1][0] if groups else None
        if head is not None and entry[1] - head[1] <= 0.1 * (head[2] - head[1]):
            groups[-1].append(entry)
        else:
            groups.append([entry])
    return [g for g in groups if len(g) >= 2]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a == b or a.resolve() == b.resolve()
    except OSError:
        return False


def _contention_of(identity: HostIdentity, start: float, end: float,
                   others: Sequence[tuple[HostIdentity, float, float]],
                   solo: float) -> tuple[int, float] | None:
    """``(k, c)`` for a task on ``identity`` from ``start`` to ``end`` that overlapped
    ``others`` (tasks of other instances of its unit): ``k`` the number of instances busy for
    the longest part of it, ``c = integral(dt / k(t)) / solo - 1``. ``None`` when it shared its
    own instance with another task (batching, not contention between instances)."""
    if any(i.instance == identity.instance for i, _, _ in others):
        return None
    cuts = sorted({start, end, *(min(max(t, start), end) for _, s, e in others
                                 for t in (s, e))})
    integral = 0.0
    time_at: dict[int, float] = {}
    for left, right in zip(cuts, cuts[1:], strict=False):
        if right <= left:
            continue
        middle = (left + right) / 2
        busy = 1 + len({i.instance for i, s, e in others if s <= middle < e})
        integral += (right - left) / busy
        time_at[busy] = time_at.get(busy, 0.0) + (right - left)
    k = max(time_at, key=lambda busy: (time_at[busy], busy)) if time_at else 1
    if k < 2:
        return None
    return k, integral / solo - 1.0


_ONE_SLOT: Final = {source: Batching(1, source, BatchingCurve.none(), "none")
                    for source in ("prior", "node", "process", "topology file", "measured")}


def distinct_instances(profiles: Iterable[NodeProfile]) -> list[NodeProfile]:
    """The first profile of each instance (aliases of one instance are one server)."""
    seen: set[Instance] = set()
    result = []
    for profile in profiles:
        if profile.instance not in seen:
            seen.add(profile.instance)
            result.append(profile)
    return result
