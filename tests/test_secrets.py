"""Credentials in node URLs never leave the library: not in logs, reprs, exceptions, JSON, CLI
output, files it writes, or DNS queries.

A password and a user name are planted in node URLs of every shape (string, mapping, node object;
valid, unresolvable and invalid; with a path, query and fragment; with an '@' inside the password;
without a scheme; as bytes), every public entry point is exercised with all sollol_locality loggers
at DEBUG, and every output channel is collected and searched for them.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import MinimalBalancer as Balancer
from helpers import OllamaNode, offline_config
from helpers import Registry as _Registry

from sollol_locality import (
    ExecutionPlanner,
    InvalidNodeAddress,
    LocalityError,
    NodeTopology,
    ParallelismCostModel,
    TopologyFileError,
    parse_node_address,
)
from sollol_locality.cli import main
from sollol_locality.resolver import DnsResolver
from sollol_locality.testing.dnsserver import DnsTestServer, soa

PASSWORD = "Pl4nted-S3cret"
USER = "alice-Qz7"
PLANTED = (PASSWORD, USER)
REPO = Path(__file__).resolve().parent.parent

ZONES: dict[str, Any] = {
    "s.test": [soa(minimum=30)],
    "cred.s.test": [("A", "10.50.0.9", 300)],
}


def valid_nodes() -> list[Any]:
    return [
        f"http://{USER}:{PASSWORD}@10.50.0.1:11434",
        f"https://{USER}:{PASSWORD}@cred.s.test:11434/api/generate?token={PASSWORD}#{PASSWORD}",
        f"http://{USER}:{PASSWORD}@missing.s.test:11434",  # NXDOMAIN: unresolved
        f"{USER}:{PASSWORD}@10.50.0.2:11435",  # no scheme
        f"http://{USER}:p@{PASSWORD}@10.50.0.3:11434",  # '@' inside the password
        {"url": f"http://{USER}:{PASSWORD}@10.50.0.4:11434", "latency_ms": 900,
         "total_requests": 9},
        {"host": f"http://{USER}:{PASSWORD}@10.50.0.5", "port": 11434},
        OllamaNode(f"http://{USER}:{PASSWORD}@localhost:11434"),
        OllamaNode(f"http://{USER}:{PASSWORD}@127.0.0.1:11435"),
    ]


def invalid_nodes() -> list[Any]:
    return [
        f"http://{USER}:{PASSWORD}@10.50.0.6:notaport",
        f"http://{USER}:p@{PASSWORD}@h:99999",
        f"{USER}:{PASSWORD}@bad host",
        f"http://{USER}:{PASSWORD}@{'x' * 3000}",  # too long
        f"http://{USER}:{PASSWORD}@[::1",
        f"http://{USER}:{PASSWORD}@h%eth0",
        f"ftp://{USER}:{PASSWORD}@h",
        f"http://{USER}:{PASSWORD}@ü{'ü' * 70}.de",
        f"http://{USER}:{PASSWORD}@h:1".encode(),
        {"url": f"http://{USER}:{PASSWORD}@h:0"},
        {"host": f"http://{USER}:{PASSWORD}@h", "port": "x"},
        OllamaNode(f"http://{USER}:{PASSWORD}@h:70000"),
    ]




class Outputs:
    """Everything the library produced, to be searched."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, channel: str, value: Any) -> None:
        self.items.append((channel, value if isinstance(value, str) else repr(value)))

    def add_exception(self, channel: str, exc: BaseException) -> None:
        self.add(f"{channel}: str", str(exc))
        self.add(f"{channel}: repr", repr(exc))
        self.add(f"{channel}: args", exc.args)
        self.add(f"{channel}: attributes", vars(exc))
        self.add(f"{channel}: traceback", "".join(traceback.format_exception(exc)))

    def leaks(self) -> list[str]:
        return [f"{channel}: {text[:300]}" for channel, text in self.items
                if any(secret in text for secret in PLANTED)]


@pytest.fixture
def server(make_dns_server: Callable[..., DnsTestServer]) -> DnsTestServer:
    return make_dns_server(ZONES)


@pytest.fixture
def config(server: DnsTestServer, tmp_path: Path) -> Any:
    return offline_config(nameservers=server.nameserver, dns_timeout=1.0, hosts_file=None,
                          calibration_file=tmp_path / "calibration.json")


def test_no_secret_in_any_result_log_or_exception(server: DnsTestServer, config: Any,
                                                  tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # the root logger: every sollol_locality logger included
    out = Outputs()
    good, bad = valid_nodes(), invalid_nodes()

    for node in good:
        address = parse_node_address(node)
        for name in ("url", "netloc", "path", "host"):
            out.add(f"NodeAddress.{name}", getattr(address, name))
        out.add("NodeAddress repr", repr(address))
        out.add("NodeAddress str", str(address))
    for node in bad:
        with pytest.raises(InvalidNodeAddress) as info:
            parse_node_address(node)
        out.add_exception(f"parse({type(node).__name__})", info.value)

    topology = NodeTopology(config)
    for result in topology.describe_many(good + bad):
        if isinstance(result, InvalidNodeAddress):
            out.add_exception("describe_many", result)
        else:
            out.add("HostIdentity repr", repr(result))
            out.add("HostIdentity str", str(result))
    out.add("group_by_locality keys", list(topology.group_by_locality(good)))
    out.add("resolver repr", repr(topology.resolver))
    out.add("resolver peek", [topology.resolver.peek(n) for n in ("cred.s.test", "missing.s.test")])
    for node in bad[:3]:
        with pytest.raises(InvalidNodeAddress) as info:
            topology.group_by_locality([node])
        out.add_exception("group_by_locality", info.value)

    model = ParallelismCostModel(config)
    planner = ExecutionPlanner(topology, model, config)
    plans = [planner.plan(3, good + bad), planner.plan(2, good[-2:]), planner.plan(1, bad),
             ExecutionPlanner(topology, model, offline_config(mode="parallel")).plan(2, good),
             ExecutionPlanner(topology, model, offline_config(mode="sequential")).plan(2, good)]
    for plan in plans:
        out.add("ExecutionPlan repr", repr(plan))
        out.add("ExecutionPlan str", str(plan))
        out.add("ExecutionPlan.reason", plan.reason)
        out.add("ExecutionPlan.warnings", plan.warnings)
        out.add("ExecutionPlan.identities", plan.identities)
        out.add("ExecutionPlan.excluded reasons", [reason for _, reason in plan.excluded])
        out.add("ExecutionPlan.hosts keys", list(plan.hosts))
        out.add("ExecutionPlan.to_dict", plan.to_dict())
        out.add("ExecutionPlan json", json.dumps(plan.to_dict()))
        out.add("ExecutionPlan.shared_host", plan.shared_host)
    estimate = model.estimate(3, good + bad, topology)
    out.add("SpeedupEstimate repr", repr(estimate))
    profiles, _ = model.profiles(topology.describe_many(good))
    out.add("NodeProfile repr", profiles)

    balancer = Balancer(_Registry(good + bad), planner=planner)
    balancer.should_parallelize(3)
    plan = balancer.plan_execution(3)
    balancer.record_execution(plan, 2.5)
    Balancer(_Registry(good[-2:]), planner=planner).should_parallelize(4)  # shared-machine warning
    model.observe("sequential", [good[0]], 2, 3.0, topology=topology)
    model.observe("parallel", good[-2:], 4, 9.0, topology=topology)
    saved = model.save()
    out.add("calibration file", saved.read_text())
    out.add("cost model to_dict", model.to_dict())

    for record in caplog.records:
        out.add(f"log {record.name} {record.levelname}", record.getMessage())
        out.add(f"log {record.name} record", vars(record))
    assert any(r.name.startswith("sollol_locality") and r.levelno == logging.DEBUG
               for r in caplog.records)  # the DEBUG channel was really captured
    assert any(r.levelno >= logging.WARNING for r in caplog.records)
    assert all(PASSWORD not in q.name and USER not in q.name for q in server.queries)
    assert server.count("cred.s.test") >= 1  # the name itself was asked for
    assert out.leaks() == []


def test_no_secret_in_topology_file_errors(config: Any, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://{USER}:{PASSWORD}@10.0.0.5:11435"
    path = tmp_path / "topology.toml"
    broken = [
        f'[nodes."{url}"]\nbogus = 1\n',
        f'[nodes."{url}"]\nhost = 3\n',
        f'[nodes."{url}"]\ngpu = true\n',
        f'[nodes."{url}"]\nzone = ""\n',
        f'[nodes."{url}"]\nhost = "a"\n[nodes."http://{USER}:{PASSWORD}@h:x"]\nhost = "b"\n',
        f'[nodes."{url}"] = 5\n',
        f'[hosts.box]\naliases = ["http://{USER}:{PASSWORD}@h:x"]\n',
        f'[hosts.a]\naliases = ["http://{USER}:{PASSWORD}@h"]\n'
        f'[hosts.b]\naliases = ["http://{USER}:{PASSWORD}@h"]\n',
    ]
    out = Outputs()
    for text in broken:
        path.write_text(text)
        with pytest.raises(TopologyFileError) as info:
            NodeTopology(offline_config(topology_file=path))
        out.add_exception("TopologyFileError", info.value)

    # A broken edit of a file in use is logged (ERROR) and the previous topology kept.
    clock = [1000.0]
    path.write_text(f'[nodes."{url}"]\nhost = "gpu-box"\n')
    topology = NodeTopology(offline_config(topology_file=path), clock=lambda: clock[0])
    assert topology.get_physical_host_id(url) == "gpu-box"
    out.add("overrides repr", repr(topology.overrides))
    caplog.set_level(logging.DEBUG)
    for text in broken:
        before = os.stat(path).st_mtime_ns
        path.write_text(text)
        os.utime(path, ns=(before + 10**9, before + 10**9))
        clock[0] += 5
        assert topology.get_physical_host_id(url) == "gpu-box"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == len(broken)
    for record in caplog.records:
        out.add(f"log {record.levelname}", record.getMessage())
        out.add("log record", vars(record))
    assert out.leaks() == []


def test_no_secret_in_cli_output(server: DnsTestServer, tmp_path: Path) -> None:
    nodes = [n for n in valid_nodes() + invalid_nodes() if isinstance(n, str)]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
           "SOLLOL_LOCALITY_CALIBRATION": "", "HOME": str(tmp_path)}
    common = ["--nameserver", server.nameserver, "--dns-timeout", "1", "--no-hosts-file"]
    runs = [["hosts"], ["hosts", "--json"], ["plan", "--tasks", "3"],
            ["plan", "--tasks", "3", "--json"]]
    out = Outputs()
    for argv in runs:
        for verbosity in ([], ["-vv"]):
            result = subprocess.run(
                [sys.executable, "-m", "sollol_locality", *argv, *verbosity, *common, *nodes],
                capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
            assert result.returncode == 0, result.stderr
            out.add(f"{argv} {verbosity} stdout", result.stdout)
            out.add(f"{argv} {verbosity} stderr", result.stderr)
            if verbosity:
                assert "DEBUG sollol_locality" in result.stderr  # logging really was on
            if "--json" in argv:
                json.loads(result.stdout)
    # a configuration error exits 2 with a message on stderr
    bad = tmp_path / "t.toml"
    bad.write_text(f'[nodes."http://{USER}:{PASSWORD}@h:1"]\nbogus = 1\n')
    stream = io.StringIO()
    code = main(["hosts", "--topology", str(bad), *common, "localhost"], out=stream)
    assert code == 2
    out.add("cli error stdout", stream.getvalue())
    assert out.leaks() == []


def test_cli_error_path_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "t.toml"
    bad.write_text(f'[nodes."http://{USER}:{PASSWORD}@h:1"]\nbogus = 1\n')
    assert main(["plan", "--tasks", "2", "--topology", str(bad), "--nameserver", "127.0.0.1:9",
                 "localhost"], out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert "Invalid topology file" in err and "***@h:1" in err
    assert PASSWORD not in err and USER not in err


def test_leak_detector_detects_a_leak() -> None:
    """The search itself works: a raw node URL in an output is reported."""
    out = Outputs()
    out.add("a plan's caller-owned node list", [f"http://{USER}:{PASSWORD}@h:1"])
    assert len(out.leaks()) == 1


def test_resolver_errors_name_hosts_only(make_dns_server: Callable[..., DnsTestServer]) -> None:
    server = make_dns_server(ZONES)
    server.set_behaviour("servfail")
    config = offline_config(nameservers=server.nameserver, hosts_file=None)
    resolver = DnsResolver(nameservers=[server.nameserver], hosts_file=None)
    topology = NodeTopology(config, resolver=resolver)
    identity = topology.describe(f"http://{USER}:{PASSWORD}@cred.s.test:1")
    assert not identity.resolved
    resolution = resolver.peek("cred.s.test")
    assert resolution is not None and resolution.error is not None
    assert "cred.s.test" in resolution.error and PASSWORD not in resolution.error
    with pytest.raises(LocalityError):
        topology.describe(f"http://{USER}:{PASSWORD}@cred.s.test:x")
    resolver.close()
