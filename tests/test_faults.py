"""DNS faults at the *decision* level: the answer comes back in time, is what the contract says, and
a failing server is not hammered.

Every case runs against loopback DNS servers the test starts (sollol_locality.testing.dnsserver).
The decision is taken three ways, each on a fresh topology: ``ExecutionPlanner.plan``,
``NodeTopology.count_unique_hosts`` and a ``LocalityAwareMixin`` balancer's
``should_parallelize``. Its wall time must stay within ``dns_timeout`` + 25% (a correctness
bound: the deadline is the contract). The outcome is checked against the contract: a name
that cannot be resolved is its own host (``resolved=False``), never an exception.

Then, on the count topology, the same decision is repeated while a fake clock (the resolver's
cache clock) runs 40 seconds, one decision per simulated second: the number of decisions that sent
any query ("bursts") is bounded by what the cache lifetimes allow (failures back off 5, 10, 20 s;
NXDOMAIN/NODATA 30 s from the SOA; answers their clamped TTL), instead of one burst per decision.

The case table, the world of a case and the outcome check are in sollol_locality.testing.cases,
which the reliability benchmark runs too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from helpers import MinimalBalancer as Balancer
from helpers import Registry as _Registry
from helpers import offline_config

from sollol_locality import (
    ExecutionPlanner,
    NodeTopology,
)
from sollol_locality.testing.cases import (
    APIS,
    BOUND,
    CASES,
    TIMEOUT,
    WINDOW,
    ZONES,
    Case,
    build,
    check_outcome,
    nodes_for,
    timed,
)
from sollol_locality.testing.dnsserver import DnsTestServer


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(make_dns_server: Callable[..., DnsTestServer], case: Case, api: str) -> None:
    world = build(make_dns_server, case, api)
    result, elapsed = timed(world.decide)
    assert elapsed <= BOUND, f"{case.id}/{api}: first decision took {elapsed:.3f}s"
    check_outcome(world, case, api, result, case.resolved)
    stats = world.resolver.stats
    if "tcp" in case.checks:
        assert world.servers[0].count(case.name, transport="tcp") >= 1
        assert stats.tcp_queries >= 1
    if "ignored" in case.checks:
        assert stats.replies_ignored >= 1
    if api != "count":
        return

    # The cache, not the server, answers repeated decisions while nothing expires ...
    sent = world.queries
    for _ in range(20):
        world.clock.tick(0.01)
        _, elapsed = timed(world.decide)
        assert elapsed <= BOUND
    assert world.queries == sent, f"{case.id}: repeated decisions sent queries"

    # ... and over WINDOW seconds the server sees at most one burst per cache lifetime.
    bursts, worst = 0, 0.0
    for _ in range(WINDOW):
        world.clock.tick(1.0)
        before = world.queries
        _, elapsed = timed(world.decide)
        assert world.resolver.wait_idle(10)  # a serve-stale refresh runs in the background
        worst = max(worst, elapsed)
        if world.queries > before:
            bursts += 1
    assert worst <= BOUND, f"{case.id}: a repeated decision took {worst:.3f}s"
    assert bursts <= case.bursts, f"{case.id}: {bursts} decisions sent queries in {WINDOW}s"
    final = case.resolved if case.finally_resolved is None else case.finally_resolved
    check_outcome(world, case, api, world.decide(), final)


def test_enormous_ttl_is_clamped_to_an_hour(make_dns_server: Callable[..., DnsTestServer]) -> None:
    case = next(c for c in CASES if c.id == "ttl-enormous")
    world = build(make_dns_server, case, "count")
    assert world.decide() == 2
    sent = world.queries
    world.clock.tick(3599)
    assert world.decide() == 2
    assert world.resolver.wait_idle(10)
    assert world.queries == sent  # still fresh at 3599 s
    world.clock.tick(2)
    result, elapsed = timed(world.decide)
    assert result == 2 and elapsed <= BOUND  # served stale at once ...
    assert world.resolver.wait_idle(10)
    assert world.queries > sent  # ... while one background refresh asked again
    assert world.resolver.stats.refreshes == 1


def test_many_silent_names_share_one_deadline(make_dns_server: Callable[..., DnsTestServer]
                                              ) -> None:
    server = make_dns_server(ZONES)
    server.set_behaviour("silent")
    config = offline_config(nameservers=server.nameserver, dns_timeout=TIMEOUT, hosts_file=None,
                            use_unresolved=True)
    planner = ExecutionPlanner(config=config)
    nodes = [f"http://n{i}.f.test:11434" for i in range(40)] + ["http://localhost:11434"]
    plan, elapsed = timed(lambda: planner.plan(4, nodes))
    assert elapsed <= BOUND, f"40 silent names took {elapsed:.3f}s"
    assert plan.unique_hosts == 41 and plan.mode == "parallel"
    assert sum("could not be resolved" in w for w in plan.warnings) == 40


@pytest.mark.parametrize("api", APIS)
def test_default_construction_keeps_the_deadline(make_dns_server: Callable[..., DnsTestServer],
                                                 api: str) -> None:
    """Nothing injected: the components build their resolver from the configuration."""
    server = make_dns_server(ZONES)
    server.set_behaviour("silent")
    config = offline_config(nameservers=server.nameserver, dns_timeout=TIMEOUT, hosts_file=None,
                            use_unresolved=True)
    nodes = nodes_for("good.f.test")

    def decide() -> Any:
        if api == "plan":
            return ExecutionPlanner(config=config).plan(3, nodes)
        if api == "count":
            return NodeTopology(config).count_unique_hosts(nodes)
        return Balancer(_Registry(nodes), locality_config=config).should_parallelize(3)

    result, elapsed = timed(decide)
    assert elapsed <= BOUND, f"{api}: {elapsed:.3f}s"
    assert result in (3, True) or getattr(result, "unique_hosts", None) == 3
