"""`LocalityAwareMixin`: locality-aware decisions for any load balancer with a node registry.

::

    class MyBalancer(LocalityAwareMixin, SOLLOLLoadBalancer): ...

    lb = MyBalancer(registry)                     # the base constructor is unchanged
    if lb.should_parallelize(num_tasks=3):        # candidates: registry.get_healthy_nodes()
        plan = lb.plan_execution(3)               # plan.nodes: where to send the chunks
    ...
    lb.record_execution(plan, wall_seconds)       # the model moves toward what happened

Locality options (``locality_config=``, ``topology=``, ``cost_model=``, ``planner=``) are
keyword-only and taken out before the base constructor runs. The mixin's state is created lazily
on first use, so a subclass whose ``__init__`` never reaches the mixin still works.

When the base has ``route_request`` / ``record_performance`` (SOLLOL's balancer does), routing
becomes unit-aware: while requests are in flight (from ``route_request`` until
``record_performance``), a new request moves from a node whose execution unit is busy to a healthy
fallback node on an idle unit, and the decision's reasoning says so.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any, Protocol

from ._errors import InvalidNodeAddress, LocalityError
from .config import LocalityConfig
from .cost_model import ParallelismCostModel
from .planner import ExecutionPlan, ExecutionPlanner
from .topology import ExecutionUnit, NodeTopology

__all__ = ["LocalityAwareMixin", "NodeRegistry"]

logger = logging.getLogger(__name__)

_CREATE_LOCK = threading.Lock()


class NodeRegistry(Protocol):
    """What the mixin needs from ``self.registry``."""

    def get_healthy_nodes(self) -> Sequence[Any]: ...


class _LocalityState:
    """The mixin's per-balancer state, created on first use."""

    def __init__(self, config: LocalityConfig | None, topology: NodeTopology | None,
                 cost_model: ParallelismCostModel | None,
                 planner: ExecutionPlanner | None) -> None:
        if planner is not None:
            config = config or planner.config
            topology = topology or planner.topology
            cost_model = cost_model or planner.cost_model
        config = config or (topology.config if topology is not None else
                            cost_model.config if cost_model is not None
                            else LocalityConfig.from_env())
        topology = topology or NodeTopology(config)
        cost_model = cost_model or ParallelismCostModel(config)
        self.planner = planner or ExecutionPlanner(topology, cost_model, config)
        self.lock = threading.Lock()
        self.last_logged: dict[frozenset[str], tuple[str, tuple[str, ...]]] = {}
        self.inflight: dict[ExecutionUnit, int] = {}
        self.decision_units: dict[int, ExecutionUnit] = {}


class LocalityAwareMixin:
    """Adds ``should_parallelize()``, ``plan_execution()`` and ``record_execution()`` to a load
    balancer whose ``self.registry.get_healthy_nodes()`` lists its nodes."""

    registry: Any

    def __init__(self, *args: Any, locality_config: LocalityConfig | None = None,
                 topology: NodeTopology | None = None,
                 cost_model: ParallelismCostModel | None = None,
                 planner: ExecutionPlanner | None = None, **kwargs: Any) -> None:
        self.__dict__["_locality_options"] = (locality_config, topology, cost_model, planner)
        super().__init__(*args, **kwargs)

    # -- lazily created state ---------------------------------------------------------------

    def _locality(self) -> _LocalityState:
        state = self.__dict__.get("_locality_state")
        if state is None:
            with _CREATE_LOCK:
                state = self.__dict__.get("_locality_state")
                if state is None:
                    options = self.__dict__.get("_locality_options", (None, None, None, None))
                    state = _LocalityState(*options)
                    self.__dict__["_locality_state"] = state
        return state

    @property
    def planner(self) -> ExecutionPlanner:
        """The :class:`ExecutionPlanner` deciding for this balancer."""
        return self._locality().planner

    @property
    def topology(self) -> NodeTopology:
        """The :class:`NodeTopology` this balancer groups nodes with."""
        return self._locality().planner.topology

    @property
    def cost_model(self) -> ParallelismCostModel:
        """The :class:`ParallelismCostModel` this balancer predicts with."""
        return self._locality().planner.cost_model

    # -- decisions --------------------------------------------------------------------------

    def _locality_candidates(self, candidate_nodes: Sequence[Any] | None) -> list[Any]:
        if candidate_nodes is not None:
            return list(candidate_nodes)
        registry = getattr(self, "registry", None)
        if registry is None or not hasattr(registry, "get_healthy_nodes"):
            raise LocalityError(
                f"{type(self).__name__} has no registry with get_healthy_nodes(); pass "
                "candidate_nodes explicitly")
        return list(registry.get_healthy_nodes())

    def plan_execution(self, num_tasks: int,
                       candidate_nodes: Sequence[Any] | None = None) -> ExecutionPlan:
        """The full plan for ``num_tasks`` tasks: mode, nodes to dispatch to, speedup, reason.

        ``candidate_nodes`` defaults to ``self.registry.get_healthy_nodes()``. A node that cannot
        be parsed is left out with a warning; it never makes this raise.
        """
        nodes = self._locality_candidates(candidate_nodes)
        plan = self._locality().planner.plan(num_tasks, nodes)
        self._locality_log(plan)
        return plan

    def should_parallelize(self, num_tasks: int,
                           candidate_nodes: Sequence[Any] | None = None) -> bool:
        """Whether running ``num_tasks`` tasks in parallel is predicted to be faster.

        Logs a warning naming the shared machine when parallel is refused because the nodes
        share it, and an info line with the estimated speedup when parallel is enabled (each
        once per change of decision; repeats are debug-level).
        """
        return self.plan_execution(num_tasks, candidate_nodes).mode == "parallel"

    def record_execution(self, plan: ExecutionPlan, wall_seconds: float) -> None:
        """Tell the cost model how long a planned batch really took.

        The model moves toward what happened (see :meth:`ParallelismCostModel.observe`); the
        prediction and the measurement are logged side by side.
        """
        if not plan.nodes:
            return
        model = self.cost_model
        identities = plan.identities if len(plan.identities) == len(plan.nodes) else None
        model.observe(plan.mode, plan.nodes, plan.num_tasks, wall_seconds,
                      topology=self.topology, identities=identities)
        logger.info(
            "%s run of %d tasks on %d node(s): predicted %.3g %s, took %.3gs",
            plan.mode, plan.num_tasks, len(plan.nodes), plan.predicted_seconds, plan.time_unit,
            wall_seconds,
            extra={"event": "execution_recorded", "mode": plan.mode,
                   "predicted": plan.predicted_seconds, "measured": wall_seconds},
        )

    def _locality_log(self, plan: ExecutionPlan) -> None:
        state = self._locality()
        detail = plan.detail  # the decision's immutable detail: its log key is precomputed
        key = detail.host_ids if detail is not None else frozenset()
        summary = (plan.mode, detail.chosen_urls if detail is not None else ())
        changed = state.last_logged.get(key) != summary
        if not changed:  # the warm path: a repeated decision costs no log work unless asked
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s", plan.reason, extra=self._locality_extra(plan))
            return
        if len(state.last_logged) > 256:
            state.last_logged.clear()
        state.last_logged[key] = summary
        extra = self._locality_extra(plan)
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

    @staticmethod
    def _locality_extra(plan: ExecutionPlan) -> dict[str, Any]:
        return {"event": "parallel_decision", "mode": plan.mode, "speedup": plan.speedup,
                "hosts": sorted(plan.hosts), "cause": plan.cause}

    # -- unit-aware routing -----------------------------------------------------------------

    def route_request(self, *args: Any, **kwargs: Any) -> Any:
        """The base's routing, then moved off a busy execution unit when an idle one exists.

        The chosen node and, while anything is in flight, its alternatives are described in one
        batch, so a routing call waits on DNS for at most one ``dns_timeout``.
        """
        decision = super().route_request(*args, **kwargs)  # type: ignore[misc]
        node = getattr(decision, "node", None)
        if node is None:
            return decision
        state = self._locality()
        with state.lock:
            anything_busy = bool(state.inflight)
        candidates = self._locality_alternatives(decision, node) if anything_busy else []
        described = self.topology.describe_many([node, *candidates])
        chosen = described[0]
        if isinstance(chosen, InvalidNodeAddress):
            return decision
        unit = chosen.unit
        with state.lock:
            busy = state.inflight.get(unit, 0)
            idle = next((i for i in described[1:] if not isinstance(i, InvalidNodeAddress)
                         and i.node is not node and state.inflight.get(i.unit, 0) == 0), None)
        if busy and idle is not None:
            note = (f" Locality: moved from {chosen.address.url} (its execution unit "
                    f"{unit.label} is busy with {busy} request(s)) to "
                    f"{idle.address.url} on an idle unit.")
            try:
                decision.node = idle.node
                if hasattr(decision, "reasoning"):
                    decision.reasoning = f"{decision.reasoning}{note}"
                fallbacks = getattr(decision, "fallback_nodes", None)
                if isinstance(fallbacks, list):
                    decision.fallback_nodes = [node] + [n for n in fallbacks
                                                        if n is not idle.node]
                unit = idle.unit
                logger.debug("%s", note.strip(), extra={"event": "routing_moved"})
            except AttributeError:
                pass  # an immutable decision object: keep the base's choice
        with state.lock:
            state.inflight[unit] = state.inflight.get(unit, 0) + 1
            state.decision_units[id(decision)] = unit
        return decision

    def _locality_alternatives(self, decision: Any, node: Any) -> list[Any]:
        candidates = getattr(decision, "fallback_nodes", None)
        if candidates:
            return list(candidates)
        try:
            return [n for n in self._locality_candidates(None) if n is not node]
        except LocalityError:
            return []

    def record_performance(self, decision: Any, *args: Any, **kwargs: Any) -> Any:
        """The base's performance recording; also ends the request's in-flight count."""
        try:
            return super().record_performance(decision, *args, **kwargs)  # type: ignore[misc]
        finally:
            state = self._locality()
            with state.lock:
                unit = state.decision_units.pop(id(decision), None)
                if unit is not None:
                    remaining = state.inflight.get(unit, 0) - 1
                    if remaining > 0:
                        state.inflight[unit] = remaining
                    else:
                        state.inflight.pop(unit, None)
