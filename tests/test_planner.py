"""planner: the mode decision, the nodes to dispatch to, and the reasons."""

from __future__ import annotations

import copy

import pytest
from helpers import OllamaNode, gpu_node, offline_config, offline_topology, timed_node
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sollol_locality import ExecutionPlan, ExecutionPlanner, ParallelismCostModel, PlanDetail


@pytest.fixture(scope="module")
def topology():
    return offline_topology()


def planner_for(topology, **config):
    cfg = offline_config(**config)
    return ExecutionPlanner(topology, ParallelismCostModel(cfg), cfg)


@pytest.fixture
def planner(topology):
    return planner_for(topology)


def test_same_machine_is_sequential_with_a_reason(planner):
    nodes = ["http://localhost:11434", "http://localhost:11435"]
    plan = planner.plan(3, nodes)
    assert plan.mode == "sequential" and not plan.forced
    assert plan.nodes == ["http://localhost:11434"]
    assert plan.unique_hosts == 1 and plan.units == 1
    assert plan.cause == "one-unit" and plan.shared_host == "localhost"
    assert plan.naive_speedup == pytest.approx(0.6)
    assert plan.reason == (
        "Sequential: all 2 nodes run on one machine (localhost) and share its CPU; 3 tasks in "
        "parallel there are predicted to run at 0.60x the speed of running them one after "
        "another on http://localhost:11434.")
    assert planner.select_mode(3, nodes) == "sequential"


def test_loopback_spellings_and_own_addresses_are_one_machine(planner):
    nodes = ["localhost:11434", "127.0.0.1:11435", "[::1]:11436", "0.0.0.0:11437",
             "[::ffff:127.0.0.1]:11438", "[::]:11439"]
    assert planner.plan(4, nodes).mode == "sequential"


def test_distinct_machines_are_parallel_on_the_callers_objects(planner):
    a, b = OllamaNode("http://10.0.0.5:11434"), OllamaNode("http://10.0.0.6:11434")
    plan = planner.plan(2, [a, b])
    assert plan.mode == "parallel"
    assert plan.nodes[0] is a and plan.nodes[1] is b
    assert plan.speedup > 1.0
    assert plan.tasks_per_node == [1, 1]
    assert plan.reason == ("Parallel: 2 tasks across 2 machines (10.0.0.5, 10.0.0.6), predicted "
                           "1.90x faster than one after another.")


def test_three_nodes_on_two_machines_use_one_per_machine(planner):
    nodes = ["http://localhost:11434", "http://localhost:11435", "http://10.0.0.5:11434"]
    plan = planner.plan(3, nodes)
    assert plan.mode == "parallel"
    assert plan.nodes == ["http://localhost:11434", "http://10.0.0.5:11434"]
    assert plan.unique_hosts == 2
    assert plan.hosts == {"localhost": nodes[:2], "10.0.0.5": nodes[2:]}
    assert "1 other node(s) would add contention or no speed and are left out" in plan.reason


def test_two_gpus_of_one_host_with_devices_declared_are_parallel(planner):
    nodes = [gpu_node("http://10.0.0.5:11434", "0"), gpu_node("http://10.0.0.5:11435", "1")]
    plan = planner.plan(2, nodes)
    assert plan.mode == "parallel"
    assert plan.nodes == nodes
    assert plan.unique_hosts == 1 and plan.units == 2
    assert "2 units of 10.0.0.5" in plan.reason


def test_two_gpu_nodes_without_devices_share_one_gpu(planner):
    nodes = [gpu_node("http://10.0.0.5:11434"), gpu_node("http://10.0.0.5:11435")]
    plan = planner.plan(2, nodes)
    assert plan.mode == "sequential"
    assert "share its GPU" in plan.reason


def test_one_node_ten_times_faster_runs_everything(planner):
    fast = timed_node("http://10.0.0.5:11434", 1.0)
    slow = timed_node("http://10.0.0.6:11434", 10.0)
    plan = planner.plan(3, [slow, fast])
    assert plan.mode == "sequential"
    assert plan.nodes == [fast]
    assert plan.cause == "fast-node"
    assert plan.reason.startswith("Sequential on http://10.0.0.5:11434: it is 10.0x faster")


def test_a_slow_unit_is_dropped_from_a_parallel_plan(planner):
    nodes = [timed_node("http://10.0.0.5:11434", 1.0), timed_node("http://10.0.0.6:11434", 1.0),
             timed_node("http://10.0.0.7:11434", 6.0)]
    plan = planner.plan(4, nodes)
    assert plan.mode == "parallel"
    assert plan.nodes == nodes[:2] and plan.tasks_per_node == [2, 2]


@pytest.mark.parametrize(("tasks", "reason"), [
    (1, "Sequential: a single task cannot run in parallel; it goes to http://10.0.0.5:11434."),
    (0, "Sequential: there are no tasks to run."),
])
def test_fewer_than_two_tasks_is_sequential(planner, tasks, reason):
    plan = planner.plan(tasks, ["http://10.0.0.5:11434", "http://10.0.0.6:11434"])
    assert plan.mode == "sequential" and plan.cause == "one-task"
    assert plan.reason == reason


def test_forced_parallel_wins_and_says_so(topology):
    planner = planner_for(topology, mode="parallel")
    nodes = ["http://localhost:11434", "http://localhost:11435"]
    plan = planner.plan(2, nodes)
    assert plan.mode == "parallel" and plan.forced
    assert plan.nodes == nodes
    assert "forced by configuration (SOLLOL_LOCALITY_MODE=parallel)" in plan.reason
    assert plan.warnings == ["forced parallel is predicted slower than sequential (0.50x)"]


def test_forced_sequential_wins_and_says_so(topology):
    planner = planner_for(topology, mode="sequential")
    plan = planner.plan(2, ["http://10.0.0.5:11434", "http://10.0.0.6:11434"])
    assert plan.mode == "sequential" and plan.forced
    assert plan.reason.startswith("Sequential forced by configuration")


def test_forced_mode_from_environment(topology, monkeypatch):
    monkeypatch.setenv("SOLLOL_LOCALITY_MODE", "sequential")
    from sollol_locality import LocalityConfig

    config = LocalityConfig.from_env(calibration_file=None, nameservers="127.0.0.1:9")
    planner = ExecutionPlanner(topology, ParallelismCostModel(config), config)
    assert planner.plan(2, ["10.0.0.5", "10.0.0.6"]).forced


def test_min_speedup_raises_the_bar(topology):
    planner = planner_for(topology, min_speedup=1.95)
    plan = planner.plan(2, ["10.0.0.5", "10.0.0.6"])
    assert plan.mode == "sequential" and plan.cause == "below-threshold"
    assert "not above the required 1.95x" in plan.reason


def test_an_unparsable_node_is_left_out_with_a_warning(planner):
    nodes = ["http://10.0.0.5:11434", "http://u:pw@bad:port", None, "http://10.0.0.6:11434"]
    plan = planner.plan(2, nodes)
    assert plan.mode == "parallel"
    assert plan.nodes == [nodes[0], nodes[3]]
    assert [n for n, _ in plan.excluded] == [nodes[1], None]
    assert plan.warnings == [
        "node 'http://***@bad:port' left out: invalid port 'port' (expected 1 to 65535)",
        "node None left out: expected a URL string, mapping or node object, got NoneType",
    ]
    assert "pw" not in repr(plan.to_dict())


def test_no_usable_node_gives_an_empty_sequential_plan(planner):
    plan = planner.plan(3, ["bad:port"])
    assert plan.mode == "sequential" and plan.nodes == [] and plan.cause == "no-nodes"
    assert planner.plan(3, []).reason == "No candidate nodes were given."


@pytest.mark.parametrize("tasks", [-1, 2.0, None])
def test_bad_task_count_is_a_clear_error(planner, tasks):
    with pytest.raises(ValueError, match="num_tasks must be a non-negative integer"):
        planner.plan(tasks, ["10.0.0.5"])


def test_cached_plans_are_independent_copies(planner):
    nodes = ["http://10.0.0.5:11434", "http://10.0.0.6:11434"]
    first = planner.plan(2, nodes)
    first.nodes.append("mutated")
    first.warnings.append("mutated")
    second = planner.plan(2, nodes)
    assert second.nodes == nodes and second.warnings == []


def test_cache_follows_node_metrics(planner):
    a, b = timed_node("http://10.0.0.5:11434", 1.0), timed_node("http://10.0.0.6:11434", 1.0)
    assert planner.plan(2, [a, b]).mode == "parallel"
    b.metrics.avg_response_time = 20.0
    assert planner.plan(2, [a, b]).mode == "sequential"


def test_plan_detail_is_public_frozen_and_aliased(planner):
    nodes = ["http://10.0.0.5:11434", "http://10.0.0.6:11434"]
    plan = planner.plan(2, nodes)
    detail = plan.detail
    assert isinstance(detail, PlanDetail)
    assert plan.cause == detail.cause == "parallel"
    assert plan.tasks_per_node == list(detail.tasks) == [1, 1]
    assert plan.concurrency_per_node == list(detail.concurrency) == [1, 1]
    assert plan.to_dict()["concurrency_per_node"] == [1, 1]
    assert [nodes[i] for i in detail.chosen] == plan.nodes
    with pytest.raises(AttributeError):
        detail.mode = "sequential"  # type: ignore[misc]
    sequential = planner.plan(3, ["http://localhost:11434", "http://localhost:11435"])
    assert sequential.concurrency_per_node == [1]


def test_plan_is_frozen():
    plan = ExecutionPlan("sequential", 1.0, [], 0, "r", [], False)
    with pytest.raises(AttributeError):
        plan.mode = "parallel"  # type: ignore[misc]


# -- invariants ----------------------------------------------------------------------------------

_POOL = (
    ["http://localhost:11434", "http://localhost:11435", "http://127.0.0.1:11436"]
    + [f"http://10.0.0.{i}:{p}" for i in range(1, 5) for p in (11434, 11435)]
)


def _alias(node):
    """Another spelling of the same instance, carrying the same figures."""
    if isinstance(node, dict):
        alias = dict(node)
        alias["url"] = _alias(node["url"])
        return alias
    if isinstance(node, OllamaNode):
        alias = copy.deepcopy(node)
        alias.url = _alias(node.url)
        return alias
    if "localhost" in node:
        return node.replace("localhost", "127.0.0.1")
    if "127.0.0.1" in node:
        return node.replace("127.0.0.1", "[::1]")
    host = node.split("//")[1].split(":")[0]
    return node.replace(host, f"[::ffff:{host}]")


@st.composite
def _nodes(draw):
    urls = draw(st.lists(st.sampled_from(_POOL), min_size=1, max_size=7, unique=True))
    nodes = []
    for url in urls:
        kind = draw(st.sampled_from(["str", "timed", "gpu", "dict"]))
        if kind == "str":
            nodes.append(url)
        elif kind == "timed":
            nodes.append(timed_node(url, draw(st.sampled_from([0.5, 1.0, 2.0, 8.0]))))
        elif kind == "gpu":
            nodes.append(gpu_node(url, draw(st.sampled_from([None, "0", "1"]))))
        else:
            nodes.append({"url": url, "latency_ms": draw(st.sampled_from([500, 1000, 4000])),
                          "total_requests": 5})
    return nodes


_settings = settings(max_examples=150, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@_settings
@given(nodes=_nodes(), tasks=st.integers(0, 9))
def test_plan_nodes_are_candidates_with_at_most_one_per_unit(planner, nodes, tasks):
    plan = planner.plan(tasks, nodes)
    assert all(any(n is c for c in nodes) for n in plan.nodes)
    units = [i.unit for i in plan.identities]
    assert len(units) == len(set(units)) == len(plan.nodes)
    assert plan.mode == "sequential" or len(plan.nodes) >= 2
    # every node given comes back, grouped or excluded
    grouped = [n for members in plan.hosts.values() for n in members]
    assert len(grouped) + len(plan.excluded) == len(nodes)


@_settings
@given(nodes=_nodes(), tasks=st.integers(0, 9))
def test_speedup_never_exceeds_the_number_of_units(planner, nodes, tasks):
    plan = planner.plan(tasks, nodes)
    assert plan.speedup <= max(1, plan.units) + 1e-9
    assert plan.naive_speedup <= max(1, plan.units) + 1e-9


@_settings
@given(nodes=_nodes(), tasks=st.integers(0, 9), data=st.data())
def test_adding_an_alias_never_changes_the_decision(planner, nodes, tasks, data):
    original = planner.plan(tasks, nodes)
    alias = _alias(data.draw(st.sampled_from(nodes)))
    position = data.draw(st.integers(0, len(nodes)))
    with_alias = planner.plan(tasks, nodes[:position] + [alias] + nodes[position:])
    assert with_alias.mode == original.mode
    assert with_alias.speedup == pytest.approx(original.speedup)
    assert with_alias.unique_hosts == original.unique_hosts
    assert ({i.unit for i in with_alias.identities} == {i.unit for i in original.identities})


@_settings
@given(nodes=_nodes(), tasks=st.integers(0, 9), data=st.data())
def test_decision_does_not_depend_on_input_order(planner, nodes, tasks, data):
    shuffled = data.draw(st.permutations(nodes))
    a, b = planner.plan(tasks, nodes), planner.plan(tasks, shuffled)
    assert a.mode == b.mode
    assert a.speedup == pytest.approx(b.speedup)
    assert {h: len(v) for h, v in a.hosts.items()} == {h: len(v) for h, v in b.hosts.items()}


# -- running a plan, recording it, and what decisions leave out (issue 13) ----------------------

A, B = "http://10.0.0.1:11434", "http://10.0.0.2:11434"


def clocked_planner(**config):
    from helpers import FakeClock

    clock = FakeClock()
    cfg = offline_config(**config)
    return ExecutionPlanner(offline_topology(), ParallelismCostModel(cfg), cfg, clock=clock), clock


@pytest.mark.parametrize(("timings", "message"), [
    ([(A, 0.0, 1.0)], "timings has 1 entries, expected one per task of the plan (2)"),
    ([(A, 0.0, 1.0), (B, 2.0, 1.0)],
     "timings[1] = ('http://10.0.0.2:11434', 2.0, 1.0) is not (node, start_s, end_s) with "
     "0 <= start_s <= end_s"),
    ([(A, -1, 1.0), (B, 0, 1.0)],
     "timings[0] = ('http://10.0.0.1:11434', -1, 1.0) is not (node, start_s, end_s) with "
     "0 <= start_s <= end_s"),
    ([(A, 0, 1.0), (B, 0, "1")],
     "timings[1] = ('http://10.0.0.2:11434', 0, '1') is not (node, start_s, end_s) with "
     "0 <= start_s <= end_s"),
    ([(A, 0, float("inf")), (B, 0, 1.0)],
     "timings[0] = ('http://10.0.0.1:11434', 0, inf) is not (node, start_s, end_s) with "
     "0 <= start_s <= end_s"),
    ([(A, 0, 1.0), "B"], "timings[1] = 'B' is not (node, start_s, end_s) with "
     "0 <= start_s <= end_s"),
    ([(A, 0, 1.0), ("ftp://x", 0, 1.0)],
     "timings[1]: node 'ftp://x' cannot be parsed: unsupported scheme 'ftp' (expected http or "
     "https)"),
])
def test_record_execution_refuses_timings_that_cannot_be(planner, timings, message):
    plan = planner.plan(2, [A, B])
    with pytest.raises(ValueError) as caught:
        planner.record_execution(plan, 1.0, timings=timings)
    assert str(caught.value) == message
    assert planner.cost_model.observations == 0


def test_per_task_times_teach_each_units_solo_time(planner):
    plan = planner.plan(4, [A, B])
    assert plan.mode == "parallel"
    planner.record_execution(plan, 6.0, timings=[(A, 0.0, 1.0), (B, 0.0, 3.0),
                                                 (A, 1.0, 2.0), (B, 3.0, 6.0)])
    cal = planner.cost_model.calibration
    assert {k: list(v) for k, v in cal.task_seconds.items()} == {"10.0.0.1/cpu": [1.0],
                                                                 "10.0.0.2/cpu": [3.0]}
    after = planner.plan(4, [A, B])
    assert after.time_unit == "seconds" and after.tasks_per_node == [3, 1]


def test_per_task_times_teach_contention_from_how_the_tasks_overlapped(planner):
    one, two = "http://10.0.0.1:11434", "http://10.0.0.1:11435"  # two instances of one CPU
    solo = planner.plan(1, [one])
    planner.record_execution(solo, 1.0, timings=[(one, 0.0, 1.0)])
    plan = planner.plan(2, [one, two])
    # both ran together the whole time and took 3x their solo time: 1.5x the 2x of sharing
    planner.record_execution(plan, 3.0, timings=[(one, 0.0, 3.0), (two, 0.0, 3.0)])
    contention = planner.cost_model.calibration.contention["10.0.0.1/cpu"]
    assert {k: list(v) for k, v in contention.items()} == {2: [0.5]}


def test_timings_that_do_not_match_the_plan_teach_only_per_task_times(planner):
    plan = planner.plan(2, [A, B])
    # B failed; both tasks ran on A, one after the other
    planner.record_execution(plan, 2.0, timings=[(A, 0.0, 1.0), (A, 1.0, 2.0)])
    cal = planner.cost_model.calibration
    assert {k: list(v) for k, v in cal.task_seconds.items()} == {"10.0.0.1/cpu": [1.0]}
    assert not cal.dispatch


def test_a_failing_node_is_left_out_of_the_next_decision_with_its_reason():
    planner, clock = clocked_planner()

    def call(node, task):
        if node == B:
            raise ConnectionError("refused")
        return (task, node)

    results = planner.run(range(4), call, [A, B])
    assert results == [(t, A) for t in range(4)]
    clock.tick(3)
    plan = planner.plan(4, [A, B])
    assert plan.nodes == [A] and plan.excluded == [
        (B, "failed 3s ago (ConnectionError: refused); left out until its back-off ends in 7s")]
    assert plan.reason == ("Sequential: only one node (http://10.0.0.1:11434) is available; "
                           "1 node left out (1 failed recently).")
    assert plan.warnings == ["node http://10.0.0.2:11434 left out: it failed 3s ago "
                             "(ConnectionError: refused)"]
    assert [h for h in plan.hosts] == ["10.0.0.1"]
    clock.tick(7)  # the back-off is over: B is planned over again
    assert planner.plan(4, [A, B]).nodes == [A, B]


def test_an_alias_of_a_failed_instance_is_left_out_with_it():
    planner, _ = clocked_planner()
    planner.health.record_failure(A, ConnectionError("refused"))
    alias = "http://10.0.0.1:11434/"
    plan = planner.plan(2, [alias, B])
    assert plan.nodes == [B] and [n for n, _ in plan.excluded] == [alias]


def test_when_every_candidate_is_in_back_off_the_plan_goes_over_all_of_them():
    planner, _ = clocked_planner()
    for node in (A, B):
        planner.health.record_failure(node, ConnectionError("refused"))
    plan = planner.plan(2, [A, B])
    assert plan.mode == "parallel" and plan.nodes == [A, B] and plan.excluded == []
    assert plan.warnings == ["every candidate failed recently (2 in back-off); planning over "
                             "all of them"]


def test_run_with_every_node_failing_raises_one_error_and_records_nothing_wrong():
    from sollol_locality._errors import DispatchError

    planner, _ = clocked_planner()

    def call(node, task):
        raise ConnectionError(f"{node} down")

    with pytest.raises(DispatchError) as caught:
        planner.run(range(3), call, [A, B])
    assert str(caught.value).startswith("3 of 3 tasks got no result: every node failed; "
                                        "failed nodes: ")
    assert planner.cost_model.observations == 0
    assert planner.run([], call, [A, B]) == []


def test_an_unresolved_name_gets_no_work_while_resolved_nodes_exist(planner):
    name = "http://nosuch.test:11434"
    plan = planner.plan(4, [name, A, B])
    assert plan.nodes == [A, B] and plan.excluded == [(name, (
        "its host name 'nosuch.test' did not resolve, so it gets no work while resolved nodes "
        "are available (use_unresolved=True or SOLLOL_LOCALITY_USE_UNRESOLVED=1 plans over "
        "it)"))]
    assert plan.reason.endswith("; 1 node left out (1 did not resolve).")
    assert plan.warnings == ["node http://nosuch.test:11434 left out: host 'nosuch.test' could "
                             "not be resolved (timeout: nosuch.test: no reply from 127.0.0.1:9 "
                             "before the deadline)"]
    # only unresolved names: they are planned over (there is nothing else)
    only = planner.plan(2, [name, "http://other.test:11434"])
    assert only.mode == "parallel" and only.excluded == []


def test_use_unresolved_keeps_the_first_releases_behaviour(topology):
    planner = planner_for(topology, use_unresolved=True)
    name = "http://nosuch.test:11434"
    plan = planner.plan(3, [name, A, B])
    assert plan.excluded == [] and len(plan.nodes) == 3
    assert any(w.startswith("host 'nosuch.test' could not be resolved (timeout: ")
               and w.endswith("; it is treated as a separate machine") for w in plan.warnings)


def test_a_failed_batch_still_teaches_what_did_run():
    from sollol_locality._errors import DispatchError

    planner, _ = clocked_planner()

    def call(node, task):
        if node == B:
            raise ConnectionError("refused")
        return task

    with pytest.raises(DispatchError) as caught:
        planner.run(range(4), call, [A, B], max_attempts=1)
    # task 1 failed on B and had no attempt left; B's queued task 3 moved to A
    assert caught.value.failed_tasks == (1,) and caught.value.results == (0, None, 2, 3)
    assert planner.cost_model.observations == 1
    assert list(planner.cost_model.calibration.task_seconds) == ["10.0.0.1/cpu"]
# -- slots: several tasks at once on an instance that batches them -----------------------------

ONE = "http://10.0.0.5:11434"
OTHER = "http://10.0.0.6:11434"


def slotted(url, slots, latency_ms=1000, **extra):
    """A node mapping declaring its slots (``num_parallel``) and a trusted latency."""
    return {"url": url, "num_parallel": slots, "latency_ms": latency_ms, "total_requests": 5,
            **extra}


def test_all_tasks_on_one_node_when_it_batches(planner):
    plan = planner.plan(5, [{"url": ONE, "num_parallel": 4}])
    assert plan.mode == "parallel" and plan.cause == "parallel" and not plan.forced
    assert plan.nodes == [{"url": ONE, "num_parallel": 4}]
    assert plan.tasks_per_node == [5] and plan.concurrency_per_node == [4]
    assert plan.slots_per_node == [4]
    # 4 at once (1 + 3 * 0.35 task-times at the CPU prior), then the fifth alone.
    assert plan.predicted_seconds == pytest.approx(3.05)
    assert plan.reason == (f"Parallel: 5 tasks at once on {ONE}, which batches 4: predicted "
                           "1.64x.")
    data = plan.to_dict()
    assert data["concurrency_per_node"] == [4]
    assert data["batching_per_node"] == [{"slots": 4, "slots_source": "node", "curve": "prior"}]


def test_two_batching_instances_of_one_machine_one_holds_every_task(planner):
    nodes = [{"url": "http://localhost:11434", "num_parallel": 4},
             {"url": "http://localhost:11435", "num_parallel": 4}]
    plan = planner.plan(8, nodes)
    assert plan.mode == "parallel" and plan.nodes == [nodes[0]]
    assert plan.tasks_per_node == [8] and plan.concurrency_per_node == [4]
    assert plan.speedup == pytest.approx(8 / (2 * 2.05))


def test_a_batching_node_beside_a_plain_one_takes_most_tasks(planner):
    nodes = [slotted(ONE, 4), slotted(OTHER, 1)]
    plan = planner.plan(20, nodes)
    # 13 on the batching node: 3 rounds of 4 (2.05 s each) and 1 alone, 7.15 s; 7 one by one
    # on the plain node, 7 s; both machines pay the 5% dispatch overhead.
    assert plan.mode == "parallel" and plan.nodes == nodes
    assert plan.tasks_per_node == [13, 7] and plan.concurrency_per_node == [4, 1]
    assert plan.predicted_seconds == pytest.approx(7.15 * 1.05)
    assert plan.reason == (f"Parallel: 20 tasks across 2 instances: 13 on {ONE} (4 at a time), "
                           f"7 on {OTHER}; predicted {20 / (7.15 * 1.05):.2f}x.")
    assert [b["curve"] for b in plan.to_dict()["batching_per_node"]] == ["prior", "none"]


def test_declared_slots_come_from_the_topology_file(tmp_path):
    path = tmp_path / "topology.toml"
    path.write_text(f'[nodes."{ONE}"]\nnum_parallel = 4\n')
    cfg = offline_config(topology_file=path)
    plan = ExecutionPlanner(config=cfg, cost_model=ParallelismCostModel(cfg)).plan(5, [ONE])
    assert plan.mode == "parallel" and plan.concurrency_per_node == [4]
    assert plan.to_dict()["batching_per_node"][0]["slots_source"] == "topology file"


@pytest.mark.parametrize("nodes", [
    [ONE, OTHER], [ONE, "http://localhost:11434"], [slotted(ONE, 1), slotted(OTHER, 1)],
    ["http://localhost:11434", "http://localhost:11435"],
])
def test_one_slot_declared_plans_as_no_slot_declared(planner, nodes):
    declared = [slotted(n, 1) if isinstance(n, str) else n for n in nodes]
    plain = [dict(n, num_parallel=None) if isinstance(n, dict) else n for n in nodes]
    for tasks in (2, 3, 7):
        a, b = planner.plan(tasks, declared), planner.plan(tasks, plain)
        assert (a.mode, a.reason, a.tasks_per_node, a.speedup) == (
            b.mode, b.reason, b.tasks_per_node, b.speedup)
        assert a.concurrency_per_node == [1] * len(a.nodes)


def test_slots_on_a_node_object_are_part_of_the_cached_decision(planner):
    node = OllamaNode(ONE)
    assert planner.plan(5, [node]).mode == "sequential"
    node.num_parallel = 4  # type: ignore[attr-defined]
    assert planner.plan(5, [node]).concurrency_per_node == [4]


def test_forced_parallel_sends_several_at_once_to_a_batching_node(topology):
    planner = planner_for(topology, mode="parallel")
    plan = planner.plan(6, [slotted(ONE, 4), slotted(OTHER, 1)])
    assert plan.forced and plan.mode == "parallel"
    assert sum(plan.tasks_per_node) == 6 and plan.concurrency_per_node[0] > 1


def test_a_billion_tasks_plan_with_exact_counts(planner):
    nodes = [slotted(f"http://10.0.1.{i}:11434", s, latency) for i, (s, latency) in
             enumerate([(4, 900), (1, 1000), (8, 1500), (2, 1100)])]
    plan = planner.plan(10**9, nodes)
    assert plan.mode == "parallel" and sum(plan.tasks_per_node) == 10**9
    assert all(1 <= c <= s for c, s in zip(plan.concurrency_per_node, plan.slots_per_node,
                                           strict=True))


@st.composite
def _slotted_nodes(draw):
    urls = draw(st.lists(st.sampled_from(_POOL), min_size=1, max_size=6, unique=True))
    nodes = []
    for url in urls:
        node = {"url": url, "num_parallel": draw(st.sampled_from([1, 1, 2, 4, 8]))}
        if draw(st.booleans()):
            node.update(latency_ms=draw(st.sampled_from([250, 1000, 4000])), total_requests=5)
        if draw(st.booleans()):
            node["gpu"] = draw(st.sampled_from(["0", "1"]))
        nodes.append(node)
    return nodes


@_settings
@given(nodes=_slotted_nodes(), tasks=st.one_of(st.integers(0, 40), st.integers(10**6, 10**12)),
       min_speedup=st.sampled_from([1.0, 1.2]))
def test_planned_makespan_and_counts_with_slots(topology, nodes, tasks, min_speedup):
    plan = planner_for(topology, min_speedup=min_speedup).plan(tasks, nodes)
    assert sum(plan.tasks_per_node) == tasks
    assert len(plan.concurrency_per_node) == len(plan.slots_per_node) == len(plan.nodes)
    if plan.mode == "parallel":
        assert plan.predicted_seconds <= plan.sequential_seconds
        assert plan.speedup > min_speedup
        for n, c, s in zip(plan.tasks_per_node, plan.concurrency_per_node, plan.slots_per_node,
                           strict=True):
            assert 1 <= c <= min(n, s)
    else:
        assert plan.concurrency_per_node == [1] * len(plan.nodes)
