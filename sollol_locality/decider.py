"""`Decider`: the one object behind every adapter (layer 6, above the planner).

The balancer mixin, the pool mixin and :func:`sollol_locality.install` all hold a
:class:`Decider`; it owns what each of them needs:

* the :class:`ExecutionPlanner` (and through it the topology and the cost model);
* plan and decision logging: a warning naming the shared machine when parallel is refused for
  locality, an info line with the estimated speedup when it is enabled, and no log work for a
  repeated (warm) decision unless debug logging is on;
* SOLLOL's vocabulary for the same answers (``should_use_parallel`` /
  ``suggest_execution_mode``);
* recording a finished batch (:meth:`Decider.record_execution`);
* in-flight accounting for unit-aware routing. Each routed request holds a token that ends when
  the request is reported (:meth:`Decider.finish`), when its decision object is garbage
  collected (a :func:`weakref.finalize`), or after a timeout: a generous multiple of the
  request's predicted time, never less than a floor, measured on the injected monotonic clock.
  A request that is never reported therefore cannot stay "in flight" forever.

An adapter gets its decider with :func:`attached_decider` (its own, created on first use under
one lock from the keyword-only options it was given, so a base that never calls
``super().__init__`` still works) or :func:`installed_decider` (the one :func:`install` put on a
patched class). This module does not import ``sollol``.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from ._dispatch import DEFAULT_MAX_ATTEMPTS, CancelToken, DispatchEvent, NodeHealth
from ._errors import InvalidNodeAddress
from .config import LocalityConfig
from .cost_model import ParallelismCostModel
from .planner import ExecutionPlan, ExecutionPlanner
from .topology import HostIdentity, NodeTopology

__all__ = [
    "DECIDER_KEY",
    "INSTALLED_KEY",
    "OPTIONS_KEY",
    "Decider",
    "attached_decider",
    "installed_decider",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

OPTIONS_KEY: Final = "_locality_options"
"""Instance ``__dict__`` key of an adapter's keyword-only options
``(locality_config, topology, cost_model, planner)``."""

DECIDER_KEY: Final = "_locality_decider"
"""Instance ``__dict__`` key of an adapter's own decider, created on first use."""

INSTALLED_KEY: Final = "_sollol_locality_decider"
"""Class attribute that :func:`sollol_locality.install` sets on each class it patches."""

DEFAULT_TIMEOUT_FACTOR: Final = 10.0
"""An unreported request stops counting as in flight after this many times its predicted time."""

DEFAULT_TIMEOUT_FLOOR: Final = 300.0
"""... and never sooner than this many seconds (an unmeasured unit's prediction is unknown)."""

_TOKEN_ATTR: Final = "_sollol_locality_token"
_LOG_MEMORY: Final = 256
_CREATE_LOCK = threading.Lock()
_DEFAULT: Decider | None = None

Options = tuple[LocalityConfig | None, NodeTopology | None, ParallelismCostModel | None,
                ExecutionPlanner | None]


@dataclass(slots=True, eq=False)
class _Token:
    """One routed request counted as in flight on ``unit`` until ``deadline``."""

    serial: int
    unit: Hashable
    deadline: float
    decision: Any  # a weak reference to the decision, or the decision itself (see _open_token)
    finalizer: weakref.finalize[Any, Any] | None


class Decider:
    """Plan, log, account for requests in flight and record, for one adapter or installation.

    Args:
        config, topology, cost_model, planner: the components to decide with; each left out is
            taken from the others or built from ``config`` (``LocalityConfig.from_env()``
            when omitted).
        clock: monotonic seconds, for the in-flight timeouts.
        timeout_factor: an unreported request ends after this multiple of its predicted time...
        timeout_floor: ... but never sooner than this many seconds.

    Raises:
        ValueError: ``timeout_factor`` or ``timeout_floor`` is not a positive number.
    """

    def __init__(self, config: LocalityConfig | None = None, *,
                 topology: NodeTopology | None = None,
                 cost_model: ParallelismCostModel | None = None,
                 planner: ExecutionPlanner | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 timeout_factor: float = DEFAULT_TIMEOUT_FACTOR,
                 timeout_floor: float = DEFAULT_TIMEOUT_FLOOR) -> None:
        for name, value in (("timeout_factor", timeout_factor), ("timeout_floor", timeout_floor)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}={value!r}: expected a positive number of seconds")
        if planner is not None:
            config = config or planner.config
            topology = topology or planner.topology
            cost_model = cost_model or planner.cost_model
        self.owns_topology = topology is None
        config = config or (topology.config if topology is not None else
                            cost_model.config if cost_model is not None
                            else LocalityConfig.from_env())
        topology = topology or NodeTopology(config)
        cost_model = cost_model or ParallelismCostModel(config)
        self.planner: ExecutionPlanner = planner or ExecutionPlanner(topology, cost_model, config)
        self._clock = clock
        self._factor = float(timeout_factor)
        self._floor = float(timeout_floor)
        self._lock = threading.Lock()
        self._last_logged: dict[frozenset[str], tuple[str, tuple[str, ...]]] = {}
        self._serials = itertools.count()
        self._open: dict[int, _Token] = {}
        self._counts: dict[Hashable, int] = {}
        self._deadlines: list[tuple[float, int]] = []
        # Filled by weakref finalizers, which may run in any thread at any allocation (even while
        # this thread holds self._lock): they only append here, and the lock holder drains it.
        self._collected: collections.deque[int] = collections.deque()

    @classmethod
    def from_options(cls, options: Options) -> Decider:
        """A decider from an adapter's ``(locality_config, topology, cost_model, planner)``."""
        config, topology, cost_model, planner = options
        return cls(config, topology=topology, cost_model=cost_model, planner=planner)

    # -- components ------------------------------------------------------------------------

    @property
    def topology(self) -> NodeTopology:
        """The :class:`NodeTopology` of the planner."""
        return self.planner.topology

    @property
    def cost_model(self) -> ParallelismCostModel:
        """The :class:`ParallelismCostModel` of the planner."""
        return self.planner.cost_model

    def close(self) -> None:
        """Stop the background DNS refresh of the resolver this decider built (if it did)."""
        if self.owns_topology:
            close = getattr(self.planner.topology.resolver, "close", None)
            if callable(close):
                close()

    # -- decisions -------------------------------------------------------------------------

    def plan(self, num_tasks: int, nodes: Sequence[Any]) -> ExecutionPlan:
        """The planner's plan for ``num_tasks`` tasks over ``nodes``, logged once per change."""
        plan = self.planner.plan(num_tasks, nodes)
        self._log(plan)
        return plan

    def should_parallelize(self, num_tasks: int, nodes: Sequence[Any]) -> bool:
        """Whether the plan for ``num_tasks`` tasks over ``nodes`` is parallel."""
        return self.plan(num_tasks, nodes).mode == "parallel"

    def should_use_parallel(self, nodes: Sequence[Any], num_tasks: int | None = None) -> bool:
        """SOLLOL's ``should_use_parallel()``: :meth:`should_parallelize` for ``num_tasks``
        (default: one task per node, at least two)."""
        tasks = num_tasks if num_tasks is not None else max(2, len(nodes))
        return self.should_parallelize(tasks, nodes)

    def suggest_execution_mode(self, nodes: Sequence[Any], num_tasks: int | None = None) -> str:
        """SOLLOL's ``suggest_execution_mode()`` vocabulary from the plan:
        ``"parallel_multi_node"`` (three or more nodes to use), ``"parallel"`` or
        ``"sequential"``."""
        tasks = num_tasks if num_tasks is not None else max(2, len(nodes))
        plan = self.plan(tasks, nodes)
        if plan.mode == "sequential":
            return "sequential"
        return "parallel_multi_node" if len(plan.nodes) >= 3 else "parallel"

    @property
    def health(self) -> NodeHealth:
        """The record of failed nodes that this decider's plans leave out (its planner's)."""
        return self.planner.health

    def run(self, tasks: Iterable[T], call: Callable[[Any, T], R], nodes: Sequence[Any], *,
            on_event: Callable[[DispatchEvent], object] | None = None,
            max_attempts: int = DEFAULT_MAX_ATTEMPTS,
            cancel: CancelToken | None = None, explore: bool = True) -> list[R]:
        """:meth:`ExecutionPlanner.run`, with the plan logged once per change and the run
        logged as :meth:`record_execution` logs it."""
        task_list = list(tasks)
        self._log(self.planner.plan(len(task_list), nodes))
        return self.planner.run(task_list, call, nodes, on_event=on_event,
                                max_attempts=max_attempts, cancel=cancel, explore=explore)

    def record_execution(self, plan: ExecutionPlan, wall_seconds: float, *,
                         timings: Sequence[tuple[Any, float, float]] | None = None) -> None:
        """Tell the cost model how a planned batch really went
        (:meth:`ExecutionPlanner.record_execution`); the prediction and the measurement are
        logged side by side."""
        if not plan.nodes:
            return
        self.planner.record_execution(plan, wall_seconds, timings=timings)
        logger.info(
            "%s run of %d tasks on %d node(s): predicted %.3g %s, took %.3gs",
            plan.mode, plan.num_tasks, len(plan.nodes), plan.predicted_seconds, plan.time_unit,
            wall_seconds,
            extra={"event": "execution_recorded", "mode": plan.mode,
                   "predicted": plan.predicted_seconds, "measured": wall_seconds},
        )

    def _log(self, plan: ExecutionPlan) -> None:
        detail = plan.detail  # the decision's immutable detail: its log key is precomputed
        key = detail.host_ids if detail is not None else frozenset()
        summary = (plan.mode, detail.chosen_urls if detail is not None else ())
        if self._last_logged.get(key) == summary:
            # The warm path: a repeated decision costs no log work unless asked.
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s", plan.reason, extra=_extra(plan))
            return
        if len(self._last_logged) > _LOG_MEMORY:
            self._last_logged.clear()
        self._last_logged[key] = summary
        extra = _extra(plan)
        for warning in plan.warnings:
            logger.warning("%s", warning, extra={"event": "candidate_warning"})
        if plan.mode == "sequential" and plan.shared_host is not None:
            logger.warning(
                "parallel execution refused: %d nodes share one machine (%s); %d tasks in "
                "parallel there are estimated at %.2fx, so they run sequentially",
                sum(len(v) for v in plan.hosts.values()), plan.shared_host, plan.num_tasks,
                plan.naive_speedup, extra=extra)
        elif plan.mode == "parallel":
            machines = list(dict.fromkeys(i.physical_host_id for i in plan.identities))
            logger.info("parallel execution enabled: %d tasks on %d node(s) across %d "
                        "machine(s) (%s), estimated %.2fx speedup", plan.num_tasks,
                        len(plan.nodes), len(machines), ", ".join(machines), plan.speedup,
                        extra=extra)
        else:
            logger.info("%s", plan.reason, extra=extra)

    # -- in-flight accounting and unit-aware routing ---------------------------------------

    def route(self, decision: Any, alternatives: Callable[[], Sequence[Any]]) -> Any:
        """Account for a routed request and, while its unit is busy, move it to an idle one.

        ``decision`` is the base balancer's result; one with a ``node`` attribute is a routing
        decision (anything else is returned untouched). When something is already in flight,
        ``alternatives()`` lists the other nodes it may move to (the decision's fallbacks); the
        chosen node and those are described in one batch, so this waits on DNS for at most one
        ``dns_timeout``. When the chosen node's unit is busy and an alternative's is idle, the
        decision's ``node`` becomes that one, its ``reasoning`` says why and its
        ``fallback_nodes`` start with the original node. The request then counts as in flight
        on its unit until :meth:`finish`, the decision's garbage collection or the timeout.
        """
        node = getattr(decision, "node", None)
        if node is None:
            return decision
        anything_busy = bool(self.in_flight())
        candidates = list(alternatives()) if anything_busy else []
        described = self.topology.describe_many([node, *candidates])
        chosen = described[0]
        if isinstance(chosen, InvalidNodeAddress):
            return decision
        target: HostIdentity = chosen
        with self._lock:
            self._expire()
            busy = self._counts.get(chosen.unit, 0)
            idle = next((i for i in described[1:] if isinstance(i, HostIdentity)
                         and i.node is not node and self._counts.get(i.unit, 0) == 0), None)
        if busy and idle is not None and _move(decision, node, chosen, idle, busy):
            target = idle
        self._open_token(decision, target)
        return decision

    def finish(self, decision: Any) -> None:
        """End the in-flight token of ``decision`` (routed by :meth:`route`); a decision that
        holds none (never routed, already finished or expired) is ignored."""
        token = getattr(decision, _TOKEN_ATTR, None)
        with self._lock:
            if isinstance(token, _Token) and self._open.get(token.serial) is token:
                self._end(token.serial)
            elif not isinstance(token, _Token):
                # A decision that could not carry its token: find it by identity.
                serial = next((t.serial for t in self._open.values()
                               if _referent(t) is decision), None)
                if serial is not None:
                    self._end(serial)
            # (a token of another decider, or one already ended, ends nothing here)
            self._expire()

    def in_flight(self) -> dict[Hashable, int]:
        """Requests in flight per execution unit (expired and collected ones removed)."""
        with self._lock:
            self._expire()
            return dict(self._counts)

    def _timeout(self, unit: Any) -> float:
        measured = self.cost_model.measured_task_seconds(unit)
        predicted = measured if measured is not None else 0.0
        return max(self._floor, self._factor * predicted)

    def _open_token(self, decision: Any, identity: HostIdentity) -> None:
        unit = identity.unit
        deadline = self._clock() + self._timeout(unit)
        serial = next(self._serials)
        finalizer: weakref.finalize[Any, Any] | None = None
        try:
            # The token ends when the decision is garbage collected. The finalizer holds only
            # the deque and the serial number, not the decision and not this decider.
            reference: Any = weakref.ref(decision)
        except TypeError:
            # Not weakly referenceable: the token keeps the decision itself, so the timeout (or
            # finish) ends it, and the decision lives at most that long.
            reference = _Strong(decision)
        else:
            finalizer = weakref.finalize(decision, self._collected.append, serial)
            finalizer.atexit = False
        token = _Token(serial, unit, deadline, reference, finalizer)
        try:
            setattr(decision, _TOKEN_ATTR, token)
        except (AttributeError, TypeError):
            pass  # finish() finds it by identity among the open tokens
        with self._lock:
            self._open[serial] = token
            self._counts[unit] = self._counts.get(unit, 0) + 1
            heapq.heappush(self._deadlines, (deadline, serial))

    def _end(self, serial: int) -> None:
        token = self._open.pop(serial, None)
        if token is None:
            return
        if token.finalizer is not None:
            token.finalizer.detach()
        remaining = self._counts.get(token.unit, 0) - 1
        if remaining > 0:
            self._counts[token.unit] = remaining
        else:
            self._counts.pop(token.unit, None)

    def _expire(self) -> None:
        """Under the lock: end collected tokens and those past their deadline."""
        collected = self._collected
        while collected:
            self._end(collected.popleft())
        now = self._clock()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, serial = heapq.heappop(deadlines)
            if serial in self._open:
                logger.debug("request on unit %s not reported within its timeout; no longer "
                             "counted as in flight", self._open[serial].unit,
                             extra={"event": "inflight_expired"})
                self._end(serial)
        if not self._open and deadlines:
            deadlines.clear()  # every token ended: drop their stale deadline entries


@dataclass(frozen=True, slots=True)
class _Strong:
    """A strong reference shaped like a weak one (``ref()`` gives the object)."""

    value: Any

    def __call__(self) -> Any:
        return self.value


def _referent(token: _Token) -> Any:
    return token.decision()


def _move(decision: Any, node: Any, chosen: HostIdentity, idle: HostIdentity, busy: int) -> bool:
    """Point ``decision`` at ``idle`` instead of the busy ``chosen``; ``False`` when the decision
    object cannot be changed (the base's choice then stands)."""
    unit = chosen.unit
    label = unit.label
    note = (f" Locality: moved from {chosen.address.url} (its execution unit {label} is busy "
            f"with {busy} request(s)) to {idle.address.url} on an idle unit.")
    try:
        decision.node = idle.node
    except AttributeError:
        return False
    if hasattr(decision, "reasoning"):
        decision.reasoning = f"{decision.reasoning}{note}"
    fallbacks = getattr(decision, "fallback_nodes", None)
    if isinstance(fallbacks, list):
        decision.fallback_nodes = [node] + [n for n in fallbacks if n is not idle.node]
    logger.debug("%s", note.strip(), extra={"event": "routing_moved"})
    return True


def _extra(plan: ExecutionPlan) -> dict[str, Any]:
    return {"event": "parallel_decision", "mode": plan.mode, "speedup": plan.speedup,
            "hosts": sorted(plan.hosts), "cause": plan.cause}


# -- finding an adapter's decider ----------------------------------------------------------


def attached_decider(adapter: Any) -> Decider:
    """``adapter``'s own decider, created on first use from the options its constructor stored
    under :data:`OPTIONS_KEY` (defaults when its constructor never stored any)."""
    found = adapter.__dict__.get(DECIDER_KEY)
    if found is None:
        with _CREATE_LOCK:
            found = adapter.__dict__.get(DECIDER_KEY)
            if found is None:
                options = adapter.__dict__.get(OPTIONS_KEY, (None, None, None, None))
                found = Decider.from_options(options)
                adapter.__dict__[DECIDER_KEY] = found
    assert isinstance(found, Decider)
    return found


def installed_decider(obj: Any) -> Decider:
    """The decider :func:`sollol_locality.install` gave ``obj``'s class; after
    :func:`sollol_locality.uninstall` (a patched method kept as a bound method) a default one
    built from ``LocalityConfig.from_env()``."""
    found = getattr(type(obj), INSTALLED_KEY, None)
    if isinstance(found, Decider):
        return found
    global _DEFAULT
    with _CREATE_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Decider()
        return _DEFAULT
