"""Simulated machines for benchmarks: this machine, and network namespaces standing in for others.

* :class:`LocalMachine`: this machine's root network namespace. Emulators listen on loopback
  (``127.0.0.1``, any port) or on the machine's own LAN address (the IPv4 address of the interface
  that carries the default route). Every emulator of a local machine is pinned to the same CPUs, so
  two of them really contend, as two Ollama instances on one box do.
* :class:`NetnsMachine`: a network namespace (``ip netns add``) joined to the root namespace by a
  veth pair in its own private /24 (the host side takes the first address; nothing is routed beyond
  the link), with emulators pinned to its own CPUs. On this 2-core machine "separate machines" means
  separate cores. A subnet that overlaps anything here is refused; ``ip=None`` picks a free random
  one in :data:`AUTO_SUBNETS`, for runs that may overlap in time (tests). Needs root;
  :func:`netns_support` says why not when it is unavailable.
* :class:`Cluster`: a context manager that owns every machine and emulator created through it and
  removes them all on exit, on an exception, on SIGINT/SIGTERM/SIGHUP (the handler cleans up, then
  defers to the previous handler: ``KeyboardInterrupt`` for SIGINT, ``SystemExit(128 + n)`` for the
  others; a signal ignored on entry, like a background job's SIGINT, stays ignored) and at
  interpreter exit (``atexit``). Emulators also exit by themselves when this process
  dies (their stdin pipe closes). Only a SIGKILL of this process can leave a namespace behind:
  ``python -m sollol_locality.testing.machines cleanup`` removes namespaces whose creating
  process is gone.
* :data:`SCENARIOS`: the layouts benchmarks run, as data. :func:`start_scenario` builds one in a
  cluster; :func:`scenario_skip_reason` says why one cannot run here.

Namespaces are named ``slb<pid>-<name>`` and host-side veths ``slb<hex>h``, so what this module
created is recognisable and nothing else is touched.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import ipaddress
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import FrameType, MappingProxyType, TracebackType
from typing import Any, Final, Literal, Protocol

from .emulator import (
    DEFAULT_MODEL,
    DEFAULT_NUM_PREDICT,
    DEFAULT_WEIGHTS_MB,
    EmulatorProcess,
    spawn_emulator,
)

__all__ = [
    "AUTO_SUBNETS",
    "NETNS_PREFIX",
    "SCENARIOS",
    "Cluster",
    "LocalMachine",
    "Machine",
    "MachineError",
    "MachineSpec",
    "NetnsMachine",
    "NetnsUnavailable",
    "NodeSpec",
    "RunningNode",
    "RunningScenario",
    "Scenario",
    "ScenarioUnavailable",
    "cleanup_stale",
    "create_netns_machine",
    "free_subnet",
    "list_our_namespaces",
    "main",
    "netns_support",
    "own_lan_address",
    "scenario_skip_reason",
    "start_scenario",
]

NETNS_PREFIX: Final = "slb"
"""Prefix of every namespace (``slb<pid>-<name>``) and host-side veth (``slb<hex>h``) made here."""

_NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
_OUR_NETNS_RE: Final = re.compile(rf"^{NETNS_PREFIX}(\d+)-[a-z0-9-]+$")
_IP_TIMEOUT: Final = 15.0
_STRAY_GRACE: Final = 3.0

AddressKind = Literal["loopback", "lan", "netns"]


class MachineError(RuntimeError):
    """An ``ip`` command that failed, or a machine that cannot be set up as asked."""


class NetnsUnavailable(MachineError):
    """Network namespaces cannot be used here (not root, no ``ip``, or ``ip netns`` fails)."""


class _SubnetTaken(MachineError):
    """A namespace subnet that overlaps one already in use here."""


class ScenarioUnavailable(MachineError):
    """A scenario that cannot run on this machine; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------------
# The ip command


def _ip(
    *args: str, check: bool = True, missing_ok: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; a failure whose message contains ``missing_ok`` is not an error."""
    command = ["ip", *args]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MachineError(f"{' '.join(command)!r} failed: {exc}") from exc
    if missing_ok is not None and result.returncode != 0 and missing_ok in result.stderr:
        return result
    if check and result.returncode != 0:
        raise MachineError(
            f"{' '.join(command)!r} exited with {result.returncode}: {result.stderr.strip()!r}"
        )
    return result


def _ip_json(*args: str) -> list[dict[str, Any]]:
    output = _ip("-j", *args).stdout.strip()
    if not output:
        return []
    try:
        data = json.loads(output)
    except json.JSONDecodeError:
        raise MachineError(f"'ip -j {' '.join(args)}' printed no JSON: {output[:200]!r}") from None
    return data if isinstance(data, list) else []


def _netns_dir() -> Path:
    """Where ``ip netns`` keeps its namespaces (iproute2's NETNS_RUN_DIR)."""
    run = Path("/run/netns")
    return run if run.is_dir() or not Path("/var/run/netns").is_dir() else Path("/var/run/netns")


def _netns_exists(name: str) -> bool:
    # Not `ip netns list`: while any namespace is being torn down it may print
    # "Error: Peer netns reference is invalid." instead of its list (exit status 0).
    return (_netns_dir() / name).exists()


@lru_cache(maxsize=1)
def netns_support() -> str | None:
    """``None`` when network namespaces work here, else the reason they do not (cached)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    if shutil.which("ip") is None:
        return "network namespaces need the 'ip' command (iproute2), which is not installed"
    probe = f"{NETNS_PREFIX}{os.getpid()}-probe{secrets.token_hex(2)}"
    try:
        _ip("netns", "add", probe)
    except MachineError as exc:
        return f"'ip netns add' does not work here: {exc}"
    try:
        _ip("netns", "del", probe)
    except MachineError as exc:
        return f"'ip netns del' does not work here: {exc}"
    return None


def list_our_namespaces() -> list[str]:
    """Names of the namespaces this module made (in any process) that still exist."""
    try:
        names = os.listdir(_netns_dir())
    except FileNotFoundError:
        return []
    return sorted(name for name in names if _OUR_NETNS_RE.match(name))


def own_lan_address() -> str | None:
    """This machine's own IPv4 LAN address: the default-route interface's, else any up one.

    Reads local interface tables only (``ip route`` and psutil); sends nothing.
    """
    psutil: Any = importlib.import_module("psutil")  # no stubs needed for type checking

    addresses = psutil.net_if_addrs()
    stats = psutil.net_if_stats()
    preferred: list[str] = []
    try:
        preferred = [
            str(r["dev"]) for r in _ip_json("-4", "route", "show", "default") if "dev" in r
        ]
    except (MachineError, json.JSONDecodeError):
        pass
    candidates = preferred + sorted(set(addresses) - set(preferred))
    for name in candidates:
        if name.startswith(NETNS_PREFIX) or name not in stats or not stats[name].isup:
            continue
        for entry in addresses.get(name, ()):
            if entry.family != socket.AF_INET:
                continue
            ip = ipaddress.IPv4Address(entry.address)
            if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified):
                return str(ip)
    return None


# --------------------------------------------------------------------------------------------
# Ownership and clean-up


class _Closeable(Protocol):
    def close(self) -> object: ...


class _Registry:
    """Resources in creation order; :meth:`close_all` closes newest first. Re-entrant and
    idempotent, so a signal handler may run it while the main thread is already cleaning up."""

    def __init__(self) -> None:
        self._items: list[_Closeable] = []
        self._lock = threading.RLock()

    def add(self, item: _Closeable) -> None:
        with self._lock:
            self._items.append(item)

    def discard(self, item: _Closeable) -> None:
        with self._lock:
            if item in self._items:
                self._items.remove(item)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def close_all(self) -> list[BaseException]:
        with self._lock:
            items = self._items[::-1]
            self._items.clear()
        for item in items:  # every emulator gets SIGTERM first, so they exit together
            if isinstance(item, EmulatorProcess):
                item.send_stop()
        errors: list[BaseException] = []
        for item in items:
            try:
                item.close()
            except Exception as exc:  # noqa: BLE001 (collected, reported by the caller)
                errors.append(exc)
        return errors


_PROCESS_REGISTRY: Final = _Registry()
"""Everything any cluster or ``create_netns_machine`` made in this process; closed at exit."""


def _close_at_exit() -> None:
    for error in _PROCESS_REGISTRY.close_all():
        print(f"sollol_locality.testing.machines: clean-up at exit: {error}", file=sys.stderr)


atexit.register(_close_at_exit)


class _Owner:
    """Where a machine registers what it creates: a cluster's registry and the process-wide one."""

    def __init__(self, registries: Sequence[_Registry]) -> None:
        self._registries = tuple(registries)

    def add(self, item: _Closeable) -> None:
        for registry in self._registries:
            registry.add(item)

    def discard(self, item: _Closeable) -> None:
        for registry in self._registries:
            registry.discard(item)


# --------------------------------------------------------------------------------------------
# Machines


class Machine:
    """A simulated physical machine that runs emulator nodes pinned to its CPUs.

    Attributes:
        name: the machine's ground-truth name (what a correct topology would group by).
        cpus: CPUs its emulators are pinned to (``None``: not pinned).
        slowdown: per-token work multiplier for its emulators (6.0: six times slower).
    """

    default_address: AddressKind = "loopback"

    def __init__(
        self, name: str, *, cpus: Sequence[int] | None, slowdown: float, owner: _Owner
    ) -> None:
        self.name = name
        self.cpus = tuple(cpus) if cpus is not None else None
        self.slowdown = slowdown
        self._owner = owner
        self.emulators: list[EmulatorProcess] = []

    def address(self, kind: AddressKind | None = None) -> str:
        """The IP an emulator listens on for ``kind`` (the machine's default when ``None``)."""
        raise NotImplementedError

    def _netns(self) -> str | None:
        return None

    def spawn_emulator(
        self, *, address: AddressKind | None = None, port: int = 0,
        weights_mb: int = DEFAULT_WEIGHTS_MB, threads: int = 1, slowdown: float | None = None,
        model: str = DEFAULT_MODEL, default_num_predict: int = DEFAULT_NUM_PREDICT,
        taskset: Sequence[int] | None = None, env: Mapping[str, str] | None = None,
    ) -> EmulatorProcess:  # fmt: skip
        """Start an emulator on this machine without waiting for READY; it is owned (stopped on
        clean-up) from the moment it exists.

        It runs under ``taskset -c CPUS`` (``taskset``, else the machine's CPUs), as people pin
        an instance, so the process's own affinity is that set from its first instruction
        (without a ``taskset`` binary it pins itself with ``--cpus``). ``env`` is added to its
        environment (``OLLAMA_NUM_PARALLEL``, ``CUDA_VISIBLE_DEVICES``...).
        """
        pin = tuple(taskset) if taskset is not None else self.cpus
        use_taskset = pin is not None and shutil.which("taskset") is not None
        process = spawn_emulator(
            self.address(address), port, netns=self._netns(),
            cpus=None if use_taskset else pin, taskset=pin if use_taskset else None,
            model=model, weights_mb=weights_mb, threads=threads,
            slowdown=self.slowdown if slowdown is None else slowdown,
            default_num_predict=default_num_predict, extra_env=env,
        )  # fmt: skip
        self._owner.add(process)
        self.emulators.append(process)
        return process

    def start_emulator(
        self, *, address: AddressKind | None = None, port: int = 0,
        weights_mb: int = DEFAULT_WEIGHTS_MB, threads: int = 1, slowdown: float | None = None,
        model: str = DEFAULT_MODEL, default_num_predict: int = DEFAULT_NUM_PREDICT,
        ready_timeout: float = 60.0, taskset: Sequence[int] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> EmulatorProcess:  # fmt: skip
        """Start an emulator on this machine and wait until it listens (options as
        :meth:`spawn_emulator`)."""
        process = self.spawn_emulator(
            address=address, port=port, weights_mb=weights_mb, threads=threads,
            slowdown=slowdown, model=model, default_num_predict=default_num_predict,
            taskset=taskset, env=env,
        )  # fmt: skip
        process.wait_ready(ready_timeout)
        return process

    def close(self) -> None:
        """Stop this machine's emulators (idempotent)."""
        for process in self.emulators:
            process.send_stop()
        for process in self.emulators:
            process.stop()
            self._owner.discard(process)


class LocalMachine(Machine):
    """This machine, in the root network namespace: loopback or its own LAN address."""

    def __repr__(self) -> str:
        return f"<LocalMachine {self.name!r} cpus={self.cpus} slowdown={self.slowdown}>"

    def address(self, kind: AddressKind | None = None) -> str:
        kind = kind or self.default_address
        if kind == "loopback":
            return "127.0.0.1"
        if kind == "lan":
            lan = own_lan_address()
            if lan is None:
                raise MachineError("this machine has no up, non-loopback IPv4 interface address")
            return lan
        raise ValueError(f"Invalid address kind {kind!r} for a local machine: 'loopback' or 'lan'")


class NetnsMachine(Machine):
    """A network namespace joined to the root namespace by a veth pair, standing in for another
    machine. Use :func:`create_netns_machine` or :meth:`Cluster.netns_machine` to make one.

    Attributes:
        netns: the namespace's name (``slb<pid>-<name>``).
        interface: the namespace side's address and prefix (e.g. ``10.213.11.2/24``).
        host_interface: the root namespace side's (e.g. ``10.213.11.1/24``).
        host_veth / netns_veth: the veth pair's interface names.
    """

    default_address: AddressKind = "netns"

    def __init__(
        self, name: str, *, netns: str, interface: ipaddress.IPv4Interface,
        host_interface: ipaddress.IPv4Interface, host_veth: str, netns_veth: str,
        cpus: Sequence[int] | None, slowdown: float, owner: _Owner,
    ) -> None:  # fmt: skip
        super().__init__(name, cpus=cpus, slowdown=slowdown, owner=owner)
        self.netns = netns
        self.interface = interface
        self.host_interface = host_interface
        self.host_veth = host_veth
        self.netns_veth = netns_veth
        self._closed = False
        self._close_lock = threading.RLock()

    def __repr__(self) -> str:
        return (
            f"<NetnsMachine {self.name!r} netns={self.netns!r} ip={self.interface} "
            f"cpus={self.cpus} slowdown={self.slowdown}>"
        )

    @property
    def ip(self) -> str:
        return str(self.interface.ip)

    def address(self, kind: AddressKind | None = None) -> str:
        kind = kind or self.default_address
        if kind != "netns":
            raise ValueError(f"Invalid address kind {kind!r} for a namespace machine: 'netns'")
        return self.ip

    def _netns(self) -> str | None:
        return self.netns

    def _setup(self) -> None:
        netns, host_veth, netns_veth = self.netns, self.host_veth, self.netns_veth
        _ip("netns", "add", netns)
        _ip("link", "add", host_veth, "type", "veth", "peer", "name", netns_veth, "netns", netns)
        _ip("addr", "add", str(self.host_interface), "dev", host_veth)
        _ip("link", "set", host_veth, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "addr", "add", str(self.interface), "dev", netns_veth)
        _ip("-n", netns, "link", "set", netns_veth, "up")

    def pids(self) -> list[int]:
        """Processes inside the namespace (all of them ours: we made it)."""
        result = _ip("netns", "pids", self.netns, check=False)
        return (
            [int(p) for p in result.stdout.split() if p.isdigit()] if result.returncode == 0 else []
        )

    def exists(self) -> bool:
        return _netns_exists(self.netns)

    def close(self) -> None:
        """Stop its emulators, end anything else left inside, delete the namespace and the veth
        pair. Idempotent; safe on a half-built machine."""
        with self._close_lock:
            if self._closed:
                return
            super().close()
            if self.exists():
                _end_processes(self.pids())
            # Deleting one end of a veth pair removes both at once; the namespace's own teardown
            # after `ip netns del` is asynchronous, so the pair goes first.
            _ip("link", "del", self.host_veth, missing_ok="Cannot find device")
            if self.exists():
                _ip("netns", "del", self.netns, missing_ok="No such file or directory")
            self._closed = True


def _end_processes(pids: Iterable[int]) -> None:
    """SIGTERM, wait up to a grace period on pidfds (no polling), then SIGKILL what is left."""
    waiting: dict[int, int] = {}
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            signal.pidfd_send_signal(fd, signal.SIGTERM)
        except ProcessLookupError:
            os.close(fd)
            continue
        waiting[fd] = pid
    try:
        deadline_poll = select.poll()
        for fd in waiting:
            deadline_poll.register(fd, select.POLLIN)
        remaining = dict(waiting)
        end = time.monotonic() + _STRAY_GRACE
        while remaining:
            timeout_ms = max(0, int((end - time.monotonic()) * 1000))
            events = deadline_poll.poll(timeout_ms)
            if not events:
                break
            for fd, _event in events:
                deadline_poll.unregister(fd)
                remaining.pop(fd, None)
        for fd in remaining:
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        for fd in waiting:
            os.close(fd)


def _used_networks(
    *, ignore_interface: str | None = None
) -> list[tuple[ipaddress.IPv4Network, str]]:
    """IPv4 networks the root namespace already uses: interface subnets and routes."""
    psutil: Any = importlib.import_module("psutil")

    used: list[tuple[ipaddress.IPv4Network, str]] = []
    for name, entries in psutil.net_if_addrs().items():
        if name == ignore_interface:
            continue
        for entry in entries:
            if entry.family == socket.AF_INET and entry.netmask:
                network = ipaddress.IPv4Interface(f"{entry.address}/{entry.netmask}").network
                used.append((network, f"interface {name!r}"))
    for route in _ip_json("-4", "route", "show", "table", "all"):
        destination = str(route.get("dst", ""))
        if destination in ("", "default") or route.get("type") == "local":
            continue
        if ignore_interface is not None and route.get("dev") == ignore_interface:
            continue
        try:
            network = ipaddress.IPv4Network(destination, strict=False)
        except ValueError:
            continue
        if network.prefixlen > 0:
            used.append((network, f"a route via {route.get('dev', '?')!r}"))
    return used


def _check_subnet_free(
    network: ipaddress.IPv4Network, *, ignore_interface: str | None = None
) -> None:
    """Refuse a subnet that overlaps anything the root namespace already has (addresses, routes)."""
    for existing, where in _used_networks(ignore_interface=ignore_interface):
        if existing.overlaps(network):
            raise _SubnetTaken(
                f"subnet {network} overlaps {existing} ({where}); pick another private subnet"
            )


AUTO_SUBNETS: Final = ipaddress.IPv4Network("10.213.128.0/17")
"""Where :func:`free_subnet` picks namespace subnets (scenarios' fixed ones are below it)."""


def free_subnet(
    within: ipaddress.IPv4Network = AUTO_SUBNETS, *, prefix_len: int = 24
) -> ipaddress.IPv4Network:
    """A random subnet of ``within`` that nothing here uses yet (random, so concurrent runs
    rarely pick the same one; :func:`create_netns_machine` re-checks after creating)."""
    used = [network for network, _ in _used_networks()]
    free = [
        candidate
        for candidate in within.subnets(new_prefix=prefix_len)
        if not any(candidate.overlaps(network) for network in used)
    ]
    if not free:
        raise MachineError(f"no free /{prefix_len} left in {within}")
    return free[secrets.randbelow(len(free))]


def _create_netns_machine(
    name: str, ip: str | None, cpus: Sequence[int] | None, *, slowdown: float, prefix_len: int,
    owner: _Owner,
) -> NetnsMachine:  # fmt: skip
    if not _NAME_RE.match(name):
        raise ValueError(f"Invalid machine name {name!r}: expected 1-31 of a-z, 0-9 and '-'")
    reason = netns_support()
    if reason is not None:
        raise NetnsUnavailable(reason)
    if ip is None:
        attempts = 5
        for attempt in range(attempts):  # another process may take the subnet we picked
            network = free_subnet(prefix_len=prefix_len)
            try:
                return _create_netns_machine(
                    name, str(network.network_address + 2), cpus, slowdown=slowdown,
                    prefix_len=prefix_len, owner=owner,
                )  # fmt: skip
            except _SubnetTaken:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")
    interface = ipaddress.IPv4Interface(f"{ip}/{prefix_len}")
    network = interface.network
    if not network.is_private or not 16 <= prefix_len <= 30:
        raise ValueError(
            f"Invalid namespace address {ip!r}/{prefix_len}: expected a private /16 to /30"
        )
    if interface.ip in (network.network_address, network.broadcast_address):
        raise ValueError(f"Invalid namespace address {ip!r}/{prefix_len}: not a host address")
    host_ip = network.network_address + 1
    if host_ip == interface.ip:
        host_ip += 1
    host_interface = ipaddress.IPv4Interface(f"{host_ip}/{prefix_len}")
    netns = f"{NETNS_PREFIX}{os.getpid()}-{name}"
    if _netns_exists(netns):  # checked before owning it: clean-up must not delete the other one
        raise MachineError(
            f"namespace {netns!r} exists: this process already has a machine {name!r}"
        )
    _check_subnet_free(network)
    token = secrets.token_hex(3)
    machine = NetnsMachine(
        name, netns=netns, interface=interface,
        host_interface=host_interface, host_veth=f"{NETNS_PREFIX}{token}h",
        netns_veth=f"{NETNS_PREFIX}{token}n", cpus=cpus, slowdown=slowdown, owner=owner,
    )  # fmt: skip
    owner.add(machine)  # owned before the first command, so a half-built machine is removed too
    try:
        machine._setup()
        # Another process may have taken the same subnet between the check and now.
        _check_subnet_free(network, ignore_interface=machine.host_veth)
    except BaseException:
        machine.close()
        owner.discard(machine)
        raise
    return machine


def create_netns_machine(
    name: str, ip: str | None, cpus: Sequence[int] | None, *, slowdown: float = 1.0,
    prefix_len: int = 24, cluster: Cluster | None = None,
) -> NetnsMachine:  # fmt: skip
    """Create a namespace machine: ``ip netns add``, a veth pair (root side: the subnet's first
    free host address), lo and the veth up inside. ``ip`` is the namespace side's IPv4 address in a
    private subnet no interface or route here overlaps (e.g. ``"10.213.11.2"``), or ``None`` for
    ``.2`` of a free random /24 in :data:`AUTO_SUBNETS`.

    Without ``cluster`` the machine is removed at interpreter exit, or by ``machine.close()``.
    Raises :class:`NetnsUnavailable` when namespaces cannot be used here.
    """
    if cluster is not None:
        return cluster.netns_machine(name, ip, cpus, slowdown=slowdown, prefix_len=prefix_len)
    return _create_netns_machine(
        name, ip, cpus, slowdown=slowdown, prefix_len=prefix_len,
        owner=_Owner([_PROCESS_REGISTRY]),
    )  # fmt: skip


def cleanup_stale(*, everything: bool = False, names: Iterable[str] | None = None) -> list[str]:
    """Remove namespaces this module made whose creating process is gone (all of ours with
    ``everything``; only those in ``names`` when given), ending the processes inside them first.
    Returns the names removed."""
    removed = []
    wanted = None if names is None else set(names)
    for netns in list_our_namespaces():
        if wanted is not None and netns not in wanted:
            continue
        match = _OUR_NETNS_RE.match(netns)
        assert match is not None
        creator = int(match.group(1))
        if not everything and (creator == os.getpid() or _alive(creator)):
            continue
        result = _ip("netns", "pids", netns, check=False)
        _end_processes(int(p) for p in result.stdout.split() if p.isdigit())
        # Delete the veth pairs first: that is synchronous, a namespace's teardown is not.
        for link in _ip_json("-n", netns, "link", "show", "type", "veth"):
            _ip("-n", netns, "link", "del", str(link["ifname"]), missing_ok="Cannot find device")
        _ip("netns", "del", netns, missing_ok="No such file or directory")
        removed.append(netns)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------
# Cluster


class Cluster:
    """Owns machines and emulators; removes every one of them on exit, error or signal.

    ``with Cluster() as cluster:`` installs SIGINT/SIGTERM/SIGHUP handlers (main thread only; not
    for a signal already ignored) that clean up and then defer to the previous handler
    (``KeyboardInterrupt`` for SIGINT, ``SystemExit(128 + signal)`` where it was the default);
    they are restored on exit.
    """

    _SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, *, handle_signals: bool = True) -> None:
        self._registry = _Registry()
        self._owner = _Owner([self._registry, _PROCESS_REGISTRY])
        self._handle_signals = handle_signals
        self._previous: dict[int, Any] = {}
        self.machines: list[Machine] = []

    def __enter__(self) -> Cluster:
        if self._handle_signals and threading.current_thread() is threading.main_thread():
            for sig in self._SIGNALS:
                # A signal ignored on entry (a background job's SIGINT, nohup's SIGHUP) stays
                # ignored: this process was told not to stop on it.
                if signal.getsignal(sig) != signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        try:
            self.close(raise_errors=exc is None)
        finally:
            self._restore_signals()

    def _restore_signals(self) -> None:
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.close(raise_errors=False)
        self._restore_signals()
        if callable(previous):
            previous(signum, frame)  # SIGINT's default raises KeyboardInterrupt
        elif previous != signal.SIG_IGN:
            raise SystemExit(128 + signum)

    def local_machine(
        self, name: str = "local", *, cpus: Sequence[int] | None = None, slowdown: float = 1.0
    ) -> LocalMachine:
        machine = LocalMachine(name, cpus=cpus, slowdown=slowdown, owner=self._owner)
        self._owner.add(machine)
        self.machines.append(machine)
        return machine

    def netns_machine(
        self, name: str, ip: str | None, cpus: Sequence[int] | None, *, slowdown: float = 1.0,
        prefix_len: int = 24,
    ) -> NetnsMachine:  # fmt: skip
        machine = _create_netns_machine(
            name, ip, cpus, slowdown=slowdown, prefix_len=prefix_len, owner=self._owner
        )
        self.machines.append(machine)
        return machine

    @property
    def emulators(self) -> list[EmulatorProcess]:
        return [process for machine in self.machines for process in machine.emulators]

    def close(self, *, raise_errors: bool = True) -> None:
        """Remove everything this cluster made (idempotent). Errors are printed to stderr and,
        with ``raise_errors``, the first is raised after everything else was attempted."""
        errors = self._registry.close_all()
        items: list[_Closeable] = [*self.emulators, *self.machines]
        for item in items:
            _PROCESS_REGISTRY.discard(item)
        for error in errors:
            print(f"sollol_locality.testing.machines: clean-up failed: {error}", file=sys.stderr)
        if errors and raise_errors:
            raise MachineError(f"clean-up failed: {errors[0]}") from errors[0]


# --------------------------------------------------------------------------------------------
# Scenarios


GPU_VARIABLES: Final = (
    "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL",
)  # fmt: skip
"""Environment variables that say which GPUs an instance may use (the first one set wins)."""


@dataclass(frozen=True, slots=True)
class MachineSpec:
    """One simulated machine of a scenario.

    Attributes:
        name: ground-truth machine name (nodes naming it share hardware).
        cpus: CPUs its emulators are pinned to.
        netns_ip: ``None`` for this machine (root namespace), else the namespace's address.
        slowdown: per-token work multiplier for its emulators.
        host: the physical box it stands for, when that is not ``name`` (VMs or containers of
            one box, which no address shows); a label for reports: what is shared is decided by
            the CPU sets (:meth:`Scenario.units`).
    """

    name: str
    cpus: tuple[int, ...]
    netns_ip: str | None = None
    slowdown: float = 1.0
    host: str | None = None

    @property
    def physical_host(self) -> str:
        return self.host or self.name


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One emulator node: which machine, which address of it, which port (0: any free one).

    Attributes:
        taskset: CPUs the instance is started on with ``taskset -c`` (``None``: the machine's).
        env: extra environment of the instance, as ``(name, value)`` pairs, e.g.
            ``(("OLLAMA_NUM_PARALLEL", "4"),)``.
    """

    machine: str
    address: AddressKind = "loopback"
    port: int = 0
    taskset: tuple[int, ...] | None = None
    env: tuple[tuple[str, str], ...] = ()

    @property
    def environment(self) -> dict[str, str]:
        return dict(self.env)

    @property
    def num_parallel(self) -> int:
        """The slots the instance's environment gives it (``OLLAMA_NUM_PARALLEL``, default 1)."""
        text = self.environment.get("OLLAMA_NUM_PARALLEL", "").strip()
        return int(text) if text else 1

    @property
    def batching(self) -> bool:
        return self.num_parallel > 1

    @property
    def gpus(self) -> tuple[str, ...]:
        """GPU ids its environment makes visible (``CUDA_VISIBLE_DEVICES`` and the like)."""
        env = self.environment
        for name in GPU_VARIABLES:
            if name in env:
                return tuple(item.strip() for item in env[name].split(",") if item.strip())
        return ()


@dataclass(frozen=True, slots=True)
class Scenario:
    """A layout of emulator nodes over simulated machines."""

    key: str
    description: str
    machines: tuple[MachineSpec, ...]
    nodes: tuple[NodeSpec, ...]

    def __post_init__(self) -> None:
        names = [m.name for m in self.machines]
        if len(set(names)) != len(names):
            raise ValueError(f"Invalid scenario {self.key!r}: duplicate machine names {names}")
        for node in self.nodes:
            spec = self.machine(node.machine)
            if (node.address == "netns") != (spec.netns_ip is not None):
                raise ValueError(
                    f"Invalid scenario {self.key!r}: address {node.address!r} on machine "
                    f"{spec.name!r} ({'namespace' if spec.netns_ip else 'this machine'})"
                )
            if node.taskset is not None and not node.taskset:
                raise ValueError(f"Invalid scenario {self.key!r}: empty taskset on {node!r}")
            try:
                slots = node.num_parallel
            except ValueError:
                slots = 0
            if slots < 1:
                raise ValueError(
                    f"Invalid scenario {self.key!r}: OLLAMA_NUM_PARALLEL "
                    f"{node.environment['OLLAMA_NUM_PARALLEL']!r} is not a whole number >= 1"
                )

    def node_cpus(self, index: int) -> tuple[int, ...]:
        """The CPUs node ``index`` runs on: its ``taskset``, else its machine's."""
        node = self.nodes[index]
        return node.taskset if node.taskset is not None else self.machine(node.machine).cpus

    def units(self) -> tuple[tuple[int, ...], ...]:
        """Ground truth: groups of node indexes that share hardware (one execution unit).

        Every simulated machine runs on this one, so what they share is the CPUs: nodes share a
        unit when their CPU sets overlap, directly or through another node of the group,
        whatever their machines and addresses say.
        """
        groups: list[set[int]] = []
        for index in range(len(self.nodes)):
            cpus = set(self.node_cpus(index))
            joined = [g for g in groups if any(cpus & set(self.node_cpus(j)) for j in g)]
            merged = {index}.union(*joined)
            groups = [g for g in groups if g not in joined] + [merged]
        return tuple(sorted(tuple(sorted(g)) for g in groups))

    def truth(self) -> list[dict[str, Any]]:
        """Per node, in order: the ground truth a benchmark can print next to a decision.

        Keys: ``node`` (index), ``machine``, ``host`` (physical box), ``netns``, ``cpus``,
        ``pinned`` (``"taskset"`` for a node's own set, ``"machine"``), ``num_parallel``,
        ``batching``, ``env``, ``unit`` (``"u1"``...), ``shares_unit_with`` (node indexes),
        ``gpus`` (visible GPU ids), ``shares_gpu_with`` (node indexes) and
        ``hidden`` (it shares a unit with a node of another machine name: co-location that no
        address shows) and ``slowdown`` (its machine's per-token work multiplier).
        """
        unit_of = {i: n for n, group in enumerate(self.units(), 1) for i in group}
        rows = []
        for index, node in enumerate(self.nodes):
            spec = self.machine(node.machine)
            mates = [j for j in unit_of if j != index and unit_of[j] == unit_of[index]]
            rows.append({
                "node": index, "machine": spec.name, "host": spec.physical_host,
                "netns": spec.netns_ip is not None, "cpus": list(self.node_cpus(index)),
                "pinned": "taskset" if node.taskset is not None else "machine",
                "num_parallel": node.num_parallel, "batching": node.batching,
                "env": node.environment, "unit": f"u{unit_of[index]}",
                "shares_unit_with": mates, "gpus": list(node.gpus),
                "shares_gpu_with": [j for j, other in enumerate(self.nodes)
                                    if j != index and set(node.gpus) & set(other.gpus)],
                "hidden": any(self.nodes[j].machine != node.machine for j in mates),
                "slowdown": spec.slowdown,
            })  # fmt: skip
        return rows

    @property
    def colocated(self) -> tuple[tuple[int, ...], ...]:
        """Units of more than one node (node indexes): instances that share hardware."""
        return tuple(group for group in self.units() if len(group) > 1)

    @property
    def hidden_colocation(self) -> tuple[tuple[int, ...], ...]:
        """Co-located groups whose nodes are on differently named machines (other addresses)."""
        return tuple(
            group for group in self.colocated
            if len({self.nodes[i].machine for i in group}) > 1
        )  # fmt: skip

    @property
    def batching_nodes(self) -> tuple[int, ...]:
        return tuple(i for i, node in enumerate(self.nodes) if node.batching)

    @property
    def pinned_nodes(self) -> tuple[int, ...]:
        """Nodes started with their own ``taskset`` CPU set."""
        return tuple(i for i, node in enumerate(self.nodes) if node.taskset is not None)

    def machine(self, name: str) -> MachineSpec:
        for spec in self.machines:
            if spec.name == name:
                return spec
        raise ValueError(f"Invalid scenario {self.key!r}: no machine named {name!r}")

    @property
    def needs_netns(self) -> bool:
        return any(m.netns_ip is not None for m in self.machines)

    @property
    def physical_hosts(self) -> int:
        """Distinct machines the nodes run on: what a correct topology counts."""
        return len({n.machine for n in self.nodes})


_BATCH4: Final[tuple[tuple[str, str], ...]] = (("OLLAMA_NUM_PARALLEL", "4"),)

SCENARIOS: Final[Mapping[str, Scenario]] = MappingProxyType(
    {
        s.key: s
        for s in (
            Scenario(
                "same-host-ports",
                "(a) two nodes on this machine, loopback, two ports, both pinned to CPU 0",
                (MachineSpec("local", (0,)),),
                (NodeSpec("local", "loopback"), NodeSpec("local", "loopback")),
            ),
            Scenario(
                "localhost-and-lan",
                "(b) one node on loopback, one on this machine's own LAN address (another port), "
                "both pinned to CPU 0",
                (MachineSpec("local", (0,)),),
                (NodeSpec("local", "loopback"), NodeSpec("local", "lan")),
            ),
            Scenario(
                "two-machines",
                "(c) two separate machines: namespaces pinned to CPU 0 and CPU 1",
                (MachineSpec("m1", (0,), "10.213.11.2"), MachineSpec("m2", (1,), "10.213.12.2")),
                (NodeSpec("m1", "netns"), NodeSpec("m2", "netns")),
            ),
            Scenario(
                "slow-and-fast",
                "(d) a fast machine (CPU 0) and one six times slower (CPU 1), namespaces",
                (
                    MachineSpec("fast", (0,), "10.213.21.2"),
                    MachineSpec("slow", (1,), "10.213.22.2", slowdown=6.0),
                ),
                (NodeSpec("fast", "netns"), NodeSpec("slow", "netns")),
            ),
            Scenario(
                "two-plus-one",
                "(e) two nodes on this machine (loopback, CPU 0) and one on another machine "
                "(namespace, CPU 1)",
                (MachineSpec("local", (0,)), MachineSpec("remote", (1,), "10.213.31.2")),
                (
                    NodeSpec("local", "loopback"),
                    NodeSpec("local", "loopback"),
                    NodeSpec("remote", "netns"),
                ),
            ),
            Scenario(
                "shared-core-namespaces",
                "(f) two namespaces that look like two machines but share CPU 0 "
                "(VMs or containers on one box)",
                (MachineSpec("vm1", (0,), "10.213.41.2", host="box0"),
                 MachineSpec("vm2", (0,), "10.213.42.2", host="box0")),
                (NodeSpec("vm1", "netns"), NodeSpec("vm2", "netns")),
            ),
            # -- slots and batching (OLLAMA_NUM_PARALLEL) -------------------------------------
            Scenario(
                "batching-node",
                "one node on this machine (loopback, CPU 0) that batches 4 requests "
                "(OLLAMA_NUM_PARALLEL=4)",
                (MachineSpec("local", (0,)),),
                (NodeSpec("local", "loopback", env=_BATCH4),),
            ),
            Scenario(
                "two-batching-instances",
                "two instances of this machine on one CPU set (CPU 0, two ports), each batching "
                "4 (OLLAMA_NUM_PARALLEL=4)",
                (MachineSpec("local", (0,)),),
                (NodeSpec("local", "loopback", env=_BATCH4),
                 NodeSpec("local", "loopback", env=_BATCH4)),
            ),
            Scenario(
                "batching-beside-plain",
                "a node batching 4 on this machine (loopback, CPU 0) beside a plain one on "
                "another machine (namespace, CPU 1)",
                (MachineSpec("local", (0,)), MachineSpec("remote", (1,), "10.213.51.2")),
                (NodeSpec("local", "loopback", env=_BATCH4), NodeSpec("remote", "netns")),
            ),
            # -- pinned instances (taskset) ----------------------------------------------------
            Scenario(
                "pinned-instances",
                "one machine, two instances started under taskset on disjoint cores "
                "(taskset -c 0, taskset -c 1; loopback, two ports)",
                (MachineSpec("local", (0, 1)),),
                (NodeSpec("local", "loopback", taskset=(0,)),
                 NodeSpec("local", "loopback", taskset=(1,))),
            ),
            # -- GPU ids (declared only: the emulator computes on the CPU) -----------------------
            Scenario(
                "one-gpu-id",
                "one machine, two instances on disjoint cores that both see GPU 0 "
                "(CUDA_VISIBLE_DEVICES=0 for each)",
                (MachineSpec("local", (0, 1)),),
                (NodeSpec("local", "loopback", taskset=(0,), env=(("CUDA_VISIBLE_DEVICES", "0"),)),
                 NodeSpec("local", "loopback", taskset=(1,), env=(("CUDA_VISIBLE_DEVICES", "0"),))),
            ),
            Scenario(
                "two-gpu-ids",
                "one machine, two instances on disjoint cores with GPU 0 and GPU 1 "
                "(CUDA_VISIBLE_DEVICES=0 / =1)",
                (MachineSpec("local", (0, 1)),),
                (NodeSpec("local", "loopback", taskset=(0,), env=(("CUDA_VISIBLE_DEVICES", "0"),)),
                 NodeSpec("local", "loopback", taskset=(1,), env=(("CUDA_VISIBLE_DEVICES", "1"),))),
            ),
            # -- co-location the addresses hide ------------------------------------------------
            Scenario(
                "hidden-colocation",
                "three namespaces on three addresses: two share CPU 0 (one box), the third "
                "has CPU 1",
                (MachineSpec("vm1", (0,), "10.213.61.2", host="box0"),
                 MachineSpec("vm2", (0,), "10.213.62.2", host="box0"),
                 MachineSpec("vm3", (1,), "10.213.63.2", host="box1")),
                (NodeSpec("vm1", "netns"), NodeSpec("vm2", "netns"), NodeSpec("vm3", "netns")),
            ),
            Scenario(
                "two-colocated-pairs",
                "four namespaces forming two co-located pairs: A on CPU 0, B on CPU 1",
                (MachineSpec("a1", (0,), "10.213.71.2", host="boxA"),
                 MachineSpec("b1", (1,), "10.213.72.2", host="boxB"),
                 MachineSpec("a2", (0,), "10.213.73.2", host="boxA"),
                 MachineSpec("b2", (1,), "10.213.74.2", host="boxB")),
                (NodeSpec("a1", "netns"), NodeSpec("b1", "netns"), NodeSpec("a2", "netns"),
                 NodeSpec("b2", "netns")),
            ),
        )
    }
)
"""Scenario key -> :class:`Scenario`. Ground truth for a node is its ``NodeSpec.machine`` (what a
correct address-based topology groups by) and, for what shares hardware, :meth:`Scenario.units`
and :meth:`Scenario.truth`: note that ``shared-core-namespaces`` (f) is one unit physically
although its nodes have two unrelated addresses (its machines share CPU 0), as are the pairs of
``hidden-colocation`` and ``two-colocated-pairs``, whose machines name their box in ``host``.
The pairs of ``two-colocated-pairs`` are interleaved in node order, so no detector finds them by
position."""


def scenario_skip_reason(scenario: Scenario) -> str | None:
    """Why ``scenario`` cannot run here, or ``None`` when it can."""
    if scenario.needs_netns:
        reason = netns_support()
        if reason is not None:
            return f"scenario {scenario.key!r} skipped: {reason}"
    if any(n.address == "lan" for n in scenario.nodes) and own_lan_address() is None:
        return f"scenario {scenario.key!r} skipped: this machine has no LAN IPv4 address"
    allowed = os.sched_getaffinity(0)
    wanted = {cpu for m in scenario.machines for cpu in m.cpus}
    wanted.update(cpu for i in range(len(scenario.nodes)) for cpu in scenario.node_cpus(i))
    if scenario.pinned_nodes and shutil.which("taskset") is None:
        return f"scenario {scenario.key!r} skipped: taskset (util-linux) is not installed"
    if not wanted <= allowed:
        return (
            f"scenario {scenario.key!r} skipped: needs CPUs {sorted(wanted)}, "
            f"this process may use {sorted(allowed)}"
        )
    return None


@dataclass(frozen=True, slots=True)
class RunningNode:
    """A started emulator node of a scenario."""

    url: str
    machine: str
    spec: NodeSpec
    process: EmulatorProcess = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class RunningScenario:
    """A scenario whose emulators are listening."""

    scenario: Scenario
    nodes: tuple[RunningNode, ...]
    machines: Mapping[str, Machine] = field(compare=False, repr=False)

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(node.url for node in self.nodes)

    def truth(self) -> dict[str, list[str]]:
        """Ground-truth grouping: machine name -> node URLs (input order)."""
        groups: dict[str, list[str]] = {}
        for node in self.nodes:
            groups.setdefault(node.machine, []).append(node.url)
        return groups

    def units(self) -> list[list[str]]:
        """Ground truth of what shares hardware: node URLs per unit (:meth:`Scenario.units`)."""
        return [[self.nodes[i].url for i in group] for group in self.scenario.units()]

    def facts(self) -> dict[str, dict[str, Any]]:
        """URL -> :meth:`Scenario.truth` row, with the instance's ``pid`` and ``url``, and
        ``shares_unit_with`` as URLs."""
        rows = self.scenario.truth()
        return {
            node.url: {**row, "url": node.url, "pid": node.process.pid,
                       "shares_unit_with": [self.nodes[j].url for j in row["shares_unit_with"]]}
            for node, row in zip(self.nodes, rows, strict=True)
        }  # fmt: skip


def start_scenario(
    scenario: Scenario | str, cluster: Cluster, *, weights_mb: int = DEFAULT_WEIGHTS_MB,
    threads: int = 1, model: str = DEFAULT_MODEL, ready_timeout: float = 60.0,
    auto_subnets: bool = False,
) -> RunningScenario:  # fmt: skip
    """Create the scenario's machines in ``cluster`` and start its emulators (all spawned at once,
    then each awaited). ``auto_subnets`` replaces the scenario's fixed namespace subnets with free
    random ones (for runs that may overlap, such as tests). Raises :class:`ScenarioUnavailable`
    when it cannot run here."""
    if isinstance(scenario, str):
        try:
            scenario = SCENARIOS[scenario]
        except KeyError:
            raise ValueError(
                f"Invalid scenario {scenario!r}: expected one of {sorted(SCENARIOS)}"
            ) from None
    reason = scenario_skip_reason(scenario)
    if reason is not None:
        raise ScenarioUnavailable(reason)
    machines: dict[str, Machine] = {}
    for spec in scenario.machines:
        if spec.netns_ip is None:
            machines[spec.name] = cluster.local_machine(
                spec.name, cpus=spec.cpus, slowdown=spec.slowdown
            )
        else:
            machines[spec.name] = cluster.netns_machine(
                spec.name, None if auto_subnets else spec.netns_ip, spec.cpus,
                slowdown=spec.slowdown,
            )  # fmt: skip
    spawned = [
        (node, machines[node.machine].spawn_emulator(
            address=node.address, port=node.port, weights_mb=weights_mb, threads=threads,
            model=model, taskset=node.taskset, env=node.environment,
        ))
        for node in scenario.nodes
    ]  # fmt: skip
    running = tuple(
        RunningNode(process.wait_ready(ready_timeout), node.machine, node, process)
        for node, process in spawned
    )
    return RunningScenario(scenario, running, MappingProxyType(machines))


# --------------------------------------------------------------------------------------------
# Command line


def _cmd_list(_: argparse.Namespace) -> int:
    for scenario in SCENARIOS.values():
        reason = scenario_skip_reason(scenario)
        status = "available" if reason is None else reason
        print(f"{scenario.key:24} {scenario.description}\n{'':24} -> {status}")
        truth = (f"units {[list(u) for u in scenario.units()]}, "
                 f"hidden co-location {[list(u) for u in scenario.hidden_colocation]}, "
                 f"batching {list(scenario.batching_nodes)}, "
                 f"taskset {list(scenario.pinned_nodes)}")  # fmt: skip
        print(f"{'':24}    truth (node indexes): {truth}")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    with Cluster() as cluster:
        try:
            running = start_scenario(args.scenario, cluster, weights_mb=args.weights_mb)
        except ScenarioUnavailable as exc:
            print(exc.reason, file=sys.stderr)
            return 3
        for node in running.nodes:
            print(f"NODE {node.url} machine={node.machine} pid={node.process.pid}", flush=True)
        print("UP (Ctrl-C to remove everything)", flush=True)
        threading.Event().wait()
    return 0


def _cmd_cleanup(args: argparse.Namespace) -> int:
    removed = cleanup_stale(everything=args.all)
    for name in removed:
        print(f"removed {name}")
    if not removed:
        print("nothing to remove")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sollol_locality.testing.machines",
        description="Simulated machines and scenarios.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="scenarios and whether they can run here").set_defaults(
        run=_cmd_list
    )
    up = commands.add_parser("up", help="start a scenario until Ctrl-C")
    up.add_argument("scenario", choices=sorted(SCENARIOS))
    up.add_argument("--weights-mb", type=int, default=DEFAULT_WEIGHTS_MB)
    up.set_defaults(run=_cmd_up)
    cleanup = commands.add_parser("cleanup", help="remove namespaces left by killed runs")
    cleanup.add_argument("--all", action="store_true", help="also those of live processes")
    cleanup.set_defaults(run=_cmd_cleanup)
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
