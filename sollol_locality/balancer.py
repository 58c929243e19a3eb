"""`LocalityAwareLoadBalancer`: SOLLOL's load balancer with locality-aware decisions.

This module imports ``sollol`` (which brings Ray and Dask and takes about a second);
``import sollol_locality`` loads it only when the name is first used.
"""

from __future__ import annotations

from sollol.integration import SOLLOLLoadBalancer

from .mixin import LocalityAwareMixin

__all__ = ["LocalityAwareLoadBalancer"]


class LocalityAwareLoadBalancer(LocalityAwareMixin, SOLLOLLoadBalancer):  # type: ignore[misc]
    """``sollol.integration.SOLLOLLoadBalancer`` whose parallelism answers know the topology.

    Besides :meth:`should_parallelize` and :meth:`plan_execution`, SOLLOL's own
    :meth:`should_use_parallel` and :meth:`suggest_execution_mode` answer from the planner (as
    they do for :class:`LocalityAwareMixin` on any base that has them), so code written against
    SOLLOL gets the locality-aware answer without changes.
    """

    def __repr__(self) -> str:
        # No DNS and no planning here: a repr must be cheap and must never raise.
        try:
            healthy = len(self.registry.get_healthy_nodes())
        except Exception:
            return f"{type(self).__name__}(locality_aware=True)"
        return f"{type(self).__name__}(healthy={healthy}, locality_aware=True)"
