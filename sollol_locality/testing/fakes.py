"""Stand-ins for what a caller hands the library: node objects, a registry, a balancer, a clock.

Layer: testing (the top layer). Shared by the tests and the benchmarks, so neither has to reach
into the other.

* :class:`OllamaNode` (with :class:`Capabilities` and :class:`Metrics`): the shape of
  SynapticLlamas' node objects, the attributes the library reads;
* :class:`Registry`: a node registry whose ``get_healthy_nodes()`` returns what it holds;
* :class:`MinimalBalancer`: :class:`~sollol_locality.LocalityAwareMixin` on a balancer that has
  a registry and nothing else;
* :class:`FakeClock`: a monotonic clock that moves only when told to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sollol_locality import LocalityAwareMixin

__all__ = ["Capabilities", "FakeClock", "Metrics", "MinimalBalancer", "OllamaNode", "Registry"]


@dataclass
class Capabilities:
    has_gpu: bool = False
    gpu_count: int = 0
    gpu_memory_mb: int = 0
    cpu_cores: int = 8


@dataclass
class Metrics:
    is_healthy: bool = True
    avg_response_time: float = 0.0  # seconds
    total_requests: int = 0


@dataclass(eq=False)
class OllamaNode:
    """The shape of SynapticLlamas' OllamaNode (the attributes the library reads)."""

    url: str
    name: str = ""
    priority: int = 0
    capabilities: Capabilities = field(default_factory=Capabilities)
    metrics: Metrics = field(default_factory=Metrics)

    @property
    def is_healthy(self) -> bool:
        return self.metrics.is_healthy

    def calculate_load_score(self) -> float:
        return 0.0


class FakeClock:
    """A monotonic clock that moves only when told to (cachetools' test idiom)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 1.0) -> None:
        self.now += seconds


class Registry:
    """A node registry: ``get_healthy_nodes()`` returns the nodes it holds."""

    def __init__(self, nodes: list[Any] | None = None) -> None:
        self.nodes: list[Any] = [] if nodes is None else nodes

    def get_healthy_nodes(self) -> list[Any]:
        return list(self.nodes)


class _BareBalancer:
    def __init__(self, registry: Any) -> None:
        self.registry = registry


class MinimalBalancer(LocalityAwareMixin, _BareBalancer):
    """The mixin on a minimal SynapticLlamas-shaped balancer (a registry and nothing else)."""
