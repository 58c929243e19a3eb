"""Tests for sollol_locality.local: what "this machine" is."""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from helpers import FakeClock
from hypothesis import given
from hypothesis import strategies as st

from sollol_locality._errors import ConfigError
from sollol_locality.local import (
    LOOPBACK_NAMES,
    LocalMachine,
    LocalSnapshot,
    SystemProbe,
    is_loopback_ip,
    is_loopback_name,
)

ip = ipaddress.ip_address
FULL_V6 = "ffff:ffff:ffff:ffff::"
REPO = Path(__file__).resolve().parent.parent


# -- helpers ---------------------------------------------------------------------------------



def snap(
    addresses: Sequence[str] = (),
    hostnames: Sequence[str] = (),
    networks: Sequence[str] = (),
) -> LocalSnapshot:
    return LocalSnapshot(
        hostnames=frozenset(hostnames),
        addresses=frozenset(ip(a) for a in addresses),
        container_networks=tuple(ipaddress.ip_network(n) for n in networks),
    )


class ScriptedProbe:
    """Returns (or raises) the scripted results in turn, repeating the last one."""

    def __init__(self, *results: LocalSnapshot | BaseException) -> None:
        self.results = list(results)
        self.calls = 0

    def __call__(self) -> LocalSnapshot:
        result = self.results[min(self.calls, len(self.results) - 1)]
        self.calls += 1
        if isinstance(result, BaseException):
            raise result
        return result


class Addr(NamedTuple):
    """The fields of psutil's ``snicaddr`` that the probe reads."""

    family: int
    address: str
    netmask: str | None


def v4(address: str, netmask: str | None) -> Addr:
    return Addr(socket.AF_INET, address, netmask)


def v6(address: str, netmask: str | None) -> Addr:
    return Addr(socket.AF_INET6, address, netmask)


def make_sysfs(root: Path, spec: Mapping[str, Mapping[str, Any]]) -> str:
    """A fake ``/sys/class/net``: per interface ``bridge``, ``ports``, ``device``, ``devtype``,
    ``lower`` (names of lower devices)."""
    for name, info in spec.items():
        base = root / name
        base.mkdir(parents=True)
        (base / "uevent").write_text(
            (f"DEVTYPE={info['devtype']}\n" if info.get("devtype") else "") + f"INTERFACE={name}\n"
        )
        if info.get("device"):
            (base / "device").mkdir()
        if info.get("bridge"):
            (base / "bridge").mkdir()
            (base / "brif").mkdir()
            for port in info.get("ports", ()):
                (base / "brif" / port).mkdir()
        for lower in info.get("lower", ()):
            (base / f"lower_{lower}").mkdir()
    return str(root)


def psutil_addresses() -> dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str]:
    import psutil

    found = {}
    for name, entries in psutil.net_if_addrs().items():
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                found[ip(entry.address.partition("%")[0])] = name
    return found


# -- loopback ------------------------------------------------------------------------------

LOOPBACK_IPS = [
    "127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "0.0.0.0", "::",
    "::ffff:127.0.0.1", "::ffff:0.0.0.0",
]


@pytest.mark.parametrize("text", LOOPBACK_IPS)
def test_loopback_addresses_need_no_probe(text: str) -> None:
    probe = ScriptedProbe(snap())
    machine = LocalMachine(probe=probe)
    assert machine.classify_ip(ip(text)) == "loopback"
    assert machine.classify_ip(text) == "loopback"
    assert is_loopback_ip(ip(text)) is True
    assert probe.calls == 0


@pytest.mark.parametrize("text", LOOPBACK_IPS)
def test_loopback_addresses_on_this_machine(text: str) -> None:
    assert LocalMachine().classify_ip(ip(text)) == "loopback"


@pytest.mark.parametrize("text", ["10.1.2.3", "8.8.8.8", "2001:db8::1", "::ffff:8.8.8.8"])
def test_other_addresses_are_not_local(text: str) -> None:
    machine = LocalMachine(probe=ScriptedProbe(snap(["192.0.2.2", "fd00::2"])))
    assert machine.classify_ip(ip(text)) is None
    assert is_loopback_ip(ip(text)) is False


def test_public_address_is_not_local_on_this_machine() -> None:
    assert ip("8.8.8.8") not in psutil_addresses()
    assert LocalMachine().classify_ip(ip("8.8.8.8")) is None


@given(st.integers(min_value=0, max_value=2**24 - 1))
def test_all_of_127_slash_8_is_loopback_in_both_forms(offset: int) -> None:
    machine = LocalMachine(probe=ScriptedProbe(snap()))
    v4addr = ipaddress.IPv4Address((127 << 24) + offset)
    assert machine.classify_ip(v4addr) == "loopback"
    assert machine.classify_ip(ipaddress.IPv6Address(f"::ffff:{v4addr}")) == "loopback"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("not an ip", None),
        ("", None),
        (None, None),
        (12345, None),
        ("192.0.2.2", "interface"),
        ("fe80::1%eth0", "interface"),
        (ipaddress.IPv6Address("fe80::1%eth0"), "interface"),
        (ipaddress.IPv6Address("fe80::1%docker0"), "interface"),
        ("::ffff:192.0.2.2", "interface"),
        ("172.17.0.9", "container"),
        ("::ffff:172.17.0.9", "container"),
    ],
)
def test_classify_ip_input_forms(value: Any, expected: str | None) -> None:
    machine = LocalMachine(
        probe=ScriptedProbe(snap(["192.0.2.2", "fe80::1"], networks=["172.17.0.0/16"]))
    )
    assert machine.classify_ip(value) == expected


# -- names -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name",
    sorted(LOOPBACK_NAMES | {
        "LOCALHOST", "localhost.", "app.localhost", "a.b.localhost", "Ollama.LocalHost.",
    }),
)
def test_localhost_aliases_are_loopback(name: str) -> None:
    probe = ScriptedProbe(snap())
    machine = LocalMachine(probe=probe)
    assert machine.classify_name(name) == "loopback"
    assert is_loopback_name(name) is True
    assert probe.calls == 0


@pytest.mark.parametrize("name", ["localhostx", "mylocalhost", "localhost.example.com", "local"])
def test_near_miss_names_are_not_loopback(name: str) -> None:
    assert is_loopback_name(name) is False
    assert LocalMachine(probe=ScriptedProbe(snap())).classify_name(name) is None


HOSTS_FILE = """\
# a typical Debian hosts file, plus a few more lines
127.0.0.1\tlocalhost
127.0.1.1\tmyhost.example.test myhost   # trailing comment
192.0.2.50  alias-of-eth.example.test
198.51.100.7 myhost-fqdn.corp.example MyHost
10.9.9.9 fileserver.example.test
0.0.0.0 blocked.example.test
::ffff:127.0.0.1 mapped-loop.example.test
fe80::1%eth0 scoped-own.example.test
::1     ip6-localhost ip6-loopback
fe00::0 ip6-localnet
ff02::1 ip6-allnodes
not-an-address somename
192.0.2.99
"""


@pytest.fixture
def name_machine(tmp_path: Path) -> LocalMachine:
    hosts = tmp_path / "hosts"
    hosts.write_text(HOSTS_FILE)
    hostname = tmp_path / "hostname"
    hostname.write_text("# static name\nbuild-7.ci.example\n")
    probe = SystemProbe(
        hosts_file=str(hosts),
        hostname_file=str(hostname),
        sysfs_root=None,
        net_if_addrs=lambda: {
            "lo": [v4("127.0.0.1", "255.0.0.0"), v6("::1", "ffff:" * 7 + "ffff")],
            "eth0": [v4("192.0.2.50", "255.255.255.0"), v6("fe80::1%eth0", FULL_V6)],
        },
        gethostname=lambda: "MyHost",
    )
    return LocalMachine(probe=probe)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("myhost", "hostname"),                      # gethostname(), lower-cased
        ("MYHOST.", "hostname"),
        ("myhost.example.test", "hostname"),         # 127.0.1.1 line: loopback address
        ("myhost-fqdn.corp.example", "hostname"),    # a line that lists the host name
        ("alias-of-eth.example.test", "hostname"),   # maps to an own interface address
        ("blocked.example.test", "hostname"),        # maps to 0.0.0.0: this machine
        ("mapped-loop.example.test", "hostname"),    # IPv4-mapped loopback
        ("scoped-own.example.test", "hostname"),     # own link-local address with a zone
        ("build-7.ci.example", "hostname"),          # /etc/hostname
        ("build-7", "hostname"),                     # and its short form
        ("localhost", "loopback"),
        ("ip6-localhost", "loopback"),
        ("ip6-loopback", "loopback"),
        ("fileserver.example.test", None),
        ("ip6-localnet", None),
        ("ip6-allnodes", None),
        ("somename", None),
        ("example.test", None),
        ("myhost.other.example", None),
        ("", None),
        ("   ", None),
        ("127.0.0.1", "loopback"),                   # an IP literal is classified as an IP
        ("[::1]", "loopback"),
        ("192.0.2.50", "interface"),
        ("10.9.9.9", None),
    ],
)
def test_names_from_hostname_and_hosts_file(
    name_machine: LocalMachine, name: str, expected: str | None
) -> None:
    assert name_machine.classify_name(name) == expected


def test_snapshot_hostnames_exact(name_machine: LocalMachine) -> None:
    assert name_machine.snapshot().hostnames == LOOPBACK_NAMES | {
        "myhost", "myhost.example.test", "myhost-fqdn.corp.example", "alias-of-eth.example.test",
        "blocked.example.test", "mapped-loop.example.test", "scoped-own.example.test",
        "build-7.ci.example", "build-7",
    }


def test_dotted_gethostname_gives_short_form_too(tmp_path: Path) -> None:
    probe = SystemProbe(hosts_file=None, hostname_file=None, sysfs_root=None,
                        net_if_addrs=dict, gethostname=lambda: "Node3.Rack1.Example.")
    machine = LocalMachine(probe=probe)
    assert machine.classify_name("node3.rack1.example") == "hostname"
    assert machine.classify_name("node3") == "hostname"
    assert machine.classify_name("rack1") is None


def test_missing_files_are_not_an_error(tmp_path: Path) -> None:
    probe = SystemProbe(hosts_file=str(tmp_path / "none"), hostname_file=str(tmp_path / "none"),
                        sysfs_root=str(tmp_path / "none"), net_if_addrs=dict,
                        gethostname=lambda: "solo")
    assert probe().hostnames == LOOPBACK_NAMES | {"solo"}


def test_this_machines_hostname() -> None:
    machine = LocalMachine()
    name = socket.gethostname().lower()
    expected = "loopback" if is_loopback_name(name) else "hostname"
    assert machine.classify_name(name) == expected
    assert machine.classify_name(name.upper()) == expected
    short = name.partition(".")[0]
    assert machine.classify_name(short) == ("loopback" if is_loopback_name(short) else "hostname")


def test_this_machines_fqdn_from_hosts_file_and_hostname_file() -> None:
    """Every name on an /etc/hosts line that lists the host name, and a dotted /etc/hostname."""
    name = socket.gethostname().lower()
    own = {name, name.partition(".")[0]}
    derived: set[str] = set()
    try:
        lines = Path("/etc/hosts").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = [f.lower().rstrip(".") for f in line.partition("#")[0].split()]
        if len(fields) >= 2 and own.intersection(fields[1:]):
            derived.update(fields[1:])
    try:
        static = Path("/etc/hostname").read_text().split()[0].lower()
    except (OSError, IndexError):
        static = ""
    if "." in static:
        derived.add(static)
    machine = LocalMachine()
    for alias in sorted(derived):
        expected = "loopback" if is_loopback_name(alias) else "hostname"
        assert machine.classify_name(alias) == expected, alias


# -- interfaces ------------------------------------------------------------------------------

def test_every_interface_address_of_this_machine() -> None:
    before = psutil_addresses()
    machine = LocalMachine()
    machine.snapshot()
    after = psutil_addresses()
    stable = {a: n for a, n in before.items() if after.get(a) == n and n != "kube-ipvs0"}
    assert stable, "psutil found no addresses at all"
    for address, name in sorted(stable.items(), key=lambda item: (item[0].version, item[0])):
        expected = "loopback" if address.is_loopback else "interface"
        assert machine.classify_ip(address) == expected, (name, address)
        assert machine.classify_ip(str(address)) == expected, (name, address)


def test_interface_entries_parsed_and_zone_stripped() -> None:
    probe = SystemProbe(
        hosts_file=None, hostname_file=None, sysfs_root=None, gethostname=lambda: "h",
        net_if_addrs=lambda: {
            "eth0": [
                v4("192.0.2.2", "255.255.255.0"),
                v6("fe80::fc:ff:fe00:1%eth0", "ffff:ffff:ffff:ffff::"),
                v6("fd00::2", "ffff:ffff:ffff:ffff::"),
                Addr(17, "02:fc:00:00:00:01", None),       # AF_PACKET: not an IP
                v4("not-an-ip", None),                     # garbage is skipped, not fatal
            ],
            "tun0": [v4("10.8.0.6", None)],                # no netmask (point to point)
            "kube-ipvs0": [v4("10.96.0.10", "255.255.255.255")],  # service IPs: not ours
        },
    )
    assert probe().addresses == {
        ip("192.0.2.2"), ip("fe80::fc:ff:fe00:1"), ip("fd00::2"), ip("10.8.0.6"),
    }


# -- container networks ------------------------------------------------------------------------


@pytest.fixture
def container_machine(tmp_path: Path) -> LocalMachine:
    sysfs = make_sysfs(tmp_path / "net", {
        "lo": {},
        "eth0": {"device": True},
        "eth7": {"device": True},
        "eth8": {"device": True},
        "eth9": {"device": True},
        "veth1": {},
        "bond0": {"devtype": "bond", "lower": ["eth8"]},
        "vx0": {"devtype": "vxlan"},
        "docker0": {"bridge": True, "devtype": "bridge"},
        "mybr": {"bridge": True, "ports": ["veth1"]},          # any bridge without uplink
        "br0": {"bridge": True, "ports": ["veth1", "eth9"]},    # LAN bridge: physical port
        "br1": {"bridge": True, "ports": ["bond0"]},            # bond on a physical NIC
        "br2": {"bridge": True, "ports": ["vx0"]},              # VXLAN tunnel off the machine
        "virbr0": {"bridge": True, "ports": ["eth7"]},          # container name, LAN port
        "weave": {"bridge": True},                              # overlay spanning the cluster
        "cni0": {"bridge": True, "ports": ["veth1"]},
        "testbr": {"bridge": True},
        "cni-lan": {"device": True},                            # container name, but a NIC
        # "br-0123456789ab", "flannel.1", "incusbr0", "podman0" have no sysfs entry: name only
    })
    table = {
        "lo": [v4("127.0.0.1", "255.0.0.0"), v6("::1", "ffff:" * 7 + "ffff")],
        "eth0": [v4("192.0.2.2", "255.255.255.0"), v6("fe80::1%eth0", FULL_V6)],
        "docker0": [
            v4("172.17.0.1", "255.255.0.0"), v6("fd00:d0c::1", FULL_V6),
            v6("fe80::1%docker0", FULL_V6),
        ],
        "br-0123456789ab": [v4("172.18.0.1", "255.255.0.0")],
        "mybr": [v4("10.77.0.1", "255.255.255.0")],
        "br0": [v4("192.168.50.1", "255.255.255.0")],
        "br1": [v4("192.168.51.1", "255.255.255.0")],
        "br2": [v4("192.168.52.1", "255.255.255.0")],
        "virbr0": [v4("192.168.122.1", "255.255.255.0")],
        "weave": [v4("10.32.0.1", "255.240.0.0")],
        "flannel.1": [v4("10.244.0.0", "255.255.255.255")],
        "cni0": [v4("10.244.0.1", "255.255.255.0")],
        "testbr": [v4("10.99.0.1", "255.255.255.0")],
        "cni-lan": [v4("10.55.0.1", "255.255.255.0")],
        "incusbr0": [v4("20.0.0.1", "254.0.0.0"), v6("fd12::1", "ffff:ffff:ff00::")],
        "podman0": [v4("10.88.0.1", "255.255.255.255"), v4("10.89.0.1", "255.0.255.0")],
        "kube-ipvs0": [v4("10.96.0.10", "255.255.255.255")],
    }
    probe = SystemProbe(hosts_file=None, hostname_file=None, sysfs_root=sysfs,
                        exclude_interfaces=["test*"], net_if_addrs=lambda: table,
                        gethostname=lambda: "h")
    return LocalMachine(probe=probe)


def test_container_networks_exact(container_machine: LocalMachine) -> None:
    assert container_machine.snapshot().container_networks == (
        ipaddress.ip_network("10.77.0.0/24"),
        ipaddress.ip_network("10.244.0.0/24"),
        ipaddress.ip_network("172.17.0.0/16"),
        ipaddress.ip_network("172.18.0.0/16"),
        ipaddress.ip_network("fd00:d0c::/64"),
    )


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("172.17.0.5", "container"),        # docker0 (name and kind)
        ("::ffff:172.17.0.5", "container"),
        ("172.17.0.1", "interface"),        # the bridge's own address
        ("fd00:d0c::5", "container"),
        ("fe80::99", None),                 # link-local is on every link: never a container net
        ("fe80::1", "interface"),
        ("172.18.3.4", "container"),        # docker user network, recognised by name
        ("10.77.0.9", "container"),         # a bridge whose ports are veths
        ("10.244.0.9", "container"),        # per-node pod bridge
        ("10.244.1.9", None),
        ("192.168.50.7", None),             # br0 enslaves a physical NIC: the LAN
        ("192.168.50.1", "interface"),
        ("192.168.51.7", None),             # via a bond on a NIC
        ("192.168.52.7", None),             # via a VXLAN tunnel
        ("192.168.122.7", None),            # container name, but a physical port
        ("10.32.0.9", None),                # weave overlay
        ("10.33.0.1", None),
        ("10.99.0.9", None),                # excluded by pattern
        ("10.99.0.1", "interface"),
        ("10.55.0.9", None),                # a physical NIC named like a container bridge
        ("10.96.0.10", None),               # kube-ipvs0 service IP
        ("20.1.0.1", None),                 # /7: implausibly large
        ("fd12::9", None),                  # /40: implausibly large
        ("10.88.0.2", None),                # /32: a host route
        ("10.89.0.2", None),                # non-contiguous netmask
        ("192.0.2.9", None),                # eth0's LAN
        ("192.0.2.2", "interface"),
    ],
)
def test_container_classification(
    container_machine: LocalMachine, address: str, expected: str | None
) -> None:
    assert container_machine.classify_ip(ip(address)) == expected


def test_without_sysfs_bridges_are_recognised_by_name(tmp_path: Path) -> None:
    probe = SystemProbe(
        hosts_file=None, hostname_file=None, sysfs_root=str(tmp_path / "missing"),
        gethostname=lambda: "h",
        net_if_addrs=lambda: {
            "docker0": [v4("172.17.0.1", "255.255.0.0")],
            "br0": [v4("192.168.1.10", "255.255.255.0")],
            "weave": [v4("10.32.0.1", "255.240.0.0")],
        },
    )
    assert probe().container_networks == (ipaddress.ip_network("172.17.0.0/16"),)


needs_root_ip = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="creating a bridge interface needs root and the 'ip' command",
)


def _ip_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


def _free_third_octet() -> int:
    used = {a.packed[2] for a in psutil_addresses() if a.version == 4 and a in
            ipaddress.ip_network("172.31.0.0/16")}
    routes = _ip_cmd("-4", "route", "show", "table", "all").stdout
    free = [x for x in range(16, 250) if x not in used and f"172.31.{x}." not in routes]
    if not free:
        pytest.skip("no free 172.31.x.0/24 subnet on this machine")
    return free[secrets.randbelow(len(free))]


@pytest.fixture
def real_bridge(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """A bridge in the root namespace, 172.31.x.1/24, up; ``param`` 'docker' or 'veth-port'."""
    kind = request.param
    suffix = secrets.token_hex(6)
    bridge = f"br-{suffix}" if kind == "docker" else f"lt{suffix[:10]}"
    port = f"lv{suffix[:8]}"
    created: list[str] = []
    try:
        result = _ip_cmd("link", "add", bridge, "type", "bridge")
        if result.returncode != 0:
            pytest.skip(f"cannot create a bridge: {result.stderr.strip()}")
        created.append(bridge)
        if kind == "veth-port":
            result = _ip_cmd("link", "add", port, "type", "veth", "peer", "name", f"lp{suffix[:8]}")
            if result.returncode != 0:
                result = _ip_cmd("link", "add", port, "type", "dummy")
            if result.returncode != 0:
                pytest.skip(f"cannot create a veth or dummy port: {result.stderr.strip()}")
            created.append(port)
            assert _ip_cmd("link", "set", port, "master", bridge).returncode == 0
        third = _free_third_octet()
        for args in (("addr", "add", f"172.31.{third}.1/24", "dev", bridge),
                     ("link", "set", bridge, "up")):
            result = _ip_cmd(*args)
            assert result.returncode == 0, result.stderr
        yield bridge, third
    finally:
        for name in reversed(created):
            _ip_cmd("link", "del", name)


@pytest.mark.netns
@needs_root_ip
@pytest.mark.parametrize("real_bridge", ["docker", "veth-port"], indirect=True)
def test_real_container_bridge(real_bridge: tuple[str, int]) -> None:
    bridge, third = real_bridge
    machine = LocalMachine()
    assert machine.classify_ip(ip(f"172.31.{third}.7")) == "container"
    assert machine.classify_ip(ip(f"172.31.{third}.1")) == "interface"
    assert machine.classify_ip(ip(f"172.31.{(third + 1) % 256}.7")) is None
    assert ipaddress.ip_network(f"172.31.{third}.0/24") in machine.snapshot().container_networks
    excluded = LocalMachine(exclude_interfaces=[bridge])
    assert excluded.classify_ip(ip(f"172.31.{third}.7")) is None


# -- refresh and versions ----------------------------------------------------------------------

A = snap(["192.0.2.10"], ["host-a"])
B = snap(["192.0.2.20"], ["host-a"])


def test_constructor_does_no_probing() -> None:
    probe = ScriptedProbe(A)
    machine = LocalMachine(probe=probe)
    assert probe.calls == 0
    assert machine.refresh_interval == 30.0
    machine.snapshot()
    assert probe.calls == 1


def test_not_reprobed_before_refresh_interval_and_reprobed_after() -> None:
    clock = FakeClock()
    probe = ScriptedProbe(A)
    machine = LocalMachine(clock=clock, probe=probe, refresh_interval=30)
    for _ in range(5):
        assert machine.classify_ip(ip("192.0.2.10")) == "interface"
        assert machine.classify_name("host-a") == "hostname"
    assert probe.calls == 1
    clock.tick(29)
    assert machine.classify_ip(ip("192.0.2.10")) == "interface"
    assert probe.calls == 1
    clock.tick(1)
    assert machine.classify_ip(ip("192.0.2.10")) == "interface"
    assert probe.calls == 2
    assert machine.snapshot().taken_at == 1030.0


def test_interface_change_is_picked_up_after_refresh_interval() -> None:
    clock = FakeClock()
    machine = LocalMachine(clock=clock, probe=ScriptedProbe(A, B))
    assert machine.classify_ip(ip("192.0.2.10")) == "interface"
    assert machine.classify_ip(ip("192.0.2.20")) is None
    clock.tick(30)
    assert machine.classify_ip(ip("192.0.2.20")) == "interface"
    assert machine.classify_ip(ip("192.0.2.10")) is None


def test_version_bumps_only_when_content_changes() -> None:
    clock = FakeClock()
    probe = ScriptedProbe(A, snap(["192.0.2.10"], ["host-a"]), B, B, A)
    machine = LocalMachine(clock=clock, probe=probe)
    assert probe.calls == 0
    assert machine.version == 1          # reading the version probes the first time
    assert machine.refresh() == A        # same content: same version
    assert machine.version == 1
    machine.refresh()
    assert machine.version == 2
    machine.refresh()
    assert machine.version == 2
    clock.tick(30)
    assert machine.version == 3          # a stale snapshot is refreshed by reading the version
    assert probe.calls == 5


def test_zero_refresh_interval_probes_every_time() -> None:
    probe = ScriptedProbe(A)
    machine = LocalMachine(clock=FakeClock(), probe=probe, refresh_interval=0)
    machine.snapshot()
    machine.snapshot()
    assert probe.calls == 2


def test_snapshot_is_immutable() -> None:
    with pytest.raises(FrozenInstanceError):
        A.addresses = frozenset()  # type: ignore[misc]


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), "30", True, None])
def test_bad_refresh_interval(value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        LocalMachine(refresh_interval=value)
    assert str(info.value) == (
        f"Invalid refresh_interval {value!r}: expected a finite number of seconds >= 0"
    )
    assert isinstance(info.value, ValueError)


# -- failures never escape ---------------------------------------------------------------------

def test_failing_probe_falls_back_to_loopback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="sollol_locality")
    clock = FakeClock()
    probe = ScriptedProbe(RuntimeError("boom"))
    machine = LocalMachine(clock=clock, probe=probe)
    assert machine.classify_ip(ip("10.0.0.1")) is None
    assert machine.classify_ip(ip("127.0.0.1")) == "loopback"
    assert machine.classify_name("localhost") == "loopback"
    assert machine.classify_name("some-host") is None
    assert machine.snapshot().addresses == {ip("127.0.0.1"), ip("::1")}
    assert machine.version == 1
    assert probe.calls == 1              # not retried on every call
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "probing the local machine failed (RuntimeError: boom); keeping loopback only until "
        "the next refresh"
    ]
    clock.tick(30)
    machine.snapshot()
    assert probe.calls == 2


def test_failing_refresh_keeps_previous_snapshot(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    probe = ScriptedProbe(A, OSError("netlink unavailable"), B)
    machine = LocalMachine(clock=clock, probe=probe)
    assert machine.classify_ip(ip("192.0.2.10")) == "interface"
    clock.tick(30)
    with caplog.at_level(logging.WARNING, logger="sollol_locality"):
        assert machine.classify_ip(ip("192.0.2.10")) == "interface"
    assert caplog.records[-1].getMessage() == (
        "probing the local machine failed (OSError: netlink unavailable); keeping the previous "
        "snapshot until the next refresh"
    )
    assert machine.version == 1
    clock.tick(29)
    assert machine.classify_ip(ip("192.0.2.20")) is None
    assert probe.calls == 2
    clock.tick(1)
    assert machine.classify_ip(ip("192.0.2.20")) == "interface"
    assert machine.version == 2


def test_probe_returning_the_wrong_type_is_a_failure() -> None:
    machine = LocalMachine(probe=lambda: {"addresses": []})  # type: ignore[arg-type,return-value]
    assert machine.classify_ip(ip("::1")) == "loopback"
    assert machine.classify_ip(ip("192.0.2.1")) is None
    assert machine.classify_name("localhost.localdomain") == "loopback"


def test_interface_probe_failure_keeps_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> dict[str, list[Addr]]:
        raise PermissionError("no access to netlink")

    probe = SystemProbe(hosts_file=None, hostname_file=None, sysfs_root=None,
                        net_if_addrs=broken, gethostname=lambda: "keeper")
    with caplog.at_level(logging.WARNING, logger="sollol_locality"):
        machine = LocalMachine(probe=probe)
        assert machine.classify_name("keeper") == "hostname"
        assert machine.classify_ip(ip("192.0.2.1")) is None
    assert [r.getMessage() for r in caplog.records] == [
        "reading network interfaces failed (PermissionError: no access to netlink); only "
        "loopback is known as local"
    ]


def test_gethostname_failure_is_not_fatal() -> None:
    def broken() -> str:
        raise OSError("uname failed")

    probe = SystemProbe(hosts_file=None, hostname_file=None, sysfs_root=None,
                        net_if_addrs=dict, gethostname=broken)
    assert probe().hostnames == LOOPBACK_NAMES


# -- threads -----------------------------------------------------------------------------------

def test_concurrent_first_use_probes_once() -> None:
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def slow_probe() -> LocalSnapshot:
        calls.append(1)
        entered.set()
        assert release.wait(10)
        return A

    machine = LocalMachine(clock=FakeClock(), probe=slow_probe)
    results: list[LocalSnapshot] = []
    threads = [threading.Thread(target=lambda: results.append(machine.snapshot()))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    assert entered.wait(10)
    release.set()
    for thread in threads:
        thread.join(10)
    assert len(calls) == 1
    assert len(results) == 8 and all(r is results[0] for r in results)


def test_readers_get_previous_snapshot_while_one_thread_refreshes() -> None:
    clock = FakeClock()
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def probe() -> LocalSnapshot:
        calls.append(1)
        if len(calls) == 1:
            return A
        entered.set()
        assert release.wait(10)
        return B

    machine = LocalMachine(clock=clock, probe=probe)
    old = machine.snapshot()
    clock.tick(30)
    refresher = threading.Thread(target=machine.snapshot)
    refresher.start()
    try:
        assert entered.wait(10)
        assert machine.snapshot() is old     # does not wait for the probe
        assert machine.classify_ip(ip("192.0.2.10")) == "interface"
    finally:
        release.set()
        refresher.join(10)
    assert machine.classify_ip(ip("192.0.2.20")) == "interface"
    assert len(calls) == 2


# -- import cost -------------------------------------------------------------------------------

def test_psutil_is_imported_only_by_the_first_probe() -> None:
    code = (
        "import sys, ipaddress\n"
        "import sollol_locality.local as local\n"
        "assert 'psutil' not in sys.modules, 'imported at module import'\n"
        "machine = local.LocalMachine()\n"
        "assert 'psutil' not in sys.modules, 'imported by the constructor'\n"
        "assert machine.classify_ip(ipaddress.ip_address('127.0.0.1')) == 'loopback'\n"
        "assert 'psutil' not in sys.modules, 'imported for a loopback address'\n"
        "machine.classify_ip(ipaddress.ip_address('192.0.2.1'))\n"
        "assert 'psutil' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
