"""Running a plan (issue 13): ``ExecutionPlanner.run`` and the mixin's ``run_batch`` against
emulator nodes on loopback, each declared its own machine in a topology file.

Checked: every result comes back in task order; per-node concurrency (counted inside each
emulator, ``max_in_flight``) never exceeds the plan's; a node killed mid-batch has its tasks
finished elsewhere and is left out of the next decision with its reason; all nodes dead is one
clear exception; and a fresh planner learns from its own runs, so that its next plan moves to
what was measured. No test sleeps or times anything: the kill happens from the progress
callback, at a known point of the batch.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import offline_config

from sollol_locality import ExecutionPlanner
from sollol_locality._dispatch import DispatchEvent
from sollol_locality._errors import DispatchError
from sollol_locality.testing.emulator import (
    DEFAULT_MODEL,
    EmulatorProcess,
    emulator_stats,
    start_emulator,
)

TOKENS = 8
WEIGHTS_MB = 4
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def generate(node: Any, task: int, tokens: int = TOKENS) -> tuple[int, str]:
    """One real generate on ``node``; returns which task ran where."""
    url = node if isinstance(node, str) else node.url
    body = json.dumps({"model": DEFAULT_MODEL, "prompt": f"chunk {task}", "stream": False,
                       "options": {"num_predict": tokens}}).encode()
    request = urllib.request.Request(f"{url}/api/generate", data=body,
                                     headers={"Content-Type": "application/json"})
    with _NO_PROXY.open(request, timeout=60) as response:
        assert json.loads(response.read())["done"] is True
    return task, url


@pytest.fixture
def emulators() -> Iterator[Callable[..., list[EmulatorProcess]]]:
    started: list[EmulatorProcess] = []

    def start(count: int, **options: Any) -> list[EmulatorProcess]:
        procs = []
        for index in range(count):
            slowdown = options.get("slowdowns", [1.0] * count)[index]
            proc = start_emulator(weights_mb=options.get("weights_mb", WEIGHTS_MB),
                                  default_num_predict=TOKENS,
                                  slowdown=slowdown, backend="hashlib",
                                  taskset=[index] if options.get("pinned") else None)
            started.append(proc)
            procs.append(proc)
        return procs

    yield start
    for proc in started:
        proc.stop()


def pinned_file(tmp_path: Path, urls: list[str]) -> Path:
    """A topology file stating the CPU each (taskset-pinned) node runs on."""
    path = tmp_path / "topology.toml"
    path.write_text("".join(f'[nodes."{url}"]\ncpus = "{i}"\n\n'
                            for i, url in enumerate(urls)))
    return path


def planner_for(**fields: Any) -> ExecutionPlanner:
    """Loopback nodes are one machine: ``mode="parallel"`` makes the plan use each of them."""
    return ExecutionPlanner(config=offline_config(**{"mode": "parallel", **fields}))


def test_run_returns_every_result_in_order_within_each_nodes_concurrency(
        tmp_path: Path, emulators: Callable[..., list[EmulatorProcess]]) -> None:
    urls = [p.url for p in emulators(3)]
    planner = planner_for()
    plan = planner.plan(9, urls)
    assert plan.mode == "parallel" and sorted(plan.nodes) == sorted(urls)
    results = planner.run(range(9), generate, urls)
    assert [task for task, _ in results] == list(range(9))
    assert {url for _, url in results} == set(urls)
    for url, limit in zip(plan.nodes, plan.concurrency_per_node, strict=True):
        stats = emulator_stats(url)
        assert 1 <= stats["max_in_flight"] <= limit
    assert sum(emulator_stats(url)["served"] for url in urls) == 9
    assert planner.cost_model.observations == 1  # run() recorded the batch


def test_a_node_killed_mid_batch_its_tasks_finish_elsewhere_and_it_is_left_out_next(
        tmp_path: Path, emulators: Callable[..., list[EmulatorProcess]]) -> None:
    procs = emulators(3)
    urls = [p.url for p in procs]
    planner = planner_for()
    victim = procs[1]
    events: list[DispatchEvent] = []

    def on_event(event: DispatchEvent) -> None:
        events.append(event)
        if event.kind == "finished" and event.node == victim.url and victim.is_running():
            victim.stop()  # its first task is done; the next one meets a dead node

    results = planner.run(range(9), generate, urls, on_event=on_event)
    assert [task for task, _ in results] == list(range(9))  # nothing lost
    failed = [e for e in events if e.kind == "failed"]
    assert failed and {e.node for e in failed} == {victim.url}
    assert any(e.kind == "retried" and e.node != victim.url for e in events)
    ran_on_victim = [task for task, url in results if url == victim.url]
    assert len(ran_on_victim) == 1  # only the task before the kill
    assert planner.health.is_failed(victim.url)
    # the NEXT decision leaves it out, and says why
    after = planner.plan(9, urls)
    assert victim.url not in after.nodes and len(after.nodes) == 2
    [(node, reason)] = after.excluded
    assert node == victim.url
    assert reason.startswith("failed ") and "Connection refused" in reason
    assert "left out until its back-off ends in" in reason
    assert "1 node left out (1 failed recently)" in after.reason
    assert any(f"node {victim.url} left out: it failed" in w for w in after.warnings)


def test_all_nodes_dead_is_one_clear_exception(
        tmp_path: Path, emulators: Callable[..., list[EmulatorProcess]]) -> None:
    procs = emulators(2)
    urls = [p.url for p in procs]
    planner = planner_for()
    for proc in procs:
        proc.stop()
    with pytest.raises(DispatchError) as caught:
        planner.run(range(4), generate, urls)
    message = str(caught.value)
    assert message.startswith("4 of 4 tasks got no result: every node failed; failed nodes: ")
    # each node named by its instance (aliases share one record), with its error
    keys = [f"localhost:{p.port}" for p in procs]
    for key in keys:
        assert f"'{key}' (URLError: <urlopen error [Errno 111] Connection refused>)" in message
    assert sorted(key for key, _ in caught.value.node_errors) == sorted(keys)
    assert caught.value.failed_tasks == (0, 1, 2, 3)


@pytest.mark.timing  # the plan follows the task times measured
def test_a_fresh_planner_learns_from_its_runs_and_moves_to_what_was_measured(
        tmp_path: Path, emulators: Callable[..., list[EmulatorProcess]]) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs to pin two nodes on")
    # enough work per task that the slowdown, not HTTP, sets each node's time
    fast, slow = (p.url for p in emulators(2, slowdowns=[1.0, 12.0], pinned=True,
                                           weights_mb=16))

    def long_generate(node: Any, task: int) -> tuple[int, str]:
        return generate(node, task, tokens=32)

    config = offline_config(topology_file=pinned_file(tmp_path, [fast, slow]))
    planner = ExecutionPlanner(config=config)
    first = planner.plan(4, [fast, slow])
    assert first.mode == "parallel" and first.time_unit == "tasks"  # priors: two CPUs
    plans = [first]
    for _ in range(3):
        planner.run(range(4), long_generate, [fast, slow])
        plans.append(planner.plan(4, [fast, slow]))
        if plans[-1].mode == "sequential":
            break
    learned = plans[-1]
    assert learned.mode == "sequential" and learned.nodes == [fast], [p.reason for p in plans]
    assert learned.time_unit == "seconds"


def test_run_batch_on_sollols_balancer_with_a_registry_of_emulator_nodes(
        tmp_path: Path, emulators: Callable[..., list[EmulatorProcess]]) -> None:
    pytest.importorskip("sollol")
    from sollol_locality import LocalityAwareLoadBalancer
    from sollol_locality.testing.baselines import sollol_registry

    procs = emulators(2)
    urls = [p.url for p in procs]
    config = offline_config(mode="parallel")
    lb = LocalityAwareLoadBalancer(sollol_registry(urls), locality_config=config)
    results = lb.run_batch(range(6), lambda node, task: generate(node.url, task))
    assert [task for task, _ in results] == list(range(6))
    assert {url for _, url in results} == set(urls)
    assert lb.cost_model.observations == 1
    for url in urls:
        assert emulator_stats(url)["max_in_flight"] == 1


# -- exploring what the priors cannot tell (no emulator: the calls return at once) -------------

BATCHER = {"url": "http://10.0.0.5:11434", "num_parallel": 4}
PLAIN = "http://10.0.0.6:11434"


def _recording_call() -> tuple[Callable[[Any, int], int], list[str]]:
    """A call that records where each task ran; the four calls of a batch wait for each other
    (a barrier, never a sleep), so they overlap as requests served together do."""
    where: list[str] = []
    together = threading.Barrier(4, timeout=10)

    def call(node: Any, task: int) -> int:
        where.append(node["url"] if isinstance(node, dict) else str(node))
        together.wait()
        return task

    return call, where


def test_a_run_explores_an_unmeasured_batching_curve_once() -> None:
    """On the priors, 4 tasks go 3 to the batching node (4 slots, curve not measured) and 1 to
    the plain one. The first run sends all 4 to the batching node at once, which measures its
    curve at its slots; the results are the same, and no later run explores that node again."""
    planner = ExecutionPlanner(config=offline_config())
    plan = planner.plan(4, [BATCHER, PLAIN])
    assert (plan.tasks_per_node, plan.concurrency_per_node) == ([3, 1], [3, 1])
    call, where = _recording_call()
    assert planner.run(list(range(4)), call, [BATCHER, PLAIN]) == [0, 1, 2, 3]
    assert where == [BATCHER["url"]] * 4
    batcher = planner.topology.describe(BATCHER)
    assert 4 in planner.cost_model.calibration.batching[batcher.instance.label]
    assert planner.cost_model.batching(batcher).curve_source == "measured"
    assert planner._exploring(planner.plan(4, [BATCHER, PLAIN]), [BATCHER, PLAIN]) is None


def test_explore_false_runs_the_plan_as_planned() -> None:
    planner = ExecutionPlanner(config=offline_config())
    call, where = _recording_call()
    planner.run(list(range(4)), call, [BATCHER, PLAIN], explore=False)
    assert sorted(where) == sorted([BATCHER["url"]] * 3 + [PLAIN])
