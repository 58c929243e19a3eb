"""Host name → addresses: dnspython's resolver under our cache, one deadline per call.

:class:`DnsResolver` answers many names under **one** deadline. The DNS work is dnspython's
(:class:`dns.asyncresolver.Resolver`, configured from resolv.conf as dnspython reads it: the
``search`` list or ``domain``, ``options ndots``, ``timeout``, ``rotate``), driven by
:mod:`sollol_locality._dnsio` on one private event-loop thread: every A and AAAA lookup of a call
runs concurrently there, and whatever is unfinished at the deadline is cancelled (dnspython's own
``lifetime`` may overshoot by its back-off sleep). The caller's thread (or event loop) only waits
for that call. On top, our layer:

* the cache: bounded (LRU), per-entry expiry from the answer's TTL clamped to
  ``[min_ttl, max_ttl]``, negative caching (RFC 2308), failures cached with exponential backoff,
  serve-stale (RFC 8767) while at most one background thread refreshes expired answers;
* the hosts file (one shared reader per path, see :mod:`_hostsfile`); a name found there never
  causes a DNS query.

A name resolved through the search list is cached under the name asked, and its
:attr:`Resolution.canonical_name` says the name it resolved as (``node-a`` -> ``node-a.lab``).

Two clocks are kept apart on purpose: cache expiry uses the injected ``clock`` (tests tick a fake
one), the per-call deadline uses the real :func:`time.monotonic`.

dnspython is imported on first use, never when this module is imported.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import ipaddress
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, runtime_checkable

from ._errors import ConfigError
from ._hostsfile import hosts_file as _shared_hosts_file
from ._hostsfile import normalise_name as _normalise
from ._hostsfile import parse_hosts
from ._nameservers import Nameserver, parse_nameserver, parse_nameservers
from .addresses import IPAddress

if TYPE_CHECKING:
    from ._dnsio import TypeAnswer

__all__ = [
    "MAX_CNAME_HOPS",
    "DnsResolver",
    "Nameserver",
    "Resolution",
    "Resolver",
    "ResolverStats",
    "parse_hosts",
    "parse_nameserver",
]

logger = logging.getLogger(__name__)

Status = Literal["ok", "nxdomain", "nodata", "failure", "timeout"]
Source = Literal["hosts-file", "dns"]

MAX_CNAME_HOPS: Final = 8
"""Longest CNAME chain followed; a longer one is a ``"failure"`` ("CNAME chain too long")."""

_MAX_IN_FLIGHT: Final = 256  # lookups (name, type) running at once; the rest wait their turn
_DEFAULT_PER_TRY: Final = 0.4  # when neither the caller nor resolv.conf sets a per-try timeout
_LOOP_GRACE: Final = 0.05  # how long past the deadline the caller waits for the loop to finish
_FAILURE_WARN_THRESHOLD: Final = 3  # consecutive failing calls before one warning per server


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
        canonical_name: the name the answer is for when it is not ``name``: the end of a CNAME
            chain, or the name a search domain made (``node-a.lab`` for ``node-a``).
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
class ResolverStats:
    """Counters since the resolver was built (a snapshot; see :attr:`DnsResolver.stats`).

    Attributes:
        queries_sent: DNS queries sent, UDP tries and TCP queries together.
        tcp_queries: queries sent over TCP after a truncated UDP reply.
        replies_ignored: datagrams dropped: wrong id, source or question, unparsable.
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


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What DNS said about one name (A and AAAA together), before caching."""

    status: Status
    addresses: frozenset[IPAddress] = frozenset()
    ttl: float | None = None  # positive TTL, or the negative TTL from the SOA; None if unknown
    canonical_name: str | None = None
    error: str | None = None


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
    """A :class:`Resolver` backed by the hosts file and dnspython's resolver.

    Args:
        nameservers: ``"ip"``, ``"ip:port"`` or ``"[v6]:port"`` strings (a single string may list
            them separated by commas). When given, no packet goes to any other server: they
            replace resolv.conf's ``nameserver`` lines and nothing else (its ``search``,
            ``domain`` and ``options`` still apply). ``None`` uses resolv.conf's servers.
        hosts_file: path of the hosts file, ``None`` to ignore it.
        clock: monotonic clock for cache expiry only.
        min_ttl, max_ttl: bounds applied to a positive answer's TTL.
        negative_ttl: NXDOMAIN/NODATA lifetime without an SOA, and the bound on the SOA minimum.
        failure_ttl, max_failure_ttl: a failure or timeout is cached ``failure_ttl``, doubled
            after each consecutive failure of the same name, up to ``max_failure_ttl``.
        stale_ttl: how long past its TTL a positive answer may still be served (RFC 8767).
        maxsize: most names cached; the least recently used is evicted.
        per_try_timeout: wait for one try before the next server (or the next round); ``None``
            takes resolv.conf's ``options timeout:``, else 0.4 s.
        resolv_conf: the resolv.conf file, read on the first lookup (a missing one reads as
            empty: 127.0.0.1, no search list). A ``nameserver`` line may carry a port.
        refresh_timeout: deadline of one background refresh.
        hosts_check_interval: the hosts file's mtime is checked at most this often (``clock``).

    Raises:
        ConfigError: a bad nameserver or option value, naming it.

    The constructor does no I/O and starts no thread. The event-loop thread runs only while a
    lookup (or a background refresh) does.
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
        per_try_timeout: float | None = None,
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
        if per_try_timeout is not None:
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
        self._configured = None if nameservers is None else parse_nameservers(nameservers)
        self._resolv_conf = os.fspath(resolv_conf)
        self._per_try = None if per_try_timeout is None else float(per_try_timeout)
        self._clock = clock
        self._min_ttl = float(min_ttl)
        self._max_ttl = float(max_ttl)
        self._negative_ttl = float(negative_ttl)
        self._failure_ttl = float(failure_ttl)
        self._max_failure_ttl = float(max_failure_ttl)
        self._stale_ttl = float(stale_ttl)
        self._maxsize = maxsize
        self._refresh_timeout = float(refresh_timeout)
        self._hosts = None if hosts_file is None else _shared_hosts_file(hosts_file)
        self._hosts_interval = float(hosts_check_interval)
        self._hosts_checked: float | None = None

        self._lock = threading.Lock()  # the cache, the counters, the DNS configuration
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._counters: dict[str, int] = dict.fromkeys(
            (f.name for f in dataclasses.fields(ResolverStats)), 0
        )
        self._server_failures: dict[Nameserver, int] = {}
        self._dns: Any = None  # the configured dns.asyncresolver.Resolver, built on first use
        self._servers: tuple[Nameserver, ...] | None = None
        self._loop = _LoopThread()

        self._refresh_cond = threading.Condition()  # the refresher's state below
        self._refresh_pending: dict[str, None] = {}  # an ordered set
        self._refresh_active: set[str] = set()
        self._refresher: threading.Thread | None = None  # None once its loop is done
        self._last_refresher: threading.Thread | None = None  # joined by close(), wait_idle()
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
        hosts = self._hosts_names(now)
        for given in names:
            name = _normalise(given)
            literal = _literal_resolution(name)
            if literal is not None:
                results[given] = literal
                continue
            if not name:  # would ask for the root zone
                results[given] = Resolution(name, frozenset(), "failure", "dns", error="empty name")
                continue
            addresses = hosts.get(name) if hosts is not None else None
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

    def _hosts_names(self, now: float) -> dict[str, frozenset[IPAddress]] | None:
        """The hosts file's names; its mtime is checked at most every ``hosts_check_interval``."""
        if self._hosts is None:
            return None
        with self._lock:
            check = self._hosts_checked is None or now - self._hosts_checked >= self._hosts_interval
            if check:
                self._hosts_checked = now
        names = None if check else self._hosts.peek_names()
        return self._hosts.names() if names is None else names

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
        hosts = self._hosts.peek_names() if self._hosts is not None else None
        if hosts is not None:
            addresses = hosts.get(name)
            if addresses is not None:
                return Resolution(name, addresses, "ok", "hosts-file")
        with self._lock:
            return self._cached(name, self._clock(), touch=False)[0]

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no background refresh is queued or running; ``False`` on timeout."""
        start = time.monotonic()
        with self._refresh_cond:
            if not self._refresh_cond.wait_for(lambda: self._refresher is None, timeout):
                return False
            thread = self._last_refresher  # its loop is done: only its exit is left
        if thread is not None and thread is not threading.current_thread():
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
            thread.join(left)
            return not thread.is_alive()
        return True

    def close(self) -> None:
        """Stop background refreshing and wait for the refresh thread to end.

        The resolver still answers afterwards, refreshing expired answers in the foreground.
        """
        with self._refresh_cond:
            self._closed = True
            self._refresh_pending.clear()
            self._stop.set()
            thread = self._last_refresher  # set to None by its loop before the thread ends
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
        """The servers queried (the first call reads resolv.conf when none were configured)."""
        if self._configured is not None:
            return self._configured
        self._dns_resolver()
        assert self._servers is not None
        return self._servers

    def __len__(self) -> int:
        """Names in the cache (including expired ones not yet evicted)."""
        with self._lock:
            return len(self._cache)

    def __repr__(self) -> str:
        servers = "system" if self._configured is None else ", ".join(map(str, self._configured))
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
                self._refresher = self._last_refresher = threading.Thread(
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

    # -- DNS (dnspython, on the loop thread) ----------------------------------------------------

    def _dns_resolver(self) -> Any:
        """dnspython's resolver, configured from resolv.conf on first use."""
        from . import _dnsio

        with self._lock:
            if self._dns is None:
                self._dns, self._servers = _dnsio.configure(
                    self._resolv_conf, self._configured, self._per_try, _DEFAULT_PER_TRY
                )
            return self._dns

    def _resolve_dns(
        self, names: list[str], deadline: float, cancel: threading.Event | None
    ) -> dict[str, _Outcome]:
        from . import _dnsio

        dns_resolver = self._dns_resolver()
        loop = self._loop.acquire()
        try:
            future = asyncio.run_coroutine_threadsafe(
                _dnsio.resolve_all(
                    dns_resolver, names, deadline, limit=_MAX_IN_FLIGHT, max_hops=MAX_CNAME_HOPS
                ),
                loop,
            )
            counted: list[bool] = []  # the tally is added once: here, or by a late lookup

            def count(tally: Any) -> None:
                with self._lock:
                    if counted:
                        return
                    counted.append(True)
                    self._counters["queries_sent"] += tally.queries_sent
                    self._counters["tcp_queries"] += tally.tcp_queries
                    self._counters["replies_ignored"] += tally.replies_ignored
                    self._note_server_health(tally.server_ok, tally.server_failed)

            def count_late(done: concurrent.futures.Future[Any]) -> None:
                if not done.cancelled() and done.exception() is None:
                    count(done.result()[1])  # the queries were sent even if nobody waited

            future.add_done_callback(count_late)
            while True:  # the loop enforces the deadline; this wait only backs it up
                wait = deadline + _LOOP_GRACE - time.monotonic()
                if cancel is not None:
                    wait = min(wait, 0.05)
                try:
                    answers, tally = future.result(timeout=max(wait, 0.0))
                    break
                except concurrent.futures.TimeoutError:
                    if (cancel is not None and cancel.is_set()) or time.monotonic() >= deadline:
                        future.cancel()
                        raise
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            error = "no answer before the deadline (the resolver's loop was late)"
            return {name: _Outcome("timeout", error=f"{name}: {error}") for name in names}
        finally:
            self._loop.release()
        count(tally)  # before returning: the callback may run after the caller woke
        return {name: _combine(*answers[name]) for name in names}

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


class _LoopThread:
    """A private asyncio event loop on a daemon thread, alive while some call uses it.

    The first :meth:`acquire` starts it; the last :meth:`release` cancels what still runs on it,
    stops it and joins the thread, so an idle resolver holds no thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._users = 0

    def acquire(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="sollol-locality-dns", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            self._users += 1
            return self._loop

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0:
                return
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(_cancel_all(), loop).result(timeout=5.0)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            logger.debug("the DNS loop did not wind down in time")
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


async def _cancel_all() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


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


def _combine(a: TypeAnswer, aaaa: TypeAnswer) -> _Outcome:
    """One answer for a name from its A and AAAA lookups."""
    outcomes = (a, aaaa)
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
    status = "timeout" if "timeout" in statuses else "failure"
    errors = list(dict.fromkeys(o.error for o in outcomes if o.error))
    return _Outcome(status, canonical_name=canonical, error="; ".join(errors) or None)
