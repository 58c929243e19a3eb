"""sollol-locality: topology-aware parallel/sequential dispatch decisions for SOLLOL.

Which Ollama nodes share a physical machine, what running tasks on them in parallel really costs,
and therefore when to run a batch in parallel, on which nodes, and when to run it sequentially.

``import sollol_locality`` is light: it does not import ``sollol`` (Ray, Dask). Only touching
:class:`LocalityAwareLoadBalancer` or the pool integration does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._errors import (
    CalibrationError,
    ConfigError,
    InvalidNodeAddress,
    LocalityError,
    TopologyFileError,
)
from .addresses import NodeAddress, parse_node_address
from .config import LocalityConfig
from .cost_model import CostPriors, ParallelismCostModel, SpeedupEstimate
from .mixin import LocalityAwareMixin
from .planner import ExecutionPlan, ExecutionPlanner, PlanDetail
from .topology import HostIdentity, NodeTopology

if TYPE_CHECKING:
    from ._install import install, uninstall
    from .balancer import LocalityAwareLoadBalancer
    from .pool import LocalityAwarePool, LocalityAwarePoolMixin

    __version__: str


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sollol-locality")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


__all__ = [
    "CalibrationError",
    "ConfigError",
    "CostPriors",
    "ExecutionPlan",
    "ExecutionPlanner",
    "HostIdentity",
    "InvalidNodeAddress",
    "LocalityAwareLoadBalancer",
    "LocalityAwareMixin",
    "LocalityAwarePool",
    "LocalityAwarePoolMixin",
    "LocalityConfig",
    "LocalityError",
    "NodeAddress",
    "NodeTopology",
    "ParallelismCostModel",
    "PlanDetail",
    "SpeedupEstimate",
    "TopologyFileError",
    "install",
    "parse_node_address",
    "uninstall",
]

# Loaded on first use: these import sollol (Ray, Dask), which `import sollol_locality` must not.
_LAZY = {
    "LocalityAwareLoadBalancer": ".balancer",
    "LocalityAwarePool": ".pool",
    "LocalityAwarePoolMixin": ".pool",
    "install": "._install",
    "uninstall": "._install",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":  # from the package metadata, read on first use (importlib.metadata
        value = _version()    # costs more to import than the rest of this package's start)
        globals()[name] = value
        return value
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
