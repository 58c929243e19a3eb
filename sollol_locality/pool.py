"""Locality-aware answers for SOLLOL's ``OllamaPool``.

::

    from sollol_locality import LocalityAwarePool, LocalityConfig

    pool = LocalityAwarePool(nodes=["http://localhost:11434", "http://localhost:11435"],
                             locality_config=LocalityConfig())   # other options: OllamaPool's
    pool.count_unique_physical_hosts()        # 1: one machine, whatever address names it
    pool.should_use_parallel_execution(3)     # False here, with a warning naming the machine
    plan = pool.plan_execution(3)             # the full ExecutionPlan: mode, nodes, speedup, reason

:class:`LocalityAwarePoolMixin` changes four things of ``sollol.pool.OllamaPool``:

* ``count_unique_physical_hosts()`` counts physical machines with :class:`NodeTopology`
  (loopback, ``0.0.0.0``, ``::1``, the machine's own names and interface addresses and container
  bridge networks are all this machine; DNS under one deadline, never a blocking
  ``gethostbyname``).
* ``should_use_parallel_execution(num_tasks)`` answers from the :class:`ExecutionPlanner` (the
  cost model, not "two or more addresses"); ``plan_execution(num_tasks)`` gives the whole plan.
* ``_deduplicate_nodes()`` (run by ``OllamaPool.__init__``) merges only nodes that are the same
  machine *and* the same port (one Ollama instance named twice); instances of one machine on
  different ports are all kept, and so is a container on this machine (its own network namespace,
  its own ports) even on the host instance's port. Every merge is logged.
* ``_normalize_node()`` parses every node shape with :func:`parse_node_address` (``[::1]:11434``,
  ``http://[fe80::1%eth0]:11434``, a trailing ``/``, objects with ``.url``) into the pool's own
  ``{"host": ..., "port": ...}`` dict. OllamaPool builds URLs as ``f"http://{host}:{port}"``, so an
  IPv6 host is kept in brackets (``"[::1]"``) and a zone id as ``%eth0`` (what ``getaddrinfo``
  accepts; ``%25`` is not).

The mixin's functions decide with a :class:`~sollol_locality.decider.Decider`: a
:class:`LocalityAwarePoolMixin` instance has its own (created on first use from the keyword-only
options, like :class:`LocalityAwareMixin`); a plain ``OllamaPool`` whose class
:func:`sollol_locality.install` patched uses the installation's shared one. Both see the pool's
node list as their candidates, and both log as the balancer mixin does.

The start-up de-duplication uses :attr:`HostIdentity.instance`, the same definition of "one
Ollama instance" as the planner: a pool keeps exactly the instances the planner tells apart.

This module does not import ``sollol``: only touching :class:`LocalityAwarePool` does.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._errors import InvalidNodeAddress
from .addresses import NodeAddress, describe_input, parse_node_address
from .config import LocalityConfig
from .cost_model import ParallelismCostModel
from .decider import DECIDER_KEY, OPTIONS_KEY, Decider, attached_decider, installed_decider
from .planner import ExecutionPlan, ExecutionPlanner
from .topology import HostIdentity, Instance, NodeTopology

if TYPE_CHECKING:
    LocalityAwarePool: type[Any]  # built on first use by the module __getattr__ below

__all__ = ["LocalityAwarePool", "LocalityAwarePoolMixin", "normalize_pool_node"]

logger = logging.getLogger(__name__)

_BUILD_LOCK = threading.Lock()


# -- node normalisation ---------------------------------------------------------------------


def _pool_host(address: NodeAddress) -> str:
    """The ``host`` value OllamaPool needs so that ``f"http://{host}:{port}"`` is a valid URL.

    IPv6 literals are bracketed (``"[::1]"``); a zone id is written ``%zone`` inside the brackets
    (``"[fe80::1%eth0]"``), which httpx passes on to ``getaddrinfo`` as it expects.
    """
    if ":" in address.host:
        return f"[{address.host}%{address.zone}]" if address.zone else f"[{address.host}]"
    return address.host


def normalize_pool_node(node: object) -> dict[str, Any]:
    """Any node shape as OllamaPool's ``{"host": ..., "port": ...}`` dict (port as text).

    A dict already in that form (host as OllamaPool needs it, port equal) is returned as is, the
    caller's own object; otherwise a new dict keeps the mapping's other keys (``"gpu"``,
    ``"models"``, ...) but not ``"url"`` or ``"scheme"``.

    Raises:
        InvalidNodeAddress: (a ``ValueError``, as OllamaPool raises) the node has no usable host
            and port; the message names it and why.
    """
    address = parse_node_address(node)
    shown = describe_input(node)
    if address.scheme != "http":
        logger.warning("OllamaPool connects over plain HTTP; the %s scheme of node %s is not used",
                       address.scheme, shown, extra={"event": "pool_node_scheme_ignored"})
    if address.path:
        logger.warning("OllamaPool sends requests to the root of each node; the path %r of node "
                       "%s is not used", address.path, shown,
                       extra={"event": "pool_node_path_ignored"})
    host, port = _pool_host(address), str(address.port)
    if isinstance(node, Mapping):
        if ("url" not in node and isinstance(node, dict) and node.get("host") == host
                and str(node.get("port")) == port):
            return node
        extra = {k: v for k, v in node.items() if k not in ("url", "host", "port", "scheme")}
        return {**extra, "host": host, "port": port}
    return {"host": host, "port": port}


# -- the mixin ------------------------------------------------------------------------------


def _pool_nodes(pool: Any) -> list[Any]:
    # A copy without taking pool._lock: OllamaPool's VRAM thread holds that lock across HTTP
    # requests, and a decision must not wait behind them. list() of a list is atomic.
    return list(getattr(pool, "nodes", None) or ())


def _decider(pool: Any) -> Decider:
    """The decider ``pool`` decides with: its own for mixin instances (created on first use),
    else the one :func:`sollol_locality.install` gave its class."""
    if isinstance(pool, LocalityAwarePoolMixin):
        return attached_decider(pool)
    return installed_decider(pool)


def _candidates(pool: Any, candidate_nodes: Sequence[Any] | None) -> list[Any]:
    return list(candidate_nodes) if candidate_nodes is not None else _pool_nodes(pool)


def _node_text(node: Any, identity: HostIdentity | InvalidNodeAddress | None = None) -> str:
    if isinstance(identity, HostIdentity):
        return identity.address.netloc
    if isinstance(node, Mapping) and "host" in node:
        return f"{node.get('host')}:{node.get('port')}"
    return describe_input(node)


class LocalityAwarePoolMixin:
    """Locality-aware ``count_unique_physical_hosts()``, ``should_use_parallel_execution()``,
    ``plan_execution()``, node normalisation and de-duplication for ``sollol.pool.OllamaPool``.

    Use it before the pool class: ``class MyPool(LocalityAwarePoolMixin, OllamaPool)`` (or the
    ready :class:`LocalityAwarePool`). Locality options are keyword-only and taken out before the
    base constructor runs; the decider is created on first use (which is OllamaPool's own
    de-duplication, inside its constructor):

    Args:
        locality_config: settings (:class:`LocalityConfig`); from the environment when omitted.
        topology, cost_model, planner: share existing ones, for example one
            :class:`ExecutionPlanner` across many short-lived pools (its DNS cache and
            calibration then serve them all).
        decider: a whole :class:`~sollol_locality.decider.Decider` to share (the options above
            are then not used).
    """

    nodes: list[Any]

    def __init__(self, *args: Any, locality_config: LocalityConfig | None = None,
                 topology: NodeTopology | None = None,
                 cost_model: ParallelismCostModel | None = None,
                 planner: ExecutionPlanner | None = None, decider: Decider | None = None,
                 **kwargs: Any) -> None:
        self.__dict__[OPTIONS_KEY] = (locality_config, topology, cost_model, planner)
        if decider is not None:
            self.__dict__[DECIDER_KEY] = decider
        super().__init__(*args, **kwargs)

    # -- the decider ------------------------------------------------------------------------

    @property
    def decider(self) -> Decider:
        """The :class:`~sollol_locality.decider.Decider` behind this pool's answers."""
        return _decider(self)

    @property
    def planner(self) -> ExecutionPlanner:
        """The :class:`ExecutionPlanner` deciding for this pool."""
        return _decider(self).planner

    @property
    def topology(self) -> NodeTopology:
        """The :class:`NodeTopology` this pool groups its nodes with."""
        return _decider(self).topology

    @property
    def cost_model(self) -> ParallelismCostModel:
        """The :class:`ParallelismCostModel` this pool predicts with."""
        return _decider(self).cost_model

    # -- decisions --------------------------------------------------------------------------

    def count_unique_physical_hosts(self) -> int:
        """The number of distinct physical machines among the pool's nodes.

        ``127.0.0.1``, ``0.0.0.0``, ``localhost``, ``[::1]``, this machine's names and interface
        addresses and containers on its bridges are one machine; two names sharing an address are
        one machine. Nodes that cannot be parsed are not counted (as the plan leaves them out).
        """
        nodes = _pool_nodes(self)
        hosts = set()
        for node, identity in zip(nodes, _decider(self).topology.describe_many(nodes),
                                  strict=True):
            if isinstance(identity, InvalidNodeAddress):
                logger.debug("node %s not counted: %s", _node_text(node), identity.reason)
                continue
            hosts.add(identity.physical_host_id)
        return len(hosts)

    def should_use_parallel_execution(self, num_tasks: int) -> bool:
        """Whether running ``num_tasks`` tasks in parallel across the pool's nodes is predicted
        to be faster than one after another.

        Logs a warning naming the shared machine when parallel is refused because the nodes share
        it, and an info line with the estimated speedup when it is enabled (once per change).
        """
        return _decider(self).should_parallelize(num_tasks, _pool_nodes(self))

    def plan_execution(self, num_tasks: int,
                       candidate_nodes: Sequence[Any] | None = None) -> ExecutionPlan:
        """The full plan for ``num_tasks`` tasks: mode, the pool's node dicts to dispatch to,
        speedup and reason. ``candidate_nodes`` defaults to every node of the pool."""
        return _decider(self).plan(num_tasks, _candidates(self, candidate_nodes))

    def should_parallelize(self, num_tasks: int,
                           candidate_nodes: Sequence[Any] | None = None) -> bool:
        """:meth:`LocalityAwareMixin.should_parallelize` over the pool's nodes."""
        return _decider(self).should_parallelize(num_tasks, _candidates(self, candidate_nodes))

    def record_execution(self, plan: ExecutionPlan, wall_seconds: float, *,
                         timings: Sequence[tuple[Any, float, float]] | None = None) -> None:
        """Tell the cost model how a planned batch really went (see
        :meth:`LocalityAwareMixin.record_execution`)."""
        _decider(self).record_execution(plan, wall_seconds, timings=timings)

    # -- start-up: normalisation and de-duplication ----------------------------------------

    def _normalize_node(self, node: Any) -> dict[str, Any]:
        """Any node shape as the pool's ``{"host": ..., "port": ...}`` dict
        (:func:`normalize_pool_node`)."""
        return normalize_pool_node(node)

    def _deduplicate_nodes(self) -> None:
        """Merge nodes that are one Ollama instance (:attr:`HostIdentity.instance`, as the
        planner sees it: same machine *and* same port; a container on this machine has its own
        ports); keep every other instance of a machine. The first node named of each instance
        stays (the caller's own dict); each merge is logged."""
        nodes = _pool_nodes(self)
        if len(nodes) < 2:
            return
        identities = _decider(self).topology.describe_many(nodes)
        kept: list[Any] = []
        first: dict[Instance, tuple[Any, HostIdentity]] = {}
        instances_by_host: dict[str, list[str]] = {}
        for node, identity in zip(nodes, identities, strict=True):
            if isinstance(identity, InvalidNodeAddress):
                logger.warning("pool node %s kept as given: %s", _node_text(node),
                               identity.reason, extra={"event": "pool_node_unparsed"})
                kept.append(node)
                continue
            key = identity.instance
            where = (identity.physical_host_id if key.host == identity.physical_host_id
                     else f"{identity.physical_host_id}, container {key.host}")
            if key in first:
                survivor, survivor_identity = first[key]
                logger.info(
                    "pool nodes %s and %s are one Ollama instance (machine %s, port %d); "
                    "keeping %s", _node_text(survivor, survivor_identity),
                    _node_text(node, identity), where, key.port,
                    _node_text(survivor, survivor_identity),
                    extra={"event": "pool_node_merged", "host": identity.physical_host_id,
                           "port": key.port})
                continue
            first[key] = (node, identity)
            kept.append(node)
            instances_by_host.setdefault(identity.physical_host_id, []).append(
                _node_text(node, identity))
        for host, members in instances_by_host.items():
            if len(members) > 1:
                logger.info("pool nodes %s are separate Ollama instances on one machine (%s); "
                            "all are kept", ", ".join(members), host,
                            extra={"event": "pool_nodes_share_machine", "host": host})
        if len(kept) != len(nodes):
            lock = getattr(self, "_lock", None)
            with lock if lock is not None else contextlib.nullcontext():
                self.nodes = kept

    # -- shutdown ---------------------------------------------------------------------------

    def stop(self) -> None:
        """The pool's own ``stop()``; then the DNS resolver this pool created (if it did) stops
        its background refresh."""
        try:
            super().stop()  # type: ignore[misc]
        finally:
            decider = self.__dict__.get(DECIDER_KEY)
            if isinstance(decider, Decider):
                decider.close()


# -- LocalityAwarePool, built on first use (importing sollol is slow) -----------------------


def _build_pool_class() -> type:
    from sollol.pool import OllamaPool

    class LocalityAwarePool(LocalityAwarePoolMixin, OllamaPool):  # type: ignore[misc]
        """``sollol.pool.OllamaPool`` with :class:`LocalityAwarePoolMixin`: every OllamaPool
        option works as before, plus the keyword-only ``locality_config``, ``topology``,
        ``cost_model`` and ``planner``."""

    LocalityAwarePool.__module__ = __name__
    LocalityAwarePool.__qualname__ = "LocalityAwarePool"
    return LocalityAwarePool


def __getattr__(name: str) -> Any:
    if name == "LocalityAwarePool":
        with _BUILD_LOCK:
            cls = globals().get(name)
            if cls is None:
                cls = _build_pool_class()
                globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
