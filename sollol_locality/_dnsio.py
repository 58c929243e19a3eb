"""The dnspython side of :mod:`sollol_locality.resolver` (layer 2, just below ``resolver``).

Everything that talks to DNS servers is dnspython's: :class:`dns.asyncresolver.Resolver` (search
list, ``ndots``, server rotation, retries and back-off, TCP after a truncated reply, CNAME
chaining) over ``dns.asyncquery``. This module configures that resolver from resolv.conf, runs the
A and AAAA lookups of many names on the caller's event loop under one deadline, and translates
what dnspython returns or raises into :class:`TypeAnswer` values: the one place where dnspython's
exceptions are caught. Imported by ``resolver`` on first use (it imports dnspython).

Two additions around dnspython, both small: each server is a ``Do53Nameserver`` subclass that
counts queries and records, per lookup, which server failed how (so an error names them, even when
the lookup is cancelled at the deadline); and a CNAME whose target the server did not chase is
asked for by name (dnspython expects a recursive server to have done it).
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import io
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import dns._asyncbackend
import dns.asyncbackend
import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.inet
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver

from ._errors import ConfigError
from ._hostsfile import normalise_name, unwrap_ip
from ._nameservers import Nameserver, parse_nameserver
from .addresses import IPAddress

__all__ = ["Tally", "TypeAnswer", "configure", "resolve_all"]

logger = logging.getLogger("sollol_locality.resolver")

_DEFAULT_NAMESERVER: Final = "127.0.0.1"  # what glibc uses when resolv.conf names none
_RECORD_TYPES: Final = (dns.rdatatype.A, dns.rdatatype.AAAA)


@dataclass(frozen=True, slots=True)
class TypeAnswer:
    """The outcome of one (name, record type) lookup."""

    status: str  # "ok" | "nxdomain" | "nodata" | "failure" | "timeout"
    addresses: frozenset[IPAddress] = frozenset()
    ttl: float | None = None  # positive TTL, or the negative TTL from the SOA; None if unknown
    canonical_name: str | None = None  # where the answer came from, when not the name asked
    error: str | None = None


@dataclass
class Tally:
    """What one batch of lookups did (written on the event loop, read after it finished)."""

    queries_sent: int = 0
    tcp_queries: int = 0
    replies_ignored: int = 0
    server_ok: set[Nameserver] = field(default_factory=set)
    server_failed: dict[Nameserver, str] = field(default_factory=dict)


class _Trace:
    """One lookup's servers: every one asked, and how each failed (in order)."""

    __slots__ = ("tally", "deadline", "tried", "failed", "response")

    def __init__(self, tally: Tally, deadline: float) -> None:
        self.tally = tally
        self.deadline = deadline
        self.tried: dict[Nameserver, int] = {}  # server -> tries sent to it
        self.failed: dict[Nameserver, str] = {}
        self.response: dns.message.Message | None = None

    def fail(self, server: Nameserver, reason: str, *, definite: bool = True) -> None:
        if definite:
            self.failed.setdefault(server, reason)
        self.tally.server_failed.setdefault(server, reason)


_TRACE: contextvars.ContextVar[_Trace] = contextvars.ContextVar("sollol_locality_dns_trace")


class _Server(dns.nameserver.Do53Nameserver):
    """dnspython's plain-DNS server, counting what it sends and noting how it fails."""

    def __init__(self, server: Nameserver) -> None:
        super().__init__(server.sockaddr[0], server.port)
        self.server = server

    async def async_query(
        self,
        request: dns.message.QueryMessage,
        timeout: float,
        source: str | None,
        source_port: int,
        max_size: bool,
        backend: dns._asyncbackend.Backend,
        one_rr_per_rrset: bool = False,
        ignore_trailing: bool = False,
    ) -> dns.message.Message:
        trace = _TRACE.get()
        tries = trace.tried.get(self.server, 0)
        trace.tried[self.server] = tries + 1
        # A retry to the same server waits twice as long as the try before (as BIND does), so
        # a slow server's answer is still taken; never past the deadline.
        timeout = max(min(timeout * 2.0**tries, trace.deadline - time.monotonic()), timeout)
        try:
            if max_size:  # dnspython asks over TCP after a truncated UDP reply
                trace.tally.queries_sent += 1
                trace.tally.tcp_queries += 1
                response = await super().async_query(
                    request, timeout, source, source_port, True, backend,
                    one_rr_per_rrset, ignore_trailing,
                )
            else:
                response = await self._udp(request, timeout, backend, trace.tally)
        except dns.message.Truncated:
            raise
        except dns.exception.Timeout:
            trace.fail(self.server, f"no reply within {timeout:g} s", definite=False)
            raise
        except OSError as exc:
            trace.fail(self.server, f"{'TCP' if max_size else 'UDP'} failed: {_describe(exc)}")
            raise
        except dns.exception.DNSException as exc:
            trace.fail(self.server, f"bad reply: {exc}")
            raise
        trace.response = response
        rcode = response.rcode()
        if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            trace.tally.server_ok.add(self.server)
        else:
            trace.fail(self.server, f"answered {dns.rcode.to_text(rcode)}")
        return response

    async def _udp(
        self,
        request: dns.message.QueryMessage,
        timeout: float,
        backend: dns._asyncbackend.Backend,
        tally: Tally,
    ) -> dns.message.Message:
        # An unconnected socket of our own, so that stray datagrams reach dnspython (which
        # ignores them) and can be counted.
        family = dns.inet.af_for_address(self.address)
        inner = await backend.make_socket(  # type: ignore[no-untyped-call]
            family, socket.SOCK_DGRAM, 0, None, None
        )
        sock = _CountingSocket(inner, tally)
        async with inner:
            accepted = False
            try:
                response = await dns.asyncquery.udp(
                    request, self.address, timeout=timeout, port=self.port,
                    ignore_unexpected=True, ignore_errors=True, raise_on_truncation=True,
                    sock=sock,
                )
                accepted = True
                return response
            except dns.message.Truncated:
                accepted = True
                raise
            finally:
                tally.replies_ignored += max(sock.received - int(accepted), 0)


class _CountingSocket(dns._asyncbackend.DatagramSocket):
    """A datagram socket counting sends and receives (dnspython's own socket does the work)."""

    def __init__(self, inner: dns._asyncbackend.DatagramSocket, tally: Tally) -> None:
        # (not super().__init__: its signature changed across dnspython 2.x)
        self.family, self.type = inner.family, socket.SOCK_DGRAM
        self._inner = inner
        self._tally = tally
        self.received = 0

    async def sendto(self, what: bytes, destination: Any, timeout: float | None) -> int:
        sent: int = await self._inner.sendto(  # type: ignore[no-untyped-call]
            what, destination, timeout
        )
        self._tally.queries_sent += 1
        return sent

    async def recvfrom(self, size: int, timeout: float | None) -> tuple[bytes, Any]:
        received: tuple[bytes, Any] = await self._inner.recvfrom(  # type: ignore[no-untyped-call]
            size, timeout
        )
        self.received += 1
        return received

    async def getsockname(self) -> Any:
        return await self._inner.getsockname()  # type: ignore[no-untyped-call]


def _describe(exc: OSError) -> str:
    """An OS error as ``[Errno N] reason`` (asyncio's own wording varies by call)."""
    if exc.errno is not None and exc.errno in errno.errorcode:
        return str(OSError(exc.errno, os.strerror(exc.errno)))
    return str(exc) or type(exc).__name__


# -- configuration ---------------------------------------------------------------------------


def configure(
    resolv_conf: str,
    nameservers: tuple[Nameserver, ...] | None,
    per_try_timeout: float | None,
    default_per_try: float,
) -> tuple[dns.asyncresolver.Resolver, tuple[Nameserver, ...]]:
    """A dnspython resolver configured from ``resolv_conf`` as dnspython reads it.

    ``search``, ``domain`` and ``options`` (``ndots``, ``timeout``, ``rotate``, ``edns0``) come
    from the file; a missing file reads as empty. The servers are ``nameservers`` when given,
    else the file's ``nameserver`` lines (which may carry a port, ``ip:port``, an extension
    glibc does not read; unparsable lines are skipped), else 127.0.0.1 as glibc does. The
    per-try timeout is ``per_try_timeout`` when given, else the file's ``timeout:``, else
    ``default_per_try``. No cache: the caller keeps its own.
    """
    try:
        with open(resolv_conf, encoding="utf-8", errors="replace") as handle:
            text = handle.read(1 << 20)
    except OSError as exc:
        logger.debug("cannot read %s (%s); using its defaults", resolv_conf, exc)
        text = ""
    found: list[Nameserver] = []
    kept: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if fields[:1] != ["nameserver"]:
            kept.append(line)
        elif len(fields) >= 2:
            try:
                found.append(parse_nameserver(fields[1]))
            except ConfigError as exc:
                logger.debug("ignoring line %r of %s: %s", line, resolv_conf, exc)
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.timeout = -1.0  # tells whether the file set one
    # dnspython reads everything but the servers, which are ours (it rejects a port or a bad line).
    kept.append(f"nameserver {_DEFAULT_NAMESERVER}")
    resolver.read_resolv_conf(io.StringIO("\n".join(kept) + "\n"))
    from_file = resolver.timeout if resolver.timeout > 0 else None
    resolver.timeout = per_try_timeout or from_file or default_per_try
    servers = nameservers or tuple(dict.fromkeys(found)) or (parse_nameserver(_DEFAULT_NAMESERVER),)
    resolver.nameservers = [_Server(server) for server in servers]
    resolver.cache = None
    logger.debug(
        "DNS from %s: nameservers %s, search %s, ndots %s, per-try %g s", resolv_conf,
        ", ".join(map(str, servers)), [str(n) for n in resolver.search] or resolver.domain,
        resolver.ndots, resolver.timeout,
    )
    return resolver, servers


# -- lookups ---------------------------------------------------------------------------------


async def resolve_all(
    resolver: dns.asyncresolver.Resolver,
    names: Sequence[str],
    deadline: float,
    *,
    limit: int,
    max_hops: int,
) -> tuple[dict[str, tuple[TypeAnswer, TypeAnswer]], Tally]:
    """The A and AAAA answers of every name by ``deadline`` (``time.monotonic``).

    At most ``limit`` lookups run at once; a CNAME chain longer than ``max_hops`` fails. What
    is unfinished at the deadline is cancelled and comes back as ``"timeout"``, naming the
    servers asked.
    """
    tally = Tally()
    if not names:
        return {}, tally
    gate = asyncio.Semaphore(limit)
    jobs = [(name, rdtype, _Trace(tally, deadline)) for name in names for rdtype in _RECORD_TYPES]
    tasks = [
        asyncio.ensure_future(_lookup(resolver, name, rdtype, trace, deadline, gate, max_hops))
        for name, rdtype, trace in jobs
    ]
    try:
        await asyncio.wait(tasks, timeout=max(deadline - time.monotonic(), 0.0))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    answers: dict[str, list[TypeAnswer]] = {}
    for task, (name, _, trace) in zip(tasks, jobs, strict=True):
        if task.cancelled():
            answer = TypeAnswer("timeout", error=_timeout_error(name, trace))
        elif (exc := task.exception()) is not None:
            logger.error("resolving %s failed unexpectedly: %r", name, exc, exc_info=exc)
            answer = TypeAnswer("failure", error=f"{name}: {type(exc).__name__}: {exc}")
        else:
            answer = task.result()
        answers.setdefault(name, []).append(answer)
    return {name: (pair[0], pair[1]) for name, pair in answers.items()}, tally


async def _lookup(
    resolver: dns.asyncresolver.Resolver,
    name: str,
    rdtype: dns.rdatatype.RdataType,
    trace: _Trace,
    deadline: float,
    gate: asyncio.Semaphore,
    max_hops: int,
) -> TypeAnswer:
    _TRACE.set(trace)  # this task's own context
    async with gate:
        return await _follow(resolver, name, rdtype, trace, deadline, max_hops)


async def _follow(
    resolver: dns.asyncresolver.Resolver,
    name: str,
    rdtype: dns.rdatatype.RdataType,
    trace: _Trace,
    deadline: float,
    max_hops: int,
) -> TypeAnswer:
    """Resolve ``name`` (the search list applies), then any CNAME target left unanswered."""
    backend = dns.asyncbackend.get_backend("asyncio")
    qname, search = name, True
    chain: list[str] = []
    ttl: float | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return TypeAnswer("timeout", error=_timeout_error(name, trace))
        try:
            answer = await resolver.resolve(
                qname, rdtype, search=search, raise_on_no_answer=False, lifetime=remaining,
                backend=backend,
            )
        except dns.resolver.NXDOMAIN as exc:
            canonical = chain[-1] if chain else _nxdomain_canonical(exc)
            negatives = [t for r in _responses(exc).values() if (t := _negative_ttl(r)) is not None]
            return TypeAnswer("nxdomain", ttl=min(negatives, default=None),
                              canonical_name=_other(canonical, name))
        except dns.resolver.NoNameservers as exc:
            errors = exc.kwargs.get("errors", [])
            if trace.response is not None and any(
                isinstance(e[3], dns.message.ChainTooLong) for e in errors
            ):  # dnspython follows a CNAME loop until its limit, then gives up on the server
                start = _text(trace.response.question[0].name)
                walked = chain[:-1] + _walk(trace.response, start)
                return TypeAnswer("failure", error=_chain_error(name, walked, max_hops))
            return TypeAnswer("failure", error=_failure_error(name, trace, exc))
        except dns.exception.Timeout:  # dnspython's lifetime ran out just before ours
            return TypeAnswer("timeout", error=_timeout_error(name, trace))
        except dns.exception.DNSException as exc:  # a name dnspython cannot ask for, YXDOMAIN...
            return TypeAnswer("failure", error=f"cannot query {name!r}: {exc}")
        result = answer.chaining_result
        if not chain:
            chain.append(_text(answer.qname))
        chain.extend(_text(rrset[0].target) for rrset in result.cnames)
        error = _chain_error(name, chain, max_hops)
        if error is not None:
            return TypeAnswer("failure", error=error)
        canonical = _other(chain[-1], name)
        if answer.rrset is not None:
            ttl = min(float(result.minimum_ttl), ttl if ttl is not None else float("inf"))
            addresses = frozenset(
                unwrap_ip(ipaddress.ip_address(rd.address)) for rd in answer.rrset
            )
            return TypeAnswer("ok", addresses, ttl, canonical)
        negative = _negative_ttl(answer.response)
        if result.cnames and negative is None:
            # The server gave the CNAME but not its target's records: ask for the target.
            for rrset in result.cnames:
                ttl = min(float(rrset.ttl), ttl if ttl is not None else float("inf"))
            qname, search = chain[-1] + ".", False
            continue
        return TypeAnswer("nodata", ttl=negative, canonical_name=canonical)


def _chain_error(name: str, chain: list[str], max_hops: int) -> str | None:
    """A CNAME loop or an over-long chain in ``chain`` (names from the first one asked)."""
    for i, hop in enumerate(chain):
        if hop in chain[:i]:
            return "CNAME loop: " + " -> ".join(chain[: i + 1])
    if len(chain) - 1 > max_hops:
        return f"CNAME chain too long from {name} (more than {max_hops} hops)"
    return None


def _walk(response: dns.message.Message, start: str) -> list[str]:
    """The CNAMEs in ``response``'s answer from ``start``, up to the first repeated name."""
    targets = {
        _text(rrset.name): _text(rrset[0].target)
        for rrset in response.answer
        if rrset.rdtype == dns.rdatatype.CNAME and len(rrset) > 0
    }
    chain = [start]
    while chain[-1] in targets and chain.count(chain[-1]) == 1:
        chain.append(targets[chain[-1]])
    return chain


def _nxdomain_canonical(exc: dns.resolver.NXDOMAIN) -> str | None:
    for qname, response in _responses(exc).items():
        try:
            canonical = response.canonical_name()
        except dns.exception.DNSException:
            continue
        if canonical != qname:
            return _text(canonical)
    return None


def _responses(exc: dns.resolver.NXDOMAIN) -> dict[dns.name.Name, dns.message.QueryMessage]:
    responses: dict[dns.name.Name, dns.message.QueryMessage] = exc.kwargs.get("responses", {})
    return responses


def _negative_ttl(response: dns.message.Message) -> float | None:
    """RFC 2308: the lesser of the SOA's TTL and its MINIMUM field, if the reply has an SOA."""
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset) > 0:
            return float(min(rrset.ttl, rrset[0].minimum))
    return None


def _failure_error(name: str, trace: _Trace, exc: Exception) -> str:
    details = "; ".join(f"{server} {reason}" for server, reason in trace.failed.items())
    return f"{name}: {details or exc}"


def _timeout_error(name: str, trace: _Trace) -> str:
    if not trace.tried:
        return f"{name}: no query sent before the deadline"
    return f"{name}: no reply from {', '.join(map(str, trace.tried))} before the deadline"


def _other(canonical: str | None, name: str) -> str | None:
    return canonical if canonical is not None and canonical != name else None


def _text(name: dns.name.Name) -> str:
    return normalise_name(name.to_text(omit_final_dot=True))
