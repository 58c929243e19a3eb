"""Hostile and odd input: every node either parses to the documented NodeAddress or raises
InvalidNodeAddress naming it; decisions never raise for one bad node.

tests/test_addresses.py covers the documented shapes and the basic error table; this file adds the
odd and hostile inputs (numbers, bytes, whitespace, 10,000-character names, labels over 63 bytes,
internationalised names, bad ports in every shape, credentials/paths/queries/fragments, mappings
missing keys, objects whose attributes raise) and Hypothesis properties over all of them at the
parser, topology, planner and balancer levels.

Name resolution here goes to an in-memory resolver (no packet at all), so thousands of random
names cost nothing. ``SOLLOL_LOCALITY_HYPOTHESIS_EXAMPLES`` raises the example counts (the
reliability script does); ``TRIED`` counts the inputs each property saw.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import zlib
from collections.abc import Collection
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import MinimalBalancer as Balancer
from helpers import OllamaNode, offline_config
from helpers import Registry as _Registry
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sollol_locality import (
    ExecutionPlanner,
    InvalidNodeAddress,
    NodeAddress,
    NodeTopology,
    ParallelismCostModel,
    parse_node_address,
)
from sollol_locality.addresses import describe_input
from sollol_locality.local import LocalMachine, LocalSnapshot
from sollol_locality.resolver import Resolution

EXAMPLES = int(os.environ.get("SOLLOL_LOCALITY_HYPOTHESIS_EXAMPLES", "200"))
TRIED: collections.Counter[str] = collections.Counter()  # inputs seen, per property

_settings = settings(max_examples=EXAMPLES, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- a world without I/O ------------------------------------------------------------------------


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
CONFIG = offline_config(use_unresolved=True)  # unresolved names are planned over, as checked
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


def _shown(node: Any) -> str:
    """How an error message names a node (DESIGN.md: naming the input, credentials masked)."""
    if isinstance(node, bytes):
        return "b" + describe_input(node.decode("ascii", "backslashreplace"))
    if isinstance(node, int) and node.bit_length() > 14_000:  # more digits than repr() allows
        return f"<int of {node.bit_length()} bits>"
    if node is None or isinstance(node, (int, float, bool)):
        return repr(node)
    return describe_input(node)


def _id(case: tuple[Any, Any]) -> str:
    return _shown(case[0])[:40]


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


@pytest.mark.parametrize(("node", "expected"), VALID, ids=list(map(_id, VALID)))
def test_odd_but_valid_input_parses_to_the_documented_address(node: Any, expected: Any) -> None:
    address = parse_node_address(node)
    assert (address.scheme, address.host, address.port, address.zone, address.path) == expected
    assert parse_node_address(address.url) == address


@pytest.mark.parametrize(("node", "ip"), [("１２７.０.０.１:5", "127.0.0.1"), ("¹", "0.0.0.1"),
                                         ("http://１０.０.０.１", "10.0.0.1")])
def test_names_that_idna_maps_to_digits_are_addresses(node: str, ip: str) -> None:
    # Fullwidth or superscript digits become ASCII digits under IDNA: that is an IP address,
    # exactly as if typed in ASCII (not a host *name* "127.0.0.1" or "1" to send to DNS).
    address = parse_node_address(node)
    assert (address.host, address.ip) == (ip, ipaddress.ip_address(ip))
    assert parse_node_address(address.url) == address


@pytest.mark.parametrize(("node", "reason"), INVALID, ids=list(map(_id, INVALID)))
def test_hostile_input_raises_invalid_node_address_naming_it(node: Any, reason: str) -> None:
    with pytest.raises(InvalidNodeAddress) as info:
        parse_node_address(node)
    assert isinstance(info.value, ValueError)
    assert info.value.reason == reason
    assert info.value.node == _shown(node)
    assert str(info.value) == f"Invalid node address {_shown(node)}: {reason}"
    assert len(info.value.node) <= 120  # a 10,000-character input is shortened, not echoed


def test_every_table_entry_at_once_never_breaks_a_decision() -> None:
    nodes = [node for node, _ in VALID + INVALID] + ["http://localhost:11434"]
    plan = PLANNER.plan(3, nodes)
    assert len(plan.excluded) == len(INVALID)
    assert [id(n) for n, _ in plan.excluded] == [id(n) for n, _ in INVALID]
    assert [r for _, r in plan.excluded] == [reason for _, reason in INVALID]
    assert sum(len(members) for members in plan.hosts.values()) == len(VALID) + 1
    balancer = Balancer(_Registry(nodes), planner=PLANNER)
    assert balancer.should_parallelize(3) is (plan.mode == "parallel")
    assert balancer.plan_execution(0).mode == "sequential"


def test_the_sollol_balancer_never_raises_for_bad_nodes() -> None:
    from sollol_locality import LocalityAwareLoadBalancer

    nodes = [node for node, _ in INVALID] + [OllamaNode("http://10.0.0.1:11434"),
                                             OllamaNode("http://10.0.0.2:11434")]
    balancer = LocalityAwareLoadBalancer(_Registry(nodes), planner=PLANNER)
    assert balancer.should_use_parallel() is True
    assert balancer.suggest_execution_mode(2) == "parallel"
    plan = balancer.plan_execution(2)
    assert [n.url for n in plan.nodes] == ["http://10.0.0.1:11434", "http://10.0.0.2:11434"]
    assert len(plan.excluded) == len(INVALID)
    only_bad = LocalityAwareLoadBalancer(_Registry([n for n, _ in INVALID]), planner=PLANNER)
    assert only_bad.should_use_parallel() is False
    assert only_bad.plan_execution(3).nodes == []


# -- Hypothesis -----------------------------------------------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.binary(max_size=12),
                     st.text(max_size=12))
_hosts = st.one_of(
    st.sampled_from(["localhost", "LocalHost.", "thisbox", "127.0.0.1", "127.1", "[::1]", "::1",
                     "0.0.0.0", "[::ffff:127.0.0.1]", "192.0.2.10", "10.0.0.1", "10.0.0.2",
                     "[fd00::1]", "[fe80::1%eth0]", "a.test", "b.test", "ü.test", "xn--zz.test",
                     "_srv.test", "h_x", "", " ", "-x", "a..b", "a" * 64, "[::1", "999.1.1.1"]),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\.[a-z]{1,5}){0,2}", fullmatch=True),
    st.text(max_size=16),
)
_ports = st.one_of(st.none(), st.integers(-3, 70_000), st.sampled_from(["", "abc", "0", "٣"]),
                   st.floats(allow_nan=True), st.booleans())
_urls = st.builds(
    lambda scheme, userinfo, host, port, tail: (
        f"{scheme}{userinfo}{host}{'' if port is None else ':' + str(port)}{tail}"),
    st.sampled_from(["", "http://", "https://", "HTTPS://", "ftp://", "://", "http:/"]),
    st.sampled_from(["", "u:p@", "u@", "u:p@ss@", "@", ":@"]),
    _hosts, _ports,
    st.sampled_from(["", "/", "/api/generate", "?key=1", "#frag", "/x?y:1#z", "/p@q"]),
)
_metrics = st.builds(SimpleNamespace, avg_response_time=_scalars, total_requests=_scalars,
                     avg_latency=_scalars, is_healthy=st.booleans())
_capabilities = st.builds(SimpleNamespace, has_gpu=_scalars, gpu_count=_scalars)
_KEYS = ["url", "host", "port", "scheme", "gpu", "device", "gpu_id", "latency_ms",
         "total_requests", "requests", "avg_response_time", "has_gpu", "gpu_count"]
NODES = st.one_of(
    _urls,
    _scalars,
    st.text(max_size=40),
    st.dictionaries(st.sampled_from(_KEYS), st.one_of(_scalars, _urls, _hosts, _ports),
                    max_size=5),
    st.builds(lambda host, port: {"host": host, "port": port}, _hosts, _ports),
    st.builds(SimpleNamespace, url=st.one_of(_urls, _scalars)),
    st.builds(SimpleNamespace, host=st.one_of(_hosts, _scalars), port=_ports),
    st.builds(lambda url, metrics, caps, gpu: SimpleNamespace(url=url, metrics=metrics,
                                                              capabilities=caps, gpu=gpu),
              _urls, _metrics, _capabilities, _scalars),
    st.builds(OllamaNode, _urls),
    st.sampled_from([UrlRaises(RuntimeError("x")), UrlRaises(KeyError("k")), GetattrRaises(),
                     HostRaises(), MetricsRaise(), object()]),
)


def _parses(node: Any) -> bool:
    try:
        parse_node_address(node)
    except InvalidNodeAddress:
        return False
    return True


def _safe_host(node: Any) -> Any:
    try:
        return getattr(node, "host", None)
    except Exception:
        return None


def _check_address(address: NodeAddress) -> None:
    assert address.scheme in ("http", "https")
    assert 1 <= address.port <= 65535
    assert address.host and "@" not in address.host and address.host == address.host.strip()
    assert address.host.isascii()
    # format and parse round-trip, in every shape
    assert str(address) == address.url
    assert parse_node_address(address.url) == address
    host = f"{address.host}%{address.zone}" if address.zone else address.host
    assert parse_node_address({"host": host, "port": address.port,
                               "scheme": address.scheme}) == address
    assert parse_node_address(SimpleNamespace(url=address.url)) == address
    as_object = parse_node_address(SimpleNamespace(host=host, port=str(address.port)))
    assert as_object == NodeAddress("http", address.host, address.port, address.zone)


@_settings
@given(node=NODES)
def test_any_input_parses_or_raises_invalid_node_address(node: Any) -> None:
    TRIED["parse"] += 1
    try:
        address = parse_node_address(node)
    except InvalidNodeAddress as exc:
        assert isinstance(exc, ValueError)
        assert exc.reason and exc.node
        # A host given as a URL ({"host": "http://h:1"}) is parsed, and named, as that URL.
        host = node.get("host") if isinstance(node, dict) else _safe_host(node)
        named_by_host = isinstance(host, str) and any(c in host for c in "/@")
        assert exc.node in ((_shown(node), describe_input(host.strip())) if named_by_host
                            else (_shown(node),))
        assert str(exc) == f"Invalid node address {exc.node}: {exc.reason}"
    else:
        _check_address(address)


@_settings
@given(nodes=st.lists(NODES, max_size=8), tasks=st.integers(0, 9), data=st.data())
def test_a_decision_never_raises_and_accounts_for_every_node(nodes: list[Any], tasks: int,
                                                             data: st.DataObject) -> None:
    TRIED["plan"] += 1
    plan = PLANNER.plan(tasks, nodes)
    grouped = [id(n) for members in plan.hosts.values() for n in members]
    excluded = [id(n) for n, _ in plan.excluded]
    assert sorted(grouped + excluded) == sorted(map(id, nodes))  # every node exactly once
    assert excluded == [id(n) for n in nodes if not _parses(n)]
    assert all(any(n is c for c in nodes) for n in plan.nodes)
    assert plan.mode in ("parallel", "sequential")
    assert (plan.mode == "parallel") == (len(plan.nodes) >= 2)
    repr(plan)
    plan.to_dict()
    # independent of input order
    shuffled = data.draw(st.permutations(nodes))
    again = PLANNER.plan(tasks, shuffled)
    assert (again.mode, again.unique_hosts) == (plan.mode, plan.unique_hosts)
    assert again.speedup == pytest.approx(plan.speedup)
    assert {h: {id(n) for n in ns} for h, ns in again.hosts.items()} == {
        h: {id(n) for n in ns} for h, ns in plan.hosts.items()}
    assert {id(n) for n, _ in again.excluded} == set(excluded)


@_settings
@given(nodes=st.lists(NODES, max_size=8), tasks=st.integers(0, 5))
def test_the_balancer_never_raises_for_bad_nodes(nodes: list[Any], tasks: int) -> None:
    TRIED["balancer"] += 1
    balancer = Balancer(_Registry(nodes), planner=PLANNER)
    decision = balancer.should_parallelize(tasks)
    plan = balancer.plan_execution(tasks)
    assert decision is (plan.mode == "parallel")


@_settings
@given(nodes=st.lists(NODES, max_size=10), data=st.data())
def test_group_by_locality_is_a_partition_independent_of_order(nodes: list[Any],
                                                               data: st.DataObject) -> None:
    TRIED["group"] += 1
    usable = [n for n in nodes if _parses(n)]
    groups = TOPOLOGY.group_by_locality(usable)
    assert sorted(id(n) for ns in groups.values() for n in ns) == sorted(map(id, usable))
    for members in groups.values():  # each group keeps the input order
        positions = [next(i for i, u in enumerate(usable) if u is n) for n in members]
        assert positions == sorted(positions)
    assert TOPOLOGY.count_unique_hosts(usable) == len(groups)
    shuffled = data.draw(st.permutations(usable))
    again = TOPOLOGY.group_by_locality(shuffled)
    assert {h: {id(n) for n in ns} for h, ns in again.items()} == {
        h: {id(n) for n in ns} for h, ns in groups.items()}
    if len(usable) < len(nodes):
        with pytest.raises(InvalidNodeAddress):
            TOPOLOGY.group_by_locality(nodes)
