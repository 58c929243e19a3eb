"""What "this machine" is.

:class:`LocalMachine` answers two questions without sending a packet or a DNS query:

* ``classify_ip(ip)``: ``"loopback"`` for 127.0.0.0/8, ``::1``, ``0.0.0.0``, ``::`` and their
  IPv4-mapped forms (pure code, no probe); ``"interface"`` for an address of one of this machine's
  network interfaces; ``"container"`` for an address inside a container bridge network hosted
  here; otherwise ``None``.
* ``classify_name(name)``: ``"loopback"`` for ``localhost``, its usual aliases and every
  ``*.localhost`` name (RFC 6761); ``"hostname"`` for this machine's own names; otherwise ``None``.

What the machine looks like is read by a probe (:class:`SystemProbe` by default) into an
immutable :class:`LocalSnapshot`, which is re-read only when older than ``refresh_interval``
(interfaces change with DHCP, VPNs and containers), never once per decision. ``version`` grows
whenever a refresh changes the content, so callers can key caches on it.

Own names. ``socket.gethostname()`` (lower-cased, and its short form), ``/etc/hostname``, every
name on a hosts-file line that lists the host name (this is where the FQDN comes from), and every
name the hosts file maps to a loopback, unspecified or own-interface address (Debian's
``127.0.1.1 myhost.example myhost``). ``socket.getfqdn()`` and ``gethostbyaddr()`` are never
called: they can block on DNS.

Container networks, and what deliberately is *not* one:

* An interface is a container bridge when its name is one container runtimes and local
  hypervisors use (``docker0``, ``br-<12 hex>``, ``podman*``, ``cni*``, ``virbr*``, ``lxcbr*``,
  ``lxdbr*``, ``incusbr*``, ``cbr0``, ``kube-bridge``, ...) or when it is a Linux bridge
  (``/sys/class/net/<if>/bridge`` exists).
* **A bridge that reaches off this machine is not a container bridge.** A bridge enslaving a
  physical NIC (``br0`` holding ``eth0`` so VMs sit on the LAN) has the LAN as its subnet; treating
  it as "this machine" would merge every machine on the LAN into localhost. A port reaches off
  the machine when it has a ``device`` entry (a physical NIC), is a tunnel (``DEVTYPE`` vxlan,
  geneve, gretap, ...), or is stacked on such a device (``lower_*`` links: VLANs, bonds,
  macvlans). This check overrides the name rule.
* **Cluster overlays are not container bridges** (``weave``, ``flannel*``, ``vxlan.calico``,
  ``cilium_*``): their subnet spans every node of the cluster, so pods on other machines are
  inside it. Per-node pod bridges (``cni0``, ``cbr0``, ``kube-bridge``) are container bridges.
* Link-local subnets (``fe80::/64`` sits on every bridge) are never container networks, nor are
  host routes (/32, /128) or implausibly large ones (shorter than /8 for IPv4, /48 for IPv6).
* The addresses of ``kube-ipvs0`` are Kubernetes service IPs that balance to pods on any node;
  they do not count as this machine's interface addresses.

``exclude_interfaces`` (shell-style patterns) removes interfaces from container detection, for
bridges that model other machines (for example in tests). Their addresses stay ``"interface"``.

Probe failures never escape: an unreadable part of the system is logged with what failed and
left out, a probe that raises keeps the previous snapshot (or a loopback-only one), and
``classify_*`` never raise.
"""

from __future__ import annotations

import fnmatch
import importlib
import ipaddress
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

from ._errors import ConfigError
from ._hostsfile import hosts_file
from ._hostsfile import normalise_name as _normalise_name
from ._hostsfile import unwrap_ip as _unwrap
from .addresses import IPAddress

__all__ = [
    "LOOPBACK_NAMES",
    "IPNetwork",
    "LocalMachine",
    "LocalSnapshot",
    "SystemProbe",
    "is_loopback_ip",
    "is_loopback_name",
]

logger = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPKind = Literal["loopback", "interface", "container"]
NameKind = Literal["loopback", "hostname"]

LOOPBACK_NAMES: Final = frozenset({
    "localhost",
    "localhost.localdomain",
    "localhost4",
    "localhost4.localdomain4",
    "localhost6",
    "localhost6.localdomain6",
    "ip6-localhost",
    "ip6-loopback",
})
"""Names that always mean this machine's loopback (plus any ``*.localhost``, RFC 6761)."""

_CONTAINER_BRIDGE_RE: Final = re.compile(
    r"""^(?:
        docker0 | docker_gwbridge | br-[0-9a-f]{12}     # docker default, swarm and user networks
      | podman\d* | cni[-\w.]* | nerdctl\d*             # podman, CNI (cni0, cni-podman0), nerdctl
      | virbr\d+ | lxcbr\d+ | lxdbr\d+ | incusbr\d+     # libvirt, LXC, LXD, Incus
      | cbr0 | kube-bridge | cali[0-9a-f]+               # kubenet, kube-router, Calico host veths
      | mpqemubr\d+ | vboxnet\d+ | vmnet\d+             # multipass, VirtualBox, VMware host-only
    )$""",
    re.VERBOSE,
)
_OVERLAY_RE: Final = re.compile(
    r"^(?:weave|flannel[\w.]*|vxlan\.calico|vxlan-v6\.calico|cilium_[\w.]+)$"
)
_SERVICE_ADDRESS_INTERFACES: Final = frozenset({"kube-ipvs0"})
_TUNNEL_DEVTYPES: Final = frozenset({
    "vxlan", "geneve", "gretap", "ip6gretap", "erspan", "ip6erspan", "bareudp", "l2tpeth",
})
_MIN_PREFIX: Final = {4: 8, 6: 48}
_MAX_LOWER_DEPTH: Final = 8
_FALLBACK_ADDRESSES: Final[frozenset[IPAddress]] = frozenset({
    ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"),
})


@dataclass(frozen=True, slots=True)
class LocalSnapshot:
    """What this machine looked like when probed. Immutable; compares by content.

    Attributes:
        hostnames: lower-case names of this machine: ``localhost`` and its aliases,
            ``gethostname()`` and its short form, the FQDN and aliases from the hosts file.
        addresses: every interface address, both families, zone ids stripped.
        container_networks: subnets of the container bridges hosted here.
        taken_at: the clock reading when it was probed (not part of equality).
    """

    hostnames: frozenset[str]
    addresses: frozenset[IPAddress]
    container_networks: tuple[IPNetwork, ...]
    taken_at: float = field(default=0.0, compare=False)


def check_refresh_interval(refresh_interval: object) -> None:
    """Raise :class:`ConfigError` unless ``refresh_interval`` is a finite number of seconds >= 0
    (how often this machine's facts are re-read; shared by the process reader)."""
    if (
        isinstance(refresh_interval, bool)
        or not isinstance(refresh_interval, (int, float))
        or not math.isfinite(refresh_interval)
        or refresh_interval < 0
    ):
        raise ConfigError(
            f"Invalid refresh_interval {refresh_interval!r}: expected a finite number of "
            "seconds >= 0",
            value=refresh_interval,
        )


def is_loopback_ip(ip: IPAddress) -> bool:
    """Whether ``ip`` is loopback or unspecified, IPv4-mapped forms included."""
    ip = _unwrap(ip)
    return ip.is_loopback or ip.is_unspecified


def is_loopback_name(name: str) -> bool:
    """Whether ``name`` (any case, trailing dot allowed) always means the loopback."""
    name = _normalise_name(name)
    return name in LOOPBACK_NAMES or name.endswith(".localhost")


class LocalMachine:
    """This machine's identity, probed lazily and refreshed every ``refresh_interval`` seconds.

    Args:
        clock: monotonic clock used to age the snapshot.
        refresh_interval: seconds a snapshot is trusted; 0 probes on every use.
        probe: returns a fresh :class:`LocalSnapshot` (its ``taken_at`` is replaced with
            ``clock()``); ``None`` uses :class:`SystemProbe` with the paths below.
        hosts_file, hostname_file, sysfs_root, exclude_interfaces: passed to
            :class:`SystemProbe` when ``probe`` is ``None``.

    The constructor does no I/O: the first probe runs on first use. Thread-safe: one thread
    refreshes under a lock while the others keep reading the previous (immutable) snapshot.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        refresh_interval: float = 30.0,
        probe: Callable[[], LocalSnapshot] | None = None,
        hosts_file: str | None = "/etc/hosts",
        hostname_file: str | None = "/etc/hostname",
        sysfs_root: str | None = "/sys/class/net",
        exclude_interfaces: Collection[str] = (),
    ) -> None:
        check_refresh_interval(refresh_interval)
        self._clock = clock
        self._refresh_interval = float(refresh_interval)
        if probe is None:
            probe = SystemProbe(
                hosts_file=hosts_file,
                hostname_file=hostname_file,
                sysfs_root=sysfs_root,
                exclude_interfaces=exclude_interfaces,
                clock=clock,
            )
        self._probe = probe
        self._lock = threading.Lock()
        self._snapshot: LocalSnapshot | None = None
        self._version = 0
        self._stamped: tuple[LocalSnapshot, int] | None = None

    @property
    def refresh_interval(self) -> float:
        """Seconds a snapshot is trusted before the next use re-probes."""
        return self._refresh_interval

    @property
    def version(self) -> int:
        """Grows by one whenever a refresh changes the snapshot's content (0 before any probe).

        Reading it first refreshes a stale snapshot, so a cache keyed on it notices interface
        changes even when nothing else asks.
        """
        self.snapshot()
        return self._version

    def snapshot(self) -> LocalSnapshot:
        """The current snapshot, re-probed first when older than ``refresh_interval``."""
        current = self._snapshot
        if current is not None and not self._stale(current):
            return current
        # The first probe blocks; later ones serve the previous snapshot while one thread probes.
        if not self._lock.acquire(blocking=current is None):
            assert current is not None
            return current
        try:
            latest = self._snapshot
            if latest is not None and latest is not current and not self._stale(latest):
                return latest
            return self._refresh_locked()
        finally:
            self._lock.release()

    def refresh(self) -> LocalSnapshot:
        """Probe now, whatever the snapshot's age."""
        with self._lock:
            return self._refresh_locked()

    def classify_ip(self, ip: IPAddress | str, *,
                    snapshot: LocalSnapshot | None = None) -> IPKind | None:
        """``"loopback"``, ``"interface"``, ``"container"`` or ``None``; never raises.

        IPv4-mapped IPv6 addresses are unwrapped and zone ids ignored. A string is parsed;
        one that is not an IP address gives ``None``. ``snapshot``: judge against this one
        instead of the current one (see :meth:`pinned`).
        """
        try:
            addr = _coerce_ip(ip)
            if addr is None:
                return None
            if addr.is_loopback or addr.is_unspecified:
                return "loopback"
            snap = snapshot if snapshot is not None else self.snapshot()
            if addr in snap.addresses:
                return "interface"
            for network in snap.container_networks:
                if addr in network:
                    return "container"
            return None
        except Exception:  # classification must never break a dispatch decision
            logger.warning("classifying %r as local failed", ip, exc_info=True,
                           extra={"event": "local_classify_failed"})
            return None

    def classify_name(self, name: str, *,
                      snapshot: LocalSnapshot | None = None) -> NameKind | IPKind | None:
        """``"loopback"`` for localhost and its aliases, ``"hostname"`` for this machine's own
        names, else ``None``; never raises. An IP literal is classified as by :meth:`classify_ip`.
        """
        try:
            if not isinstance(name, str):
                return None
            normalised = _normalise_name(name)
            if not normalised:
                return None
            literal = _coerce_ip(normalised.removeprefix("[").removesuffix("]"))
            if literal is not None:
                return self.classify_ip(literal, snapshot=snapshot)
            if normalised in LOOPBACK_NAMES or normalised.endswith(".localhost"):
                return "loopback"
            if normalised in (snapshot if snapshot is not None else self.snapshot()).hostnames:
                return "hostname"
            return None
        except Exception:
            logger.warning("classifying name %r as local failed", name, exc_info=True,
                           extra={"event": "local_classify_failed"})
            return None

    def pinned(self) -> _Pinned:
        """This machine as its current snapshot shows it, with that snapshot's ``version``.

        The view's ``classify_ip`` / ``classify_name`` never re-probe, so every node of one
        decision is judged against the same state of the machine even when a refresh lands in
        the middle of the decision.
        """
        self.snapshot()
        stamped = self._stamped  # (snapshot, version), replaced together by each refresh
        assert stamped is not None
        return _Pinned(self, *stamped)

    def _stale(self, snap: LocalSnapshot) -> bool:
        age = self._clock() - snap.taken_at
        return age >= self._refresh_interval or age < 0

    def _refresh_locked(self) -> LocalSnapshot:
        now = self._clock()
        previous = self._snapshot
        try:
            probed = self._probe()
            if not isinstance(probed, LocalSnapshot):
                raise TypeError(f"probe returned {type(probed).__name__}, not LocalSnapshot")
            fresh = _normalise_snapshot(probed, now)
        except Exception as exc:
            kept = "the previous snapshot" if previous is not None else "loopback only"
            logger.warning(
                "probing the local machine failed (%s: %s); keeping %s until the next refresh",
                type(exc).__name__, exc, kept,
                extra={"event": "local_probe_failed", "error": repr(exc)},
            )
            base = previous if previous is not None else _fallback_snapshot()
            fresh = replace(base, taken_at=now)
        if previous is None or fresh != previous:
            self._version += 1
            _log_change(previous, fresh, self._version)
        self._snapshot = fresh
        self._stamped = (fresh, self._version)
        return fresh


class _Pinned:
    """:class:`LocalMachine` answering from one snapshot (see :meth:`LocalMachine.pinned`)."""

    __slots__ = ("_machine", "_snapshot", "version")

    def __init__(self, machine: LocalMachine, snapshot: LocalSnapshot, version: int) -> None:
        self._machine = machine
        self._snapshot = snapshot
        self.version = version

    def snapshot(self) -> LocalSnapshot:
        return self._snapshot

    def classify_ip(self, ip: IPAddress | str) -> IPKind | None:
        return self._machine.classify_ip(ip, snapshot=self._snapshot)

    def classify_name(self, name: str) -> NameKind | IPKind | None:
        return self._machine.classify_name(name, snapshot=self._snapshot)


class SystemProbe:
    """Reads this machine's names, interface addresses and container networks.

    Every source is optional and injectable: ``net_if_addrs`` defaults to
    ``psutil.net_if_addrs`` (imported on first call), ``gethostname`` to
    ``socket.gethostname``; ``None`` for a path skips that file. Each source that fails is
    logged and left out, so calling a probe never raises.
    """

    def __init__(
        self,
        *,
        hosts_file: str | None = "/etc/hosts",
        hostname_file: str | None = "/etc/hostname",
        sysfs_root: str | None = "/sys/class/net",
        exclude_interfaces: Collection[str] = (),
        net_if_addrs: Callable[[], Mapping[str, Sequence[Any]]] | None = None,
        gethostname: Callable[[], str] = socket.gethostname,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hosts_file = hosts_file
        self.hostname_file = hostname_file
        self.sysfs_root = sysfs_root
        self.exclude_interfaces = tuple(exclude_interfaces)
        self._net_if_addrs = net_if_addrs
        self._gethostname = gethostname
        self._clock = clock

    def __call__(self) -> LocalSnapshot:
        taken_at = self._clock()
        interfaces = self._interfaces()
        addresses = frozenset(
            ip for name, ip, _ in interfaces if name not in _SERVICE_ADDRESS_INTERFACES
        )
        hostnames = self._hostnames(addresses)
        networks = self._container_networks(interfaces)
        return LocalSnapshot(hostnames, addresses, networks, taken_at)

    # -- interfaces -------------------------------------------------------------------------

    def _interfaces(self) -> list[tuple[str, IPAddress, int | None]]:
        """``(interface, address, prefix length or None)`` for every AF_INET/AF_INET6 address."""
        try:
            if self._net_if_addrs is not None:
                table = self._net_if_addrs()
            else:
                # Imported on first probe, never at module import (sollol_locality stays light);
                # through importlib so type checking does not need psutil's stubs.
                psutil = importlib.import_module("psutil")
                table = psutil.net_if_addrs()
        except Exception as exc:
            logger.warning(
                "reading network interfaces failed (%s: %s); only loopback is known as local",
                type(exc).__name__, exc,
                extra={"event": "local_interfaces_failed", "error": repr(exc)},
            )
            return []
        found: list[tuple[str, IPAddress, int | None]] = []
        for name, entries in table.items():
            for entry in entries:
                try:
                    family = entry.family
                    if family not in (socket.AF_INET, socket.AF_INET6):
                        continue
                    ip = _unwrap(ipaddress.ip_address(str(entry.address).partition("%")[0]))
                    found.append((name, ip, _prefix_length(ip, entry.netmask)))
                except (AttributeError, TypeError, ValueError) as exc:
                    logger.debug("ignoring address %r of interface %r: %s", entry, name, exc,
                                 extra={"event": "local_address_ignored"})
        return found

    # -- names ------------------------------------------------------------------------------

    def _hostnames(self, addresses: frozenset[IPAddress]) -> frozenset[str]:
        names: set[str] = set(LOOPBACK_NAMES)
        own: set[str] = set()
        try:
            own |= _with_short_form(_normalise_name(self._gethostname()))
        except Exception as exc:
            logger.warning("gethostname() failed (%s: %s)", type(exc).__name__, exc,
                           extra={"event": "local_hostname_failed", "error": repr(exc)})
        static = self._read_hostname_file()
        if static:
            own |= _with_short_form(static)
        names |= own
        for ip, line_names in self._read_hosts_file():
            if own.intersection(line_names) or is_loopback_ip(ip) or ip in addresses:
                names.update(line_names)
        names.discard("")
        return frozenset(names)

    def _read_hostname_file(self) -> str | None:
        if self.hostname_file is None:
            return None
        try:
            with open(self.hostname_file, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    text = line.partition("#")[0].strip()
                    if text:
                        return _normalise_name(text.split()[0])
        except OSError as exc:
            logger.debug("hostname file %r not read: %s", self.hostname_file, exc,
                         extra={"event": "local_hostname_file_unread"})
        return None

    def _read_hosts_file(self) -> list[tuple[IPAddress, list[str]]]:
        if self.hosts_file is None:
            return []
        return hosts_file(self.hosts_file).entries()

    # -- container networks -----------------------------------------------------------------

    def _container_networks(
        self, interfaces: Iterable[tuple[str, IPAddress, int | None]]
    ) -> tuple[IPNetwork, ...]:
        sysfs = _Sysfs(self.sysfs_root)
        verdicts: dict[str, bool] = {}
        networks: set[IPNetwork] = set()
        for name, ip, prefix in interfaces:
            if name not in verdicts:
                verdicts[name] = self._is_container_bridge(name, sysfs)
            if not verdicts[name] or prefix is None:
                continue
            network = ipaddress.ip_network((ip, prefix), strict=False)
            problem = _unusable_network(network)
            if problem:
                logger.debug("not using %s of %s as a container network: %s",
                             network, name, problem, extra={"event": "local_network_skipped"})
                continue
            networks.add(network)
        return tuple(sorted(networks, key=lambda n: (n.version, n)))

    def _is_container_bridge(self, name: str, sysfs: _Sysfs) -> bool:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude_interfaces):
            return False
        if _OVERLAY_RE.match(name):
            return False
        if sysfs.exists(name, "device"):
            return False  # a physical NIC, whatever its name
        is_bridge = sysfs.exists(name, "bridge")
        if is_bridge:
            for port in sysfs.listdir(name, "brif"):
                reason = sysfs.off_host_reason(port)
                if reason:
                    logger.debug(
                        "bridge %s is not a container bridge: port %s %s (a LAN bridge)",
                        name, port, reason, extra={"event": "local_lan_bridge"},
                    )
                    return False
        return bool(is_bridge) or _CONTAINER_BRIDGE_RE.match(name) is not None


class _Sysfs:
    """Read-only view of ``/sys/class/net`` (or a test tree); unreadable means unknown."""

    def __init__(self, root: str | None) -> None:
        self.root = root
        self.available = root is not None and os.path.isdir(root)
        if root is not None and not self.available:
            logger.debug("%r is not readable; container bridges are recognised by name only",
                         root, extra={"event": "local_sysfs_missing"})

    def _path(self, *parts: str) -> str:
        assert self.root is not None
        return os.path.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        return self.available and os.path.exists(self._path(*parts))

    def listdir(self, *parts: str) -> list[str]:
        if not self.available:
            return []
        try:
            return sorted(os.listdir(self._path(*parts)))
        except OSError as exc:
            logger.debug("cannot list %s: %s", self._path(*parts), exc,
                         extra={"event": "local_sysfs_unreadable"})
            return []

    def devtype(self, name: str) -> str | None:
        if not self.available:
            return None
        try:
            with open(self._path(name, "uevent"), encoding="ascii", errors="replace") as fh:
                for line in fh:
                    key, _, value = line.strip().partition("=")
                    if key == "DEVTYPE":
                        return value
        except OSError:
            pass
        return None

    def off_host_reason(self, name: str, depth: int = 0) -> str | None:
        """Why the device ``name`` carries traffic off this machine, or ``None``."""
        if self.exists(name, "device"):
            return "is a physical NIC"
        devtype = self.devtype(name)
        if devtype in _TUNNEL_DEVTYPES:
            return f"is a {devtype} tunnel"
        if depth < _MAX_LOWER_DEPTH:
            for entry in self.listdir(name):
                if entry.startswith("lower_"):
                    lower = entry.removeprefix("lower_")
                    reason = self.off_host_reason(lower, depth + 1)
                    if reason:
                        return f"sits on {lower}, which {reason}"
        return None


def _coerce_ip(value: object) -> IPAddress | None:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return _unwrap(value)
    if isinstance(value, str):
        try:
            return _unwrap(ipaddress.ip_address(value.strip().partition("%")[0]))
        except ValueError:
            return None
    return None


def _with_short_form(name: str | None) -> set[str]:
    if not name:
        return set()
    return {name, name.partition(".")[0]}


def _prefix_length(ip: IPAddress, netmask: object) -> int | None:
    """Prefix length of a netmask given as an address (``255.255.255.0``, ``ffff::``)."""
    if not netmask:
        return None
    text = str(netmask).partition("%")[0]
    if text.isdigit():
        prefix = int(text)
        return prefix if prefix <= ip.max_prefixlen else None
    try:
        mask = ipaddress.ip_address(text)
    except ValueError:
        return None
    if mask.version != ip.version:
        return None
    bits, value = ip.max_prefixlen, int(mask)
    prefix = bin(value).count("1")
    contiguous = ((1 << prefix) - 1) << (bits - prefix)
    return prefix if value == contiguous else None


def _unusable_network(network: IPNetwork) -> str | None:
    if network.prefixlen == network.max_prefixlen:
        return "a single-address route"
    if network.prefixlen < _MIN_PREFIX[network.version]:
        return f"larger than /{_MIN_PREFIX[network.version]}"
    if network.is_link_local:
        return "link-local (the same prefix is on every link)"
    if network.is_loopback or network.is_multicast or network.is_unspecified:
        return "not a host network"
    return None


def _normalise_snapshot(snap: LocalSnapshot, now: float) -> LocalSnapshot:
    return LocalSnapshot(
        hostnames=frozenset(_normalise_name(n) for n in snap.hostnames),
        addresses=frozenset(_unwrap(a) for a in snap.addresses),
        container_networks=tuple(snap.container_networks),
        taken_at=now,
    )


def _fallback_snapshot() -> LocalSnapshot:
    return LocalSnapshot(LOOPBACK_NAMES, _FALLBACK_ADDRESSES, ())


def _log_change(previous: LocalSnapshot | None, fresh: LocalSnapshot, version: int) -> None:
    nets = [str(n) for n in fresh.container_networks]
    if previous is None:
        logger.debug(
            "local machine: %d addresses, %d names, container networks %s",
            len(fresh.addresses), len(fresh.hostnames), nets or "none",
            extra={"event": "local_probed", "version": version},
        )
        return
    added = sorted(map(str, fresh.addresses - previous.addresses))
    removed = sorted(map(str, previous.addresses - fresh.addresses))
    logger.info(
        "local machine changed (version %d): addresses +%s -%s, container networks %s, %d names",
        version, added, removed, nets or "none", len(fresh.hostnames),
        extra={"event": "local_changed", "version": version},
    )
