"""End to end: emulator nodes, a real decision through ``sollol_locality``, the chunks dispatched
as the plan says, and the plan's choice checked against makespans measured side by side.

Every check is a ratio of makespans measured in interleaved rounds in the same test (never an
absolute time). The nodes are emulators with small weights (fast, so each scenario takes a few
seconds); the namespace scenarios need root and are skipped with the reason otherwise.
``python -m benchmarks.dispatch`` runs the same scenarios at full size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("numpy", reason="the emulator needs numpy (the bench extra)")

from sollol_locality.testing.baselines import (  # noqa: E402
    offline_config,
    sollol_pool,
    sollol_registry,
)
from sollol_locality.testing.machines import (  # noqa: E402
    SCENARIOS,
    Cluster,
    scenario_skip_reason,
    start_scenario,
)
from sollol_locality.testing.workload import (  # noqa: E402
    Arm,
    Settings,
    measure,
    run_parallel,
    run_sequential,
    warm_up,
)

pytestmark = [pytest.mark.integration, pytest.mark.timing]  # makespans compared: run alone

WEIGHTS_MB = 8  # cache-resident: a chunk of 384 tokens takes about 0.1 s here
# three rounds a batch: makespans() measures another batch only where the check fails
SETTINGS = Settings(chunks=4, tokens=384, repeats=3, calibration_rounds=2, weights_mb=WEIGHTS_MB)


def needs(key: str) -> Any:
    """Skip (with the reason) a scenario this machine cannot run; mark namespace ones."""
    scenario = SCENARIOS[key]
    reason = scenario_skip_reason(scenario)
    marks = [pytest.mark.skipif(reason is not None, reason=reason or "")]
    if scenario.needs_netns:
        marks.append(pytest.mark.netns)

    def decorate(test: Any) -> Any:
        for mark in marks:
            test = mark(test)
        return test

    return decorate


@contextlib.contextmanager
def scenario(key: str) -> Iterator[list[str]]:
    with Cluster() as cluster:
        running = start_scenario(key, cluster, weights_mb=WEIGHTS_MB, auto_subnets=True)
        urls = list(running.urls)
        warm_up(urls)
        yield urls


def balancer(urls: list[str], calibration_file: Path | None = None) -> Any:
    from sollol_locality import LocalityAwareLoadBalancer

    return LocalityAwareLoadBalancer(sollol_registry(urls),
                                     locality_config=offline_config(calibration_file))


def dispatch(lb: Any, plan: Any) -> Arm:
    """Run the job as the plan says, record it, and return the strategy it was."""
    urls = tuple(node.url for node in plan.nodes)
    if plan.mode == "sequential":
        result = run_sequential(urls[0], SETTINGS.chunks, num_predict=SETTINGS.tokens)
    else:
        result = run_parallel(urls, SETTINGS.chunks, num_predict=SETTINGS.tokens)
        # every node of the plan worked (how many chunks each took depends on the moment)
        assert sorted(result.chunks_per_node()) == sorted(urls)
        assert min(result.chunks_per_node().values()) >= 1
    lb.record_execution(plan, result.wall_seconds)
    return Arm(plan.mode, urls if plan.mode == "parallel" else urls[:1])


def makespans(*arms: Arm, holds: Callable[[dict[Arm, float]], bool] = lambda spans: True,
              batches: int = 3) -> dict[Arm, float]:
    """Median makespan of each arm over interleaved rounds.

    When ``holds`` (the test's own check) fails on the medians, another batch of rounds is
    measured and the medians are taken over all of them, up to ``batches`` batches: a burst of
    load from outside the test (a CI neighbour, a hypervisor's steal) spoils a few rounds, not
    the median of three batches, while a wrong decision fails its check on every batch. The
    test then asserts the check on what this returns.
    """
    unique = list(dict.fromkeys(arms))
    walls: dict[Arm, list[float]] = {arm: [] for arm in unique}
    spans: dict[Arm, float] = {}
    for _ in range(batches):
        for arm, more in measure(unique, SETTINGS, say=lambda line: None).items():
            walls[arm].extend(more)
        spans = {arm: sorted(w)[len(w) // 2] for arm, w in walls.items()}
        if holds(spans):
            break
    return spans


@needs("localhost-and-lan")
def test_loopback_and_own_lan_address_run_sequentially() -> None:
    with scenario("localhost-and-lan") as urls:
        assert sollol_pool(urls).should_use_parallel_execution(SETTINGS.chunks)  # SOLLOL: 2 hosts
        lb = balancer(urls)
        plan = lb.plan_execution(SETTINGS.chunks)
        assert plan.mode == "sequential" and plan.shared_host == "localhost"
        chosen = dispatch(lb, plan)
        everything = Arm("parallel", tuple(urls))
        spans = makespans(chosen, everything,
                          holds=lambda s: s[chosen] <= 1.05 * s[everything])
    # One core time-shared: all-parallel gains nothing, so sequential is at least as good.
    assert spans[chosen] <= 1.05 * spans[everything], spans


@needs("two-machines")
def test_two_machines_run_in_parallel_and_it_pays() -> None:
    with scenario("two-machines") as urls:
        lb = balancer(urls)
        plan = lb.plan_execution(SETTINGS.chunks)
        assert plan.mode == "parallel" and sorted(n.url for n in plan.nodes) == sorted(urls)
        assert plan.tasks_per_node == [2, 2]
        chosen = dispatch(lb, plan)
        sequential = Arm("sequential", (urls[0],))
        spans = makespans(chosen, sequential, holds=lambda s: s[chosen] / s[sequential] < 0.85)
    assert spans[chosen] / spans[sequential] < 0.85, spans


@needs("two-plus-one")
def test_one_node_per_machine_beats_sequential_and_matches_all_parallel() -> None:
    with scenario("two-plus-one") as urls:
        lb = balancer(urls)
        plan = lb.plan_execution(SETTINGS.chunks)
        used = {n.url for n in plan.nodes}
        assert plan.mode == "parallel" and len(used) == 2 and urls[2] in used  # local + remote
        chosen = dispatch(lb, plan)
        sequential, everything = Arm("sequential", (urls[0],)), Arm("parallel", tuple(urls))
        spans = makespans(chosen, sequential, everything,
                          holds=lambda s: (s[chosen] / s[sequential] < 0.85
                                           and s[chosen] <= 1.10 * s[everything]))
    assert spans[chosen] / spans[sequential] < 0.85, spans
    assert spans[chosen] <= 1.10 * spans[everything], spans


@needs("slow-and-fast")
def test_calibration_learns_a_slow_machine(tmp_path: Path) -> None:
    from sollol_locality.probe import calibrate

    with scenario("slow-and-fast") as urls:
        fast, slow = urls
        before = balancer(urls).plan_execution(SETTINGS.chunks)
        assert before.mode == "parallel"  # priors: two machines, speeds unknown
        target = tmp_path / "calibration.json"
        calibrate(urls, num_predict=SETTINGS.tokens, rounds=SETTINGS.calibration_rounds,
                  output=target, config=offline_config(None))
        lb = balancer(urls, target)
        plan = lb.plan_execution(SETTINGS.chunks)
        assert plan.time_unit == "seconds" and plan.nodes[0].url == fast
        chosen = dispatch(lb, plan)
        sequential, everything = Arm("sequential", (fast,)), Arm("parallel", tuple(urls))
        predicted = plan.naive_speedup
        spans = makespans(chosen, sequential, everything,
                          holds=lambda s: (s[chosen] <= 1.10 * min(s.values())
                                           and s[sequential] / s[everything] < 0.9
                                           and abs(predicted / (s[sequential] / s[everything])
                                                   - 1.0) <= 0.4))
    best = min(spans.values())
    assert spans[chosen] <= 1.10 * best, (plan.reason, spans)
    # what dispatching to both costs, predicted from the calibration against measured
    measured = spans[sequential] / spans[everything]
    assert measured < 0.9, spans  # the slow machine holds the batch up
    # Within 40%, not 30%: in the real run the fast node works beside the slow one's whole
    # task and the cross-core interference of this VM (it comes and goes: 0.92x-1.36x in
    # calibration's pair runs here) slows it by up to a quarter, which calibration's pair run
    # (one request each, the slow node's tail alone) does not see: predicted 0.83x-0.94x
    # against 0.61x measured, 1 run in 5 beyond 30% (before and after the changes of 2026-12-01).
    assert plan.naive_speedup == pytest.approx(measured, rel=0.4), (plan.naive_speedup, spans)
