"""resolv.conf on dnspython: search list, ``ndots``, explicit nameservers, the shared hosts file.

Every query goes to loopback servers the tests start (tests/dnsserver.py); a resolv.conf
``nameserver`` line may carry a port (``127.0.0.1:5353``), which is how a fixture names one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeClock, offline_config

from sollol_locality import NodeTopology
from sollol_locality import _hostsfile as hostsfile_module
from sollol_locality._hostsfile import HostsFile, hosts_file
from sollol_locality.local import LocalMachine, LocalSnapshot, SystemProbe
from sollol_locality.resolver import DnsResolver, Resolution
from sollol_locality.testing.dnsserver import DnsTestServer, soa


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


LAB = {
    "lab": [soa(minimum=30)],
    "node-a.lab": [("A", "10.40.0.1", 60)],
    "node-b.x.lab": [("A", "10.40.0.2", 60)],
    "node-b.x": [("A", "10.40.0.3", 60)],
}


@pytest.fixture
def lab(make_dns_server: Callable[..., DnsTestServer]) -> DnsTestServer:
    return make_dns_server(LAB)


@pytest.fixture
def make_resolver(tmp_path: Path) -> Iterator[Callable[..., DnsResolver]]:
    """``make_resolver(resolv_conf_text, **options)``: a resolver on that resolv.conf."""
    made: list[DnsResolver] = []

    def make(text: str, **options: Any) -> DnsResolver:
        path = tmp_path / f"resolv-{len(made)}.conf"
        path.write_text(text)
        options.setdefault("hosts_file", None)
        options.setdefault("clock", FakeClock())
        resolver = DnsResolver(resolv_conf=str(path), **options)
        made.append(resolver)
        return resolver

    yield make
    for resolver in made:
        resolver.close()


def static_machine() -> LocalMachine:
    snapshot = LocalSnapshot(frozenset({"localhost"}), frozenset({ip("127.0.0.1")}), ())
    return LocalMachine(probe=lambda: snapshot)


def test_a_bare_name_resolves_through_the_search_list(
    lab: DnsTestServer, make_resolver: Callable[..., DnsResolver]
) -> None:
    resolver = make_resolver(f"nameserver {lab.nameserver}\nsearch lab\noptions ndots:1\n")

    answer = resolver.resolve_many(["node-a"], timeout=2.0)["node-a"]

    assert answer == Resolution("node-a", frozenset({ip("10.40.0.1")}), "ok", "dns", "node-a.lab")
    assert resolver.peek("node-a") == answer  # cached under the name asked
    assert (lab.count("node-a.lab"), lab.count("node-a")) == (2, 0)  # no dot: search first
    assert resolver.resolve_many(["node-a"], timeout=2.0)["node-a"] == answer
    assert lab.count() == 2


def test_search_names_group_with_their_full_name_and_address(
    lab: DnsTestServer, make_resolver: Callable[..., DnsResolver]
) -> None:
    resolver = make_resolver(f"nameserver {lab.nameserver}\nsearch lab\noptions ndots:1\n")
    topology = NodeTopology(offline_config(hosts_file=None), resolver=resolver,
                            local_machine=static_machine())
    nodes = ["http://node-a:11434", "http://node-a.lab:11435", "http://10.40.0.1:11436"]

    assert topology.count_unique_hosts(nodes) == 1
    assert list(topology.group_by_locality(nodes).values()) == [nodes]
    identity = topology.describe("http://node-a:11434")
    assert (identity.resolved, identity.source, identity.addresses) == (True, "dns", {"10.40.0.1"})


@pytest.mark.parametrize(
    ("ndots", "address", "asked"),
    [
        (1, "10.40.0.3", ["node-b.x"]),  # one dot >= ndots: the name as given first
        (2, "10.40.0.2", ["node-b.x.lab"]),  # fewer dots than ndots: the search list first
    ],
)
def test_ndots_decides_whether_the_name_as_given_is_tried_first(
    lab: DnsTestServer,
    make_resolver: Callable[..., DnsResolver],
    ndots: int,
    address: str,
    asked: list[str],
) -> None:
    resolver = make_resolver(f"nameserver {lab.nameserver}\nsearch lab\noptions ndots:{ndots}\n")

    answer = resolver.resolve_many(["node-b.x"], timeout=2.0)["node-b.x"]

    assert answer.addresses == frozenset({ip(address)})
    assert sorted({q.name for q in lab.queries}) == asked


def test_a_missing_name_is_nxdomain_after_every_search_name(
    lab: DnsTestServer, make_resolver: Callable[..., DnsResolver]
) -> None:
    resolver = make_resolver(f"nameserver {lab.nameserver}\nsearch lab\n")
    answer = resolver.resolve_many(["nope"], timeout=2.0)["nope"]
    assert answer == Resolution("nope", frozenset(), "nxdomain", "dns")
    assert {q.name for q in lab.queries} == {"nope.lab", "nope"}
    assert resolver.peek("nope") == answer


def test_explicit_nameservers_replace_only_the_server_list(
    make_dns_server: Callable[..., DnsTestServer], make_resolver: Callable[..., DnsResolver]
) -> None:
    chosen, system = make_dns_server(LAB), make_dns_server(LAB)
    resolver = make_resolver(
        f"nameserver {system.nameserver}\nsearch lab\noptions ndots:1\n",
        nameservers=[chosen.nameserver],
    )

    result = resolver.resolve_many(["node-a", "nope.lab", "node-a.lab"], timeout=2.0)

    assert {n: r.status for n, r in result.items()} == {
        "node-a": "ok", "nope.lab": "nxdomain", "node-a.lab": "ok",
    }
    assert result["node-a"].canonical_name == "node-a.lab"  # resolv.conf's search still applies
    assert system.count() == 0
    assert chosen.count() == resolver.queries_sent > 0


def test_resolv_conf_options_timeout_and_rotate_are_read(
    make_dns_server: Callable[..., DnsTestServer], make_resolver: Callable[..., DnsResolver]
) -> None:
    servers = [make_dns_server(LAB) for _ in range(2)]
    lines = "".join(f"nameserver {s.nameserver}\n" for s in servers)
    resolver = make_resolver(lines + "options timeout:1 rotate\n")
    resolver.resolve_many(["node-a.lab"], timeout=2.0)
    engine = resolver._dns_resolver()
    assert (engine.timeout, engine.rotate, engine.cache) == (1, True, None)
    given = make_resolver(lines + "options timeout:1\n", per_try_timeout=0.25)
    assert given._dns_resolver().timeout == 0.25  # an explicit per-try timeout wins


def test_an_asyncio_caller_is_served_from_its_own_loop(
    lab: DnsTestServer, make_resolver: Callable[..., DnsResolver]
) -> None:
    resolver = make_resolver(f"nameserver {lab.nameserver}\nsearch lab\n")

    async def caller() -> Resolution:
        return resolver.resolve_many(["node-a"], timeout=2.0)["node-a"]

    before = set(threading.enumerate())
    assert asyncio.run(caller()).addresses == frozenset({ip("10.40.0.1")})
    assert set(threading.enumerate()) <= before  # the resolver's loop thread is gone when idle


# -- the hosts file: one cached reader shared by local and resolver -------------------------------


def test_local_and_resolver_share_one_hosts_file_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_resolver: Callable[..., DnsResolver]
) -> None:
    path = tmp_path / "hosts"
    path.write_text("127.0.1.1 this-box\n10.50.0.1 gpu-box\n")
    parsed: list[str] = []
    real = hostsfile_module.parse_hosts_entries

    def counting(text: str) -> list[Any]:
        parsed.append(text)
        return real(text)

    monkeypatch.setattr(hostsfile_module, "parse_hosts_entries", counting)
    probe = SystemProbe(hosts_file=str(path), hostname_file=None, sysfs_root=None,
                        net_if_addrs=lambda: {}, gethostname=lambda: "this-box")
    resolver = make_resolver("domain .\n", hosts_file=str(path))

    assert "this-box" in probe().hostnames
    answer = resolver.resolve_many(["gpu-box"], timeout=1.0)["gpu-box"]

    assert answer == Resolution("gpu-box", frozenset({ip("10.50.0.1")}), "ok", "hosts-file")
    assert len(parsed) == 1
    assert hosts_file(path) is hosts_file(str(path))


def test_the_hosts_file_reader_rereads_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    reader = HostsFile(path)
    assert reader.peek_names() is None  # nothing read yet
    assert reader.entries() == []  # missing: empty
    path.write_text("10.0.0.1 a A.example.\n")
    assert reader.names() == {"a": frozenset({ip("10.0.0.1")}),
                              "a.example": frozenset({ip("10.0.0.1")})}
    path.write_text("10.0.0.2 b\n")
    assert reader.entries() == [(ip("10.0.0.2"), ["b"])]
    assert reader.peek_names() == {"b": frozenset({ip("10.0.0.2")})}


# -- layering: nameserver parsing lives below config and resolver ---------------------------------


def test_config_parses_nameservers_without_importing_the_resolver() -> None:
    import ast

    import sollol_locality.config as config_module
    from sollol_locality import _nameservers, resolver

    tree = ast.parse(Path(config_module.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "resolver" not in imported and "_nameservers" in imported
    assert (resolver.Nameserver, resolver.parse_nameserver) == (
        _nameservers.Nameserver, _nameservers.parse_nameserver,
    )
    assert config_module.parse_nameserver("[fe80::1%eth0]:5353") == ("fe80::1%eth0", 5353)
