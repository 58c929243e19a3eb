"""The Hypothesis properties over hostile node input, shared by the tests and the benchmark.

Layer: testing (the top layer). Needs Hypothesis and pytest (the ``test`` extra).

:data:`NODES` draws node inputs of every shape: URLs with odd schemes, credentials, hosts and
ports, scalars, bytes, mappings with any of the keys the library reads, objects whose attributes
raise. Each ``check_*`` function is the body of one property, on the in-memory world of
:mod:`sollol_locality.testing.cases`; :data:`PROPERTIES` pairs each with its strategies, and
:func:`property_test` makes a Hypothesis test of one with a given number of examples (the
tests use 200, the reliability benchmark many more). :data:`TRIED` counts the inputs each
property saw.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Final

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sollol_locality import InvalidNodeAddress, NodeAddress, parse_node_address
from sollol_locality.addresses import describe_input

from .cases import PLANNER, TOPOLOGY, GetattrRaises, HostRaises, MetricsRaise, UrlRaises, shown
from .fakes import MinimalBalancer, OllamaNode, Registry

__all__ = [
    "NODES",
    "PROPERTIES",
    "TRIED",
    "check_balancer",
    "check_decision",
    "check_grouping",
    "check_parse",
    "property_test",
]

TRIED: collections.Counter[str] = collections.Counter()  # inputs seen, per property

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


def check_parse(node: Any) -> None:
    """The body of ``test_any_input_parses_or_raises_invalid_node_address``."""
    TRIED["parse"] += 1
    try:
        address = parse_node_address(node)
    except InvalidNodeAddress as exc:
        assert isinstance(exc, ValueError)
        assert exc.reason and exc.node
        # A host given as a URL ({"host": "http://h:1"}) is parsed, and named, as that URL.
        host: Any = node.get("host") if isinstance(node, dict) else _safe_host(node)
        named_by_host = isinstance(host, str) and any(c in host for c in "/@")
        assert exc.node in ((shown(node), describe_input(host.strip())) if named_by_host
                            else (shown(node),))
        assert str(exc) == f"Invalid node address {exc.node}: {exc.reason}"
    else:
        _check_address(address)


def check_decision(nodes: list[Any], tasks: int, data: st.DataObject) -> None:
    """The body of ``test_a_decision_never_raises_and_accounts_for_every_node``."""
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


def check_balancer(nodes: list[Any], tasks: int) -> None:
    """The body of ``test_the_balancer_never_raises_for_bad_nodes``."""
    TRIED["balancer"] += 1
    balancer = MinimalBalancer(Registry(nodes), planner=PLANNER)
    decision = balancer.should_parallelize(tasks)
    plan = balancer.plan_execution(tasks)
    assert decision is (plan.mode == "parallel")


def check_grouping(nodes: list[Any], data: st.DataObject) -> None:
    """The body of ``test_group_by_locality_is_a_partition_independent_of_order``."""
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


PROPERTIES: Final[dict[str, tuple[Callable[..., None], dict[str, Any]]]] = {
    "parse": (check_parse, {"node": NODES}),
    "plan": (check_decision, {"nodes": st.lists(NODES, max_size=8), "tasks": st.integers(0, 9),
                              "data": st.data()}),
    "balancer": (check_balancer, {"nodes": st.lists(NODES, max_size=8),
                                  "tasks": st.integers(0, 5)}),
    "group": (check_grouping, {"nodes": st.lists(NODES, max_size=10), "data": st.data()}),
}
"""Property name (the key of :data:`TRIED`) -> its check and the strategies of its arguments."""


def property_test(name: str, examples: int) -> Callable[[], None]:
    """A Hypothesis test of property ``name`` over ``examples`` examples (call it to run)."""
    check, strategies = PROPERTIES[name]
    run: Callable[[], None] = settings(
        max_examples=examples, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )(given(**strategies)(check))  # fmt: skip
    return run
