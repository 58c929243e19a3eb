"""Calibration: the ``calibrate`` command against emulator nodes on loopback, and the learning
rules it feeds (``ParallelismCostModel.observe``)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import gpu_node, offline_config, offline_topology

from sollol_locality import ExecutionPlanner, ParallelismCostModel
from sollol_locality._allocation import BatchingCurve
from sollol_locality.cli import main
from sollol_locality.colocation import UNIT_STRENGTH
from sollol_locality.topology import ExecutionUnit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the root on the path
    sys.path.insert(0, str(ROOT))

OFFLINE = ["--nameserver", "127.0.0.1:9", "--dns-timeout", "0.3"]
WEIGHTS_MB = 8
TOKENS = 24
LOCAL = ExecutionUnit("localhost")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(autouse=True)
def _no_user_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOLLOL_LOCALITY_CALIBRATION", "")
    for name in ("SOLLOL_LOCALITY_MODE", "SOLLOL_LOCALITY_TOPOLOGY", "SOLLOL_LOCALITY_MIN_SPEEDUP"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def nodes() -> Iterator[list[str]]:
    """Two emulator nodes on loopback, pinned to one CPU (two instances on one machine)."""
    pytest.importorskip("numpy", reason="the emulator needs numpy (the bench extra)")
    from sollol_locality.testing.machines import Cluster

    cpu = min(os.sched_getaffinity(0))
    with Cluster() as cluster:
        machine = cluster.local_machine("local", cpus=(cpu,))
        processes = [machine.spawn_emulator(weights_mb=WEIGHTS_MB) for _ in range(2)]
        yield [process.wait_ready(30) for process in processes]


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def generates(url: str) -> int:
    with _OPENER.open(f"{url}/api/emulator", timeout=10) as response:
        return int(json.load(response)["generates"])


def closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- the command against live nodes ----------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timing  # the plan asserted follows the contention measured
def test_calibrate_writes_the_file_the_next_decision_uses(
        nodes: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "cache" / "calibration.json"
    env = {**os.environ, "SOLLOL_LOCALITY_CALIBRATION": str(target), "PYTHONPATH": str(ROOT),
           # A proxy that does not exist: calibration must talk to the nodes directly.
           "http_proxy": f"http://127.0.0.1:{closed_port()}", "HTTP_PROXY": "",
           "no_proxy": "", "NO_PROXY": ""}
    env["HTTP_PROXY"] = env["http_proxy"]
    done = subprocess.run(
        [sys.executable, "-m", "sollol_locality", "calibrate", "--tokens", str(TOKENS),
         "--rounds", "2", *OFFLINE, *nodes],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"calibrated 2 nodes with llama3.2:latest; wrote {target}\n"
    progress = done.stderr.splitlines()
    assert not any("wrote" in line for line in progress)  # stdout says it, once
    assert sum("together" in line for line in progress) == 2  # the two nodes share one unit
    data = json.loads(target.read_text())
    # Their unit: this machine's CPU the two pinned processes share ("localhost/cpu:N").
    unit = offline_topology().describe(nodes[0]).unit.label
    assert len(data["task_seconds"][unit]) == 4  # 2 nodes x 2 rounds
    assert len(data["contention"][unit]["2"]) == 2
    assert [p.name for p in target.parent.iterdir()] == ["calibration.json"]

    # The next decision (default file from the environment, or --calibration) uses it.
    expected = ExecutionPlanner(config=offline_config(calibration_file=target)).plan(4, nodes)
    learned = ParallelismCostModel(offline_config(calibration_file=target))
    for extra in ([], ["--calibration", str(target)]):
        monkeypatch.setenv("SOLLOL_LOCALITY_CALIBRATION", "" if extra else str(target))
        code, text = run("plan", "--tasks", "4", "--json", *OFFLINE, *extra, *nodes)
        plan = json.loads(text)
        assert code == 0
        assert plan["time_unit"] == "seconds"
        # The decision is the one the file implies. (Which one it is depends on two noisy
        # contention samples from tiny emulators on one core: usually sequential, but a median
        # gain above the 5% threshold legitimately makes it parallel.)
        assert (plan["mode"], plan["cause"]) == (expected.mode, expected.cause)
        assert plan["speedup"] == pytest.approx(expected.speedup, abs=1e-4)
        assert plan["sequential_seconds"] == pytest.approx(
            4 * learned.measured_task_seconds(offline_topology().describe(nodes[0]).unit),
            rel=1e-4)
        assert plan["naive_speedup"] == pytest.approx(expected.naive_speedup, abs=1e-4)
        # what was measured, not the prior's 0.50x (c = 1.0): one core time-shared costs
        # far less than the proposal's figure here
        assert plan["naive_speedup"] > 0.6
    # Without the file: the priors, in task-times.
    monkeypatch.setenv("SOLLOL_LOCALITY_CALIBRATION", "")
    code, text = run("plan", "--tasks", "4", "--json", *OFFLINE, *nodes)
    plan = json.loads(text)
    assert plan["time_unit"] == "tasks" and plan["naive_speedup"] == pytest.approx(0.5)


@pytest.mark.integration
def test_refuses_when_a_node_does_not_answer(nodes: list[str], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "calibration.json"
    previous = '{"format": "sollol-locality-calibration", "version": 1}'
    target.write_text(previous)
    before = generates(nodes[0])
    port = closed_port()
    code, text = run("calibrate", "--output", str(target), *OFFLINE, nodes[0],
                     f"http://127.0.0.1:{port}")
    assert (code, text) == (2, "")
    assert capsys.readouterr().err == (
        f"sollol-locality: error: node http://127.0.0.1:{port} does not answer: "
        "[Errno 111] Connection refused\n")
    assert target.read_text() == previous  # the previous calibration is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.json"]
    assert generates(nodes[0]) == before  # nothing was measured


def test_refuses_a_node_that_does_not_speak_http(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer_garbage() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

    thread = threading.Thread(target=answer_garbage, daemon=True)
    thread.start()
    try:
        code, _ = run("calibrate", "--output", str(tmp_path / "cal.json"), *OFFLINE,
                      f"http://127.0.0.1:{port}")
    finally:
        thread.join(10)
        server.close()
    assert code == 2
    assert capsys.readouterr().err.startswith(
        f"sollol-locality: error: node http://127.0.0.1:{port} does not answer: ")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_file_that_is_not_a_calibration(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("my notes")
    code, _ = run("calibrate", "--output", str(target), *OFFLINE,
                  f"http://127.0.0.1:{closed_port()}")
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sollol-locality: error: calibration file {target} is not valid JSON")
    assert err.endswith("; not overwriting it (remove it or pass another --output)\n")
    assert target.read_text() == "my notes"


@pytest.mark.integration
def test_recalibration_replaces_what_it_measures_and_keeps_the_rest(nodes: list[str],
                                                                    tmp_path: Path) -> None:
    from sollol_locality.probe import calibrate

    topology = offline_topology()
    old = ParallelismCostModel(offline_config())
    unit = topology.describe(nodes[0]).unit.label  # the pinned processes' CPU of this machine
    for _ in range(5):
        old.observe("sequential", [nodes[0]], 1, 99.0, topology=topology)
    old.observe("sequential", ["http://10.9.9.9:11434"], 1, 2.0, topology=topology)
    target = old.save(tmp_path / "cal.json")
    report = calibrate(nodes, num_predict=TOKENS, rounds=1, output=target,
                       config=offline_config(), topology=topology)
    data = json.loads(target.read_text())
    assert report.path == target
    assert len(data["task_seconds"][unit]) == 2  # this run's two solo runs only
    assert max(data["task_seconds"][unit]) < 99.0
    assert data["task_seconds"]["10.9.9.9/cpu"] == [2.0]  # another machine: kept
    assert set(report.solo_seconds) == set(nodes)


# -- the learning rules ------------------------------------------------------------------------


@pytest.fixture
def model() -> ParallelismCostModel:
    return ParallelismCostModel(offline_config())


@pytest.fixture(scope="module")
def topology() -> Any:
    return offline_topology()


@pytest.mark.parametrize(("tasks", "wall"), [(2, 2.4), (3, 2.4 + 1.0), (4, 4.8), (5, 4.8 + 1.0)])
def test_contention_is_the_same_whatever_the_task_count(model, topology, tasks, wall):
    # One task alone takes 1 s; two nodes of one CPU with c = 0.2 take 2.4 s for a pair, and an
    # odd task left at the end runs alone at full speed. (The earlier rule divided by full
    # rounds and learned c = -0.15 from 3 tasks: a "gain" that would send one unit parallel.)
    nodes = ["http://localhost:11434", "http://localhost:11435"]
    model.observe("sequential", nodes[:1], 1, 1.0, topology=topology)
    model.observe("parallel", nodes, tasks, wall, topology=topology)
    assert model.contention(LOCAL, 2) == pytest.approx(0.2)
    assert model.gains_from_concurrency(LOCAL) == 1
    assert model.estimate(tasks, nodes, topology).parallel_seconds == pytest.approx(wall)


def test_same_host_overhead_is_learned_from_an_uneven_run(model, topology):
    gpus = [gpu_node("http://10.0.0.5:11434", "0"), gpu_node("http://10.0.0.5:11435", "1")]
    for node in gpus:
        model.observe("sequential", [node], 1, 1.0, topology=topology)
    # 3 tasks: both GPUs busy for the first pair (10% slower each), then one alone: 1.1 + 1.0.
    model.observe("parallel", gpus, 3, 2.1, topology=topology)
    assert model.host_overhead("10.0.0.5") == pytest.approx(0.1)


def test_dispatch_overhead_is_learned_from_an_uneven_run(model, topology):
    hosts = ["http://10.0.0.5:11434", "http://10.0.0.6:11434"]
    for node in hosts:
        model.observe("sequential", [node], 1, 1.0, topology=topology)
    model.observe("parallel", hosts, 3, 2.2, topology=topology)  # 2 + 1 tasks, 10% lost
    assert model.dispatch_overhead() == pytest.approx(0.1)


@pytest.mark.parametrize(("wall", "gains", "mode"),
                         [(1.96, 1, "sequential"), (2.0, 1, "sequential"), (1.6, 2, "parallel")])
def test_a_gain_within_noise_is_not_a_gain(model, topology, wall, gains, mode):
    # c = -0.02 (2% faster together) is within run-to-run noise; c = -0.2 is a real gain.
    nodes = ["http://localhost:11434", "http://localhost:11435"]
    model.observe("sequential", nodes[:1], 1, 1.0, topology=topology)
    model.observe("parallel", nodes, 2, wall, topology=topology)
    assert model.gains_from_concurrency(LOCAL) == gains
    plan = ExecutionPlanner(topology, model, topology.config).plan(4, nodes)
    assert plan.mode == mode
    if wall < 2.0 and mode == "sequential":
        assert plan.reason.endswith(
            "a gain under the 5% that calibration must measure before it is trusted over noise.")


def test_naive_speedup_gives_every_node_tasks(model, topology):
    # A fast node (1 s a task) and one six times slower. Dispatching to both, as "parallel
    # whenever two nodes are healthy" does, hands the slow node a task that alone outlasts the
    # whole batch on the fast one.
    fast, slow = "http://10.0.0.5:11434", "http://10.0.0.6:11434"
    model.observe("sequential", [fast], 1, 1.0, topology=topology)
    model.observe("sequential", [slow], 1, 6.0, topology=topology)
    plan = ExecutionPlanner(topology, model, topology.config).plan(4, [fast, slow])
    assert plan.mode == "sequential" and plan.cause == "fast-node" and plan.nodes == [fast]
    assert plan.naive_speedup == pytest.approx(4.0 / (6.0 * 1.05))
    # the estimate for the same nodes still spares the slow node (the best use of them)
    assert model.estimate(4, [fast, slow], topology).tasks_per_node == (4, 0)


def test_a_run_where_nothing_ran_concurrently_teaches_nothing(model, topology):
    nodes = ["http://localhost:11434", "http://localhost:11435"]
    model.observe("sequential", nodes[:1], 1, 1.0, topology=topology)
    model.observe("parallel", nodes, 1, 5.0, topology=topology)  # one task: one node worked
    hosts = ["http://10.0.0.5:11434", "http://10.0.0.6:11434"]
    for node in hosts:
        model.observe("sequential", [node], 1, 1.0, topology=topology)
    model.observe("parallel", hosts, 1, 5.0, topology=topology)
    data = model.to_dict()
    assert data["contention"] == {} and data["dispatch_overhead"] == []
    assert model.observations == 5


@pytest.mark.integration
def test_calibrate_reaches_nodes_named_only_in_the_given_nameserver(
        nodes: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        dns_server: Any) -> None:
    """``--nameserver`` names the nodes; the system resolver knows none of them (and is not
    allowed to answer anything but IP literals), yet calibration reaches every node."""
    import ipaddress

    ports = [int(url.rsplit(":", 1)[1]) for url in nodes]
    dns_server.set_zones({"lab.test": [("A", "192.0.2.1", 60)],
                          "node-a.lab.test": [("A", "127.0.0.1", 60)],
                          "node-b.lab.test": [("A", "127.0.0.1", 60)]})
    real_getaddrinfo = socket.getaddrinfo

    def numeric_only(host: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            ipaddress.ip_address(host.decode() if isinstance(host, bytes) else str(host))
        except ValueError:
            raise socket.gaierror(socket.EAI_NONAME, f"system resolution of {host!r}") from None
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", numeric_only)
    named = [f"http://node-a.lab.test:{ports[0]}", f"http://node-b.lab.test:{ports[1]}"]
    target = tmp_path / "calibration.json"
    before = [generates(url) for url in nodes]
    code, text = run("calibrate", "--tokens", "4", "--rounds", "1", "--output", str(target),
                     "--nameserver", dns_server.nameserver, "--no-hosts-file", *named)
    assert code == 0
    assert text == f"calibrated 2 nodes with llama3.2:latest; wrote {target}\n"
    # warm-up, alone, together (and the batching curve's k at once): every request reached
    # its node through the address the nameserver gave
    assert all(after >= b + 3 for after, b in zip([generates(url) for url in nodes], before,
                                                   strict=True))
    assert dns_server.count("node-a.lab.test", "A") >= 1
    assert dns_server.count("node-b.lab.test", "A") >= 1
    assert json.loads(target.read_text())["task_seconds"]  # what it measured was kept


@pytest.mark.parametrize("family", ["name", "ipv6"])
def test_requests_go_to_the_resolved_address_with_the_nodes_own_host_header(
        dns_server: Any, family: str) -> None:
    import http.server

    from sollol_locality import NodeTopology
    from sollol_locality.probe import _request

    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            seen.append(self.headers.get("Host"))
            body = b'{"version": "0"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    class V6Server(http.server.HTTPServer):
        address_family = socket.AF_INET6

    try:
        server = (V6Server(("::1", 0), Handler) if family == "ipv6"
                  else http.server.HTTPServer(("127.0.0.1", 0), Handler))
    except OSError as exc:
        pytest.skip(f"no loopback for {family}: {exc}")
    port = server.server_address[1]
    # serve_forever looks at shutdown() every poll_interval (0.5 s by default)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        dns_server.set_zones({"node.lab.test": [("A", "127.0.0.1", 60)]})
        node = (f"http://node.lab.test:{port}" if family == "name" else f"http://[::1]:{port}")
        config = offline_config(nameservers=dns_server.nameserver, hosts_file=None)
        identity = NodeTopology(config).describe(node)
        assert _request(identity, "/api/version", timeout=10) == {"version": "0"}
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert seen == [f"node.lab.test:{port}" if family == "name" else f"[::1]:{port}"]
# -- batching curves ---------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timing  # the batching curve measured is asserted
@pytest.mark.parametrize("declared", [True, False])
def test_calibration_measures_a_batching_curve_that_the_plan_uses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, declared: bool) -> None:
    pytest.importorskip("numpy", reason="the emulator needs numpy (the bench extra)")
    from sollol_locality import probe
    from sollol_locality.testing.emulator import start_emulator

    cpu = min(os.sched_getaffinity(0))
    process = start_emulator(num_parallel=4, weights_mb=64, taskset=(cpu,))
    try:
        url = process.url
        fields: dict[str, Any] = {}
        if declared:  # the topology file says 4 slots; else calibration finds them
            topology = tmp_path / "topology.toml"
            topology.write_text(f'[nodes."{url}"]\nnum_parallel = 4\n')
            fields["topology_file"] = topology
        target = tmp_path / "calibration.json"
        cfg = offline_config(calibration_file=target, **fields)
        # No stopping on a small gain here (that rule is tested without timings below): every
        # k is measured, so what is stored does not depend on how busy the machine is.
        measure = probe._measure_batching
        monkeypatch.setattr(probe, "_measure_batching",
                            lambda *a, **kw: measure(*a, **{**kw, "first_round": False}))
        lines: list[str] = []
        report = probe.calibrate([url], num_predict=TOKENS, rounds=2, config=cfg,
                                 progress=lines.append)
    finally:
        process.stop()
    data = json.loads(target.read_text())
    (windows,) = data["batching"].values()  # keyed by the instance label
    ks = ["1", "2", "4"] if declared else ["1", "2", "4", "8"]
    assert sorted(windows, key=int) == ks and all(len(windows[k]) == 2 for k in ks)
    assert sum(" at once, round " in line for line in lines) == 2 * (len(ks) - 1)
    curve = report.batching[url]
    assert curve[2] < 2.0 and curve[4] < 3.0  # batched: far less than k times one
    # The next plan uses what was measured: several at once on the node, the measured curve.
    planner = ExecutionPlanner(config=cfg)
    plan = planner.plan(4, [url])
    assert plan.mode == "parallel" and plan.concurrency_per_node[0] > 1
    assert plan.predicted_seconds < plan.sequential_seconds
    (batching,) = plan.to_dict()["batching_per_node"]
    # (A ratio below an earlier point's, which noise can give, is raised to it.)
    points = BatchingCurve.measured(curve).points
    assert batching["curve"] == {str(k): round(r, 4) for k, r in points}
    if declared:
        assert (batching["slots"], batching["slots_source"]) == (4, "topology file")
    else:  # the largest k that still raised the throughput by more than the noise margin
        identity = planner.topology.describe(url)
        assert batching["slots"] == planner.cost_model.measured_slots(identity) > 1
        assert batching["slots_source"] == "measured"


def test_the_curve_search_stops_when_throughput_stops_rising(
        monkeypatch: pytest.MonkeyPatch, model: ParallelismCostModel, topology: Any) -> None:
    from sollol_locality import probe

    identity = topology.describe({"url": "http://10.0.0.5:11434", "num_parallel": 16})
    assert probe._batching_ks(identity) == [2, 4, 8, 16]
    assert probe._batching_ks(topology.describe("http://10.0.0.5:11434")) == [2, 4, 8]
    assert probe._batching_ks(topology.describe({"url": "http://10.0.0.5:11434",
                                                 "num_parallel": 1})) == []
    walls = {2: 1.2, 4: 1.6, 8: 3.1, 16: 6.0}  # 4 slots: 8 at once is two rounds of 4

    def together(members: list[Any], *args: Any) -> tuple[float, list[float]]:
        k = len(members)  # each request's own time: a batch of up to 4 finishes together
        return walls[k], [walls[min(k, 4)] * (1 + i // 4) for i in range(k)]

    monkeypatch.setattr(probe, "_together_timed", together)
    said: list[str] = []
    kept = probe._measure_batching(identity, [2, 4, 8, 16], 1.0, model, first_round=True,
                                   model="m", num_predict=1, timeout=1.0, say=said.append,
                                   where="round 1/1")
    assert kept == [2, 4, 8]
    assert said[-1] == ("http://10.0.0.5:11434 8 at once, round 1/1: 8.000s (1.00x the "
                        "throughput of one, served in turn: fewer slots than that)")
    model.observe_batching(identity, 1, 1.0)
    assert model.measured_slots(identity) == 4
    assert model.batching(identity).slots == 4  # measured, over the node's own 16


def test_requests_served_in_turn_are_no_batching_whatever_their_overlap(
        monkeypatch: pytest.MonkeyPatch, model: ParallelismCostModel, topology: Any) -> None:
    """A one-slot server sent 2 at once answers them one after another. Their network and
    prompt phases overlap, so the wall is under twice one alone (here 1.8x, a 10% "gain"),
    but the per-request times show the queue: the instance stays at one slot."""
    from sollol_locality import probe

    identity = topology.describe("http://10.0.0.5:11434")  # slots undeclared: 2, 4, 8 tried
    monkeypatch.setattr(probe, "_together_timed", lambda members, *a: (1.8, [0.95, 1.8]))
    said: list[str] = []
    kept = probe._measure_batching(identity, probe._batching_ks(identity), 1.0, model,
                                   first_round=True, model="m", num_predict=1, timeout=1.0,
                                   say=said.append, where="round 1/1")
    assert kept == [2] and said[-1].endswith("served in turn: fewer slots than that)")
    model.observe_batching(identity, 1, 1.0)
    assert model.measured_slots(identity) == 1 and model.batching(identity).slots == 1
    assert probe._served_in_turn([1.0, 1.02]) is False  # a batch finishes together

def test_a_measured_curve_gives_slots_and_replaces_the_prior(model, topology):
    node = {"url": "http://10.0.0.5:11434", "num_parallel": 4}
    identity = topology.describe(node)
    assert model.batching(identity).curve_source == "prior"
    for k, wall in ((1, 2.0), (2, 2.4), (4, 3.2), (8, 6.4)):
        model.observe_batching(identity, k, wall)
    batching = model.batching(identity)
    assert (batching.slots, batching.slots_source, batching.curve_source) == (4, "measured",
                                                                              "measured")
    assert batching.curve.ratio(4) == pytest.approx(1.6)
    assert model.measured_slots(identity) == 4
    with pytest.raises(ValueError, match="^k must be a positive integer, got 0$"):
        model.observe_batching(identity, 0, 1.0)


def test_a_batched_run_on_one_instance_is_a_point_of_its_curve(model, topology):
    node = {"url": "http://10.0.0.5:11434", "num_parallel": 4}
    model.observe("sequential", [node], 2, 4.0, topology=topology)
    model.observe("parallel", [node], 4, 3.0, topology=topology)
    assert model.measured_batching(topology.describe(node)) == {4: pytest.approx(1.5)}
    assert list(model.calibration.task_seconds["10.0.0.5/cpu"]) == [2.0]
    model.observe("parallel", [node], 9, 9.0, topology=topology)  # in rounds: not a point
    assert list(model.calibration.batching["10.0.0.5:11434"]) == [4]
# -- co-location found by measurement (network-namespace machines) ------------------------


# Long enough (about 30 ms a generate here) that a request's time is its decode work, not the
# HTTP exchange and the scheduler: at 24 tokens (6 ms) one solo run in five differed by 40%.
COLOCATION_TOKENS = 160


@contextlib.contextmanager
def _running_scenario(key: str, weights_mb: int) -> Iterator[list[str]]:
    """Scenario ``key`` running (skipped cleanly where it cannot run): its node URLs; every
    process and namespace is gone on exit."""
    pytest.importorskip("numpy", reason="the emulator needs numpy (the bench extra)")
    from sollol_locality.testing.machines import (
        SCENARIOS,
        Cluster,
        ScenarioUnavailable,
        scenario_skip_reason,
        start_scenario,
    )

    reason = scenario_skip_reason(SCENARIOS[key])
    if reason is not None:
        pytest.skip(reason)
    with Cluster() as cluster:
        try:
            running = start_scenario(key, cluster, weights_mb=weights_mb, auto_subnets=True)
        except ScenarioUnavailable as exc:
            pytest.skip(exc.reason)
        yield list(running.urls)


def _scenario_calibration(key: str, tmp_path: Path) -> tuple[Any, Any, list[str]]:
    """Start scenario ``key`` (skipped cleanly where it cannot run), calibrate it through the
    probe's real concurrent runs, and return the report, the calibration file and the URLs."""
    from sollol_locality.probe import calibrate

    target = tmp_path / "calibration.json"
    lines: list[str] = []
    with _running_scenario(key, WEIGHTS_MB) as urls:
        report = calibrate(urls, num_predict=COLOCATION_TOKENS, rounds=3, output=target,
                           config=offline_config(), progress=lines.append)
    return report, target, urls


def _label(url: str) -> str:
    return url.split("//", 1)[1]


@pytest.mark.integration
@pytest.mark.netns
@pytest.mark.timing  # co-location is found by slowdowns measured
def test_the_search_merges_no_independent_machines(tmp_path: Path) -> None:
    report, target, urls = _scenario_calibration("two-machines", tmp_path)
    found = report.colocation
    assert found is not None
    assert not found["untested_pairs"] and not found["budget_exhausted"]
    # Two machines on separate cores may still slow each other somewhat (memory bandwidth of
    # the VM they share, more under load): never a unit (ColocationFacts.units).
    facts = ParallelismCostModel(offline_config(calibration_file=target)).colocation_facts()
    assert facts.units() == ()
    fact = facts.fact(*map(_label, urls))
    assert fact is not None and (not fact.colocated or (fact.strength or 0) < UNIT_STRENGTH)
    planner = ExecutionPlanner(config=offline_config(calibration_file=target))
    identities = planner.topology.describe_many(urls)
    assert [i.facts["unit"] for i in identities] == ["address", "address"]  # type: ignore[union-attr]
    # the dispatch overhead is measured across both machines, as before
    assert [t["nodes"] for t in report.together] == [2, 2, 2]


@pytest.mark.integration
@pytest.mark.netns
@pytest.mark.timing  # co-location is found by slowdowns measured
def test_the_search_finds_the_hidden_pair_and_the_plan_uses_it(tmp_path: Path) -> None:
    report, target, urls = _scenario_calibration("hidden-colocation", tmp_path)
    pair, alone = sorted(map(_label, urls[:2])), _label(urls[2])
    found = report.colocation
    assert found is not None
    # Two nodes time-sharing one core take about 2x each: one unit. The third, on the other
    # core, may slow with them somewhat (memory bandwidth), which never makes it a member.
    facts = ParallelismCostModel(offline_config(calibration_file=target)).colocation_facts()
    assert [sorted(u) for u in facts.units()] == [pair]
    assert alone not in {m for g in facts.units() for m in g}
    assert found["runs"][0]["purpose"] == "all"
    # the dispatch overhead is measured over one node per measured unit: two, not three
    assert [t["nodes"] for t in report.together] == [2, 2, 2]
    planner = ExecutionPlanner(config=offline_config(calibration_file=target))
    identities = planner.topology.describe_many(urls)
    units = [i.unit for i in identities]  # type: ignore[union-attr]
    assert units[0] == units[1] != units[2]
    assert [i.facts["unit"] for i in identities] == [  # type: ignore[union-attr]
        "measured", "measured", "address"]
    plan = planner.plan(4, urls)
    assert f"{pair[0]} and {pair[1]} share one unit (measured " in plan.reason
    assert plan.units == 2


def test_the_budget_bounds_the_search_and_says_what_it_left() -> None:
    from sollol_locality.cli import _colocation_lines
    from sollol_locality.colocation import simulated_measure
    from sollol_locality.probe import colocation_summary, search_colocation

    topology = offline_topology()
    urls = [f"http://10.0.0.{i}:11434" for i in (5, 6, 7, 8)]
    machines = [topology.describe(url) for url in urls]
    labels = [m.instance.label for m in machines]
    solo = dict.fromkeys(labels, 1.0)
    # every node slowed in the first run: two hidden units, interleaved
    measure = simulated_measure({k: i % 2 for i, k in enumerate(labels)}, solo)
    now = [0.0]

    def timed(group: Any) -> Any:
        now[0] += 1.0  # each run takes one second of the injected clock
        return measure(group)

    found = search_colocation(machines, solo, timed, budget=2.5, clock=lambda: now[0])
    summary = colocation_summary(found)
    # the all-nodes run (1 s by the clock; its slowest node took 2 s): a test run estimated
    # at 2 s more no longer fits in 2.5 s
    assert summary["budget_exhausted"] and [r["purpose"] for r in summary["runs"]] == ["all"]
    assert summary["untested_nodes"] and summary["untested_pairs"]
    [line] = [x for x in _colocation_lines(summary) if x.startswith("left untested")]
    assert line.startswith("left untested (budget spent): 10.0.0.")
    unbounded = search_colocation(machines, solo, measure)
    assert [sorted(g.members) for g in unbounded.groups] == [sorted(labels[0::2]),
                                                               sorted(labels[1::2])]
    assert not unbounded.untested_pairs


@pytest.mark.integration
@pytest.mark.netns
def test_calibrate_budget_zero_reports_every_pair_untested(tmp_path: Path) -> None:
    target = tmp_path / "c.json"
    with _running_scenario("two-machines", 1) as urls:
        code, text = run("calibrate", "--tokens", "4", "--rounds", "1", "--budget", "0",
                         "--output", str(target), *OFFLINE, *urls)
        code_json, data = run("calibrate", "--tokens", "4", "--rounds", "1", "--budget", "0",
                              "--json", "--output", str(target), *OFFLINE, *urls)
    a, b = sorted(url.split("//", 1)[1] for url in urls)
    assert code == code_json == 0
    assert text.splitlines()[1:] == [f"left untested (budget spent): {a}/{b}; nodes "
                                     f"{', '.join(u.split('//', 1)[1] for u in urls)}"]
    found = json.loads(data)["colocation"]
    assert found["untested_pairs"] == [[a, b]] and found["budget_exhausted"]
    assert found["runs"] == [] and found["groups"] == []


@pytest.mark.integration
@pytest.mark.netns
@pytest.mark.timing  # co-location is found by slowdowns measured
def test_two_namespaces_on_one_core_are_one_measured_unit_not_a_dispatch_overhead(
        tmp_path: Path) -> None:
    report, target, urls = _scenario_calibration("shared-core-namespaces", tmp_path)
    found = report.colocation
    assert found is not None
    assert [g["members"] for g in found["groups"]] == [sorted(map(_label, urls))]
    data = json.loads(target.read_text())
    # one measured unit: no run across "machines" teaches a dispatch overhead
    assert report.together == [] and data["dispatch_overhead"] == []
    planner = ExecutionPlanner(config=offline_config(calibration_file=target))
    plan = planner.plan(4, urls)
    assert plan.units == 1 and plan.mode == "sequential"
    assert "share one unit (measured " in plan.reason
