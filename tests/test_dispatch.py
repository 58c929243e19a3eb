"""Dispatching a plan (sollol_locality._dispatch): in-process fake calls, then emulator nodes.

The fake calls count what is in flight per node under a lock and are ordered with Events and
Barriers, never by sleeping. The emulator tests make real HTTP ``/api/generate`` calls to Ollama
emulators on loopback.
"""

from __future__ import annotations

import inspect
import json
import logging
import signal
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from helpers import FakeClock
from hypothesis import given, settings
from hypothesis import strategies as st

from sollol_locality._dispatch import (
    DispatchEvent,
    NodeHealth,
    dispatch,
    node_key,
)
from sollol_locality._errors import DispatchError, InvalidNodeAddress, LocalityError

# The Ollama emulator: the one place it is imported (it is moving into the package).
from sollol_locality.testing.emulator import EmulatorProcess, start_emulator

A, B, C, D = "http://a:1", "http://b:2", "http://c:3", "http://d:4"
GATE = 10.0  # seconds a Barrier waits before the test fails instead of hanging


@dataclass
class Plan:
    mode: str
    nodes: list[Any]
    tasks_per_node: list[int]
    concurrency_per_node: list[int]


def parallel(shares: dict[str, int], slots: dict[str, int] | None = None) -> Plan:
    nodes = list(shares)
    return Plan("parallel", nodes, [shares[n] for n in nodes],
                [(slots or {}).get(n, 1) for n in nodes])


def sequential(node: str, tasks: int) -> Plan:
    return Plan("sequential", [node], [tasks], [1])


class Calls:
    """A fake ``call``: counts calls in flight per node (peak kept), records every call, and can
    fail on chosen nodes or tasks or wait at a per-node Barrier while in flight."""

    def __init__(self, *, down: Sequence[str] = (),
                 barriers: dict[str, threading.Barrier] | None = None,
                 before: Callable[[str, int], None] | None = None) -> None:
        self.lock = threading.Lock()
        self.in_flight: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.calls: list[tuple[str, int]] = []
        self.down = set(down)
        self.barriers = barriers or {}
        self.before = before

    def __call__(self, node: str, task: int) -> str:
        with self.lock:
            self.calls.append((node, task))
            self.in_flight[node] += 1
            self.peak[node] = max(self.peak[node], self.in_flight[node])
        try:
            if self.before is not None:
                self.before(node, task)
            if node in self.down:
                raise ConnectionError(f"{node} is down")
            if node in self.barriers:
                self.barriers[node].wait(GATE)
            return f"result {task} from {node}"
        finally:
            with self.lock:
                self.in_flight[node] -= 1

    def nodes_of(self, task: int) -> list[str]:
        return [node for node, t in self.calls if t == task]


class Events(list[DispatchEvent]):
    def __call__(self, event: DispatchEvent) -> None:
        self.append(event)

    def summary(self) -> list[tuple[str, int, str, int]]:
        return [(e.kind, e.task, e.node, e.attempt) for e in self]


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    """Every test ends with as many threads as it started with: workers exit."""
    before = threading.active_count()
    yield
    assert threading.active_count() == before


# ------------------------------------------------------------------------------ in order


def test_results_come_back_in_task_order() -> None:
    calls = Calls()
    result = dispatch(parallel({A: 3, B: 2, C: 1}), list(range(6)), calls)
    assert result.results == tuple(f"result {t} from {calls.nodes_of(t)[0]}" for t in range(6))
    assert [timing[0] for timing in result.timings] == [calls.nodes_of(t)[0] for t in range(6)]
    assert Counter(node for node, _ in calls.calls) == {A: 3, B: 2, C: 1}
    assert result.failed_nodes == () and len(result.attempts) == 6


@pytest.mark.parametrize(
    ("shares", "expected"),
    [
        ({A: 3, B: 3}, [A, B, A, B, A, B]),
        ({A: 1, B: 3}, [B, A, B, B]),
        ({A: 4, B: 2}, [A, B, A, A, B, A]),
        ({A: 2, B: 0, C: 1}, [A, C, A]),
    ],
)
def test_tasks_are_dealt_in_order_by_share(shares: dict[str, int], expected: list[str]) -> None:
    calls = Calls()
    result = dispatch(parallel(shares), list(range(len(expected))), calls)
    assert [timing[0] for timing in result.timings] == expected


def test_sequential_plan_runs_one_call_at_a_time_in_order() -> None:
    calls = Calls()
    result = dispatch(sequential(A, 5), list(range(5)), calls)
    assert calls.calls == [(A, t) for t in range(5)]
    assert calls.peak[A] == 1
    assert result.results == tuple(f"result {t} from {A}" for t in range(5))


def test_empty_batch() -> None:
    result = dispatch(Plan("sequential", [A], [0], [1]), [], Calls())
    assert result.results == () and result.timings == () and result.attempts == ()


def test_timings_come_from_the_injected_clock() -> None:
    clock = FakeClock(50.0)

    def call(node: str, task: int) -> int:
        clock.tick(2.0)  # the call "takes" 2 s on the fake clock
        return task

    result = dispatch(sequential(A, 3), [0, 1, 2], call, clock=clock)
    assert result.timings == ((A, 0.0, 2.0), (A, 2.0, 4.0), (A, 4.0, 6.0))
    assert result.wall_seconds == 6.0
    assert [(a.task, a.attempt, a.start_s, a.end_s) for a in result.attempts] == [
        (0, 1, 0.0, 2.0), (1, 1, 2.0, 4.0), (2, 1, 4.0, 6.0)]


# ------------------------------------------------------------------------ per-node bound


def test_per_node_concurrency_is_reached_and_never_exceeded() -> None:
    slots = {A: 1, B: 2, C: 4}
    shares = {A: 3, B: 6, C: 12}  # whole rounds of each node's Barrier
    # A Barrier of `slots` parties per node: a round passes only when the node has exactly that
    # many calls in flight, so the peak is reached; the counter shows it is never passed.
    barriers = {node: threading.Barrier(count) for node, count in slots.items()}
    calls = Calls(barriers=barriers)
    result = dispatch(parallel(shares, slots), list(range(21)), calls)
    assert dict(calls.peak) == slots
    assert Counter(timing[0] for timing in result.timings) == shares


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(1, 4)), min_size=1, max_size=4))
def test_every_task_runs_once_within_the_bound(spec: list[tuple[int, int]]) -> None:
    nodes = [f"http://n{i}:1" for i in range(len(spec))]
    plan = Plan("parallel", nodes, [s for s, _ in spec], [c for _, c in spec])
    count = sum(s for s, _ in spec)
    calls = Calls()
    result = dispatch(plan, list(range(count)), calls)
    assert sorted(t for _, t in calls.calls) == list(range(count))
    assert result.results == tuple(f"result {t} from {calls.nodes_of(t)[0]}" for t in range(count))
    for node, (_, slots) in zip(nodes, spec, strict=True):
        assert calls.peak[node] <= slots


def test_steal_off_by_default_each_node_runs_its_share() -> None:
    calls, seen_a = run_with_idle_node(steal=False)
    assert Counter(node for node, _ in calls.calls) == {A: 1, B: 3}
    assert seen_a.is_set()


def test_steal_lets_a_free_slot_take_queued_work() -> None:
    calls, _ = run_with_idle_node(steal=True)
    assert Counter(node for node, _ in calls.calls)[A] >= 2
    assert calls.peak[A] == 1 and calls.peak[B] == 1


def run_with_idle_node(*, steal: bool) -> tuple[Calls, threading.Event]:
    """A has one task, B three; B's first call is held until A's task has finished."""
    a_finished = threading.Event()

    def hold(node: str, task: int) -> None:
        if node == B and task == 0:
            assert a_finished.wait(GATE)

    def on_event(event: DispatchEvent) -> None:
        if event.kind == "finished" and event.node == A:
            a_finished.set()

    calls = Calls(before=hold)
    result = dispatch(parallel({A: 1, B: 3}), [0, 1, 2, 3], calls, on_event=on_event, steal=steal)
    assert len(result.results) == 4
    return calls, a_finished


# ------------------------------------------------------------------------------- failures


def test_a_failing_node_its_tasks_finish_elsewhere_and_it_is_excluded() -> None:
    clock = FakeClock()
    health = NodeHealth(clock=clock, backoff=10.0)
    calls = Calls(down=[A])
    result = dispatch(parallel({A: 3, B: 3}), list(range(6)), calls, health=health)
    assert result.results == tuple(f"result {t} from {B}" for t in range(6))
    assert [node for node, _ in calls.calls].count(A) == 1  # one failure, then no more calls
    [failure] = result.failed_nodes
    assert (failure.key, str(failure.error), failure.consecutive) == (A, f"{A} is down", 1)
    assert [(a.task, a.key, a.attempt) for a in result.attempts if a.error is not None] == [
        (0, A, 1)]
    assert {timing[0] for timing in result.timings} == {B}
    # The registry keeps A out of the next decisions until its back-off ends.
    assert health.is_failed(A) and not health.is_failed(B)
    assert health.exclude([A, B, C]) == [B, C]
    assert [f.key for f in health.failed_nodes()] == [A]
    clock.tick(9.99)
    assert health.is_failed("a:1")  # the same node in another shape
    clock.tick(0.01)
    assert not health.is_failed(A) and health.exclude([A, B]) == [A, B]


def test_failure_events_and_retry_attempts() -> None:
    events = Events()
    dispatch(parallel({A: 1, B: 1}), [0, 1], Calls(down=[A]), on_event=events)
    assert sorted(events.summary(), key=lambda e: (e[1], e[3])) == [
        ("started", 0, A, 1), ("failed", 0, A, 1), ("retried", 0, B, 2), ("started", 0, B, 2),
        ("finished", 0, B, 2), ("started", 1, B, 1), ("finished", 1, B, 1),
    ]  # fmt: skip
    failed = next(e for e in events if e.kind == "failed")
    assert isinstance(failed.error, ConnectionError) and failed.duration is not None
    assert failed.key == A and "node" not in repr(failed)
    assert events[-1].completed == events[-1].total == 2


def test_a_candidate_outside_the_plan_takes_over_when_the_plan_has_no_node_left() -> None:
    health = NodeHealth(clock=FakeClock())
    health.record_failure(C, ConnectionError("earlier"))
    calls = Calls(down=[A])
    result = dispatch(sequential(A, 3), [0, 1, 2], calls, candidates=[A, "a:1", C, D, "bad:x"],
                      health=health)
    assert result.results == tuple(f"result {t} from {D}" for t in range(3))
    assert C not in [node for node, _ in calls.calls]  # in back-off: passed over
    assert calls.peak[D] == 1  # a candidate brought in runs one task at a time


def test_candidates_are_not_used_while_a_plan_node_survives() -> None:
    calls = Calls(down=[A])
    result = dispatch(parallel({A: 2, B: 2}), [0, 1, 2, 3], calls, candidates=[C])
    assert {timing[0] for timing in result.timings} == {B}


def test_every_node_failing_raises_one_error_naming_each() -> None:
    def call(node: str, task: int) -> str:
        if node == A and task == 0:
            return "first"
        raise ConnectionError(f"{node[7]} is down")

    health = NodeHealth(clock=FakeClock())
    with pytest.raises(DispatchError) as info:
        dispatch(sequential(A, 4), [0, 1, 2, 3], call, candidates=[B], health=health)
    error = info.value
    assert str(error) == (
        "3 of 4 tasks got no result: every node failed; failed nodes: "
        "'http://a:1' (ConnectionError: a is down), 'http://b:2' (ConnectionError: b is down)"
    )
    assert isinstance(error, LocalityError) and not error.cancelled
    assert error.results == ("first", None, None, None)
    assert error.failed_tasks == (1, 2, 3)
    assert [(key, str(exc)) for key, exc in error.node_errors] == [
        (A, "a is down"), (B, "b is down")]
    assert [(task, str(exc)) for task, exc in error.task_errors] == [(1, "b is down")]
    assert [(a.task, a.key) for a in error.attempts] == [(0, A), (1, A), (1, B)]
    assert [f.key for f in health.failed_nodes()] == [A, B]


def test_attempts_are_bounded() -> None:
    calls = Calls(down=[A, B, C])
    with pytest.raises(DispatchError) as info:
        dispatch(parallel({A: 1, B: 0, C: 0}), [0], calls, max_attempts=2,
                 health=NodeHealth(clock=FakeClock()))
    assert calls.calls == [(A, 0), (B, 0)]
    assert str(info.value) == (
        "1 of 1 task got no result; failed nodes: 'http://a:1' (ConnectionError: http://a:1 is "
        "down), 'http://b:2' (ConnectionError: http://b:2 is down); out of attempts (2 each): "
        "task 0"
    )


def test_a_task_error_is_not_the_nodes() -> None:
    health = NodeHealth(clock=FakeClock())

    def call(node: str, task: int) -> int:
        if task == 1:
            raise ValueError("prompt too long")
        return task

    with pytest.raises(DispatchError) as info:
        dispatch(sequential(A, 3), [0, 1, 2], call, health=health,
                 node_error=lambda exc: not isinstance(exc, ValueError))
    assert str(info.value) == (
        "1 of 3 tasks got no result; failed on their own: task 1 (ValueError: prompt too long)")
    assert info.value.results == (0, None, 2) and not health.failed_nodes()


def test_a_node_failing_on_concurrent_calls_counts_once() -> None:
    barrier = threading.Barrier(2)
    health = NodeHealth(clock=FakeClock(), backoff=1.0)

    def call(node: str, task: int) -> str:
        if node == A:
            barrier.wait(GATE)  # both calls in flight on A before either fails
            raise ConnectionError("reset")
        return "ok"

    result = dispatch(parallel({A: 4, B: 2}, {A: 2, B: 1}), list(range(6)), call, health=health)
    assert result.results == ("ok",) * 6
    assert [f.consecutive for f in health.failed_nodes()] == [1]


def test_a_raising_callback_does_not_break_dispatch(caplog: pytest.LogCaptureFixture) -> None:
    def on_event(event: DispatchEvent) -> None:
        raise RuntimeError("progress bar broke")

    with caplog.at_level(logging.WARNING, logger="sollol_locality"):
        result = dispatch(parallel({A: 2, B: 2}), [0, 1, 2, 3], Calls(), on_event=on_event)
    assert len(result.results) == 4
    messages = [r.getMessage() for r in caplog.records if r.name == "sollol_locality._dispatch"]
    assert "the on_event callback raised on 'started' of task 0; dispatch goes on" in messages
    assert all(r.exc_info for r in caplog.records if "callback" in r.getMessage())


def test_no_plan_nodes() -> None:
    with pytest.raises(DispatchError) as info:
        dispatch(Plan("sequential", [], [], []), [1, 2], Calls(), candidates=[A])
    assert str(info.value) == "no node to run 2 tasks on: the plan has none"
    assert info.value.failed_tasks == (0, 1)


# ------------------------------------------------------------------------------- stopping


def test_cancel_between_calls() -> None:
    cancel = threading.Event()
    calls = Calls()

    def on_event(event: DispatchEvent) -> None:
        if event.kind == "finished" and event.task == 1:
            cancel.set()

    with pytest.raises(DispatchError) as info:
        dispatch(sequential(A, 5), list(range(5)), calls, cancel=cancel, on_event=on_event)
    assert calls.calls == [(A, 0), (A, 1)]
    assert str(info.value) == "dispatch cancelled: 3 of 5 tasks got no result"
    assert info.value.cancelled and info.value.failed_tasks == (2, 3, 4)
    assert info.value.results[:2] == (f"result 0 from {A}", f"result 1 from {A}")


def test_cancel_already_set_starts_nothing() -> None:
    cancel = threading.Event()
    cancel.set()
    calls = Calls()
    with pytest.raises(DispatchError, match="^dispatch cancelled: 2 of 2 tasks"):
        dispatch(sequential(A, 2), [0, 1], calls, cancel=cancel)
    assert calls.calls == []


class NoticedCancel:
    """A cancel token that says when the dispatcher first saw it set."""

    def __init__(self) -> None:
        self.flag = threading.Event()
        self.noticed = threading.Event()

    def is_set(self) -> bool:
        if self.flag.is_set():
            self.noticed.set()
            return True
        return False


def test_cancel_awaits_calls_in_flight_and_keeps_their_results() -> None:
    cancel = NoticedCancel()
    b_started = threading.Event()

    def hold(node: str, task: int) -> None:
        if node == B:
            b_started.set()
            assert cancel.noticed.wait(GATE)  # still in flight when the batch is cancelled
        elif task == 0:
            assert b_started.wait(GATE)
            cancel.flag.set()
            assert cancel.noticed.wait(GATE)

    calls = Calls(before=hold)
    with pytest.raises(DispatchError) as info:
        dispatch(parallel({A: 3, B: 3}), list(range(6)), calls, cancel=cancel,
                 poll_interval=0.01)
    assert sorted(calls.calls) == [(A, 0), (B, 1)]  # nothing started after
    assert info.value.results[:2] == (f"result 0 from {A}", f"result 1 from {B}")
    assert info.value.failed_tasks == (2, 3, 4, 5)


def test_keyboard_interrupt_from_call_stops_after_calls_in_flight() -> None:
    b_started = threading.Event()
    stop_seen = threading.Event()
    b_returned = threading.Event()

    def call(node: str, task: int) -> str:
        if node == B:
            b_started.set()
            assert stop_seen.wait(GATE)
            b_returned.set()
            return "b"
        assert b_started.wait(GATE)
        raise KeyboardInterrupt

    def on_event(event: DispatchEvent) -> None:
        if event.kind == "failed" and isinstance(event.error, KeyboardInterrupt):
            stop_seen.set()

    made: list[tuple[str, int]] = []

    def recorded(node: str, task: int) -> str:
        made.append((node, task))
        return call(node, task)

    with pytest.raises(KeyboardInterrupt):
        dispatch(parallel({A: 3, B: 3}), list(range(6)), recorded, on_event=on_event)
    assert b_returned.is_set()  # the call in flight was awaited
    assert sorted(made) == [(A, 0), (B, 1)]  # no call after the interrupt


def test_ctrl_c_in_the_calling_thread_stops_cleanly() -> None:
    main = threading.main_thread().ident
    if main is None or threading.get_ident() != main:
        pytest.skip("SIGINT reaches only the main thread, and this test runs in another")

    def interrupt(node: str, task: int) -> None:
        if task == 1:
            signal.pthread_kill(main, signal.SIGINT)

    calls = Calls(before=interrupt)
    # As a terminal program: a run started in the background by a non-interactive shell (a
    # script's `pytest &`) inherits SIGINT ignored, and Python then raises nothing on it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            dispatch(sequential(A, 4), [0, 1, 2, 3], calls)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert calls.calls == [(A, 0), (A, 1)]


def test_grace_bounds_the_wait_for_a_hung_call() -> None:
    b_started = threading.Event()
    release = threading.Event()

    def call(node: str, task: int) -> str:
        if node == B:
            b_started.set()
            release.wait(GATE)  # hung until the test lets it go
            return "late"
        assert b_started.wait(GATE)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dispatch(parallel({A: 1, B: 1}), [0, 1], call, grace=0.05)
    assert not release.is_set()
    release.set()
    for thread in threading.enumerate():  # the abandoned worker ends once its call returns
        if thread.name.startswith("sollol-locality-dispatch"):
            thread.join(GATE)


# ------------------------------------------------------------------------ health registry


@pytest.mark.parametrize(
    ("consecutive", "seconds"), [(1, 10.0), (2, 20.0), (3, 40.0), (5, 160.0), (6, 300.0),
                                 (10_000, 300.0)],
)
def test_backoff_grows_per_consecutive_failure(consecutive: int, seconds: float) -> None:
    assert NodeHealth(backoff=10.0, max_backoff=300.0).backoff_for(consecutive) == seconds


def test_backoff_grows_and_success_resets_it() -> None:
    clock = FakeClock(0.0)
    health = NodeHealth(clock=clock, backoff=1.0, factor=3.0)
    assert health.record_failure(A, OSError("x")).until == 1.0
    clock.tick(1.0)
    assert not health.is_failed(A)
    assert health.record_failure(A, OSError("x")).until == 4.0  # 1 + 3
    health.record_success("http://A:1/")
    assert health.failure(A) is None
    assert health.record_failure(A, OSError("x")).consecutive == 1


def test_health_keys() -> None:
    assert node_key("a:1") == node_key({"host": "A", "port": "1"}) == A
    health = NodeHealth(clock=FakeClock(), key=lambda node: node["name"])
    health.record_failure({"name": "gpu-box", "url": A}, OSError("x"))
    assert health.is_failed({"name": "gpu-box", "url": B})
    with pytest.raises(InvalidNodeAddress):
        node_key("http://")


def test_exclude_keeps_order_and_unparseable_nodes() -> None:
    health = NodeHealth(clock=FakeClock())
    health.record_failure(B, OSError("x"))
    health.record_failure(D, OSError("y"))
    assert health.exclude([D, "", A, B, C]) == ["", A, C]
    assert [f.key for f in health.failed_nodes()] == [B, D]
    assert health.failed_keys() == {B, D} and NodeHealth().failed_keys() == frozenset()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backoff": 0}, "Invalid backoff 0: expected a number of seconds above 0"),
        ({"backoff": 5, "max_backoff": 1}, "Invalid max_backoff 1: expected at least backoff (5)"),
        ({"factor": 0.5}, "Invalid factor 0.5: expected at least 1"),
    ],
)
def test_health_rejects(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        NodeHealth(**options)
    assert str(info.value) == message


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("plan", "count", "options", "message"),
    [
        (Plan("parallel", [A, B], [1], [1, 1]), 1, {},
         "Invalid plan: 2 nodes, 1 tasks_per_node and 2 concurrency_per_node entries (expected "
         "one each)"),
        (Plan("parallel", [A, B], [1, 1], [1, 0]), 2, {},
         "Invalid plan: concurrency_per_node[1] is 0 (expected an integer of at least 1)"),
        (Plan("parallel", [A], [-1], [1]), 0, {},
         "Invalid plan: tasks_per_node[0] is -1 (expected an integer of at least 0)"),
        (Plan("parallel", [A, B], [2, 2], [1, 1]), 3, {},
         "Invalid plan: tasks_per_node [2, 2] adds up to 4, the batch has 3 tasks"),
        (Plan("sequential", [A], [2], [2]), 2, {},
         "Invalid plan: a sequential plan runs one task at a time on one node, got 1 nodes with "
         "concurrency_per_node [2]"),
        (Plan("parallel", [A, "a:1"], [1, 1], [1, 1]), 2, {},
         "Invalid plan: nodes[0] and nodes[1] are one node ('http://a:1')"),
        (sequential(A, 1), 1, {"max_attempts": 0},
         "Invalid max_attempts 0: expected an integer of at least 1"),
        (sequential(A, 1), 1, {"grace": -1.0},
         "Invalid grace -1.0: expected seconds (0 or more) or None"),
    ],
)
def test_malformed_input(plan: Plan, count: int, options: dict[str, Any], message: str) -> None:
    calls = Calls()
    with pytest.raises(ValueError) as info:
        dispatch(plan, list(range(count)), calls, **options)
    assert str(info.value) == message
    assert calls.calls == []


# ----------------------------------------------------------------------- emulator nodes


pytest.importorskip("numpy", reason="the emulator needs numpy (the bench extra)")

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
NUM_PREDICT = 4


@dataclass
class HttpCalls:
    """``call`` over real HTTP: one ``/api/generate`` per task (counting, in the call, what is in
    flight per node: the emulator has no max-in-flight counter)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: Counter[str] = field(default_factory=Counter)
    peak: Counter[str] = field(default_factory=Counter)

    def __call__(self, node: str, task: int) -> dict[str, Any]:
        with self.lock:
            self.in_flight[node] += 1
            self.peak[node] = max(self.peak[node], self.in_flight[node])
        try:
            payload = {"model": "llama3.2:latest", "prompt": f"chunk {task}", "stream": False,
                       "options": {"num_predict": NUM_PREDICT}}
            request = urllib.request.Request(
                f"{node}/api/generate", data=json.dumps(payload).encode(), method="POST",
                headers={"Content-Type": "application/json"})
            with _OPENER.open(request, timeout=30) as response:
                answer = json.load(response)
            return {"task": task, "node": node, "eval_count": answer["eval_count"]}
        finally:
            with self.lock:
                self.in_flight[node] -= 1


def emulator(node: EmulatorProcess, path: str = "", *, post: bool = False) -> dict[str, Any]:
    """The emulator's own endpoint (``/api/emulator``, its counters), or one under it."""
    request = urllib.request.Request(node.url + "/api/emulator" + path, method="POST" if post
                                     else "GET", data=b"{}" if post else None)
    with _OPENER.open(request, timeout=40) as response:
        body: dict[str, Any] = json.load(response)
    return body


def generates(node: EmulatorProcess) -> int:
    """Generate requests the emulator itself has served."""
    return int(emulator(node)["generates"])


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[EmulatorProcess, EmulatorProcess]]:
    with (
        start_emulator("127.0.0.1", 0, weights_mb=1, ready_timeout=30) as first,
        start_emulator("127.0.0.1", 0, weights_mb=1, ready_timeout=30) as second,
    ):
        yield first, second


@pytest.mark.integration
def test_emulators_every_result_in_order(pair: tuple[EmulatorProcess, EmulatorProcess]) -> None:
    first, second = pair
    before = generates(first), generates(second)
    calls = HttpCalls()
    result = dispatch(parallel({first.url: 3, second.url: 3}), list(range(6)), calls)
    assert [r["task"] for r in result.results] == list(range(6))
    assert all(r["eval_count"] == NUM_PREDICT for r in result.results)
    assert [r["node"] for r in result.results] == [first.url, second.url] * 3
    assert calls.peak == {first.url: 1, second.url: 1}
    # The emulators saw exactly the calls the plan gave them.
    assert (generates(first) - before[0], generates(second) - before[1]) == (3, 3)


@pytest.mark.integration
def test_emulator_killed_mid_batch_its_tasks_finish_on_the_other() -> None:
    with (
        start_emulator("127.0.0.1", 0, weights_mb=1, ready_timeout=30) as doomed,
        start_emulator("127.0.0.1", 0, weights_mb=1, ready_timeout=30) as survivor,
    ):
        def on_event(event: DispatchEvent) -> None:
            if event.kind == "finished" and event.node == doomed.url and doomed.is_running():
                doomed.stop()  # after its first task: its next call finds nobody listening

        health = NodeHealth(clock=FakeClock())
        calls = HttpCalls()
        result = dispatch(parallel({doomed.url: 3, survivor.url: 3}), list(range(6)), calls,
                          on_event=on_event, health=health)
        assert [r["task"] for r in result.results] == list(range(6))
        assert [r["node"] for r in result.results] == [doomed.url] + [survivor.url] * 5
        [failure] = result.failed_nodes
        assert failure.key == doomed.url and isinstance(failure.error, urllib.error.URLError)
        assert health.exclude([doomed.url, survivor.url]) == [survivor.url]
        assert calls.peak[survivor.url] == 1
        assert generates(survivor) == 5


@pytest.mark.integration
def test_emulators_all_dead_one_clear_error() -> None:
    first = start_emulator("127.0.0.1", 0, weights_mb=1, ready_timeout=30)
    second = start_emulator("127.0.0.1", 0, weights_mb=1, ready_timeout=30)
    first.stop(), second.stop()
    with pytest.raises(DispatchError) as info:
        dispatch(parallel({first.url: 2, second.url: 2}), [0, 1, 2, 3], HttpCalls())
    refused = "URLError: <urlopen error [Errno 111] Connection refused>"
    # Both are called at once: the nodes are named in the order they failed.
    assert str(info.value) in {
        f"4 of 4 tasks got no result: every node failed; failed nodes: "
        f"{x.url!r} ({refused}), {y.url!r} ({refused})"
        for x, y in ((first, second), (second, first))
    }
    assert info.value.results == (None,) * 4


@pytest.mark.integration
def test_emulators_count_per_node_concurrency_inside() -> None:
    if "num_parallel" not in inspect.signature(start_emulator).parameters:
        pytest.skip("this emulator serves one request at a time and counts no max in flight")
    slots = (1, 2, 4)
    # Every emulator could batch 4: a dispatcher sending more than its plan says would show.
    with (
        start_emulator(weights_mb=1, num_parallel=4, ready_timeout=30) as one,  # type: ignore[call-arg]
        start_emulator(weights_mb=1, num_parallel=4, ready_timeout=30) as two,  # type: ignore[call-arg]
        start_emulator(weights_mb=1, num_parallel=4, ready_timeout=30) as four,  # type: ignore[call-arg]
    ):
        nodes = (one, two, four)
        plan = Plan("parallel", [n.url for n in nodes], [2 * c for c in slots], list(slots))
        for node in nodes:
            emulator(node, "/pause", post=True)  # requests queue; none is decoded yet
        outcome: list[Any] = []
        runner = threading.Thread(target=lambda: outcome.append(
            dispatch(plan, list(range(14)), HttpCalls())))
        runner.start()
        try:
            for node, count in zip(nodes, slots, strict=True):
                # Returns once `count` requests wait there: the plan's concurrency is reached.
                assert emulator(node, f"/wait?waiting={count}&timeout=30")["queue"] == count
        finally:
            for node in nodes:
                emulator(node, "/resume", post=True)
            runner.join(GATE * 3)
        [result] = outcome
        assert [r["task"] for r in result.results] == list(range(14))
        assert [emulator(node)["max_in_flight"] for node in nodes] == list(slots)
