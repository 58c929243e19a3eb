"""Measured co-location in use: the calibration's facts make nodes on different addresses one
measured unit (topology, cost model, planner), and recorded runs teach the same facts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from helpers import offline_config
from hypothesis import given, settings
from hypothesis import strategies as st

from sollol_locality import ExecutionPlanner, NodeTopology, ParallelismCostModel, calibration
from sollol_locality.calibration import Calibration
from sollol_locality.colocation import ColocationFacts, PairFact
from sollol_locality.topology import ExecutionUnit, HostIdentity

A, B, C = "http://10.0.0.5:11434", "http://10.0.0.6:11434", "http://10.0.0.7:11434"
KA, KB, KC = "10.0.0.5:11434", "10.0.0.6:11434", "10.0.0.7:11434"
DAY = 86400.0


def pair(a: str, b: str, colocated: bool = True, strength: float | None = 1.9, *,
         age: float = 0.0, source: Any = "calibrate") -> PairFact:
    x, y = sorted((a, b))
    return PairFact(x, y, colocated, strength, time.time() - age, source)


def calibrated_model(facts: ColocationFacts | None = None, **fields: Any
                     ) -> ParallelismCostModel:
    """Three machines, each measured at 1 s per task alone."""
    model = ParallelismCostModel(offline_config(**fields))
    cal = model.calibration
    for host in ("10.0.0.5", "10.0.0.6", "10.0.0.7"):
        cal.push(cal.task_seconds, f"{host}/cpu", 1.0)
    model.update_colocation(facts or ColocationFacts())
    return model


def identities(planner: ExecutionPlanner, nodes: list[str]) -> list[HostIdentity]:
    described = planner.topology.describe_many(nodes)
    assert all(isinstance(i, HostIdentity) for i in described)
    return described  # type: ignore[return-value]


# -- topology ---------------------------------------------------------------------------------


def test_a_calibration_file_with_colocation_makes_one_measured_unit(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    cal = Calibration()
    cal.colocation = ColocationFacts.of([pair(KA, KB), pair(KA, KC, False, None)])
    calibration.write(path, cal)
    planner = ExecutionPlanner(config=offline_config(calibration_file=path))
    a, b, c = identities(planner, [A, B, C])
    assert a.unit == b.unit == ExecutionUnit("10.0.0.5", measured=KA)
    assert a.unit.label == b.unit.label == f"measured:{KA}"
    assert a.facts["unit"] == b.facts["unit"] == "measured"
    assert (a.physical_host_id, b.physical_host_id) == ("10.0.0.5", "10.0.0.6")  # unchanged
    assert b.own_unit.label == "10.0.0.6/cpu"
    assert c.unit.label == "10.0.0.7/cpu" and c.facts["unit"] == "address"
    # the topology reads the calibration the cost model loaded: one object
    assert planner.topology.colocation_facts() is planner.cost_model.calibration.colocation


def test_a_declared_unit_in_the_topology_file_wins(tmp_path: Path) -> None:
    topology_file = tmp_path / "topology.toml"
    topology_file.write_text(f'[nodes."{A}"]\ncpus = "0-3"\n')
    facts = ColocationFacts.of([pair(KA, KB), pair(KB, KC)])
    topology = NodeTopology(offline_config(topology_file=topology_file), colocation=facts)
    a, b, c = topology.describe_many([A, B, C])
    assert isinstance(a, HostIdentity) and isinstance(b, HostIdentity)
    assert isinstance(c, HostIdentity)
    assert a.unit.label == "10.0.0.5/cpu:0-3" and a.facts["unit"] == "topology file"
    # the rest of the measured group is still one unit, named by the group's smallest member
    assert b.unit == c.unit and b.unit.label == f"measured:{KA}"
    assert b.facts["unit"] == c.facts["unit"] == "measured"


def test_one_member_of_a_group_alone_keeps_its_own_unit() -> None:
    topology = NodeTopology(offline_config(), colocation=ColocationFacts.of([pair(KA, KB)]))
    [a, c] = topology.describe_many([A, C])
    assert isinstance(a, HostIdentity) and a.unit.label == "10.0.0.5/cpu"
    assert a.facts["unit"] == "address"


# -- cost model ----------------------------------------------------------------------------


def test_a_measured_pair_gives_its_units_contention_unless_calibrated() -> None:
    model = calibrated_model(ColocationFacts.of([pair(KA, KB, strength=2.4)]))
    unit = ExecutionUnit("10.0.0.5", measured=KA)
    assert model.colocation_strength(unit) == pytest.approx(2.4)
    assert model.contention(unit, 2) == pytest.approx(2.4 / 2 - 1)
    model.calibration.push_k(model.calibration.contention, unit.label, 2, 0.3)
    assert model.contention(unit, 2) == pytest.approx(0.3)
    assert model.contention(ExecutionUnit("10.0.0.7"), 2) == model.priors.cpu_contention


def test_the_plan_treats_a_measured_pair_as_one_unit_and_names_it() -> None:
    model = calibrated_model(ColocationFacts.of([pair(KA, KB, strength=1.93)]))
    model.calibration.task_seconds["10.0.0.6/cpu"] = calibration.samples([0.9])  # B: faster
    plan = ExecutionPlanner(cost_model=model, config=model.config).plan(4, [A, B, C])
    assert plan.mode == "parallel" and plan.units == 2 and plan.nodes == [B, C]
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert plan.reason.endswith(f" {KA} and {KB} share one unit (measured {day}, 1.93x).")
    # the machines named are those of the nodes dispatched to (B's own, not its unit's name)
    assert "across 2 machines (10.0.0.6, 10.0.0.7)" in plan.reason


# -- recorded runs through the planner -------------------------------------------------------


def slowed_run(pa: float = 1.95, pb: float = 1.9) -> list[tuple[str, float, float]]:
    """One task per node, all started together: A and B slow each other, C keeps its speed."""
    return [(A, 0.0, pa), (B, 0.0, pb), (C, 0.0, 1.0)]


def test_three_consistent_recorded_runs_merge_one_noisy_run_does_not() -> None:
    model = calibrated_model()
    planner = ExecutionPlanner(cost_model=model, config=model.config)
    nodes = [A, B, C]
    before = planner.plan(3, nodes)
    assert before.units == 3 and len(before.nodes) == 3
    # one noisy run: both slowed once; nothing changes
    assert planner._learn_colocation(before, slowed_run()) == ()
    assert planner.plan(3, nodes).units == 3
    assert not model.colocation_facts().groups()
    # two more consistent runs: the third makes the merge
    assert planner._learn_colocation(before, slowed_run(1.9, 2.0)) == ()
    [fact] = planner._learn_colocation(before, slowed_run(2.0, 1.95))
    assert (fact.a, fact.b, fact.colocated, fact.runs) == (KA, KB, True, 3)
    assert fact.strength == pytest.approx(1.95)
    assert model.colocation_facts().groups() == (frozenset({KA, KB}),)
    after = planner.plan(3, nodes)  # within the decision cache's second: the version changed
    assert after.units == 2 and len(after.nodes) == 2 and C in after.nodes
    assert f"{KA} and {KB} share one unit (measured " in after.reason
    assert ", 1.95x, from 3 recorded runs)." in after.reason
    [a, b, _] = identities(planner, nodes)
    assert a.unit == b.unit and a.facts["unit"] == "measured"


def test_a_run_showing_independence_undoes_a_stale_merge() -> None:
    stale = pair(KA, KB, strength=1.9, age=30 * DAY)
    model = calibrated_model(ColocationFacts.of([stale]))
    planner = ExecutionPlanner(cost_model=model, config=model.config)
    assert planner.plan(3, [A, B, C]).units == 2
    assert ", stale)." in planner.plan(3, [A, B, C]).reason
    # a run that sent work to both (forced parallel) finds them at their solo speed together
    forced = ExecutionPlanner(planner.topology, model, offline_config(mode="parallel"))
    run = forced.plan(3, [A, B, C])
    assert len(run.nodes) == 3
    [fact] = forced._learn_colocation(run, [(A, 0.0, 1.02), (B, 0.0, 1.0), (C, 0.0, 1.01)])
    assert (fact.a, fact.b, fact.colocated, fact.source) == (KA, KB, False, "recorded")
    assert not model.colocation_facts().groups()
    plan = planner.plan(3, [A, B, C])
    assert plan.units == 3 and len(plan.nodes) == 3 and "share one unit" not in plan.reason


def test_timings_it_cannot_use_teach_nothing() -> None:
    model = calibrated_model()
    planner = ExecutionPlanner(cost_model=model, config=model.config)
    plan = planner.plan(3, [A, B, C])
    assert planner._learn_colocation(plan, [("x",)]) == ()
    assert planner._learn_colocation(plan, [(A, 2.0, 1.0), (B, 0.0, 1.0)]) == ()
    unknown = ExecutionPlanner(config=offline_config()).plan(3, [A, B, C])  # no speeds known
    assert planner._learn_colocation(unknown, slowed_run()) == ()
    assert model.colocation_facts() == ColocationFacts()


def test_the_decision_cache_notices_new_colocation_facts() -> None:
    facts = [ColocationFacts()]
    topology = NodeTopology(offline_config(), colocation=lambda: facts[0])
    model = calibrated_model()
    planner = ExecutionPlanner(topology, model, model.config)
    assert planner.plan(3, [A, B, C]).units == 3
    facts[0] = ColocationFacts.of([pair(KA, KB)])  # within the cache's second
    assert planner.plan(3, [A, B, C]).units == 2


# -- sollol-locality hosts ---------------------------------------------------------------------


def hosts_output(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, facts: ColocationFacts,
                 *argv: str, max_age: str | None = None) -> str:
    import io

    from sollol_locality.cli import main

    path = tmp_path / "c.json"
    cal = Calibration()
    cal.colocation = facts
    calibration.write(path, cal)
    monkeypatch.setenv("SOLLOL_LOCALITY_CALIBRATION", str(path))
    monkeypatch.delenv("SOLLOL_LOCALITY_TOPOLOGY", raising=False)
    if max_age is None:
        monkeypatch.delenv("SOLLOL_LOCALITY_COLOCATION_MAX_AGE", raising=False)
    else:
        monkeypatch.setenv("SOLLOL_LOCALITY_COLOCATION_MAX_AGE", max_age)
    out = io.StringIO()
    assert main(["hosts", "--nameserver", "127.0.0.1:9", *argv, A, B, C], out=out) == 0
    return out.getvalue()


def test_hosts_shows_who_shares_a_unit_and_when_it_was_measured(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fact = pair(KA, KB, strength=1.93, age=DAY)
    day = time.strftime("%Y-%m-%d", time.gmtime(fact.measured_at))
    text = hosts_output(monkeypatch, tmp_path, ColocationFacts.of([fact]))
    width = len(A)
    assert (f"  {A}  address\n  {'':<{width}}  shares a unit with {KB} (measured {day}, "
            "1.93x)\n") in text
    assert f"shares a unit with {KA} (measured {day}, 1.93x)\n" in text
    assert text.count("shares a unit") == 2  # C shares nothing


def test_hosts_shows_an_old_measurement_as_stale_after_the_configured_age(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import json

    fact = pair(KA, KB, strength=1.93, age=2 * DAY)
    day = time.strftime("%Y-%m-%d", time.gmtime(fact.measured_at))
    facts = ColocationFacts.of([fact])
    fresh = hosts_output(monkeypatch, tmp_path, facts)  # the default age is 7 days
    assert "1.93x)" in fresh and "stale" not in fresh
    stale = hosts_output(monkeypatch, tmp_path, facts, "--json", max_age="1d")
    members = [m for ms in json.loads(stale)["hosts"].values() for m in ms]
    assert [m.get("colocation") for m in members] == [
        [f"shares a unit with {KB} (measured {day}, 1.93x, stale)"],
        [f"shares a unit with {KA} (measured {day}, 1.93x, stale)"],
        None]
    assert [m["unit"] for m in members] == [f"measured:{KA}", f"measured:{KA}", "10.0.0.7/cpu"]


LABELS = [f"10.0.0.{i}:11434" for i in range(1, 6)]


@given(links=st.lists(st.tuples(st.sampled_from(LABELS), st.sampled_from(LABELS),
                                st.booleans()), max_size=8),
       present=st.lists(st.sampled_from(LABELS), min_size=1, max_size=5, unique=True))
@settings(max_examples=60, deadline=None)
def test_measured_units_are_the_groups_among_the_nodes_given(
        links: list[tuple[str, str, bool]], present: list[str]) -> None:
    facts = ColocationFacts.of([PairFact(*sorted((a, b)), colocated, 1.9, 1000.0, "calibrate")
                                for a, b, colocated in links if a != b])
    topology = NodeTopology(offline_config(), colocation=facts)
    described = topology.describe_many([f"http://{label}" for label in present])
    by_label = {i.instance.label: i for i in described if isinstance(i, HostIdentity)}
    groups = facts.groups()
    for a in present:
        group = next((g for g in groups if a in g), frozenset())
        shared = len(group & set(present)) > 1
        assert (by_label[a].facts["unit"] == "measured") == shared
        assert by_label[a].unit.label == (f"measured:{min(group)}" if shared
                                          else by_label[a].own_unit.label)
        for b in present:
            assert (by_label[a].unit == by_label[b].unit) == (a == b or shared and b in group)


def test_a_pair_that_slows_each_other_only_partly_still_runs_together() -> None:
    """Two "machines" measured 1.5x slower together (shared memory bandwidth, not one core)
    stay two units and run together; a pair that slows each other 1.95x (one core) is one
    unit, planned on one of the two, and a third node is not chained into it by a weak pair."""
    partial = calibrated_model(ColocationFacts.of([pair(KA, KB, strength=1.5)]))
    plan = ExecutionPlanner(cost_model=partial, config=partial.config).plan(4, [A, B])
    assert (plan.mode, plan.tasks_per_node, plan.units) == ("parallel", [2, 2], 2)
    chained = calibrated_model(ColocationFacts.of([pair(KA, KB, strength=1.95),
                                                   pair(KA, KC, strength=1.45)]))
    three = ExecutionPlanner(cost_model=chained, config=chained.config).plan(4, [A, B, C])
    assert three.units == 2 and C in three.nodes
    full = calibrated_model(ColocationFacts.of([pair(KA, KB, strength=1.95)]))
    assert ExecutionPlanner(cost_model=full, config=full.config).plan(4, [A, B]).mode == (
        "sequential")


def test_interference_between_separate_units_is_used_pair_by_pair() -> None:
    """Two cores of one VM, two "machines" on each: each pair is one unit (2x), and the two
    units slow each other 1.45x (measured on one pair across them). That slowdown is predicted
    for these two units only, not for every plan across machines: a fifth machine measured
    apart from them keeps its full speed. It is paid per task, not per stream: one node of
    each unit takes 2 x 1.45 solo times for 4 tasks, all four nodes 2 + 0.45 (each unit
    time-shared, each task slowed by the other unit), so the plan runs all four."""
    a1, b1, a2, b2, e = (f"10.0.0.{i}:11434" for i in (5, 6, 7, 8, 9))
    facts = ColocationFacts.of([pair(a1, a2, strength=2.0), pair(b1, b2, strength=2.0),
                                pair(a1, b1, colocated=False, strength=1.45),
                                pair(a1, e, colocated=False, strength=None)])
    model = ParallelismCostModel(offline_config())
    cal = model.calibration
    for key in (a1, b1, a2, b2, e):
        cal.push(cal.task_seconds, f"{key.split(':')[0]}/cpu", 1.0)
    model.update_colocation(facts)
    planner = ExecutionPlanner(cost_model=model, config=model.config)
    urls = [f"http://{k}" for k in (a1, b1, a2, b2)]
    plan = planner.plan(4, urls)
    assert plan.mode == "parallel" and plan.units == 2 and len(plan.nodes) == 4
    assert plan.reason.startswith("Parallel: 4 tasks across 4 nodes on 2 units (")
    assert plan.speedup == pytest.approx(4 / ((2.0 + 0.45) * 1.05), rel=1e-6)
    pairs = planner.plan(4, [urls[0], urls[1]])  # one node of each unit
    assert pairs.speedup == pytest.approx(4 / (2 * 1.45 * 1.05), rel=1e-6)
    assert f"{a1} and {a2} share one unit" in plan.reason
    assert f"{b1} and {b2} share one unit" in plan.reason
    apart = planner.plan(4, [urls[0], f"http://{e}"])  # interference measured: none known
    assert apart.speedup == pytest.approx(4 / (2 * 1.05), rel=1e-6)
