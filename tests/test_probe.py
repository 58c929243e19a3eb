"""Calibration: the ``calibrate`` command against emulator nodes on loopback, and the learning
rules it feeds (``ParallelismCostModel.observe``)."""

from __future__ import annotations

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
from sollol_locality.cli import main
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
