"""The processes behind local nodes: real listeners on loopback, pinned and with environments."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import FakeClock
from hypothesis import given
from hypothesis import strategies as st

from sollol_locality import ConfigError, InvalidNodeAddress
from sollol_locality.processes import (
    ListeningSocket,
    LocalProcesses,
    ProcessFacts,
    parse_cpu_list,
    parse_cpu_max,
    parse_gpu_list,
    read_process_facts,
)

ROOT = Path(__file__).resolve().parents[1]
CLEAN_VARIABLES = (
    "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL",
    "OLLAMA_NUM_PARALLEL",
)
# Binds (host, port) from argv, prints the port, and holds the socket until stdin closes.
LISTENER = """
import os, socket, sys
if os.environ.get("LISTENER_COMM"):
    with open("/proc/self/comm", "w") as comm:
        comm.write(os.environ["LISTENER_COMM"])
host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen()
print(s.getsockname()[1], flush=True)
sys.stdin.read()
"""

needs_two_cpus = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0),
    reason="needs CPUs 0 and 1",
)
needs_taskset = pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


class Listener:
    def __init__(self, process: subprocess.Popen[str], port: int) -> None:
        self.process = process
        self.port = port

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


StartListener = Callable[..., Listener]


@pytest.fixture
def start_listener() -> Iterator[StartListener]:
    """``start_listener(host, port=0, cpus=None, env=None, prefix=(), args=())``: a listener
    process that has bound its socket (it printed its port) when this returns."""
    started: list[Listener] = []

    def start(host: str = "127.0.0.1", port: int = 0, *, cpus: str | None = None,
              env: dict[str, str] | None = None, prefix: tuple[str, ...] = (),
              args: tuple[str, ...] = ()) -> Listener:
        environ = {k: v for k, v in os.environ.items() if k not in CLEAN_VARIABLES}
        environ.update(env or {})
        command = [*prefix]
        if cpus is not None:
            command += ["taskset", "-c", cpus]
        command += [sys.executable, "-c", LISTENER, host, str(port), *args]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True, env=environ)
        assert process.stdout is not None
        line = process.stdout.readline()  # blocks until the socket is bound, or the exit
        if not line.strip().isdigit():
            process.kill()
            process.wait()
            pytest.fail(f"listener {command!r} did not start: {line!r}")
        listener = Listener(process, int(line))
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.stop()


def facts_of(processes: LocalProcesses, listener: Listener,
             address: str = "127.0.0.1") -> ProcessFacts:
    found = processes.lookup(address, listener.port)
    assert found.status == "found", found.reason
    assert found.facts is not None
    return found.facts


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- CPU sets -----------------------------------------------------------------------------------


@needs_taskset
@needs_two_cpus
def test_disjoint_cpu_sets_are_read_as_disjoint(start_listener: StartListener) -> None:
    first, second = start_listener(cpus="0"), start_listener(cpus="1")
    processes = LocalProcesses(clock=FakeClock())
    a, b = facts_of(processes, first), facts_of(processes, second)
    assert (a.pid, b.pid) == (first.pid, second.pid)
    assert a.cpus == frozenset({0})
    assert b.cpus == frozenset({1})
    assert a.cpus.isdisjoint(b.cpus)


@needs_taskset
@needs_two_cpus
def test_overlapping_cpu_sets_are_read_as_overlapping(start_listener: StartListener) -> None:
    first, second = start_listener(cpus="0"), start_listener(cpus="0,1")
    processes = LocalProcesses(clock=FakeClock())
    a, b = facts_of(processes, first), facts_of(processes, second)
    assert a.cpus == frozenset({0})
    assert b.cpus == frozenset({0, 1})
    assert a.cpus & b.cpus == frozenset({0})


def test_an_unpinned_process_has_this_machines_cpus(start_listener: StartListener) -> None:
    facts = facts_of(LocalProcesses(clock=FakeClock()), start_listener())
    assert facts.cpus is not None
    assert facts.cpus <= frozenset(range(os.cpu_count() or 1))
    assert facts.name == "python3" or facts.name.startswith("python")
    assert facts.create_time is not None
    assert facts.other_netns is False
    assert facts.container is None


# -- environment: slots and GPUs ----------------------------------------------------------------


def test_ollama_num_parallel_gives_slots(start_listener: StartListener) -> None:
    facts = facts_of(LocalProcesses(clock=FakeClock()),
                     start_listener(env={"OLLAMA_NUM_PARALLEL": "4"}))
    assert facts.slots == 4
    assert facts.note("slots") is None


@pytest.mark.parametrize("value", ["0", "-2", "four", "2.5", ""])
def test_a_bad_ollama_num_parallel_is_ignored_with_a_note(
    start_listener: StartListener, value: str
) -> None:
    facts = facts_of(LocalProcesses(clock=FakeClock()),
                     start_listener(env={"OLLAMA_NUM_PARALLEL": value}))
    assert facts.slots is None
    assert facts.note("slots") == (
        f"OLLAMA_NUM_PARALLEL={value!r} is not a positive integer; ignored"
    )


def test_cuda_visible_devices_0_and_1_are_different_gpus(start_listener: StartListener) -> None:
    zero = start_listener(env={"CUDA_VISIBLE_DEVICES": "0"})
    one = start_listener(env={"CUDA_VISIBLE_DEVICES": "1"})
    processes = LocalProcesses(clock=FakeClock())
    a, b = facts_of(processes, zero), facts_of(processes, one)
    assert (a.gpus, a.gpu_variable) == (("0",), "CUDA_VISIBLE_DEVICES")
    assert (b.gpus, b.gpu_variable) == (("1",), "CUDA_VISIBLE_DEVICES")


@pytest.mark.parametrize(("env", "gpus", "variable"), [
    ({}, None, None),
    ({"CUDA_VISIBLE_DEVICES": ""}, (), "CUDA_VISIBLE_DEVICES"),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, (), "CUDA_VISIBLE_DEVICES"),
    ({"HIP_VISIBLE_DEVICES": "NoDevFiles"}, (), "HIP_VISIBLE_DEVICES"),
    ({"ROCR_VISIBLE_DEVICES": "1,0"}, ("1", "0"), "ROCR_VISIBLE_DEVICES"),
    ({"GPU_DEVICE_ORDINAL": "2"}, ("2",), "GPU_DEVICE_ORDINAL"),
    ({"HIP_VISIBLE_DEVICES": "1", "CUDA_VISIBLE_DEVICES": "0"}, ("0",), "CUDA_VISIBLE_DEVICES"),
])
def test_gpu_variables(start_listener: StartListener, env: dict[str, str],
                       gpus: tuple[str, ...] | None, variable: str | None) -> None:
    facts = facts_of(LocalProcesses(clock=FakeClock()), start_listener(env=env))
    assert (facts.gpus, facts.gpu_variable) == (gpus, variable)


@pytest.mark.parametrize(("value", "gpus"), [
    ("0", ("0",)),
    ("0,1", ("0", "1")),
    (" 1 , 0 ", ("1", "0")),
    ("GPU-8a1b2c3d-0000-1111-2222-333344445555", ("GPU-8a1b2c3d-0000-1111-2222-333344445555",)),
    ("", ()),
    ("-1", ()),
    ("NoDevFiles", ()),
    ("0,-1,1", ("0",)),
])
def test_parse_gpu_list(value: str, gpus: tuple[str, ...]) -> None:
    assert parse_gpu_list(value) == gpus


# -- matching the node's address to the listener ------------------------------------------------


@pytest.mark.parametrize(("bind", "node"), [
    ("127.0.0.1", "127.0.0.1"),
    ("127.0.0.1", "localhost"),
    ("127.0.0.1", "0.0.0.0"),
    ("127.0.0.1", "::ffff:127.0.0.1"),
    ("0.0.0.0", "127.0.0.1"),
    ("::", "127.0.0.1"),
    ("::", "::1"),
    ("::1", "[::1]"),
    ("::1", "::"),
])
def test_listener_is_found_on_the_nodes_address_or_the_wildcard(
    start_listener: StartListener, bind: str, node: str
) -> None:
    listener = start_listener(bind)
    found = LocalProcesses(clock=FakeClock()).lookup(node, listener.port)
    assert found.status == "found", found.reason
    assert found.facts is not None and found.facts.pid == listener.pid
    listen = f"[{bind}]:{listener.port}" if ":" in bind else f"{bind}:{listener.port}"
    assert found.listener == listen
    assert found.reason == f"pid {listener.pid} ({found.facts.name}) listens on {listen}"


def test_a_listener_on_another_address_does_not_serve_the_node(
    start_listener: StartListener
) -> None:
    listener = start_listener("127.0.0.2")
    found = LocalProcesses(clock=FakeClock()).lookup("127.0.0.1", listener.port)
    assert (found.status, found.facts) == ("no-listener", None)


def test_the_exact_address_wins_over_the_wildcard() -> None:
    sockets = [
        ListeningSocket(ipaddress.ip_address("0.0.0.0"), 8000, 1),
        ListeningSocket(ipaddress.ip_address("127.0.0.1"), 8000, os.getpid()),
    ]
    found = LocalProcesses(clock=FakeClock(), scanner=lambda: sockets).lookup("127.0.0.1", 8000)
    assert found.facts is not None and found.facts.pid == os.getpid()
    assert found.listener == "127.0.0.1:8000"


def test_no_listener_gives_no_facts_and_says_why() -> None:
    port = unused_port()
    found = LocalProcesses(clock=FakeClock()).lookup("127.0.0.1", port)
    assert found.status == "no-listener"
    assert found.facts is None
    assert found.reason == (
        f"nothing listens on port {port} for 127.0.0.1 in this network namespace "
        "(a port published only by a kernel NAT rule is not followed)"
    )


# -- caching and refresh ------------------------------------------------------------------------


def test_many_lookups_one_scan(start_listener: StartListener) -> None:
    listeners = [start_listener(), start_listener("::")]
    clock = FakeClock()
    processes = LocalProcesses(clock=clock)
    assert processes.scans == 0  # the constructor does no I/O
    for _ in range(50):
        for listener in listeners:
            assert processes.lookup("127.0.0.1", listener.port).status == "found"
        processes.lookup("127.0.0.1", unused_port())
    assert processes.scans == 1
    clock.tick(29.9)
    processes.lookup("127.0.0.1", listeners[0].port)
    assert processes.scans == 1
    clock.tick(0.1)
    processes.lookup("127.0.0.1", listeners[0].port)
    assert processes.scans == 2


def test_a_restarted_instance_is_noticed_at_the_next_refresh(
    start_listener: StartListener
) -> None:
    first = start_listener()
    clock = FakeClock()
    processes = LocalProcesses(clock=clock)
    assert facts_of(processes, first).pid == first.pid
    version = processes.version
    first.stop()
    second = start_listener(port=first.port)
    assert second.pid != first.pid
    assert facts_of(processes, first).pid == first.pid  # cached until the refresh
    clock.tick(30.0)
    assert facts_of(processes, second).pid == second.pid
    assert processes.scans == 2
    assert processes.version == version + 1


def test_refresh_scans_now(start_listener: StartListener) -> None:
    processes = LocalProcesses(clock=FakeClock())
    port = unused_port()
    assert processes.lookup("127.0.0.1", port).status == "no-listener"
    listener = start_listener(port=port)
    processes.refresh()
    assert facts_of(processes, listener).pid == listener.pid
    assert processes.scans == 2


# -- what cannot be read ------------------------------------------------------------------------


def _raise(exc: BaseException) -> Callable[[], list[ListeningSocket]]:
    def scanner() -> list[ListeningSocket]:
        raise exc
    return scanner


@pytest.mark.parametrize(("exc", "status", "reason"), [
    (ImportError("No module named 'psutil'"), "unavailable",
     "psutil is not installed, so the processes behind local ports are not read"),
    (PermissionError("denied"), "access-denied",
     "listing the listening sockets was denied (denied)"),
    (RuntimeError("boom"), "unavailable",
     "listing the listening sockets failed (RuntimeError: boom)"),
])
def test_a_failed_scan_says_why(exc: BaseException, status: str, reason: str) -> None:
    found = LocalProcesses(clock=FakeClock(), scanner=_raise(exc)).lookup("127.0.0.1", 11434)
    assert (found.status, found.facts, found.reason) == (status, None, reason)


def test_a_socket_whose_owner_is_hidden_is_access_denied() -> None:
    sockets = [ListeningSocket(ipaddress.ip_address("0.0.0.0"), 11434, None)]
    found = LocalProcesses(clock=FakeClock(), scanner=lambda: sockets).lookup("127.0.0.1", 11434)
    assert found.status == "access-denied"
    assert found.reason == ("the listener on 0.0.0.0:11434 belongs to a process this user may "
                            "not inspect (access denied)")


def test_a_listener_that_exited_before_it_was_read() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    sockets = [ListeningSocket(ipaddress.ip_address("127.0.0.1"), 11434, gone.pid)]
    found = LocalProcesses(clock=FakeClock(), scanner=lambda: sockets).lookup("127.0.0.1", 11434)
    assert (found.status, found.facts) == ("no-listener", None)
    assert found.reason == f"the listener on 127.0.0.1:11434 (pid {gone.pid}) exited"


DROPPED_LOOKUP = """
import json, os, sys
import psutil  # imported before the uid drops: the interpreter's files are root's
from sollol_locality.processes import LocalProcesses, read_process_facts
pid, port = int(sys.argv[1]), int(sys.argv[2])
os.setgid(65534)
os.setuid(65534)
found = LocalProcesses().lookup("127.0.0.1", port)
facts = read_process_facts(pid)
print(json.dumps({"status": found.status, "reason": found.reason,
                  "facts": found.facts is not None, "notes": dict(facts.notes),
                  "gpus": facts.gpus, "slots": facts.slots, "cpus": sorted(facts.cpus or ())}))
"""


@needs_root
@needs_taskset
def test_an_unreadable_process_falls_back_with_its_reason(start_listener: StartListener) -> None:
    target = start_listener(cpus="0", env={"CUDA_VISIBLE_DEVICES": "0",
                                           "OLLAMA_NUM_PARALLEL": "4"})
    done = subprocess.run(
        [sys.executable, "-c", DROPPED_LOOKUP, str(target.pid), str(target.port)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    # As another user the socket's owner is hidden: no facts, and the reason says so.
    assert seen["status"] == "access-denied"
    assert seen["facts"] is False
    assert seen["reason"] == (f"the listener on 127.0.0.1:{target.port} belongs to a process "
                              "this user may not inspect (access denied)")
    # Read directly, what the kernel shows everyone is there; the environment is not.
    assert seen["cpus"] == [0]
    assert (seen["gpus"], seen["slots"]) == (None, None)
    assert seen["notes"]["gpus"] == "environment not readable (permission denied)"
    assert seen["notes"]["slots"] == "environment not readable (permission denied)"


# -- through a proxy into another network namespace ---------------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    name = f"sl-proc-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.netns
def test_a_docker_proxy_is_followed_into_the_containers_namespace(
    start_listener: StartListener, netns: str
) -> None:
    inside = start_listener("0.0.0.0", prefix=("ip", "netns", "exec", netns),
                            env={"OLLAMA_NUM_PARALLEL": "2"})
    proxy = start_listener("0.0.0.0", args=("-container-ip", "10.88.0.2",
                                            "-container-port", str(inside.port)))
    found = LocalProcesses(clock=FakeClock()).lookup("127.0.0.1", proxy.port)
    assert found.status == "found", found.reason
    assert found.facts is not None
    assert found.facts.slots == 2
    assert found.facts.other_netns is True
    assert found.proxy == f"{found.facts.name} pid {proxy.pid} -> 10.88.0.2:{inside.port}"
    # `ip netns exec` execs the listener: the pid in that namespace is the one we started.
    assert found.facts.pid == inside.pid


@pytest.mark.netns
def test_a_node_on_a_container_address_is_found_in_its_namespace(
    start_listener: StartListener, netns: str
) -> None:
    inside = start_listener("0.0.0.0", prefix=("ip", "netns", "exec", netns),
                            env={"CUDA_VISIBLE_DEVICES": "1"})
    processes = LocalProcesses(clock=FakeClock())
    assert processes.lookup("10.88.0.2", inside.port).status == "no-listener"
    found = processes.lookup("10.88.0.2", inside.port, other_namespaces=True)
    assert found.status == "found", found.reason
    assert found.facts is not None
    assert (found.facts.pid, found.facts.gpus, found.facts.other_netns) == (
        inside.pid, ("1",), True)
    assert found.reason.startswith(
        f"pid {inside.pid} ({found.facts.name}) listens for 10.88.0.2:{inside.port} in another "
        "network namespace")
    assert processes.scans == 1


@pytest.mark.netns
def test_a_proxy_to_nothing_is_reported_not_followed(
    start_listener: StartListener, netns: str
) -> None:
    proxy = start_listener("127.0.0.1", args=("-container-ip", "10.88.0.2",
                                              "-container-port", "9"))
    found = LocalProcesses(clock=FakeClock()).lookup("127.0.0.1", proxy.port)
    assert found.status == "not-followed"
    assert found.facts is None
    head = f"the listener on 127.0.0.1:{proxy.port} is {found.proxy and found.proxy.split()[0]} "
    head += f"(pid {proxy.pid}), a proxy to 10.88.0.2:9; "
    # A process even root may not inspect (a sandbox's init) makes the answer less sure.
    assert found.reason in {
        head + "no process listens there in another network namespace",
        head + "1 process could not be inspected (access denied)",
    }


def test_a_proxy_whose_target_is_not_on_its_command_line_is_not_followed(
    start_listener: StartListener
) -> None:
    proxy = start_listener(env={"LISTENER_COMM": "rootlessport"})
    found = LocalProcesses(clock=FakeClock()).lookup("127.0.0.1", proxy.port)
    assert (found.status, found.facts) == ("not-followed", None)
    assert found.reason == (f"the listener on 127.0.0.1:{proxy.port} is rootlessport (pid "
                            f"{proxy.pid}), a port proxy whose target could not be read")


def test_concurrent_lookups_share_one_scan(start_listener: StartListener) -> None:
    listener = start_listener()
    processes = LocalProcesses(clock=FakeClock())
    with ThreadPoolExecutor(max_workers=16) as pool:
        found = list(pool.map(lambda _: processes.lookup("127.0.0.1", listener.port), range(64)))
    assert {lookup.facts.pid for lookup in found if lookup.facts} == {listener.pid}
    assert processes.scans == 1


# -- cgroups on this kernel ---------------------------------------------------------------------


class RealCgroup:
    """A cgroup made for one test (v2 where it has the cpu and cpuset controllers, else v1)."""

    def __init__(self, cpus: str, quota_us: int) -> None:
        name = f"sl-proc-{uuid.uuid4().hex[:8]}"
        v2 = Path("/sys/fs/cgroup")
        self.dirs: list[Path] = []
        if {"cpu", "cpuset"} <= set(_read(v2 / "cgroup.subtree_control").split()):
            self._make(v2 / name, {"cpuset.cpus": cpus, "cpu.max": f"{quota_us} 100000"})
        elif (v2 / "cpuset" / "tasks").exists() and (v2 / "cpu" / "tasks").exists():
            mems = _read(v2 / "cpuset" / "cpuset.mems").strip()
            self._make(v2 / "cpuset" / name, {"cpuset.cpus": cpus, "cpuset.mems": mems})
            self._make(v2 / "cpu" / name, {"cpu.cfs_period_us": "100000",
                                           "cpu.cfs_quota_us": str(quota_us)})
        else:
            pytest.skip("no writable cgroup with the cpu and cpuset controllers")

    def _make(self, path: Path, files: dict[str, str]) -> None:
        try:
            path.mkdir()
            self.dirs.append(path)
            for key, value in files.items():
                (path / key).write_text(value)
        except OSError as exc:
            self.remove()
            pytest.skip(f"cannot make a cgroup at {path}: {exc}")

    def add(self, pid: int) -> None:
        for path in self.dirs:
            (path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        for path in reversed(self.dirs):
            try:
                for pid in _read(path / "cgroup.procs").split():  # back to the parent first
                    (path.parent / "cgroup.procs").write_text(pid)
                path.rmdir()
            except OSError:
                pass


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@pytest.fixture
def real_cgroup() -> Iterator[Callable[[str, int], RealCgroup]]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    made: list[RealCgroup] = []

    def make(cpus: str, quota_us: int) -> RealCgroup:
        made.append(RealCgroup(cpus, quota_us))
        return made[-1]

    yield make
    for cgroup in made:
        cgroup.remove()


@needs_two_cpus
def test_a_cgroup_cpuset_and_quota_are_read_on_this_kernel(
    start_listener: StartListener, real_cgroup: Callable[[str, int], RealCgroup]
) -> None:
    cgroup = real_cgroup("1", 50_000)
    listener = start_listener()
    cgroup.add(listener.pid)
    facts = facts_of(LocalProcesses(clock=FakeClock()), listener)
    assert facts.cpus == frozenset({1})
    assert facts.cpu_quota == 0.5


# -- cgroups, from a /proc and cgroup tree written by the test ----------------------------------


def fake_proc(tmp_path: Path, cgroup: str, files: dict[str, str],
              mountinfo: str, status: str = "Cpus_allowed_list:\t0-7\n") -> Path:
    proc = tmp_path / "proc"
    (proc / "self" / "ns").mkdir(parents=True)
    (proc / "self" / "ns" / "net").write_text("ours")
    (proc / "self" / "mountinfo").write_text(mountinfo.format(root=tmp_path))
    (proc / "42" / "ns").mkdir(parents=True)
    (proc / "42" / "ns" / "net").write_text("theirs")
    (proc / "42" / "comm").write_text("ollama\n")
    (proc / "42" / "status").write_text(status)
    (proc / "42" / "cgroup").write_text(cgroup)
    (proc / "42" / "environ").write_bytes(b"OLLAMA_NUM_PARALLEL=3\0PATH=/bin\0")
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return proc


DOCKER_ID = "3f4e9c1a2b7d" + "0" * 52
V2_MOUNTS = "30 1 0:26 / {root}/cg rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNTS = (
    "31 1 0:27 / {root}/cpuset rw shared:5 - cgroup cgroup rw,cpuset\n"
    "32 1 0:28 / {root}/cpu rw shared:6 - cgroup cgroup rw,cpu,cpuacct\n"
)


def test_cgroup_v2_cpuset_and_quota(tmp_path: Path) -> None:
    scope = f"system.slice/docker-{DOCKER_ID}.scope"
    proc = fake_proc(tmp_path, f"0::/{scope}\n", {
        f"cg/{scope}/cpuset.cpus.effective": "2-3\n",
        f"cg/{scope}/cpu.max": "150000 100000\n",
        "cg/system.slice/cpu.max": "max 100000\n",
        "cg/cpuset.cpus.effective": "0-7\n",
    }, V2_MOUNTS)
    facts = read_process_facts(42, proc_root=str(proc))
    assert facts.name == "ollama"
    assert facts.cpus == frozenset({2, 3})
    assert facts.cpu_quota == 1.5
    assert facts.slots == 3
    assert facts.container == f"docker:{DOCKER_ID[:12]}"
    assert facts.other_netns is True
    assert facts.notes == (("create_time", facts.note("create_time")),)


def test_cgroup_v2_quota_is_the_tightest_of_the_ancestors(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "0::/a/b\n", {
        "cg/a/b/cpu.max": "max 100000\n",
        "cg/a/cpu.max": "50000 100000\n",
    }, V2_MOUNTS, status="Cpus_allowed_list:\t0,2\n")
    facts = read_process_facts(42, proc_root=str(proc))
    assert facts.cpu_quota == 0.5
    assert facts.cpus == frozenset({0, 2})  # no cpuset file: the affinity alone


def test_cgroup_v1_cpuset_and_cfs_quota(tmp_path: Path) -> None:
    path = f"kubepods/burstable/pod1234/{DOCKER_ID}"
    proc = fake_proc(tmp_path, f"4:cpu,cpuacct:/{path}\n3:cpuset:/{path}\n", {
        f"cpuset/{path}/cpuset.effective_cpus": "1,3-4\n",
        f"cpu/{path}/cpu.cfs_quota_us": "200000\n",
        f"cpu/{path}/cpu.cfs_period_us": "100000\n",
    }, V1_MOUNTS, status="Cpus_allowed_list:\t0-3\n")
    facts = read_process_facts(42, proc_root=str(proc))
    assert facts.cpus == frozenset({1, 3})  # affinity 0-3 intersected with the cpuset
    assert facts.cpu_quota == 2.0
    assert facts.container == f"kubernetes:{DOCKER_ID[:12]}"


@pytest.mark.parametrize(("cgroup", "container"), [
    (f"0::/system.slice/docker-{DOCKER_ID}.scope\n", f"docker:{DOCKER_ID[:12]}"),
    (f"12:cpuset:/docker/{DOCKER_ID}\n", f"docker:{DOCKER_ID[:12]}"),
    (f"0::/system.slice/cri-containerd-{DOCKER_ID}.scope\n", f"containerd:{DOCKER_ID[:12]}"),
    (f"0::/machine.slice/libpod-{DOCKER_ID}.scope/container\n", f"podman:{DOCKER_ID[:12]}"),
    (f"0::/kubepods.slice/kubepods-pod1.slice/crio-{DOCKER_ID}.scope\n",
     f"kubernetes:{DOCKER_ID[:12]}"),
    ("0::/user.slice/user-1000.slice/session-2.scope\n", None),
])
def test_container_from_cgroup(tmp_path: Path, cgroup: str, container: str | None) -> None:
    proc = fake_proc(tmp_path, cgroup, {}, V2_MOUNTS)
    assert read_process_facts(42, proc_root=str(proc)).container == container


def test_a_cgroup_outside_our_namespace_is_not_read(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "0::/../../escape\n", {"escape/cpu.max": "100000 100000\n"},
                     V2_MOUNTS)
    assert read_process_facts(42, proc_root=str(proc)).cpu_quota is None


def test_without_proc_the_lookup_says_so(tmp_path: Path) -> None:
    sockets = [ListeningSocket(ipaddress.ip_address("127.0.0.1"), 11434, 1)]
    missing = str(tmp_path / "no-proc")
    found = LocalProcesses(scanner=lambda: sockets, proc_root=missing).lookup("::1", 11434)
    assert found.status == "unavailable"
    assert found.reason == f"{missing!r} is not readable, so the facts of processes are not read"


_IPS = st.sampled_from(["127.0.0.1", "0.0.0.0", "::", "::1", "::ffff:127.0.0.1", "10.0.0.5"])


@given(
    sockets=st.lists(st.builds(
        ListeningSocket,
        ip=_IPS.map(ipaddress.ip_address),
        port=st.sampled_from([11434, 11435]),
        pid=st.sampled_from([None, os.getpid(), 2**22 + 1]),
    ), max_size=6),
    address=_IPS,
    port=st.sampled_from([11434, 11435]),
)
def test_a_lookup_never_raises_and_has_facts_only_when_found(
    sockets: list[ListeningSocket], address: str, port: int
) -> None:
    processes = LocalProcesses(clock=FakeClock(), scanner=lambda: sockets)
    found = processes.lookup(address, port)
    assert found.status in {"found", "no-listener", "access-denied"}
    assert (found.facts is not None) == (found.status == "found")
    if found.facts is not None:
        assert found.facts.pid == os.getpid()
    assert processes.lookup(address, port) is found
    assert processes.scans == 1


def test_reading_a_missing_process_raises_process_lookup_error(tmp_path: Path) -> None:
    with pytest.raises(ProcessLookupError):
        read_process_facts(4242, proc_root=str(tmp_path))


# -- parsing and arguments ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "cpus"), [
    ("0", {0}), ("0-3", {0, 1, 2, 3}), ("0-1,4,6-7\n", {0, 1, 4, 6, 7}), ("", set()),
])
def test_parse_cpu_list(text: str, cpus: set[int]) -> None:
    assert parse_cpu_list(text) == frozenset(cpus)


@pytest.mark.parametrize(("text", "message"), [
    ("a", "Invalid CPU list 'a': 'a' is not a CPU or a range"),
    ("3-1", "Invalid CPU list '3-1': '3-1' is not an ascending range"),
    ("1-", "Invalid CPU list '1-': '1-' is not a CPU or a range"),
])
def test_parse_cpu_list_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_cpu_list(text)
    assert str(caught.value) == message


@given(st.frozensets(st.integers(0, 511)))
def test_parse_cpu_list_reads_what_the_kernel_writes(cpus: frozenset[int]) -> None:
    ranges: list[str] = []
    for cpu in sorted(cpus):
        if ranges and cpu - 1 in cpus:
            start = ranges[-1].split("-")[0]
            ranges[-1] = f"{start}-{cpu}"
        else:
            ranges.append(str(cpu))
    assert parse_cpu_list(",".join(ranges)) == cpus


@pytest.mark.parametrize(("text", "cores"), [
    ("200000 100000", 2.0), ("max 100000", None), ("50000 100000\n", 0.5), ("max", None),
    ("25000", 0.25),
])
def test_parse_cpu_max(text: str, cores: float | None) -> None:
    assert parse_cpu_max(text) == cores


@pytest.mark.parametrize("text", ["", "x 100000", "100 0", "1 2 3", "100 x"])
def test_parse_cpu_max_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"^Invalid cpu\.max "):
        parse_cpu_max(text)


@pytest.mark.parametrize("value", [-1, float("nan"), True, "30"])
def test_bad_refresh_interval(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        LocalProcesses(refresh_interval=value)  # type: ignore[arg-type]
    assert str(caught.value) == (f"Invalid refresh_interval {value!r}: expected a finite number "
                                 "of seconds >= 0")


@pytest.mark.parametrize(("address", "port", "message"), [
    ("127.0.0.1", 0, "Invalid node address 0: expected a port number from 1 to 65535"),
    ("127.0.0.1", 70000, "Invalid node address 70000: expected a port number from 1 to 65535"),
    ("gpu-box", 11434,
     "Invalid node address 'gpu-box': expected an IP address of this machine or a loopback name"),
])
def test_bad_lookup_arguments(address: str, port: int, message: str) -> None:
    processes = LocalProcesses(scanner=list)
    with pytest.raises(InvalidNodeAddress) as caught:
        processes.lookup(address, port)
    assert str(caught.value) == message
    assert processes.scans == 0


# -- the scan: socket diagnostics, and owners found once per socket ------------------------------


def test_socket_diagnostics_list_a_listener_with_its_inode(start_listener: StartListener) -> None:
    from sollol_locality.processes import scan_diag_listeners, scan_proc_listeners

    listener = start_listener("::")
    ours = [s for s in scan_diag_listeners() if s.port == listener.port]
    assert [(str(s.ip), s.pid) for s in ours] == [("::", None)]
    links = {os.readlink(f"/proc/{listener.pid}/fd/{fd}")
             for fd in os.listdir(f"/proc/{listener.pid}/fd")}
    assert f"socket:[{ours[0].inode}]" in links
    assert [s for s in scan_proc_listeners() if s.port == listener.port] == ours


def test_a_sockets_owner_is_found_once_while_the_socket_lives(
    start_listener: StartListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sollol_locality.processes as module

    walks: list[set[int]] = []
    real = module._inode_owners

    def counting(proc: object, inodes: set[int]) -> dict[int, int]:
        walks.append(set(inodes))
        return real(proc, inodes)  # type: ignore[arg-type]

    monkeypatch.setattr(module, "_inode_owners", counting)
    first = start_listener()
    clock = FakeClock()
    processes = LocalProcesses(clock=clock)
    for _ in range(3):  # three refreshes, one walk over /proc/*/fd
        assert facts_of(processes, first).pid == first.pid
        clock.tick(30.0)
    assert processes.scans == 3 and len(walks) == 1
    first.stop()
    second = start_listener(port=first.port)  # a new socket: its owner is looked for again
    assert facts_of(processes, second).pid == second.pid
    assert len(walks) == 2 and walks[0] != walks[1]
