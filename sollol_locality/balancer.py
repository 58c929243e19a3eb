"""`LocalityAwareLoadBalancer`: SOLLOL's load balancer with locality-aware decisions.

This is the only module of the package that imports ``sollol`` (which brings Ray and Dask and
takes about a second); ``import sollol_locality`` loads it only when the name is first used.
"""

from __future__ import annotations

from sollol.integration import SOLLOLLoadBalancer

from .mixin import LocalityAwareMixin

__all__ = ["LocalityAwareLoadBalancer"]


class LocalityAwareLoadBalancer(LocalityAwareMixin, SOLLOLLoadBalancer):  # type: ignore[misc]
    """``sollol.integration.SOLLOLLoadBalancer`` whose parallelism answers know the topology.

    Besides :meth:`should_parallelize` and :meth:`plan_execution`, SOLLOL's own
    :meth:`should_use_parallel` and :meth:`suggest_execution_mode` answer from the planner, so
    code written against SOLLOL gets the locality-aware answer without changes.
    """

    def should_use_parallel(self, num_tasks: int | None = None) -> bool:
        """Whether parallel execution is predicted to be faster for ``num_tasks`` tasks
        (default: one task per healthy node, at least two)."""
        nodes = self._locality_candidates(None)
        tasks = num_tasks if num_tasks is not None else max(2, len(nodes))
        return self.should_parallelize(tasks, nodes)

    def suggest_execution_mode(self, num_tasks: int | None = None) -> str:
        """SOLLOL's vocabulary: ``"parallel_multi_node"`` (three or more nodes to use),
        ``"parallel"`` or ``"sequential"``, from the locality-aware plan."""
        nodes = self._locality_candidates(None)
        tasks = num_tasks if num_tasks is not None else max(2, len(nodes))
        plan = self.plan_execution(tasks, nodes)
        if plan.mode == "sequential":
            return "sequential"
        return "parallel_multi_node" if len(plan.nodes) >= 3 else "parallel"

    def __repr__(self) -> str:
        # No DNS and no planning here: a repr must be cheap and must never raise.
        try:
            healthy = len(self.registry.get_healthy_nodes())
        except Exception:
            return f"{type(self).__name__}(locality_aware=True)"
        return f"{type(self).__name__}(healthy={healthy}, locality_aware=True)"
