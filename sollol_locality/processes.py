"""The processes behind local nodes, and the facts each one holds.

Layer 2, beside :mod:`sollol_locality.local`: it imports only ``_errors``, ``addresses`` and
``local``.

A node of this machine (a loopback, unspecified or own-interface address and a port) is served
by one process. :class:`LocalProcesses` finds it and reads what decides what it contends for:

* **From the port to the process.** One scan of this network namespace's listening TCP sockets
  (``/proc/self/net/tcp`` and ``tcp6``, state ``LISTEN``; ``psutil.net_connections`` where
  those tables are missing) per refresh serves every lookup. A socket's owner is found through
  ``/proc/PID/fd`` the first time a lookup needs it and kept while the socket (its inode)
  lives, so a refresh costs one read of the tables, not a walk over every process.
  A socket serves a node when it is bound to the node's address, or to the wildcard of its family
  (``0.0.0.0``; ``::`` also takes IPv4, as Linux binds dual-stack by default); IPv4-mapped
  addresses count as IPv4, and a node on ``0.0.0.0`` / ``::`` is reached on the loopback.
* **Published container ports.** When the listener is a userspace proxy that names its target on
  its command line (``docker-proxy -container-ip 172.17.0.2 -container-port 11434``), the process
  listening on that target is searched in the other network namespaces: a process's
  ``/proc/PID/net/tcp{,6}`` shows the sockets of *its* namespace, and the socket's inode is mapped
  to a pid through ``/proc/PID/fd``. A proxy whose target is not on its command line, or a port
  published by a kernel DNAT rule only (nothing listens here), is reported as not followed.
  The same search finds the process behind a node on a container bridge's address
  (``lookup(..., other_namespaces=True)``).
* **The facts** (:class:`ProcessFacts`): the CPU set (``Cpus_allowed_list``, the process's
  affinity, intersected with its cgroup's ``cpuset.cpus.effective``), the CPU quota in cores
  (cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; the tightest limit of
  the cgroup and its ancestors), the GPUs it may use (the first of ``CUDA_VISIBLE_DEVICES``,
  ``HIP_VISIBLE_DEVICES``, ``ROCR_VISIBLE_DEVICES``, ``GPU_DEVICE_ORDINAL`` set in
  ``/proc/PID/environ``), its slots (``OLLAMA_NUM_PARALLEL``), and its container (the runtime and
  id in ``/proc/PID/cgroup``, and whether its network namespace is another than ours).

Nothing here raises for what the system will not show. Another user's process hides its socket
owner, its environment or its namespaces: the lookup then says so in ``reason`` (and the facts
that could not be read carry a note), logged at debug level only, and callers fall back to what
the address says. Results are cached until the next refresh (every ``refresh_interval`` seconds,
the same period as :class:`~sollol_locality.local.LocalMachine`'s interfaces), so a restarted
instance (a new pid on the same port) is noticed at the next refresh and never once per decision.
"""

from __future__ import annotations

import importlib
import ipaddress
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from ._errors import ConfigError, InvalidNodeAddress
from .addresses import IPAddress
from .local import check_refresh_interval, is_loopback_name

__all__ = [
    "GPU_VARIABLES",
    "ListeningSocket",
    "LocalProcesses",
    "LookupStatus",
    "ProcessFacts",
    "ProcessLookup",
    "parse_cpu_list",
    "parse_cpu_max",
    "parse_gpu_list",
    "read_process_facts",
    "scan_diag_listeners",
    "scan_listening_sockets",
    "scan_proc_listeners",
]

logger = logging.getLogger(__name__)

LookupStatus = Literal["found", "no-listener", "not-followed", "access-denied", "unavailable"]

GPU_VARIABLES: Final = (
    "CUDA_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "GPU_DEVICE_ORDINAL",
)
"""The environment variables that select GPUs, in the order they are looked at."""

_NO_GPU_TOKENS: Final = frozenset({"-1", "nodevfiles"})
_SLOTS_VARIABLE: Final = "OLLAMA_NUM_PARALLEL"
_MAX_CPU: Final = 1 << 16
_MAX_READ: Final = 1 << 20
_LISTEN_STATE: Final = "0A"
# Userspace port proxies that do not name their target where we can read it.
_OPAQUE_PROXIES: Final = frozenset({
    "rootlessport", "rootlesskit", "slirp4netns", "pasta", "pasta.avx2", "gvproxy", "vpnkit",
})
_CONTAINER_PATTERNS: Final = (
    ("docker", re.compile(r"(?:/docker[-/]|docker-)([0-9a-f]{64})(?:\.scope)?(?:/|$)")),
    ("containerd", re.compile(r"cri-containerd-([0-9a-f]{64})\.scope")),
    ("cri-o", re.compile(r"crio-(?:conmon-)?([0-9a-f]{64})\.scope")),
    ("podman", re.compile(r"libpod-(?:conmon-)?([0-9a-f]{64})(?:\.scope)?(?:/|$)")),
    ("kubernetes", re.compile(r"kubepods[^\n]*?/([0-9a-f]{64})(?:/|$)")),
)
_KUBEPODS: Final = re.compile(r"kubepods")


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListeningSocket:
    """One listening TCP socket of this network namespace.

    Attributes:
        ip: the address it is bound to (``0.0.0.0`` / ``::`` for the wildcard).
        port: its port.
        pid: the process holding it, or ``None`` when this user may not see it (or it is
            found from ``inode`` when needed).
        inode: the socket's inode (from ``/proc/net/tcp``), which names its owner through
            ``/proc/PID/fd``; ``None`` when unknown.
    """

    ip: IPAddress
    port: int
    pid: int | None
    inode: int | None = None


@dataclass(frozen=True, slots=True)
class ProcessFacts:
    """What one process holds that decides what it contends for. Immutable.

    Attributes:
        pid, name: the process (``name`` from ``/proc/PID/comm``; ``""`` when unreadable).
        create_time: when it started, seconds since the epoch (``None`` when unreadable); with
            ``pid`` it names one process even after the pid is reused.
        cpus: the CPUs it may run on (affinity intersected with its cgroup cpuset), or ``None``.
        cpu_quota: its cgroup CPU limit in cores (``200000 100000`` -> 2.0), ``None`` when
            unlimited or unknown.
        gpus: the GPU ids its environment makes visible; ``None`` when no GPU variable is set,
            ``()`` when one says none (``""``, ``-1``, ``NoDevFiles``).
        gpu_variable: the variable ``gpus`` came from.
        slots: ``OLLAMA_NUM_PARALLEL`` when it is a positive integer, else ``None``.
        container: ``"runtime:id"`` (12-hex id) from its cgroup, else ``None``.
        other_netns: whether its network namespace is another than ours (``None`` if unknown).
        notes: ``(field, what could not be read)`` pairs, in field order.
    """

    pid: int
    name: str
    create_time: float | None
    cpus: frozenset[int] | None
    cpu_quota: float | None
    gpus: tuple[str, ...] | None
    gpu_variable: str | None
    slots: int | None
    container: str | None
    other_netns: bool | None
    notes: tuple[tuple[str, str], ...] = ()

    def note(self, name: str) -> str | None:
        """The note about field ``name`` (notes of one field joined by ``"; "``), or ``None``."""
        found = [text for key, text in self.notes if key == name]
        return "; ".join(found) if found else None


@dataclass(frozen=True, slots=True)
class ProcessLookup:
    """The process behind one local node, or why it is not known. Immutable.

    Attributes:
        address, port: what was looked up (the address as normalised text).
        status: ``"found"``, ``"no-listener"``, ``"not-followed"`` (a proxy or namespace that
            could not be followed), ``"access-denied"`` or ``"unavailable"`` (psutil missing,
            the scan failed).
        facts: the process's facts when found, else ``None``.
        reason: one sentence a person understands: which process, or why none.
        listener: the listening socket that matched (``"0.0.0.0:11434"``), if any.
        proxy: ``"docker-proxy pid 812 -> 172.17.0.2:11434"`` when followed through a proxy.
    """

    address: str
    port: int
    status: LookupStatus
    facts: ProcessFacts | None
    reason: str
    listener: str | None = None
    proxy: str | None = None


# -- pure parsing ----------------------------------------------------------------------------


def parse_cpu_list(text: str) -> frozenset[int]:
    """CPUs from the kernel's list form (``"0-3,8,10-11"``); ``""`` is the empty set.

    Raises:
        ValueError: naming the text, when it is not a CPU list.
    """
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"Invalid CPU list {text!r}: {part!r} is not a CPU or a range")
        first, last = int(low), int(high) if dash else int(low)
        if last < first or last >= _MAX_CPU:
            raise ValueError(f"Invalid CPU list {text!r}: {part!r} is not an ascending range")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def parse_cpu_max(text: str) -> float | None:
    """Cores from cgroup v2 ``cpu.max`` (``"200000 100000"`` -> 2.0; ``"max ..."`` -> ``None``).

    Raises:
        ValueError: naming the text, when it is not ``quota [period]``.
    """
    parts = text.split()
    if not parts or len(parts) > 2:
        raise ValueError(f"Invalid cpu.max {text!r}: expected 'QUOTA PERIOD' or 'max PERIOD'")
    if len(parts) == 2 and not parts[1].isdigit():
        raise ValueError(f"Invalid cpu.max {text!r}: the period is not a number")
    if parts[0] == "max":
        return None
    period = int(parts[1]) if len(parts) == 2 else 100_000
    if not parts[0].isdigit() or period <= 0:
        raise ValueError(f"Invalid cpu.max {text!r}: expected a quota and a positive period")
    return int(parts[0]) / period


def parse_gpu_list(value: str) -> tuple[str, ...]:
    """GPU ids from a ``*_VISIBLE_DEVICES`` value: ``"0,1"`` -> ``("0", "1")``.

    ``""``, ``"-1"`` and ``"NoDevFiles"`` mean no GPU. As CUDA does, an entry that selects no
    device ends the list (``"0,-1,1"`` -> ``("0",)``).
    """
    ids: list[str] = []
    for token in value.split(","):
        token = token.strip()
        if not token or token.lower() in _NO_GPU_TOKENS or token.startswith("-"):
            break
        ids.append(token)
    return tuple(ids)


def _parse_slots(value: str) -> int | None:
    text = value.strip()
    if text.isdigit() and int(text) > 0:
        return int(text)
    return None


# -- the listener scan -----------------------------------------------------------------------


def scan_listening_sockets() -> list[ListeningSocket]:
    """Every listening TCP socket of this network namespace, with its pid where visible.

    Raises:
        ImportError: psutil is not installed.
        PermissionError: psutil refused the listing (``psutil.AccessDenied`` is translated).
    """
    psutil = importlib.import_module("psutil")
    try:
        connections = psutil.net_connections(kind="inet")
    except psutil.AccessDenied as exc:
        raise PermissionError(f"listing sockets was denied: {exc}") from exc
    found: list[ListeningSocket] = []
    for conn in connections:
        if conn.status != psutil.CONN_LISTEN or not conn.laddr:
            continue
        try:
            ip = ipaddress.ip_address(str(conn.laddr.ip).partition("%")[0])
        except ValueError:
            continue
        found.append(ListeningSocket(ip, int(conn.laddr.port), conn.pid))
    return found


_NETLINK_SOCK_DIAG: Final = 4
_SOCK_DIAG_BY_FAMILY: Final = 20
_NLMSG_ERROR: Final = 2
_NLMSG_DONE: Final = 3
_TCP_LISTEN: Final = 10


def scan_diag_listeners() -> list[ListeningSocket]:
    """Every listening TCP socket of this network namespace, asked of the kernel's socket
    diagnostics over netlink (as ``ss -lt`` does): only the listening table is walked, so it
    costs well under a millisecond however many connections the machine holds.

    Raises:
        OSError: netlink socket diagnostics are not available here.
    """
    import socket
    import struct

    found: list[ListeningSocket] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(2.0)
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            # inet_diag_req_v2: family, protocol, ext, pad, states, then an empty socket id.
            request = struct.pack("=BBBxI48x", family, socket.IPPROTO_TCP, 0,
                                  1 << _TCP_LISTEN)
            header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY,
                                 0x1 | 0x300, seq, 0)  # NLM_F_REQUEST | NLM_F_DUMP
            sock.sendto(header + request, (0, 0))
            done = False
            while not done:
                data = sock.recv(1 << 16)
                offset = 0
                while offset + 16 <= len(data):
                    length, kind, _, _, _ = struct.unpack_from("=IHHII", data, offset)
                    if length < 16:
                        raise OSError("a malformed netlink answer")
                    if kind == _NLMSG_DONE:
                        done = True
                        break
                    if kind == _NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", data, offset + 16)
                        raise OSError(-code, "socket diagnostics refused the request")
                    body = offset + 16
                    if kind == _SOCK_DIAG_BY_FAMILY and length >= 16 + 72:
                        msg_family, state = data[body], data[body + 1]
                        (port,) = struct.unpack_from(">H", data, body + 4)
                        raw = data[body + 8:body + 8 + (4 if msg_family == socket.AF_INET
                                                        else 16)]
                        (inode,) = struct.unpack_from("=I", data, body + 68)
                        if state == _TCP_LISTEN:
                            found.append(ListeningSocket(ipaddress.ip_address(raw), port,
                                                         None, inode))
                    offset += (length + 3) & ~3
    return found


def scan_proc_listeners(proc_root: str = "/proc") -> list[ListeningSocket]:
    """Every listening TCP socket of this network namespace, with its inode and no pid (found
    later, when needed): from the kernel's socket diagnostics (:func:`scan_diag_listeners`),
    else ``/proc/self/net/tcp{,6}``, else :func:`scan_listening_sockets` (psutil)."""
    try:
        return scan_diag_listeners()
    except OSError as exc:
        logger.debug("socket diagnostics unavailable (%s); reading /proc/net/tcp", exc,
                     extra={"event": "processes_diag_unavailable"})
    found: list[ListeningSocket] = []
    tables = 0
    for table in ("tcp", "tcp6"):
        try:
            with open(os.path.join(proc_root, "self", "net", table), "rb") as fh:
                text = fh.read().decode("ascii", "replace")
        except FileNotFoundError:
            continue  # no IPv6, or no /proc
        tables += 1
        found.extend(ListeningSocket(ip, port, None, inode)
                     for ip, port, inode in _parse_net_tcp(text))
    if not tables:
        return scan_listening_sockets()
    return found


def _unwrap(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _targets(address: IPAddress | None) -> tuple[IPAddress, ...] | None:
    """The addresses a client of the node connects to; ``None`` means "any of this machine"."""
    if address is None:
        return None
    address = _unwrap(address)
    if address.is_unspecified:
        return (ipaddress.ip_address("127.0.0.1" if address.version == 4 else "::1"),)
    return (address,)


def _rank(bound: IPAddress, targets: tuple[IPAddress, ...] | None) -> int | None:
    """0 when ``bound`` is a target, 1 when it is a wildcard that takes one, else ``None``."""
    plain = _unwrap(bound)
    dual_stack = isinstance(bound, ipaddress.IPv6Address) and bound.is_unspecified
    if targets is None:
        return 1 if plain.is_unspecified else 0
    if plain in targets:
        return 0
    if plain.is_unspecified and (dual_stack or any(t.version == plain.version for t in targets)):
        return 1
    return None


def _format(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


# -- reading one process ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _CgroupMount:
    point: str
    root: str
    version: int
    controllers: frozenset[str]


class _Proc:
    """Reads ``/proc`` (or a test tree) and the cgroup mounts it lists."""

    def __init__(self, proc_root: str) -> None:
        self.root = proc_root
        self._mounts: tuple[_CgroupMount, ...] | None = None
        self._own_netns: int | None | Literal[False] = False

    def path(self, *parts: object) -> str:
        return os.path.join(self.root, *(str(p) for p in parts))

    def read(self, *parts: object) -> str:
        with open(self.path(*parts), "rb") as fh:
            return fh.read(_MAX_READ).decode("utf-8", "replace")

    def netns(self, pid: int | str) -> int | None:
        try:
            return os.stat(self.path(pid, "ns", "net")).st_ino
        except OSError:
            return None

    def own_netns(self) -> int | None:
        if self._own_netns is False:
            self._own_netns = self.netns("self")
        return self._own_netns

    def mounts(self) -> tuple[_CgroupMount, ...]:
        if self._mounts is None:
            try:
                text = self.read("self", "mountinfo")
            except OSError as exc:
                logger.debug("mount table not read: %s", exc,
                             extra={"event": "processes_mountinfo_unread"})
                text = ""
            self._mounts = tuple(_parse_mountinfo(text))
        return self._mounts


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _parse_mountinfo(text: str) -> Iterable[_CgroupMount]:
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 5 or len(fields) < sep + 4:
            continue
        fstype, options = fields[sep + 1], fields[sep + 3].split(",")
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if fstype == "cgroup2":
            yield _CgroupMount(point, root, 2, frozenset())
        elif fstype == "cgroup":
            wanted = frozenset(options) & {"cpu", "cpuset"}
            if wanted:
                yield _CgroupMount(point, root, 1, wanted)


def _cgroup_dirs(proc: _Proc, cgroup_text: str, controller: str, version: int) -> list[str]:
    """Directories of the process's cgroup for ``controller``, innermost first."""
    paths: list[str] = []
    for line in cgroup_text.splitlines():
        hierarchy, _, rest = line.partition(":")
        names, _, path = rest.partition(":")
        if version == 2 and hierarchy == "0" and names == "":
            mounts = [m for m in proc.mounts() if m.version == 2]
        elif version == 1 and controller in names.split(","):
            mounts = [m for m in proc.mounts() if m.version == 1 and controller in m.controllers]
        else:
            continue
        if ".." in path.split("/"):
            continue  # outside our cgroup namespace: not under any mount we can read
        for mount in mounts:
            relative = path
            if mount.root != "/":
                if path != mount.root and not path.startswith(mount.root.rstrip("/") + "/"):
                    continue
                relative = path[len(mount.root):]
            here = os.path.normpath(mount.point + "/" + relative.lstrip("/"))
            while True:
                paths.append(here)
                if here == os.path.normpath(mount.point) or here in ("/", ""):
                    break
                here = os.path.dirname(here)
            break
    return paths


def _read_first(directory: str, names: Iterable[str]) -> str | None:
    for name in names:
        try:
            with open(os.path.join(directory, name), "rb") as fh:
                return fh.read(_MAX_READ).decode("utf-8", "replace").strip()
        except OSError:
            continue
    return None


def _cgroup_cpuset(proc: _Proc, cgroup_text: str) -> frozenset[int] | None:
    for version, files in ((2, ("cpuset.cpus.effective",)),
                           (1, ("cpuset.effective_cpus", "cpuset.cpus"))):
        for directory in _cgroup_dirs(proc, cgroup_text, "cpuset", version):
            text = _read_first(directory, files)
            if text:  # an empty cpuset.cpus (v1 root of a new cgroup) says nothing
                return parse_cpu_list(text)
    return None


def _cgroup_quota(proc: _Proc, cgroup_text: str) -> float | None:
    limits: list[float] = []
    for directory in _cgroup_dirs(proc, cgroup_text, "cpu", 2):
        text = _read_first(directory, ("cpu.max",))
        if text:
            quota = parse_cpu_max(text)
            if quota is not None:
                limits.append(quota)
    for directory in _cgroup_dirs(proc, cgroup_text, "cpu", 1):
        quota_text = _read_first(directory, ("cpu.cfs_quota_us",))
        period_text = _read_first(directory, ("cpu.cfs_period_us",))
        if quota_text and period_text and quota_text.lstrip("-").isdigit():
            quota, period = int(quota_text), int(period_text)
            if quota > 0 and period > 0:
                limits.append(quota / period)
    return min(limits) if limits else None


def _container(cgroup_text: str) -> str | None:
    for line in cgroup_text.splitlines():
        path = line.split(":", 2)[-1]
        for runtime, pattern in _CONTAINER_PATTERNS:
            match = pattern.search(path)
            if match:
                kind = "kubernetes" if _KUBEPODS.search(path) else runtime
                return f"{kind}:{match.group(1)[:12]}"
    return None


def _create_time(proc: _Proc, pid: int) -> float | None:
    stat = proc.read(pid, "stat")
    fields = stat.rpartition(")")[2].split()
    start_ticks = int(fields[19])  # field 22 of stat; the two before ")" are pid and comm
    for line in proc.read("stat").splitlines():
        if line.startswith("btime "):
            return int(line.split()[1]) + start_ticks / os.sysconf("SC_CLK_TCK")
    return None


def _errno_text(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror.lower() if exc.strerror else type(exc).__name__


def read_process_facts(pid: int, *, proc_root: str = "/proc") -> ProcessFacts:
    """Read what process ``pid`` holds; what cannot be read is ``None`` with a note.

    Raises:
        ProcessLookupError: the process does not exist (any more).
    """
    return _read_facts(_Proc(proc_root), pid)


def _read_facts(proc: _Proc, pid: int) -> ProcessFacts:
    if not os.path.isdir(proc.path(pid)):
        raise ProcessLookupError(f"no process {pid}")
    notes: list[tuple[str, str]] = []

    try:
        name = proc.read(pid, "comm").strip()
    except OSError as exc:
        name = ""
        notes.append(("name", _errno_text(exc)))
    try:
        create_time = _create_time(proc, pid)
    except (OSError, ValueError, IndexError) as exc:
        create_time = None
        notes.append(("create_time", f"stat not read ({exc})"))

    cpus: frozenset[int] | None = None
    try:
        for line in proc.read(pid, "status").splitlines():
            if line.startswith("Cpus_allowed_list:"):
                cpus = parse_cpu_list(line.partition(":")[2])
    except (OSError, ValueError) as exc:
        notes.append(("cpus", f"affinity not read ({exc})"))
    if cpus is None and proc.root == "/proc" and hasattr(os, "sched_getaffinity"):
        try:
            cpus = frozenset(os.sched_getaffinity(pid))
        except OSError as exc:
            notes.append(("cpus", f"affinity not read ({_errno_text(exc)})"))

    cpu_quota: float | None = None
    container: str | None = None
    try:
        cgroup_text = proc.read(pid, "cgroup")
    except OSError as exc:
        notes.append(("container", f"cgroup not read ({_errno_text(exc)})"))
    else:
        container = _container(cgroup_text)
        try:
            cpuset = _cgroup_cpuset(proc, cgroup_text)
            if cpuset is not None:
                cpus = cpuset if cpus is None else cpus & cpuset
        except ValueError as exc:
            notes.append(("cpus", f"cgroup cpuset not used ({exc})"))
        try:
            cpu_quota = _cgroup_quota(proc, cgroup_text)
        except ValueError as exc:
            notes.append(("cpu_quota", f"cgroup quota not used ({exc})"))

    gpus: tuple[str, ...] | None = None
    gpu_variable: str | None = None
    slots: int | None = None
    try:
        environ = _parse_environ(proc.read(pid, "environ"))
    except OSError as exc:
        why = f"environment not readable ({_errno_text(exc)})"
        notes.extend((("gpus", why), ("slots", why)))
        logger.debug("environment of pid %d not read: %s", pid, exc,
                     extra={"event": "processes_environ_unread", "pid": pid})
    else:
        for variable in GPU_VARIABLES:
            if variable in environ:
                gpus, gpu_variable = parse_gpu_list(environ[variable]), variable
                break
        raw = environ.get(_SLOTS_VARIABLE)
        if raw is not None:
            slots = _parse_slots(raw)
            if slots is None:
                notes.append(("slots", f"{_SLOTS_VARIABLE}={raw!r} is not a positive integer; "
                                       "ignored"))

    ours, theirs = proc.own_netns(), proc.netns(pid)
    other_netns = None if ours is None or theirs is None else ours != theirs
    if other_netns is None:
        notes.append(("other_netns", "network namespace not readable"))

    order = {name: i for i, name in enumerate(ProcessFacts.__dataclass_fields__)}
    notes.sort(key=lambda item: order.get(item[0], len(order)))
    return ProcessFacts(pid, name, create_time, cpus, cpu_quota, gpus, gpu_variable, slots,
                        container, other_netns, tuple(notes))


def _parse_environ(text: str) -> dict[str, str]:
    environ: dict[str, str] = {}
    for entry in text.split("\0"):
        key, sep, value = entry.partition("=")
        if sep and key:
            environ[key] = value
    return environ


# -- following a proxy into another network namespace ----------------------------------------


def _proxy_target(cmdline: list[str]) -> tuple[IPAddress, int] | None:
    """``(ip, port)`` from ``-container-ip X -container-port Y`` (``--flag=value`` too)."""
    values: dict[str, str] = {}
    for i, arg in enumerate(cmdline):
        flag, eq, inline = arg.lstrip("-").partition("=")
        if flag in ("container-ip", "container-port") and arg.startswith("-"):
            if eq:
                values[flag] = inline
            elif i + 1 < len(cmdline):
                values[flag] = cmdline[i + 1]
    if "container-ip" not in values or not values.get("container-port", "").isdigit():
        return None
    try:
        ip = ipaddress.ip_address(values["container-ip"].partition("%")[0])
    except ValueError:
        return None
    return ip, int(values["container-port"])


def _parse_net_tcp(text: str) -> list[tuple[IPAddress, int, int]]:
    """``(ip, port, inode)`` of every LISTEN socket in a ``/proc/PID/net/tcp{,6}`` table."""
    found: list[tuple[IPAddress, int, int]] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _LISTEN_STATE:
            continue
        address_hex, _, port_hex = fields[1].partition(":")
        try:
            raw = bytes.fromhex(address_hex)
            # The kernel prints each 32-bit word in host (little-endian) order.
            packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(packed)
            found.append((ip, int(port_hex, 16), int(fields[9])))
        except ValueError:
            continue
    return found


def _inode_owners(proc: _Proc, inodes: set[int]) -> dict[int, int]:
    """The pid holding each socket inode, found through ``/proc/PID/fd``; an inode whose owner
    this user may not inspect is left out."""
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    found: dict[int, int] = {}
    try:
        entries = os.listdir(proc.root)
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(proc.path(entry, "fd"))
        except OSError:
            continue  # another user's process, or it exited
        for fd in fds:
            try:
                inode = wanted.get(os.readlink(proc.path(entry, "fd", fd)))
            except OSError:
                continue
            if inode is not None and inode not in found:
                found[inode] = int(entry)
        if len(found) == len(wanted):
            break
    return found


def _follow(proc: _Proc, proxy_pid: int | str,
            target: tuple[IPAddress, int]) -> tuple[int | None, str]:
    """The pid listening on ``target`` in a network namespace other than ``proxy_pid``'s
    (``"self"``: ours), or ``None`` and why."""
    target_ip, target_port = target
    proxy_ns = proc.netns(proxy_pid)
    by_ns: dict[int, list[int]] = {}
    hidden = 0
    try:
        entries = os.listdir(proc.root)
    except OSError as exc:
        return None, f"the process table could not be listed ({_errno_text(exc)})"
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            ns = os.stat(proc.path(entry, "ns", "net")).st_ino
        except PermissionError:
            hidden += 1
            continue
        except OSError:
            continue  # exited meanwhile, or a kernel thread
        if ns != proxy_ns:
            by_ns.setdefault(ns, []).append(int(entry))
    targets = (target_ip,)
    for pids in by_ns.values():
        pids.sort()
        inodes: set[int] = set()
        for table in ("tcp", "tcp6"):
            try:
                text = proc.read(pids[0], "net", table)
            except OSError:
                continue
            inodes.update(inode for ip, port, inode in _parse_net_tcp(text)
                          if port == target_port and _rank(ip, targets) is not None)
        if not inodes:
            continue
        wanted = {f"socket:[{inode}]" for inode in inodes}
        for pid in pids:
            try:
                fds = os.listdir(proc.path(pid, "fd"))
            except PermissionError:
                hidden += 1
                continue
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(proc.path(pid, "fd", fd)) in wanted:
                        return pid, ""
                except OSError:
                    continue
        return None, "its socket's owner could not be seen (access denied)"
    if hidden:
        what = "1 process" if hidden == 1 else f"{hidden} processes"
        return None, f"{what} could not be inspected (access denied)"
    return None, "no process listens there in another network namespace"


# -- the cache -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Snapshot:
    taken_at: float
    by_port: dict[int, list[ListeningSocket]]
    error: tuple[LookupStatus, str] | None
    lookups: dict[tuple[str, int, bool], ProcessLookup] = field(default_factory=dict)
    facts: dict[int, ProcessFacts | None] = field(default_factory=dict)
    follows: dict[tuple[int, IPAddress, int], tuple[int | None, str]] = field(
        default_factory=dict)


Scanner = Callable[[], Iterable[ListeningSocket]]


class LocalProcesses:
    """The process behind each local node, read once per refresh.

    Args:
        clock: monotonic clock that ages the scan.
        refresh_interval: seconds a scan is trusted; 0 scans on every lookup.
        scanner: returns this namespace's listening sockets (default
            :func:`scan_listening_sockets`); an ``ImportError`` it raises means psutil is
            missing, a ``PermissionError`` that listing was denied.
        proc_root: where ``/proc`` is (a test tree may stand in for it).
        cpu_count: how many CPUs this machine has (``os.cpu_count()`` when omitted); what an
            unpinned instance may use, against which a pinned one's share is measured.

    The constructor does no I/O. One scan serves every lookup until it is ``refresh_interval``
    old; the processes' facts are read on first lookup and kept until then. Thread-safe.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        refresh_interval: float = 30.0,
        scanner: Scanner | None = None,
        proc_root: str = "/proc",
        cpu_count: int | None = None,
    ) -> None:
        if cpu_count is not None and (isinstance(cpu_count, bool) or not isinstance(cpu_count, int)
                                      or cpu_count < 1):
            raise ConfigError(f"Invalid cpu_count {cpu_count!r}: expected a whole number >= 1",
                              value=cpu_count)
        check_refresh_interval(refresh_interval)
        self._clock = clock
        self._refresh_interval = float(refresh_interval)
        self._scanner: Scanner = scanner if scanner is not None else scan_proc_listeners
        self._proc_root = proc_root
        self._lock = threading.Lock()
        self._snapshot: _Snapshot | None = None
        self._owners: dict[int, int] = {}  # socket inode -> pid, kept while the socket lives
        self._scans = 0
        self._version = 0
        self._cpu_count = cpu_count

    @property
    def cpu_count(self) -> int:
        """How many CPUs this machine has (the constructor's ``cpu_count``, else
        ``os.cpu_count()``, at least 1)."""
        if self._cpu_count is None:
            self._cpu_count = os.cpu_count() or 1  # read once: it is a file read on Linux
        return self._cpu_count

    @property
    def refresh_interval(self) -> float:
        """Seconds a scan is trusted before the next lookup scans again."""
        return self._refresh_interval

    @property
    def scans(self) -> int:
        """How many times the listening sockets were scanned."""
        return self._scans

    @property
    def version(self) -> int:
        """Grows whenever a refresh finds other listeners (a new pid on a port, one gone).

        Reading it first rescans when the last scan is stale, so a cache keyed on it notices a
        restarted instance even when nothing else asks.
        """
        self._current()
        return self._version

    def refresh(self) -> None:
        """Scan now, whatever the age of the last scan; cached lookups are dropped."""
        with self._lock:
            self._refresh_locked()

    def lookup(self, address: str | IPAddress | None, port: int, *,
               other_namespaces: bool = False) -> ProcessLookup:
        """The process listening for the local node ``address``:``port``; never raises for
        what the system hides.

        ``other_namespaces``: when nothing listens for it here, look for a process listening on
        ``address``:``port`` in the other network namespaces of this machine (a node on the
        address of a container bridged here, ``172.17.0.2:11434``).

        ``address`` is an IP address of this machine (loopback, unspecified or one of its
        interfaces), a loopback name (``localhost``), or ``None`` for "any address here".

        Raises:
            InvalidNodeAddress: ``address`` or ``port`` is malformed.
        """
        targets, text = _parse_address(address)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise InvalidNodeAddress(repr(port), "expected a port number from 1 to 65535")
        key = (text, port, other_namespaces)
        snapshot = self._current()
        cached = snapshot.lookups.get(key)
        if cached is not None:
            return cached
        with self._lock:
            cached = snapshot.lookups.get(key)
            if cached is None:
                cached = self._lookup_locked(snapshot, targets, text, port, other_namespaces)
                snapshot.lookups[key] = cached
        return cached

    # -- internals ---------------------------------------------------------------------------

    def _current(self) -> _Snapshot:
        current = self._snapshot
        if current is not None and not self._stale(current):
            return current
        if not self._lock.acquire(blocking=current is None):
            assert current is not None
            return current  # another thread is scanning; serve the previous scan meanwhile
        try:
            latest = self._snapshot
            if latest is not None and latest is not current and not self._stale(latest):
                return latest
            return self._refresh_locked()
        finally:
            self._lock.release()

    def _stale(self, snapshot: _Snapshot) -> bool:
        age = self._clock() - snapshot.taken_at
        return age >= self._refresh_interval or age < 0

    def _refresh_locked(self) -> _Snapshot:
        now = self._clock()
        self._scans += 1
        by_port: dict[int, list[ListeningSocket]] = {}
        error: tuple[LookupStatus, str] | None = None
        try:
            for sock in self._scanner():
                by_port.setdefault(sock.port, []).append(sock)
        except ImportError:
            error = ("unavailable", "psutil is not installed, so the processes behind local "
                                    "ports are not read")
        except PermissionError as exc:
            error = ("access-denied", f"listing the listening sockets was denied ({exc})")
        except Exception as exc:  # a failed scan must never break a dispatch decision
            error = ("unavailable", f"listing the listening sockets failed "
                                    f"({type(exc).__name__}: {exc})")
        if error is not None:
            logger.debug("process scan: %s", error[1],
                         extra={"event": "processes_scan_failed", "reason": error[1]})
        previous = self._snapshot
        fresh = _Snapshot(now, by_port, error)
        alive = {sock.inode for socks in by_port.values() for sock in socks}
        self._owners = {inode: pid for inode, pid in self._owners.items() if inode in alive}
        if previous is None or _signature(previous) != _signature(fresh):
            self._version += 1
            logger.debug("local listeners: %d ports (version %d)", len(by_port), self._version,
                         extra={"event": "processes_scanned", "version": self._version})
        self._snapshot = fresh
        return fresh

    def _lookup_locked(self, snapshot: _Snapshot, targets: tuple[IPAddress, ...] | None,
                       text: str, port: int, other_namespaces: bool) -> ProcessLookup:
        def result(status: LookupStatus, reason: str, facts: ProcessFacts | None = None,
                   listener: str | None = None, proxy: str | None = None) -> ProcessLookup:
            if status != "found":
                logger.debug("no process for %s:%d: %s", text, port, reason,
                             extra={"event": "processes_not_found", "status": status})
            return ProcessLookup(text, port, status, facts, reason, listener, proxy)

        if snapshot.error is not None:
            return result(*snapshot.error)
        if not os.path.isdir(self._proc_root):
            return result("unavailable", f"{self._proc_root!r} is not readable, so the facts "
                                         "of processes are not read")
        ranked = [(rank, sock) for sock in snapshot.by_port.get(port, ())
                  if (rank := _rank(sock.ip, targets)) is not None]
        if not ranked and other_namespaces and targets is not None and len(targets) == 1:
            return self._in_other_namespace(snapshot, targets[0], port, result)
        if not ranked:
            return result("no-listener",
                          f"nothing listens on port {port} for {text} in this network namespace "
                          "(a port published only by a kernel NAT rule is not followed)")
        best = min(rank for rank, _ in ranked)
        chosen = [sock for rank, sock in ranked if rank == best]
        proc = _Proc(self._proc_root)
        owners = self._owners_of(proc, chosen)
        known = sorted(set(owners.values()))
        sock = next(s for s in chosen if not known or owners.get(id(s)) == known[0])
        listener = _format(sock.ip, sock.port)
        if not known:
            return result("access-denied",
                          f"the listener on {listener} belongs to a process this user may not "
                          "inspect (access denied)", listener=listener)
        pid = known[0]
        facts = self._facts(snapshot, proc, pid)
        if facts is None:
            return result("no-listener", f"the listener on {listener} (pid {pid}) exited",
                          listener=listener)
        proxied = self._through_proxy(snapshot, proc, facts, listener)
        if proxied is not None:
            status, reason, target_facts, proxy = proxied
            return result(status, reason, target_facts, listener, proxy)
        return result("found", _found_reason(facts, listener, None), facts, listener)

    def _owners_of(self, proc: _Proc, socks: list[ListeningSocket]) -> dict[int, int]:
        """``id(sock) -> pid`` for the sockets whose owner is known or can be found: the
        scan's pid, else the owner of its inode (one walk of ``/proc/*/fd`` for all the
        inodes not seen before; what this user may not inspect stays unknown)."""
        owners: dict[int, int] = {}
        wanted: set[int] = set()
        for sock in socks:
            if sock.pid is not None:
                owners[id(sock)] = sock.pid
            elif sock.inode is not None and sock.inode in self._owners:
                owners[id(sock)] = self._owners[sock.inode]
            elif sock.inode is not None:
                wanted.add(sock.inode)
        if wanted:
            self._owners.update(_inode_owners(proc, wanted))
            for sock in socks:
                if id(sock) not in owners and sock.inode in self._owners:
                    owners[id(sock)] = self._owners[sock.inode]
        return owners

    def _in_other_namespace(self, snapshot: _Snapshot, ip: IPAddress, port: int,
                            result: Callable[..., ProcessLookup]) -> ProcessLookup:
        proc = _Proc(self._proc_root)
        where = _format(ip, port)
        key = (-1, ip, port)
        if key not in snapshot.follows:
            snapshot.follows[key] = _follow(proc, "self", (ip, port))
        pid, why = snapshot.follows[key]
        if pid is None:
            status: LookupStatus = "access-denied" if "access denied" in why else "no-listener"
            return result(status, f"nothing listens for {where} here; {why}")
        facts = self._facts(snapshot, proc, pid)
        if facts is None:
            return result("no-listener", f"the listener for {where} (pid {pid}) exited")
        reason = (f"pid {pid} ({facts.name or 'unnamed'}) listens for {where} in another "
                  "network namespace")
        if facts.notes:
            reason += "; not read: " + "; ".join(f"{k}: {text}" for k, text in facts.notes)
        return result("found", reason, facts, where)

    def _facts(self, snapshot: _Snapshot, proc: _Proc, pid: int) -> ProcessFacts | None:
        if pid not in snapshot.facts:
            try:
                snapshot.facts[pid] = _read_facts(proc, pid)
            except ProcessLookupError:
                snapshot.facts[pid] = None
        return snapshot.facts[pid]

    def _through_proxy(
        self, snapshot: _Snapshot, proc: _Proc, facts: ProcessFacts, listener: str
    ) -> tuple[LookupStatus, str, ProcessFacts | None, str] | None:
        try:
            cmdline = [arg for arg in proc.read(facts.pid, "cmdline").split("\0") if arg]
        except OSError:
            cmdline = []
        target = _proxy_target(cmdline)
        label = facts.name or "a proxy"
        if target is None:
            if facts.name in _OPAQUE_PROXIES:
                return ("not-followed",
                        f"the listener on {listener} is {label} (pid {facts.pid}), a port "
                        "proxy whose target could not be read", None,
                        f"{label} pid {facts.pid}")
            return None
        where = _format(*target)
        proxy = f"{label} pid {facts.pid} -> {where}"
        key = (facts.pid, *target)
        if key not in snapshot.follows:
            snapshot.follows[key] = _follow(proc, facts.pid, target)
        pid, why = snapshot.follows[key]
        if pid is None:
            return ("not-followed",
                    f"the listener on {listener} is {label} (pid {facts.pid}), a proxy to "
                    f"{where}; {why}", None, proxy)
        target_facts = self._facts(snapshot, proc, pid)
        if target_facts is None:
            return ("not-followed", f"the process behind {label} (pid {pid}) exited",
                    None, proxy)
        return "found", _found_reason(target_facts, listener, proxy), target_facts, proxy


def _found_reason(facts: ProcessFacts, listener: str, proxy: str | None) -> str:
    reason = f"pid {facts.pid} ({facts.name or 'unnamed'}) listens on {listener}"
    if proxy is not None:
        reason = f"pid {facts.pid} ({facts.name or 'unnamed'}) serves {listener} through {proxy}"
    if facts.notes:
        reason += "; not read: " + "; ".join(f"{key}: {text}" for key, text in facts.notes)
    return reason


def _signature(snapshot: _Snapshot) -> tuple[object, ...]:
    return (snapshot.error, sorted(
        (port, str(sock.ip), sock.pid or 0, sock.inode or 0)
        for port, socks in snapshot.by_port.items() for sock in socks
    ))


def _parse_address(address: str | IPAddress | None) -> tuple[tuple[IPAddress, ...] | None, str]:
    if address is None:
        return None, "*"
    if isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return _targets(address), str(_unwrap(address))
    if not isinstance(address, str):
        raise InvalidNodeAddress(repr(address), "expected an IP address or a loopback name")
    text = address.strip().removeprefix("[").removesuffix("]").partition("%")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        name = text.lower().rstrip(".")
        if is_loopback_name(name):
            loopback = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
            return loopback, name
        raise InvalidNodeAddress(
            repr(address), "expected an IP address of this machine or a loopback name"
        ) from None
    return _targets(ip), str(_unwrap(ip))
