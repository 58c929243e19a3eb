"""decider: one object behind every adapter; in-flight accounting that cannot leak."""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, field
from typing import Any

import pytest
from helpers import FakeClock, OllamaNode, offline_config

from sollol_locality import ExecutionPlanner, LocalityAwareMixin
from sollol_locality.decider import (
    DEFAULT_TIMEOUT_FACTOR,
    DEFAULT_TIMEOUT_FLOOR,
    Decider,
    attached_decider,
)
from sollol_locality.topology import ExecutionUnit

LOCAL = ExecutionUnit("localhost")
REMOTE = ExecutionUnit("10.0.0.5")


@dataclass(eq=True)  # eq makes it unhashable, as SOLLOL's RoutingDecision is
class Decision:
    """Shaped like ``sollol.integration.RoutingDecision``."""

    node: Any
    reasoning: str = "base"
    fallback_nodes: list[Any] = field(default_factory=list)


class Sealed:
    """A decision that can neither be weakly referenced nor carry an extra attribute."""

    __slots__ = ("node",)

    def __init__(self, node: Any) -> None:
        self.node = node


class PinnedBase:
    """A router that always picks its first node and offers the others as fallbacks."""

    def __init__(self, nodes: list[Any], make: Any = None) -> None:
        self.nodes = nodes
        self.make = make or (lambda node, rest: Decision(node, fallback_nodes=rest))
        self.reported: list[Any] = []

    def route_request(self, payload: dict[str, Any]) -> Any:
        return self.make(self.nodes[0], list(self.nodes[1:]))

    def record_performance(self, decision: Any, duration_ms: float, success: bool) -> None:
        self.reported.append(decision)


class Balancer(LocalityAwareMixin, PinnedBase):
    pass


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def nodes() -> list[OllamaNode]:
    return [OllamaNode("http://localhost:11434"), OllamaNode("http://10.0.0.5:11434")]


def balancer(nodes: list[Any], clock: FakeClock, **options: Any) -> Balancer:
    return Balancer(nodes, decider=Decider(offline_config(), clock=clock, **options))


def test_a_thousand_unreported_requests_end_at_their_timeout(nodes, clock) -> None:
    lb = balancer(nodes, clock)
    routed = [lb.route_request({"prompt": str(i)}) for i in range(1000)]
    assert routed[0].node is nodes[0] and routed[1].node is nodes[1]  # moved off the busy CPU
    assert lb.decider.in_flight() == {LOCAL: 999, REMOTE: 1}
    clock.tick(DEFAULT_TIMEOUT_FLOOR - 1)
    assert lb.decider.in_flight() == {LOCAL: 999, REMOTE: 1}  # not yet: a generous timeout
    clock.tick(1)
    assert lb.decider.in_flight() == {}

    # Routing works as on a fresh balancer: the second request moves off the busy unit again.
    first, second = lb.route_request({"prompt": "a"}), lb.route_request({"prompt": "b"})
    assert (first.node, second.node) == (nodes[0], nodes[1])
    assert second.reasoning == (
        "base Locality: moved from http://localhost:11434 (its execution unit localhost/cpu is "
        "busy with 1 request(s)) to http://10.0.0.5:11434 on an idle unit.")
    lb.record_performance(first, 5.0, True)
    lb.record_performance(second, 5.0, True)
    assert lb.decider.in_flight() == {}
    assert routed  # the thousand decisions were alive throughout: only the clock ended them


def test_a_thousand_unreported_requests_end_when_their_decisions_are_collected(
        nodes, clock) -> None:
    lb = balancer(nodes, clock)
    routed = [lb.route_request({"prompt": str(i)}) for i in range(1000)]
    assert lb.decider.in_flight() == {LOCAL: 999, REMOTE: 1}
    del routed
    gc.collect()
    assert lb.decider.in_flight() == {}  # no time passed: garbage collection ended them

    first, second = lb.route_request({"prompt": "a"}), lb.route_request({"prompt": "b"})
    assert (first.node, second.node) == (nodes[0], nodes[1])


def test_a_reported_request_ends_once(nodes, clock) -> None:
    lb = balancer(nodes, clock)
    first, second = lb.route_request({}), lb.route_request({})
    lb.record_performance(first, 1.0, True)
    lb.record_performance(first, 1.0, True)  # reported twice: still one end
    assert lb.decider.in_flight() == {REMOTE: 1}
    del first
    gc.collect()  # its finalizer was detached when it was reported
    clock.tick(DEFAULT_TIMEOUT_FLOOR)
    assert lb.decider.in_flight() == {}
    assert len(lb.reported) == 2 and second.node is nodes[1]


def test_a_decision_that_cannot_be_weakly_referenced(nodes, clock) -> None:
    with pytest.raises(TypeError):
        weakref.ref(Sealed(nodes[0]))
    lb = Balancer(nodes, lambda node, rest: Sealed(node),
                  decider=Decider(offline_config(), clock=clock))
    kept, dropped = lb.route_request({}), lb.route_request({})
    assert lb.decider.in_flight() == {LOCAL: 2}  # sealed: it cannot be moved either
    lb.record_performance(kept, 1.0, True)  # found among the open tokens by identity
    assert lb.decider.in_flight() == {LOCAL: 1}
    del dropped
    gc.collect()
    assert lb.decider.in_flight() == {LOCAL: 1}  # kept by its token until the timeout...
    clock.tick(DEFAULT_TIMEOUT_FLOOR)
    assert lb.decider.in_flight() == {}  # ... which ends it


def test_the_timeout_is_a_multiple_of_the_predicted_time(nodes, clock) -> None:
    lb = balancer([nodes[0]], clock)
    plan = lb.plan_execution(2, [nodes[0]])
    lb.record_execution(plan, 200.0)  # sequential, 2 tasks: 100 s a task on this unit
    assert lb.cost_model.measured_task_seconds(LOCAL) == pytest.approx(100.0)
    held = lb.route_request({})  # kept alive: only the clock may end it
    clock.tick(100.0 * DEFAULT_TIMEOUT_FACTOR - 1)
    assert lb.decider.in_flight() == {LOCAL: 1}
    clock.tick(1)
    assert lb.decider.in_flight() == {} and held.node is nodes[0]


@pytest.mark.parametrize(("options", "message"), [
    ({"timeout_factor": 0}, "timeout_factor=0: expected a positive number of seconds"),
    ({"timeout_floor": -1.0}, "timeout_floor=-1.0: expected a positive number of seconds"),
    ({"timeout_floor": True}, "timeout_floor=True: expected a positive number of seconds"),
])
def test_bad_timeouts_are_value_errors(options, message) -> None:
    with pytest.raises(ValueError) as caught:
        Decider(offline_config(), **options)
    assert str(caught.value) == message


def test_non_decisions_are_not_counted(clock) -> None:
    decider = Decider(offline_config(), clock=clock)
    plain = OllamaNode("http://localhost:11434")  # has no .node: not a routing decision
    assert decider.route(plain, list) is plain
    assert decider.in_flight() == {}


def test_one_decider_per_adapter_created_once(nodes) -> None:
    class Direct(LocalityAwareMixin, PinnedBase):
        def __init__(self, nodes: list[Any]) -> None:
            PinnedBase.__init__(self, nodes)  # never reaches the mixin's __init__

    lb = Direct(nodes)
    assert "_locality_decider" not in lb.__dict__
    decider = attached_decider(lb)
    assert lb.decider is decider and lb.planner is decider.planner
    assert lb.topology is decider.topology and lb.cost_model is decider.cost_model


def test_given_planner_is_shared_and_not_closed(clock) -> None:
    config = offline_config()
    planner = ExecutionPlanner(config=config)
    decider = Decider(planner=planner, clock=clock)
    assert decider.planner is planner and not decider.owns_topology
    assert Decider(config).owns_topology


def test_a_decision_reported_to_another_decider_ends_nothing_there(nodes, clock) -> None:
    ours, theirs = balancer(nodes, clock), balancer(nodes, clock)
    mine, other = ours.route_request({}), theirs.route_request({})
    theirs.record_performance(mine, 1.0, True)  # not routed by `theirs`: its count stays
    assert theirs.decider.in_flight() == {LOCAL: 1}
    ours.record_performance(mine, 1.0, True)
    theirs.record_performance(other, 1.0, True)
    assert ours.decider.in_flight() == theirs.decider.in_flight() == {}
