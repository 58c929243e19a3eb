"""mixin and balancer: the decision inside real SOLLOL and SynapticLlamas-shaped balancers."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from helpers import OllamaNode, gpu_node, offline_config, timed_node

from sollol_locality import (
    ExecutionPlanner,
    LocalityAwareMixin,
    LocalityError,
    NodeTopology,
    ParallelismCostModel,
)
from sollol_locality.topology import ExecutionUnit


class Registry:
    """SynapticLlamas' NodeRegistry interface, reduced to what balancers call."""

    def __init__(self, nodes: list[Any]):
        self.nodes = nodes

    def get_healthy_nodes(self) -> list[Any]:
        return [n for n in self.nodes if getattr(getattr(n, "metrics", None), "is_healthy", True)]

    def get_gpu_nodes(self) -> list[Any]:
        return [n for n in self.nodes if getattr(n.capabilities, "has_gpu", False)]


class SynapticLlamasBalancer:
    """Shaped like SynapticLlamas' own SOLLOLLoadBalancer: its own constructor with keyword
    arguments, and no call to super().__init__()."""

    def __init__(self, registry: Registry, *, enable_learning: bool = True,
                 strategy: str = "intelligent"):
        self.registry = registry
        self.enable_learning = enable_learning
        self.strategy = strategy
        self.routed: list[Any] = []

    def route_request(self, payload: dict, agent_name: str = "x", priority: int = 5) -> Any:
        node = self.registry.get_healthy_nodes()[0]
        self.routed.append(node)
        return node  # a plain node, not a decision object: the mixin must pass it through


class LocalityAwareSynaptic(LocalityAwareMixin, SynapticLlamasBalancer):
    pass


@pytest.fixture
def config():
    return offline_config()


@pytest.fixture
def sollol_balancer(config):
    from sollol_locality import LocalityAwareLoadBalancer

    def build(nodes: list[Any]) -> Any:
        return LocalityAwareLoadBalancer(Registry(nodes), locality_config=config)

    return build


@pytest.fixture
def synaptic_balancer(config):
    def build(nodes: list[Any], **kwargs: Any) -> Any:
        return LocalityAwareSynaptic(Registry(nodes), enable_learning=False,
                                     locality_config=config, **kwargs)

    return build


@pytest.fixture(params=["sollol", "synapticllamas"])
def balancer(request, sollol_balancer, synaptic_balancer):
    return sollol_balancer if request.param == "sollol" else synaptic_balancer


def test_same_machine_is_sequential(balancer):
    lb = balancer([OllamaNode("http://localhost:11434"), OllamaNode("http://localhost:11435")])
    assert lb.should_parallelize(num_tasks=3) is False
    plan = lb.plan_execution(3)
    assert plan.mode == "sequential" and plan.nodes == [lb.registry.nodes[0]]


def test_distinct_machines_are_parallel_on_the_callers_objects(balancer):
    nodes = [OllamaNode("http://10.0.0.5:11434"), OllamaNode("http://10.0.0.6:11434")]
    lb = balancer(nodes)
    assert lb.should_parallelize(num_tasks=3) is True
    plan = lb.plan_execution(3)
    assert plan.nodes[0] is nodes[0] and plan.nodes[1] is nodes[1]


def test_three_nodes_on_two_machines_one_per_machine(balancer):
    nodes = [OllamaNode("http://localhost:11434"), OllamaNode("http://127.0.0.1:11435"),
             OllamaNode("http://10.0.0.5:11434")]
    plan = balancer(nodes).plan_execution(3)
    assert plan.mode == "parallel" and plan.nodes == [nodes[0], nodes[2]]


def test_two_gpus_with_devices_declared_are_parallel(balancer):
    nodes = [gpu_node("http://10.0.0.5:11434", "0"), gpu_node("http://10.0.0.5:11435", "1")]
    assert balancer(nodes).should_parallelize(2) is True


def test_one_node_ten_times_faster_is_sequential_on_it(balancer):
    fast, slow = timed_node("http://10.0.0.5:11434", 1.0), timed_node("http://10.0.0.6:11434", 10.0)
    plan = balancer([slow, fast]).plan_execution(3)
    assert plan.mode == "sequential" and plan.nodes == [fast]


@pytest.mark.parametrize(("mode", "expected"), [("parallel", True), ("sequential", False)])
def test_forced_modes(sollol_balancer, synaptic_balancer, mode, expected):
    same = [OllamaNode("http://localhost:11434"), OllamaNode("http://localhost:11435")]
    apart = [OllamaNode("http://10.0.0.5:11434"), OllamaNode("http://10.0.0.6:11434")]
    config = offline_config(mode=mode)
    for cls_nodes in (same, apart):
        lb = LocalityAwareSynaptic(Registry(cls_nodes), locality_config=config)
        assert lb.should_parallelize(2) is expected
        assert lb.plan_execution(2).forced


def test_an_unparsable_node_is_excluded_not_fatal(balancer, caplog):
    bad = OllamaNode("http://bad host:11434")
    nodes = [OllamaNode("http://10.0.0.5:11434"), bad, OllamaNode("http://10.0.0.6:11434")]
    with caplog.at_level(logging.WARNING, logger="sollol_locality"):
        plan = balancer(nodes).plan_execution(2)
    assert plan.mode == "parallel" and bad not in plan.nodes
    assert plan.excluded[0][0] is bad
    assert "left out: contains white space or control characters" in caplog.text


def test_one_task(balancer):
    lb = balancer([OllamaNode("http://10.0.0.5:11434"), OllamaNode("http://10.0.0.6:11434")])
    assert lb.should_parallelize(1) is False


def test_candidate_nodes_override_the_registry(balancer):
    lb = balancer([OllamaNode("http://localhost:11434")])
    assert lb.should_parallelize(2, ["10.0.0.5", "10.0.0.6"]) is True


def test_synaptic_constructor_keeps_its_keywords(synaptic_balancer):
    lb = synaptic_balancer([OllamaNode("http://10.0.0.5:11434")], strategy="fast")
    assert lb.strategy == "fast" and lb.enable_learning is False


def test_state_is_lazy_when_the_mixin_init_never_runs(config):
    class Direct(LocalityAwareMixin, SynapticLlamasBalancer):
        def __init__(self, registry: Registry) -> None:
            SynapticLlamasBalancer.__init__(self, registry)  # skips the mixin entirely

    lb = Direct(Registry([OllamaNode("http://10.0.0.5:11434"), OllamaNode("http://10.0.0.6:11434")]))
    assert "_locality_decider" not in lb.__dict__
    lb.__dict__["_locality_options"] = (config, None, None, None)
    assert lb.should_parallelize(2) is True
    assert isinstance(lb.topology, NodeTopology)


def test_given_components_are_used(config):
    topology = NodeTopology(config)
    model = ParallelismCostModel(config)
    planner = ExecutionPlanner(topology, model, config)
    lb = LocalityAwareSynaptic(Registry([]), planner=planner)
    assert lb.planner is planner and lb.topology is topology and lb.cost_model is model


def test_without_a_registry_the_error_says_what_to_do():
    class NoRegistry(LocalityAwareMixin):
        pass

    with pytest.raises(LocalityError, match="pass candidate_nodes explicitly"):
        NoRegistry().should_parallelize(2)


def test_logging_warns_naming_the_machine_once_then_debug(sollol_balancer, caplog):
    lb = sollol_balancer([OllamaNode("http://localhost:11434"), OllamaNode("http://localhost:11435")])
    with caplog.at_level(logging.DEBUG, logger="sollol_locality"):
        lb.should_parallelize(3)
        lb.should_parallelize(3)
    records = [r for r in caplog.records if r.name.startswith("sollol_locality.decider")]
    assert [r.levelname for r in records] == ["WARNING", "DEBUG"]
    assert records[0].getMessage() == (
        "parallel execution refused: 2 nodes share one machine (localhost); 3 tasks in parallel "
        "there are estimated at 0.60x, so they run sequentially")
    assert records[0].event == "parallel_decision"


def test_logging_info_when_parallel_is_enabled(sollol_balancer, caplog):
    lb = sollol_balancer([OllamaNode("http://10.0.0.5:11434"), OllamaNode("http://10.0.0.6:11434")])
    with caplog.at_level(logging.INFO, logger="sollol_locality"):
        lb.should_parallelize(2)
    assert ("parallel execution enabled: 2 tasks on 2 node(s) across 2 machine(s) "
            "(10.0.0.5, 10.0.0.6), estimated 1.90x speedup") in caplog.text


def test_record_execution_moves_the_model(sollol_balancer):
    lb = sollol_balancer([OllamaNode("http://localhost:11434"), OllamaNode("http://localhost:11435")])
    plan = lb.plan_execution(2)
    lb.record_execution(plan, 8.0)  # sequential, 2 tasks, 8 s
    assert lb.cost_model.measured_task_seconds(ExecutionUnit("localhost")) == pytest.approx(4.0)
    assert lb.plan_execution(2).time_unit == "seconds"


# -- SOLLOL's own methods ----------------------------------------------------------------------


def test_sollol_methods_answer_from_the_planner(sollol_balancer):
    same = sollol_balancer([OllamaNode("http://localhost:11434"),
                            OllamaNode("http://localhost:11435")])
    assert same.should_use_parallel() is False
    assert same.suggest_execution_mode() == "sequential"
    three = sollol_balancer([OllamaNode(f"http://10.0.0.{i}:11434") for i in (5, 6, 7)])
    assert three.should_use_parallel() is True
    assert three.suggest_execution_mode() == "parallel_multi_node"
    two = sollol_balancer([OllamaNode("http://10.0.0.5:11434"), OllamaNode("http://10.0.0.6:11434")])
    assert two.suggest_execution_mode() == "parallel"


def test_upstream_sollol_answers_differently_for_one_machine():
    """Documents the bug this library fixes: SOLLOL says parallel for two local instances."""
    from sollol.integration import SOLLOLLoadBalancer

    nodes = [OllamaNode("http://localhost:11434"), OllamaNode("http://localhost:11435")]
    assert SOLLOLLoadBalancer(Registry(nodes)).should_use_parallel() is True


# -- unit-aware routing ----------------------------------------------------------------------


def test_routing_moves_off_a_busy_unit_to_an_idle_one(sollol_balancer):
    local_a = OllamaNode("http://localhost:11434")
    local_b = OllamaNode("http://localhost:11435")
    remote = OllamaNode("http://10.0.0.5:11434")
    lb = sollol_balancer([local_a, local_b, remote])
    payload = {"prompt": "hi", "model": "llama3.2"}
    first = lb.route_request(payload)
    first_unit = lb.topology.describe(first.node).unit
    second = lb.route_request(payload)
    assert lb.topology.describe(second.node).unit != first_unit
    lb.record_performance(first, 10.0, True)
    lb.record_performance(second, 10.0, True)
    assert lb.decider.in_flight() == {}


def test_routing_reasoning_says_why_it_moved(sollol_balancer):
    nodes = [OllamaNode("http://localhost:11434"), OllamaNode("http://localhost:11435"),
             OllamaNode("http://10.0.0.5:11434")]
    lb = sollol_balancer(nodes)
    # SOLLOL's router always prefers the first local node here; the mixin must move off it
    # while it is busy, skipping its sibling on the same CPU.
    lb.intelligence.select_optimal_node = lambda context, hosts: (
        nodes[0].url, {"score": 90.0, "reasoning": "pinned by the test"})
    first = lb.route_request({"prompt": "a"})
    second = lb.route_request({"prompt": "b"})
    assert first.node is nodes[0] and second.node is nodes[2]
    assert second.reasoning == (
        "pinned by the test Locality: moved from http://localhost:11434 (its execution unit "
        "localhost/cpu is busy with 1 request(s)) to http://10.0.0.5:11434 on an idle unit.")
    assert second.fallback_nodes[0] is nodes[0]
    lb.record_performance(first, 5.0, True)
    third = lb.route_request({"prompt": "c"})
    assert third.node is nodes[0]  # the local CPU is idle again


def test_routing_passes_through_plain_results(synaptic_balancer):
    lb = synaptic_balancer([OllamaNode("http://localhost:11434")])
    node = lb.route_request({"prompt": "x"})
    assert node is lb.registry.nodes[0]


def test_decisions_from_many_threads(sollol_balancer):
    lb = sollol_balancer([OllamaNode("http://localhost:11434"), OllamaNode("http://10.0.0.5:11434")])
    results: list[bool] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(200):
                results.append(lb.should_parallelize(2))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and set(results) == {True} and len(results) == 1600


def test_routing_waits_on_dns_for_at_most_one_deadline(make_dns_server):
    """The chosen node and its alternatives are described in one batch, under one deadline."""
    import time

    from sollol_locality import LocalityAwareLoadBalancer
    from sollol_locality.testing.dnsserver import soa

    server = make_dns_server({"slow.test": [soa()]})
    server.set_behaviour("silent")
    config = offline_config(nameservers=server.nameserver, dns_timeout=0.4, hosts_file=None)
    nodes = [OllamaNode(f"http://n{i}.slow.test:11434") for i in range(3)]
    lb = LocalityAwareLoadBalancer(Registry(nodes), locality_config=config)
    lb.intelligence.select_optimal_node = lambda context, hosts: (
        nodes[0].url, {"score": 90.0, "reasoning": "pinned"})
    lb.route_request({"prompt": "a"})  # one request in flight: the next one looks for idle units
    lb.intelligence.select_optimal_node = lambda context, hosts: (
        nodes[1].url, {"score": 90.0, "reasoning": "pinned"})  # a node not described yet
    start = time.monotonic()
    lb.route_request({"prompt": "b"})
    assert time.monotonic() - start <= 0.4 * 1.25


# -- the mixin on SOLLOL's own balancer ----------------------------------------------------------


def test_mixin_on_sollols_balancer_overrides_its_own_answers(config):
    """The README's ``class B(LocalityAwareMixin, SOLLOLLoadBalancer)``: three localhost nodes
    are one machine, so SOLLOL's own questions answer sequential too."""
    import inspect

    from sollol.integration import SOLLOLLoadBalancer

    class B(LocalityAwareMixin, SOLLOLLoadBalancer):
        pass

    nodes = [OllamaNode(f"http://localhost:{port}") for port in (11434, 11435, 11436)]
    b = B(Registry(nodes), locality_config=config)
    assert b.should_use_parallel() is False
    assert b.suggest_execution_mode() == "sequential"
    assert b.should_use_parallel(1) is False and b.suggest_execution_mode(num_tasks=3) == (
        "sequential")
    assert SOLLOLLoadBalancer(Registry(nodes)).should_use_parallel() is True  # upstream's answer

    remote = B(Registry([OllamaNode(f"http://10.0.0.{i}:11434") for i in (5, 6, 7)]),
               locality_config=config)
    assert remote.should_use_parallel() is True
    assert remote.suggest_execution_mode() == "parallel_multi_node"

    # Compatible with SOLLOL's signatures: every call SOLLOL accepts still works.
    for name in ("should_use_parallel", "suggest_execution_mode"):
        ours = inspect.signature(getattr(B, name)).parameters
        theirs = inspect.signature(getattr(SOLLOLLoadBalancer, name)).parameters
        assert list(ours)[:len(theirs)] == list(theirs)
        assert all(p.default is None for p in list(ours.values())[len(theirs):])


def test_a_base_without_sollols_questions_does_not_gain_them(synaptic_balancer):
    lb = synaptic_balancer([OllamaNode("http://localhost:11434")])
    assert not hasattr(lb, "should_use_parallel") and not hasattr(lb, "suggest_execution_mode")


def test_a_subclass_keeps_its_own_answer(config):
    from sollol.integration import SOLLOLLoadBalancer

    class Own(LocalityAwareMixin, SOLLOLLoadBalancer):
        def should_use_parallel(self) -> bool:
            return True

    lb = Own(Registry([OllamaNode("http://localhost:11434"), OllamaNode("http://localhost:11435")]),
             locality_config=config)
    assert lb.should_use_parallel() is True  # its own, not the mixin's
    assert lb.suggest_execution_mode() == "sequential"


def test_record_execution_with_timings_and_run_batch_delegate_to_the_planner(balancer):
    a, b = OllamaNode("http://10.0.0.1:11434"), OllamaNode("http://10.0.0.2:11434")
    lb = balancer([a, b])

    def call(node, task):
        if node is b:
            raise ConnectionError("refused")
        return task * 10

    assert lb.plan_execution(3).nodes == [a, b]
    assert lb.run_batch(range(3), call) == [0, 10, 20]  # b failed: a did everything
    assert lb.decider.health is lb.planner.health and lb.planner.health.is_failed(b)
    assert lb.plan_execution(2).nodes == [a]
    assert list(lb.cost_model.calibration.task_seconds) == ["10.0.0.1/cpu"]  # run() recorded

    lb.planner.health.forget(b)
    plan = lb.plan_execution(2)
    lb.record_execution(plan, 3.0, timings=[(a, 0.0, 1.0), (b, 0.0, 3.0)])
    assert list(lb.cost_model.calibration.task_seconds["10.0.0.2/cpu"]) == [3.0]
    with pytest.raises(ValueError, match=r"^timings has 1 entries"):
        lb.record_execution(plan, 3.0, timings=[(a, 0.0, 1.0)])
