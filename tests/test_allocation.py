"""_allocation: batching curves, the allocation of tasks to slots, and the sentence."""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import replace
from typing import Any

import pytest
from helpers import gpu_node, offline_config, offline_topology, timed_node
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sollol_locality import CostPriors, ExecutionPlanner, ParallelismCostModel
from sollol_locality._allocation import (
    CPU_BATCH_COST,
    GPU_BATCH_COST,
    Allocation,
    Assignment,
    BatchingCurve,
    Contention,
    SlotInstance,
    _balance,
    _Inst,
    allocate,
    allocate_across,
    describe_allocation,
    dispatch_all,
    predict,
    prior_curve,
)
from sollol_locality.cost_model import NodeProfile
from sollol_locality.cost_model import distinct_instances as _distinct_instances
from sollol_locality.planner import _rank
from sollol_locality.topology import ExecutionUnit, Instance

# -- the batching curve -------------------------------------------------------------------------


@pytest.mark.parametrize(("points", "k", "ratio"), [
    ({2: 1.2, 4: 1.8}, 1, 1.0),
    ({2: 1.2, 4: 1.8}, 2, 1.2),
    ({2: 1.2, 4: 1.8}, 3, 1.5),  # linear between measured points
    ({2: 1.2, 4: 1.8}, 4, 1.8),
    ({2: 1.2, 4: 1.8}, 6, 2.4),  # beyond the last point: the last segment's 0.3 per task
    ({1: 1.0, 2: 1.5}, 4, 2.5),
    ({2: 1.2, 4: 1.1}, 4, 1.2),  # a noisy lower ratio is raised to the earlier point
    ({2: 1.2, 4: 1.1}, 8, 1.2),  # ... and the tail never drops
    ({}, 3, 3.0),  # nothing beyond k = 1: no batching gain
    ([(4, 2.0)], 2, 1 + 1 / 3),
])
def test_measured_curve_interpolates_and_extends(points, k, ratio):
    assert BatchingCurve.measured(points).ratio(k) == pytest.approx(ratio)


def test_prior_and_none_curves():
    assert BatchingCurve.prior(0.25).ratio(5) == 2.0
    assert BatchingCurve.none().ratio(4) == 4.0
    assert BatchingCurve.none().ratio(0) == 0.0
    assert prior_curve(True).ratio(4) == pytest.approx(1 + 3 * GPU_BATCH_COST)
    assert prior_curve(False).ratio(4) == pytest.approx(1 + 3 * CPU_BATCH_COST)
    assert prior_curve(False, cpu_cost=0.0).ratio(8) == 1.0


@pytest.mark.parametrize(("points", "message"), [
    ({0: 1.0}, "batching curve k must be an integer of at least 1, got 0"),
    ({2: 0.0}, "batching curve ratio at k=2 must be a finite number more than 0, got 0.0"),
    ({2: math.inf}, "batching curve ratio at k=2 must be a finite number more than 0, got inf"),
    ({1: 1.5}, "batching curve ratio at k=1 is 1.0 by definition, got 1.5"),
    ([(2, 1.1), (2, 1.2)], "batching curve k=2 is given twice"),
])
def test_bad_curve_points_are_clear_errors(points, message):
    with pytest.raises(ValueError) as info:
        BatchingCurve.measured(points)
    assert str(info.value) == message


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match=r"^a batching curve starts at \(1, 1.0\), got \(\)$"):
        BatchingCurve(())
    with pytest.raises(ValueError, match="^slots of instance 'a' must be an integer of at "
                                         "least 1, got 0$"):
        SlotInstance("a", "h/cpu", "h", 1.0, slots=0)
    with pytest.raises(ValueError, match="^seconds of instance 'a' must be a finite number "
                                         "more than 0, got -1.0$"):
        SlotInstance("a", "h/cpu", "h", -1.0)
    with pytest.raises(ValueError, match="^num_tasks must be an integer of at least 0, "
                                         "got True$"):
        allocate(True, [SlotInstance("a", "h/cpu", "h", 1.0)])
    with pytest.raises(ValueError, match=r"^allocate\(\) needs at least one instance$"):
        allocate(3, [])
    with pytest.raises(ValueError, match="^instance 'a' is given twice$"):
        allocate(3, [SlotInstance("a", "h/cpu", "h", 1.0), SlotInstance("a", "g/cpu", "g", 1.0)])


# -- plans with slots ---------------------------------------------------------------------------


def cpu(key: str, host: str, seconds: float = 1.0, slots: int = 1,
        curve: BatchingCurve | None = None) -> SlotInstance:
    return SlotInstance(key, f"{host}/cpu", host, seconds, slots,
                        curve if curve is not None else prior_curve(False))


def gpu(key: str, host: str, seconds: float = 1.0, slots: int = 1,
        curve: BatchingCurve | None = None) -> SlotInstance:
    return SlotInstance(key, f"{host}/gpu", host, seconds, slots,
                        curve if curve is not None else prior_curve(True), is_gpu=True)


def test_all_tasks_on_one_node_when_it_batches():
    node = cpu("http://h:11434", "h", slots=4)
    plan = allocate(5, [node])
    # 4 at once (2.5 solo times at the prior), then the 5th alone.
    assert plan.assignments == (Assignment("http://h:11434", 5, 4, 4),)
    assert plan.parallel
    assert plan.makespan == pytest.approx(1 + 3 * CPU_BATCH_COST + 1.0)
    assert plan.makespan < plan.sequential_makespan == 5.0
    assert describe_allocation(plan) == (
        "5 tasks at once on http://h:11434, which batches 4: predicted 1.64x")


def test_beyond_its_slots_an_instance_queues_in_rounds():
    curve = BatchingCurve.measured({2: 1.25, 4: 1.5})
    plan = allocate_across(10, [cpu("a", "h", 2.0, slots=4, curve=curve)])
    # 2 rounds of 4, then a round of 2: 2 * (2 * 1.5 + 1.25)
    assert plan.makespan == pytest.approx(8.5)
    assert plan.assignments == (Assignment("a", 10, 4, 4),)


def test_a_batching_fast_node_takes_most_beside_a_plain_slow_one():
    fast = gpu("http://g:11434", "g", 1.0, slots=4)
    slow = cpu("http://p:11434", "p", 1.2)
    plan = allocate(20, [fast, slow])
    assert plan.assignments == (Assignment(fast.key, 16, 4, 4), Assignment(slow.key, 4, 1, 1))
    # 4 rounds of 4 at 1.3 each, beside 4 tasks of 1.2: 5.2 plus the dispatch overhead
    assert plan.makespan == pytest.approx(4 * (1 + 3 * GPU_BATCH_COST) * 1.05)
    one_slot = allocate(20, [gpu(fast.key, "g", 1.0), slow])
    assert [a.tasks for a in one_slot.assignments] == [11, 9]
    assert plan.speedup > 1.5 * one_slot.speedup
    assert describe_allocation(plan, {fast.key: "g", slow.key: "p"}) == (
        "20 tasks across 2 instances: 16 on g (4 at a time), 4 on p; predicted 3.28x")


def test_two_batching_instances_of_one_cpu_unit_one_holds_every_task():
    one = cpu("http://m:11434", "m", slots=4)
    two = cpu("http://m:11435", "m", slots=4)
    plan = allocate(8, [one, two])
    assert plan.assignments == (Assignment("http://m:11434", 8, 4, 4),)
    assert plan.makespan == pytest.approx(2 * (1 + 3 * CPU_BATCH_COST))
    # Spreading over both is slower: each is slowed by the other (c = 1 on one CPU).
    spread = allocate_across(8, [one, two])
    assert [a.tasks for a in spread.assignments] == [4, 4]
    assert spread.makespan > plan.makespan


def test_a_slower_instance_that_batches_beats_a_faster_one_that_does_not():
    plain = cpu("plain", "m", 1.0)
    batching = cpu("batching", "m", 1.2, slots=4)  # same unit, listed second
    plan = allocate(4, [plain, batching])
    assert plan.assignments == (Assignment("batching", 4, 4, 4),)
    assert plan.speedup == pytest.approx(4 / (1.2 * (1 + 3 * CPU_BATCH_COST)))


@pytest.mark.parametrize("tasks", [0, 1])
def test_fewer_than_two_tasks_is_sequential(tasks):
    plan = allocate(tasks, [cpu("a", "h", 2.0), cpu("b", "g", 1.0, slots=4)])
    assert not plan.parallel and plan.sequential_key == "b"
    assert plan.assignments == (Assignment("b", tasks, tasks, 4),)
    assert describe_allocation(plan) == f"{tasks} task{'' if tasks == 1 else 's'} one after " \
                                        "another on b"


def test_one_instance_with_one_slot_has_no_parallel_plan():
    plan = allocate(5, [cpu("a", "h")])
    assert not plan.parallel and plan.speedup == 1.0 and plan.makespan == 5.0


def test_a_billion_tasks_get_exact_counts():
    nodes = [gpu("g0", "a", 0.3, slots=8), gpu("g1", "b", 0.5, slots=4), cpu("c0", "a", 1.0),
             cpu("c1", "c", 1.1, slots=2), cpu("c2", "d", 2.0), cpu("c3", "d2", 3.0, slots=4),
             cpu("c4", "e", 0.9), cpu("c5", "f", 1.7, slots=3)]
    plan = allocate(10**9, nodes)
    assert sum(a.tasks for a in plan.assignments) == 10**9
    assert all(1 <= a.concurrency <= min(a.slots, a.tasks) for a in plan.assignments)
    assert plan.parallel and plan.speedup > 1.0
    assert plan.tasks_per_instance.keys() == plan.concurrency_per_instance.keys()


def test_contention_is_frozen_and_looks_up_the_nearest_measured_k():
    table = {"h/cpu": {2: -0.2, 4: 0.1}}
    contention = Contention(measured=table, host_measured={"h": 0.2}, streams={"h/cpu": 2})
    table["h/cpu"][3] = 9.0  # the caller's table is copied
    assert contention.unit("h/cpu", 3, False) == 0.1  # equally near 2 and 4: the larger
    assert contention.unit("h/cpu", 2, False) == -0.2
    assert contention.unit("g/gpu", 2, True) == 0.25
    assert contention.host("h") == 0.2 and contention.host("g") == 0.075
    with pytest.raises(TypeError):
        contention.streams["h/cpu"] = 3  # type: ignore[index]


# -- the closed-form balance against the greedy one it replaces ---------------------------------


def _greedy(num_tasks: int, members: list[_Inst], times: list[float]) -> list[int]:
    shares = [0] * len(members)
    heap = [(times[i] * members[i].work(1)[0], i) for i in range(len(members))]
    heapq.heapify(heap)
    for _ in range(num_tasks):
        _, i = heapq.heappop(heap)
        shares[i] += 1
        heapq.heappush(heap, (times[i] * members[i].work(shares[i] + 1)[0], i))
    return shares


_curves = st.one_of(
    st.floats(0.0, 1.5).map(BatchingCurve.prior),
    st.dictionaries(st.integers(2, 6), st.floats(1.0, 7.0), min_size=1, max_size=3)
    .map(BatchingCurve.measured),
)


@settings(max_examples=200, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 6), _curves, st.floats(0.1, 5.0)), min_size=1,
                       max_size=5),
       tasks=st.integers(0, 400))
def test_closed_form_balance_equals_the_greedy_one(shapes, tasks):
    members = [_Inst(i, SlotInstance(f"n{i}", f"u{i}", f"h{i}", 1.0, slots, curve))
               for i, (slots, curve, _) in enumerate(shapes)]
    times = [t for _, _, t in shapes]
    assert _balance(tasks, members, times) == _greedy(tasks, members, times)


# -- invariants ---------------------------------------------------------------------------------

_HOSTS = ["a", "b", "c"]


@st.composite
def _instances(draw: Any) -> list[SlotInstance]:
    count = draw(st.integers(1, 6))
    result = []
    for i in range(count):
        host = draw(st.sampled_from(_HOSTS))
        kind = draw(st.sampled_from(["cpu", "gpu", "gpu:0", "gpu:1"]))
        result.append(SlotInstance(f"http://{host}:{11434 + i}", f"{host}/{kind}", host,
                                   draw(st.sampled_from([0.25, 0.5, 1.0, 1.5, 4.0])),
                                   draw(st.integers(1, 6)), draw(_curves), kind != "cpu"))
    return result


_contentions = st.builds(
    Contention, cpu=st.sampled_from([1.0, 0.0, -0.3]), gpu=st.sampled_from([0.25, 0.0]),
    same_host=st.sampled_from([0.075, 0.0, 0.5]), dispatch=st.sampled_from([0.05, 0.0, 0.3]))


@settings(max_examples=200, deadline=None)
@given(instances=_instances(), contention=_contentions,
       tasks=st.one_of(st.integers(0, 60), st.integers(10**6, 10**12)))
def test_allocation_invariants(instances, contention, tasks):
    plan = allocate(tasks, instances, contention)
    assert sum(a.tasks for a in plan.assignments) == tasks
    keys = [i.key for i in instances]
    assert [keys.index(a.key) for a in plan.assignments] == sorted(
        keys.index(a.key) for a in plan.assignments)
    for a in plan.assignments:
        assert a.concurrency <= a.slots and a.concurrency <= a.tasks
        assert a.concurrency >= 1 or a.tasks == 0
    assert plan.sequential_makespan == tasks * min(i.seconds for i in instances)
    if plan.parallel and plan.speedup > 1.0:  # what a planner with min_speedup >= 1 runs
        assert plan.makespan <= plan.sequential_makespan
    if not plan.parallel:
        assert len(plan.assignments) == 1 and plan.assignments[0].concurrency <= 1
    else:  # the makespan is that of the allocation it reports
        assert predict(instances, plan.by_instance, contention) == pytest.approx(
            plan.makespan, rel=1e-9)


# -- today's one-slot math, frozen ----------------------------------------------------------------
# A copy of what ``ParallelismCostModel.parallel_makespan``, ``dispatch_all_makespan`` and the
# planner's search over units computed before they delegated to the engine (one request at a
# time per instance, tasks placed one by one). Kept here, unchanged, so that the tests below
# still compare the engine with the old arithmetic rather than with itself.


def _ref_assign(num_tasks: int, workers: list[tuple[int, float]]) -> dict[int, int]:
    shares = {i: 0 for i, _ in workers}
    heap = [(t, position, i, t) for position, (i, t) in enumerate(workers)]
    heapq.heapify(heap)
    for _ in range(num_tasks):
        finish, position, i, t = heapq.heappop(heap)
        shares[i] += 1
        heapq.heappush(heap, (finish + t, position, i, t))
    return shares


def _ref_times(model: ParallelismCostModel, profiles: list[NodeProfile], active: set[int],
               targets: Any) -> dict[int, float]:
    streams: dict[ExecutionUnit, int] = {}
    host_units: dict[str, set[ExecutionUnit]] = {}
    for i in active:
        unit = profiles[i].unit
        streams[unit] = streams.get(unit, 0) + 1
        host_units.setdefault(unit.host, set()).add(unit)
    times = {}
    for i in targets:
        profile = profiles[i]
        unit = profile.unit
        k = streams.get(unit, 0) + (0 if i in active else 1)
        factor = 1.0
        if k > 1:
            factor = k * max(0.05, 1.0 + model.contention(unit, k))
        units_busy = host_units.get(unit.host, set()) | {unit}
        if len(units_busy) > 1:
            factor *= 1.0 + model.host_overhead(unit.host) * (len(units_busy) - 1)
        times[i] = profile.task_time * factor
    return times


def _ref_simulate(model: ParallelismCostModel, profiles: list[NodeProfile],
                  shares: dict[int, int]) -> float:
    left = {i: n for i, n in shares.items() if n > 0}
    progress = dict.fromkeys(left, 0.0)
    clock = 0.0
    while left:
        times = _ref_times(model, profiles, set(left), left)
        step = min((1.0 - progress[i]) * times[i] for i in left)
        clock += step
        for i in list(left):
            progress[i] += step / times[i]
            if progress[i] >= 1.0 - 1e-9:
                left[i] -= 1
                progress[i] = 0.0
                if left[i] == 0:
                    del left[i]
                    del progress[i]
    return clock


def _ref_parallel_makespan(model: ParallelismCostModel, num_tasks: int,
                           profiles: list[NodeProfile]) -> tuple[float, list[int]]:
    count = len(profiles)
    if count == 0 or num_tasks <= 0:
        return 0.0, [0] * count
    seen: set[Instance] = set()
    usable = []
    for i, profile in enumerate(profiles):
        if profile.instance not in seen:
            seen.add(profile.instance)
            usable.append(i)
    active = set(usable)
    best: tuple[float, list[int]] | None = None
    for _ in range(6):
        estimate = _ref_times(model, profiles, active, usable)
        shares = _ref_assign(num_tasks, [(i, estimate[i]) for i in usable])
        now_active = {i for i in usable if shares[i] > 0}
        makespan = _ref_simulate(model, profiles, shares)
        if len({profiles[i].unit.host for i in now_active}) > 1:
            makespan *= 1.0 + model.dispatch_overhead()
        if best is None or makespan < best[0] - 1e-12:
            best = (makespan, [shares.get(i, 0) for i in range(count)])
        if now_active == active:
            break
        active = now_active
    assert best is not None
    return best


def _ref_dispatch_all(model: ParallelismCostModel, num_tasks: int,
                      profiles: list[NodeProfile]) -> float:
    seen: set[Instance] = set()
    workers = []
    for i, profile in enumerate(profiles):
        if profile.instance not in seen:
            seen.add(profile.instance)
            workers.append(i)
    if not workers or num_tasks <= 0:
        return 0.0
    busy = {i: 0.0 for i in workers[:num_tasks]}
    waiting = num_tasks - len(busy)
    hosts = {profiles[i].unit.host for i in busy}
    clock = 0.0
    while busy:
        times = _ref_times(model, profiles, set(busy), busy)
        step = min((1.0 - busy[i]) * times[i] for i in busy)
        clock += step
        for i in list(busy):
            busy[i] += step / times[i]
            if busy[i] >= 1.0 - 1e-9:
                if waiting > 0:
                    waiting -= 1
                    busy[i] = 0.0
                else:
                    del busy[i]
    if len(hosts) > 1:
        clock *= 1.0 + model.dispatch_overhead()
    return clock


def _ref_plan(model: ParallelismCostModel, profiles: list[NodeProfile], num_tasks: int,
              min_speedup: float) -> tuple[str, list[str], list[int], float]:
    """Today's planner search: (mode, chosen instance labels, tasks each, predicted makespan)."""
    ranked = sorted(profiles, key=_rank)
    fastest = ranked[0]
    sequential = num_tasks * fastest.task_time
    seq = ("sequential", [fastest.instance.label], [num_tasks], sequential)
    if num_tasks < 2:
        return seq
    per_unit: dict[ExecutionUnit, list[NodeProfile]] = {}
    for profile in ranked:
        per_unit.setdefault(profile.unit, []).append(profile)
    ordered = [_distinct_instances(members)[:max(1, model.gains_from_concurrency(unit))]
               for unit, members in per_unit.items()]
    if len(ordered) == 1 and len(ordered[0]) == 1:
        return seq
    best: tuple[float, list[NodeProfile], list[int], float] | None = None
    for m in range(1, min(num_tasks, len(ordered)) + 1):
        chosen = [p for streams in ordered[:m] for p in streams]
        if len(chosen) < 2:
            continue
        makespan, shares = _ref_parallel_makespan(model, num_tasks, chosen)
        speedup = sequential / makespan if makespan > 0 else 1.0
        if best is None or speedup > best[0] + 1e-9:
            best = (speedup, chosen, shares, makespan)
    assert best is not None
    speedup, chosen, shares, makespan = best
    used = [i for i in sorted(range(len(chosen)), key=lambda i: _rank(chosen[i]))
            if shares[i] > 0]
    if speedup > min_speedup and len(used) >= 2:
        return ("parallel", [chosen[i].instance.label for i in used],
                [shares[i] for i in used], makespan)
    return seq


# -- slots = 1 everywhere is today's model, exactly -------------------------------------------


def _slot_instances(profiles: list[NodeProfile]) -> list[SlotInstance]:
    return [SlotInstance(p.instance.label, p.unit.label, p.unit.host,
                         p.task_time, is_gpu=p.is_gpu) for p in profiles]


def _contention_of(model: ParallelismCostModel, profiles: list[NodeProfile]) -> Contention:
    priors = model.priors
    units = {p.unit for p in profiles}
    measured = {u.label: {k: model.contention(u, k) for k in range(2, len(profiles) + 2)}
                for u in units if model.calibration.contention.get(u.label)}
    hosts = {u.host for u in units}
    return Contention(priors.cpu_contention, priors.gpu_contention, priors.same_host_overhead,
                      model.dispatch_overhead(), measured,
                      {h: model.host_overhead(h) for h in hosts},
                      {u.label: max(1, model.gains_from_concurrency(u)) for u in units})


# Figures whose sums and products are exact in binary floating point. Where two finish times
# are equal in real arithmetic but not in floating point (16 * 0.26875 against 4.3, as the
# default 0.075 same-host overhead gives), today's greedy loop breaks the tie by the rounding of
# its repeated additions and the engine by position (what the loop means to do); with these
# figures both see the same ties.
_PRIORS = [CostPriors(same_host_overhead=0.125, dispatch_overhead=0.0625),
           CostPriors(cpu_contention=0.0, same_host_overhead=0.0),
           CostPriors(cpu_contention=-0.25, gpu_contention=-0.125, same_host_overhead=0.25,
                      dispatch_overhead=0.25),
           CostPriors(cpu_contention=3.0, gpu_contention=0.0, same_host_overhead=0.5)]
_SECONDS = [0.25, 0.5, 1.0, 1.5, 2.0, 0.375, 1.75, 4.0, 10.0]


@st.composite
def _profiles(draw: Any, *, one_unit_per_host: bool = False) -> list[NodeProfile]:
    count = draw(st.integers(1, 6))
    result = []
    kinds: dict[str, str] = {}
    for i in range(count):
        host = draw(st.sampled_from(_HOSTS))
        kind = draw(st.sampled_from(["cpu", "gpu", "0", "1"]))
        if one_unit_per_host:
            kind = kinds.setdefault(host, kind)
        unit = (ExecutionUnit(host) if kind == "cpu" else
                ExecutionUnit(host, True, None if kind == "gpu" else kind))
        result.append(NodeProfile(i, None, Instance(host, 11434 + i), unit,  # type: ignore[arg-type]
                                  draw(st.sampled_from(_SECONDS)), "prior"))
    return result


def _check_makespan(profiles: list[NodeProfile], priors: CostPriors, tasks: int) -> None:
    model = ParallelismCostModel(offline_config(), priors=priors)
    makespan, shares = _ref_parallel_makespan(model, tasks, profiles)
    plan = allocate_across(tasks, _slot_instances(profiles), _contention_of(model, profiles))
    # The cost model, which now delegates to the engine, still gives the old figures.
    assert model.parallel_makespan(tasks, profiles) == (pytest.approx(makespan, rel=1e-9,
                                                                      abs=1e-12), shares)
    assert plan.makespan == pytest.approx(makespan, rel=1e-9, abs=1e-12)
    assert plan.sequential_makespan == pytest.approx(model.sequential_makespan(tasks, profiles),
                                                     rel=1e-9)
    if tasks:
        assert plan.tasks_per_instance == {
            p.instance.label: n for p, n in zip(profiles, shares, strict=True)
            if n > 0}


@settings(max_examples=300, deadline=None)
@given(profiles=_profiles(), priors=st.sampled_from(_PRIORS), tasks=st.integers(0, 40))
def test_one_slot_makespans_are_todays(profiles, priors, tasks):
    _check_makespan(profiles, priors, tasks)


@settings(max_examples=150, deadline=None)
@given(profiles=_profiles(one_unit_per_host=True), tasks=st.integers(0, 40))
def test_one_slot_makespans_are_todays_with_the_default_priors(profiles, tasks):
    # One unit per host: no same-host overhead, so the default figures are exact too.
    _check_makespan(profiles, CostPriors(), tasks)


_POOL = (["http://localhost:11434", "http://localhost:11435", "http://127.0.0.1:11436"]
         + [f"http://10.0.0.{i}:{p}" for i in range(1, 4) for p in (11434, 11435)])


@st.composite
def _nodes(draw: Any) -> list[Any]:
    urls = draw(st.lists(st.sampled_from(_POOL), min_size=1, max_size=7, unique=True))
    nodes: list[Any] = []
    for url in urls:
        kind = draw(st.sampled_from(["str", "timed", "gpu", "dict"]))
        if kind == "str":
            nodes.append(url)
        elif kind == "timed":
            nodes.append(timed_node(url, draw(st.sampled_from([0.5, 1.0, 2.0, 8.0, 1.25]))))
        elif kind == "gpu":
            nodes.append(gpu_node(url, draw(st.sampled_from([None, "0", "1"]))))
        else:
            nodes.append({"url": url, "latency_ms": draw(st.sampled_from([500, 1000, 4000])),
                          "total_requests": 5})
    return nodes


@pytest.fixture(scope="module")
def topology():
    return offline_topology()


def _check_planner(planner: ExecutionPlanner, nodes: list[Any], tasks: int) -> None:
    """The engine, given what today's planner sees, chooses what it chooses."""
    plan = planner.plan(tasks, nodes)
    model = planner.cost_model
    profiles, _ = model.profiles(planner.topology.describe_many(nodes))
    ranked = _distinct_instances(sorted(profiles, key=_rank))
    allocation = allocate(tasks, _slot_instances(ranked), _contention_of(model, ranked))
    chosen = [i.instance.label for i in plan.identities]
    # Today's planner, frozen above: the same mode, nodes, counts and makespan.
    mode, ref_chosen, ref_tasks, ref_makespan = _ref_plan(model, profiles, tasks,
                                                          planner.config.min_speedup)
    assert plan.mode == mode and chosen == ref_chosen
    if mode == "parallel":
        assert plan.tasks_per_node == ref_tasks and plan.concurrency_per_node == [1] * len(chosen)
        assert plan.predicted_seconds == pytest.approx(ref_makespan, rel=1e-9)
    runs_parallel = allocation.parallel and allocation.speedup > planner.config.min_speedup
    assert runs_parallel == (plan.mode == "parallel")
    assert allocation.sequential_makespan == pytest.approx(plan.sequential_seconds, rel=1e-9)
    if plan.mode == "parallel":
        assert [a.key for a in allocation.assignments] == chosen
        assert [a.tasks for a in allocation.assignments] == plan.tasks_per_node
        assert all(a.concurrency == 1 for a in allocation.assignments)
        assert allocation.makespan == pytest.approx(plan.predicted_seconds, rel=1e-9)
    else:
        assert chosen == [allocation.sequential_key]
        if plan.cause == "below-threshold":  # the best plan's speedup is in the sentence
            assert f"predicted at {allocation.speedup:.2f}x" in plan.reason


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(nodes=_nodes(), tasks=st.integers(0, 30), min_speedup=st.sampled_from([1.0, 1.3]),
       priors=st.sampled_from(_PRIORS))
def test_one_slot_plans_are_todays(topology, nodes, tasks, min_speedup, priors):
    cfg = offline_config(min_speedup=min_speedup)
    model = ParallelismCostModel(cfg, priors=priors)
    _check_planner(ExecutionPlanner(topology, model, cfg), nodes, tasks)


@pytest.mark.parametrize("tasks", [2, 3, 4, 7, 25])
def test_one_slot_plans_are_todays_with_calibrated_contention(topology, tasks):
    # Two instances of one CPU measured gaining together: today's planner runs both there.
    cfg = offline_config()
    model = ParallelismCostModel(cfg, priors=_PRIORS[0])
    model._cal.contention["localhost/cpu"] = {2: deque([-0.3]), 3: deque([0.4])}
    model._cal.host_overhead["localhost"] = deque([0.2])
    nodes = ["http://localhost:11434", "http://localhost:11435", "http://127.0.0.1:11436",
             "http://10.0.0.1:11434", "http://10.0.0.2:11434"]
    planner = ExecutionPlanner(topology, model, cfg)
    assert planner.plan(tasks, nodes).mode == "parallel"
    _check_planner(planner, nodes, tasks)


def test_allocation_is_frozen():
    plan = allocate(2, [cpu("a", "h"), cpu("b", "g")])
    assert isinstance(plan, Allocation)
    with pytest.raises(AttributeError):
        plan.makespan = 0.0  # type: ignore[misc]


@settings(max_examples=100, deadline=None)
@given(slots=st.integers(2, 8), curve=_curves, tasks=st.integers(1, 20000))
def test_work_past_the_settled_point_is_the_full_minimum(slots, curve, tasks):
    member = _Inst(0, SlotInstance("n", "u", "h", 1.0, slots, curve))
    ratios = [0.0] + [1.0] + [curve.ratio(k) for k in range(2, slots + 1)]
    brute = min((tasks // c) * ratios[c] + ratios[tasks % c]
                for c in range(1, min(slots, tasks) + 1))
    value, concurrency = member.work(tasks)
    assert value == pytest.approx(brute, rel=1e-12)
    assert member.value(tasks) == value
    assert 1 <= concurrency <= min(slots, tasks)
    assert (tasks // concurrency) * ratios[concurrency] + ratios[tasks % concurrency] == value


def test_slots_without_a_batching_gain_are_planned_as_one_slot():
    queue = cpu("q", "h", 1.0, slots=4, curve=BatchingCurve.none())
    plan = allocate(5, [queue])
    assert not plan.parallel and plan.assignments == (Assignment("q", 5, 1, 4),)
    assert allocate_across(5, [queue]).assignments == (Assignment("q", 5, 1, 4),)


def _check_dispatch_all(profiles: list[NodeProfile], priors: CostPriors, tasks: int) -> None:
    model = ParallelismCostModel(offline_config(), priors=priors)
    distinct = _distinct_instances(profiles)
    expected = _ref_dispatch_all(model, tasks, profiles)
    got = dispatch_all(tasks, _slot_instances(distinct), _contention_of(model, distinct))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert model.dispatch_all_makespan(tasks, profiles) == pytest.approx(expected, rel=1e-9,
                                                                         abs=1e-12)


@settings(max_examples=300, deadline=None)
@given(profiles=_profiles(), priors=st.sampled_from(_PRIORS), tasks=st.integers(0, 40))
def test_dispatch_all_is_todays(profiles, priors, tasks):
    _check_dispatch_all(profiles, priors, tasks)


def test_dispatch_all_of_a_billion_tasks():
    nodes = [cpu("a", "h", 1.0), cpu("b", "g", 3.0), gpu("c", "h", 0.25)]
    # 10**9 tasks over throughputs 1 + 1/3 + 4 (the GPU and CPU of h slowed 7.5% by each other).
    rate = 1 / 1.075 + 1 / 3 + 4 / 1.075
    assert dispatch_all(10**9, nodes) == pytest.approx(10**9 / rate * 1.05, rel=1e-6)


def test_a_curve_built_by_hand_is_checked():
    assert BatchingCurve(((1, 1.0), (4, 2)), 0.5).ratio(6) == 3.0
    with pytest.raises(ValueError, match="^batching curve ratios must be finite and "
                                         r"non-decreasing, got \(\(1, 1.0\), \(2, 0.5\)\)$"):
        BatchingCurve(((1, 1.0), (2, 0.5)))
    with pytest.raises(ValueError, match="^batching curve points need increasing integer k, "):
        BatchingCurve(((1, 1.0), (1, 1.0)))


def test_batching_instances_on_separate_machines_share_the_batch():
    a, b = gpu("http://a:11434", "a", slots=4), gpu("http://b:11434", "b", slots=4)
    plan = allocate(8, [a, b])
    assert plan.by_instance == {a.key: (4, 4), b.key: (4, 4)}
    assert plan.makespan == pytest.approx((1 + 3 * GPU_BATCH_COST) * 1.05)
    assert describe_allocation(plan) == (
        f"8 tasks across 2 instances: 4 on {a.key} (all at once), 4 on {b.key} (all at once); "
        f"predicted {8 / ((1 + 3 * GPU_BATCH_COST) * 1.05):.2f}x")


def test_predict_checks_the_plan_it_is_given():
    nodes = [cpu("a", "h", 1.0, slots=2), cpu("b", "g", 1.0)]
    assert predict(nodes, {"a": (3, 2), "b": (0, 1)}) == pytest.approx(1 + CPU_BATCH_COST + 1)
    with pytest.raises(ValueError, match="^plan names 'c', which is not one of the instances$"):
        predict(nodes, {"c": (1, 1)})
    with pytest.raises(ValueError, match="^concurrency on 'b' must be an integer from 1 to 1, "
                                         "got 2$"):
        predict(nodes, {"b": (2, 2)})


def test_measured_interference_between_units_replaces_the_host_overhead() -> None:
    """``Contention.between``: while both units of a measured pair are busy each runs that much
    slower, on one host (instead of the same-host overhead) or across hosts."""
    one_host = [SlotInstance("a", "h/cpu:0", "h", 1.0), SlotInstance("b", "h/cpu:1", "h", 1.0)]
    plan = {"a": (2, 1), "b": (2, 1)}
    assert predict(one_host, plan, Contention(same_host=0.1)) == pytest.approx(2.2)
    measured = Contention(same_host=0.1, between={frozenset(("h/cpu:0", "h/cpu:1")): 0.4})
    assert predict(one_host, plan, measured) == pytest.approx(2.8)
    apart = [SlotInstance("a", "x/cpu", "x", 1.0), SlotInstance("b", "y/cpu", "y", 1.0)]
    crossed = Contention(dispatch=0.0, between={frozenset(("x/cpu", "y/cpu")): 0.4})
    assert predict(apart, plan, crossed) == pytest.approx(2.8)
    assert predict(apart, {"a": (3, 1), "b": (1, 1)}, crossed) == pytest.approx(1.4 + 2.0)
    assert allocate(4, apart, crossed).makespan == pytest.approx(2.8)
    with pytest.raises(ValueError, match="pairs of two unit names"):
        Contention(between={frozenset(("x/cpu",)): 0.4})


def test_interference_is_paid_per_task_and_one_stream_per_unit_is_still_tried() -> None:
    """A measured interference between two units adds its solo-task times to each task while
    the other unit is busy; it is not multiplied by a unit's own time-sharing. With several
    streams allowed on a unit, the search weighs one stream per unit against all of them."""
    nodes = [SlotInstance(key, f"{key[0]}/cpu", key[0], 1.0) for key in ("a1", "a2", "b1", "b2")]
    pair = frozenset(("a/cpu", "b/cpu"))
    shared = Contention(dispatch=0.0, measured={"a/cpu": {2: 0.0}, "b/cpu": {2: 0.0}},
                        streams={"a/cpu": 2, "b/cpu": 2}, between={pair: 0.4})
    everyone = {key: (1, 1) for key in ("a1", "a2", "b1", "b2")}
    assert predict(nodes, everyone, shared) == pytest.approx(2.0 + 0.4)  # not 2.0 * 1.4
    assert predict(nodes, {"a1": (2, 1), "b1": (2, 1)}, shared) == pytest.approx(2 * 1.4)
    best = allocate(4, nodes, shared)
    assert best.makespan == pytest.approx(2.4) and len(best.assignments) == 4
    # Sharing that loses (each of two 1.3x slower than its share): one stream per unit wins.
    losing = replace(shared, measured={"a/cpu": {2: 0.3}, "b/cpu": {2: 0.3}})
    assert predict(nodes, everyone, losing) == pytest.approx(2.6 + 0.4)
    single = allocate(4, nodes, losing)
    assert single.makespan == pytest.approx(2.8)
    assert sorted(a.key for a in single.assignments if a.tasks) == ["a1", "b1"]
    # A gain under the margin (2.8 / 2.4: 17% < 20%) keeps one stream per unit too.
    cautious = allocate(4, nodes, replace(shared, stream_margin=0.2))
    assert cautious.makespan == pytest.approx(2.8)
    assert allocate(4, nodes, replace(shared, stream_margin=0.1)).makespan == pytest.approx(2.4)
