"""The baselines the library is measured against: SOLLOL's own registry and pool, holding given
nodes, and a configuration of ours that reads nothing and asks no real DNS server.

Layer: testing (the top layer). SOLLOL is imported inside the functions that need it, so that
importing this module stays cheap.

* :func:`sollol_registry`: ``sollol.registry.NodeRegistry`` with the URLs as healthy nodes;
* :func:`sollol_pool`: ``sollol.pool.OllamaPool`` holding the URLs, built without its
  constructor (which starts threads, HTTP clients and a Dask cluster);
* :func:`offline_config`: a :class:`~sollol_locality.LocalityConfig` that reads no environment
  and no topology file, and sends DNS only to a closed loopback port.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from sollol_locality import LocalityConfig

__all__ = ["CLOSED_NAMESERVER", "offline_config", "sollol_pool", "sollol_registry"]

CLOSED_NAMESERVER: Final = ("127.0.0.1", 9)
"""Nothing listens here: a name resolved by mistake fails fast, on loopback."""


def sollol_registry(urls: Sequence[str]) -> Any:
    """SOLLOL's own registry holding ``urls`` as healthy ``OllamaNode`` objects (inserted
    directly: ``add_node`` would health-check and resolve this machine's host name)."""
    from sollol.ollama_node import OllamaNode
    from sollol.registry import NodeRegistry

    registry = NodeRegistry()
    for url in urls:
        registry.nodes[url] = OllamaNode(url)
    return registry


def sollol_pool(urls: Sequence[str]) -> Any:
    """An ``OllamaPool`` holding ``urls``, without running its constructor; its
    ``should_use_parallel_execution`` and ``count_unique_physical_hosts`` read only
    ``self.nodes``."""
    from sollol.pool import OllamaPool

    pool = OllamaPool.__new__(OllamaPool)
    pool.nodes = [OllamaPool._normalize_node(pool, url) for url in urls]
    return pool


def offline_config(calibration_file: Path | None = None, **fields: Any) -> LocalityConfig:
    """Auto mode, ``min_speedup`` 1.0, no topology file, no environment, DNS to a closed port.

    Meant for IP-literal nodes: nothing is resolved. ``fields`` override any setting.
    """
    base: dict[str, Any] = {
        "mode": "auto", "min_speedup": 1.0, "topology_file": None,
        "nameservers": (CLOSED_NAMESERVER,), "dns_timeout": 0.5,
        "calibration_file": calibration_file,
    }  # fmt: skip
    if "environ" in inspect.signature(LocalityConfig).parameters:
        base["environ"] = {}  # where plain construction still reads the environment
    base.update(fields)
    return LocalityConfig(**base)
