"""topology: every alias of a machine is one host; remote aliases merge; nothing raises."""

from __future__ import annotations

import ipaddress
import logging
import secrets
import shutil
import socket
import subprocess
import time
from types import SimpleNamespace

import psutil
import pytest
from helpers import FakeClock, OllamaNode, offline_config, offline_topology
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sollol_locality import InvalidNodeAddress, LocalityConfig, NodeTopology
from sollol_locality.local import LocalMachine
from sollol_locality.testing.dnsserver import soa
from sollol_locality.topology import ExecutionUnit, Instance

ZONES = {
    "lab.test": [soa(minimum=30)],
    "gpu1.lab.test": [("A", "10.9.0.1", 300), ("A", "10.9.0.2", 300)],  # multi-homed
    "gpu1-mgmt.lab.test": [("A", "10.9.0.2", 300)],  # shares one address with gpu1
    "alias.lab.test": [("CNAME", "gpu1.lab.test", 300)],
    "cpu2.lab.test": [("A", "10.9.0.3", 300)],
    "v6only.lab.test": [("AAAA", "fd00::9", 300)],
    "self.lab.test": [("A", "127.0.0.1", 300)],
    "public.lab.test": [("A", "8.8.8.8", 300)],
}


@pytest.fixture
def lab(make_dns_server):
    return make_dns_server(ZONES)


@pytest.fixture
def topology(lab):
    config = offline_config(nameservers=lab.nameserver, dns_timeout=1.0, hosts_file=None)
    return NodeTopology(config, local_machine=LocalMachine())


def _own_addresses() -> list[str]:
    found = []
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                found.append(addr.address.split("%")[0])
    return sorted(set(found))


def _bracket(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


LOOPBACK_TABLE = [
    ("http://localhost:11434", "loopback"),
    ("http://localhost:11435", "loopback"),
    ("localhost", "loopback"),
    ("127.0.0.1", "loopback"),
    ("127.0.0.2:11434", "loopback"),
    ("http://[::1]:11434", "loopback"),
    ("http://[::ffff:127.0.0.1]:11434", "loopback"),
    ("0.0.0.0", "loopback"),
    ("http://[::]:11434", "loopback"),
    ("LOCALHOST:1", "loopback"),
    ("https://localhost/", "loopback"),
    ("http://localhost:11434/api/generate", "loopback"),
    ("ip6-localhost", "loopback"),
    ("self.lab.test", "dns"),  # a name that DNS maps to loopback
    ({"host": "127.0.0.1", "port": "11434"}, "loopback"),
    ({"url": "http://localhost:11436"}, "loopback"),
    (OllamaNode("http://127.0.0.3:11434"), "loopback"),
    (SimpleNamespace(host="::1", port=11434), "loopback"),
]


@pytest.mark.parametrize(("node", "source"), LOOPBACK_TABLE)
def test_every_loopback_spelling_is_this_machine(topology, node, source):
    identity = topology.describe(node)
    assert identity.physical_host_id == "localhost"
    assert identity.is_local and identity.locality_group == "local"
    assert identity.source == source
    assert identity.node is node


def test_the_whole_loopback_table_is_one_host(topology):
    nodes = [node for node, _ in LOOPBACK_TABLE]
    assert topology.count_unique_hosts(nodes) == 1
    assert topology.group_by_locality(nodes) == {"localhost": nodes}


def test_own_host_name_and_fqdn_are_this_machine(topology):
    machine = LocalMachine()
    names = sorted(name for name in machine.snapshot().hostnames if "localhost" not in name)
    assert socket.gethostname().lower() in names
    for name in names:
        identity = topology.describe(f"http://{name}:11434")
        assert identity.physical_host_id == "localhost", name
        assert identity.source in ("hostname", "loopback"), name


def test_each_own_interface_address_is_this_machine(lab):
    # Read at test time, with a fresh probe, so the table is this machine's as it is now.
    machine = LocalMachine(refresh_interval=0)
    topology = NodeTopology(offline_config(nameservers=lab.nameserver, hosts_file=None),
                            local_machine=machine)
    current = {ip.compressed for ip in machine.snapshot().addresses}
    addresses = [ip for ip in _own_addresses() if ip in current]
    assert addresses, "psutil lists no interface address"
    for ip in addresses:
        identity = topology.describe(f"http://{_bracket(ip)}:11434")
        assert identity.physical_host_id == "localhost", ip
        assert identity.source in ("interface", "loopback"), (ip, identity.source)
    assert topology.count_unique_hosts([f"{_bracket(ip)}:1" for ip in addresses]) == 1


def test_own_link_local_address_with_zone_id(topology):
    for name, addrs in psutil.net_if_addrs().items():
        for addr in addrs:
            if addr.family == socket.AF_INET6 and addr.address.startswith("fe80"):
                ip = addr.address.split("%")[0]
                node = f"http://[{ip}%{name}]:11434"
                assert topology.describe(node).physical_host_id == "localhost"
                return
    pytest.skip("no IPv6 link-local address on this machine")


@pytest.fixture
def container_bridge():
    """A Docker-style bridge created in the root namespace (root only), deleted afterwards."""
    if not shutil.which("ip"):
        pytest.skip("the ip command is not available")
    name = "br-" + secrets.token_hex(6)
    third = 200 + secrets.randbelow(50)
    created = subprocess.run(["ip", "link", "add", name, "type", "bridge"], capture_output=True)
    if created.returncode != 0:
        pytest.skip(f"cannot create a bridge interface (root needed): {created.stderr.decode()}")
    try:
        subprocess.run(["ip", "addr", "add", f"172.31.{third}.1/24", "dev", name], check=True)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        yield f"172.31.{third}"
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


@pytest.mark.netns
def test_container_bridge_address_is_this_machine(lab, container_bridge):
    config = offline_config(nameservers=lab.nameserver, hosts_file=None)
    topology = NodeTopology(config, local_machine=LocalMachine())
    inside = topology.describe(f"http://{container_bridge}.7:11434")
    assert inside.physical_host_id == "localhost" and inside.source == "container"
    assert topology.count_unique_hosts([f"{container_bridge}.7", "localhost:11435"]) == 1


@pytest.mark.parametrize(
    ("node", "host_id"),
    [
        ("10.0.0.5", "10.0.0.5"),
        ("HTTP://10.0.0.5:11434/", "10.0.0.5"),
        ("https://10.0.0.5", "10.0.0.5"),
        ("10.0.0.5:11435/api", "10.0.0.5"),
        ("[::ffff:10.0.0.5]:1", "10.0.0.5"),
        ({"host": "10.0.0.5", "port": 11434}, "10.0.0.5"),
        (OllamaNode("http://10.0.0.5:11434"), "10.0.0.5"),
        ("http://[fe80::99%eth7]:11434", "fe80::99"),
        ("[2001:db8::5]", "2001:db8::5"),
    ],
)
def test_url_shapes_of_a_remote_address(topology, node, host_id):
    identity = topology.describe(node)
    assert identity.physical_host_id == host_id
    assert not identity.is_local and identity.resolved and identity.source == "address"


def test_two_different_remote_addresses_are_two_hosts(topology):
    assert topology.count_unique_hosts(["10.0.0.5:11434", "10.0.0.6:11434"]) == 2


def test_names_from_dns_merge_by_shared_address(topology, lab):
    nodes = ["http://gpu1.lab.test:11434", "http://gpu1-mgmt.lab.test:11435",
             "http://alias.lab.test:11436", "http://10.9.0.2:11437", "http://cpu2.lab.test:11434",
             "http://missing.lab.test:11434", "http://v6only.lab.test:11434"]
    groups = topology.group_by_locality(nodes)
    assert groups == {
        "10.9.0.1": nodes[:4],
        "10.9.0.3": [nodes[4]],
        "missing.lab.test": [nodes[5]],
        "fd00::9": [nodes[6]],
    }
    assert topology.count_unique_hosts(nodes) == 4
    gpu1 = topology.describe(nodes[0])
    assert gpu1.addresses == {"10.9.0.1", "10.9.0.2"}
    assert gpu1.source == "dns" and gpu1.locality_group == "lan"


def test_an_alias_seen_alone_keeps_the_shared_id(topology):
    topology.describe("gpu1.lab.test")  # learns that 10.9.0.1 and 10.9.0.2 are one machine
    assert topology.get_physical_host_id("gpu1-mgmt.lab.test") == "10.9.0.1"
    assert topology.get_physical_host_id("10.9.0.2") == "10.9.0.1"


def test_nxdomain_is_its_own_unresolved_host(topology):
    identity = topology.describe("http://missing.lab.test:11434")
    assert identity.physical_host_id == "missing.lab.test"
    assert (identity.resolved, identity.source, identity.locality_group) == (
        False, "unresolved", "unknown")
    assert topology.count_unique_hosts(["missing.lab.test", "missing.lab.test:2", "10.0.0.1"]) == 2


@pytest.mark.parametrize(
    ("node", "group"),
    [("10.1.2.3", "lan"), ("192.168.1.9", "lan"), ("100.64.1.1", "lan"), ("fd00::1", "lan"),
     ("8.8.8.8", "wan"), ("public.lab.test", "wan"), ("2001:4860:4860::8888", "wan")],
)
def test_locality_group(topology, node, group):
    node = f"[{node}]" if ":" in node else node
    assert topology.describe(node).locality_group == group


def test_fifty_names_behind_a_silent_server(make_dns_server):
    server = make_dns_server({"slow.test": [soa()]})
    server.set_behaviour("silent")
    config = offline_config(nameservers=server.nameserver, dns_timeout=1.0, hosts_file=None)
    topology = NodeTopology(config, local_machine=LocalMachine())
    names = [f"http://node{i}.slow.test:11434" for i in range(50)]
    start = time.monotonic()
    assert topology.count_unique_hosts(names) == 50
    first = time.monotonic() - start
    assert first <= 1.25, f"first decision took {first:.3f}s against a 1.0s deadline"
    assert all(not i.resolved for i in topology.describe_many(names))
    sent = server.total
    start = time.monotonic()
    assert topology.count_unique_hosts(names) == 50
    second = time.monotonic() - start
    assert server.total == sent, "the second call must answer from cache"
    assert second < 0.1


def test_local_names_and_literals_never_send_a_query(topology, lab):
    topology.count_unique_hosts(
        ["localhost", "127.0.0.1", "[::1]", "10.0.0.5", socket.gethostname()])
    assert lab.total == 0


def test_unparsable_node_raises_from_topology_methods(topology):
    with pytest.raises(InvalidNodeAddress, match="invalid port 'x'"):
        topology.group_by_locality(["localhost", "h:x"])
    results = topology.describe_many(["localhost", "h:x"])
    assert isinstance(results[1], InvalidNodeAddress)


# -- the topology file ---------------------------------------------------------------------------

TOPOLOGY = """
[hosts.gpu-box-1]
aliases = ["10.0.0.5", "192.168.1.5", "gpu-box-1.lan"]
zone = "rack-1"

[nodes."http://10.0.0.5:11435"]
host = "gpu-box-1"
gpu = "1"

[nodes."http://10.0.0.7:11434"]
host = "gpu-box-2"
gpu = "0"
"""



@pytest.fixture
def topology_file(tmp_path):
    path = tmp_path / "topology.toml"
    path.write_text(TOPOLOGY)
    return path


def test_overrides_name_hosts_zones_and_gpus(lab, topology_file):
    config = offline_config(nameservers=lab.nameserver, topology_file=topology_file,
                            hosts_file=None)
    topology = NodeTopology(config, local_machine=LocalMachine())
    nodes = ["http://10.0.0.5:11434", "http://192.168.1.5:11434", "http://gpu-box-1.lan:11434",
             "http://10.0.0.5:11435", "http://10.0.0.7:11434", "http://10.0.0.8:11434"]
    identities = topology.describe_many(nodes)
    assert [i.physical_host_id for i in identities] == (
        ["gpu-box-1"] * 4 + ["gpu-box-2", "10.0.0.8"])
    assert [i.source for i in identities][:5] == ["override"] * 5
    assert identities[0].locality_group == "rack-1"
    assert identities[3].device == "1"
    assert identities[3].unit == ExecutionUnit("gpu-box-1", True, "1")
    assert identities[4].device == "0"
    assert lab.total == 0  # an alias is never looked up


def test_a_broken_edit_keeps_the_previous_topology(lab, topology_file, caplog):
    clock = FakeClock()
    config = offline_config(nameservers=lab.nameserver, topology_file=topology_file,
                            hosts_file=None)
    topology = NodeTopology(config, local_machine=LocalMachine(), clock=clock)
    assert topology.get_physical_host_id("10.0.0.5") == "gpu-box-1"
    topology_file.write_text("[hosts.gpu-box-1]\naliases = 5\n")
    clock.tick(5)
    with caplog.at_level(logging.ERROR, logger="sollol_locality"):
        assert topology.get_physical_host_id("10.0.0.5") == "gpu-box-1"
    assert "line 2" in caplog.text and "keeping the previous topology" in caplog.text
    topology_file.write_text('[hosts.renamed]\naliases = ["10.0.0.5"]\n')
    clock.tick(5)
    assert topology.get_physical_host_id("10.0.0.5") == "renamed"


def test_a_malformed_file_is_an_error_at_construction(tmp_path):
    from sollol_locality import TopologyFileError

    path = tmp_path / "t.toml"
    path.write_text("[nodes.\"h:1\"]\nhost = 3\n")
    with pytest.raises(TopologyFileError, match=r"t\.toml, line 2"):
        NodeTopology(offline_config(topology_file=path))


def test_default_construction_reads_the_environment(monkeypatch, tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(TOPOLOGY)
    monkeypatch.setenv("SOLLOL_LOCALITY_TOPOLOGY", str(path))
    monkeypatch.setenv("SOLLOL_LOCALITY_NAMESERVERS", "127.0.0.1:9")
    topology = NodeTopology()
    assert isinstance(topology.config, LocalityConfig)
    assert topology.get_physical_host_id("192.168.1.5") == "gpu-box-1"


# -- properties ----------------------------------------------------------------------------------

_SPELLINGS = st.sampled_from([
    "localhost", "127.0.0.1:2", "[::1]:3", "0.0.0.0:4", "10.0.0.1", "10.0.0.1:5",
    "[::ffff:10.0.0.1]", "10.0.0.2", "http://10.0.0.3:7/", "gpu1.lab.test", "gpu1-mgmt.lab.test",
    "alias.lab.test", "cpu2.lab.test", "missing.lab.test", "10.9.0.2:9",
])


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(nodes=st.lists(_SPELLINGS, max_size=12), data=st.data())
def test_grouping_is_a_partition_independent_of_order(topology, nodes, data):
    objects = [OllamaNode(n) if i % 2 else n for i, n in enumerate(nodes)]
    groups = topology.group_by_locality(objects)
    flat = [n for members in groups.values() for n in members]
    assert len(flat) == len(objects)
    assert sorted(map(id, flat)) == sorted(map(id, objects))  # each node exactly once
    shuffled = data.draw(st.permutations(objects))
    again = topology.group_by_locality(shuffled)
    assert {h: {id(n) for n in ns} for h, ns in again.items()} == {
        h: {id(n) for n in ns} for h, ns in groups.items()}
    assert topology.count_unique_hosts(objects) == len(groups)


def test_dual_stack_host_is_one_machine_keyed_by_ipv4(make_dns_server):
    server = make_dns_server({"lab.test": [soa()],
                              "dual.lab.test": [("A", "10.9.9.9", 60), ("AAAA", "fd00::1", 60)]})
    config = offline_config(nameservers=server.nameserver, hosts_file=None)
    topology = NodeTopology(config, local_machine=LocalMachine())
    assert ipaddress.ip_address(topology.get_physical_host_id("[fd00::1]")).version == 6
    assert topology.get_physical_host_id("dual.lab.test") == "10.9.9.9"
    # once seen together, the IPv6 address alone is the same machine
    assert topology.get_physical_host_id("[fd00::1]") == "10.9.9.9"


@pytest.mark.netns
def test_a_hosts_file_name_for_a_container_is_that_containers_instance(lab, container_bridge,
                                                                      tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text(f"{container_bridge}.7 ollama-box\n")
    config = offline_config(nameservers=lab.nameserver, hosts_file=hosts)
    topology = NodeTopology(config, local_machine=LocalMachine(hosts_file=str(hosts)))
    by_name, by_address, host = topology.describe_many(
        ["http://ollama-box:11434", f"http://{container_bridge}.7:11434", "localhost:11434"])
    assert by_name.instance == by_address.instance == Instance(f"{container_bridge}.7", 11434)
    assert host.instance == Instance("localhost", 11434) != by_name.instance


# -- the types of the execution model ------------------------------------------------------------


def test_aliases_of_one_host_and_port_are_one_instance_and_unit(topology):
    a, b, c = topology.describe_many(["localhost:11434", "127.0.0.1:11434", "[::1]:11435"])
    assert a.instance == b.instance == Instance("localhost", 11434)
    assert c.instance == Instance("localhost", 11435) and c.instance.label == "localhost:11435"
    assert a.unit == b.unit == c.unit == ExecutionUnit("localhost")
    assert a.unit.label == "localhost/cpu" and not a.unit.is_gpu and a.unit.cpus is None
    assert Instance("::1", 1).label == "[::1]:1"


@pytest.mark.parametrize(
    ("unit", "label"),
    [
        (ExecutionUnit("h"), "h/cpu"),
        (ExecutionUnit("h", True), "h/gpu"),
        (ExecutionUnit("h", True, "1"), "h/gpu:1"),
        (ExecutionUnit("h", cpus=frozenset({0, 1, 2, 5})), "h/cpu:0-2,5"),
        (ExecutionUnit("h", cpus=frozenset({3})), "h/cpu:3"),
    ],
)
def test_unit_labels(unit, label):
    assert unit.label == str(unit) == label


def test_facts_say_where_each_fact_came_from(topology):
    plain = topology.describe("http://10.0.0.5:11434")
    assert plain.slots == 1
    assert dict(plain.facts) == {"host": "address", "unit": "address", "slots": "prior"}
    gpu = topology.describe({"url": "http://10.0.0.6:11434", "gpu": "1", "num_parallel": 4})
    assert gpu.unit == ExecutionUnit("10.0.0.6", True, "1") and gpu.slots == 4
    assert dict(gpu.facts) == {"host": "address", "unit": "node", "slots": "node"}
    node = OllamaNode("http://10.0.0.7:11434")
    node.capabilities.num_parallel = 2  # type: ignore[attr-defined]
    assert topology.describe(node).slots == 2


def test_topology_file_gives_slots_and_cpu_sets(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[nodes."http://10.0.0.5:11434"]\nnum_parallel = 4\ncpus = "0-3,8"\n'
                    '[nodes."http://10.0.0.5:11435"]\ncpus = [4, 5]\n')
    topology = offline_topology(topology_file=path)
    first, second = topology.describe_many({"url": u, "num_parallel": 2} for u in
                                            ["http://10.0.0.5:11434", "http://10.0.0.5:11435"])
    assert first.slots == 4 and first.unit.cpus == frozenset({0, 1, 2, 3, 8})
    assert dict(first.facts) == {"host": "address", "unit": "topology file",
                                 "slots": "topology file"}
    assert second.slots == 2 and second.facts["slots"] == "node"
    assert second.unit == ExecutionUnit("10.0.0.5", cpus=frozenset({4, 5})) != first.unit
    assert first.instance != second.instance
