"""Shared test helpers: node shapes and a topology that never sends a DNS query."""

from __future__ import annotations

from typing import Any

from sollol_locality import LocalityConfig, NodeTopology
from sollol_locality.testing.fakes import (  # noqa: F401 (re-exported for the tests)
    Capabilities,
    FakeClock,
    Metrics,
    MinimalBalancer,
    OllamaNode,
    Registry,
)

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


def gpu_node(url: str, device: str | None = None, **metrics: Any) -> OllamaNode:
    node = OllamaNode(url, capabilities=Capabilities(has_gpu=True, gpu_count=1))
    if device is not None:
        node.gpu = device  # type: ignore[attr-defined]
    for key, value in metrics.items():
        setattr(node.metrics, key, value)
    return node


def timed_node(url: str, seconds: float, requests: int = 10) -> OllamaNode:
    return OllamaNode(url, metrics=Metrics(avg_response_time=seconds, total_requests=requests))
