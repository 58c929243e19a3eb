"""Configuration: :class:`LocalityConfig`, its environment variables, and the topology file.

Every field of :class:`LocalityConfig` may be given as a keyword; one left out takes its default.
:meth:`LocalityConfig.from_env` reads the environment: a field it is not given is read from its
variable, and when that is unset too, takes its default:

=================  ===============================  =========================================
field              environment                      default
=================  ===============================  =========================================
mode               ``SOLLOL_LOCALITY_MODE``         ``"auto"`` (or ``parallel``/``sequential``)
min_speedup        ``SOLLOL_LOCALITY_MIN_SPEEDUP``  ``1.0``
topology_file      ``SOLLOL_LOCALITY_TOPOLOGY``     none
dns_timeout        ``SOLLOL_LOCALITY_DNS_TIMEOUT``  ``1.0`` second for one whole decision
nameservers        ``SOLLOL_LOCALITY_NAMESERVERS``  the system's (``ip[:port],...``)
calibration_file   ``SOLLOL_LOCALITY_CALIBRATION``  the user state directory (platformdirs)
save_interval      ``SOLLOL_LOCALITY_SAVE_INTERVAL``  ``30.0`` seconds between saves of learning
use_unresolved     ``SOLLOL_LOCALITY_USE_UNRESOLVED`` ``false``: unresolved names get no work
colocation_max_age ``SOLLOL_LOCALITY_COLOCATION_``  ``7d``: a co-location measurement older
                   ``MAX_AGE``                      than this is shown as stale (still used)
read_processes     ``SOLLOL_LOCALITY_PROCESSES``    ``true`` (or ``false``, ``1``/``0``, ...)
=================  ===============================  =========================================

A bad value raises :class:`~sollol_locality.ConfigError` at construction, naming the variable (or
field) and the value. Setting ``SOLLOL_LOCALITY_CALIBRATION`` to an empty string or ``none`` turns
the calibration file off. While no file exists at the default location, the first release's
(``~/.cache/sollol-locality/calibration.json``) is read, never written.

The topology file (TOML) states what no probe can know::

    [hosts.gpu-box-1]
    aliases = ["10.0.0.5", "192.168.1.5", "gpu-box-1.lan"]
    zone = "rack-1"

    [nodes."http://10.0.0.5:11435"]
    host = "gpu-box-1"
    gpu = "1"
    num_parallel = 4        # slots: the instance's OLLAMA_NUM_PARALLEL
    cpus = "0-7"            # the CPU set the instance is pinned to
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from ._errors import ConfigError, InvalidNodeAddress, TopologyFileError
from ._nameservers import parse_nameserver as _parse_nameserver
from .addresses import describe_input, parse_node_address

__all__ = [
    "ENV_CALIBRATION",
    "ENV_COLOCATION_MAX_AGE",
    "ENV_DNS_TIMEOUT",
    "ENV_MIN_SPEEDUP",
    "ENV_MODE",
    "ENV_NAMESERVERS",
    "ENV_SAVE_INTERVAL",
    "ENV_PROCESSES",
    "ENV_TOPOLOGY",
    "ENV_USE_UNRESOLVED",
    "HostOverride",
    "LocalityConfig",
    "Mode",
    "NodeOverride",
    "TopologyOverrides",
    "default_calibration_file",
    "legacy_calibration_file",
    "load_topology_file",
    "parse_cpu_list",
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
ENV_SAVE_INTERVAL: Final = "SOLLOL_LOCALITY_SAVE_INTERVAL"
ENV_USE_UNRESOLVED: Final = "SOLLOL_LOCALITY_USE_UNRESOLVED"
ENV_COLOCATION_MAX_AGE: Final = "SOLLOL_LOCALITY_COLOCATION_MAX_AGE"
ENV_PROCESSES: Final = "SOLLOL_LOCALITY_PROCESSES"

_MODES: Final = ("auto", "parallel", "sequential")
_APP: Final = "sollol-locality"
_CALIBRATION_NAME: Final = "calibration.json"


def default_calibration_file(environ: Mapping[str, str] | None = None) -> Path:
    """Where ``calibrate`` writes and decisions look by default: the user's state directory.

    With ``environ`` omitted this is platformdirs' ``user_state_path("sollol-locality")``; with
    a mapping, the same rule on it (``XDG_STATE_HOME``, else ``HOME/.local/state``), so that a
    test or a caller can point it elsewhere without touching the process environment.
    """
    if environ is None:
        import platformdirs

        return platformdirs.user_state_path(_APP) / _CALIBRATION_NAME
    base = environ.get("XDG_STATE_HOME") or str(
        Path(environ.get("HOME") or Path.home()) / ".local" / "state")
    return Path(base) / _APP / _CALIBRATION_NAME


def legacy_calibration_file(environ: Mapping[str, str] | None = None) -> Path:
    """Where the first release kept the calibration file (the user's cache directory); still
    read when the file at :func:`default_calibration_file` does not exist."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
    return Path(base) / _APP / _CALIBRATION_NAME


def parse_nameserver(text: str, *, variable: str = "nameservers") -> tuple[str, int]:
    """Parse ``ip``, ``ip:port``, ``[v6]:port`` (IPv6 may carry ``%zone``) into ``(ip, port)``;
    port 53 by default. The zone, when given, stays on the address (``fe80::1%eth0``)."""
    try:
        server = _parse_nameserver(text)
    except ConfigError as exc:
        raise ConfigError(f"{variable}: {exc}", variable=variable, value=text) from None
    ip = server.ip.compressed + (f"%{server.zone}" if server.zone else "")
    return ip, server.port


Nameservers = tuple[tuple[str, int], ...]

# field -> its environment variable, in the order from_env reads them.
_ENVIRONMENT: Final[tuple[tuple[str, str], ...]] = (
    ("mode", ENV_MODE),
    ("min_speedup", ENV_MIN_SPEEDUP),
    ("topology_file", ENV_TOPOLOGY),
    ("dns_timeout", ENV_DNS_TIMEOUT),
    ("nameservers", ENV_NAMESERVERS),
    ("calibration_file", ENV_CALIBRATION),
    ("save_interval", ENV_SAVE_INTERVAL),
    ("use_unresolved", ENV_USE_UNRESOLVED),
    ("colocation_max_age", ENV_COLOCATION_MAX_AGE),
    ("read_processes", ENV_PROCESSES),
)


@dataclass(frozen=True, slots=True)
class LocalityConfig:
    """Settings for topology, resolution and the execution decision.

    Plain construction reads nothing from the environment: a field left out takes its default.
    :meth:`from_env` reads the ``SOLLOL_LOCALITY_*`` variables for the fields it is not given.
    A path may be given as a string and ``nameservers`` as ``"ip[:port],..."``; both are
    normalised. A bad value raises :class:`~sollol_locality.ConfigError` naming the field.

    Attributes:
        mode: ``"auto"`` lets the cost model decide; ``"parallel"`` / ``"sequential"`` force it.
        min_speedup: parallel is chosen only when the predicted speedup exceeds this.
        topology_file: a TOML file of host aliases, zones and per-node GPU ids, or ``None``.
        dns_timeout: seconds one decision may spend resolving all its names together.
        nameservers: ``(ip, port)`` pairs to send DNS queries to, or ``None`` for the system's.
        calibration_file: JSON written by ``calibrate`` / ``ParallelismCostModel.save``, used when
            present; ``None`` turns it off (the default of plain construction).
        hosts_file: the hosts file read before DNS (``None`` to ignore it).
        calibration_fallback: a file read instead of ``calibration_file`` while that one does
            not exist (:meth:`from_env` sets it to the first release's cache location); never
            written.
        mode_source: where a forced ``mode`` came from, as reasons quote it (``"--mode
            parallel"`` when a command-line flag gave it); ``None``: ``"configuration
            (SOLLOL_LOCALITY_MODE=parallel)"``.
        save_interval: what recorded runs teach is saved to ``calibration_file`` at most once
            per this many seconds (and at exit); ``0`` saves after every recorded run.
        use_unresolved: ``False`` (the default): a node whose name did not resolve gets no work
            while a resolved node is available (it is listed in the plan's ``excluded`` with
            the reason); ``True`` plans over it as its own machine, as the first release did.
        colocation_max_age: seconds after which a measured co-location (or independence) is
            shown as stale; it is still used. A number of seconds, or with a unit: ``"90m"``,
            ``"12h"``, ``"7d"``. Default 7 days.
        read_processes: whether the processes behind nodes of this machine are read (their CPU
            set, CPU quota, GPUs and ``OLLAMA_NUM_PARALLEL``) to decide units and slots.
    """

    mode: Mode = "auto"
    min_speedup: float = 1.0
    topology_file: Path | None = None
    dns_timeout: float = 1.0
    nameservers: Nameservers | None = None
    calibration_file: Path | None = None
    hosts_file: Path | None = Path("/etc/hosts")
    calibration_fallback: Path | None = None
    mode_source: str | None = field(default=None, compare=False)
    save_interval: float = 30.0
    use_unresolved: bool = False
    colocation_max_age: float = 7 * 24 * 3600.0
    read_processes: bool = True

    def __post_init__(self) -> None:
        values = _normalise(
            {f: getattr(self, f) for f in _FIELDS}, {f: f for f in _FIELDS})
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *,
                 only: Collection[str] | None = None, **overrides: Any) -> LocalityConfig:
        """A config from the environment: each field in ``overrides`` as given, each other one
        from its ``SOLLOL_LOCALITY_*`` variable when that is set, else its default.

        ``only`` names the fields whose variables are read (a command reads only the settings
        it uses, so a bad value of another variable does not break it); the others take their
        plain defaults (``calibration_file``: off). ``None`` reads every variable.

        ``calibration_file`` defaults to :func:`default_calibration_file`, with the first
        release's location (:func:`legacy_calibration_file`) as ``calibration_fallback``; a
        variable set to ``""`` or ``none`` turns it off.

        Raises:
            ConfigError: a variable's value is invalid (the error names the variable and the
                value), or an override is (naming the field).
        """
        env = os.environ if environ is None else environ
        unknown = (set(overrides) | set(only or ())) - set(_FIELDS) - {"mode_source"}
        if unknown:
            raise TypeError(f"LocalityConfig.from_env() got unknown field(s) "
                            f"{', '.join(sorted(unknown))}")
        raw: dict[str, Any] = {}
        names: dict[str, str] = {}
        for name, variable in _ENVIRONMENT:
            if name in overrides or only is not None and name not in only:
                continue
            value = env.get(variable)
            if value is None or (value.strip() == "" and name != "calibration_file"):
                continue
            raw[name], names[name] = value, variable
        fields_ = {**_normalise(raw, names), **overrides}
        if "calibration_file" not in fields_ and (only is None or "calibration_file" in only):
            fields_["calibration_file"] = default_calibration_file(environ)
            fields_.setdefault("calibration_fallback", legacy_calibration_file(environ))
        return cls(**fields_)

    @property
    def forced(self) -> bool:
        """Whether ``mode`` forces a decision instead of letting the cost model choose."""
        return self.mode != "auto"

    @property
    def forced_by(self) -> str:
        """What forced ``mode``, as a reason quotes it (``"--mode parallel"``)."""
        return self.mode_source or f"configuration ({ENV_MODE}={self.mode})"


_FIELDS: Final = ("mode", "min_speedup", "topology_file", "dns_timeout", "nameservers",
                  "calibration_file", "hosts_file", "calibration_fallback", "save_interval",
                  "use_unresolved", "colocation_max_age", "read_processes")
_TRUE: Final = ("1", "true", "yes", "on")
_FALSE: Final = ("0", "false", "no", "off")


def _normalise(values: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """Check and normalise field values; ``names`` says what to call each in an error (the
    field, or the environment variable it came from)."""
    result: dict[str, Any] = {}
    for name, value in values.items():
        shown = names[name]
        if name == "mode":
            result[name] = _check_mode(value, shown)
        elif name == "min_speedup":
            result[name] = _check_float(value, shown, low=0.0, allow_low=False)
        elif name == "dns_timeout":
            result[name] = _check_float(value, shown, low=0.0, allow_low=False, high=60.0)
        elif name == "colocation_max_age":
            result[name] = _check_age(value, shown)
        elif name == "read_processes":
            result[name] = _check_bool(value, shown)
        elif name == "nameservers":
            result[name] = None if value is None else _check_nameservers(value, shown)
        elif name == "save_interval":
            result[name] = _check_float(value, shown, low=0.0, allow_low=True)
        elif name == "use_unresolved":
            result[name] = _check_bool(value, shown)
        elif name == "calibration_file" and (
                value is None or isinstance(value, str) and value.strip().lower() in ("", "none")):
            result[name] = None
        else:
            result[name] = None if value is None else _check_path(value, shown)
    return result


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
        bound = f"{'at least' if allow_low else 'greater than'} {low:g}" + (
            f" and at most {high:g}" if high is not None else "")
        raise ConfigError(f"{name}={value!r} is out of range (expected a number {bound})",
                          variable=name, value=value)
    return number


def _check_bool(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean (expected one of "
                      f"{', '.join(_TRUE + _FALSE)})", variable=name, value=value)


_AGE_UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _check_age(value: object, name: str) -> float:
    """Seconds: a number, or a string with an optional unit (``s``, ``m``, ``h``, ``d``)."""
    if isinstance(value, str):
        text = value.strip().lower()
        scale = _AGE_UNITS.get(text[-1:], None) if text else None
        if scale is not None:
            text = text[:-1].strip()
        try:
            number = float(text) * (scale or 1.0)
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a duration (seconds, or a number with "
                              "s, m, h or d)", variable=name, value=value) from None
        if not (math.isfinite(number) and number > 0):
            raise ConfigError(f"{name}={value!r} is out of range (expected a duration greater "
                              "than 0)", variable=name, value=value)
        return number
    return _check_float(value, name, low=0.0, allow_low=False)
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
    """One ``[nodes."URL"]`` table: which machine a node runs on, on which GPU, how many
    requests its instance serves at once (``num_parallel``) and the CPUs it is pinned to
    (``cpus``, a CPU list such as ``"0-7"`` or ``"0,2,4"``)."""

    url: str
    host: str | None = None
    gpu: str | None = None
    zone: str | None = None
    num_parallel: int | None = None
    cpus: frozenset[int] | None = None


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
        extra = set(table) - {"host", "gpu", "zone", "num_parallel", "cpus"}
        if extra:
            key = sorted(extra)[0]
            raise fail(f"[nodes.{shown}]: unknown key {key!r} (expected host, gpu, zone, "
                       "num_parallel, cpus)", key)
        host = table.get("host")
        if host is not None and (not isinstance(host, str) or not host.strip()):
            raise fail(f"[nodes.{shown}]: 'host' must be a non-empty string", "host")
        gpu = table.get("gpu")
        if gpu is not None and not isinstance(gpu, (str, int)) or isinstance(gpu, bool):
            raise fail(f"[nodes.{shown}]: 'gpu' must be a string or integer GPU id", "gpu")
        zone = table.get("zone")
        if zone is not None and (not isinstance(zone, str) or not zone.strip()):
            raise fail(f"[nodes.{shown}]: 'zone' must be a non-empty string", "zone")
        slots = table.get("num_parallel")
        if slots is not None and (not isinstance(slots, int) or isinstance(slots, bool)
                                  or not 1 <= slots <= _MAX_SLOTS):
            raise fail(f"[nodes.{shown}]: 'num_parallel' must be an integer from 1 to "
                       f"{_MAX_SLOTS}, got {slots!r}", "num_parallel")
        cpus_raw = table.get("cpus")
        cpus: frozenset[int] | None = None
        if cpus_raw is not None:
            try:
                cpus = parse_cpu_list(cpus_raw)
            except ValueError as exc:
                raise fail(f"[nodes.{shown}]: 'cpus' {exc}", "cpus") from None
        nodes[(address.host, address.port)] = NodeOverride(
            address.url,
            host.strip().lower() if isinstance(host, str) else None,
            None if gpu is None else str(gpu),
            zone.strip() if isinstance(zone, str) else None,
            slots,
            cpus,
        )
    return TopologyOverrides(hosts, nodes, alias_index, path)


_MAX_SLOTS: Final = 4096
_MAX_CPU: Final = 65535


def parse_cpu_list(value: object) -> frozenset[int]:
    """A CPU set from the kernel's list format (``"0-7"``, ``"0,2,4"``, ``"0-3,8-11"``) or a
    list of CPU numbers.

    Raises:
        ValueError: not a CPU list; the message says why (``must be ...``).
    """
    items: list[object]
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, list):
        items = list(value)
    else:
        raise ValueError(f"must be a CPU list such as \"0-7\" or \"0,2,4\", got {value!r}")
    cpus: set[int] = set()
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            low = high = item
        elif isinstance(item, str) and re.fullmatch(r"\d+(-\d+)?", item):
            first, _, last = item.partition("-")
            low, high = int(first), int(last or first)
        else:
            raise ValueError(f"must be a CPU list such as \"0-7\" or \"0,2,4\", got {value!r}")
        if not 0 <= low <= high <= _MAX_CPU:
            raise ValueError(f"must list CPUs from 0 to {_MAX_CPU} in rising ranges, got "
                             f"{value!r}")
        cpus.update(range(low, high + 1))
    if not cpus:
        raise ValueError(f"must name at least one CPU, got {value!r}")
    return frozenset(cpus)


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
