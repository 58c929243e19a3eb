"""Shared test helpers: node shapes and a topology that never sends a DNS query."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sollol_locality import LocalityAwareMixin, LocalityConfig, NodeTopology

# Nothing listens here: a test that resolved a name by mistake would fail fast, on loopback.
CLOSED_NAMESERVER = ("127.0.0.1", 9)


def offline_config(**fields: Any) -> LocalityConfig:
    """A config that reads no environment, no calibration file and asks no real DNS server."""
    base: dict[str, Any] = {
        "mode": "auto",
        "min_speedup": 1.0,
        "topology_file": None,
        "dns_timeout": 0.3,
        "nameservers": (CLOSED_NAMESERVER,),
        "calibration_file": None,
    }
    base.update(fields)
    return LocalityConfig(**base)


def offline_topology(**fields: Any) -> NodeTopology:
    return NodeTopology(offline_config(**fields))


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


def gpu_node(url: str, device: str | None = None, **metrics: Any) -> OllamaNode:
    node = OllamaNode(url, capabilities=Capabilities(has_gpu=True, gpu_count=1))
    if device is not None:
        node.gpu = device  # type: ignore[attr-defined]
    for key, value in metrics.items():
        setattr(node.metrics, key, value)
    return node


def timed_node(url: str, seconds: float, requests: int = 10) -> OllamaNode:
    return OllamaNode(url, metrics=Metrics(avg_response_time=seconds, total_requests=requests))


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
