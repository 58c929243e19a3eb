"""colocation: slowdowns, the detector, stored facts, evidence from recorded runs, run counts."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from helpers import FakeClock
from hypothesis import given, settings
from hypothesis import strategies as st

from sollol_locality import CalibrationError, ConfigError
from sollol_locality.colocation import (
    DEFAULT_MAX_AGE,
    DEFAULT_TOLERANCE,
    ColocationFacts,
    PairFact,
    RecordedEvidence,
    describe_colocation,
    detect_colocation,
    facts_from_report,
    simulated_measure,
    simulated_run_counts,
    slowdowns,
    slowed_nodes,
)

DAY = 24 * 3600.0
T0 = 1_764_576_000.0  # 2025-12-01 08:00 UTC


def pairs_of(keys):
    return {frozenset(p) for p in itertools.combinations(keys, 2)}


def counting(measure):
    """Wrap a measure: the list of groups it was asked to run."""
    calls = []

    def wrapped(group):
        calls.append(tuple(group))
        return measure(group)

    return wrapped, calls


# -- slowdowns -----------------------------------------------------------------------------------

def test_slowdowns_divide_by_the_solo_time():
    assert slowdowns({"a": 2.0, "b": 1.0, "c": 4.0}, {"a": 4.0, "b": 1.05}) == {"a": 2.0, "b": 1.05}


@pytest.mark.parametrize(
    ("solo", "together", "message"),
    [
        ({}, {"a": 1.0}, "node 'a' has a concurrent time but no solo time"),
        ({"a": 0.0}, {"a": 1.0}, "solo time of node 'a' is 0.0: expected a positive number of "
                                 "seconds"),
        ({"a": 1.0}, {"a": float("nan")}, "concurrent time of node 'a' is nan: expected a "
                                          "positive number of seconds"),
    ],
)
def test_slowdowns_refuse_bad_times(solo, together, message):
    with pytest.raises(CalibrationError) as info:
        slowdowns(solo, together)
    assert str(info.value) == message


def test_tolerance_separates_noise_from_sharing():
    factors = {"noise": 1.08, "dispatch": 1.05, "gpu": 1.3, "cpu": 2.0, "edge": DEFAULT_TOLERANCE}
    assert slowed_nodes(factors) == {"gpu", "cpu", "edge"}
    assert slowed_nodes(factors, tolerance=1.5) == {"cpu"}


@pytest.mark.parametrize("tolerance", [1.0, 0.5, float("inf"), "1.2"])
def test_tolerance_must_be_above_one(tolerance):
    with pytest.raises(ConfigError) as info:
        slowed_nodes({}, tolerance)
    assert str(info.value) == f"Invalid tolerance {tolerance!r}: expected a number above 1.0"
    assert isinstance(info.value, ValueError)


# -- the detector --------------------------------------------------------------------------------

def cluster(layout, *, jitter=0.05, contention=0.0, interference=0.0, seed=1):
    """Nodes named after the layout, each solo 1.0 s, and a simulated measure over it."""
    nodes = list(layout)
    solo = dict.fromkeys(nodes, 1.0)
    measure = simulated_measure(layout, solo, jitter=jitter, contention=contention,
                                interference=interference, rng=random.Random(seed))
    return nodes, solo, measure


def test_independent_nodes_are_cleared_by_one_run():
    nodes, solo, measure = cluster({f"n{i}": i for i in range(8)})
    report = detect_colocation(nodes, solo, measure)
    assert report.run_count == 1
    assert report.runs[0].purpose == "all" and report.runs[0].members == tuple(nodes)
    assert report.groups == ()
    assert report.independent == pairs_of(nodes)
    assert report.untested_pairs == frozenset() and report.untested_nodes == ()
    assert not report.budget_exhausted


def test_a_hidden_pair_is_found_and_confirmed_by_its_pair_run():
    nodes, solo, measure = cluster({"a": 0, "b": 1, "c": 1, "d": 2}, jitter=0.0)
    report = detect_colocation(nodes, solo, measure)
    assert [r.members for r in report.runs] == [("a", "b", "c", "d"), ("c", "b")]
    assert [g.members for g in report.groups] == [frozenset({"b", "c"})]
    assert report.groups[0].strength == 2.0
    assert report.groups[0].pairs == ((frozenset({"b", "c"}), 2.0),)
    assert report.independent == pairs_of(nodes) - {frozenset({"b", "c"})}
    assert report.unit_of("b") == {"b", "c"} and report.unit_of("a") == {"a"}


def test_a_suspect_among_several_units_is_confirmed_by_a_pair_run():
    layout = {"a1": "A", "b1": "B", "a2": "A", "b2": "B", "solo": "S"}
    nodes, solo, measure = cluster(layout, jitter=0.0, contention=0.2)
    report = detect_colocation(nodes, solo, measure)
    assert [(r.purpose, r.members) for r in report.runs] == [
        ("all", ("a1", "b1", "a2", "b2", "solo")),
        ("test", ("b1", "a1")),             # b1 shares nothing with a1: a unit of its own
        ("test", ("a2", "a1", "b1")),       # a1 slows with it...
        ("confirm", ("a2", "a1")),          # ...confirmed alone
        ("test", ("b2", "a1", "b1")),
        ("confirm", ("b2", "b1")),
    ]
    assert {g.members for g in report.groups} == {frozenset({"a1", "a2"}),
                                                  frozenset({"b1", "b2"})}
    assert all(g.strength == pytest.approx(2.4) for g in report.groups)
    assert frozenset({"a1", "b2"}) in report.independent  # through the units measured apart


def test_units_that_slow_each_other_a_little_are_not_chained_into_one():
    """Two cores of one VM, two nodes on each: a pair on one core slows 2x, nodes on the two
    cores slow each other 1.45x (memory bandwidth). The weak link a1-b1 is interference, not a
    unit, so b1 is tested on its own and both real pairs are found."""
    layout = {"a1": "A", "b1": "B", "a2": "A", "b2": "B"}
    nodes, solo, measure = cluster(layout, jitter=0.0, interference=0.45)
    report = detect_colocation(nodes, solo, measure)
    assert {g.members for g in report.groups} == {frozenset({"a1", "a2"}),
                                                  frozenset({"b1", "b2"})}
    assert all(g.strength == pytest.approx(2.0) for g in report.groups)
    assert report.interference == ((frozenset({"a1", "b1"}), pytest.approx(1.45)),)
    assert frozenset({"a1", "b1"}) not in report.independent
    assert report.untested_pairs == frozenset()
    assert report.run_count == 6  # all, b1 (its pair run), a2 and b2 each tested and confirmed
    facts = facts_from_report(report, 1.0)
    weak = facts.fact("a1", "b1")
    assert weak is not None and (weak.colocated, weak.source) == (False, "calibrate")
    assert weak.strength == pytest.approx(1.45)
    assert {frozenset(u) for u in facts.units()} == {frozenset({"a1", "a2"}),
                                                     frozenset({"b1", "b2"})}


def test_the_unit_strength_is_a_setting():
    nodes, solo, measure = cluster({"a": "A", "b": "B"}, jitter=0.0, interference=0.45)
    assert detect_colocation(nodes, solo, measure).groups == ()
    merged = detect_colocation(nodes, solo, measure, unit_strength=1.3)
    assert [g.members for g in merged.groups] == [frozenset({"a", "b"})]
    with pytest.raises(ConfigError, match="unit_strength 1.1"):
        detect_colocation(nodes, solo, measure, unit_strength=1.1)


def test_a_node_slowed_only_by_noise_is_not_merged():
    nodes, solo, simulated = cluster({"a": 0, "b": 1, "c": 2}, jitter=0.0)

    def measure(group):
        times = dict(simulated(group))
        if len(group) == 3:  # a hiccup on two nodes during the all-nodes run only
            times["a"] *= 1.4
            times["b"] *= 1.3
        return times

    report = detect_colocation(nodes, solo, measure)
    assert report.groups == ()
    assert report.independent == pairs_of(nodes)
    assert report.run_count == 2


def test_a_slowdown_shared_by_every_run_makes_no_false_unit():
    # the dispatching machine slows every member of a big run a little (2% per member: 1.6x at
    # 30), so every node looks slowed in the all-nodes run; the test runs clear them
    n = 30
    nodes, solo, simulated = cluster({f"n{i}": i for i in range(n)})

    def measure(group):
        return {k: t * (1 + 0.02 * len(group)) for k, t in simulated(group).items()}

    report = detect_colocation(nodes, solo, measure)
    assert report.groups == ()
    assert report.independent == pairs_of(nodes)
    assert report.run_count == n
    assert report.runs[-1].baseline > 1.5


def test_a_slowdown_shared_by_every_run_hides_no_real_unit():
    n = 16
    nodes, solo, simulated = cluster({f"n{i}": i // 4 for i in range(n)}, seed=3)

    def measure(group):
        return {k: t * (1 + 0.02 * len(group)) for k, t in simulated(group).items()}

    report = detect_colocation(nodes, solo, measure)
    assert {g.members for g in report.groups} == {
        frozenset(f"n{i}" for i in range(u * 4, u * 4 + 4)) for u in range(4)}
    assert report.run_count <= 2 * n - 1


@pytest.mark.parametrize("n", [4, 8, 16, 30])
@pytest.mark.parametrize("layout", ["independent", "one_pair", "two_units", "pairs"])
def test_the_run_count_is_linear_and_the_units_are_exact(n, layout):
    units = {
        "independent": lambda i: i,
        "one_pair": lambda i: min(i, n - 2),
        "two_units": lambda i: i % 2,
        "pairs": lambda i: i // 2,
    }[layout]
    nodes, solo, measure = cluster({f"n{i}": units(i) for i in range(n)})
    measure, calls = counting(measure)
    report = detect_colocation(nodes, solo, measure)
    assert report.run_count == len(calls) <= 2 * n - 1
    expected = {}
    for i in range(n):
        expected.setdefault(units(i), set()).add(f"n{i}")
    assert {g.members for g in report.groups} == {frozenset(m) for m in expected.values()
                                                  if len(m) > 1}
    assert report.untested_pairs == frozenset()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=2, max_size=12), st.integers(0, 2**16))
def test_the_detector_recovers_any_partition_in_linear_runs(assignment, seed):
    layout = {f"n{i}": unit for i, unit in enumerate(assignment)}
    nodes, solo, measure = cluster(layout, seed=seed)
    report = detect_colocation(nodes, solo, measure)
    n = len(nodes)
    assert report.run_count <= 2 * n - 1
    truth = {}
    for key, unit in layout.items():
        truth.setdefault(unit, set()).add(key)
    assert {g.members for g in report.groups} == {frozenset(m) for m in truth.values()
                                                  if len(m) > 1}
    together = {p for g in report.groups for p in pairs_of(g.members)}
    assert together.isdisjoint(report.independent)
    assert together | report.independent == pairs_of(nodes)


def test_a_run_budget_stops_the_search_and_reports_what_is_left():
    layout = {f"n{i}": i // 2 for i in range(8)}  # four hidden pairs: every node slows
    nodes, solo, measure = cluster(layout, jitter=0.0)
    report = detect_colocation(nodes, solo, measure, max_runs=3)
    assert report.run_count == 3 and report.budget_exhausted
    # all, then n1 against n0 (a pair: confirmed by that run), then n2 against n0
    assert [g.members for g in report.groups] == [frozenset({"n0", "n1"})]
    assert report.untested_nodes == ("n3", "n4", "n5", "n6", "n7")
    assert frozenset({"n3", "n4"}) in report.untested_pairs
    assert frozenset({"n0", "n2"}) in report.independent
    decided = {p for g in report.groups for p in pairs_of(g.members)} | report.independent
    assert decided | report.untested_pairs == pairs_of(nodes)
    assert decided.isdisjoint(report.untested_pairs)


def test_a_time_budget_reads_the_injected_clock():
    clock = FakeClock()
    layout = {f"n{i}": i // 2 for i in range(6)}
    nodes, solo, simulated = cluster(layout, jitter=0.0)

    def measure(group):
        times = simulated(group)
        clock.tick(max(times.values()))
        return times

    # the all-nodes run takes 2 s; each test run is estimated at 2 s (its members' worst)
    report = detect_colocation(nodes, solo, measure, max_seconds=5.0, clock=clock)
    assert report.run_count == 2 and report.budget_exhausted
    assert report.untested_nodes == ("n2", "n3", "n4", "n5")
    assert detect_colocation(nodes, solo, measure, max_seconds=0.5, clock=clock).runs == ()


def test_a_budget_reached_before_a_confirmation_leaves_that_node_untested():
    layout = {"a1": "A", "b1": "B", "a2": "A", "b2": "B"}
    nodes, solo, measure = cluster(layout, jitter=0.0)
    report = detect_colocation(nodes, solo, measure, max_runs=3)
    assert [r.purpose for r in report.runs] == ["all", "test", "test"]  # no run left to confirm
    assert report.untested_nodes == ("a2", "b2")
    assert report.untested_pairs == {frozenset(p) for p in
                                     [("a1", "a2"), ("a1", "b2"), ("b1", "b2"), ("a2", "b2")]}
    assert report.independent == {frozenset({"a1", "b1"}), frozenset({"a2", "b1"})}
    assert report.groups == ()


def test_no_budget_for_the_first_run_leaves_everything_untested():
    nodes, solo, measure = cluster({"a": 0, "b": 1})
    report = detect_colocation(nodes, solo, measure, max_runs=0)
    assert report.run_count == 0 and report.budget_exhausted
    assert report.untested_nodes == ("a", "b")
    assert report.untested_pairs == {frozenset({"a", "b"})}


def test_one_node_needs_no_run():
    report = detect_colocation(["a"], {"a": 1.0}, lambda group: pytest.fail("no run expected"))
    assert report.run_count == 0 and report.groups == () and report.untested_pairs == frozenset()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"nodes": ["a", "a"]}, ConfigError, "Invalid nodes ['a', 'a']: each node must be given "
                                             "once"),
        ({"max_runs": -1}, ConfigError, "Invalid max_runs -1: expected a whole number >= 0"),
        ({"max_seconds": -2.0}, ConfigError, "Invalid max_seconds -2.0: expected seconds >= 0"),
        ({"max_confirmations_per_node": 0}, ConfigError,
         "Invalid max_confirmations_per_node 0: expected a whole number >= 1"),
        ({"solo": {"a": 1.0}}, CalibrationError, "node 'b' has no solo time"),
        ({"measure": lambda group: {"a": 1.0}}, CalibrationError,
         "measure() gave None for node 'b' in a run of ['a', 'b']: expected its time in seconds"),
        ({"measure": lambda group: {"a": 1.0, "b": -1.0}}, CalibrationError,
         "measure() gave -1.0 for node 'b' in a run of ['a', 'b']: expected its time in seconds"),
    ],
)
def test_detector_refuses_bad_input(kwargs, error, message):
    args = {"nodes": ["a", "b"], "solo": {"a": 1.0, "b": 1.0},
            "measure": lambda group: dict.fromkeys(group, 1.0)}
    args.update(kwargs)
    with pytest.raises(error) as info:
        detect_colocation(args.pop("nodes"), args.pop("solo"), args.pop("measure"), **args)
    assert str(info.value) == message


def test_keys_are_opaque_hashables():
    layout = {("10.0.0.5", 11434): 0, ("10.0.0.6", 11434): 0, ("10.0.0.7", 11434): 1}
    nodes, solo, measure = cluster(layout, jitter=0.0)
    report = detect_colocation(nodes, solo, measure)
    assert [g.members for g in report.groups] == [frozenset(nodes[:2])]


# -- run-count figures ---------------------------------------------------------------------------

def test_simulated_run_counts_are_linear():
    figures = simulated_run_counts((4, 8, 16, 30))
    assert set(figures) == {4, 8, 16, 30}
    for n, counts in figures.items():
        assert counts["independent"] == 1
        assert counts["one_pair"] == 2
        assert counts["two_units"] <= 2 * n - 1
    assert figures[30]["two_units"] < 435 // 7


def test_simulated_run_counts_refuse_a_size_below_two():
    with pytest.raises(ConfigError) as info:
        simulated_run_counts((1,))
    assert str(info.value) == "Invalid size 1: expected a whole number >= 2"


# -- stored facts --------------------------------------------------------------------------------

def fact(a, b, colocated=True, *, at=T0, strength=1.9, source="calibrate", runs=1):
    return PairFact(a, b, colocated, strength, at, source, runs)


keys = st.sampled_from(["10.0.0.5:11434", "10.0.0.6:11434", "10.0.0.7:11434", "pod-a:11434",
                        "[::1]:11435"])
facts_strategy = st.builds(
    lambda pair, colocated, strength, at, source, runs: PairFact(
        *sorted(pair), colocated, strength, at, source, runs),
    st.lists(keys, min_size=2, max_size=2, unique=True),
    st.booleans(),
    st.one_of(st.none(), st.floats(0.5, 5.0)),
    st.floats(0, 2e9),
    st.sampled_from(["calibrate", "recorded"]),
    st.integers(1, 10),
)
fact_sets = st.lists(facts_strategy, max_size=8).map(ColocationFacts.of)


@given(fact_sets)
def test_facts_round_trip_through_json(facts):
    assert ColocationFacts.from_dict(json.loads(json.dumps(facts.to_dict()))) == facts


@given(fact_sets, fact_sets, fact_sets)
def test_merge_is_commutative_associative_and_idempotent(x, y, z):
    assert x.merge(y) == y.merge(x)
    assert x.merge(y).merge(z) == x.merge(y.merge(z))
    assert x.merge(x) == x


@given(fact_sets)
def test_groups_partition_the_colocated_keys(facts):
    groups = facts.groups()
    members = [k for g in groups for k in g]
    assert len(members) == len(set(members))
    assert set(members) == {k for f in facts.pairs.values() if f.colocated for k in f.pair}
    for f in facts.pairs.values():
        if f.colocated:
            assert facts.colocated(f.a, f.b)


def test_the_newer_measurement_wins_per_pair():
    old = ColocationFacts.of([fact("a", "b", True, at=T0), fact("a", "c", False, at=T0)])
    new = ColocationFacts.of([fact("a", "b", False, at=T0 + DAY, strength=None)])
    merged = old.merge(new)
    assert merged.fact("b", "a") == new.fact("a", "b")
    assert merged.fact("a", "c") == old.fact("a", "c")
    assert merged.groups() == ()
    assert new.merge(old) == merged


def test_groups_are_the_connected_components():
    facts = ColocationFacts.of([fact("a", "b"), fact("b", "c"), fact("x", "y"),
                                fact("a", "x", False)])
    assert facts.groups() == (frozenset("abc"), frozenset("xy"))
    assert facts.colocated("a", "c") and not facts.colocated("a", "x")


def test_staleness_follows_the_configured_age():
    facts = ColocationFacts.of([fact("a", "b", at=T0)])
    assert not facts.is_stale(T0 + 6 * DAY)
    assert facts.is_stale(T0 + 8 * DAY)
    assert not facts.is_stale(T0 + 8 * DAY, max_age=10 * DAY)
    assert facts.stale(T0 + DEFAULT_MAX_AGE + 1) == (facts.fact("a", "b"),)


def test_the_hosts_text_names_the_partner_and_the_date():
    facts = ColocationFacts.of([fact("10.0.0.5:11434", "10.0.0.6:11434", at=T0, strength=1.93),
                                fact("10.0.0.5:11434", "10.0.0.7:11434", False, at=T0),
                                fact("10.0.0.4:11434", "10.0.0.5:11434", at=T0 - 9 * DAY,
                                     source="recorded", runs=3)])
    assert describe_colocation(facts, "10.0.0.5:11434", now=T0 + DAY) == (
        "shares a unit with 10.0.0.6:11434 (measured 2025-12-01, 1.93x)",
        "shares a unit with 10.0.0.4:11434 (measured 2025-11-22, 1.90x, from 3 recorded runs, "
        "stale)",
    )
    assert facts.fact("10.0.0.5:11434", "10.0.0.7:11434").describe(T0) == (
        "measured 2025-12-01, 1.90x")
    assert describe_colocation(facts, "10.0.0.7:11434", now=T0) == ()
    assert describe_colocation(facts, "10.0.0.6:11434", now=T0 + DAY) == (
        "shares a unit with 10.0.0.5:11434 (measured 2025-12-01, 1.93x)",
        "shares a unit with 10.0.0.4:11434 (through 10.0.0.5:11434)",
    )


def test_facts_built_directly_are_checked_and_read_only():
    facts = ColocationFacts({("a", "b"): fact("a", "b")})
    with pytest.raises(TypeError):
        facts.pairs[("a", "c")] = fact("a", "c")
    with pytest.raises(CalibrationError) as info:
        ColocationFacts({("a", "c"): fact("a", "b")})
    assert str(info.value).startswith("ColocationFacts.pairs[('a', 'c')] is PairFact(a='a', ")


def test_a_detector_report_becomes_facts():
    nodes, solo, measure = cluster({"a": 0, "b": 1, "c": 1}, jitter=0.0)
    facts = facts_from_report(detect_colocation(nodes, solo, measure), T0)
    assert facts.groups() == (frozenset({"b", "c"}),)
    assert facts.fact("b", "c") == PairFact("b", "c", True, 2.0, T0, "calibrate")
    assert facts.fact("a", "b") == PairFact("a", "b", False, None, T0, "calibrate")
    assert len(facts) == 3


def good_pair(**changes):
    item = {"a": "x", "b": "y", "colocated": True, "strength": 1.5, "measured_at": T0,
            "source": "calibrate", "runs": 1}
    item.update(changes)
    return item


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "colocation is []: expected an object"),
        ({"version": 2, "pairs": []}, "colocation.version is 2: expected 1"),
        ({"version": 1}, "colocation.pairs is None: expected a list"),
        ({"version": 1, "pairs": ["x"]}, "colocation.pairs[0] is 'x': expected an object"),
        ({"version": 1, "pairs": [{"a": "x"}]}, "colocation.pairs[0].b is missing"),
        ({"version": 1, "pairs": [good_pair(a="")]},
         "colocation.pairs[0].a is '': expected an instance key (a non-empty string)"),
        ({"version": 1, "pairs": [good_pair(a="z")]},
         "colocation.pairs[0].b is 'y': expected a key sorting after a = 'z' (one fact per "
         "unordered pair)"),
        ({"version": 1, "pairs": [good_pair(colocated=1)]},
         "colocation.pairs[0].colocated is 1: expected true or false"),
        ({"version": 1, "pairs": [good_pair(), good_pair(strength="2x")]},
         "colocation.pairs[1].strength is '2x': expected a positive number or null"),
        ({"version": 1, "pairs": [good_pair(measured_at=-1)]},
         "colocation.pairs[0].measured_at is -1: expected seconds since the epoch (a number "
         ">= 0)"),
        ({"version": 1, "pairs": [good_pair(source="guess")]},
         "colocation.pairs[0].source is 'guess': expected one of 'calibrate', 'recorded'"),
        ({"version": 1, "pairs": [good_pair(runs=0)]},
         "colocation.pairs[0].runs is 0: expected a whole number >= 1"),
        ({"version": 1, "pairs": [good_pair(), good_pair()]},
         "colocation.pairs[1] repeats the pair 'x', 'y'"),
    ],
)
def test_from_dict_names_the_bad_field(data, message):
    with pytest.raises(CalibrationError) as info:
        ColocationFacts.from_dict(data)
    assert str(info.value) == message


def test_from_dict_ignores_unknown_fields():
    facts = ColocationFacts.from_dict({"version": 1, "note": "x",
                                       "pairs": [good_pair(extra=True)]})
    assert facts.fact("x", "y") == PairFact("x", "y", True, 1.5, T0, "calibrate")


def test_a_pair_fact_is_validated_when_built():
    with pytest.raises(CalibrationError) as info:
        PairFact("b", "a", True, 1.5, T0, "calibrate")
    assert str(info.value) == ("PairFact.b is 'a': expected a key sorting after a = 'b' (one "
                               "fact per unordered pair)")


# -- evidence from recorded runs -----------------------------------------------------------------

def run_of(slow_a, slow_b, *, others=(), a="a", b="b", overlap=1.0):
    """Timings of one recorded run: a and b start together, each one task of 1.0 s expected,
    taking ``slow_*`` seconds; b starts late so that the overlap is ``overlap`` of the shorter."""
    shorter = min(slow_a, slow_b)
    b_start = shorter * (1.0 - overlap)
    timings = [(a, 0.0, slow_a), (b, b_start, b_start + slow_b)]
    for name, seconds in others:
        timings.append((name, 0.0, seconds))
    expected = dict.fromkeys([a, b, *(n for n, _ in others)], 1.0)
    return timings, expected


def test_three_consistent_runs_merge_and_the_reason_counts_them():
    evidence = RecordedEvidence()
    for day in range(2):
        assert evidence.add_run(*run_of(1.9, 2.0, others=[("c", 1.02)]),
                                measured_at=T0 + day) == ()
    changed = evidence.add_run(*run_of(2.1, 1.95, others=[("c", 1.0)]), measured_at=T0 + 2)
    assert changed == (PairFact("a", "b", True, 1.95, T0 + 2, "recorded", runs=3),)
    assert evidence.colocated("a", "b") and not evidence.colocated("a", "c")
    assert evidence.facts().groups() == (frozenset({"a", "b"}),)
    assert evidence.evidence("b", "a").slowed == 3


def test_consistent_weak_slowdowns_are_interference_between_separate_units():
    """Three runs at 1.4x each: not one unit (a shared core costs about 2x), but a measured
    interference the cost model applies; reported once, and again only when it moves."""
    evidence = RecordedEvidence()
    for day in range(2):
        assert evidence.add_run(*run_of(1.4, 1.42), measured_at=T0 + day) == ()
    changed = evidence.add_run(*run_of(1.38, 1.4), measured_at=T0 + 2)
    assert [(f.pair, f.colocated, f.runs) for f in changed] == [(("a", "b"), False, 3)]
    assert changed[0].strength == pytest.approx(1.41)
    assert not evidence.colocated("a", "b") and evidence.facts().units() == ()
    assert evidence.add_run(*run_of(1.41, 1.4), measured_at=T0 + 3) == ()  # the same figure
    assert evidence.add_run(*run_of(1.9, 1.9), measured_at=T0 + 4) == ()  # median 1.41 still


def test_one_noisy_run_does_not_merge():
    evidence = RecordedEvidence()
    assert evidence.add_run(*run_of(2.5, 2.2), measured_at=T0) == ()
    assert not evidence.colocated("a", "b")
    assert evidence.facts().groups() == ()


def test_contradicting_runs_block_a_merge():
    evidence = RecordedEvidence()
    evidence.add_run(*run_of(1.05, 1.6), measured_at=T0)  # only one of them slowed
    evidence.add_run(*run_of(1.0, 1.0, overlap=0.6), measured_at=T0 + 1)  # not clean: 60%
    for i in range(3):
        evidence.add_run(*run_of(2.0, 2.0), measured_at=T0 + 2 + i)
    assert evidence.evidence("a", "b").contradicting == 2
    assert not evidence.colocated("a", "b")  # 2 of 5 runs contradict: more than a quarter
    evidence.add_run(*run_of(2.0, 2.0), measured_at=T0 + 9)
    evidence.add_run(*run_of(2.0, 2.0), measured_at=T0 + 10)
    assert not evidence.colocated("a", "b")  # 2 of 7
    evidence.add_run(*run_of(2.0, 2.0), measured_at=T0 + 11)
    assert evidence.colocated("a", "b")  # 2 of 8


def test_a_later_clean_run_undoes_a_stale_merge():
    known = ColocationFacts.of([fact("a", "b", at=T0 - 30 * DAY)])  # from an old calibration
    assert known.is_stale(T0)
    evidence = RecordedEvidence(known=known)
    assert evidence.colocated("a", "b")
    # partial overlap or a noisy slow one is not enough to undo it
    assert evidence.add_run(*run_of(1.0, 1.05, overlap=0.6), measured_at=T0) == ()
    assert evidence.add_run(*run_of(1.0, 1.7), measured_at=T0 + 1) == ()
    assert evidence.colocated("a", "b")
    changed = evidence.add_run(*run_of(1.02, 1.0, overlap=0.9), measured_at=T0 + 2)
    assert [(f.pair, f.colocated, f.measured_at) for f in changed] == [
        (("a", "b"), False, T0 + 2)]
    assert not evidence.colocated("a", "b")
    # saved into the file that still holds the old merge: the newer measurement wins there
    assert known.merge(evidence.facts()).groups() == ()


def test_facts_saved_by_another_process_are_taken_newest_first():
    evidence = RecordedEvidence()
    for i in range(3):
        evidence.add_run(*run_of(2.0, 2.0), measured_at=T0 + i)
    evidence.know(ColocationFacts.of([fact("a", "b", False, at=T0 - DAY, strength=None),
                                      fact("c", "d", at=T0 - DAY)]))
    assert evidence.facts().groups() == (frozenset("ab"), frozenset("cd"))
    evidence.know(ColocationFacts.of([fact("a", "b", False, at=T0 + DAY, strength=None)]))
    assert evidence.facts().groups() == (frozenset("cd"),)


def test_an_undone_recorded_merge_needs_three_new_runs():
    evidence = RecordedEvidence()
    for i in range(3):
        evidence.add_run(*run_of(2.0, 2.0), measured_at=T0 + i)
    assert evidence.colocated("a", "b")
    evidence.add_run(*run_of(1.0, 1.0), measured_at=T0 + 3)
    assert not evidence.colocated("a", "b")
    for i in range(2):
        evidence.add_run(*run_of(2.0, 2.0), measured_at=T0 + 4 + i)
    assert not evidence.colocated("a", "b")
    evidence.add_run(*run_of(2.0, 2.0), measured_at=T0 + 6)
    assert evidence.colocated("a", "b")


def test_two_slowed_pairs_at_once_are_ambiguous():
    evidence = RecordedEvidence()
    timings = [(n, 0.0, 2.0) for n in "abcd"]  # (a, b) and (c, d) share, all overlapped
    expected = dict.fromkeys("abcd", 1.0)
    for i in range(5):
        evidence.add_run(timings, expected, measured_at=T0 + i)
    assert evidence.facts().groups() == ()
    assert evidence.evidence("a", "c") == evidence.evidence("a", "b")
    assert evidence.evidence("a", "b").slowed == 0


def test_a_known_unit_explains_its_own_slowdown():
    known = ColocationFacts.of([fact("c", "d")])
    evidence = RecordedEvidence(known=known)
    timings = [(n, 0.0, 2.0) for n in "abcd"]
    expected = dict.fromkeys("abcd", 1.0)
    # c and d slow each other (a known unit), but a and b also see c and d slowed, and c or d
    # may be what slows them: ambiguous, no evidence for any pair.
    for i in range(3):
        evidence.add_run(timings, expected, measured_at=T0 + i)
    assert evidence.facts().groups() == (frozenset("cd"),)
    # with the known unit run apart from them, a and b are found
    for i in range(3):
        evidence.add_run(*run_of(2.0, 2.0, others=[("c", 1.0)]), measured_at=T0 + 5 + i)
    assert evidence.facts().groups() == (frozenset("ab"), frozenset("cd"))


def test_tasks_that_did_not_overlap_give_no_evidence():
    evidence = RecordedEvidence()
    timings = [("a", 0.0, 2.0), ("b", 2.0, 4.0)]  # one after the other
    for i in range(4):
        evidence.add_run(timings, {"a": 1.0, "b": 1.0}, measured_at=T0 + i)
    assert evidence.evidence("a", "b") == evidence.evidence("x", "y")
    assert not evidence.colocated("a", "b")


def test_several_tasks_per_node_use_the_overlapping_ones():
    evidence = RecordedEvidence()
    # a runs three tasks; only the first overlaps b, and both are slowed then
    timings = [("a", 0.0, 2.0), ("a", 2.0, 3.0), ("a", 3.0, 4.0), ("b", 0.0, 2.0)]
    for i in range(3):
        evidence.add_run(timings, {"a": 1.0, "b": 1.0}, measured_at=T0 + i)
    assert evidence.colocated("a", "b")


@pytest.mark.parametrize(
    ("timings", "expected", "message"),
    [
        ([("a", 0.0)], {"a": 1.0}, "timing ('a', 0.0): expected (node, start_s, end_s)"),
        ([("a", 2.0, 1.0)], {"a": 1.0},
         "timing ('a', 2.0, 1.0): expected finite times with end_s >= start_s"),
        ([(3, 0.0, 1.0)], {"a": 1.0}, "timing (3, 0.0, 1.0): node must be an instance key"),
        ([("a", 0.0, 1.0)], {}, "node 'a' has no positive expected time (got None)"),
    ],
)
def test_recorded_runs_refuse_bad_timings(timings, expected, message):
    with pytest.raises(CalibrationError) as info:
        RecordedEvidence().add_run(timings, expected, measured_at=T0)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_runs": 0}, "Invalid min_runs 0: expected a whole number >= 1"),
        ({"max_contradicting": 1.5}, "Invalid max_contradicting 1.5: expected a fraction from 0 "
                                     "to 1"),
        ({"tolerance": 0.9}, "Invalid tolerance 0.9: expected a number above 1.0"),
    ],
)
def test_recorded_evidence_refuses_bad_settings(kwargs, message):
    with pytest.raises(ConfigError) as info:
        RecordedEvidence(**kwargs)
    assert str(info.value) == message
