"""Simulated machines (sollol_locality.testing.machines): local machines, namespaces, clean-up."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

from sollol_locality.testing.machines import (  # noqa: E402
    AUTO_SUBNETS,
    NETNS_PREFIX,
    SCENARIOS,
    Cluster,
    MachineError,
    MachineSpec,
    NodeSpec,
    Scenario,
    ScenarioUnavailable,
    cleanup_stale,
    create_netns_machine,
    list_our_namespaces,
    netns_support,
    scenario_skip_reason,
    start_scenario,
)
from sollol_locality.testing.workload import run_parallel, run_sequential  # noqa: E402

WEIGHTS_MB = 8
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
NETNS_REASON = netns_support()


def netns_test(test: Callable[..., None]) -> Callable[..., None]:
    """Marked ``netns``; skipped, with the reason, where namespaces cannot be made."""
    skip = pytest.mark.skipif(NETNS_REASON is not None, reason=f"skipped: {NETNS_REASON}")
    return pytest.mark.netns(skip(test))


def get_json(url: str) -> Any:
    with _OPENER.open(url, timeout=10) as response:
        return json.load(response)


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may linger where PID 1 does not reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    return not running(pid)


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", "dev", name], capture_output=True).returncode == 0


def mine() -> set[str]:
    """Namespaces this test process made (other test runs may be going on at the same time)."""
    return {n for n in list_our_namespaces() if n.startswith(f"{NETNS_PREFIX}{os.getpid()}-")}


@pytest.fixture(autouse=True)
def no_namespace_left_behind() -> Iterator[None]:
    before = mine()
    yield
    assert mine() <= before


# ------------------------------------------------------------------------ scenarios as data


def test_scenarios_cover_the_issue() -> None:
    expected = {
        "same-host-ports": (1, False),
        "localhost-and-lan": (1, False),
        "two-machines": (2, True),
        "slow-and-fast": (2, True),
        "two-plus-one": (2, True),
        "shared-core-namespaces": (2, True),
    }
    found = {k: (s.physical_hosts, s.needs_netns) for k, s in SCENARIOS.items()}
    assert {k: v for k, v in found.items() if k in expected} == expected
    assert [n.machine for n in SCENARIOS["two-plus-one"].nodes] == ["local", "local", "remote"]
    assert {m.slowdown for m in SCENARIOS["slow-and-fast"].machines} == {1.0, 6.0}
    for key in ("same-host-ports", "localhost-and-lan"):
        [machine] = SCENARIOS[key].machines
        assert machine.cpus == (0,) and machine.netns_ip is None
    assert [m.cpus for m in SCENARIOS["two-machines"].machines] == [(0,), (1,)]


def test_scenario_subnets_do_not_overlap() -> None:
    import ipaddress

    networks = [
        ipaddress.IPv4Interface(f"{m.netns_ip}/24").network
        for s in SCENARIOS.values()
        for m in s.machines
        if m.netns_ip
    ]
    assert len(set(networks)) == len(networks)
    assert all(n.subnet_of(ipaddress.IPv4Network("10.213.0.0/16")) for n in networks)
    assert not any(n.overlaps(AUTO_SUBNETS) for n in networks)


@pytest.mark.parametrize(
    ("machines", "nodes", "message"),
    [
        (
            (MachineSpec("a", (0,)), MachineSpec("a", (1,))),
            (),
            "Invalid scenario 'x': duplicate machine names ['a', 'a']",
        ),
        ((MachineSpec("a", (0,)),), (NodeSpec("b"),), "Invalid scenario 'x': no machine named 'b'"),
        (
            (MachineSpec("a", (0,)),),
            (NodeSpec("a", "netns"),),
            "Invalid scenario 'x': address 'netns' on machine 'a' (this machine)",
        ),
    ],
)
def test_invalid_scenarios(machines: Any, nodes: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        Scenario("x", "bad", machines, nodes)
    assert str(info.value) == message


def test_unknown_scenario_key() -> None:
    with Cluster() as cluster, pytest.raises(ValueError, match="Invalid scenario 'nope'"):
        start_scenario("nope", cluster)


# -------------------------------------------------------------------------- local machine


def test_local_scenario_runs_and_is_removed() -> None:
    with Cluster() as cluster:
        scenario = start_scenario("same-host-ports", cluster, weights_mb=WEIGHTS_MB)
        assert len(set(scenario.urls)) == 2
        assert scenario.truth() == {"local": list(scenario.urls)}
        for url in scenario.urls:
            assert get_json(url + "/api/emulator")["affinity"] == [0]
        pids = [node.process.pid for node in scenario.nodes]
    assert not any(running(pid) for pid in pids)


def test_exception_inside_cluster_stops_every_emulator() -> None:
    pids = []
    with pytest.raises(RuntimeError, match="boom"), Cluster() as cluster:
        machine = cluster.local_machine(cpus=(0,))
        for _ in range(2):
            pids.append(machine.start_emulator(weights_mb=1).pid)
        raise RuntimeError("boom")
    assert pids and not any(running(pid) for pid in pids)


def test_localhost_and_lan_scenario() -> None:
    reason = scenario_skip_reason(SCENARIOS["localhost-and-lan"])
    if reason:
        pytest.skip(reason)
    with Cluster() as cluster:
        scenario = start_scenario("localhost-and-lan", cluster, weights_mb=WEIGHTS_MB)
        loopback, lan = scenario.urls
        assert loopback.startswith("http://127.0.0.1:")
        assert not lan.startswith("http://127.")
        assert scenario.nodes[0].process.port != scenario.nodes[1].process.port
        for url in scenario.urls:
            assert get_json(url + "/api/version")["version"]


# ----------------------------------------------------------------------- network namespaces


def test_netns_support_says_why_when_not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    import sollol_locality.testing.machines as machines

    monkeypatch.setattr(machines.os, "geteuid", lambda: 1000)
    reason = machines.netns_support.__wrapped__()
    assert reason == "network namespaces need root (running as uid 1000)"


def test_netns_scenarios_are_skipped_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import sollol_locality.testing.machines as machines

    reason = "network namespaces need root (running as uid 1000)"
    monkeypatch.setattr(machines, "netns_support", lambda: reason)
    assert scenario_skip_reason(SCENARIOS["same-host-ports"]) is None
    for key in ("two-machines", "slow-and-fast", "two-plus-one", "shared-core-namespaces"):
        assert scenario_skip_reason(SCENARIOS[key]) == f"scenario {key!r} skipped: {reason}"
    with Cluster() as cluster, pytest.raises(ScenarioUnavailable) as info:
        start_scenario("two-machines", cluster)
    assert info.value.reason == f"scenario 'two-machines' skipped: {reason}"
    with pytest.raises(machines.NetnsUnavailable, match="need root"):
        create_netns_machine("x", None, cpus=None)


@netns_test
def test_netns_machine_reachable_and_removed() -> None:
    with Cluster() as cluster:
        machine = cluster.netns_machine("t1", None, cpus=(1,))
        assert machine.netns in list_our_namespaces()
        network = machine.interface.network
        assert network.subnet_of(AUTO_SUBNETS) and network.prefixlen == 24
        assert machine.interface.ip == network.network_address + 2
        assert machine.host_interface.ip == network.network_address + 1
        assert link_exists(machine.host_veth)
        node = machine.start_emulator(weights_mb=WEIGHTS_MB)
        assert node.url.startswith(f"http://{machine.ip}:")
        info = get_json(node.url + "/api/emulator")
        assert info["affinity"] == [1] and info["pid"] == node.pid
        assert machine.pids() == [node.pid]
        result = run_sequential(node.url, 2, num_predict=3)
        assert [c.eval_count for c in result.chunks] == [3, 3]
        netns, veth, pid = machine.netns, machine.host_veth, node.pid
    assert netns not in list_our_namespaces()
    assert not link_exists(veth)
    assert not running(pid)


@netns_test
def test_exception_inside_removes_namespaces_and_processes() -> None:
    made: dict[str, Any] = {}
    with pytest.raises(KeyError), Cluster() as cluster:
        machine = cluster.netns_machine("t2", None, cpus=(0,))
        made.update(netns=machine.netns, veth=machine.host_veth)
        made["pid"] = machine.start_emulator(weights_mb=1).pid
        raise KeyError("inside")
    assert made["netns"] not in list_our_namespaces()
    assert not link_exists(made["veth"])
    assert not running(made["pid"])


@netns_test
def test_duplicate_machine_name_leaves_the_first_alone() -> None:
    with Cluster() as cluster:
        first = cluster.netns_machine("t8", None, cpus=(0,))
        with pytest.raises(MachineError, match="already has a machine 't8'"):
            cluster.netns_machine("t8", None, cpus=(0,))
        assert first.exists() and link_exists(first.host_veth)


@netns_test
def test_standalone_machine_closes() -> None:
    machine = create_netns_machine("t3", None, cpus=None)
    try:
        pid = machine.start_emulator(weights_mb=1).pid
    finally:
        machine.close()
    assert machine.netns not in list_our_namespaces() and not running(pid)
    machine.close()  # idempotent


@netns_test
def test_overlapping_subnet_is_refused_and_nothing_is_left() -> None:
    with Cluster() as cluster:
        first = cluster.netns_machine("t4", None, cpus=(0,))
        before = mine()
        taken = first.interface.network
        with pytest.raises(MachineError) as info:
            cluster.netns_machine("t5", str(taken.network_address + 3), cpus=(0,))
        assert str(info.value).startswith(f"subnet {taken} overlaps {taken} (interface ")
        assert mine() == before


@netns_test
def test_two_machine_scenario_runs_in_parallel() -> None:
    with Cluster() as cluster:
        scenario = start_scenario("two-machines", cluster, weights_mb=WEIGHTS_MB, auto_subnets=True)
        assert scenario.truth() == {"m1": [scenario.urls[0]], "m2": [scenario.urls[1]]}
        affinities = [get_json(u + "/api/emulator")["affinity"] for u in scenario.urls]
        assert affinities == [[0], [1]]
        result = run_parallel(scenario.urls, 4, num_predict=2)
        counts = result.chunks_per_node()
        assert set(counts) == set(scenario.urls) and min(counts.values()) >= 1
        assert sorted(c.index for c in result.chunks) == [0, 1, 2, 3]
        assert [c.node for c in result.chunks[:2]] == list(scenario.urls)  # chunk i -> node i


_HELPER = textwrap.dedent(
    """
    import signal, sys, threading
    from sollol_locality.testing.machines import Cluster
    # As a terminal program: a background test run starts children with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with Cluster() as cluster:
        machine = cluster.netns_machine(sys.argv[1], None, cpus=(0,))
        node = machine.start_emulator(weights_mb=1)
        print(machine.netns, machine.host_veth, node.pid, flush=True)
        threading.Event().wait()
    """
)


def _start_helper(name: str) -> tuple[subprocess.Popen[str], str, str, int]:
    helper = subprocess.Popen(
        [sys.executable, "-c", _HELPER, name], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert helper.stdout is not None
    line = helper.stdout.readline().split()
    if len(line) != 3:
        helper.kill()
        _, err = helper.communicate()
        pytest.fail(f"helper did not start: {err}")
    netns, veth, pid = line
    return helper, netns, veth, int(pid)


@netns_test
@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGINT, -signal.SIGINT), (signal.SIGTERM, 128 + signal.SIGTERM)]
)
def test_signal_cleans_up(sig: signal.Signals, code: int) -> None:
    helper, netns, veth, pid = _start_helper("t6")
    try:
        assert netns in list_our_namespaces() and running(pid)
        helper.send_signal(sig)
        _, err = helper.communicate(timeout=30)
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.communicate()
    assert helper.returncode == code, err
    assert netns not in list_our_namespaces()
    assert not link_exists(veth)
    assert not running(pid)


@netns_test
def test_cleanup_stale_after_sigkill() -> None:
    helper, netns, veth, pid = _start_helper("t7")
    helper.kill()
    helper.communicate(timeout=30)
    # The emulator leaves by itself (its stdin closed); only the namespace stays behind.
    assert wait_gone(pid, 10)
    assert netns in list_our_namespaces()
    assert cleanup_stale(names=[netns]) == [netns]
    assert netns not in list_our_namespaces()
    assert not link_exists(veth)


# ------------------------------------------- slots, pinning, co-location: scenario ground truth


@pytest.mark.parametrize(
    ("key", "units", "hidden", "batching", "pinned"),
    [
        ("batching-node", ((0,),), (), (0,), ()),
        ("two-batching-instances", ((0, 1),), (), (0, 1), ()),
        ("batching-beside-plain", ((0,), (1,)), (), (0,), ()),
        ("pinned-instances", ((0,), (1,)), (), (), (0, 1)),
        ("hidden-colocation", ((0, 1), (2,)), ((0, 1),), (), ()),
        ("two-colocated-pairs", ((0, 2), (1, 3)), ((0, 2), (1, 3)), (), ()),
        ("shared-core-namespaces", ((0, 1),), ((0, 1),), (), ()),
        ("two-machines", ((0,), (1,)), (), (), ()),
        ("same-host-ports", ((0, 1),), (), (), ()),
        ("one-gpu-id", ((0,), (1,)), (), (), (0, 1)),
        ("two-gpu-ids", ((0,), (1,)), (), (), (0, 1)),
    ],
)
def test_scenarios_state_their_ground_truth(
    key: str, units: Any, hidden: Any, batching: Any, pinned: Any
) -> None:
    scenario = SCENARIOS[key]
    assert scenario.units() == units and scenario.hidden_colocation == hidden
    assert scenario.batching_nodes == batching and scenario.pinned_nodes == pinned
    rows = scenario.truth()
    assert [row["node"] for row in rows] == list(range(len(scenario.nodes)))
    assert {i for row in rows if row["batching"] for i in [row["node"]]} == set(batching)
    assert all(row["num_parallel"] == (4 if row["batching"] else 1) for row in rows)
    for group in units:
        assert {rows[i]["unit"] for i in group} == {rows[group[0]]["unit"]}
        for i in group:
            assert rows[i]["shares_unit_with"] == [j for j in group if j != i]


def test_scenario_specs_are_checked() -> None:
    machines = (MachineSpec("a", (0,)),)
    with pytest.raises(ValueError) as info:
        Scenario("x", "bad", machines, (NodeSpec("a", env=(("OLLAMA_NUM_PARALLEL", "0"),)),))
    assert str(info.value) == (
        "Invalid scenario 'x': OLLAMA_NUM_PARALLEL '0' is not a whole number >= 1"
    )
    with pytest.raises(ValueError, match="Invalid scenario 'x': empty taskset"):
        Scenario("x", "bad", machines, (NodeSpec("a", taskset=()),))


def both_cpus() -> None:
    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("needs CPUs 0 and 1")


def test_pinned_instances_run_under_taskset() -> None:
    both_cpus()
    with Cluster() as cluster:
        scenario = start_scenario("pinned-instances", cluster, weights_mb=1)
        facts = scenario.facts()
        for node, cpus in zip(scenario.nodes, ({0}, {1}), strict=True):
            pid = node.process.pid
            assert os.sched_getaffinity(pid) == cpus  # the kernel's answer, not the emulator's
            command = node.process.command
            assert Path(command[0]).name == "taskset" and command[1:3] == ("-c", str(min(cpus)))
            # taskset exec'd the interpreter: the pid is the emulator itself
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert b"sollol_locality/testing/emulator.py" in cmdline
            assert get_json(node.url + "/api/emulator")["config"]["cpus"] is None
            assert facts[node.url]["pid"] == pid and facts[node.url]["pinned"] == "taskset"
        assert scenario.units() == [[scenario.urls[0]], [scenario.urls[1]]]


def proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().partition("=")[::2] for item in raw.split(b"\0") if item)


def test_environment_reaches_the_instance() -> None:
    env = {"OLLAMA_NUM_PARALLEL": "4", "CUDA_VISIBLE_DEVICES": "1"}
    with Cluster() as cluster:
        node = cluster.local_machine("box", cpus=(min(os.sched_getaffinity(0)),)).start_emulator(
            weights_mb=1, env=env
        )
        environ = proc_environ(node.pid)
        info = get_json(node.url + "/api/emulator")
    assert environ["OLLAMA_NUM_PARALLEL"] == "4" and environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert info["num_parallel"] == 4 and info["sources"]["num_parallel"] == "environment"
    assert info["environ"]["CUDA_VISIBLE_DEVICES"] == "1"


def test_batching_scenario_batches_four_and_queues_the_fifth() -> None:
    from sollol_locality.testing.emulator import emulator_stats, set_paused, wait_waiting

    with Cluster() as cluster:
        [node] = start_scenario("batching-node", cluster, weights_mb=1).nodes
        set_paused(node.url, True)
        results: list[Any] = []
        threads = [
            threading.Thread(target=lambda: results.append(run_sequential(node.url, 1,
                                                                          num_predict=5)))
            for _ in range(5)
        ]  # fmt: skip
        for thread in threads:
            thread.start()
        assert wait_waiting(node.url, 5)["waiting"] == 5
        set_paused(node.url, False)
        for thread in threads:
            thread.join(60)
        stats = emulator_stats(node.url)
    assert len(results) == 5
    assert stats["num_parallel"] == 4 and stats["served"] == 5
    assert stats["max_batch"] == 4 and stats["max_in_flight"] == 4 and stats["queued"] == 1


@netns_test
@pytest.mark.parametrize(
    ("key", "cpus", "units"),
    [
        ("hidden-colocation", [{0}, {0}, {1}], [[0, 1], [2]]),
        ("two-colocated-pairs", [{0}, {1}, {0}, {1}], [[0, 2], [1, 3]]),
    ],
)
def test_colocation_scenarios_run_for_real(key: str, cpus: Any, units: Any) -> None:
    both_cpus()
    with Cluster() as cluster:
        scenario = start_scenario(key, cluster, weights_mb=1, auto_subnets=True)
        facts = scenario.facts()
        urls = scenario.urls
        hosts = {url.split("//")[1].rsplit(":", 1)[0] for url in urls}
        assert len(hosts) == len(urls)  # every node has its own address
        assert [os.sched_getaffinity(node.process.pid) for node in scenario.nodes] == cpus
        assert scenario.units() == [[urls[i] for i in group] for group in units]
        for group in units:
            for i in group:
                assert facts[urls[i]]["hidden"] == (len(group) > 1)
                assert facts[urls[i]]["shares_unit_with"] == [urls[j] for j in group if j != i]
        result = run_parallel(urls, len(urls), num_predict=2)
        assert sorted(c.index for c in result.chunks) == list(range(len(urls)))


@pytest.mark.parametrize("key", sorted(SCENARIOS))
def test_every_scenario_starts_as_its_truth_says(key: str) -> None:
    scenario = SCENARIOS[key]
    reason = scenario_skip_reason(scenario)
    if reason is not None:
        pytest.skip(reason)
    with Cluster() as cluster:
        running_scenario = start_scenario(scenario, cluster, weights_mb=1, auto_subnets=True)
        facts = running_scenario.facts()
        for node in running_scenario.nodes:
            row = facts[node.url]
            info = get_json(node.url + "/api/emulator")
            assert info["pid"] == row["pid"] == node.process.pid
            assert sorted(os.sched_getaffinity(row["pid"])) == row["cpus"] == info["affinity"]
            assert info["num_parallel"] == row["num_parallel"]
            for name, value in row["env"].items():
                assert proc_environ(row["pid"])[name] == value


@pytest.mark.parametrize(
    ("key", "gpus", "shared"),
    [("one-gpu-id", [["0"], ["0"]], [[1], [0]]), ("two-gpu-ids", [["0"], ["1"]], [[], []])],
)
def test_gpu_scenarios_declare_their_gpus(key: str, gpus: Any, shared: Any) -> None:
    rows = SCENARIOS[key].truth()
    assert [row["gpus"] for row in rows] == gpus
    assert [row["shares_gpu_with"] for row in rows] == shared
    assert [row["env"]["CUDA_VISIBLE_DEVICES"] for row in rows] == [g[0] for g in gpus]
