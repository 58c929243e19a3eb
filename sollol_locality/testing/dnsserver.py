"""A loopback DNS server for tests, built on dnspython's message classes.

It serves zones given as a dict, over UDP and TCP on one ephemeral port of 127.0.0.1 (or ``::1``),
from one thread driven by :mod:`selectors`, and can misbehave on demand::

    zones = {
        "test": [soa(minimum=30)],
        "a.test": [("A", "10.0.0.1", 60), ("AAAA", "fd00::1", 60)],
        "alias.test": [("CNAME", "a.test", 30)],
    }
    with DnsTestServer(zones) as server:
        server.set_behaviour("servfail", name="a.test", times=2)  # fail twice, then answer
        resolver = DnsResolver(nameservers=[server.nameserver])
        ...
        assert server.count("a.test", "A") == 3

Behaviours (``set_behaviour(kind, name=None, ...)``; a name's own behaviour wins over the global
one, which wins over answering normally):

``answer``          answer from the zones (NXDOMAIN / NODATA with the enclosing SOA when due)
``nxdomain``        NXDOMAIN with the enclosing SOA, whatever the zones say
``nodata``          NOERROR, empty answer, the enclosing SOA
``servfail``        SERVFAIL
``refused``         REFUSED
``silent``          never answer
``truncate``        over UDP an empty reply with TC set; over TCP the full answer
``garbage``         bytes that start with the query id but are not a DNS message
``wrong-id``        the right answer under another id
``wrong-question``  an answer to another question under the right id
``wrong-source``    the right answer, sent over UDP from another port (TCP: answer normally)

``delay`` postpones the reply without blocking other queries (replies are scheduled, not
slept on); ``times`` limits a behaviour to the next N matching queries; ``then_answer`` makes the
four bogus behaviours also send the real answer afterwards (a spoofing attempt that races the
genuine reply). Every query received is recorded with its name, type, transport and source.
"""

from __future__ import annotations

import functools
import heapq
import ipaddress
import itertools
import logging
import selectors
import socket
import threading
import time
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = [
    "BEHAVIOURS",
    "DnsTestServer",
    "Fault",
    "QueryLog",
    "Record",
    "soa",
]

logger = logging.getLogger(__name__)

Behaviour = Literal[
    "answer",
    "nxdomain",
    "nodata",
    "servfail",
    "refused",
    "silent",
    "truncate",
    "garbage",
    "wrong-id",
    "wrong-question",
    "wrong-source",
]
BEHAVIOURS: tuple[str, ...] = typing.get_args(Behaviour)
_BOGUS = frozenset({"garbage", "wrong-id", "wrong-question", "wrong-source"})
_MAX_CHASE = 16


@dataclass(frozen=True)
class Record:
    """One resource record: ``Record("A", "10.0.0.1", ttl=60)``; names may omit the final dot."""

    rdtype: str
    value: str
    ttl: int = 300


RecordSpec = Record | tuple[str, str] | tuple[str, str, int]


def soa(
    minimum: int = 30, ttl: int = 300, mname: str = "ns.test.", rname: str = "admin.test."
) -> Record:
    """An SOA record whose MINIMUM (and TTL) set the negative-answer TTL (RFC 2308)."""
    return Record("SOA", f"{mname} {rname} 1 3600 600 86400 {minimum}", ttl)


@dataclass
class Fault:
    """A behaviour in force for a name (or globally)."""

    kind: str = "answer"
    delay: float = 0.0
    times: int | None = None  # the next N matching queries, then the fault is removed
    then_answer: bool = False  # the bogus behaviours: also send the real answer afterwards


@dataclass(frozen=True)
class QueryLog:
    """A query the server received."""

    name: str  # lower case, no final dot
    rdtype: str  # "A", "AAAA", ...
    transport: Literal["udp", "tcp"]
    source: tuple[str, int]
    id: int
    behaviour: str  # what the server did with it
    at: float = field(compare=False)  # time.monotonic() on arrival


class _TcpConn:
    def __init__(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        self.sock = sock
        self.peer = peer
        self.inbuf = bytearray()
        self.outbuf = bytearray()


class DnsTestServer:
    """A DNS server on loopback for tests; see the module docstring.

    Args:
        zones: name -> records (``Record`` or ``(type, value[, ttl])`` tuples). Names with an SOA
            are zone apexes; a name under one that does not exist gets NXDOMAIN with that SOA.
        host: ``"127.0.0.1"`` or ``"::1"``.
        chase_cnames: follow CNAMEs within the zones (as a recursive server does); when False a
            CNAME comes back alone and the client must query its target.
        tcp: serve TCP; when False the TCP port is held but refuses connections.
    """

    def __init__(
        self,
        zones: Mapping[str, Iterable[RecordSpec]] | None = None,
        *,
        host: str = "127.0.0.1",
        chase_cnames: bool = True,
        tcp: bool = True,
    ) -> None:
        self.host = host
        self.chase_cnames = chase_cnames
        self.tcp = tcp
        self._family = (
            socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        )
        self._lock = threading.Condition()
        self._zones: dict[str, list[Record]] = {}
        self._faults: dict[str | None, list[Fault]] = {}  # a stack per name; None: global
        self._log: list[QueryLog] = []
        self.errors: list[BaseException] = []  # exceptions raised while handling queries
        self.port = 0
        self._thread: threading.Thread | None = None
        self._running = False
        self._udp: socket.socket | None = None
        self._alt: socket.socket | None = None  # "wrong-source" replies come from this one
        self._tcp: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._conns: dict[socket.socket, _TcpConn] = {}
        self._scheduled: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        if zones:
            self.set_zones(zones)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> DnsTestServer:
        """Bind UDP and TCP on one free port and start serving."""
        if self._running:
            return self
        self._udp, self._tcp = self._bind()
        self.port = self._udp.getsockname()[1]
        self._alt = socket.socket(self._family, socket.SOCK_DGRAM)
        self._alt.bind((self.host, 0))
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._udp, self._tcp, self._wake_r):
            sock.setblocking(False)
        self._running = True
        self._thread = threading.Thread(
            target=self._serve, name=f"dns-test-server-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, join the thread and close every socket (idempotent)."""
        if not self._running:
            return
        self._running = False
        assert self._wake_w is not None and self._thread is not None
        self._wake_w.send(b"x")
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            raise RuntimeError("DNS test server thread did not stop")
        for sock in (self._udp, self._alt, self._tcp, self._wake_r, self._wake_w, *self._conns):
            if sock is not None:
                sock.close()
        self._conns.clear()
        self._scheduled.clear()
        self._thread = None

    def __enter__(self) -> DnsTestServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def nameserver(self) -> str:
        """This server as a ``nameservers`` entry: ``"127.0.0.1:port"`` or ``"[::1]:port"``."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        for _ in range(50):
            udp = socket.socket(self._family, socket.SOCK_DGRAM)
            _grow_receive_buffer(udp)
            udp.bind((self.host, 0))
            tcp = socket.socket(self._family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, udp.getsockname()[1]))
            except OSError:
                udp.close()
                tcp.close()
                continue
            if self.tcp:
                tcp.listen(64)
            return udp, tcp
        raise RuntimeError("no free port for both UDP and TCP")

    # -- zones and behaviours ------------------------------------------------------------------

    def set_zones(self, zones: Mapping[str, Iterable[RecordSpec]]) -> None:
        """Replace every zone."""
        with self._lock:
            self._zones = {
                _norm(name): [_record(r) for r in records] for name, records in zones.items()
            }

    def set_records(self, name: str, records: Iterable[RecordSpec]) -> None:
        """Replace one name's records (an empty list keeps the name, with no records)."""
        with self._lock:
            self._zones[_norm(name)] = [_record(r) for r in records]

    def remove(self, name: str) -> None:
        """Remove a name: it becomes NXDOMAIN."""
        with self._lock:
            self._zones.pop(_norm(name), None)

    def set_behaviour(
        self,
        kind: str,
        *,
        name: str | None = None,
        delay: float = 0.0,
        times: int | None = None,
        then_answer: bool = False,
    ) -> None:
        """Make queries for ``name`` (all queries when ``None``) behave as ``kind``.

        Without ``times`` this replaces the name's behaviour; with ``times`` it applies to the next
        ``times`` matching queries and then the behaviour before it is back (fail, then recover).
        """
        if kind not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {kind!r}; expected one of {BEHAVIOURS}")
        if times is not None and times < 1:
            raise ValueError(f"times must be at least 1, got {times!r}")
        fault = Fault(kind, delay, times, then_answer)
        with self._lock:
            key = None if name is None else _norm(name)
            if times is not None:
                self._faults.setdefault(key, []).append(fault)
            elif kind == "answer" and not delay:
                self._faults.pop(key, None)
            else:
                self._faults[key] = [fault]

    def clear_behaviours(self) -> None:
        """Answer every query normally again."""
        with self._lock:
            self._faults.clear()

    # -- what was received ---------------------------------------------------------------------

    @property
    def queries(self) -> list[QueryLog]:
        with self._lock:
            return list(self._log)

    @property
    def total(self) -> int:
        with self._lock:
            return len(self._log)

    def count(
        self, name: str | None = None, rdtype: str | None = None, transport: str | None = None
    ) -> int:
        """Queries received, optionally only for one name, type or transport."""
        key = None if name is None else _norm(name)
        with self._lock:
            return sum(
                1
                for q in self._log
                if (key is None or q.name == key)
                and (rdtype is None or q.rdtype == rdtype)
                and (transport is None or q.transport == transport)
            )

    def sources(self) -> set[tuple[str, int]]:
        with self._lock:
            return {q.source for q in self._log}

    def reset_counts(self) -> None:
        with self._lock:
            self._log.clear()

    def wait_for_queries(self, n: int, timeout: float = 5.0, **filters: str) -> bool:
        """Wait until at least ``n`` matching queries have arrived; ``False`` on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._count_locked(**filters) >= n, timeout)

    def _count_locked(
        self, name: str | None = None, rdtype: str | None = None, transport: str | None = None
    ) -> int:
        key = None if name is None else _norm(name)
        return sum(
            1
            for q in self._log
            if (key is None or q.name == key)
            and (rdtype is None or q.rdtype == rdtype)
            and (transport is None or q.transport == transport)
        )

    # -- the server thread ---------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None and self._wake_r is not None
        selector = selectors.DefaultSelector()
        selector.register(self._udp, selectors.EVENT_READ, "udp")
        if self.tcp:
            selector.register(self._tcp, selectors.EVENT_READ, "accept")
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while self._running:
                timeout = None
                if self._scheduled:
                    timeout = max(self._scheduled[0][0] - time.monotonic(), 0.0)
                for key, mask in selector.select(timeout):
                    try:
                        self._event(selector, key, mask)
                    except Exception as exc:  # recorded for the test to assert on
                        logger.exception("DNS test server failed handling an event")
                        self.errors.append(exc)
                now = time.monotonic()
                while self._scheduled and self._scheduled[0][0] <= now:
                    _, _, action = heapq.heappop(self._scheduled)
                    try:
                        action()
                    except OSError as exc:  # the client went away
                        logger.debug("DNS test server send failed: %s", exc)
        finally:
            selector.close()

    def _event(
        self, selector: selectors.BaseSelector, key: selectors.SelectorKey, mask: int
    ) -> None:
        kind = key.data
        if kind == "wake":
            self._wake_r.recv(64)  # type: ignore[union-attr]
        elif kind == "udp":
            udp, alt = self._udp, self._alt
            assert udp is not None and alt is not None
            while True:
                try:
                    data, peer = udp.recvfrom(65535)
                except BlockingIOError:
                    return

                def send(wire: bytes, spoofed: bool, peer: tuple[str, int] = peer) -> None:
                    (alt if spoofed else udp).sendto(wire, peer)

                self._handle(data, peer[:2], "udp", send)
        elif kind == "accept":
            assert self._tcp is not None
            sock, peer = self._tcp.accept()
            sock.setblocking(False)
            conn = _TcpConn(sock, peer[:2])
            self._conns[sock] = conn
            selector.register(sock, selectors.EVENT_READ, conn)
        else:
            self._tcp_event(selector, kind, mask)

    def _tcp_event(self, selector: selectors.BaseSelector, conn: _TcpConn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE and conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._drop_conn(selector, conn)
                return
            del conn.outbuf[:sent]
        if mask & selectors.EVENT_READ:
            try:
                chunk = conn.sock.recv(65535)
            except BlockingIOError:
                chunk = None
            except OSError:
                chunk = b""
            if chunk == b"":
                self._drop_conn(selector, conn)
                return
            if chunk:
                conn.inbuf += chunk
            while len(conn.inbuf) >= 2:
                size = int.from_bytes(conn.inbuf[:2], "big")
                if len(conn.inbuf) < 2 + size:
                    break
                data = bytes(conn.inbuf[2 : 2 + size])
                del conn.inbuf[: 2 + size]

                def reply(wire: bytes, spoofed: bool, conn: _TcpConn = conn) -> None:
                    if conn.sock.fileno() == -1 or spoofed:
                        return
                    conn.outbuf += len(wire).to_bytes(2, "big") + wire
                    selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

                self._handle(data, conn.peer, "tcp", reply)
        if conn.sock.fileno() != -1:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
            selector.modify(conn.sock, events, conn)

    def _drop_conn(self, selector: selectors.BaseSelector, conn: _TcpConn) -> None:
        selector.unregister(conn.sock)
        conn.sock.close()
        self._conns.pop(conn.sock, None)

    # -- answering -----------------------------------------------------------------------------

    def _handle(
        self,
        data: bytes,
        peer: tuple[str, int],
        transport: Literal["udp", "tcp"],
        send: Callable[[bytes, bool], None],
    ) -> None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException as exc:
            logger.debug("DNS test server ignoring a malformed query from %s: %s", peer, exc)
            return
        if query.flags & dns.flags.QR or len(query.question) != 1:
            return
        question = query.question[0]
        name = _norm(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            fault = self._fault_for(name)
            self._log.append(
                QueryLog(
                    name,
                    rdtype,
                    transport,
                    (peer[0], peer[1]),
                    query.id,
                    fault.kind,
                    time.monotonic(),
                )
            )
            self._lock.notify_all()
            wires = self._respond(query, question.name, question.rdtype, fault, transport)
        for wire, spoofed in wires:
            if fault.delay > 0:
                due = time.monotonic() + fault.delay
                action = functools.partial(send, wire, spoofed)
                entry: tuple[float, int, Callable[[], None]] = (due, next(self._seq), action)
                heapq.heappush(self._scheduled, entry)
            else:
                send(wire, spoofed)

    def _fault_for(self, name: str) -> Fault:
        for key in (name, None):
            stack = self._faults.get(key)
            if stack:
                fault = stack[-1]
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        stack.pop()
                        if not stack:
                            del self._faults[key]
                return fault
        return Fault()

    def _respond(
        self,
        query: dns.message.Message,
        qname: dns.name.Name,
        qtype: int,
        fault: Fault,
        transport: str,
    ) -> list[tuple[bytes, bool]]:
        """The datagrams to send, each with whether it goes out from the other port."""
        kind = fault.kind
        if kind == "silent":
            return []
        response = dns.message.make_response(query, recursion_available=True)
        response.flags |= dns.flags.AA
        if kind == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif kind == "refused":
            response.set_rcode(dns.rcode.REFUSED)
        elif kind == "nxdomain":
            response.set_rcode(dns.rcode.NXDOMAIN)
            self._add_soa(response, qname)
        elif kind == "nodata":
            self._add_soa(response, qname)
        elif kind == "truncate" and transport == "udp":
            response.flags |= dns.flags.TC
        else:
            self._answer(response, qname, qtype)
        wire = response.to_wire()
        if kind not in _BOGUS or (kind == "wrong-source" and transport == "tcp"):
            return [(wire, False)]
        spoofed = kind == "wrong-source"
        if spoofed:
            bogus = wire
        elif kind == "garbage":
            bogus = query.id.to_bytes(2, "big") + b"\x81\x80\xff\xff\xff\xff" + b"this is not DNS"
        elif kind == "wrong-id":
            response.id = (query.id + 1) & 0xFFFF
            bogus = response.to_wire()
        else:
            other = dns.message.make_query(
                "wrong-question.invalid.", dns.rdatatype.RdataType.make(qtype), id=query.id
            )
            forged = dns.message.make_response(other, recursion_available=True)
            forged.answer.append(
                dns.rrset.from_text("wrong-question.invalid.", 300, "IN", "A", "192.0.2.66")
            )
            bogus = forged.to_wire()
        return [(bogus, spoofed), (wire, False)] if fault.then_answer else [(bogus, spoofed)]

    def _answer(self, response: dns.message.Message, qname: dns.name.Name, qtype: int) -> None:
        current = qname
        for hop in range(_MAX_CHASE):
            key = _norm(current.to_text())
            records = self._zones.get(key)
            if records is None and not self._exists(key):
                if hop == 0 or self._apex(key) is not None:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                    self._add_soa(response, current)
                return  # a CNAME target outside our zones: the CNAME alone
            records = records or []
            matching = [r for r in records if dns.rdatatype.from_text(r.rdtype) == qtype]
            if matching:
                response.answer.append(_rrset(current, matching))
                return
            cnames = [r for r in records if r.rdtype.upper() == "CNAME"]
            if not cnames:
                self._add_soa(response, current)  # NODATA
                return
            cname_rrset = _rrset(current, cnames[:1])
            if cname_rrset not in response.answer:
                response.answer.append(cname_rrset)
            if not self.chase_cnames:
                return
            current = cname_rrset[0].target

    def _exists(self, name: str) -> bool:
        suffix = "." + name
        return name in self._zones or any(other.endswith(suffix) for other in self._zones)

    def _apex(self, name: str) -> str | None:
        labels = name.split(".")
        for i in range(len(labels)):
            candidate = ".".join(labels[i:])
            if any(r.rdtype.upper() == "SOA" for r in self._zones.get(candidate, ())):
                return candidate
        return None

    def _add_soa(self, response: dns.message.Message, name: dns.name.Name) -> None:
        apex = self._apex(_norm(name.to_text()))
        if apex is None:
            return
        records = [r for r in self._zones[apex] if r.rdtype.upper() == "SOA"]
        response.authority.append(_rrset(dns.name.from_text(apex), records[:1]))


def _grow_receive_buffer(sock: socket.socket, size: int = 4 << 20) -> None:
    """Room for a burst of queries: this Python server is slower than the clients it tests."""
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    if force is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)  # needs CAP_NET_ADMIN
            return
        except PermissionError:
            pass
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def _norm(name: str) -> str:
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def _record(spec: RecordSpec) -> Record:
    if isinstance(spec, Record):
        return spec
    if len(spec) == 2:
        return Record(spec[0], spec[1])
    return Record(spec[0], spec[1], spec[2])


def _rrset(name: dns.name.Name, records: list[Record]) -> dns.rrset.RRset:
    rdtype = records[0].rdtype.upper()
    values = []
    for r in records:
        value = r.value
        if rdtype == "CNAME" and not value.endswith("."):
            value += "."
        values.append(value)
    return dns.rrset.from_text(
        name, min(r.ttl for r in records), dns.rdataclass.IN, rdtype, *values
    )
