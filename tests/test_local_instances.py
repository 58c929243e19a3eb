"""Local instances as their processes show them: units from CPU sets and GPU ids, slots from
``OLLAMA_NUM_PARALLEL``, the speed prior from the share of the machine; read at refresh only.

Every node here is a real process on loopback, started under ``taskset`` and with the
environment a person would give an Ollama instance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import test_processes
import test_topology
from helpers import FakeClock, offline_config
from hypothesis import given
from hypothesis import strategies as st
from test_processes import RealCgroup, StartListener, needs_root, needs_taskset, needs_two_cpus

from sollol_locality import ConfigError, LocalityConfig, NodeTopology
from sollol_locality.cost_model import ParallelismCostModel
from sollol_locality.local import LocalMachine
from sollol_locality.planner import ExecutionPlanner
from sollol_locality.processes import LocalProcesses
from sollol_locality.topology import (
    LOCALHOST_ID,
    ExecutionUnit,
    HostIdentity,
    _cpu_share,
    _gpu_text,
    _overlapping,
)

# Real listener processes (pinned, with an environment) and real cgroups, as test_processes.py
# starts them: its fixtures, used here by name.
start_listener = test_processes.start_listener
real_cgroup = test_processes.real_cgroup
netns = test_processes.netns
container_bridge = test_topology.container_bridge

ROOT = Path(__file__).resolve().parents[1]
CPU_COUNT = os.cpu_count() or 1


def make_topology(clock: FakeClock | None = None, **fields: Any) -> NodeTopology:
    clock = clock if clock is not None else FakeClock()
    config = offline_config(hosts_file=None, **fields)
    return NodeTopology(config, local_machine=LocalMachine(clock=clock), clock=clock,
                        processes=LocalProcesses(clock=clock))


def url(listener: Any, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{listener.port}"


def describe(topology: NodeTopology, *nodes: Any) -> list[HostIdentity]:
    found = topology.describe_many(list(nodes))
    assert all(isinstance(identity, HostIdentity) for identity in found), found
    return found  # type: ignore[return-value]


def planner_for(topology: NodeTopology, clock: Callable[[], float] | None = None
                ) -> ExecutionPlanner:
    model = ParallelismCostModel(topology.config)
    if clock is None:
        return ExecutionPlanner(topology, model, topology.config)
    return ExecutionPlanner(topology, model, topology.config, clock=clock)


# -- CPU sets ---------------------------------------------------------------------------------


@needs_taskset
@needs_two_cpus
def test_disjoint_cpu_sets_give_two_units_of_this_machine(start_listener: StartListener) -> None:
    first, second = start_listener(cpus="0"), start_listener(cpus="1")
    a, b = describe(make_topology(), url(first), url(second, "localhost"))
    assert a.unit == ExecutionUnit(LOCALHOST_ID, cpus=frozenset({0}))
    assert b.unit == ExecutionUnit(LOCALHOST_ID, cpus=frozenset({1}))
    assert (a.unit.label, b.unit.label) == ("localhost/cpu:0", "localhost/cpu:1")
    assert a.unit.host == b.unit.host == LOCALHOST_ID  # two units of one host
    assert a.facts["unit"] == b.facts["unit"] == "process"
    assert a.cpus == frozenset({0}) and b.cpus == frozenset({1})
    assert a.cpu_share == b.cpu_share == 1 / CPU_COUNT
    assert a.process is not None and a.process.status == "found"
    assert a.process.facts is not None and a.process.facts.pid == first.pid
    assert a.process.reason == (f"pid {first.pid} ({a.process.facts.name}) listens on "
                                f"127.0.0.1:{first.port}")


@needs_taskset
@needs_two_cpus
def test_overlapping_cpu_sets_give_one_unit(start_listener: StartListener) -> None:
    first, second = start_listener(cpus="0"), start_listener(cpus="0,1")
    a, b = describe(make_topology(), url(first), url(second))
    assert a.unit == b.unit
    # The union of the sets: the whole machine on a 2-CPU machine, else CPUs 0-1.
    assert a.unit.label == ("localhost/cpu" if CPU_COUNT == 2 else "localhost/cpu:0-1")
    assert a.facts["unit"] == b.facts["unit"] == "process"
    assert a.cpus == frozenset({0})  # each node keeps its own set; only the unit is shared


@needs_taskset
@needs_two_cpus
def test_an_unpinned_instance_overlaps_every_pinned_one(start_listener: StartListener) -> None:
    pinned = [start_listener(cpus="0"), start_listener(cpus="1")]
    free = start_listener()
    a, b, c = describe(make_topology(), *map(url, [*pinned, free]))
    assert a.unit == b.unit == c.unit == ExecutionUnit(LOCALHOST_ID)
    assert c.cpus is None and c.cpu_share is None  # the whole machine


def test_two_unpinned_instances_are_one_unit_as_before(start_listener: StartListener) -> None:
    a, b = describe(make_topology(), url(start_listener()), url(start_listener()))
    assert a.unit == b.unit == ExecutionUnit(LOCALHOST_ID)
    assert a.unit.label == "localhost/cpu"  # calibration keeps its key
    assert a.facts["unit"] == "process"


@needs_taskset
@needs_two_cpus
def test_the_topology_file_wins_over_the_process(start_listener: StartListener,
                                                 tmp_path: Path) -> None:
    first, second = start_listener(cpus="0", env={"OLLAMA_NUM_PARALLEL": "4"}), \
        start_listener(cpus="1")
    path = tmp_path / "t.toml"
    path.write_text(f'[nodes."{url(first)}"]\ncpus = "0-1"\nnum_parallel = 2\n'
                    f'[nodes."{url(second)}"]\ngpu = "3"\n')
    a, b = describe(make_topology(topology_file=path), url(first), url(second))
    assert a.cpus == frozenset({0, 1}) and a.slots == 2
    assert dict(a.facts) == {"host": "loopback", "unit": "topology file",
                             "slots": "topology file"}
    assert b.unit == ExecutionUnit(LOCALHOST_ID, True, "3")
    assert b.facts["unit"] == "topology file"


# -- slots ------------------------------------------------------------------------------------


def test_ollama_num_parallel_4_gives_4_slots(start_listener: StartListener) -> None:
    listener = start_listener(env={"OLLAMA_NUM_PARALLEL": "4"})
    plain, as_object = describe(make_topology(), url(listener),
                                {"url": url(listener, "localhost"), "num_parallel": 2})
    assert plain.slots == as_object.slots == 4  # the process wins over the node object
    assert plain.facts["slots"] == as_object.facts["slots"] == "process"


def test_without_the_variable_the_node_object_and_then_the_prior_decide(
    start_listener: StartListener
) -> None:
    listener = start_listener()
    plain, as_object = describe(make_topology(), url(listener),
                                {"url": url(listener, "localhost"), "num_parallel": 2})
    assert (plain.slots, plain.facts["slots"]) == (1, "prior")
    assert (as_object.slots, as_object.facts["slots"]) == (2, "node")


# -- GPUs (a declared environment on real processes: there is no GPU here) ---------------------


def test_cuda_visible_devices_0_and_1_give_two_gpu_units(start_listener: StartListener) -> None:
    zero = start_listener(env={"CUDA_VISIBLE_DEVICES": "0"})
    one = start_listener(env={"CUDA_VISIBLE_DEVICES": "1"})
    a, b = describe(make_topology(), url(zero), url(one))
    assert (a.unit, b.unit) == (ExecutionUnit(LOCALHOST_ID, True, "0"),
                                ExecutionUnit(LOCALHOST_ID, True, "1"))
    assert (a.unit.label, b.unit.label) == ("localhost/gpu:0", "localhost/gpu:1")
    assert a.facts["unit"] == b.facts["unit"] == "process"
    assert a.has_gpu and a.device == "0" and a.cpu_share is None


def test_one_gpu_id_seen_by_two_instances_is_one_unit(start_listener: StartListener) -> None:
    a, b = describe(make_topology(), url(start_listener(env={"CUDA_VISIBLE_DEVICES": "0"})),
                    url(start_listener(env={"CUDA_VISIBLE_DEVICES": "0"})))
    assert a.unit == b.unit == ExecutionUnit(LOCALHOST_ID, True, "0")


def test_intersecting_gpu_lists_share_one_unit(start_listener: StartListener) -> None:
    a, b, c = describe(make_topology(),
                       url(start_listener(env={"CUDA_VISIBLE_DEVICES": "0,1"})),
                       url(start_listener(env={"HIP_VISIBLE_DEVICES": "1"})),
                       url(start_listener(env={"CUDA_VISIBLE_DEVICES": "2"})))
    assert a.unit == b.unit == ExecutionUnit(LOCALHOST_ID, True, "0,1")
    assert c.unit == ExecutionUnit(LOCALHOST_ID, True, "2")
    assert (a.device, b.device) == ("0,1", "1")


def test_an_empty_gpu_list_means_cpu_only_whatever_the_node_says(
    start_listener: StartListener
) -> None:
    listener = start_listener(env={"CUDA_VISIBLE_DEVICES": ""})
    [identity] = describe(make_topology(),
                          {"url": url(listener), "has_gpu": True})
    assert not identity.has_gpu and identity.unit == ExecutionUnit(LOCALHOST_ID)
    assert identity.facts["unit"] == "process"


def test_no_gpu_variable_leaves_the_gpu_to_the_node_object(start_listener: StartListener) -> None:
    listener = start_listener()
    [identity] = describe(make_topology(), {"url": url(listener), "gpu": "1"})
    assert identity.unit == ExecutionUnit(LOCALHOST_ID, True, "1")
    assert identity.facts["unit"] == "node"


@pytest.mark.parametrize(("gpus", "namespace", "text"), [
    (("0",), None, "0"),
    (("1", "0"), None, "1,0"),
    (("0",), "docker:3f4e9c1a2b7d", "docker:3f4e9c1a2b7d/0"),
    (("GPU-8a1b", "1"), "docker:3f4e9c1a2b7d", "GPU-8a1b,docker:3f4e9c1a2b7d/1"),
])
def test_gpu_ids_are_counted_in_their_container(gpus: tuple[str, ...], namespace: str | None,
                                                text: str) -> None:
    # An index inside a container may be another GPU than the same index outside; a UUID not.
    assert _gpu_text(gpus, namespace) == text


@given(st.lists(st.one_of(st.none(), st.frozensets(st.integers(0, 7), min_size=1)),
                min_size=1, max_size=8))
def test_overlap_groups_partition_the_instances(sets: list[frozenset[int] | None]) -> None:
    groups = _overlapping(list(range(len(sets))), lambda i: sets[i])
    assert sorted(i for group in groups for i in group) == list(range(len(sets)))
    if any(s is None for s in sets):
        assert len(groups) == 1  # no known set: it may run anywhere
        return
    unions = [frozenset().union(*(sets[i] or () for i in group)) for group in groups]
    for i, left in enumerate(unions):
        for right in unions[i + 1:]:
            assert left.isdisjoint(right)  # different units never share a CPU
    for group in groups:  # and a group is connected through overlaps
        reached = {group[0]}
        grew = True
        while grew:
            grew = False
            for j in group:
                if j not in reached and any(sets[j] & sets[k] for k in reached):  # type: ignore[operator]
                    reached.add(j)
                    grew = True
        assert reached == set(group)


# -- the speed prior from the share of the machine ---------------------------------------------


@pytest.mark.parametrize(("cpus", "quota", "count", "share"), [
    (None, None, 8, None),
    (frozenset({0, 1}), None, 8, 0.25),
    (frozenset(range(8)), None, 8, None),
    (None, 2.0, 8, 0.25),
    (frozenset({0, 1, 2, 3}), 1.0, 8, 0.125),
    (frozenset({0}), 4.0, 8, 0.125),
    (None, 16.0, 8, None),
])
def test_cpu_share(cpus: frozenset[int] | None, quota: float | None, count: int,
                   share: float | None) -> None:
    assert _cpu_share(cpus, quota, count) == share


@needs_taskset
@needs_two_cpus
def test_a_pinned_instance_takes_its_share_of_the_machines_speed(
    start_listener: StartListener
) -> None:
    pinned, free = start_listener(cpus="0"), start_listener()
    identities = describe(make_topology(), url(pinned), url(free), "http://10.0.0.5:11434")
    profiles, unit = ParallelismCostModel(offline_config()).profiles(identities)
    assert unit == "tasks"
    times = [p.task_time for p in profiles]
    # The reference is an unpinned instance of this machine (and a remote node without data).
    assert times == [pytest.approx(CPU_COUNT), 1.0, 1.0]
    assert [p.speed_source for p in profiles] == ["prior"] * 3


def test_shares_count_relative_to_the_largest_local_instance() -> None:
    """Two instances pinned to half of this machine each are as fast as a remote node without
    data (nothing says how big that machine is); a quarter beside a half is half as fast."""
    topology = make_topology(read_processes=False)
    a, b, remote = describe(topology, "http://127.0.0.1:1", "http://127.0.0.1:2",
                            "http://10.0.0.5:11434")
    model = ParallelismCostModel(offline_config())
    halves, _ = model.profiles([replace(a, cpu_share=0.5), replace(b, cpu_share=0.5), remote])
    assert [p.task_time for p in halves] == [1.0, 1.0, 1.0]
    mixed, _ = model.profiles([replace(a, cpu_share=0.25), replace(b, cpu_share=0.5), remote])
    assert [p.task_time for p in mixed] == [2.0, 1.0, 1.0]


def test_the_share_counts_only_for_nodes_without_measurements() -> None:
    topology = make_topology(read_processes=False)
    [identity] = describe(topology, {"url": "http://127.0.0.1:1", "latency_ms": 500.0,
                                     "total_requests": 10})
    half = replace(identity, cpu_share=0.5)
    profiles, _ = ParallelismCostModel(offline_config()).profiles([half])
    assert profiles[0].speed_source == "metrics" and profiles[0].task_time == 0.5


@needs_two_cpus
def test_a_cgroup_quota_is_a_share_of_the_machine(
    start_listener: StartListener, real_cgroup: Callable[[str, int], RealCgroup]
) -> None:
    cgroup = real_cgroup("1", 50_000)  # CPU 1, half a core
    listener = start_listener()
    cgroup.add(listener.pid)
    [identity] = describe(make_topology(), url(listener))
    assert identity.cpus == frozenset({1})
    assert identity.cpu_share == 0.5 / CPU_COUNT


# -- the planner, without calibration ----------------------------------------------------------


@needs_taskset
@needs_two_cpus
def test_two_pinned_instances_on_disjoint_cores_are_planned_parallel() -> None:
    from sollol_locality.testing.emulator import start_emulator

    with start_emulator(weights_mb=1, taskset=(0,)) as a, \
            start_emulator(weights_mb=1, taskset=(1,)) as b:
        planner = planner_for(make_topology())
        plan = planner.plan(2, [a.url, b.url])
        assert not planner.cost_model.calibrated
        assert plan.mode == "parallel", plan.reason
        assert plan.tasks_per_node == [1, 1]
        assert plan.units == 2 and plan.unique_hosts == 1
        assert plan.speedup == pytest.approx(2 / 1.075)  # the same-host overhead prior


def test_two_unpinned_instances_of_this_machine_stay_sequential() -> None:
    from sollol_locality.testing.emulator import start_emulator

    with start_emulator(weights_mb=1) as a, start_emulator(weights_mb=1) as b:
        topology = make_topology()
        plan = planner_for(topology).plan(2, [a.url, b.url])
        assert plan.mode == "sequential", plan.reason
        units = {i.unit for i in describe(topology, a.url, b.url)}
        assert units == {ExecutionUnit(LOCALHOST_ID)}


@needs_taskset
@needs_two_cpus
@pytest.mark.parametrize(("gpus", "mode", "units"), [
    (("0", "0"), "sequential", 1),  # one machine, two instances on one GPU id
    (("0", "1"), "parallel", 2),  # one machine, two instances on two GPU ids
])
def test_one_gpu_id_against_two_gpu_ids(start_listener: StartListener, gpus: tuple[str, str],
                                        mode: str, units: int) -> None:
    # The scenarios "one-gpu-id" and "two-gpu-ids": disjoint cores, a declared environment.
    nodes = [url(start_listener(cpus=str(cpu), env={"CUDA_VISIBLE_DEVICES": gpu}))
             for cpu, gpu in enumerate(gpus)]
    topology = make_topology()
    plan = planner_for(topology).plan(2, nodes)
    assert plan.mode == mode, plan.reason
    assert len({i.unit for i in describe(topology, *nodes)}) == units


# -- read once per refresh, never per decision -------------------------------------------------


@needs_taskset
@needs_two_cpus
def test_the_process_scan_happens_at_refresh_only(start_listener: StartListener) -> None:
    first, second = start_listener(cpus="0"), start_listener(cpus="1")
    clock = FakeClock()
    topology = make_topology(clock)
    planner = planner_for(topology, FakeClock())  # its decision cache never expires here
    processes = topology.processes
    assert processes is not None and processes.scans == 0  # nothing read before a decision
    nodes = [url(first), url(second)]
    for tasks in range(2, 40):  # every task count is a decision of its own
        assert planner.plan(tasks, nodes).mode == "parallel"
        topology.describe_many(nodes)
    assert processes.scans == 1
    clock.tick(29.0)
    planner.plan(2, nodes)
    assert processes.scans == 1

    # A restart on the same port, now unpinned: noticed at the next refresh, and the planner's
    # cached decision (keyed on the process version) is not served for it.
    first.stop()
    restarted = start_listener(port=first.port)
    assert planner.plan(2, nodes).mode == "parallel"  # still the old scan: no new read
    assert processes.scans == 1
    clock.tick(1.0)
    plan = planner.plan(2, nodes)
    assert processes.scans == 2
    assert plan.mode == "sequential", plan.reason
    [identity, _] = describe(topology, *nodes)
    assert identity.process is not None and identity.process.facts is not None
    assert identity.process.facts.pid == restarted.pid
    assert processes.scans == 2


def test_remote_nodes_never_scan() -> None:
    topology = make_topology()
    planner_for(topology).plan(2, ["http://10.0.0.5:11434", "http://10.0.0.6:11434"])
    assert topology.processes is not None and topology.processes.scans == 0
    assert topology.process_version == 0


def test_read_processes_false_reads_nothing(start_listener: StartListener) -> None:
    listener = start_listener(env={"OLLAMA_NUM_PARALLEL": "4"})
    topology = NodeTopology(offline_config(hosts_file=None, read_processes=False))
    [identity] = describe(topology, url(listener))
    assert topology.processes is None
    assert identity.process is None and identity.slots == 1
    assert dict(identity.facts) == {"host": "loopback", "unit": "address", "slots": "prior"}


@pytest.mark.parametrize(("value", "expected"), [
    ("0", False), ("false", False), ("No", False), ("off", False),
    ("1", True), ("TRUE", True), ("yes", True), (" on ", True),
])
def test_the_processes_switch_from_the_environment(value: str, expected: bool) -> None:
    config = LocalityConfig.from_env({"SOLLOL_LOCALITY_PROCESSES": value})
    assert config.read_processes is expected
    assert LocalityConfig.from_env({}).read_processes is True


def test_a_bad_processes_switch_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        LocalityConfig.from_env({"SOLLOL_LOCALITY_PROCESSES": "maybe"})
    assert str(info.value) == ("SOLLOL_LOCALITY_PROCESSES='maybe' is not a boolean (expected "
                               "one of 1, true, yes, on, 0, false, no, off)")
    with pytest.raises(ConfigError, match=r"^read_processes=2 is not a boolean"):
        LocalityConfig(read_processes=2)  # type: ignore[arg-type]


# -- a container on this machine ----------------------------------------------------------------


@pytest.mark.netns
@needs_taskset
@needs_two_cpus
def test_a_container_address_reads_the_process_in_its_namespace(
    start_listener: StartListener, netns: str, container_bridge: str
) -> None:
    inside = start_listener("0.0.0.0", prefix=("ip", "netns", "exec", netns), cpus="1",
                            env={"OLLAMA_NUM_PARALLEL": "3", "CUDA_VISIBLE_DEVICES": "0"})
    host = start_listener(env={"CUDA_VISIBLE_DEVICES": "0"})
    topology = NodeTopology(offline_config(hosts_file=None), local_machine=LocalMachine())
    container, here = describe(topology, f"http://{container_bridge}.7:{inside.port}", url(host))
    assert container.source == "container" and container.physical_host_id == LOCALHOST_ID
    assert container.process is not None and container.process.facts is not None
    assert container.process.facts.pid == inside.pid
    assert container.process.facts.other_netns is True
    assert (container.slots, container.facts["slots"]) == (3, "process")
    # GPU 0 inside another namespace is counted there: not merged with this machine's GPU 0.
    assert container.unit == ExecutionUnit(LOCALHOST_ID, True, f"{container_bridge}.7/0")
    assert here.unit == ExecutionUnit(LOCALHOST_ID, True, "0") != container.unit


# -- what cannot be read ------------------------------------------------------------------------


DROPPED_DESCRIBE = """
import json, os, sys
import psutil  # imported before the uid drops: the interpreter's files are root's
from sollol_locality import LocalityConfig, NodeTopology
node = sys.argv[1]
config = LocalityConfig(hosts_file=None, nameservers="127.0.0.1:9", dns_timeout=0.3)
topology = NodeTopology(config)  # no I/O yet; built before the drop for its imports
os.setgid(65534)
os.setuid(65534)
identity = topology.describe(node)
print(json.dumps({"unit": identity.unit.label, "slots": identity.slots,
                  "facts": dict(identity.facts), "status": identity.process.status,
                  "reason": identity.process.reason}))
"""


@needs_root
@needs_taskset
@needs_two_cpus
def test_an_unreadable_process_falls_back_to_the_address_with_its_reason(
    start_listener: StartListener
) -> None:
    target = start_listener(cpus="0", env={"CUDA_VISIBLE_DEVICES": "0",
                                           "OLLAMA_NUM_PARALLEL": "4"})
    done = subprocess.run(
        [sys.executable, "-c", DROPPED_DESCRIBE, url(target)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen == {
        "unit": "localhost/cpu", "slots": 1,
        "facts": {"host": "loopback", "unit": "address", "slots": "prior"},
        "status": "access-denied",
        "reason": f"the listener on 127.0.0.1:{target.port} belongs to a process this user "
                  "may not inspect (access denied)",
    }


# -- shown by `sollol-locality hosts` -----------------------------------------------------------

OFFLINE = ("--nameserver", "127.0.0.1:9", "--no-hosts-file")


def run_cli(*argv: str) -> str:
    import io

    from sollol_locality.cli import main

    out = io.StringIO()
    assert main(list(argv), out=out) == 0
    return out.getvalue()


@needs_taskset
@needs_two_cpus
def test_hosts_shows_each_local_instances_process(start_listener: StartListener) -> None:
    first = start_listener(cpus="0", env={"OLLAMA_NUM_PARALLEL": "4", "CUDA_VISIBLE_DEVICES": "0"})
    second = start_listener(cpus="1")
    closed = test_processes.unused_port()
    text = run_cli("hosts", *OFFLINE, url(first, "localhost"), url(second), f"localhost:{closed}")
    lines = text.splitlines()
    name = Path(f"/proc/{first.pid}/comm").read_text().strip()
    assert lines[3].split(None, 1)[1] == (
        f"loopback  gpu 0  pid {first.pid} ({name}) cpus 0 gpus 0 slots 4  "
        "[unit: process, slots: process]")
    assert lines[4].split(None, 1)[1] == (
        f"loopback  pid {second.pid} ({name}) cpus 1 slots 1  [unit: process, slots: prior]")
    assert lines[5].split(None, 1)[1] == (
        f"loopback  process not read: nothing listens on port {closed} for localhost in this "
        "network namespace (a port published only by a kernel NAT rule is not followed)  "
        "[unit: address, slots: prior]")


@needs_taskset
@needs_two_cpus
def test_hosts_json_has_the_process_and_the_facts(start_listener: StartListener) -> None:
    listener = start_listener(cpus="1", env={"OLLAMA_NUM_PARALLEL": "2"})
    data = json.loads(run_cli("hosts", "--json", *OFFLINE, url(listener), "10.0.0.5:11434"))
    local, remote = data["hosts"]["localhost"][0], data["hosts"]["10.0.0.5"][0]
    assert (local["unit"], local["cpus"], local["slots"]) == ("localhost/cpu:1", "1", 2)
    assert local["facts"] == {"host": "loopback", "unit": "process", "slots": "process"}
    process = local["process"]
    assert process["pid"] == listener.pid and process["status"] == "found"
    assert (process["cpus"], process["gpus"], process["slots"]) == ("1", None, 2)
    assert process["listener"] == f"127.0.0.1:{listener.port}"
    assert remote["process"] is None
    assert remote["facts"] == {"host": "address", "unit": "address", "slots": "prior"}
