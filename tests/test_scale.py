"""Memory and scale: bounded caches under churn, and a 10,000-node decision.

Short versions of the benchmarks/reliability.py scale section (which churns a million names and
reports the memory figures). Only bounds that are part of correctness are asserted here: a cache
never holds more than its maximum, every node of a big decision is accounted for.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import MinimalBalancer as Balancer
from helpers import Registry as _Registry
from helpers import offline_config, offline_topology

from sollol_locality import ExecutionPlanner, ParallelismCostModel
from sollol_locality.addresses import _parse_string
from sollol_locality.planner import _MEMO_MAX as PLANNER_MEMO_MAX
from sollol_locality.testing.dnsserver import DnsTestServer
from sollol_locality.testing.reliability import (
    big_decision,
    churn_over_dns,
    churn_resolver_cache,
    churn_topology,
)
from sollol_locality.topology import _MEMO_MAX as TOPOLOGY_MEMO_MAX


def test_resolver_cache_stays_within_maxsize_under_churn() -> None:
    result = churn_resolver_cache(20_000, maxsize=1000, batch=500, trace=False)
    assert result["largest_cache"] == result["final_cache"] == 1000
    assert result["newest_cached"] and not result["oldest_cached"]  # least recently used goes


def test_the_topology_memo_stays_within_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    from sollol_locality import topology

    monkeypatch.setattr(topology, "_MEMO_MAX", 1000)
    result = churn_topology(5_000, batch=250, trace=False)
    assert 1000 <= result["largest_memo"] <= 1001


def test_negative_answers_from_a_real_server_stay_within_maxsize(
        make_dns_server: Callable[..., DnsTestServer]) -> None:
    result = churn_over_dns(make_dns_server({}), 1_500, maxsize=200)
    assert result["statuses"] == {"nxdomain": 1_500}
    assert result["largest_cache"] == 200


def test_a_ten_thousand_node_decision(tmp_path: Path) -> None:
    # Without tracemalloc (the benchmark's memory figures are not asserted here): 5x faster.
    result = big_decision(10_000, workdir=tmp_path, trace=False)
    assert result["nodes"] == 10_000
    assert result["unique_hosts"] == result["expected_hosts"]
    assert result["mode"] == "parallel" and result["dispatch_to"] == 8
    assert result["same_again"]




def test_decision_caches_stay_bounded() -> None:
    config = offline_config()
    planner = ExecutionPlanner(offline_topology(), ParallelismCostModel(config), config)
    registry = _Registry()
    balancer = Balancer(registry, planner=planner)
    for i in range(3 * PLANNER_MEMO_MAX):
        registry.nodes = [f"http://10.{i >> 8 & 255}.{i & 255}.1:11434", "http://localhost:11434"]
        balancer.plan_execution(2)
    assert len(planner._memo) <= PLANNER_MEMO_MAX
    assert len(balancer.decider._last_logged) <= 257
    assert len(planner.topology._memo) <= TOPOLOGY_MEMO_MAX + 1
    assert _parse_string.cache_info().maxsize is not None  # the parse cache is bounded too
