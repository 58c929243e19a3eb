"""The execution decision: parallel or sequential, and on which nodes.

:meth:`ExecutionPlanner.plan` compares running the batch one after another on the fastest node with
the best allocation of its tasks to (instance, concurrency) that the allocation engine
(:mod:`sollol_locality._allocation`) finds: one node per execution unit (best units first, adding
units only while they shorten the predicted makespan), several tasks at once on a node whose
instance batches them (its slots: ``OLLAMA_NUM_PARALLEL``), or both. A parallel plan may be one
node. It picks parallel only when the predicted speedup exceeds ``LocalityConfig.min_speedup``; the
cost of the decision does not depend on the task count. Forced modes (``LocalityConfig.mode``) win
over the model and say so. A node that cannot be parsed is left out with a warning that names it;
every node given comes back in the plan, either in ``hosts`` (grouped by machine) or in
``excluded``.

Decisions are cached for one second per (task count, node set, node metrics and slots,
calibration, nodes in back-off) so that a warm decision costs microseconds; the cache never
changes an answer the inputs would change.

Before the model decides, two kinds of candidates are left out (each listed in ``excluded`` with
its reason, named in ``warnings`` and in ``reason``): a node in back-off after a failed call
(:attr:`ExecutionPlanner.health`; when every candidate is, the plan goes over all of them with a
warning), and, unless ``LocalityConfig.use_unresolved``, a node whose name did not resolve while
a resolved node is available.

:meth:`ExecutionPlanner.run` runs a batch as its plan says (:func:`~sollol_locality._dispatch.
dispatch`: per-node concurrency, retries on another node, back-off) and records what happened;
:meth:`ExecutionPlanner.record_execution` teaches the cost model from a finished batch's wall
time and per-task times and saves what it learned to the calibration file, at most once per
``LocalityConfig.save_interval`` seconds and at exit (merged with what other processes saved).

Measured co-location: the planner gives its topology the cost model's calibration
(:meth:`NodeTopology.use_colocation`), so nodes measured to share a unit are one unit for both,
and a plan whose candidates include such nodes names the pair in its reason. Recorded parallel
runs with per-task timings teach it too (:meth:`ExecutionPlanner._learn_colocation`).
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from . import _nodefields
from ._allocation import (
    Allocation,
    BatchingCurve,
    SlotInstance,
    allocate,
    allocate_across,
    describe_allocation,
    dispatch_all,
)
from ._dispatch import DEFAULT_MAX_ATTEMPTS, CancelToken, DispatchEvent, NodeHealth, dispatch
from ._errors import CalibrationError, DispatchError, InvalidNodeAddress
from .addresses import describe_input, parse_node_address
from .colocation import UNIT_STRENGTH, PairFact, RecordedEvidence
from .config import ENV_USE_UNRESOLVED, LocalityConfig
from .cost_model import Batching, NodeProfile, ParallelismCostModel, distinct_instances
from .topology import ExecutionUnit, HostIdentity, Instance, NodeTopology

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["DECISION_CACHE_SECONDS", "ExecutionPlan", "ExecutionPlanner", "PlanDetail"]

logger = logging.getLogger(__name__)

DECISION_CACHE_SECONDS: Final = 1.0
"""How long an identical decision is served from cache."""

_MEMO_MAX: Final = 1024

Cause = Literal["no-nodes", "one-task", "one-unit", "parallel", "fast-node", "below-threshold",
                "forced-parallel", "forced-sequential"]


@dataclass(frozen=True, slots=True)
class ExecutionPlan:
    """How to run a batch, and why.

    Attributes:
        mode: ``"parallel"`` or ``"sequential"``.
        speedup: the chosen plan's predicted speedup over running the tasks one after another on
            the fastest node (1.0 when sequential).
        nodes: where to dispatch, the caller's own node objects, best first: when parallel,
            one node per execution unit used (possibly a single node that batches its tasks:
            see ``concurrency_per_node``), one node when sequential (empty when no node is
            usable).
        unique_hosts: distinct physical machines among the usable candidates.
        reason: one sentence a person understands.
        warnings: things the caller should know (nodes left out, names not resolved, ...).
        forced: whether ``mode`` was forced by configuration rather than chosen by the model.

        detail: the :class:`PlanDetail` behind the decision (``None`` only for a plan built by
            hand).

    The properties below are thin aliases of ``detail`` (``cause``, ``num_tasks``, ``units``,
    ``tasks_per_node``, ``concurrency_per_node``, ``slots_per_node``, ``naive_speedup``,
    ``sequential_seconds``, ``predicted_seconds``, ``time_unit``, ``hosts``, ``excluded``,
    ``shared_host``, ``identities``), giving back this call's node objects; :meth:`to_dict`
    gives all of it as JSON-friendly data.
    """

    mode: Literal["parallel", "sequential"]
    speedup: float
    nodes: list[Any]
    unique_hosts: int
    reason: str
    warnings: list[str]
    forced: bool
    detail: PlanDetail | None = field(default=None, repr=False, compare=False)
    _candidates: tuple[Any, ...] = field(default=(), repr=False, compare=False)

    def __repr__(self) -> str:
        # ``nodes`` are the caller's objects; their URLs may carry credentials: shown masked.
        nodes = ", ".join(describe_input(node) for node in self.nodes)
        return (f"ExecutionPlan(mode={self.mode!r}, speedup={self.speedup!r}, nodes=[{nodes}], "
                f"unique_hosts={self.unique_hosts!r}, reason={self.reason!r}, "
                f"warnings={self.warnings!r}, forced={self.forced!r})")

    @property
    def parallel(self) -> bool:
        """Whether the plan runs tasks concurrently."""
        return self.mode == "parallel"

    @property
    def cause(self) -> Cause:
        """A stable key for ``reason``: ``"parallel"``, ``"one-unit"``, ``"fast-node"``,
        ``"below-threshold"``, ``"one-task"``, ``"no-nodes"``, ``"forced-parallel"`` or
        ``"forced-sequential"``."""
        return self.detail.cause if self.detail else "parallel"

    @property
    def num_tasks(self) -> int:
        """The task count planned for."""
        return self.detail.num_tasks if self.detail else 0

    @property
    def units(self) -> int:
        """Distinct execution units among the usable candidates."""
        return self.detail.units if self.detail else 0

    @property
    def tasks_per_node(self) -> list[int]:
        """Predicted tasks for each node of ``nodes``."""
        return list(self.detail.tasks) if self.detail else []

    @property
    def concurrency_per_node(self) -> list[int]:
        """How many tasks to have in flight at once on each node of ``nodes`` (1 on a node
        that serves one request at a time; up to its slots on a node that batches them)."""
        return list(self.detail.concurrency) if self.detail else []

    @property
    def slots_per_node(self) -> list[int]:
        """How many requests each node of ``nodes`` serves at once, as the plan assumed."""
        return [b.slots for b in self.detail.batching] if self.detail else []

    @property
    def naive_speedup(self) -> float:
        """Predicted speedup of dispatching across every usable candidate at once (what
        "parallel whenever two nodes are healthy" does)."""
        return self.detail.naive_speedup if self.detail else 1.0

    @property
    def sequential_seconds(self) -> float:
        """Predicted makespan running one after another on the fastest node."""
        return self.detail.sequential_seconds if self.detail else 0.0

    @property
    def predicted_seconds(self) -> float:
        """Predicted makespan of this plan."""
        return self.detail.predicted_seconds if self.detail else 0.0

    @property
    def time_unit(self) -> str:
        """``"seconds"``, or ``"tasks"`` (units of one task on a reference node) when no node's
        speed is known."""
        return self.detail.time_unit if self.detail else "tasks"

    @property
    def hosts(self) -> dict[str, list[Any]]:
        """Every usable candidate grouped by physical host id (input order kept)."""
        if self.detail is None:
            return {}
        nodes = self._candidates
        return {h: [nodes[i] for i in idx] for h, idx in self.detail.hosts}

    @property
    def excluded(self) -> list[tuple[Any, str]]:
        """``(node, reason)`` for each candidate that could not be used."""
        if self.detail is None:
            return []
        return [(self._candidates[i], r) for i, r in self.detail.excluded]

    @property
    def shared_host(self) -> str | None:
        """When parallel was refused because the nodes share one machine, that machine."""
        return self.detail.shared_host if self.detail else None

    @property
    def identities(self) -> tuple[HostIdentity, ...]:
        """The :class:`HostIdentity` of each node of ``nodes``."""
        detail = self.detail
        if detail is None:
            return ()
        nodes = self._candidates
        return tuple(i if i.node is nodes[pos] else replace(i, node=nodes[pos])
                     for i, pos in zip(detail.identities, detail.chosen, strict=True))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form: nodes as their normalised URLs (never credentials)."""
        urls = [i.address.url for i in self.identities]
        return {
            "mode": self.mode,
            "speedup": round(self.speedup, 4),
            "nodes": urls,
            "tasks_per_node": self.tasks_per_node,
            "concurrency_per_node": self.concurrency_per_node,
            "slots_per_node": self.slots_per_node,
            "batching_per_node": ([{"slots": b.slots, "slots_source": b.slots_source,
                                    "curve": b.describe()} for b in self.detail.batching]
                                  if self.detail else []),
            "unique_hosts": self.unique_hosts,
            "units": self.units,
            "reason": self.reason,
            "warnings": list(self.warnings),
            "forced": self.forced,
            "cause": self.cause,
            "num_tasks": self.num_tasks,
            "naive_speedup": round(self.naive_speedup, 4),
            "sequential_seconds": round(self.sequential_seconds, 6),
            "predicted_seconds": round(self.predicted_seconds, 6),
            "time_unit": self.time_unit,
            "shared_host": self.shared_host,
            "hosts": {h: [_safe_url(n) for n in ns] for h, ns in self.hosts.items()},
            "excluded": [{"node": _safe_url(n), "reason": r} for n, r in self.excluded],
        }


def _safe_url(node: Any) -> str:
    from .addresses import describe_input, parse_node_address

    try:
        return parse_node_address(node).url
    except InvalidNodeAddress:
        return describe_input(node).strip("'")


@dataclass(frozen=True, slots=True)
class PlanDetail:
    """Everything behind an :class:`ExecutionPlan`, with node positions instead of node objects.

    One detail is computed per decision and shared by every plan served from the decision cache,
    so it never holds a list a caller could change; :class:`ExecutionPlan` turns the positions
    back into the node objects of the call that asks.

    Attributes:
        mode, speedup, unique_hosts, reason, warnings, forced: as on the plan.
        chosen: positions, in the candidate list, of the plan's ``nodes`` (best first).
        tasks: predicted tasks for each chosen node.
        concurrency: tasks in flight at once on each chosen node (more than 1 on a node
            that batches them).
        batching: each chosen node's slots and batching curve as the decision planned them
            (:class:`~sollol_locality.cost_model.Batching`).
        cause, num_tasks, units, naive_speedup, sequential_seconds, predicted_seconds,
            time_unit, shared_host: as the plan's properties of the same names.
        hosts: ``(host id, candidate positions)`` for each physical host, input order kept.
        excluded: ``(candidate position, reason)`` for each node that could not be used.
        identities: the identity of each chosen node as the decision described it (its
            ``node`` is the object of the call first decided; ``ExecutionPlan.identities``
            gives this call's).
        host_ids, chosen_urls: the decision in brief (which machines, which nodes), for telling
            a changed decision from a repeated one.
    """

    mode: Literal["parallel", "sequential"]
    speedup: float
    chosen: tuple[int, ...]
    tasks: tuple[int, ...]
    unique_hosts: int
    reason: str
    warnings: tuple[str, ...]
    forced: bool
    cause: Cause
    num_tasks: int
    units: int
    naive_speedup: float
    sequential_seconds: float
    predicted_seconds: float
    time_unit: str
    hosts: tuple[tuple[str, tuple[int, ...]], ...]
    excluded: tuple[tuple[int, str], ...]
    shared_host: str | None
    identities: tuple[HostIdentity, ...]
    concurrency: tuple[int, ...] = ()
    batching: tuple[Batching, ...] = ()
    # What a decision is, for telling a changed decision from a repeated one (computed once).
    host_ids: frozenset[str] = field(init=False, repr=False, compare=False)
    chosen_urls: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "host_ids", frozenset(host for host, _ in self.hosts))
        object.__setattr__(self, "chosen_urls",
                           tuple(i.address.url for i in self.identities))
        if len(self.concurrency) != len(self.chosen):
            object.__setattr__(self, "concurrency", (1,) * len(self.chosen))
        if len(self.batching) != len(self.chosen):
            object.__setattr__(self, "batching", tuple(
                Batching(1, "prior", BatchingCurve.none(), "none") for _ in self.chosen))

    def build(self, nodes: Sequence[Any]) -> ExecutionPlan:
        """A plan for this call: fresh lists, this call's node objects."""
        return ExecutionPlan(self.mode, self.speedup, [nodes[i] for i in self.chosen],
                             self.unique_hosts, self.reason, list(self.warnings), self.forced,
                             self, tuple(nodes))


class ExecutionPlanner:
    """Chooses parallel or sequential execution and the nodes to dispatch to.

    Args:
        topology: host identity (:class:`NodeTopology`); built from ``config`` when omitted.
        cost_model: the makespan model (:class:`ParallelismCostModel`); built when omitted.
        config: settings; taken from the topology or cost model when they are given, else
            ``LocalityConfig.from_env()``.
        clock: monotonic clock for the decision cache, node health and save debouncing.
        health: the record of failed nodes that decisions leave out (a new
            :class:`~sollol_locality._dispatch.NodeHealth` when omitted, keyed by instance so
            that every alias of a failed instance is left out with it).
    """

    def __init__(self, topology: NodeTopology | None = None,
                 cost_model: ParallelismCostModel | None = None,
                 config: LocalityConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 health: NodeHealth | None = None) -> None:
        if config is None:
            config = (topology.config if topology is not None
                      else cost_model.config if cost_model is not None
                      else LocalityConfig.from_env())
        self.config = config
        self.topology = topology if topology is not None else NodeTopology(config)
        self.cost_model = cost_model if cost_model is not None else ParallelismCostModel(config)
        if not self.topology.has_colocation_source:
            # one calibration for both: what the model learns about co-location, the
            # topology's units show
            self.topology.use_colocation(self.cost_model.colocation_facts)
        self._clock = clock
        self._memo: dict[tuple[Any, ...], tuple[float, Any, PlanDetail]] = {}
        self._recorded = RecordedEvidence()
        self._explored: set[str] = set()  # instances a run explored (see run())
        self.health = health if health is not None else NodeHealth(clock=clock,
                                                                   key=self._instance_key)
        self._save_lock = threading.Lock()
        self._last_save: float | None = None

    def _instance_key(self, node: object) -> str:
        """A node's key in :attr:`health`: its instance (``host:port``), shared by aliases."""
        return self.topology.describe(node).instance.label

    def select_mode(self, num_tasks: int, nodes: Iterable[Any]) -> Literal["parallel",
                                                                           "sequential"]:
        """``"parallel"`` or ``"sequential"`` for ``num_tasks`` tasks on ``nodes``."""
        return self.plan(num_tasks, nodes).mode

    def plan(self, num_tasks: int, nodes: Iterable[Any]) -> ExecutionPlan:
        """The full decision for ``num_tasks`` tasks on the candidate ``nodes``.

        Raises:
            ValueError: ``num_tasks`` is not a non-negative integer. Bad nodes never raise: they
                are left out, listed in ``excluded`` and named in ``warnings``.
        """
        if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 0:
            raise ValueError(f"num_tasks must be a non-negative integer, got {num_tasks!r}")
        node_list = nodes if isinstance(nodes, list) else list(nodes)
        failed = self.health.failed_keys()
        key: tuple[Any, ...] | None
        try:
            # process_version: a restarted local instance (new pid, new CPU set) is a new key.
            key = (num_tasks, failed, self.topology.process_version,
                   *map(_nodefields.signature, node_list))
            hash(key)
        except TypeError:
            key = None
        now = self._clock()
        version = (self.cost_model.version, self.topology.colocation_version)
        if key is not None:
            cached = self._memo.get(key)
            if cached is not None and cached[0] > now and cached[1] == version:
                return cached[2].build(node_list)
        template = self._decide_usable(num_tasks, node_list, bool(failed))
        if key is not None:
            if len(self._memo) >= _MEMO_MAX:
                self._memo.clear()
            # Served for a second from when the decision was made (one over thousands of
            # nodes can itself take a good part of a second).
            self._memo[key] = (self._clock() + DECISION_CACHE_SECONDS, version, template)
        return template.build(node_list)

    def invalidate(self) -> None:
        """Forget cached decisions (the next plan is computed afresh)."""
        self._memo.clear()

    # -- running a plan and learning from it ------------------------------------------------

    def run(self, tasks: Iterable[T], call: Callable[[Any, T], R], nodes: Iterable[Any], *,
            on_event: Callable[[DispatchEvent], object] | None = None,
            max_attempts: int = DEFAULT_MAX_ATTEMPTS,
            cancel: CancelToken | None = None, explore: bool = True) -> list[R]:
        """Plan for ``len(tasks)`` tasks on ``nodes``, run ``call(node, task)`` for each as the
        plan says, record what happened and return the results in task order.

        With ``explore`` (the default), a run teaches what no plan made from the priors would:
        when a candidate instance serves several requests at once (its slots are known) but its
        batching curve is not measured, and planning as if its batching were free (the most it
        could gain) gives another plan, that plan is run instead, once per instance in this
        planner's life, so the run measures the curve where it matters. The run is logged as
        exploring; its result is the same. Every later decision uses what it measured.

        Never more calls in flight on a node than its ``concurrency_per_node``. A call that
        raises marks its node failed (left out of later decisions for a back-off period, see
        :attr:`health`) and its task is retried on another node, at most ``max_attempts`` calls
        per task; ``on_event`` gets each call's progress. What ran is recorded
        (:meth:`record_execution` with the per-task times), also when the batch fails.

        Raises:
            DispatchError: some task got no result (every node failed, a task ran out of
                attempts, or ``cancel`` was set); it names each failed node and its error and
                carries the results that did come back.
            KeyboardInterrupt: dispatch stopped cleanly (the calls in flight were awaited).
        """
        task_list = list(tasks)
        node_list = list(nodes)
        plan = self.plan(len(task_list), node_list)
        if not task_list:
            return []
        if explore:
            plan = self._exploring(plan, node_list) or plan
        try:
            out = dispatch(plan, task_list, call, candidates=node_list, health=self.health,
                           on_event=on_event, max_attempts=max_attempts, cancel=cancel)
        except DispatchError as exc:
            done = [(a.node, a.start_s, a.end_s) for a in exc.attempts if a.error is None]
            wall = max((end for _, _, end in done), default=0.0)
            if wall > 0:  # what did run still teaches per-task times
                self._observe(plan, wall, done, as_planned=False)
            self.invalidate()
            raise
        if out.wall_seconds > 0:
            self.record_execution(plan, out.wall_seconds, timings=out.timings)
        logger.info(
            "%s run of %d tasks on %d node(s): predicted %.3g %s, took %.3gs%s", plan.mode,
            len(task_list), len(plan.nodes), plan.predicted_seconds, plan.time_unit,
            out.wall_seconds, (f"; {len(out.failed_nodes)} node(s) failed and sit out"
                               if out.failed_nodes else ""),
            extra={"event": "execution_recorded", "mode": plan.mode,
                   "predicted": plan.predicted_seconds, "measured": out.wall_seconds,
                   "failed": [f.key for f in out.failed_nodes]},
        )  # fmt: skip
        if out.failed_nodes:
            self.invalidate()
        return list(out.results)

    def _exploring(self, plan: ExecutionPlan, nodes: list[Any]) -> ExecutionPlan | None:
        """The plan a run explores with instead of ``plan`` (see :meth:`run`), or ``None``."""
        if plan.forced or plan.num_tasks < 2:
            return None
        model = self.cost_model
        unmeasured = {}
        for identity in self.topology.describe_many(nodes):
            if (isinstance(identity, HostIdentity)
                    and identity.instance.label not in self._explored
                    and model.batching(identity).curve_source == "prior"):
                unmeasured[identity.instance.label] = identity
        if not unmeasured:
            return None
        with model.optimistic_batching():
            template = self._decide_usable(plan.num_tasks, nodes,
                                           bool(self.health.failed_keys()))
        candidate = template.build(nodes)
        chosen = {i.instance.label: c for i, c in zip(candidate.identities,
                                                      candidate.concurrency_per_node,
                                                      strict=False)}
        probed = [label for label in unmeasured if chosen.get(label, 0) >= 2]
        if not probed or _shape(candidate) == _shape(plan):
            return None
        self._explored.update(probed)
        logger.info("exploring: the batching of %s is not measured yet; this run sends %s "
                    "(without exploring: %s)", _names(probed),
                    _shape_text(candidate), _shape_text(plan),
                    extra={"event": "exploring", "instances": probed})
        return candidate

    def record_execution(self, plan: ExecutionPlan, wall_seconds: float, *,
                         timings: Sequence[tuple[Any, float, float]] | None = None) -> None:
        """Teach the cost model how a planned batch really went, and save what it learned.

        Args:
            plan: the plan the batch ran under.
            wall_seconds: the batch's length.
            timings: one ``(node, start_s, end_s)`` per task (seconds from the batch's start,
                ``0 <= start_s <= end_s``), as :meth:`run` records them: the model then learns
                each unit's time per task and contention from the tasks themselves (see
                :meth:`ParallelismCostModel.observe`). When they do not match the plan (tasks
                ran elsewhere after a failure), only the per-task times are used.

        Raises:
            ValueError: an impossible observation, or a ``timings`` entry that is not a
                ``(node, start_s, end_s)`` of a parsable node with ``0 <= start_s <= end_s``
                (the message names the entry); nothing is learned then.
        """
        if timings is None:
            if plan.nodes:
                identities = plan.identities if len(plan.identities) == len(plan.nodes) else None
                self.cost_model.observe(plan.mode, plan.nodes, plan.num_tasks, wall_seconds,
                                        topology=self.topology, identities=identities)
                self._autosave()
            return
        entries = list(timings)
        if len(entries) != plan.num_tasks:
            raise ValueError(f"timings has {len(entries)} entries, expected one per task of the "
                             f"plan ({plan.num_tasks})")
        for index, entry in enumerate(entries):
            if (not isinstance(entry, (tuple, list)) or len(entry) != 3
                    or not all(_nodefields.is_number(v) and math.isfinite(v)
                               for v in entry[1:])
                    or not 0 <= entry[1] <= entry[2]):
                shown = (f"({describe_input(entry[0])}, {entry[1]!r}, {entry[2]!r})"
                         if isinstance(entry, (tuple, list)) and len(entry) == 3 else repr(entry))
                raise ValueError(f"timings[{index}] = {shown} is not (node, start_s, end_s) "
                                 "with 0 <= start_s <= end_s")
        if not entries:
            return
        self._observe(plan, wall_seconds, entries, as_planned=None)

    def _observe(self, plan: ExecutionPlan, wall_seconds: float,
                 entries: Sequence[tuple[Any, float, float] | Sequence[Any]],
                 as_planned: bool | None) -> None:
        """Hand a batch's per-task times to the cost model (``as_planned`` ``None``: find out
        whether the tasks ran where the plan said)."""
        described = self.topology.describe_many([entry[0] for entry in entries])
        timed: list[tuple[HostIdentity, float, float]] = []
        for index, (identity, entry) in enumerate(zip(described, entries, strict=True)):
            if isinstance(identity, InvalidNodeAddress):
                raise ValueError(f"timings[{index}]: node {identity.node} cannot be parsed: "
                                 f"{identity.reason}")
            timed.append((identity, float(entry[1]), float(entry[2])))
        if as_planned is None:
            ran = Counter(identity.instance for identity, _, _ in timed)
            planned: Counter[Instance] = Counter()
            for identity, share in zip(plan.identities, plan.tasks_per_node, strict=False):
                planned[identity.instance] += share
            as_planned = ran == planned
        self.cost_model.observe(plan.mode, [i.node for i, _, _ in timed], len(timed),
                                wall_seconds, identities=[i for i, _, _ in timed],
                                timings=timed, as_planned=as_planned)
        # What per-node times tell about pairs of nodes that slow each other (co-location).
        self._learn_colocation(plan, [(i.node, s, e) for i, s, e in timed])
        self._autosave()

    # -- saving what was learned -----------------------------------------------------------

    def flush(self) -> bool:
        """Save what the cost model learned now, if anything is unsaved and a calibration file
        is configured; ``True`` when it saved. A failed save is logged, never raised."""
        with self._save_lock:
            return self._save_now()

    def _save_now(self) -> bool:
        """Save (the caller holds the save lock)."""
        model = self.cost_model
        path = model.config.calibration_file
        if path is None or not model.unsaved:
            return False
        if model.synced_path is None and Path(path).exists():
            # The file could not be read (corrupt): it stays for a person to look at.
            return False
        self._last_save = self._clock()
        try:
            model.save(path)
        except (CalibrationError, OSError) as exc:
            logger.warning("what recorded runs taught could not be saved to %s: %s", path, exc,
                           extra={"event": "calibration_save_failed", "path": str(path)})
            return False
        logger.debug("saved what recorded runs taught to %s", path,
                     extra={"event": "calibration_saved", "path": str(path)})
        return True

    def _autosave(self) -> None:
        """Save now if the last save is at least ``save_interval`` seconds old; otherwise the
        next recorded run after that saves, or :meth:`flush`, or the exit hook. No thread is
        started for it."""
        if self.cost_model.config.calibration_file is None:
            return
        with self._save_lock:
            _at_exit(self)
            now = self._clock()
            if self._last_save is None or now - self._last_save >= self.config.save_interval:
                self._save_now()

    # -- the decision -----------------------------------------------------------------------

    def _decide_usable(self, num_tasks: int, nodes: Sequence[Any],
                       any_failed: bool) -> PlanDetail:
        """:meth:`_decide` over the candidates that may take work: nodes in back-off and (unless
        ``use_unresolved``) unresolved names are left out first, with their reasons."""
        left_out: dict[int, str] = {}
        warnings: list[str] = []
        why: list[str] = []
        if any_failed:
            now = self.health.now()
            for index, node in enumerate(nodes):
                failure = self.health.failure(node)
                if failure is not None:
                    error = _describe_error(failure.error)
                    left_out[index] = (f"failed {now - failure.failed_at:.3g}s ago ({error}); "
                                       f"left out until its back-off ends in "
                                       f"{failure.until - now:.3g}s")
                    warnings.append(f"node {_safe_url(node)} left out: it failed "
                                    f"{now - failure.failed_at:.3g}s ago ({error})")
            if left_out and len(left_out) == len(nodes):
                warnings = [f"every candidate failed recently ({len(nodes)} in back-off); "
                            "planning over all of them"]
                left_out.clear()
            elif left_out:
                why.append(f"{len(left_out)} failed recently")
        if not self.config.use_unresolved:
            identities = self.topology.describe_many(list(nodes))
            usable = [(i, ident) for i, ident in enumerate(identities)
                      if i not in left_out and isinstance(ident, HostIdentity)]
            unresolved = [(i, ident) for i, ident in usable if not ident.resolved]
            if unresolved and len(unresolved) < len(usable):
                for index, identity in unresolved:
                    host = identity.address.host
                    left_out[index] = (f"its host name {host!r} did not resolve, so it gets no "
                                       "work while resolved nodes are available "
                                       f"(use_unresolved=True or {ENV_USE_UNRESOLVED}=1 plans "
                                       "over it)")
                    reason = (f" ({identity.resolution_error})"
                              if identity.resolution_error else "")
                    warnings.append(f"node {identity.address.url} left out: host {host!r} "
                                    f"could not be resolved{reason}")
                why.append(f"{len(unresolved)} did not resolve")
        if not left_out:
            detail = self._decide(num_tasks, nodes)
            if warnings:
                detail = replace(detail, warnings=(*detail.warnings, *warnings))
            return detail
        kept = [i for i in range(len(nodes)) if i not in left_out]
        detail = self._decide(num_tasks, [nodes[i] for i in kept])
        excluded = sorted([(kept[i], r) for i, r in detail.excluded] + list(left_out.items()))
        reason = detail.reason.rstrip(".")
        return replace(
            detail, chosen=tuple(kept[i] for i in detail.chosen),
            hosts=tuple((h, tuple(kept[i] for i in ix)) for h, ix in detail.hosts),
            excluded=tuple(excluded), warnings=(*detail.warnings, *warnings),
            reason=f"{reason}; {_nodes(len(left_out))} left out ({', '.join(why)}).",
        )  # fmt: skip


    def _decide(self, num_tasks: int, nodes: Sequence[Any]) -> PlanDetail:
        identities = self.topology.describe_many(nodes)
        detail = self._decide_for(num_tasks, nodes, identities)
        note = self._colocation_note(identities) if num_tasks >= 2 else ""
        return replace(detail, reason=f"{detail.reason} {note}") if note else detail

    def _decide_for(self, num_tasks: int, nodes: Sequence[Any],
                    identities: Sequence[HostIdentity | InvalidNodeAddress]) -> PlanDetail:
        model = self.cost_model
        warnings: list[str] = []
        excluded: list[tuple[int, str]] = []
        hosts: dict[str, list[int]] = {}
        unresolved: set[str] = set()
        for index, identity in enumerate(identities):
            if isinstance(identity, InvalidNodeAddress):
                excluded.append((index, identity.reason))
                warnings.append(f"node {identity.node} left out: {identity.reason}")
                continue
            hosts.setdefault(identity.physical_host_id, []).append(index)
            if not identity.resolved and identity.physical_host_id not in unresolved:
                unresolved.add(identity.physical_host_id)
                why = f" ({identity.resolution_error})" if identity.resolution_error else ""
                warnings.append(f"host {identity.address.host!r} could not be resolved{why}; "
                                "it is treated as a separate machine")
        profiles, time_unit = model.profiles(identities)
        all_units = {p.unit for p in profiles}
        common = dict(num_tasks=num_tasks, unique_hosts=len(hosts), units=len(all_units),
                      time_unit=time_unit,
                      hosts=tuple((h, tuple(ix)) for h, ix in hosts.items()),
                      excluded=tuple(excluded))
        if not profiles:
            reason = (f"No usable node among the {len(nodes)} given, so nothing can be "
                      "dispatched." if nodes else "No candidate nodes were given.")
            return PlanDetail("sequential", 1.0, (), (), reason=reason,
                             warnings=tuple(warnings), forced=self.config.forced,
                             cause="no-nodes", naive_speedup=1.0, sequential_seconds=0.0,
                             predicted_seconds=0.0, shared_host=None, identities=(),
                             **common)  # type: ignore[arg-type]
        by_rank = sorted(profiles, key=_rank)
        fastest = by_rank[0]
        sequential = model.sequential_makespan(num_tasks, profiles)
        # The distinct instances, best first, as the allocation engine sees them (each built
        # once per decision: a decision over many nodes costs what building them costs).
        ranked = distinct_instances(by_rank)
        slot = {p.instance: model.slot_instance(p) for p in ranked}
        instances = [slot[p.instance] for p in ranked]
        contention = model.contention_table(ranked)
        # What "parallel whenever two nodes are healthy" does: every node gets tasks, one at a
        # time, in the order given (the closed form of ``model.dispatch_all_makespan``).
        naive_time = (dispatch_all(num_tasks, [slot[p.instance] for p in
                                               distinct_instances(profiles)], contention)
                      if num_tasks > 0 else 0.0)
        naive = sequential / naive_time if naive_time > 0 else 1.0

        def seq(reason: str, cause: Cause, *, shared: str | None = None,
                forced: bool = False) -> PlanDetail:
            return PlanDetail("sequential", 1.0, (fastest.index,), (num_tasks,), reason=reason,
                             warnings=tuple(warnings), forced=forced, cause=cause,
                             naive_speedup=naive, sequential_seconds=sequential,
                             predicted_seconds=sequential, shared_host=shared,
                             identities=(fastest.identity,),
                             batching=(model.batching(fastest.identity),),
                             **common)  # type: ignore[arg-type]

        def par(chosen: Sequence[NodeProfile], allocation: Allocation, reason: str,
                cause: Cause, *, forced: bool = False) -> PlanDetail:
            by_key = allocation.by_instance
            order = sorted(range(len(chosen)), key=lambda i: _rank(chosen[i]))
            used = [i for i in order if by_key.get(chosen[i].instance.label, (0, 0))[0] > 0]
            makespan = allocation.makespan
            speedup = sequential / makespan if makespan > 0 else 1.0
            return PlanDetail("parallel", speedup, tuple(chosen[i].index for i in used),
                             tuple(by_key[chosen[i].instance.label][0] for i in used),
                             reason=reason, warnings=tuple(warnings), forced=forced,
                             cause=cause, naive_speedup=naive, sequential_seconds=sequential,
                             predicted_seconds=makespan, shared_host=None,
                             identities=tuple(chosen[i].identity for i in used),
                             concurrency=tuple(max(1, by_key[chosen[i].instance.label][1])
                                               for i in used),
                             batching=tuple(model.batching(chosen[i].identity) for i in used),
                             **common)  # type: ignore[arg-type]

        fastest_url = fastest.identity.address.url
        if self.config.mode == "sequential":
            return seq(f"Sequential forced by {self.config.forced_by}; "
                       f"{_tasks(num_tasks)} go to {fastest_url} (the model predicts "
                       f"{naive:.2f}x for running them in parallel).", "forced-sequential",
                       forced=True)
        if self.config.mode == "parallel":
            streams = ranked
            across = allocate_across(num_tasks, instances, contention)
            makespan = across.makespan
            if num_tasks >= 2 and naive < 1.0:
                warnings.append(f"forced parallel is predicted slower than sequential "
                                f"({naive:.2f}x)")
            working = sum(1 for a in across.assignments if a.tasks > 0)
            return par(streams, across,
                       f"Parallel forced by {self.config.forced_by}: "
                       f"{_tasks(num_tasks)} across {_count(working, 'node')}, predicted "
                       f"{(sequential / makespan if makespan else 1.0):.2f}x.",
                       "forced-parallel", forced=True)
        if num_tasks < 2:
            return seq("Sequential: there are no tasks to run." if num_tasks == 0 else
                       f"Sequential: a single task cannot run in parallel; it goes to "
                       f"{fastest_url}.", "one-task")

        # One stream per execution unit (more where calibration measured a gain), best first.
        per_unit: dict[ExecutionUnit, list[NodeProfile]] = {}
        for profile in by_rank:
            per_unit.setdefault(profile.unit, []).append(profile)
        ordered: list[list[NodeProfile]] = []
        for unit, members in per_unit.items():
            streams = distinct_instances(members)
            ordered.append(streams[:max(1, model.gains_from_concurrency(unit))])
        if (len(ordered) == 1 and len(ordered[0]) == 1
                and not any(_batches(inst) for inst in instances)):
            members = per_unit[fastest.unit]
            unit = fastest.unit
            kind = ("its CPU" if not unit.is_gpu else "its GPU" if unit.device is None
                    else f"GPU {unit.device}")
            if len(profiles) == 1:
                return seq(f"Sequential: only one node ({fastest_url}) is available.",
                           "one-unit")
            distinct = len(distinct_instances(members))
            where = (f"run on one machine ({unit.host}) and share {kind}"
                     if unit.measured is None else
                     "share one measured execution unit")
            return seq(
                f"Sequential: all {len(profiles)} nodes {where}; "
                f"{_tasks(num_tasks)} in parallel there are "
                f"predicted to run at {naive:.2f}x the speed of running them one after "
                f"another on {fastest_url}"
                + (f", a gain under the {model.priors.min_concurrency_gain:.0%} that "
                   "calibration must measure before it is trusted over noise." if naive > 1.0
                   else ".")
                if distinct > 1 else
                f"Sequential: the {len(profiles)} nodes given are aliases of one instance "
                f"({fastest_url}).",
                "one-unit", shared=unit.host)
        allocation = allocate(num_tasks, instances, contention)
        speedup = allocation.speedup
        by_key = allocation.by_instance
        used = [p for p in ranked if p.instance.label in by_key]
        if allocation.parallel and speedup > self.config.min_speedup:
            batched = any(a.concurrency > 1 for a in allocation.assignments)
            left = len(profiles) - len(used)
            tail = (f"; {left} other node(s) would add contention or no speed and are left out"
                    if left else "")
            if not batched:  # today's sentence: one task at a time on each of 2+ nodes
                used_hosts = list(dict.fromkeys(p.identity.physical_host_id for p in used))
                used_units = {p.unit for p in used}
                where = (f"{len(used_hosts)} machines ({_names(used_hosts)})"
                         if len(used_hosts) > 1
                         else f"{_count(len(used_units), 'unit')} of {used_hosts[0]} "
                              f"({_names(u.label for u in used_units)})")
                if len(used_units) < len(used) and len(used_hosts) > 1:
                    # several nodes of a measured unit: the addresses are not the machines
                    where = (f"{len(used)} nodes on {_count(len(used_units), 'unit')} "
                             f"({_names(used_hosts)})")
                return par(ranked, allocation,
                           f"Parallel: {_tasks(num_tasks)} across {where}, predicted "
                           f"{speedup:.2f}x faster than one after another{tail}.", "parallel")
            names = {p.instance.label: p.identity.address.url for p in ranked}
            return par(ranked, allocation,
                       f"Parallel: {describe_allocation(allocation, names)}{tail}.", "parallel")
        if not allocation.parallel or speedup <= 1.0 and _dominates(fastest, profiles):
            others = [p for p in profiles if p.unit != fastest.unit]
            ratio = min(p.task_time for p in others) / fastest.task_time if others else 1.0
            rivals = ("machine" if any(p.unit.host != fastest.unit.host for p in others)
                      else f"unit of {fastest.unit.host}")
            return seq(f"Sequential on {fastest_url}: it is {ratio:.1f}x faster than any other "
                       f"{rivals}, so {_tasks(num_tasks)} one after another beat the best "
                       f"parallel plan ({speedup:.2f}x).", "fast-node")
        return seq(f"Sequential on {fastest_url}: the best parallel plan is predicted at "
                   f"{speedup:.2f}x, not above the required {self.config.min_speedup:.2f}x.",
                   "below-threshold")


    # -- measured co-location ----------------------------------------------------------------

    def _colocation_note(self, identities: Sequence[HostIdentity | InvalidNodeAddress]) -> str:
        """A sentence naming the measured pairs among the candidates, for the reason:
        ``"10.0.0.5:11434 and 10.0.0.6:11434 share one unit (measured 2026-12-01, 1.93x)."``
        (empty when no measured unit holds two of them)."""
        members: dict[str, list[str]] = {}
        for identity in identities:
            if isinstance(identity, HostIdentity) and identity.unit.measured is not None:
                labels = members.setdefault(identity.unit.measured, [])
                if identity.instance.label not in labels:
                    labels.append(identity.instance.label)
        if not any(len(labels) > 1 for labels in members.values()):
            return ""
        facts = self.topology.colocation_facts()
        now, max_age = time.time(), self.config.colocation_max_age
        parts: list[str] = []
        for labels in members.values():
            if len(labels) < 2:
                continue
            ordered = sorted(labels)
            direct = [f for i, a in enumerate(ordered) for b in ordered[i + 1:]
                      if (f := facts.fact(a, b)) is not None and f.colocated
                      and (f.strength is None or f.strength >= UNIT_STRENGTH)]
            parts += [f"{f.a} and {f.b} share one unit ({f.describe(now, max_age)})"
                      for f in direct]
            if not direct:
                parts.append(f"{_names(ordered)} share one measured unit")
        return "; ".join(parts) + "."

    def _learn_colocation(self, plan: ExecutionPlan, timings: Iterable[Any], *,
                          measured_at: float | None = None) -> tuple[PairFact, ...]:
        """Learn co-location from one recorded parallel run of ``plan``.

        ``timings``: one ``(node, start_s, end_s)`` per task, seconds from the batch's start
        (``node`` as in ``plan.nodes``, or any shape of its address). Each node's expected time
        alone is its measured time per task (nodes with none, or sent several tasks at once,
        are left out). The evidence accumulates over runs under
        :class:`~sollol_locality.colocation.RecordedEvidence`'s rule: a pair becomes one unit
        after 3 runs in which both slowed as one unit's nodes do (at most a quarter of its runs
        with evidence against), so one noisy run never merges; one run in which both kept
        their solo speed while overlapping undoes a merge. A change is merged into the cost
        model's calibration (its version changes, so cached decisions are recomputed) and
        returned; malformed timings are logged and teach nothing.
        """
        identities = plan.identities
        if plan.mode != "parallel" or not identities or len(identities) != len(plan.nodes):
            return ()
        model = self.cost_model
        profiles, time_unit = model.profiles(list(identities))
        if time_unit != "seconds":
            return ()
        concurrency = plan.concurrency_per_node or [1] * len(identities)
        expected: dict[str, float] = {}
        by_url: dict[str, str] = {}
        for profile in profiles:
            identity = identities[profile.index]
            by_url[identity.address.url] = identity.instance.label
            if profile.speed_source != "prior" and concurrency[profile.index] <= 1:
                expected[identity.instance.label] = profile.task_time
        rows: list[tuple[str, float, float]] = []
        for item in timings:
            try:
                node, start, end = item
            except (TypeError, ValueError):
                logger.warning("timing %r is not (node, start_s, end_s); run not used for "
                               "co-location", item)
                return ()
            label = next((identities[i].instance.label for i, n in enumerate(plan.nodes)
                          if n is node), None)
            if label is None:
                try:
                    label = by_url.get(parse_node_address(node).url)
                except InvalidNodeAddress:
                    label = None
            if label is not None and label in expected:
                rows.append((label, start, end))
        if not rows:
            return ()
        evidence = self._recorded
        evidence.know(model.colocation_facts())
        try:
            changed = evidence.add_run(rows, expected, measured_at=time.time()
                                       if measured_at is None else measured_at)
        except CalibrationError as exc:
            logger.warning("recorded timings not used for co-location: %s", exc)
            return ()
        if changed:
            model.update_colocation(evidence.facts())
            for fact in changed:
                logger.info("%s and %s %s (%s)", fact.a, fact.b,
                            "share one unit" if fact.colocated else
                            "slow each other as separate units" if fact.strength is not None
                            and fact.strength >= evidence.tolerance else
                            "are separate units again",
                            fact.describe(time.time(), self.config.colocation_max_age),
                            extra={"event": "colocation_learned", "colocated": fact.colocated})
        return changed


def _shape(plan: ExecutionPlan) -> tuple[tuple[str, int, int], ...]:
    """Where a plan sends tasks: ``(instance, tasks, at once)`` per node, in plan order."""
    return tuple((i.instance.label, n, c) for i, n, c in zip(
        plan.identities, plan.tasks_per_node, plan.concurrency_per_node, strict=False))


def _shape_text(plan: ExecutionPlan) -> str:
    if plan.mode == "sequential":
        return f"{_tasks(plan.num_tasks)} one after another on {_safe_url(plan.nodes[0])}"
    return ", ".join(f"{n} to {label}" + (f" ({c} at once)" if c > 1 else "")
                     for label, n, c in _shape(plan))


def _rank(profile: NodeProfile) -> tuple[float, bool, bool, str, int, int]:
    """Best first: fastest; among equals this machine (no network hop) and its own servers
    before its containers, then by host id and port, so the choice does not depend on the
    order nodes were listed in."""
    identity = profile.identity
    return (profile.task_time, not identity.is_local, identity.source == "container",
            profile.instance.host, profile.instance.port, profile.index)




def _batches(instance: SlotInstance) -> bool:
    """Whether sending several tasks at once to ``instance`` is predicted to gain anything."""
    curve = instance.curve
    return any(curve.ratio(k) < k * (1.0 - 1e-9) for k in range(2, instance.slots + 1))


def _dominates(fastest: NodeProfile, profiles: Sequence[NodeProfile]) -> bool:
    others = [p.task_time for p in profiles if p.unit != fastest.unit]
    return bool(others) and min(others) >= 2.0 * fastest.task_time


_PLANNERS: weakref.WeakSet[ExecutionPlanner] = weakref.WeakSet()
_AT_EXIT_LOCK = threading.Lock()
_at_exit_registered = False


def _at_exit(planner: ExecutionPlanner) -> None:
    """Make sure ``planner``'s unsaved learning is saved when the interpreter exits (the hook
    is registered on the first recorded run, never at import or construction)."""
    global _at_exit_registered
    with _AT_EXIT_LOCK:
        _PLANNERS.add(planner)
        if not _at_exit_registered:
            atexit.register(_flush_all)
            _at_exit_registered = True


def _flush_all() -> None:
    for planner in list(_PLANNERS):
        planner.flush()


def _describe_error(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _nodes(count: int) -> str:
    return "1 node" if count == 1 else f"{count} nodes"


def _tasks(count: int) -> str:
    return _count(count, "task")


def _count(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _names(items: Iterable[str], limit: int = 3) -> str:
    names = list(items)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
