"""Hostile and odd input: every node either parses to the documented NodeAddress or raises
InvalidNodeAddress naming it; decisions never raise for one bad node.

tests/test_addresses.py covers the documented shapes and the basic error table; this file adds the
odd and hostile inputs (numbers, bytes, whitespace, 10,000-character names, labels over 63 bytes,
internationalised names, bad ports in every shape, credentials/paths/queries/fragments, mappings
missing keys, objects whose attributes raise) and Hypothesis properties over all of them at the
parser, topology, planner and balancer levels.

Name resolution here goes to an in-memory resolver (no packet at all), so thousands of random
names cost nothing. The tables, that world and the bodies of the properties are in
sollol_locality.testing.cases and .properties, which the reliability benchmark runs with many
more examples; ``SOLLOL_LOCALITY_HYPOTHESIS_EXAMPLES`` raises the example counts here.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

import pytest
from helpers import MinimalBalancer as Balancer
from helpers import OllamaNode
from helpers import Registry as _Registry
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sollol_locality import InvalidNodeAddress, parse_node_address
from sollol_locality.testing.cases import INVALID, PLANNER, VALID
from sollol_locality.testing.cases import case_id as _id
from sollol_locality.testing.cases import shown as _shown
from sollol_locality.testing.properties import (
    NODES,
    check_balancer,
    check_decision,
    check_grouping,
    check_parse,
)

EXAMPLES = int(os.environ.get("SOLLOL_LOCALITY_HYPOTHESIS_EXAMPLES", "200"))

_settings = settings(max_examples=EXAMPLES, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


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


@_settings
@given(node=NODES)
def test_any_input_parses_or_raises_invalid_node_address(node: Any) -> None:
    check_parse(node)


@_settings
@given(nodes=st.lists(NODES, max_size=8), tasks=st.integers(0, 9), data=st.data())
def test_a_decision_never_raises_and_accounts_for_every_node(nodes: list[Any], tasks: int,
                                                             data: st.DataObject) -> None:
    check_decision(nodes, tasks, data)


@_settings
@given(nodes=st.lists(NODES, max_size=8), tasks=st.integers(0, 5))
def test_the_balancer_never_raises_for_bad_nodes(nodes: list[Any], tasks: int) -> None:
    check_balancer(nodes, tasks)


@_settings
@given(nodes=st.lists(NODES, max_size=10), data=st.data())
def test_group_by_locality_is_a_partition_independent_of_order(nodes: list[Any],
                                                               data: st.DataObject) -> None:
    check_grouping(nodes, data)
