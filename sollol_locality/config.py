"""Configuration: :class:`LocalityConfig`, its environment variables, and the topology file.

Every field of :class:`LocalityConfig` may be given as a keyword; a field left out is read from its
environment variable, and when that is unset too, takes its default:

=================  ===============================  =========================================
field              environment                      default
=================  ===============================  =========================================
mode               ``SOLLOL_LOCALITY_MODE``         ``"auto"`` (or ``parallel``/``sequential``)
min_speedup        ``SOLLOL_LOCALITY_MIN_SPEEDUP``  ``1.0``
topology_file      ``SOLLOL_LOCALITY_TOPOLOGY``     none
dns_timeout        ``SOLLOL_LOCALITY_DNS_TIMEOUT``  ``1.0`` second for one whole decision
nameservers        ``SOLLOL_LOCALITY_NAMESERVERS``  the system's (``ip[:port],...``)
calibration_file   ``SOLLOL_LOCALITY_CALIBRATION``  ``~/.cache/sollol-locality/calibration.json``
=================  ===============================  =========================================

A bad value raises :class:`~sollol_locality.ConfigError` at construction, naming the variable (or
field) and the value. Setting ``SOLLOL_LOCALITY_CALIBRATION`` to an empty string or ``none`` turns
the calibration file off.

The topology file (TOML) states what no probe can know::

    [hosts.gpu-box-1]
    aliases = ["10.0.0.5", "192.168.1.5", "gpu-box-1.lan"]
    zone = "rack-1"

    [nodes."http://10.0.0.5:11435"]
    host = "gpu-box-1"
    gpu = "1"
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from ._errors import ConfigError, InvalidNodeAddress, TopologyFileError
from ._nameservers import parse_nameserver as _parse_nameserver
from .addresses import describe_input, parse_node_address

__all__ = [
    "ENV_CALIBRATION",
    "ENV_DNS_TIMEOUT",
    "ENV_MIN_SPEEDUP",
    "ENV_MODE",
    "ENV_NAMESERVERS",
    "ENV_TOPOLOGY",
    "HostOverride",
    "LocalityConfig",
    "Mode",
    "NodeOverride",
    "TopologyOverrides",
    "default_calibration_file",
    "load_topology_file",
    "parse_nameserver",
    "parse_topology",
]

Mode = Literal["auto", "parallel", "sequential"]

ENV_MODE: Final = "SOLLOL_LOCALITY_MODE"
ENV_MIN_SPEEDUP: Final = "SOLLOL_LOCALITY_MIN_SPEEDUP"
ENV_TOPOLOGY: Final = "SOLLOL_LOCALITY_TOPOLOGY"
ENV_DNS_TIMEOUT: Final = "SOLLOL_LOCALITY_DNS_TIMEOUT"
ENV_NAMESERVERS: Final = "SOLLOL_LOCALITY_NAMESERVERS"
ENV_CALIBRATION: Final = "SOLLOL_LOCALITY_CALIBRATION"

_MODES: Final = ("auto", "parallel", "sequential")
_UNSET: Any = object()


def default_calibration_file(environ: Mapping[str, str] | None = None) -> Path:
    """Where ``calibrate`` writes and decisions look by default: the user's cache directory."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
    return Path(base) / "sollol-locality" / "calibration.json"


def parse_nameserver(text: str, *, variable: str = "nameservers") -> tuple[str, int]:
    """Parse ``ip``, ``ip:port``, ``[v6]:port`` (IPv6 may carry ``%zone``) into ``(ip, port)``;
    port 53 by default. The zone, when given, stays on the address (``fe80::1%eth0``)."""
    try:
        server = _parse_nameserver(text)
    except ConfigError as exc:
        raise ConfigError(f"{variable}: {exc}", variable=variable, value=text) from None
    ip = server.ip.compressed + (f"%{server.zone}" if server.zone else "")
    return ip, server.port


@dataclass(frozen=True, slots=True)
class LocalityConfig:
    """Settings for topology, resolution and the execution decision.

    Attributes:
        mode: ``"auto"`` lets the cost model decide; ``"parallel"`` / ``"sequential"`` force it.
        min_speedup: parallel is chosen only when the predicted speedup exceeds this.
        topology_file: a TOML file of host aliases, zones and per-node GPU ids, or ``None``.
        dns_timeout: seconds one decision may spend resolving all its names together.
        nameservers: ``(ip, port)`` pairs to send DNS queries to, or ``None`` for the system's.
        calibration_file: JSON written by ``calibrate`` / ``ParallelismCostModel.save``, used when
            present; ``None`` turns it off.
        hosts_file: the hosts file read before DNS (``None`` to ignore it).
    """

    mode: Mode = _UNSET
    min_speedup: float = _UNSET
    topology_file: Path | None = _UNSET
    dns_timeout: float = _UNSET
    nameservers: tuple[tuple[str, int], ...] | None = _UNSET
    calibration_file: Path | None = _UNSET
    hosts_file: Path | None = Path("/etc/hosts")
    environ: InitVar[Mapping[str, str] | None] = None
    _from_env: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self, environ: Mapping[str, str] | None) -> None:
        env = os.environ if environ is None else environ
        from_env: set[str] = set()

        def pick(name: str, variable: str) -> tuple[Any, str | None]:
            value = getattr(self, name)
            if value is not _UNSET:
                return value, None
            raw = env.get(variable)
            if raw is None or raw.strip() == "" and name not in ("calibration_file",):
                return _UNSET, None
            from_env.add(name)
            return raw, variable

        mode, var = pick("mode", ENV_MODE)
        object.__setattr__(self, "mode", _check_mode("auto" if mode is _UNSET else mode, var))
        value, var = pick("min_speedup", ENV_MIN_SPEEDUP)
        object.__setattr__(self, "min_speedup",
                           _check_float(1.0 if value is _UNSET else value, var or "min_speedup",
                                        low=0.0, allow_low=False))
        value, var = pick("dns_timeout", ENV_DNS_TIMEOUT)
        object.__setattr__(self, "dns_timeout",
                           _check_float(1.0 if value is _UNSET else value, var or "dns_timeout",
                                        low=0.0, allow_low=False, high=60.0))
        value, var = pick("topology_file", ENV_TOPOLOGY)
        object.__setattr__(self, "topology_file", None if value is _UNSET or value is None
                           else _check_path(value, var or "topology_file"))
        value, var = pick("nameservers", ENV_NAMESERVERS)
        object.__setattr__(self, "nameservers", None if value is _UNSET or value is None
                           else _check_nameservers(value, var or "nameservers"))
        value, var = pick("calibration_file", ENV_CALIBRATION)
        if value is _UNSET:
            calibration: Path | None = default_calibration_file(env)
        elif value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            calibration = None
        else:
            calibration = _check_path(value, var or "calibration_file")
        object.__setattr__(self, "calibration_file", calibration)
        if self.hosts_file is not None:
            object.__setattr__(self, "hosts_file", _check_path(self.hosts_file, "hosts_file"))
        object.__setattr__(self, "_from_env", frozenset(from_env))

    @property
    def forced(self) -> bool:
        """Whether ``mode`` forces a decision instead of letting the cost model choose."""
        return self.mode != "auto"


def _check_mode(value: object, variable: str | None) -> Mode:
    text = value.strip().lower() if isinstance(value, str) else None
    if text not in _MODES:
        name = variable or "mode"
        raise ConfigError(
            f"{name}={value!r} is not a valid mode (expected one of auto, parallel, sequential)",
            variable=name, value=value,
        )
    return text  # type: ignore[return-value]  # narrowed by the membership test


def _check_float(value: object, name: str, *, low: float, allow_low: bool,
                 high: float | None = None) -> float:
    try:
        number = float(value.strip() if isinstance(value, str) else value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a number", variable=name, value=value) from None
    if isinstance(value, bool) or not math.isfinite(number) or number < low or (
        number == low and not allow_low
    ) or (high is not None and number > high):
        bound = f"greater than {low:g}" + (f" and at most {high:g}" if high is not None else "")
        raise ConfigError(f"{name}={value!r} is out of range (expected a number {bound})",
                          variable=name, value=value)
    return number


def _check_path(value: object, name: str) -> Path:
    if isinstance(value, Path):
        return value
    if isinstance(value, str) and value.strip() and "\x00" not in value:
        return Path(os.path.expanduser(value.strip()))
    raise ConfigError(f"{name}={value!r} is not a usable file path", variable=name, value=value)


def _check_nameservers(value: object, name: str) -> tuple[tuple[str, int], ...]:
    if isinstance(value, str):
        items: list[Any] = [part for part in re.split(r"[,\s]+", value) if part]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ConfigError(f"{name}={value!r} is not a list of nameservers", variable=name,
                          value=value)
    if not items:
        raise ConfigError(f"{name}={value!r} names no nameserver", variable=name, value=value)
    servers: list[tuple[str, int]] = []
    for item in items:
        if isinstance(item, tuple) and len(item) == 2:
            host = str(item[0])
            servers.append(parse_nameserver(f"[{host}]:{item[1]}" if ":" in host
                                            else f"{host}:{item[1]}", variable=name))
        elif isinstance(item, str):
            servers.append(parse_nameserver(item, variable=name))
        else:
            raise ConfigError(f"{name}: invalid nameserver {item!r}", variable=name, value=value)
    return tuple(servers)


# ---------------------------------------------------------------------------------------------
# The topology file


@dataclass(frozen=True, slots=True)
class HostOverride:
    """One ``[hosts.NAME]`` table: a machine, the names and addresses it answers to, its zone."""

    name: str
    aliases: frozenset[str]
    zone: str | None = None


@dataclass(frozen=True, slots=True)
class NodeOverride:
    """One ``[nodes."URL"]`` table: which machine a node runs on and on which GPU."""

    url: str
    host: str | None = None
    gpu: str | None = None
    zone: str | None = None


@dataclass(frozen=True, slots=True)
class TopologyOverrides:
    """The parsed topology file. ``alias_index`` maps each normalised alias to its host name;
    ``nodes`` maps ``(host, port)`` of a node address to its override."""

    hosts: Mapping[str, HostOverride] = field(default_factory=dict)
    nodes: Mapping[tuple[str, int], NodeOverride] = field(default_factory=dict)
    alias_index: Mapping[str, str] = field(default_factory=dict)
    path: str | None = None

    def __bool__(self) -> bool:
        return bool(self.hosts or self.nodes)

    def zone_of(self, host: str) -> str | None:
        """The zone of a host named in the file, if it gives one."""
        override = self.hosts.get(host)
        return override.zone if override is not None else None


def load_topology_file(path: str | os.PathLike[str]) -> TopologyOverrides:
    """Read and validate a topology file.

    Raises:
        TopologyFileError: the file cannot be read or is malformed; names the file and line.
    """
    shown = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TopologyFileError(shown, f"cannot be read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise TopologyFileError(shown, "is not UTF-8 text") from exc
    return parse_topology(text, shown)


_LINE_RE: Final = re.compile(r"at line (\d+)")
_WHERE_RE: Final = re.compile(r"\s*\((?:at line \d+, column \d+|at end of document)\)")


def parse_topology(text: str, path: str = "<topology>") -> TopologyOverrides:
    """Parse topology-file text; see :func:`load_topology_file`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        text_error = str(exc)
        match = _LINE_RE.search(text_error)
        line = int(match.group(1)) if match else None
        if line is None and "end of document" in text_error:
            line = max(1, len(text.splitlines()))
        reason = _WHERE_RE.sub("", text_error).strip()
        raise TopologyFileError(path, f"not valid TOML: {reason}", line=line) from exc
    lines = text.splitlines()

    def fail(reason: str, *needles: str) -> TopologyFileError:
        return TopologyFileError(path, reason, line=_find_line(lines, needles))

    unknown = set(data) - {"hosts", "nodes"}
    if unknown:
        key = sorted(unknown)[0]
        return_error = fail(f"unknown table {key!r} (expected [hosts.NAME] or [nodes.\"URL\"])",
                            key)
        raise return_error
    hosts: dict[str, HostOverride] = {}
    alias_index: dict[str, str] = {}
    raw_hosts = data.get("hosts", {})
    if not isinstance(raw_hosts, dict):
        raise fail("'hosts' must be a table of [hosts.NAME] tables", "hosts")
    for name, table in raw_hosts.items():
        host_name = name.strip().lower()
        if not host_name:
            raise fail("a host name must not be empty", "[hosts.")
        if not isinstance(table, dict):
            raise fail(f"[hosts.{name}] must be a table", f"hosts.{name}")
        extra = set(table) - {"aliases", "zone"}
        if extra:
            key = sorted(extra)[0]
            raise fail(f"[hosts.{name}]: unknown key {key!r} (expected aliases, zone)", key)
        aliases_raw = table.get("aliases", [])
        if not isinstance(aliases_raw, list) or not all(isinstance(a, str) for a in aliases_raw):
            raise fail(f"[hosts.{name}]: 'aliases' must be a list of strings", "aliases")
        zone = table.get("zone")
        if zone is not None and (not isinstance(zone, str) or not zone.strip()):
            raise fail(f"[hosts.{name}]: 'zone' must be a non-empty string", "zone")
        aliases: set[str] = set()
        for alias in aliases_raw:
            try:
                normalised = normalise_host(alias)
            except InvalidNodeAddress as exc:
                raise fail(f"[hosts.{name}]: invalid alias {describe_input(alias)}: {exc.reason}",
                           alias) from None
            owner = alias_index.get(normalised)
            if owner is not None and owner != host_name:
                raise fail(f"alias {describe_input(alias)} is given to both {owner!r} and "
                           f"{host_name!r}", alias)
            alias_index[normalised] = host_name
            aliases.add(normalised)
        alias_index.setdefault(host_name, host_name)
        hosts[host_name] = HostOverride(host_name, frozenset(aliases),
                                        zone.strip() if zone else None)
    nodes: dict[tuple[str, int], NodeOverride] = {}
    raw_nodes = data.get("nodes", {})
    if not isinstance(raw_nodes, dict):
        raise fail("'nodes' must be a table of [nodes.\"URL\"] tables", "nodes")
    for url, table in raw_nodes.items():
        shown = describe_input(url)  # a node URL may carry credentials: never show them
        if not isinstance(table, dict):
            raise fail(f"[nodes.{shown}] must be a table", url)
        try:
            address = parse_node_address(url)
        except InvalidNodeAddress as exc:
            raise fail(f"[nodes.{shown}]: {exc.reason}", url) from None
        extra = set(table) - {"host", "gpu", "zone"}
        if extra:
            key = sorted(extra)[0]
            raise fail(f"[nodes.{shown}]: unknown key {key!r} (expected host, gpu, zone)", key)
        host = table.get("host")
        if host is not None and (not isinstance(host, str) or not host.strip()):
            raise fail(f"[nodes.{shown}]: 'host' must be a non-empty string", "host")
        gpu = table.get("gpu")
        if gpu is not None and not isinstance(gpu, (str, int)) or isinstance(gpu, bool):
            raise fail(f"[nodes.{shown}]: 'gpu' must be a string or integer GPU id", "gpu")
        zone = table.get("zone")
        if zone is not None and (not isinstance(zone, str) or not zone.strip()):
            raise fail(f"[nodes.{shown}]: 'zone' must be a non-empty string", "zone")
        nodes[(address.host, address.port)] = NodeOverride(
            address.url,
            host.strip().lower() if isinstance(host, str) else None,
            None if gpu is None else str(gpu),
            zone.strip() if isinstance(zone, str) else None,
        )
    return TopologyOverrides(hosts, nodes, alias_index, path)


def normalise_host(text: str) -> str:
    """A host alias in the form :class:`NodeAddress` uses (lower-case name or compressed IP)."""
    address = parse_node_address(text if "://" in text else f"http://{_bracket(text)}")
    if address.ip is not None:
        return address.ip.compressed
    return address.host


def _bracket(text: str) -> str:
    stripped = text.strip()
    if stripped.count(":") > 1 and not stripped.startswith("["):
        return f"[{stripped}]"
    return stripped


def _find_line(lines: list[str], needles: tuple[str, ...]) -> int | None:
    for needle in needles:
        for number, line in enumerate(lines, start=1):
            if needle and needle in line:
                return number
    return None
