"""The benchmark workload (sollol_locality.testing.workload): per-node task counts and
concurrency, and the arms a benchmark measures, on loopback HTTP servers that answer like
Ollama's ``/api/generate`` and count what is in flight. No timing is asserted: a node that must
hold k requests at once waits for all k on a barrier (a broken barrier fails the request)."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest

from sollol_locality.testing.workload import Arm, GenerateError, Settings, run_arm, run_parallel


class CountingNode:
    """A loopback ``/api/generate`` server counting requests in flight (most seen at once);
    with ``together`` k, each request waits until k are in flight (a barrier)."""

    def __init__(self, together: int = 1, patience: float = 30.0) -> None:
        self.lock = threading.Lock()
        self.patience = patience
        self.in_flight = 0
        self.most = 0
        self.prompts: list[str] = []
        self.barrier = threading.Barrier(together) if together > 1 else None
        node = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with node.lock:
                    node.in_flight += 1
                    node.most = max(node.most, node.in_flight)
                    node.prompts.append(body["prompt"])
                try:
                    if node.barrier is not None:
                        node.barrier.wait(timeout=node.patience)
                    status, answer = 200, {"done": True, "eval_count": 1}
                except threading.BrokenBarrierError:
                    status, answer = 500, {"error": "not enough requests at once"}
                with node.lock:
                    node.in_flight -= 1
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # serve_forever looks at shutdown() every poll_interval (0.5 s by default)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    def parts(self) -> list[int]:
        """The 1-based chunk numbers this node was sent (from the prompts)."""
        return sorted(int(p.split("part ")[1].split(" ")[0]) for p in self.prompts)


@contextlib.contextmanager
def nodes(*together: int) -> Iterator[list[CountingNode]]:
    made = [CountingNode(k) for k in together]
    for node in made:
        node.thread.start()
    try:
        yield made
    finally:
        for node in made:
            node.server.shutdown()
            node.server.server_close()


def test_tasks_and_concurrency_per_node_are_honoured() -> None:
    with nodes(4, 1) as (batching, plain):
        result = run_parallel([batching.url, plain.url], 5, num_predict=1,
                              tasks_per_node=[4, 1], concurrency_per_node=[4, 1])
    assert result.chunks_per_node() == {batching.url: 4, plain.url: 1}
    assert batching.parts() == [1, 2, 3, 4] and plain.parts() == [5]
    assert (batching.most, plain.most) == (4, 1)  # four at once: the barrier let them through
    assert [c.index for c in result.chunks] == [0, 1, 2, 3, 4]


def test_concurrency_alone_shares_one_queue() -> None:
    with nodes(3) as (node,):
        result = run_parallel([node.url], 3, num_predict=1, concurrency_per_node=[3])
    assert node.most == 3 and result.chunks_per_node() == {node.url: 3}


def test_fewer_tasks_than_concurrency_sends_only_the_tasks() -> None:
    with nodes(2, 1) as (a, b):
        result = run_parallel([a.url, b.url], 2, num_predict=1, tasks_per_node=[2, 0],
                              concurrency_per_node=[4, 1])
    assert result.chunks_per_node() == {a.url: 2, b.url: 0} and a.most == 2 and b.prompts == []


def test_without_counts_dispatch_is_as_before() -> None:
    with nodes(1, 1) as (a, b):
        result = run_parallel([a.url, b.url], 2, num_predict=1)
    assert a.parts() == [1] and b.parts() == [2]
    assert result.chunks_per_node() == {a.url: 1, b.url: 1}


def test_a_node_held_below_its_barrier_fails_the_job() -> None:
    with nodes(2) as (node,):
        node.patience = 0.05  # one request at a time never reaches two: it is not a race
        with pytest.raises(GenerateError, match="HTTP 500"):
            run_parallel([node.url], 2, num_predict=1)  # one at a time: never two together


@pytest.mark.parametrize(("options", "message"), [
    ({"tasks_per_node": [1, 1]}, "Invalid tasks_per_node [1, 1]: expected one count >= 0 per "
                                 "node (2) summing to 3"),
    ({"tasks_per_node": [3]}, "Invalid tasks_per_node [3]: expected one count >= 0 per node (2) "
                              "summing to 3"),
    ({"concurrency_per_node": [1, 0]}, "Invalid concurrency_per_node [1, 0]: expected one count "
                                       ">= 1 per node (2)"),
])
def test_bad_counts_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        run_parallel(["http://127.0.0.1:9", "http://127.0.0.1:10"], 3, **options)
    assert str(info.value) == message


ARMS = [
    Arm("sequential", ("http://a:1",)),
    Arm("parallel", ("http://a:1", "http://b:1")),
    Arm("parallel", ("http://a:1",), (5,), (4,)),
    Arm("parallel", ("http://a:1", "http://b:1"), (4, 1), None),
    Arm("parallel", ("http://a:1", "http://b:1"), None, (2, 1)),
]


@pytest.mark.parametrize("arm", ARMS, ids=lambda a: repr(a.to_json()))
def test_an_arm_survives_its_json_round_trip(arm: Arm) -> None:
    assert Arm.from_json(json.loads(json.dumps(arm.to_json()))) == arm


def test_arm_labels() -> None:
    names = {"http://a:1": "n1", "http://b:1": "n2"}
    assert [arm.label(names, 2) for arm in ARMS] == [
        "sequential n1", "all-parallel", "parallel n1:5x4", "parallel n1:4+n2:1",
        "parallel n1x2+n2"]


def plan(mode: str, urls: list[str], tasks: list[int] | None = None,
         concurrency: list[int] | None = None) -> Any:
    fields: dict[str, Any] = {"mode": mode, "nodes": [SimpleNamespace(url=u) for u in urls]}
    if tasks is not None:
        fields["tasks_per_node"] = tasks
    if concurrency is not None:
        fields["concurrency_per_node"] = concurrency
    return SimpleNamespace(**fields)


@pytest.mark.parametrize(("given", "expected"), [
    (plan("sequential", ["http://a:1"], [4], [1]), Arm("sequential", ("http://a:1",))),
    (plan("parallel", ["http://a:1", "http://b:1"], [2, 2], [1, 1]),  # today's even split
     Arm("parallel", ("http://a:1", "http://b:1"))),
    (plan("parallel", ["http://a:1", "http://b:1"]),  # a plan without the per-node lists
     Arm("parallel", ("http://a:1", "http://b:1"))),
    (plan("parallel", ["http://a:1"], [5], [4]), Arm("parallel", ("http://a:1",), (5,), (4,))),
    (plan("parallel", ["http://a:1", "http://b:1"], [4, 1], [4, 1]),
     Arm("parallel", ("http://a:1", "http://b:1"), (4, 1), (4, 1))),
    (plan("parallel", ["http://a:1", "http://b:1"], [1, 3], [1, 1]),
     Arm("parallel", ("http://a:1", "http://b:1"), (1, 3), None)),
])
def test_an_arm_carries_what_the_plan_says(given: Any, expected: Arm) -> None:
    assert Arm.of_plan(given) == expected


def test_sorting_an_arm_keeps_each_count_with_its_node() -> None:
    arm = Arm("parallel", ("http://b:1", "http://a:1"), (1, 4), (1, 4))
    assert arm.sorted_by({"http://a:1": 0, "http://b:1": 1}) == Arm(
        "parallel", ("http://a:1", "http://b:1"), (4, 1), (4, 1))


def test_run_arm_runs_what_the_arm_says() -> None:
    with nodes(3, 1) as (a, b):
        result = run_arm(Arm("parallel", (a.url, b.url), (3, 1), (3, 1)),
                         Settings(chunks=4, tokens=1))
    assert result.chunks_per_node() == {a.url: 3, b.url: 1} and a.most == 3
