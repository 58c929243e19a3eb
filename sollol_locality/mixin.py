"""`LocalityAwareMixin`: locality-aware decisions for any load balancer with a node registry.

::

    class MyBalancer(LocalityAwareMixin, SOLLOLLoadBalancer): ...

    lb = MyBalancer(registry)                     # the base constructor is unchanged
    if lb.should_parallelize(num_tasks=3):        # candidates: registry.get_healthy_nodes()
        plan = lb.plan_execution(3)               # plan.nodes: where to send the chunks
    ...
    lb.record_execution(plan, wall_seconds)       # the model moves toward what happened

Locality options (``locality_config=``, ``topology=``, ``cost_model=``, ``planner=``, or a whole
``decider=`` to share) are keyword-only and taken out before the base constructor runs. The
mixin's decider is created lazily on first use, so a subclass whose ``__init__`` never reaches the
mixin still works.

When the base has SOLLOL's own ``should_use_parallel()`` / ``suggest_execution_mode()``
(``sollol.integration.SOLLOLLoadBalancer`` does), the mixin overrides them with the
locality-aware answers (both gain an optional ``num_tasks``), so code written against SOLLOL gets
them unchanged. A base without them does not gain them.

When the base has ``route_request`` / ``record_performance`` (SOLLOL's balancer does), routing
becomes unit-aware: while requests are in flight, a new request moves from a node whose execution
unit is busy to a healthy fallback node on an idle unit, and the decision's reasoning says so. A
request stops counting as in flight when ``record_performance`` reports it, when its decision
object is garbage collected, or after a timeout (see :class:`~sollol_locality.decider.Decider`).

Every decision, log line and in-flight count comes from one
:class:`~sollol_locality.decider.Decider` per balancer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, Protocol, TypeVar

from ._dispatch import DEFAULT_MAX_ATTEMPTS, CancelToken, DispatchEvent
from ._errors import LocalityError
from .config import LocalityConfig
from .cost_model import ParallelismCostModel
from .decider import DECIDER_KEY, OPTIONS_KEY, Decider, attached_decider
from .planner import ExecutionPlan, ExecutionPlanner
from .topology import NodeTopology

__all__ = ["LocalityAwareMixin", "NodeRegistry"]

T = TypeVar("T")
R = TypeVar("R")


class NodeRegistry(Protocol):
    """What the mixin needs from ``self.registry``."""

    def get_healthy_nodes(self) -> Sequence[Any]: ...


def _should_use_parallel(self: LocalityAwareMixin, num_tasks: int | None = None) -> bool:
    """Locality-aware: whether parallel execution is predicted to be faster for ``num_tasks``
    tasks (default: one task per healthy node, at least two)."""
    return self.decider.should_use_parallel(self._locality_candidates(None), num_tasks)


def _suggest_execution_mode(self: LocalityAwareMixin, num_tasks: int | None = None) -> str:
    """Locality-aware, in SOLLOL's vocabulary: ``"parallel_multi_node"`` (three or more nodes to
    use), ``"parallel"`` or ``"sequential"``, from the plan for ``num_tasks`` tasks (default: one
    task per healthy node, at least two)."""
    return self.decider.suggest_execution_mode(self._locality_candidates(None), num_tasks)


_should_use_parallel.__name__ = _should_use_parallel.__qualname__ = "should_use_parallel"
_suggest_execution_mode.__name__ = "suggest_execution_mode"
_suggest_execution_mode.__qualname__ = "suggest_execution_mode"

SOLLOL_ANSWERS: Final[dict[str, Callable[..., Any]]] = {
    "should_use_parallel": _should_use_parallel,
    "suggest_execution_mode": _suggest_execution_mode,
}
"""SOLLOL's own parallelism questions and their locality-aware answers."""


class LocalityAwareMixin:
    """Adds ``should_parallelize()``, ``plan_execution()`` and ``record_execution()`` to a load
    balancer whose ``self.registry.get_healthy_nodes()`` lists its nodes, and makes the base's
    ``should_use_parallel()`` / ``suggest_execution_mode()`` (when it has them) locality-aware."""

    registry: Any

    def __init__(self, *args: Any, locality_config: LocalityConfig | None = None,
                 topology: NodeTopology | None = None,
                 cost_model: ParallelismCostModel | None = None,
                 planner: ExecutionPlanner | None = None, decider: Decider | None = None,
                 **kwargs: Any) -> None:
        self.__dict__[OPTIONS_KEY] = (locality_config, topology, cost_model, planner)
        if decider is not None:
            self.__dict__[DECIDER_KEY] = decider
        super().__init__(*args, **kwargs)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        after = mro[mro.index(LocalityAwareMixin) + 1:]
        for name, answer in SOLLOL_ANSWERS.items():
            if name in cls.__dict__:
                continue  # the subclass answers itself
            owner = next((k for k in mro[1:] if name in k.__dict__), None)
            if owner is not None and owner in after and not issubclass(owner,
                                                                        LocalityAwareMixin):
                setattr(cls, name, answer)  # the base's (SOLLOL's) answer, overridden

    # -- the decider, created on first use --------------------------------------------------

    @property
    def decider(self) -> Decider:
        """The :class:`~sollol_locality.decider.Decider` behind this balancer's answers."""
        return attached_decider(self)

    @property
    def planner(self) -> ExecutionPlanner:
        """The :class:`ExecutionPlanner` deciding for this balancer."""
        return attached_decider(self).planner

    @property
    def topology(self) -> NodeTopology:
        """The :class:`NodeTopology` this balancer groups nodes with."""
        return attached_decider(self).topology

    @property
    def cost_model(self) -> ParallelismCostModel:
        """The :class:`ParallelismCostModel` this balancer predicts with."""
        return attached_decider(self).cost_model

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
        return attached_decider(self).plan(num_tasks, self._locality_candidates(candidate_nodes))

    def should_parallelize(self, num_tasks: int,
                           candidate_nodes: Sequence[Any] | None = None) -> bool:
        """Whether running ``num_tasks`` tasks in parallel is predicted to be faster.

        Logs a warning naming the shared machine when parallel is refused because the nodes
        share it, and an info line with the estimated speedup when parallel is enabled (each
        once per change of decision; repeats are debug-level).
        """
        return self.plan_execution(num_tasks, candidate_nodes).mode == "parallel"

    def record_execution(self, plan: ExecutionPlan, wall_seconds: float, *,
                         timings: Sequence[tuple[Any, float, float]] | None = None) -> None:
        """Tell the cost model how a planned batch really went.

        ``timings`` (optional) is one ``(node, start_s, end_s)`` per task, seconds from the
        batch's start. The model moves toward what happened (see
        :meth:`ExecutionPlanner.record_execution`); the prediction and the measurement are
        logged side by side.
        """
        attached_decider(self).record_execution(plan, wall_seconds, timings=timings)

    def run_batch(self, tasks: Iterable[T], call: Callable[[Any, T], R],
                  candidate_nodes: Sequence[Any] | None = None, *,
                  on_event: Callable[[DispatchEvent], object] | None = None,
                  max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                  cancel: CancelToken | None = None, explore: bool = True) -> list[R]:
        """Plan ``tasks`` over ``candidate_nodes`` (default: the registry's healthy nodes), run
        ``call(node, task)`` for each as the plan says and return the results in task order.

        A failing node's tasks are retried elsewhere and the node is left out of this
        balancer's next decisions for a back-off period; what ran is recorded. See
        :meth:`ExecutionPlanner.run`.

        Raises:
            DispatchError: some task got no result; it names each failed node and its error.
        """
        return attached_decider(self).run(tasks, call, self._locality_candidates(candidate_nodes),
                                          on_event=on_event, max_attempts=max_attempts,
                                          cancel=cancel, explore=explore)

    # -- unit-aware routing -----------------------------------------------------------------

    def route_request(self, *args: Any, **kwargs: Any) -> Any:
        """The base's routing, then moved off a busy execution unit when an idle one exists.

        The chosen node and, while anything is in flight, its alternatives are described in one
        batch, so a routing call waits on DNS for at most one ``dns_timeout``.
        """
        decision = super().route_request(*args, **kwargs)  # type: ignore[misc]
        node = getattr(decision, "node", None)
        return attached_decider(self).route(
            decision, lambda: self._locality_alternatives(decision, node))

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
            attached_decider(self).finish(decision)
