"""Physical host identity: which nodes share a machine.

:class:`NodeTopology` answers, for any node shape, *which physical machine is this?*

1. The address is parsed (:mod:`sollol_locality.addresses`).
2. The topology file wins where it speaks: a ``[nodes."URL"]`` entry names the node's host and GPU;
   a ``[hosts.NAME]`` alias (name or address) names the host.
3. This machine is recognised without any query (:mod:`sollol_locality.local`): loopback and
   unspecified addresses, its own names, interface addresses and container networks hosted on it.
   Every one of them is the host ``"localhost"``.
4. Other names are resolved (:mod:`sollol_locality.resolver`): the hosts file, then DNS, all names
   of one call together under one deadline (``LocalityConfig.dns_timeout``). A name that resolves
   to an address of this machine is this machine.
5. Nodes whose addresses overlap are merged into one host (multi-homed hosts, CNAMEs, a name and
   its address). A name once seen resolving to several addresses keeps those addresses together
   in later calls, so each alias maps to the same id. The id of a remote host is the override's
   host name if one applies, otherwise its canonical address: the smallest of its addresses,
   IPv4 before IPv6, so the id does not depend on input order.
6. For a node of this machine, the process listening on its port is read
   (:mod:`sollol_locality.processes`, once per refresh, never per decision): its CPU set and
   GPU ids decide its unit (instances whose sets overlap share one; disjoint ones are separate
   units of this machine), its ``OLLAMA_NUM_PARALLEL`` its slots, its CPU share its speed
   prior. The topology file still wins; a process that cannot be read leaves the address to
   decide, and ``HostIdentity.process`` says why.
7. A name that cannot be resolved never raises: it is its own host, ``resolved=False``, with the
   name as its id and locality group ``"unknown"``.
7. Measured co-location (the calibration's facts, :meth:`NodeTopology.use_colocation`): nodes on
   different addresses measured to slow each other as one unit's nodes do share one measured
   :class:`ExecutionUnit` (``facts["unit"] == "measured"``), unless the topology file declares
   their unit. Their host ids stay what the addresses say.

Host ids are stable within a call. Across calls they stay stable as long as what DNS says does not
change; a host whose addresses change is best pinned in the topology file.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Final

from . import _nodefields
from ._errors import InvalidNodeAddress, TopologyFileError
from .addresses import NodeAddress, describe_input, parse_node_address
from .colocation import ColocationFacts
from .config import LocalityConfig, TopologyOverrides, load_topology_file
from .local import is_loopback_name
from .processes import LocalProcesses, ProcessFacts, ProcessLookup

__all__ = ["ExecutionUnit", "HostIdentity", "Instance", "NodeTopology", "LOCALHOST_ID"]

logger = logging.getLogger(__name__)

LOCALHOST_ID: Final = "localhost"
"""The physical host id of this machine, whatever address a node uses for it."""

_SIBLINGS_MAX: Final = 65536
_MEMO_MAX: Final = 65536  # (host, port) entries; about 1 KB each when names resolve
_RELOAD_CHECK_SECONDS: Final = 2.0


@dataclass(frozen=True, slots=True)
class Instance:
    """One Ollama server process: where it runs and the port it listens on.

    Aliases of one machine and port (a name and its address, two names of one host) are one
    instance. A container on this machine has its own network namespace, so its address stands
    in for the machine there: ``localhost:11434`` and a container's ``:11434`` are two
    instances of one machine.

    Attributes:
        host: the physical host id, or a local container's address.
        port: the port the server listens on.
    """

    host: str
    port: int

    @property
    def label(self) -> str:
        """``host:port`` (an IPv6 host in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True, slots=True)
class ExecutionUnit:
    """What tasks compete for: one host's CPUs (all of them, or a CPU set), or one GPU.

    Tasks on one unit contend; tasks on different units do not (apart from the same-host
    overhead of units of one machine). Nodes of one GPU host that declare no device share one
    GPU unit.

    Attributes:
        host: the physical host id the unit belongs to.
        is_gpu: whether the unit is a GPU.
        device: the GPU id, when one is known.
        cpus: the CPU set, when the instance is pinned to one (``None``: the whole machine).
        measured: for a unit found by measurement (instances on different addresses that
            slow each other as one unit's do), the smallest instance label of the measured
            group; ``None`` for every other unit. Every node of the group has this same unit;
            ``host`` is then that instance's physical host.
        label: ``"host/cpu"``, ``"host/cpu:0-3"``, ``"host/gpu"``, ``"host/gpu:ID"`` or, for a
            measured unit, ``"measured:INSTANCE"``; the key calibration stores the unit's
            figures under.
    """

    host: str
    is_gpu: bool = False
    device: str | None = None
    cpus: frozenset[int] | None = None
    measured: str | None = None
    label: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.measured is not None:
            text = f"measured:{self.measured}"
        elif self.is_gpu:
            text = f"{self.host}/gpu" + (f":{self.device}" if self.device is not None else "")
        else:
            text = f"{self.host}/cpu" + (f":{_cpu_text(self.cpus)}" if self.cpus else "")
        object.__setattr__(self, "label", text)

    def __str__(self) -> str:
        return self.label


def _cpu_text(cpus: frozenset[int]) -> str:
    """``{0, 1, 2, 5}`` -> ``"0-2,5"`` (the kernel's CPU list format)."""
    ranges: list[str] = []
    ordered = sorted(cpus)
    start = previous = ordered[0]
    for cpu in [*ordered[1:], None]:
        if cpu is not None and cpu == previous + 1:
            previous = cpu
            continue
        ranges.append(str(start) if start == previous else f"{start}-{previous}")
        if cpu is not None:
            start = previous = cpu
    return ",".join(ranges)


@dataclass(frozen=True, slots=True)
class HostIdentity:
    """What is known about the machine a node runs on.

    Attributes:
        node: the caller's original node object.
        address: the node's parsed address.
        physical_host_id: ``"localhost"`` for this machine; for another machine one id shared by
            all its aliases (the topology file's host name, else its canonical address); the
            name itself when it could not be resolved.
        is_local: whether the node runs on this machine.
        addresses: the IP addresses (strings) the node's host answered to; empty when unresolved
            or when the host is this machine by name.
        device: the GPU id the node runs on (topology file ``gpu`` or the node's own ``gpu`` /
            ``device`` field), else ``None``.
        locality_group: ``"local"`` for this machine, the topology file's zone, ``"lan"`` when an
            address is private, link-local or otherwise not global, ``"wan"`` when all are
            global, ``"unknown"`` when unresolved.
        resolved: whether the host's identity is known (``False`` only for unresolvable names).
        source: how the identity was decided: ``"loopback"``, ``"interface"``, ``"hostname"``,
            ``"container"``, ``"dns"``, ``"hosts-file"``, ``"override"``, ``"address"`` (a remote
            IP literal: the address is the identity) or ``"unresolved"``.
        has_gpu: whether the node runs on a GPU (a device is declared, or the node reports one).
        cpus: the CPU set the node's instance is pinned to (topology file ``cpus``, else the
            CPU set its process may run on when that is not the whole machine), else ``None``.
        slots: how many requests the node's instance serves at once (topology file
            ``num_parallel``, else its process's ``OLLAMA_NUM_PARALLEL``, else the node
            object's ``num_parallel``, else 1).
        facts: for each fact (``"host"``, ``"unit"``, ``"slots"``), which source gave it:
            ``"topology file"``, ``"measured"``, ``"process"``, ``"node"`` (the node object),
            ``"address"`` or ``"prior"``; for ``"host"``, how the identity was decided
            (``source``, or ``"topology file"`` for an override).
        instance: the :class:`Instance` the node reaches (computed once).
        unit: the :class:`ExecutionUnit` its tasks run on (computed once).
        instance_host: the host of :attr:`instance` when it is not ``physical_host_id`` (a
            local container's address), else ``None``.
        resolution_error: why the name was not resolved (``"NXDOMAIN"``, ``"timeout: ..."``,
            ``"no address records"``, the resolver's error), ``None`` when it was.
        measured_unit: the measured unit the node shares with nodes on other addresses
            (calibration's co-location facts), which :attr:`unit` then is; else ``None``.
        process: for a node of this machine (when ``LocalityConfig.read_processes``), the
            process found behind its port and what it holds, or why none was found
            (``process.status``, ``process.reason``); ``None`` for other nodes.
        cpu_share: the share of this machine's CPUs the instance may use, when it is pinned or
            limited (``min(len(cpus), cpu_quota) / os.cpu_count()``); ``None`` for the whole
            machine or when unknown. The cost model takes the speed prior of a node without
            measurements from it.
        unit_override: the unit decided across the nodes of one call (local instances whose
            CPU sets or GPU ids overlap share one unit), when it is not the one this node's
            own facts give.
    """

    node: Any
    address: NodeAddress
    physical_host_id: str
    is_local: bool
    addresses: frozenset[str]
    device: str | None
    locality_group: str
    resolved: bool
    source: str
    has_gpu: bool = False
    cpus: frozenset[int] | None = None
    slots: int = 1
    facts: Mapping[str, str] = field(default_factory=lambda: _NO_FACTS, hash=False)
    instance_host: str | None = None
    resolution_error: str | None = field(default=None, compare=False)
    measured_unit: ExecutionUnit | None = None
    process: ProcessLookup | None = field(default=None, repr=False)
    cpu_share: float | None = None
    unit_override: ExecutionUnit | None = field(default=None, repr=False, compare=False)
    instance: Instance = field(init=False, repr=False, compare=False)
    unit: ExecutionUnit = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        host = self.physical_host_id
        object.__setattr__(self, "instance",
                           Instance(self.instance_host or host, self.address.port))
        object.__setattr__(self, "unit", self.measured_unit or self.own_unit)

    @property
    def own_unit(self) -> ExecutionUnit:
        """The unit the node's own facts give (address, node object, topology file), before
        measured co-location: where calibration keeps the node's own time per task."""
        if self.measured_unit is None and hasattr(self, "unit"):
            return self.unit
        if self.unit_override is not None:  # decided across local instances (processes)
            return self.unit_override
        gpu = self.has_gpu or self.device is not None
        return ExecutionUnit(self.physical_host_id, gpu, self.device, None if gpu else self.cpus)

    def __repr__(self) -> str:
        # ``node`` is the caller's object; its URL may carry credentials, so it is shown masked.
        parts = [f"node={describe_input(self.node)}"]
        parts += [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                  if f.name != "node" and f.repr]
        parts += [f"instance={self.instance.label!r}", f"unit={self.unit.label!r}"]
        if self.process is not None:
            parts.append(f"process={self.process.reason!r}")
        return f"HostIdentity({', '.join(parts)})"


_NO_FACTS: Final[Mapping[str, str]] = MappingProxyType({})
_NO_COLOCATION: Final = ColocationFacts()


@dataclass(frozen=True, slots=True)
class _Base:
    """Identity facts of one address, before merging with the other nodes of a call."""

    is_local: bool
    addresses: frozenset[str]
    resolved: bool
    source: str
    override_host: str | None
    zone: str | None
    device: str | None
    fallback_id: str
    group: str
    instance_host: str | None = None
    cpus: frozenset[int] | None = None
    slots: int | None = None
    resolution_error: str | None = None
    process: ProcessLookup | None = None


class NodeTopology:
    """Physical-host identity and grouping for nodes of any shape.

    Args:
        config: settings (``dns_timeout``, ``nameservers``, ``topology_file``, ``hosts_file``);
            ``LocalityConfig.from_env()`` when omitted.
        resolver: anything with ``resolve_many(names, *, timeout)`` (see
            :class:`sollol_locality.resolver.Resolver`); a dnspython resolver by default.
        local_machine: what "this machine" is (:class:`sollol_locality.local.LocalMachine`).
        clock: monotonic clock used to re-check the topology file.
        colocation: measured co-location (:class:`~sollol_locality.colocation.ColocationFacts`),
            or a callable returning the current facts (the planner passes its cost model's
            :meth:`~sollol_locality.ParallelismCostModel.colocation_facts`, so topology and
            cost model share one calibration); see :meth:`use_colocation`.
        processes: finds the process behind each node of this machine and reads its CPU set,
            CPU quota, GPUs and slots (:class:`sollol_locality.processes.LocalProcesses`);
            built on first need with ``clock`` and the local machine's refresh interval. Not
            used when ``config.read_processes`` is false.

    The constructor reads the topology file (a malformed one raises
    :class:`~sollol_locality.TopologyFileError`) and does no network I/O. When the file changes
    later it is re-read; a broken edit is logged and the previous good topology stays in force.
    """

    def __init__(
        self,
        config: LocalityConfig | None = None,
        *,
        resolver: Any = None,
        local_machine: Any = None,
        clock: Callable[[], float] = time.monotonic,
        colocation: ColocationFacts | Callable[[], ColocationFacts] | None = None,
        processes: LocalProcesses | None = None,
    ) -> None:
        self.config = config if config is not None else LocalityConfig.from_env()
        self._colocation: Callable[[], ColocationFacts] | None = None
        self._colocation_seen: tuple[ColocationFacts, dict[str, tuple[str, frozenset[str]]]] | \
            None = None
        self._colocation_version = 0
        self.use_colocation(colocation)
        self._clock = clock
        if resolver is None:
            from .resolver import DnsResolver

            servers = None
            if self.config.nameservers is not None:
                servers = [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
                           for ip, port in self.config.nameservers]
            hosts = self.config.hosts_file
            resolver = DnsResolver(nameservers=servers,
                                   hosts_file=None if hosts is None else os.fspath(hosts))
        if local_machine is None:
            from .local import LocalMachine

            hosts = self.config.hosts_file
            local_machine = LocalMachine(hosts_file=None if hosts is None else os.fspath(hosts))
        self.resolver = resolver
        self.local_machine = local_machine
        self._overrides = TopologyOverrides()
        self._overrides_mtime: float | None = None
        self._next_reload_check = 0.0
        if self.config.topology_file is not None:
            self._overrides = load_topology_file(self.config.topology_file)
            self._overrides_mtime = _mtime(self.config.topology_file)
            self._next_reload_check = clock() + _RELOAD_CHECK_SECONDS
        self._generation = 0
        self._memo: dict[tuple[str, int], tuple[object, object, _Base]] = {}
        self._siblings: dict[str, frozenset[str]] = {}
        self._lock = threading.Lock()
        self._processes = processes
        self._processes_used = False

    # -- public API ------------------------------------------------------------------------

    def use_colocation(self, source: ColocationFacts | Callable[[], ColocationFacts] | None
                       ) -> None:
        """Where measured co-location comes from: fixed facts, a callable giving the current
        ones (called on each description: it must be cheap), or ``None`` for none.

        Every node of a measured group (:meth:`ColocationFacts.groups`) whose unit the topology
        file does not declare (``gpu``, ``cpus``) gets one shared measured unit
        (:attr:`ExecutionUnit.measured`), with ``facts["unit"] == "measured"``; its
        ``physical_host_id`` is unchanged. A declared unit wins over the measurement.
        """
        if isinstance(source, ColocationFacts):
            facts = source
            self._colocation = lambda: facts
        else:
            self._colocation = source
        self._colocation_version += 1

    @property
    def has_colocation_source(self) -> bool:
        """Whether :meth:`use_colocation` was given a source."""
        return self._colocation is not None

    def colocation_facts(self) -> ColocationFacts:
        """The measured co-location in force (empty when there is no source)."""
        source = self._colocation
        return source() if source is not None else _NO_COLOCATION

    @property
    def colocation_version(self) -> int:
        """Changes whenever the co-location facts in force change (a decision cache key)."""
        self._measured_index()
        return self._colocation_version

    @property
    def overrides(self) -> TopologyOverrides:
        """The topology file in force (empty when none is configured)."""
        return self._overrides

    @property
    def processes(self) -> LocalProcesses | None:
        """What reads the processes behind local nodes (``None`` when
        ``config.read_processes`` is false); built on first use, without I/O."""
        if not self.config.read_processes:
            return None
        if self._processes is None:
            with self._lock:
                if self._processes is None:
                    interval = getattr(self.local_machine, "refresh_interval", 30.0)
                    self._processes = LocalProcesses(clock=self._clock,
                                                     refresh_interval=interval)
        return self._processes

    @property
    def process_version(self) -> int:
        """Grows when a refresh of the local processes finds other listeners (a restarted
        instance); 0 until a local node was looked up. Reading it rescans only when the last
        scan is older than the refresh interval, so a cache keyed on it never costs a scan
        per decision."""
        processes = self._processes
        if not self._processes_used or processes is None or not self.config.read_processes:
            return 0
        return processes.version

    def describe(self, node: object) -> HostIdentity:
        """The identity of one node. Raises :class:`InvalidNodeAddress` if it cannot be parsed."""
        result = self.describe_many([node])[0]
        if isinstance(result, InvalidNodeAddress):
            raise result
        return result

    def get_physical_host_id(self, node: object) -> str:
        """``"localhost"`` for this machine, else one id shared by all the host's aliases."""
        return self.describe(node).physical_host_id

    def is_local(self, node: object) -> bool:
        """Whether the node runs on this machine."""
        return self.describe(node).is_local

    def group_by_locality(self, nodes: Iterable[Any]) -> dict[str, list[Any]]:
        """Group nodes by physical host id; each list keeps the input order.

        Raises :class:`InvalidNodeAddress` for the first node that cannot be parsed.
        """
        node_list = nodes if isinstance(nodes, list) else list(nodes)
        groups: dict[str, list[Any]] = {}
        for node, host_id in zip(node_list, self._host_ids(node_list), strict=True):
            groups.setdefault(host_id, []).append(node)
        return groups

    def count_unique_hosts(self, nodes: Iterable[Any]) -> int:
        """The number of distinct physical machines among the nodes."""
        node_list = nodes if isinstance(nodes, list) else list(nodes)
        return len(set(self._host_ids(node_list)))

    def describe_many(
        self, nodes: Iterable[Any], *, timeout: float | None = None
    ) -> list[HostIdentity | InvalidNodeAddress]:
        """Describe many nodes in one go: all names resolved together under one deadline.

        Returns, in input order, a :class:`HostIdentity` for each node, or the
        :class:`InvalidNodeAddress` explaining why a node could not be parsed (never raised here).
        """
        node_list = nodes if isinstance(nodes, list) else list(nodes)
        parsed, bases = self._bases(node_list, timeout)
        ids = self._merge(bases)
        overrides = self._overrides
        cpu_count = self._processes.cpu_count if self._processes_used and self._processes else None
        pinned_or_gpu = local_count = 0  # whether units across local instances need a look
        results: list[HostIdentity | InvalidNodeAddress] = []
        for node, address, base, host_id in zip(node_list, parsed, bases, ids, strict=True):
            if base is None:
                results.append(address)  # type: ignore[arg-type]
                continue
            group = base.group
            if host_id != base.fallback_id and base.zone is None and not base.is_local:
                group = overrides.zone_of(host_id) or group
            identity = _identity(node, address, host_id, group, base,  # type: ignore[arg-type]
                                 cpu_count)
            if base.is_local:
                local_count += 1
                pinned_or_gpu += identity.cpus is not None or identity.device is not None
            results.append(identity)
        if cpu_count is not None and pinned_or_gpu and local_count > 1:
            results = _process_units(results)
        return self._apply_measured_units(results)

    # -- measured co-location ----------------------------------------------------------------

    def _measured_index(self) -> dict[str, tuple[str, frozenset[str]]]:
        """Instance label -> (the group's smallest label, the group), for the facts in force;
        rebuilt only when the facts object changes."""
        facts = self.colocation_facts()
        seen = self._colocation_seen
        if seen is not None and seen[0] is facts:
            return seen[1]
        index: dict[str, tuple[str, frozenset[str]]] = {}
        for group in facts.units():
            key = min(group)
            for label in group:
                index[label] = (key, group)
        with self._lock:
            if self._colocation_seen is None or self._colocation_seen[0] is not facts:
                if self._colocation_seen is not None:
                    self._colocation_version += 1
                self._colocation_seen = (facts, index)
        return index

    def _apply_measured_units(self, results: list[HostIdentity | InvalidNodeAddress]
                              ) -> list[HostIdentity | InvalidNodeAddress]:
        """Give the nodes of each measured group, unless the topology file declares their
        unit, one shared measured unit (see :meth:`use_colocation`)."""
        index = self._measured_index()
        if not index:
            return results
        members: dict[str, list[tuple[int, HostIdentity]]] = {}
        for position, identity in enumerate(results):
            if isinstance(identity, InvalidNodeAddress):
                continue
            entry = index.get(identity.instance.label)
            if entry is not None and identity.facts.get("unit") != "topology file":
                members.setdefault(entry[0], []).append((position, identity))
        for key, found in members.items():
            if len({identity.instance for _, identity in found}) < 2:
                continue  # one instance of the group in this call: nothing shares with it
            head = min((identity for _, identity in found), key=lambda i: i.instance.label)
            unit = ExecutionUnit(head.physical_host_id, head.own_unit.is_gpu, measured=key)
            for position, identity in found:
                facts = MappingProxyType({**identity.facts, "unit": "measured"})
                results[position] = replace(identity, measured_unit=unit, facts=facts)
        return results

    # -- internals --------------------------------------------------------------------------

    def _host_ids(self, nodes: list[Any]) -> list[str]:
        parsed, bases = self._bases(nodes, None)
        for address in parsed:
            if isinstance(address, InvalidNodeAddress):
                raise address
        return self._merge(bases)

    def _bases(self, nodes: list[Any], timeout: float | None
               ) -> tuple[list[NodeAddress | InvalidNodeAddress], list[_Base | None]]:
        """Parse every node and find each address's identity facts, resolving all the names
        that need it in one call under one deadline."""
        self._maybe_reload()
        overrides = self._overrides
        local = self.local_machine
        pin = getattr(local, "pinned", None)
        if pin is not None:
            # One state of this machine for the whole decision: a refresh landing in the middle
            # must not judge one node by the old interfaces and the next by the new ones.
            local = pin()
        else:
            local.snapshot()
        world = (getattr(local, "version", 0), id(overrides), self.process_version)
        memo = self._memo
        parsed: list[NodeAddress | InvalidNodeAddress] = []
        bases: list[_Base | None] = []
        pending: list[int] = []
        names: set[str] = set()
        for node in nodes:
            try:
                address = parse_node_address(node)
            except InvalidNodeAddress as exc:
                parsed.append(exc)
                bases.append(None)
                continue
            parsed.append(address)
            entry = memo.get((address.host, address.port))
            if entry is not None and entry[0] == world and entry[1] is None:
                bases.append(entry[2])  # decided without DNS, and nothing has changed since
                continue
            bases.append(None)
            pending.append(len(parsed) - 1)
            if address.ip is None and self._needs_dns(address, overrides, local):
                names.add(address.host)
        if not pending:
            return parsed, bases
        resolutions: Mapping[str, Any] = {}
        if names:
            wait = self.config.dns_timeout if timeout is None else timeout
            resolutions = self.resolver.resolve_many(sorted(names), timeout=wait)
        for index in pending:
            pending_address = parsed[index]
            assert isinstance(pending_address, NodeAddress)
            address = pending_address
            resolution = resolutions.get(address.host) if address.ip is None else None
            key = (address.host, address.port)
            entry = memo.get(key)
            if entry is not None and entry[0] == world and entry[1] is resolution:
                bases[index] = entry[2]
                continue
            base = self._base(address, resolution, overrides, local)
            if base.is_local:
                base = self._with_process(address, base)
            if len(memo) > _MEMO_MAX:
                memo.clear()
            memo[key] = (world, resolution, base)
            bases[index] = base
        return parsed, bases

    def _needs_dns(self, address: NodeAddress, overrides: TopologyOverrides, local: Any) -> bool:
        node_override = overrides.nodes.get((address.host, address.port))
        if node_override is not None and node_override.host is not None:
            return False
        if address.host in overrides.alias_index:
            return False
        return local.classify_name(address.host) is None

    def _base(self, address: NodeAddress, resolution: Any,
              overrides: TopologyOverrides, local: Any) -> _Base:
        node_override = overrides.nodes.get((address.host, address.port))
        override_host = node_override.host if node_override is not None else None
        device = node_override.gpu if node_override is not None else None
        zone = node_override.zone if node_override is not None else None
        cpus = node_override.cpus if node_override is not None else None
        slots = node_override.num_parallel if node_override is not None else None
        alias_host: str | None = None
        if address.ip is not None:
            text = address.ip.compressed
            kind = local.classify_ip(address.ip)
            addresses = frozenset((text,))
            if kind is not None:
                return _make_base(True, addresses, True, kind, None, zone, device, LOCALHOST_ID,
                                  instance_host=text if kind == "container" else None,
                                  cpus=cpus, slots=slots)
            alias_host = overrides.alias_index.get(text)
            resolved, source, fallback = True, "address", text
        else:
            kind = local.classify_name(address.host)
            if kind is not None:
                return _make_base(True, frozenset(), True, kind, None, zone, device, LOCALHOST_ID,
                                  cpus=cpus, slots=slots)
            alias_host = overrides.alias_index.get(address.host)
            addresses = frozenset()
            resolved, source, fallback = False, "unresolved", address.host
            why = "not looked up" if resolution is None else "no address"
            if resolution is not None and resolution.status == "ok" and resolution.addresses:
                ips = resolution.addresses
                addresses = frozenset(ip.compressed for ip in ips)
                resolved, source = True, resolution.source
                kinds = [(local.classify_ip(ip), ip.compressed) for ip in ips]
                if any(kind is not None for kind, _ in kinds):
                    # A name for a local container reaches that container's own server.
                    containers = [text for kind, text in kinds if kind == "container"]
                    return _make_base(True, addresses, True, source, None, zone, device,
                                      LOCALHOST_ID, instance_host=_canonical(containers)
                                      if containers else None, cpus=cpus, slots=slots)
                fallback = _canonical(addresses)
                if len(addresses) > 1:
                    self._remember_siblings(addresses)
                if alias_host is None:
                    alias_host = next((overrides.alias_index[a] for a in sorted(addresses)
                                       if a in overrides.alias_index), None)
            elif resolution is not None and resolution.status not in ("ok",):
                logger.debug("host %r unresolved (%s): %s", address.host, resolution.status,
                             resolution.error or "no address")
                why = _unresolved_reason(resolution.status, resolution.error)
        chosen = override_host or alias_host
        if chosen is not None:
            if zone is None:
                zone = overrides.zone_of(chosen)
            return _make_base(False, addresses, True, "override", chosen, zone, device, chosen,
                              cpus=cpus, slots=slots)
        base = _make_base(False, addresses, resolved, source, None, zone, device, fallback,
                          cpus=cpus, slots=slots)
        if not resolved:
            base = replace(base, resolution_error=why)
        return base

    def _with_process(self, address: NodeAddress, base: _Base) -> _Base:
        """``base`` with the process behind the local node, looked up in the cache of
        :attr:`processes` (the listeners are scanned at its refresh, not per call)."""
        processes = self.processes
        if processes is None:
            return base
        self._processes_used = True
        try:
            if base.instance_host is not None:  # a container's own address
                found = processes.lookup(base.instance_host, address.port, other_namespaces=True)
            elif address.ip is not None:
                found = processes.lookup(address.ip, address.port)
            elif is_loopback_name(address.host):
                found = processes.lookup(address.host, address.port)
            else:  # this machine's own name: any address of it
                found = processes.lookup(None, address.port)
        except InvalidNodeAddress:
            return base
        return replace(base, process=found)

    def _remember_siblings(self, addresses: frozenset[str]) -> None:
        siblings = self._siblings
        if len(siblings) > _SIBLINGS_MAX:
            siblings.clear()
        for address in addresses:
            known = siblings.get(address)
            siblings[address] = addresses if known is None else known | addresses

    def _merge(self, bases: Sequence[_Base | None]) -> list[str]:
        """The host id of each node: nodes that share an address (directly, or through
        addresses once seen together in one answer) are one host."""
        siblings = self._siblings
        needs_merge = False
        for base in bases:
            if base is None or base.is_local or not base.addresses:
                continue
            if (len(base.addresses) > 1 or base.override_host
                    or next(iter(base.addresses)) in siblings):
                needs_merge = True
                break
        if not needs_merge:
            # Fast path: every remote node has one address and no known sibling, so its
            # canonical address (or override, or name) already is its host id.
            return ["" if base is None else base.fallback_id for base in bases]
        parent: dict[str, str] = {}

        def find(item: str) -> str:
            root = item
            while parent.setdefault(root, root) != root:
                root = parent[root]
            while parent[item] != root:
                parent[item], item = root, parent[item]
            return root

        def union(a: str, b: str) -> None:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)

        for base in bases:
            if base is None or base.is_local or not base.addresses:
                continue
            head = f"a:{next(iter(base.addresses))}"
            for address in base.addresses:
                union(head, f"a:{address}")
                for sibling in siblings.get(address, ()):
                    union(head, f"a:{sibling}")
            if base.override_host:
                union(head, f"h:{base.override_host}")
        members: dict[str, list[str]] = {}
        for item in list(parent):
            members.setdefault(find(item), []).append(item)
        labels: dict[str, str] = {}
        for root, items in members.items():
            hosts = sorted(m[2:] for m in items if m.startswith("h:"))
            if len(hosts) > 1:
                logger.warning(
                    "topology file hosts %s share an address; keeping them apart as the file "
                    "says", ", ".join(repr(h) for h in hosts))
                continue
            labels[root] = hosts[0] if hosts else _canonical(m[2:] for m in items)
        ids = []
        for base in bases:
            if base is None:
                ids.append("")
            elif base.is_local or base.override_host or not base.addresses:
                ids.append(base.fallback_id)
            else:
                ids.append(labels.get(find(f"a:{next(iter(base.addresses))}"), base.fallback_id))
        return ids

    def _maybe_reload(self) -> None:
        path = self.config.topology_file
        if path is None:
            return
        now = self._clock()
        if now < self._next_reload_check:
            return
        with self._lock:
            if now < self._next_reload_check:
                return
            self._next_reload_check = now + _RELOAD_CHECK_SECONDS
            mtime = _mtime(path)
            if mtime == self._overrides_mtime:
                return
            self._overrides_mtime = mtime
            try:
                self._overrides = load_topology_file(path)
            except TopologyFileError as exc:
                logger.error("%s; keeping the previous topology in force", exc,
                             extra={"event": "topology_file_invalid", "path": os.fspath(path)})
                return
            logger.info("topology file %s reloaded", os.fspath(path),
                        extra={"event": "topology_file_reloaded", "path": os.fspath(path)})


def _make_base(is_local: bool, addresses: frozenset[str], resolved: bool, source: str,
               override_host: str | None, zone: str | None, device: str | None,
               fallback_id: str, *, instance_host: str | None = None,
               cpus: frozenset[int] | None = None, slots: int | None = None) -> _Base:
    if is_local:
        group = "local"
    elif zone is not None:
        group = zone
    elif not addresses:
        group = "lan" if resolved else "unknown"
    else:
        group = "lan" if any(not ipaddress.ip_address(a).is_global for a in addresses) else "wan"
    return _Base(is_local, addresses, resolved, source, override_host, zone, device,
                 fallback_id, group, instance_host, cpus, slots)


_STATUS_WORDS: Final[Mapping[str, str]] = {"nxdomain": "NXDOMAIN", "nodata": "no address records",
                                            "timeout": "timeout", "failure": "failure"}


def _unresolved_reason(status: str, error: str | None) -> str:
    """Why a name was not resolved, for people: the status and what the resolver said."""
    word = _STATUS_WORDS.get(status, status)
    return f"{word}: {error}" if error else word


def _mtime(path: os.PathLike[str] | str) -> float | None:
    try:
        return os.stat(path).st_mtime_ns / 1e9
    except OSError:
        return None


def _canonical(addresses: Iterable[str]) -> str:
    def key(text: str) -> tuple[int, int, str]:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            return (9, 0, text)
        return (ip.version, int(ip), text)

    return min(addresses, key=key)


def _identity(node: Any, address: NodeAddress, host_id: str, group: str,
              base: _Base, cpu_count: int | None = None) -> HostIdentity:
    """One node's identity, with each fact's source: the topology file where it speaks, else
    the process behind a local node, else the node object, else the address (unit) or the
    prior (slots)."""
    plain = type(node) is str
    device = base.device
    cpus = base.cpus
    unit_fact = "topology file" if device is not None or cpus is not None else "address"
    says_gpu: bool | None = None  # what the process's environment says: GPUs, none, nothing
    read = _found_facts(base)
    if read is not None and unit_fact == "address":
        cpus = _pinned(read.cpus, cpu_count)
        if read.cpus is not None:
            unit_fact = "process"
        if read.gpus is not None:
            says_gpu, unit_fact = bool(read.gpus), "process"
            if read.gpus:
                device = _gpu_text(read.gpus, _namespace_of(read, base))
    if device is None and not plain and says_gpu is None:
        device = _nodefields.device(node)
        if device is not None:
            unit_fact = "node"
    has_gpu = device is not None
    if not has_gpu and not plain and says_gpu is None and _nodefields.has_gpu(node):
        has_gpu, unit_fact = True, "node"
    slots, slots_fact = base.slots, "topology file"
    if slots is None and read is not None and read.slots is not None:
        slots, slots_fact = read.slots, "process"
    if slots is None:
        slots = None if plain else _nodefields.slots(node)
        slots_fact = "prior" if slots is None else "node"
    facts = MappingProxyType({
        "host": "topology file" if base.source == "override" else base.source,
        "unit": unit_fact,
        "slots": slots_fact,
    })
    share = None
    if base.is_local and not has_gpu and cpu_count is not None:
        share = _cpu_share(cpus, read.cpu_quota if read is not None else None, cpu_count)
    return HostIdentity(node, address, host_id, base.is_local, base.addresses, device, group,
                        base.resolved, base.source, has_gpu, cpus, slots or 1, facts,
                        base.instance_host, base.resolution_error, process=base.process,
                        cpu_share=share)


# -- local instances: units and speed from the facts their processes hold ----------------------


def _found_facts(base: _Base) -> ProcessFacts | None:
    process = base.process
    return process.facts if process is not None and process.status == "found" else None


def _pinned(cpus: frozenset[int] | None, cpu_count: int | None) -> frozenset[int] | None:
    """The CPU set an instance is pinned to; ``None`` when it may use the whole machine."""
    if cpus is None or not cpus or (cpu_count is not None and cpus >= frozenset(range(cpu_count))):
        return None
    return cpus


def _cpu_share(cpus: frozenset[int] | None, quota: float | None, cpu_count: int) -> float | None:
    """``min(len(cpus), quota) / cpu_count`` when below 1 (a pinned or limited instance)."""
    capacity = float(len(cpus)) if cpus else float(cpu_count)
    if quota is not None and quota > 0:
        capacity = min(capacity, quota)
    return capacity / cpu_count if capacity < cpu_count else None


def _namespace_of(facts: ProcessFacts, base: _Base) -> str | None:
    """Where the process's GPU indices are counted: its container, else ``None`` (this
    machine's). Indices of two containers may name different GPUs; UUIDs never do."""
    if facts.container is not None:
        return facts.container
    if facts.other_netns and base.instance_host is not None:
        return base.instance_host
    return None


def _gpu_text(gpus: tuple[str, ...], namespace: str | None) -> str:
    """The device id of the GPUs a process sees: ``"0"``, ``"0,1"``, ``"docker:ab12cd/0"``."""
    return ",".join(gpu if namespace is None or gpu.upper().startswith(("GPU-", "MIG-"))
                    else f"{namespace}/{gpu}" for gpu in gpus)


def _process_units(results: list[HostIdentity | InvalidNodeAddress]
                   ) -> list[HostIdentity | InvalidNodeAddress]:
    """Units across the local nodes of one call, from their CPU sets and GPU ids.

    * CPU units: instances whose CPU sets overlap share one unit (the union of their sets);
      an instance with no known CPU set may run anywhere, so it overlaps every other one.
      Instances on disjoint sets are separate units of this machine (they still pay the
      cost model's same-host overhead).
    * GPU units: instances whose GPU ids intersect share one unit (the union of their ids).
      A GPU node that names no device keeps the machine's one ``gpu`` unit.

    Remote hosts are left as their own facts make them.
    """
    cpu: list[int] = []
    gpu: list[int] = []
    for index, identity in enumerate(results):
        if isinstance(identity, InvalidNodeAddress) or identity.physical_host_id != LOCALHOST_ID:
            continue
        if not identity.unit.is_gpu:
            cpu.append(index)
        elif identity.device is not None:
            gpu.append(index)
    units: dict[int, ExecutionUnit] = {}
    if len(cpu) > 1:
        sets = {i: _local(results[i]).cpus for i in cpu}
        for group in _overlapping(cpu, lambda i: sets[i]):
            members = [sets[i] for i in group]
            union: frozenset[int] | None = None
            if all(m is not None for m in members):
                union = frozenset().union(*members)  # type: ignore[arg-type]
            for i in group:
                units[i] = ExecutionUnit(LOCALHOST_ID, cpus=union)
    if len(gpu) > 1:
        ids = {i: frozenset((_local(results[i]).device or "").split(",")) for i in gpu}
        for group in _overlapping(gpu, lambda i: ids[i]):
            if len(group) > 1:
                text = ",".join(sorted(frozenset().union(*(ids[i] for i in group))))
                for i in group:
                    units[i] = ExecutionUnit(LOCALHOST_ID, True, text)
    out = list(results)
    for i, unit in units.items():
        identity = _local(results[i])
        if unit != identity.unit:
            out[i] = replace(identity, unit_override=unit)
    return out


def _local(identity: HostIdentity | InvalidNodeAddress) -> HostIdentity:
    assert isinstance(identity, HostIdentity)
    return identity


def _overlapping(items: list[int], members: Callable[[int], frozenset[Any] | None]
                 ) -> list[list[int]]:
    """Union-find: groups of ``items`` whose member sets intersect (``None``: overlaps all)."""
    parent = {i: i for i in items}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[Any, int] = {}
    everything: int | None = None
    for i in items:
        found = members(i)
        if found is None:
            if everything is None:
                everything = i
            parent[find(i)] = find(everything)
            continue
        for member in found:
            if member in owner:
                parent[find(i)] = find(owner[member])
            else:
                owner[member] = i
    if everything is not None:
        for i in items:
            parent[find(i)] = find(everything)
    groups: dict[int, list[int]] = {}
    for i in items:
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())
