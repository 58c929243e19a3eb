"""Host name → addresses: a small multiplexed stub resolver with a TTL cache.

:class:`DnsResolver` answers many names under **one** deadline. All the A and AAAA queries of a
call go out over one non-blocking UDP socket per address family and the replies are gathered
with :mod:`selectors` until every name is answered or the deadline passes, so ten thousand
names cost no more threads than one. The pieces, from the outside in:

* the cache: bounded (LRU), per-entry expiry from the answer's TTL, negative caching (RFC 2308),
  failures cached with exponential backoff, serve-stale (RFC 8767) while at most one background
  thread refreshes expired answers;
* the hosts file, read directly and re-read when it changes; a name found there never causes a
  DNS query;
* :class:`_Lookup`, the DNS logic of one (name, type) resolution (CNAME chains, rcodes, server
  rotation), which does no I/O;
* :class:`_Exchange`, all the I/O: sockets, retries after ``per_try_timeout``, TCP when a reply
  is truncated, the deadline.

Two clocks are kept apart on purpose: cache expiry uses the injected ``clock`` (tests tick a fake
one), socket waits and the per-call deadline use the real :func:`time.monotonic`.

dnspython is imported on first use, never when this module is imported.
"""

from __future__ import annotations

import dataclasses
import errno
import heapq
import ipaddress
import logging
import os
import selectors
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, Protocol, runtime_checkable

from ._errors import ConfigError
from ._hostsfile import normalise_name as _normalise
from ._hostsfile import parse_hosts_entries
from .addresses import IPAddress

if TYPE_CHECKING:
    import dns.message
    import dns.name
    import dns.rdatatype
    import dns.rrset

__all__ = [
    "MAX_CNAME_HOPS",
    "DnsResolver",
    "Nameserver",
    "Resolution",
    "Resolver",
    "ResolverStats",
    "parse_nameserver",
]

logger = logging.getLogger(__name__)

Status = Literal["ok", "nxdomain", "nodata", "failure", "timeout"]
Source = Literal["hosts-file", "dns"]

MAX_CNAME_HOPS: Final = 8
"""Longest CNAME chain followed; a longer one is a ``"failure"`` ("CNAME chain too long")."""

_INITIAL_WINDOW: Final = 64  # UDP tries awaiting a reply at once, at first; the rest wait
_MAX_WINDOW: Final = 256  # the window grows by one per reply up to this (a gentle slow start)
_MAX_PENDING_IDS: Final = 60000  # query ids kept open per socket (late replies are accepted)
_SOCKET_BUFFER: Final = 1 << 20  # asked for; the kernel may grant less
_RECV_SIZE: Final = 65535
_FAILURE_WARN_THRESHOLD: Final = 3  # consecutive failing calls before one warning per server
_DEFAULT_NAMESERVER: Final = "127.0.0.1"  # what glibc uses when resolv.conf names none


# --------------------------------------------------------------------------------------------
# Public value types


@dataclass(frozen=True, slots=True)
class Resolution:
    """The answer for one host name.

    Attributes:
        name: the normalised name asked for (lower case, no trailing dot).
        addresses: the addresses found (IPv4-mapped IPv6 unwrapped); empty unless ``status`` is
            ``"ok"``.
        status: ``"ok"``; ``"nxdomain"`` (the name does not exist); ``"nodata"`` (it exists but
            has no A or AAAA record); ``"failure"`` (servers answered with an error, or a CNAME
            loop); ``"timeout"`` (no usable answer before the deadline).
        source: ``"hosts-file"`` or ``"dns"``.
        canonical_name: the end of the CNAME chain when there was one.
        stale: served past its TTL (while a refresh runs, or because refreshing failed).
        error: what went wrong, for logs: names the servers and their failures.
    """

    name: str
    addresses: frozenset[IPAddress]
    status: Status
    source: Source
    canonical_name: str | None = None
    stale: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the name resolved to at least one address."""
        return self.status == "ok"


@runtime_checkable
class Resolver(Protocol):
    """What the topology needs from a resolver; tests plug in their own."""

    def resolve_many(self, names: Collection[str], *, timeout: float) -> dict[str, Resolution]:
        """Resolve every name under one overall deadline of ``timeout`` seconds.

        The result has one entry per name given; names not answered in time are ``"timeout"``.
        """
        ...

    def peek(self, name: str) -> Resolution | None:
        """The cached answer for ``name``, or ``None``: no I/O and no waiting."""
        ...


@dataclass(frozen=True, slots=True)
class Nameserver:
    """A DNS server to send queries to."""

    ip: IPAddress
    port: int = 53
    zone: str | None = None

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET if self.ip.version == 4 else socket.AF_INET6

    @property
    def sockaddr(self) -> tuple[str, int]:
        """The address to give ``sendto`` / ``connect``."""
        host = str(self.ip)
        return (f"{host}%{self.zone}" if self.zone else host, self.port)

    def __str__(self) -> str:
        if self.ip.version == 6:
            zone = f"%{self.zone}" if self.zone else ""
            return f"[{self.ip}{zone}]:{self.port}"
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class ResolverStats:
    """Counters since the resolver was built (a snapshot; see :attr:`DnsResolver.stats`).

    Attributes:
        queries_sent: DNS queries sent, UDP tries and TCP queries together.
        tcp_queries: queries sent over TCP after a truncated UDP reply.
        replies_ignored: datagrams dropped: unknown id, wrong source or question, unparsable.
        cache_hits: names answered from the cache (fresh, negative, failed or stale).
        stale_served: answers served past their TTL.
        refreshes: names refreshed by the background thread.
        hosts_file_hits: names answered from the hosts file.
    """

    queries_sent: int = 0
    tcp_queries: int = 0
    replies_ignored: int = 0
    cache_hits: int = 0
    stale_served: int = 0
    refreshes: int = 0
    hosts_file_hits: int = 0


def parse_nameserver(text: str) -> Nameserver:
    """Parse ``"ip"``, ``"ip:port"``, ``"[ipv6]"`` or ``"[ipv6]:port"`` (IPv6 may carry ``%zone``).

    Raises:
        ConfigError: not an IP address with an optional port; the message names the value.
    """
    if not isinstance(text, str):
        raise ConfigError(
            f"Invalid nameserver {text!r}: expected a string", variable="nameservers", value=text
        )
    value = text.strip()
    host, port_text = value, None
    if value.startswith("["):
        close = value.find("]")
        host, rest = value[1:close], value[close + 1:]
        if close == -1 or (rest and not rest.startswith(":")):
            raise _bad_nameserver(text)
        port_text = rest[1:] if rest else None
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    host, _, zone = host.partition("%")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise _bad_nameserver(text) from None
    if zone and ip.version != 6:
        raise _bad_nameserver(text)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    port = 53
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
            raise _bad_nameserver(text)
        port = int(port_text)
    return Nameserver(ip, port, zone or None)


def _bad_nameserver(text: str) -> ConfigError:
    return ConfigError(
        f"Invalid nameserver {text!r}: expected an IP address, ip:port or [ipv6]:port "
        "(port 1 to 65535)",
        variable="nameservers",
        value=text,
    )


# --------------------------------------------------------------------------------------------
# The resolver


class _Entry:
    """A cache slot: the last outcome and, for serve-stale, the last positive answer."""

    __slots__ = ("result", "expires", "last_ok", "stale_until", "failures")

    def __init__(
        self,
        result: Resolution,
        expires: float,
        last_ok: Resolution | None,
        stale_until: float,
        failures: int,
    ) -> None:
        self.result = result
        self.expires = expires
        self.last_ok = last_ok
        self.stale_until = stale_until
        self.failures = failures


class DnsResolver:
    """A :class:`Resolver` backed by DNS (dnspython messages) and the hosts file.

    Args:
        nameservers: ``"ip"``, ``"ip:port"`` or ``"[v6]:port"`` strings (a single string may list
            them separated by commas). When given, no packet goes to any other server. ``None``
            uses the ``nameserver`` lines of ``resolv_conf``, read on the first lookup.
        hosts_file: path of the hosts file, ``None`` to ignore it.
        clock: monotonic clock for cache expiry only.
        min_ttl, max_ttl: bounds applied to a positive answer's TTL.
        negative_ttl: NXDOMAIN/NODATA lifetime without an SOA, and the bound on the SOA minimum.
        failure_ttl, max_failure_ttl: a failure or timeout is cached ``failure_ttl``, doubled
            after each consecutive failure of the same name, up to ``max_failure_ttl``.
        stale_ttl: how long past its TTL a positive answer may still be served (RFC 8767).
        maxsize: most names cached; the least recently used is evicted.
        per_try_timeout: wait for one UDP try before retrying on the next server.
        resolv_conf: where the system's nameservers are read when ``nameservers`` is ``None``.
        refresh_timeout: deadline of one background refresh.
        hosts_check_interval: the hosts file's mtime is checked at most this often (``clock``).

    Raises:
        ConfigError: a bad nameserver or option value, naming it.

    The constructor does no I/O and starts no thread.
    """

    def __init__(
        self,
        *,
        nameservers: Sequence[str] | str | None = None,
        hosts_file: str | os.PathLike[str] | None = "/etc/hosts",
        clock: Callable[[], float] = time.monotonic,
        min_ttl: float = 5.0,
        max_ttl: float = 3600.0,
        negative_ttl: float = 60.0,
        failure_ttl: float = 5.0,
        max_failure_ttl: float = 60.0,
        stale_ttl: float = 86400.0,
        maxsize: int = 4096,
        per_try_timeout: float = 0.4,
        resolv_conf: str | os.PathLike[str] = "/etc/resolv.conf",
        refresh_timeout: float = 2.0,
        hosts_check_interval: float = 2.0,
    ) -> None:
        for option, value in (
            ("min_ttl", min_ttl),
            ("max_ttl", max_ttl),
            ("negative_ttl", negative_ttl),
            ("failure_ttl", failure_ttl),
            ("max_failure_ttl", max_failure_ttl),
            ("stale_ttl", stale_ttl),
            ("hosts_check_interval", hosts_check_interval),
        ):
            _check_number(option, value, minimum=0.0)
        _check_number("per_try_timeout", per_try_timeout, minimum=0.0, inclusive=False)
        _check_number("refresh_timeout", refresh_timeout, minimum=0.0, inclusive=False)
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ConfigError(
                f"Invalid maxsize {maxsize!r}: expected an integer of at least 1",
                variable="maxsize",
                value=maxsize,
            )
        if max_ttl < min_ttl:
            raise ConfigError(
                f"Invalid max_ttl {max_ttl!r}: below min_ttl {min_ttl!r}",
                variable="max_ttl",
                value=max_ttl,
            )
        self._nameservers: tuple[Nameserver, ...] | None = None
        if nameservers is not None:
            items = nameservers.split(",") if isinstance(nameservers, str) else list(nameservers)
            parsed = tuple(parse_nameserver(item) for item in items)
            if not parsed:
                raise ConfigError(
                    "Invalid nameservers []: expected at least one nameserver",
                    variable="nameservers",
                    value=nameservers,
                )
            self._nameservers = tuple(dict.fromkeys(parsed))
        self._resolv_conf = os.fspath(resolv_conf)
        self._clock = clock
        self._min_ttl = float(min_ttl)
        self._max_ttl = float(max_ttl)
        self._negative_ttl = float(negative_ttl)
        self._failure_ttl = float(failure_ttl)
        self._max_failure_ttl = float(max_failure_ttl)
        self._stale_ttl = float(stale_ttl)
        self._maxsize = maxsize
        self._per_try = float(per_try_timeout)
        self._refresh_timeout = float(refresh_timeout)
        self._hosts = (
            None
            if hosts_file is None
            else _HostsFile(os.fspath(hosts_file), clock, float(hosts_check_interval))
        )

        self._lock = threading.Lock()  # the cache, the counters, the nameserver list
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._counters: dict[str, int] = dict.fromkeys(
            (f.name for f in dataclasses.fields(ResolverStats)), 0
        )
        self._server_failures: dict[Nameserver, int] = {}

        self._refresh_cond = threading.Condition()  # the refresher's state below
        self._refresh_pending: dict[str, None] = {}  # an ordered set
        self._refresh_active: set[str] = set()
        self._refresher: threading.Thread | None = None
        self._closed = False
        self._stop = threading.Event()

    # -- public API ---------------------------------------------------------------------------

    def resolve_many(self, names: Collection[str], *, timeout: float) -> dict[str, Resolution]:
        """Resolve ``names`` concurrently, returning by ``timeout`` seconds whatever happens.

        Keys of the result are the names as given; :attr:`Resolution.name` is normalised. Cached
        answers are returned at once; an expired positive answer is returned as stale while one
        background thread refreshes it. Names not answered by the deadline are ``"timeout"``
        and are cached as failures, so the next call does not wait for them again.
        """
        started = time.monotonic()
        deadline = started + max(float(timeout), 0.0)
        now = self._clock()
        results: dict[str, Resolution] = {}
        wanted: dict[str, list[str]] = {}  # normalised name -> the names given for it
        refresh: list[str] = []
        for given in names:
            name = _normalise(given)
            literal = _literal_resolution(name)
            if literal is not None:
                results[given] = literal
                continue
            if not name:  # would ask for the root zone
                results[given] = Resolution(name, frozenset(), "failure", "dns", error="empty name")
                continue
            addresses = self._hosts.lookup(name) if self._hosts is not None else None
            if addresses is not None:
                results[given] = Resolution(name, addresses, "ok", "hosts-file")
                self._count("hosts_file_hits")
                continue
            with self._lock:
                cached, needs_refresh = self._cached(name, now, touch=True)
            if cached is not None:
                results[given] = cached
                if needs_refresh:
                    refresh.append(name)
                continue
            wanted.setdefault(name, []).append(given)
        if refresh:
            self._queue_refresh(refresh)
        if wanted:
            if timeout <= 0:
                for name, givens in wanted.items():
                    answer = Resolution(name, frozenset(), "timeout", "dns", error="no time given")
                    results.update(dict.fromkeys(givens, answer))
            else:
                outcomes = self._resolve_dns(list(wanted), deadline, None)
                now = self._clock()
                with self._lock:
                    for name, outcome in outcomes.items():
                        answer = self._store(name, outcome, now)
                        results.update(dict.fromkeys(wanted[name], answer))
        logger.debug(
            "resolved %d names (%d queried, %d refreshing) in %.3f s",
            len(results), len(wanted), len(refresh), time.monotonic() - started,
            extra={"event": "resolve_many", "queried": len(wanted)},
        )
        return results

    def resolve(self, name: str, *, timeout: float) -> Resolution:
        """Resolve one name; see :meth:`resolve_many`."""
        return self.resolve_many([name], timeout=timeout)[name]

    def peek(self, name: str) -> Resolution | None:
        """The answer the cache (or the already-read hosts file) holds, without I/O.

        An expired positive answer within its stale window is returned with ``stale=True``;
        nothing is refreshed.
        """
        name = _normalise(name)
        literal = _literal_resolution(name)
        if literal is not None:
            return literal
        if self._hosts is not None:
            addresses = self._hosts.peek(name)
            if addresses is not None:
                return Resolution(name, addresses, "ok", "hosts-file")
        with self._lock:
            return self._cached(name, self._clock(), touch=False)[0]

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no background refresh is queued or running; ``False`` on timeout."""
        with self._refresh_cond:
            return self._refresh_cond.wait_for(lambda: self._refresher is None, timeout)

    def close(self) -> None:
        """Stop background refreshing and wait for the refresh thread to end.

        The resolver still answers afterwards, refreshing expired answers in the foreground.
        """
        with self._refresh_cond:
            self._closed = True
            self._refresh_pending.clear()
            self._stop.set()
            thread = self._refresher
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def __enter__(self) -> DnsResolver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def stats(self) -> ResolverStats:
        """A snapshot of the counters."""
        with self._lock:
            return ResolverStats(**self._counters)

    @property
    def queries_sent(self) -> int:
        """DNS queries sent so far (UDP tries and TCP queries)."""
        with self._lock:
            return self._counters["queries_sent"]

    @property
    def nameservers(self) -> tuple[Nameserver, ...]:
        """The servers queried (reads resolv.conf the first time when none were configured)."""
        with self._lock:
            if self._nameservers is None:
                self._nameservers = _read_resolv_conf(self._resolv_conf)
            return self._nameservers

    def __len__(self) -> int:
        """Names in the cache (including expired ones not yet evicted)."""
        with self._lock:
            return len(self._cache)

    def __repr__(self) -> str:
        servers = "system" if self._nameservers is None else ", ".join(map(str, self._nameservers))
        return f"<DnsResolver nameservers={servers} cached={len(self._cache)}>"

    # -- cache (callers hold self._lock) ------------------------------------------------------

    def _cached(self, name: str, now: float, *, touch: bool) -> tuple[Resolution | None, bool]:
        """The cached answer to serve and whether it needs a background refresh."""
        entry = self._cache.get(name)
        if entry is None:
            return None, False
        stale_ok = entry.last_ok is not None and now < entry.stale_until
        expired = now >= entry.expires
        if expired and not (stale_ok and not (touch and self._closed)):
            return None, False  # (closed: no background refresh, the caller asks itself)
        answer = entry.result
        if answer.status != "ok" and stale_ok:  # a failed refresh: the last answer, stale
            assert entry.last_ok is not None
            answer = dataclasses.replace(entry.last_ok, stale=True, error=answer.error)
        elif expired:
            answer = dataclasses.replace(answer, stale=True)
        refresh = expired and touch  # peek() never queues work
        if touch:
            self._cache.move_to_end(name)
            self._counters["cache_hits"] += 1
            if answer.stale:
                self._counters["stale_served"] += 1
        return answer, refresh

    def _store(self, name: str, outcome: _Outcome, now: float) -> Resolution:
        """Cache ``outcome`` for ``name`` and return what to serve for it."""
        previous = self._cache.get(name)
        status = outcome.status
        if status == "ok":
            ttl = _clamp(outcome.ttl, self._min_ttl, self._max_ttl, default=self._min_ttl)
            answer = Resolution(name, outcome.addresses, "ok", "dns", outcome.canonical_name)
            entry = _Entry(answer, now + ttl, answer, now + ttl + self._stale_ttl, 0)
        elif status in ("nxdomain", "nodata"):
            ttl = _clamp(outcome.ttl, self._min_ttl, self._negative_ttl, default=self._negative_ttl)
            answer = Resolution(name, frozenset(), status, "dns", outcome.canonical_name)
            entry = _Entry(answer, now + ttl, None, 0.0, 0)
        else:
            failures = (previous.failures if previous is not None else 0) + 1
            ttl = min(self._failure_ttl * 2.0 ** min(failures - 1, 32), self._max_failure_ttl)
            answer = Resolution(name, frozenset(), status, "dns", None, error=outcome.error)
            last_ok, stale_until = None, 0.0
            if previous is not None and previous.last_ok is not None and now < previous.stale_until:
                last_ok, stale_until = previous.last_ok, previous.stale_until
            entry = _Entry(answer, now + ttl, last_ok, stale_until, failures)
            if last_ok is not None:
                logger.debug(
                    "serving stale answer for %s: %s", name, outcome.error,
                    extra={"event": "serve_stale", "host": name},
                )
                answer = dataclasses.replace(last_ok, stale=True, error=outcome.error)
        self._cache[name] = entry
        self._cache.move_to_end(name)
        while len(self._cache) > self._maxsize:
            self._cache.popitem(last=False)
        return answer

    def _count(self, counter: str, n: int = 1) -> None:
        with self._lock:
            self._counters[counter] += n

    # -- background refresh -------------------------------------------------------------------

    def _queue_refresh(self, names: Iterable[str]) -> None:
        with self._refresh_cond:
            if self._closed:
                return
            for name in names:
                if name not in self._refresh_active:
                    self._refresh_pending[name] = None
            if self._refresh_pending and self._refresher is None:
                self._refresher = threading.Thread(
                    target=self._refresh_loop, name="sollol-locality-dns-refresh", daemon=True
                )
                self._refresher.start()

    def _refresh_loop(self) -> None:
        try:
            while True:
                with self._refresh_cond:
                    if self._closed or not self._refresh_pending:
                        return
                    batch = list(self._refresh_pending)
                    self._refresh_pending.clear()
                    self._refresh_active = set(batch)
                now = self._clock()
                with self._lock:  # a caller that saw a name stale may queue it just after the
                    # previous batch refreshed it: do not ask again for what is fresh now
                    batch = [name for name in batch if (entry := self._cache.get(name)) is None
                             or now >= entry.expires]
                if not batch:
                    continue
                logger.debug("refreshing %d names in the background", len(batch))
                deadline = time.monotonic() + self._refresh_timeout
                outcomes = self._resolve_dns(batch, deadline, self._stop)
                if self._stop.is_set():
                    return  # closing: unfinished names are not failures, store nothing
                now = self._clock()
                with self._lock:
                    for name, outcome in outcomes.items():
                        self._store(name, outcome, now)
                    self._counters["refreshes"] += len(outcomes)
                with self._refresh_cond:
                    self._refresh_active = set()
        finally:
            with self._refresh_cond:
                self._refresher = None
                self._refresh_active = set()
                self._refresh_cond.notify_all()

    # -- DNS ----------------------------------------------------------------------------------

    def _resolve_dns(
        self, names: list[str], deadline: float, cancel: threading.Event | None
    ) -> dict[str, _Outcome]:
        import dns.rdatatype

        servers = self.nameservers
        pairs = {
            name: (
                _Lookup(name, dns.rdatatype.A, servers),
                _Lookup(name, dns.rdatatype.AAAA, servers),
            )
            for name in names
        }
        exchange = _Exchange(
            [lookup for pair in pairs.values() for lookup in pair], deadline, self._per_try, cancel
        )
        exchange.run()
        with self._lock:
            self._counters["queries_sent"] += exchange.queries_sent
            self._counters["tcp_queries"] += exchange.tcp_queries
            self._counters["replies_ignored"] += exchange.replies_ignored
            self._note_server_health(exchange.server_ok, exchange.server_failed)
        return {name: _combine(name, a, aaaa) for name, (a, aaaa) in pairs.items()}

    def _note_server_health(self, ok: set[Nameserver], failed: dict[Nameserver, str]) -> None:
        for server in ok:
            self._server_failures.pop(server, None)
        for server, reason in failed.items():
            if server in ok:
                continue
            count = self._server_failures.get(server, 0) + 1
            self._server_failures[server] = count
            if count == _FAILURE_WARN_THRESHOLD:
                logger.warning(
                    "nameserver %s failed %d resolutions in a row: %s", server, count, reason,
                    extra={"event": "nameserver_failing", "nameserver": str(server)},
                )


def _check_number(option: str, value: object, *, minimum: float, inclusive: bool = True) -> None:
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if valid:
        assert isinstance(value, (int, float))
        valid = value >= minimum if inclusive else value > minimum
    if not valid:
        bound = f"at least {minimum}" if inclusive else f"more than {minimum}"
        raise ConfigError(
            f"Invalid {option} {value!r}: expected a number of seconds, {bound}",
            variable=option,
            value=value,
        )


def _clamp(value: float | None, low: float, high: float, *, default: float) -> float:
    if value is None:
        return default
    return min(max(value, low), high)


def _literal_resolution(name: str) -> Resolution | None:
    """Callers handle IP literals themselves; answer them without a query if they do not."""
    text = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        ip = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    return Resolution(name, frozenset({_unwrap(ip)}), "ok", "dns")


def _unwrap(ip: IPAddress) -> IPAddress:
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _read_resolv_conf(path: str) -> tuple[Nameserver, ...]:
    """The ``nameserver`` lines of resolv.conf; 127.0.0.1 when it names none (as glibc does)."""
    servers: list[Nameserver] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        logger.debug("cannot read %s (%s); using %s", path, exc, _DEFAULT_NAMESERVER)
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                servers.append(parse_nameserver(fields[1]))
            except ConfigError as exc:
                logger.debug("ignoring line %r of %s: %s", line, path, exc)
    if not servers:
        servers.append(parse_nameserver(_DEFAULT_NAMESERVER))
    logger.debug("nameservers from %s: %s", path, ", ".join(map(str, servers)))
    return tuple(dict.fromkeys(servers))


# --------------------------------------------------------------------------------------------
# The hosts file


class _HostsFile:
    """``/etc/hosts`` parsed once, re-read when its mtime changes (checked at most every
    ``check_interval`` seconds of ``clock``)."""

    def __init__(self, path: str, clock: Callable[[], float], check_interval: float) -> None:
        self._path = path
        self._clock = clock
        self._interval = check_interval
        self._lock = threading.Lock()
        self._names: dict[str, frozenset[IPAddress]] | None = None
        self._signature: tuple[int, int, int] | None = None
        self._checked_at = 0.0

    def lookup(self, name: str) -> frozenset[IPAddress] | None:
        with self._lock:
            now = self._clock()
            if self._names is None or now - self._checked_at >= self._interval:
                self._checked_at = now
                self._reload_if_changed()
            assert self._names is not None
            return self._names.get(name)

    def peek(self, name: str) -> frozenset[IPAddress] | None:
        with self._lock:
            return None if self._names is None else self._names.get(name)

    def _reload_if_changed(self) -> None:
        try:
            st = os.stat(self._path)
        except OSError as exc:
            if self._names is None or self._signature is not None:
                logger.debug("hosts file %s not used: %s", self._path, exc)
            self._names, self._signature = {}, None
            return
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._names is not None and signature == self._signature:
            return
        try:
            with open(self._path, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError as exc:
            logger.debug("cannot read hosts file %s: %s", self._path, exc)
            self._names, self._signature = {}, None
            return
        self._names, self._signature = parse_hosts(text), signature
        logger.debug("read %d names from %s", len(self._names), self._path)


def parse_hosts(text: str) -> dict[str, frozenset[IPAddress]]:
    """Names (lower case, no trailing dot) to addresses, from hosts-file text."""
    names: dict[str, set[IPAddress]] = {}
    for ip, aliases in parse_hosts_entries(text):
        for alias in aliases:
            names.setdefault(alias, set()).add(ip)
    return {name: frozenset(ips) for name, ips in names.items()}


# --------------------------------------------------------------------------------------------
# DNS logic of one lookup (no I/O)


@dataclass(frozen=True, slots=True)
class _Outcome:
    status: Status
    addresses: frozenset[IPAddress] = frozenset()
    ttl: float | None = None  # positive TTL, or the negative TTL from the SOA; None if unknown
    canonical_name: str | None = None
    error: str | None = None


_Action = Literal["done", "next-server", "requery", "tcp"]


class _Lookup:
    """Resolving one name for one record type: CNAME chains, rcodes and server rotation."""

    __slots__ = (
        "name", "rdtype", "qname", "chain", "chain_ttl", "servers", "_rotation", "failed",
        "tried", "last_server", "outcome", "inflight", "timer", "awaiting", "queued",
    )

    def __init__(
        self, name: str, rdtype: dns.rdatatype.RdataType, servers: tuple[Nameserver, ...]
    ) -> None:
        self.name = name
        self.rdtype = rdtype
        self.qname = name  # the name queried now: moves along a CNAME chain
        self.chain = [name]
        self.chain_ttl: float | None = None
        self.servers = servers
        self._rotation = 0
        self.failed: dict[Nameserver, str] = {}  # servers that answered with an error
        self.tried: dict[Nameserver, None] = {}  # every server queried, in order
        self.last_server: Nameserver | None = None
        self.outcome: _Outcome | None = None
        self.inflight: list[tuple[object, int]] = []  # (channel, query id) of open tries
        self.timer = 0  # bumped to cancel a pending retry timer
        self.awaiting = False  # a UDP try is within its per-try time (it holds a window slot)
        self.queued = False  # waiting for a window slot

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def next_server(self) -> Nameserver | None:
        """The next server in rotation that has not answered this query with an error."""
        count = len(self.servers)
        for step in range(count):
            server = self.servers[(self._rotation + step) % count]
            if server not in self.failed:
                self._rotation = (self._rotation + step + 1) % count
                self.tried[server] = None
                self.last_server = server
                return server
        return None

    def make_query(self) -> dns.message.Message:
        import dns.message

        return dns.message.make_query(self.qname + ".", self.rdtype)

    def finish(
        self,
        status: Status,
        error: str | None = None,
        *,
        addresses: frozenset[IPAddress] = frozenset(),
        ttl: float | None = None,
    ) -> None:
        canonical = self.chain[-1] if len(self.chain) > 1 else None
        self.outcome = _Outcome(status, addresses, ttl, canonical, error)

    def server_failed(self, server: Nameserver, reason: str) -> _Action:
        self.failed[server] = reason
        if len(self.failed) >= len(self.servers):
            details = "; ".join(f"{s} {r}" for s, r in self.failed.items())
            self.finish("failure", f"{self.qname}: {details}")
            return "done"
        return "next-server"

    def on_reply(self, server: Nameserver, reply: dns.message.Message, *, tcp: bool) -> _Action:
        """Act on a reply that matches the query sent to ``server``."""
        import dns.flags
        import dns.rcode

        if reply.flags & dns.flags.TC and not tcp:
            return "tcp"
        rcode = reply.rcode()
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return self.server_failed(server, f"answered {dns.rcode.to_text(rcode)}")
        end, records, loop_error = self._follow_chain(reply)
        if loop_error is not None:
            self.finish("failure", loop_error)
            return "done"
        if rcode == dns.rcode.NXDOMAIN:
            self.finish("nxdomain", ttl=_negative_ttl(reply))
            return "done"
        if records is not None:
            addresses = frozenset(_unwrap(ipaddress.ip_address(rd.address)) for rd in records)
            ttl = float(records.ttl)
            if self.chain_ttl is not None:
                ttl = min(ttl, self.chain_ttl)
            self.finish("ok", addresses=addresses, ttl=ttl)
            return "done"
        negative = _negative_ttl(reply)
        if end != self.qname and negative is None:
            # The reply carries the CNAME but not the target's records: ask for the target.
            self.qname = end
            self.failed.clear()
            return "requery"
        self.finish("nodata", ttl=negative)
        return "done"

    def _follow_chain(
        self, reply: dns.message.Message
    ) -> tuple[str, dns.rrset.RRset | None, str | None]:
        """Walk the CNAMEs in the answer from the queried name.

        Returns the name reached, its records of our type (an RRset) or ``None``, and an error
        for a loop or an over-long chain.
        """
        import dns.name
        import dns.rdataclass
        import dns.rdatatype

        current = dns.name.from_text(self.qname)
        while True:
            records = reply.get_rrset(reply.answer, current, dns.rdataclass.IN, self.rdtype)
            if records is not None and len(records) > 0:
                return _text(current), records, None
            cname = reply.get_rrset(
                reply.answer, current, dns.rdataclass.IN, dns.rdatatype.CNAME
            )
            if cname is None or len(cname) == 0:
                return _text(current), None, None
            target = _text(cname[0].target)
            ttl = float(cname.ttl)
            self.chain_ttl = ttl if self.chain_ttl is None else min(self.chain_ttl, ttl)
            if target in self.chain:
                path = " -> ".join([*self.chain, target])
                return target, None, f"CNAME loop: {path}"
            self.chain.append(target)
            if len(self.chain) - 1 > MAX_CNAME_HOPS:
                return target, None, (
                    f"CNAME chain too long from {self.name} (more than {MAX_CNAME_HOPS} hops)"
                )
            current = cname[0].target


def _text(name: dns.name.Name) -> str:
    return _normalise(name.to_text(omit_final_dot=True))


def _negative_ttl(reply: dns.message.Message) -> float | None:
    """RFC 2308: the lesser of the SOA's TTL and its MINIMUM field, if the reply has an SOA."""
    import dns.rdatatype

    for rrset in reply.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset) > 0:
            return float(min(rrset.ttl, rrset[0].minimum))
    return None


def _combine(name: str, a: _Lookup, aaaa: _Lookup) -> _Outcome:
    """One answer for a name from its A and AAAA lookups."""
    outcomes = [
        lookup.outcome or _Outcome("timeout", error=_timeout_error(lookup)) for lookup in (a, aaaa)
    ]
    canonical = next((o.canonical_name for o in outcomes if o.canonical_name), None)
    ok = [o for o in outcomes if o.status == "ok"]
    if ok:
        addresses = frozenset().union(*(o.addresses for o in ok))
        ttls = [o.ttl for o in ok if o.ttl is not None]
        return _Outcome("ok", addresses, min(ttls) if ttls else None, canonical)
    statuses = {o.status for o in outcomes}
    if "nxdomain" in statuses or statuses == {"nodata"}:
        # NXDOMAIN denies every type of the name (RFC 8020), whatever the other query did.
        status: Status = "nxdomain" if "nxdomain" in statuses else "nodata"
        ttls = [o.ttl for o in outcomes if o.status == status and o.ttl is not None]
        return _Outcome(status, ttl=min(ttls) if ttls else None, canonical_name=canonical)
    failed = [o for o in outcomes if o.status in ("failure", "timeout")]
    status = "timeout" if any(o.status == "timeout" for o in failed) else "failure"
    errors = list(dict.fromkeys(o.error for o in failed if o.error))
    return _Outcome(status, canonical_name=canonical, error="; ".join(errors) or None)


def _timeout_error(lookup: _Lookup) -> str:
    if not lookup.tried:
        return f"{lookup.qname}: no query sent before the deadline"
    servers = ", ".join(map(str, lookup.tried))
    return f"{lookup.qname}: no reply from {servers} before the deadline"


# --------------------------------------------------------------------------------------------
# I/O: one exchange of many queries under one deadline


class _UdpChannel:
    """One non-blocking UDP socket for one address family and its outstanding queries."""

    def __init__(self, family: socket.AddressFamily) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        # (lookup, server, query) by query id; an id stays until its lookup finishes, so a late
        # reply to an earlier try is still accepted.
        self.pending: dict[int, tuple[_Lookup, Nameserver, dns.message.Message]] = {}
        self.sendq: deque[tuple[int, bytes, tuple[str, int]]] = deque()
        self.writing = False


class _TcpQuery:
    """One query over TCP (after a truncated UDP reply), driven by the selector."""

    def __init__(
        self, lookup: _Lookup, server: Nameserver, query: dns.message.Message
    ) -> None:
        self.lookup = lookup
        self.server = server
        self.query = query
        wire = query.to_wire()
        self.out = len(wire).to_bytes(2, "big") + wire
        self.buffer = bytearray()
        self.connected = False
        self.sock = socket.socket(server.family, socket.SOCK_STREAM)
        self.sock.setblocking(False)


class _Exchange:
    """Send every lookup's queries and gather the replies until all are done or the deadline."""

    def __init__(
        self,
        lookups: list[_Lookup],
        deadline: float,
        per_try: float,
        cancel: threading.Event | None,
    ) -> None:
        self.lookups = lookups
        self.deadline = deadline
        self.per_try = per_try
        self.cancel = cancel
        self.selector = selectors.DefaultSelector()
        self.channels: dict[socket.AddressFamily, _UdpChannel] = {}
        self.waiting: deque[_Lookup] = deque()  # to send once the window has room
        self.in_window = 0  # lookups with a UDP try within its per-try time
        self.window = _INITIAL_WINDOW
        self.timers: list[tuple[float, int, int, _Lookup]] = []  # (when, seq, timer id, lookup)
        self.seq = 0
        self.active = 0
        self.queries_sent = 0
        self.tcp_queries = 0
        self.replies_ignored = 0
        self.server_ok: set[Nameserver] = set()
        self.server_failed: dict[Nameserver, str] = {}

    def run(self) -> None:
        try:
            for lookup in self.lookups:
                if not lookup.done:
                    self.active += 1
                    self._send(lookup)
            while self.active > 0:
                now = time.monotonic()
                if now >= self.deadline or (self.cancel is not None and self.cancel.is_set()):
                    break
                self._fire_timers(now)
                self._flush()
                if self.active == 0:
                    break
                wake = self.deadline
                if self.timers:
                    wake = min(wake, self.timers[0][0])
                wait = max(wake - time.monotonic(), 0.0)
                if self.cancel is not None:
                    wait = min(wait, 0.05)
                for key, mask in self.selector.select(wait):
                    handler = key.data
                    if isinstance(handler, _UdpChannel):
                        if mask & selectors.EVENT_READ:
                            self._receive_udp(handler)
                        if mask & selectors.EVENT_WRITE:
                            self._flush_channel(handler)
                    else:
                        self._tcp_event(handler, mask)
        finally:
            self._close()
        for lookup in self.lookups:
            if not lookup.done:
                for server in lookup.tried:
                    self.server_failed.setdefault(server, "no reply before the deadline")

    # -- sending ------------------------------------------------------------------------------

    def _send(self, lookup: _Lookup) -> None:
        """Send the lookup's next try (or queue it while the in-flight window is full)."""
        import dns.exception

        if self._window_full():
            if not lookup.queued:
                lookup.queued = True
                self.waiting.append(lookup)
            return
        while True:
            server = lookup.next_server()
            if server is None:
                self._finish(lookup)
                return
            try:
                channel = self._channel(server.family)
            except OSError as exc:
                if lookup.server_failed(server, f"cannot open a socket: {exc}") == "done":
                    self._finish(lookup)
                    return
                continue
            try:
                query = lookup.make_query()
            except dns.exception.DNSException as exc:
                lookup.finish("failure", f"cannot query {lookup.qname!r}: {exc}")
                self._finish(lookup)
                return
            query.id = self._new_id(channel, query.id)
            channel.pending[query.id] = (lookup, server, query)
            lookup.inflight.append((channel, query.id))
            channel.sendq.append((query.id, query.to_wire(), server.sockaddr))
            self._arm_timer(lookup, min(time.monotonic() + self.per_try, self.deadline))
            if not lookup.awaiting:
                lookup.awaiting = True
                self.in_window += 1
            return

    def _settle(self, lookup: _Lookup) -> None:
        """The lookup's current try is over (answered, timed out, failed): free its slot."""
        if lookup.awaiting:
            lookup.awaiting = False
            self.in_window -= 1

    @staticmethod
    def _new_id(channel: _UdpChannel, qid: int) -> int:
        while qid in channel.pending:
            qid = int.from_bytes(os.urandom(2), "big")
        return qid

    def _channel(self, family: socket.AddressFamily) -> _UdpChannel:
        channel = self.channels.get(family)
        if channel is None:
            channel = _UdpChannel(family)
            self.channels[family] = channel
            self.selector.register(channel.sock, selectors.EVENT_READ, channel)
        return channel

    def _flush(self) -> None:
        while self.waiting and not self._window_full():
            lookup = self.waiting.popleft()
            lookup.queued = False
            if not lookup.done and not lookup.awaiting:
                self._send(lookup)
        for channel in self.channels.values():
            self._flush_channel(channel)

    def _window_full(self) -> bool:
        return self.in_window >= self.window or any(
            len(c.pending) >= _MAX_PENDING_IDS for c in self.channels.values()
        )

    def _flush_channel(self, channel: _UdpChannel) -> None:
        while channel.sendq:
            qid, wire, sockaddr = channel.sendq[0]
            if qid not in channel.pending:  # its lookup finished meanwhile
                channel.sendq.popleft()
                continue
            try:
                channel.sock.sendto(wire, sockaddr)
            except BlockingIOError:
                break
            except OSError as exc:  # unreachable network and the like: the try is lost
                lookup, server, _ = channel.pending[qid]
                logger.debug("sending to %s failed: %s", server, exc)
                self.server_failed.setdefault(server, f"send failed: {exc}")
                channel.sendq.popleft()
                self._drop_try(channel, qid)
                self._settle(lookup)
                if lookup.server_failed(server, f"send failed: {exc}") == "done":
                    self._finish(lookup)
                elif not lookup.inflight:
                    self._send(lookup)
                continue
            channel.sendq.popleft()
            self.queries_sent += 1
        want_write = bool(channel.sendq)
        if want_write != channel.writing:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            self.selector.modify(channel.sock, events, channel)
            channel.writing = want_write

    # -- timers -------------------------------------------------------------------------------

    def _arm_timer(self, lookup: _Lookup, when: float) -> None:
        lookup.timer += 1
        self.seq += 1
        heapq.heappush(self.timers, (when, self.seq, lookup.timer, lookup))

    def _fire_timers(self, now: float) -> None:
        while self.timers and self.timers[0][0] <= now:
            _, _, timer, lookup = heapq.heappop(self.timers)
            if lookup.done or timer != lookup.timer:
                continue
            if lookup.last_server is not None:
                self.server_failed.setdefault(
                    lookup.last_server, f"no reply within {self.per_try:g} s"
                )
            # Retry on the next server; earlier tries stay open, a late reply still counts.
            # Lookups still waiting for a first try go first.
            self._settle(lookup)
            if self.waiting and not lookup.queued:
                lookup.queued = True
                self.waiting.append(lookup)
            else:
                self._send(lookup)

    # -- receiving ----------------------------------------------------------------------------

    def _receive_udp(self, channel: _UdpChannel) -> None:
        import dns.exception
        import dns.message

        while True:
            try:
                data, source = channel.sock.recvfrom(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. an ICMP error reported on the socket
                logger.debug("receive failed: %s", exc)
                return
            qid = int.from_bytes(data[:2], "big") if len(data) >= 12 else -1
            entry = channel.pending.get(qid)
            if entry is None or not _same_address(source, entry[1]):
                self.replies_ignored += 1
                continue
            lookup, server, query = entry
            try:
                reply = dns.message.from_wire(data)
            except dns.exception.DNSException as exc:
                logger.debug("ignoring an unparsable reply from %s: %s", server, exc)
                self.replies_ignored += 1
                continue
            if not query.is_response(reply):
                self.replies_ignored += 1
                continue
            self._drop_try(channel, query.id)
            self._on_reply(lookup, server, query, reply, tcp=False)

    def _on_reply(
        self,
        lookup: _Lookup,
        server: Nameserver,
        query: dns.message.Message,
        reply: dns.message.Message,
        *,
        tcp: bool,
    ) -> None:
        self._settle(lookup)
        self.window = min(self.window + 1, _MAX_WINDOW)
        action = lookup.on_reply(server, reply, tcp=tcp)
        if server in lookup.failed:
            self.server_failed.setdefault(server, lookup.failed[server])
        else:
            self.server_ok.add(server)  # it answered, even if with a CNAME loop
        if action == "done":
            self._finish(lookup)
        elif action == "tcp":
            self._start_tcp(lookup, server, query)
        elif action == "requery":
            self._cancel_tries(lookup)
            self._send(lookup)
        elif not lookup.inflight:  # next-server, with no other try still open
            self._send(lookup)

    def _drop_try(self, channel: _UdpChannel, qid: int) -> None:
        entry = channel.pending.pop(qid, None)
        if entry is not None:
            try:
                entry[0].inflight.remove((channel, qid))
            except ValueError:
                pass

    def _cancel_tries(self, lookup: _Lookup) -> None:
        for channel, qid in lookup.inflight:
            if isinstance(channel, _UdpChannel):
                channel.pending.pop(qid, None)
            elif isinstance(channel, _TcpQuery):
                self._close_tcp(channel)
        lookup.inflight.clear()
        lookup.timer += 1
        self._settle(lookup)

    def _finish(self, lookup: _Lookup) -> None:
        if lookup.outcome is None:  # every server failed before a query could be sent
            details = "; ".join(f"{s} {r}" for s, r in lookup.failed.items())
            lookup.finish("failure", f"{lookup.qname}: {details or 'no nameserver'}")
        self._cancel_tries(lookup)
        self.active -= 1

    # -- TCP ----------------------------------------------------------------------------------

    def _start_tcp(self, lookup: _Lookup, server: Nameserver, query: dns.message.Message) -> None:
        lookup.timer += 1  # TCP has the rest of the deadline, no per-try retry
        try:
            conn = _TcpQuery(lookup, server, query)
            error = conn.sock.connect_ex(server.sockaddr)
        except OSError as exc:
            self._tcp_failed(lookup, server, f"TCP connect failed: {exc}")
            return
        if error not in (0, errno.EINPROGRESS):
            conn.sock.close()
            self._tcp_failed(lookup, server, f"TCP connect failed: {os.strerror(error)}")
            return
        lookup.inflight.append((conn, 0))
        self.selector.register(conn.sock, selectors.EVENT_WRITE, conn)
        self.queries_sent += 1
        self.tcp_queries += 1

    def _tcp_event(self, conn: _TcpQuery, mask: int) -> None:
        import dns.exception
        import dns.message

        if conn.lookup.done or conn.sock.fileno() == -1:
            return  # closed earlier in this round of events
        try:
            if mask & selectors.EVENT_WRITE:
                if not conn.connected:
                    error = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error:
                        raise OSError(error, os.strerror(error))
                    conn.connected = True
                sent = conn.sock.send(conn.out)
                conn.out = conn.out[sent:]
                if not conn.out:
                    self.selector.modify(conn.sock, selectors.EVENT_READ, conn)
                return
            chunk = conn.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._tcp_done(conn, f"TCP failed: {exc}")
            return
        if not chunk:
            self._tcp_done(conn, "TCP connection closed without a reply")
            return
        conn.buffer += chunk
        if len(conn.buffer) < 2:
            return
        size = int.from_bytes(conn.buffer[:2], "big")
        if len(conn.buffer) < 2 + size:
            return
        try:
            reply = dns.message.from_wire(bytes(conn.buffer[2:2 + size]))
        except dns.exception.DNSException as exc:
            self._tcp_done(conn, f"unparsable TCP reply: {exc}")
            return
        if not conn.query.is_response(reply):
            self._tcp_done(conn, "TCP reply does not match the query")
            return
        self._tcp_done(conn, None)
        self._on_reply(conn.lookup, conn.server, conn.query, reply, tcp=True)

    def _tcp_done(self, conn: _TcpQuery, error: str | None) -> None:
        self._close_tcp(conn)
        try:
            conn.lookup.inflight.remove((conn, 0))
        except ValueError:
            pass
        if error is not None:
            logger.debug("%s: %s", conn.server, error)
            self._tcp_failed(conn.lookup, conn.server, error)

    def _tcp_failed(self, lookup: _Lookup, server: Nameserver, error: str) -> None:
        self.server_failed.setdefault(server, error)
        if lookup.done:
            return
        if lookup.server_failed(server, error) == "done":
            self._finish(lookup)
        elif not lookup.inflight:
            self._send(lookup)

    def _close_tcp(self, conn: _TcpQuery) -> None:
        if conn.sock.fileno() != -1:
            self.selector.unregister(conn.sock)
            conn.sock.close()

    def _close(self) -> None:
        for lookup in self.lookups:
            for channel, _ in lookup.inflight:
                if isinstance(channel, _TcpQuery):
                    self._close_tcp(channel)
        for channel in self.channels.values():
            self.selector.unregister(channel.sock)
            channel.sock.close()
        self.selector.close()


def _same_address(source: tuple[object, ...], server: Nameserver) -> bool:
    host, port = source[0], source[1]
    if port != server.port or not isinstance(host, str):
        return False
    try:
        return bool(_unwrap(ipaddress.ip_address(host.partition("%")[0])) == server.ip)
    except ValueError:
        return False
