"""Case tables shared by the tests and the reliability benchmark, so that neither reads the other.

Layer: testing (the top layer).

* **DNS faults** (tests/test_faults.py, ``benchmarks.reliability`` "faults"): :data:`CASES`, one
  per fault of a loopback DNS server, each taken through the decision entry points
  :data:`APIS`; :func:`build` makes the world of one case (servers, resolver on a
  :class:`~sollol_locality.testing.fakes.FakeClock`, topology, the decision), and
  :func:`check_outcome` checks what a decision answered: a name that cannot be resolved is its
  own host (``resolved=False``), never an exception. :data:`BOUND` is the deadline every
  decision must keep (``dns_timeout`` + 25%).
* **Hostile input** (tests/test_hostile_input.py, the "hostile input" section): :data:`VALID`
  and :data:`INVALID` node inputs with the address or the reason each must give, the odd
  objects among them, and :data:`PLANNER`/:data:`TOPOLOGY`, a world whose resolver is in memory
  (no packet at all). The Hypothesis properties over the same inputs are
  :mod:`sollol_locality.testing.properties`.
* **Crash safety** (tests/test_durability.py, the "crash safety" section):
  :data:`CALIBRATION_WRITER`, a script saving a calibration file in a loop, to be killed.
"""

from __future__ import annotations

import collections
import ipaddress
import math
import time
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Final

from sollol_locality import ExecutionPlanner, NodeTopology, ParallelismCostModel
from sollol_locality.addresses import describe_input
from sollol_locality.local import LocalMachine, LocalSnapshot
from sollol_locality.resolver import DnsResolver, Resolution

from .baselines import offline_config
from .dnsserver import DnsTestServer, soa
from .fakes import FakeClock, MinimalBalancer, Registry

__all__ = [
    "APIS",
    "BOUND",
    "CALIBRATION_WRITER",
    "CASES",
    "FAILURE_BURSTS",
    "INVALID",
    "LABEL63",
    "NEGATIVE_BURSTS",
    "NOT_A_NODE",
    "PORT_RANGE",
    "SHARED",
    "TIMEOUT",
    "PLANNER",
    "TOPOLOGY",
    "VALID",
    "WINDOW",
    "ZONES",
    "GetattrRaises",
    "HostRaises",
    "MetricsRaise",
    "NameResolver",
    "UrlRaises",
    "Case",
    "World",
    "build",
    "case_id",
    "check_outcome",
    "nodes_for",
    "shown",
    "static_machine",
    "timed",
]

# =============================================================================================
# DNS faults at the decision level

TIMEOUT = 0.6  # dns_timeout of every decision here
BOUND = TIMEOUT * 1.25  # dns_timeout is for one whole decision; 25% for the rest
SHARED = "10.30.0.1"  # what the good names resolve to; also a node of its own (another port)
WINDOW = 40  # simulated seconds of repeated decisions

ZONES: dict[str, Any] = {
    "f.test": [soa(minimum=30, ttl=300)],
    "good.f.test": [("A", SHARED, 300)],
    "zero.f.test": [("A", SHARED, 0)],
    "huge.f.test": [("A", SHARED, 2**31 - 1)],
    "empty.f.test": [],  # exists, no A/AAAA: NODATA
    "loop1.f.test": [("CNAME", "loop2.f.test", 60)],
    "loop2.f.test": [("CNAME", "loop1.f.test", 60)],
    **{f"hop{i}.f.test": [("CNAME", f"hop{i + 1}.f.test", 60)] for i in range(12)},
    "hop12.f.test": [("A", SHARED, 60)],  # 12 CNAME hops: more than MAX_CNAME_HOPS (8)
}



def static_machine() -> LocalMachine:
    snapshot = LocalSnapshot(frozenset({"localhost"}),
                             frozenset({ipaddress.ip_address("127.0.0.1"),
                                        ipaddress.ip_address("::1")}), ())
    return LocalMachine(probe=lambda: snapshot)


@dataclass(frozen=True)
class Case:
    id: str
    name: str
    behaviour: dict[str, Any] | None  # set_behaviour(**behaviour, name=name)
    resolved: bool  # the outcome of the first decision
    bursts: int  # most decisions that may send queries in WINDOW simulated seconds
    finally_resolved: bool | None = None  # the outcome at the end (default: as the first)
    servers: int = 1
    checks: tuple[str, ...] = field(default=())


FAILURE_BURSTS = 3  # failure cached 5 s, then 10, then 20: requeried at t=5, 15, 35
NEGATIVE_BURSTS = math.ceil(WINDOW / 30)  # SOA minimum 30 s

CASES = [
    Case("silent", "good.f.test", {"kind": "silent"}, False, FAILURE_BURSTS),
    Case("answer-after-deadline", "good.f.test", {"kind": "answer", "delay": TIMEOUT * 2},
         False, FAILURE_BURSTS),
    Case("answer-before-deadline", "good.f.test", {"kind": "answer", "delay": TIMEOUT / 2},
         True, 0),
    Case("servfail", "good.f.test", {"kind": "servfail"}, False, FAILURE_BURSTS),
    Case("refused", "good.f.test", {"kind": "refused"}, False, FAILURE_BURSTS),
    Case("nxdomain", "missing.f.test", None, False, NEGATIVE_BURSTS),
    Case("nodata", "empty.f.test", None, False, NEGATIVE_BURSTS),
    Case("truncated-then-tcp", "good.f.test", {"kind": "truncate"}, True, 0, checks=("tcp",)),
    Case("garbage-then-answer", "good.f.test", {"kind": "garbage", "then_answer": True},
         True, 0, checks=("ignored",)),
    Case("wrong-id-then-answer", "good.f.test", {"kind": "wrong-id", "then_answer": True},
         True, 0, checks=("ignored",)),
    Case("wrong-question-then-answer", "good.f.test",
         {"kind": "wrong-question", "then_answer": True}, True, 0, checks=("ignored",)),
    Case("wrong-source-then-answer", "good.f.test",
         {"kind": "wrong-source", "then_answer": True}, True, 0, checks=("ignored",)),
    Case("garbage-only", "good.f.test", {"kind": "garbage"}, False, FAILURE_BURSTS,
         checks=("ignored",)),
    Case("wrong-question-only", "good.f.test", {"kind": "wrong-question"}, False,
         FAILURE_BURSTS, checks=("ignored",)),
    Case("ttl-zero", "zero.f.test", None, True, math.ceil(WINDOW / 5)),  # clamped up to 5 s
    Case("ttl-enormous", "huge.f.test", None, True, 0),  # clamped down to 1 h (test below)
    Case("cname-loop", "loop1.f.test", None, False, FAILURE_BURSTS),
    Case("cname-chain-too-long", "hop0.f.test", None, False, FAILURE_BURSTS),
    Case("recovers-after-servfail", "good.f.test", {"kind": "servfail", "times": 2}, False, 1,
         finally_resolved=True),
    Case("first-server-silent", "good.f.test", None, True, 0, servers=2),
]

APIS = ["plan", "count", "should_parallelize"]




@dataclass
class World:
    servers: list[DnsTestServer]
    resolver: DnsResolver
    topology: NodeTopology
    clock: FakeClock
    decide: Callable[[], Any]

    @property
    def queries(self) -> int:
        return sum(s.total for s in self.servers)


def nodes_for(name: str) -> list[str]:
    # resolved: 2 machines (this one and SHARED); unresolved: 3 (the name is its own host)
    return ["http://localhost:11434", f"http://{name}:11434", f"http://{SHARED}:11435"]


def build(make_dns_server: Callable[..., DnsTestServer], case: Case, api: str) -> World:
    servers = [make_dns_server(ZONES) for _ in range(case.servers)]
    if case.servers > 1:
        servers[0].set_behaviour("silent")  # the first server never answers; the next one does
    if case.behaviour is not None:
        options = dict(case.behaviour)
        servers[0].set_behaviour(options.pop("kind"), name=case.name, **options)
    clock = FakeClock()
    config = offline_config(None, nameservers=",".join(s.nameserver for s in servers),
                            dns_timeout=TIMEOUT, hosts_file=None)
    # As NodeTopology builds it from the config, with the cache clock made controllable.
    resolver = DnsResolver(nameservers=[s.nameserver for s in servers], hosts_file=None,
                           clock=clock)
    topology = NodeTopology(config, resolver=resolver, local_machine=static_machine())
    nodes = nodes_for(case.name)
    planner = ExecutionPlanner(topology, ParallelismCostModel(config), config, clock=clock)
    if api == "plan":
        def decide() -> Any:
            return planner.plan(3, nodes)
    elif api == "count":
        def decide() -> Any:
            return topology.count_unique_hosts(nodes)
    else:
        balancer = MinimalBalancer(Registry(nodes), planner=planner)

        def decide() -> Any:
            return balancer.should_parallelize(3)
    return World(servers, resolver, topology, clock, decide)


def timed(decide: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = decide()
    return result, time.perf_counter() - start


def check_outcome(world: World, case: Case, api: str, result: Any, resolved: bool) -> None:
    if api == "plan":
        assert result.mode == "parallel"
        assert result.unique_hosts == (2 if resolved else 3)
        unresolved_warning = [w for w in result.warnings if "could not be resolved" in w]
        assert bool(unresolved_warning) is not resolved, result.warnings
    elif api == "count":
        assert result == (2 if resolved else 3)
    else:
        assert result is True
    identity = world.topology.describe(f"http://{case.name}:11434")  # from the cache now
    assert identity.resolved is resolved
    if resolved:
        assert (identity.physical_host_id, identity.source) == (SHARED, "dns")
        assert identity.addresses == {SHARED}  # never the forged 192.0.2.66
        assert identity.locality_group == "lan"
    else:
        assert (identity.physical_host_id, identity.source) == (case.name, "unresolved")
        assert identity.locality_group == "unknown"


# =============================================================================================
# Hostile input


class NameResolver:
    """Deterministic in-memory DNS: a third of the names do not exist, the rest map (by CRC) to
    one of 35 private addresses, so distinct names sometimes share a machine."""

    def __init__(self) -> None:
        self.asked: collections.Counter[str] = collections.Counter()

    def resolve_many(self, names: Collection[str], *, timeout: float) -> dict[str, Resolution]:
        result = {}
        for name in names:
            self.asked[name] += 1
            crc = zlib.crc32(name.encode())
            if crc % 3 == 0:
                result[name] = Resolution(name, frozenset(), "nxdomain", "dns")
            else:
                ip = ipaddress.ip_address(f"10.77.{crc % 7}.{crc % 5 + 1}")
                result[name] = Resolution(name, frozenset({ip}), "ok", "dns")
        return result

    def peek(self, name: str) -> Resolution | None:
        return None


LOCAL = LocalSnapshot(frozenset({"localhost", "thisbox"}),
                      frozenset(map(ipaddress.ip_address, ["127.0.0.1", "::1", "192.0.2.10"])),
                      ())
CONFIG = offline_config(None, dns_timeout=0.3)
TOPOLOGY = NodeTopology(CONFIG, resolver=NameResolver(), local_machine=LocalMachine(
    probe=lambda: LOCAL))
PLANNER = ExecutionPlanner(TOPOLOGY, ParallelismCostModel(CONFIG), CONFIG)




# -- odd objects ----------------------------------------------------------------------------------


class UrlRaises:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    @property
    def url(self) -> str:
        raise self.exc


class GetattrRaises:
    """Every attribute access raises something other than AttributeError."""

    def __getattr__(self, name: str) -> Any:
        raise ValueError(f"no {name} here")


class HostRaises:
    url = None

    @property
    def host(self) -> str:
        raise OSError("host lookup failed")


class MetricsRaise:
    """A node whose address is fine but whose figures blow up when read."""

    url = "http://10.0.0.44:11434"

    @property
    def metrics(self) -> Any:
        raise RuntimeError("metrics unavailable")

    @property
    def capabilities(self) -> Any:
        raise RuntimeError("capabilities unavailable")


def shown(node: Any) -> str:
    """How an error message names a node (naming the input, credentials masked)."""
    if isinstance(node, bytes):
        return "b" + describe_input(node.decode("ascii", "backslashreplace"))
    if isinstance(node, int) and node.bit_length() > 14_000:  # more digits than repr() allows
        return f"<int of {node.bit_length()} bits>"
    if node is None or isinstance(node, (int, float, bool)):
        return repr(node)
    return describe_input(node)


def case_id(case: tuple[Any, Any]) -> str:
    return shown(case[0])[:40]


# -- tables ---------------------------------------------------------------------------------------

M = "<mapping with keys ['host', 'port']>"
PORT_RANGE = "(expected 1 to 65535)"
NOT_A_NODE = "expected a URL string, mapping or node object, got"
LABEL63 = "a" * 63

VALID: list[tuple[Any, tuple[str, str, int, str | None, str]]] = [
    # credentials, paths, queries and fragments: dropped or kept as the contract says
    ("http://u:p@h:1/a/b?c=d#e", ("http", "h", 1, None, "/a/b")),
    ("u:p@h", ("http", "h", 11434, None, "")),
    ("http://u:p@ss@h:2", ("http", "h", 2, None, "")),  # '@' inside the password
    ("http://@h", ("http", "h", 11434, None, "")),
    ("http://u@h", ("http", "h", 11434, None, "")),
    ("https://u:p@[::1]:5", ("https", "::1", 5, None, "")),
    ("http://h:1?x", ("http", "h", 1, None, "")),
    ("http://h:1#x", ("http", "h", 1, None, "")),
    ("http://h?x:1", ("http", "h", 11434, None, "")),  # ':1' is in the query, not a port
    ("http://h:1/p@x", ("http", "h", 1, None, "/p@x")),  # '@' in a path is no userinfo
    ("HTTP://H", ("http", "h", 11434, None, "")),
    ("h/", ("http", "h", 11434, None, "")),
    ("h:00080", ("http", "h", 80, None, "")),
    ("\u2003h\t", ("http", "h", 11434, None, "")),  # surrounding Unicode space is trimmed
    # long but legal names
    (f"{LABEL63}.x", ("http", f"{LABEL63}.x", 11434, None, "")),
    ((("a" * 60) + ".") * 4 + "com", ("http", (("a" * 60) + ".") * 4 + "com", 11434, None, "")),
    # internationalised names: IDNA A-labels
    ("BÜCHER.example", ("http", "xn--bcher-kva.example", 11434, None, "")),
    ("пример.испытание", ("http", "xn--e1afmkfd.xn--80akhbyknj4f", 11434, None, "")),
    ("☃.net", ("http", "xn--n3h.net", 11434, None, "")),
    ("http://[fe80::1%25eth0]:1", ("http", "fe80::1", 1, "eth0", "")),
    ("0x7f000001", ("http", "127.0.0.1", 11434, None, "")),  # inet_aton forms
    ("2130706433", ("http", "127.0.0.1", 11434, None, "")),
    # mappings and objects
    ({"host": "h", "port": None}, ("http", "h", 11434, None, "")),
    ({"host": "h", "port": ""}, ("http", "h", 11434, None, "")),
    ({"host": "h", "port": " 80 "}, ("http", "h", 80, None, "")),
    ({"url": "h", "host": "x", "port": 1}, ("http", "h", 11434, None, "")),  # url wins
    ({"host": "http://u:p@h:5", "port": 7}, ("http", "h", 7, None, "")),
    (SimpleNamespace(url="h", host="x", port=1), ("http", "h", 11434, None, "")),
    (MetricsRaise(), ("http", "10.0.0.44", 11434, None, "")),
]

INVALID: list[tuple[Any, str]] = [
    (0, f"{NOT_A_NODE} int"),
    (-1, f"{NOT_A_NODE} int"),
    (1.5, f"{NOT_A_NODE} float"),
    (float("nan"), f"{NOT_A_NODE} float"),
    (True, f"{NOT_A_NODE} bool"),
    (10**5000, f"{NOT_A_NODE} int"),  # too long for repr(): named by its size
    (b"http://h:1", f"{NOT_A_NODE} bytes"),
    (bytearray(b"h"), "expected a .url attribute or .host and .port attributes"),
    (["h"], "expected a .url attribute or .host and .port attributes"),
    (("h", 1), "expected a .url attribute or .host and .port attributes"),
    (object(), "expected a .url attribute or .host and .port attributes"),
    ("\t\n", "empty address"),
    ("\u00a0", "empty address"),
    ("a" * 10_000, "longer than 2048 characters"),
    ("http://" + "a" * 10_000, "longer than 2048 characters"),
    ("a" * 64 + ".x", "label longer than 63 characters"),
    ((LABEL63 + ".") * 4 + "com", "host name longer than 253 characters"),
    ("ü" * 64 + ".de", "not a valid internationalised domain name"),  # A-label over 63 bytes
    ("\x80.de", "not a valid internationalised domain name"),
    ("-bad.de", "invalid character in host name label '-bad'"),
    ("h..", "empty label in host name"),
    ("h:", f"invalid port '' {PORT_RANGE}"),
    ("h:٣", f"invalid port '٣' {PORT_RANGE}"),  # a digit, but not an ASCII one
    ("h:+80", f"invalid port '+80' {PORT_RANGE}"),
    ("h:99999999999999999999", f"invalid port '99999999999999999999' {PORT_RANGE}"),
    ("h: 80", "contains white space or control characters"),
    ("h\x00", "contains white space or control characters"),
    ("[fe80::1%]", "invalid IPv6 zone id ''"),
    ("[::1]x", "unexpected 'x' after IPv6 address"),
    ("4294967296", "'4294967296' is not a valid IPv4 address"),
    ("http://h:1:2", "IPv6 addresses with a port must be in brackets, as in [::1]:11434"),
    ("ws://h", "unsupported scheme 'ws' (expected http or https)"),
    ("://h", "malformed scheme"),
    ("/h", "no host"),
    ({"host": "h", "port": 0}, f"invalid port 0 {PORT_RANGE}"),
    ({"host": "h", "port": 65536}, f"invalid port 65536 {PORT_RANGE}"),
    ({"host": "h", "port": -1}, f"invalid port -1 {PORT_RANGE}"),
    ({"host": "h", "port": "abc"}, f"invalid port 'abc' {PORT_RANGE}"),
    ({"host": "h", "port": 1.5}, f"invalid port 1.5 {PORT_RANGE}"),
    ({"host": "h", "port": 80.0}, f"invalid port 80.0 {PORT_RANGE}"),
    ({"host": "h", "port": True}, "invalid port True"),
    (SimpleNamespace(host="h", port=0), f"invalid port 0 {PORT_RANGE}"),
    (SimpleNamespace(host="h", port="abc"), f"invalid port 'abc' {PORT_RANGE}"),
    (SimpleNamespace(host="h", port=-1), f"invalid port -1 {PORT_RANGE}"),
    ({}, "expected a 'url' key or a 'host' key"),
    ({"url": None}, "'url' must be a string, got NoneType"),
    ({"url": b"http://h"}, "'url' must be a string, got bytes"),
    ({"host": None}, "host must be a string, got NoneType"),
    ({"host": 5}, "host must be a string, got int"),
    ({"host": ""}, "no host"),
    ({"host": "h", "scheme": "ftp"}, "unsupported scheme 'ftp' (expected http or https)"),
    ({"host": "h", "scheme": None}, "unsupported scheme None (expected http or https)"),
    ({1: 2}, "expected a 'url' key or a 'host' key"),
    (UrlRaises(RuntimeError("boom")), "reading .url raised RuntimeError"),
    (UrlRaises(KeyError("k")), "reading .url raised KeyError"),
    (GetattrRaises(), "reading .url raised ValueError"),
    (HostRaises(), "reading .host/.port raised OSError"),
    (SimpleNamespace(url=5), ".url must be a string, got int"),
    (SimpleNamespace(url=b"http://h"), ".url must be a string, got bytes"),
    (SimpleNamespace(url=None, host=None), "expected a .url attribute or .host and .port "
                                           "attributes"),
]


# =============================================================================================
# Crash safety

CALIBRATION_WRITER: Final = r"""
import os, sys
from sollol_locality import ParallelismCostModel
from sollol_locality.testing.baselines import offline_config
try:
    from sollol_locality.cost_model import _push
except ImportError:  # the samples are pushed through the calibration store
    _push = None
models = []
for version in (1, 2):
    model = ParallelismCostModel(offline_config())
    push = _push if _push is not None else model._cal.push
    for unit in range(1000):
        for sample in range(25):
            push(model._cal.task_seconds, f"host-{unit}/cpu", version + sample / 100)
    model._cal.observations = version
    models.append(model)
models[0].save(sys.argv[1])
print("saved 1", flush=True)
if sys.argv[2] == "stop-after-fsync":
    real_fsync = os.fsync

    def fsync(fd):  # the new version is written and synced, not yet renamed: stop here
        real_fsync(fd)
        print("synced", flush=True)
        sys.stdin.read()

    os.fsync = fsync
count = 1
while True:
    models[count % 2].save(sys.argv[1])
    count += 1
    print("saved", count, flush=True)
"""
"""``python -c CALIBRATION_WRITER PATH MODE``: saves two calibration models (observations 1 and
2, 1,000 units of 25 samples each) to ``PATH`` alternately, forever, printing ``saved N`` after
each save. With ``MODE`` ``stop-after-fsync``, the second save stops after its temporary file
is synced, before the rename, prints ``synced`` and waits for stdin. Run with the repository
(or the installed package) importable."""
