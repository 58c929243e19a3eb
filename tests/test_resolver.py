"""sollol_locality.resolver against loopback DNS servers (tests/dnsserver.py).

Cache expiry is driven by a fake clock; nothing sleeps to wait for something to happen.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeClock

from sollol_locality._errors import ConfigError
from sollol_locality.resolver import (
    DnsResolver,
    Nameserver,
    Resolution,
    Resolver,
    parse_hosts,
    parse_nameserver,
)
from sollol_locality.testing.dnsserver import DnsTestServer, soa

REFRESH_THREAD = "sollol-locality-dns-refresh"



def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


ZONES: dict[str, Any] = {
    "test": [soa(minimum=30)],
    "a.test": [("A", "10.0.0.1", 60), ("AAAA", "fd00::1", 60)],
    "v6.test": [("AAAA", "fd00::6", 60)],
    "multi.test": [("A", "10.0.0.2", 60), ("A", "10.0.0.3", 60), ("A", "10.0.0.4", 60)],
    "alias.test": [("CNAME", "a.test", 300)],
    "alias2.test": [("CNAME", "alias.test", 300)],
    "short.test": [("A", "10.0.0.5", 1)],
    "loop1.test": [("CNAME", "loop2.test", 60)],
    "loop2.test": [("CNAME", "loop1.test", 60)],
    "dangling.test": [("CNAME", "missing.test", 60)],
    **{f"c{i}.test": [("CNAME", f"c{i + 1}.test", 60)] for i in range(10)},
    "c10.test": [("A", "10.0.0.10", 60)],
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_resolver(clock: FakeClock, tmp_path: Path) -> Any:
    """Build resolvers for loopback servers; every one is closed after the test.

    Their resolv.conf names no search domain (not even one from this machine's host name), so
    what the servers see does not depend on the machine the tests run on.
    """
    made: list[DnsResolver] = []
    no_search = tmp_path / "resolv-no-search.conf"
    no_search.write_text("domain .\n")

    def make(*servers: DnsTestServer, **options: Any) -> DnsResolver:
        options.setdefault("resolv_conf", str(no_search))
        options.setdefault("hosts_file", None)
        options.setdefault("clock", clock)
        options.setdefault("per_try_timeout", 0.2)
        if "nameservers" not in options:
            options["nameservers"] = [s.nameserver for s in servers]
        resolver = DnsResolver(**options)
        made.append(resolver)
        return resolver

    yield make
    for resolver in made:
        resolver.close()
    assert not [t for t in threading.enumerate() if t.name == REFRESH_THREAD]


@pytest.fixture
def server(make_dns_server: Callable[..., DnsTestServer]) -> DnsTestServer:
    return make_dns_server(ZONES)


def resolve(resolver: DnsResolver, name: str, timeout: float = 2.0) -> Resolution:
    return resolver.resolve_many([name], timeout=timeout)[name]


# -- answers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "addresses", "canonical"),
    [
        ("a.test", {"10.0.0.1", "fd00::1"}, None),
        ("v6.test", {"fd00::6"}, None),
        ("multi.test", {"10.0.0.2", "10.0.0.3", "10.0.0.4"}, None),
        ("alias.test", {"10.0.0.1", "fd00::1"}, "a.test"),
        ("alias2.test", {"10.0.0.1", "fd00::1"}, "a.test"),
        ("c2.test", {"10.0.0.10"}, "c10.test"),
    ],
)
@pytest.mark.parametrize("chase", [True, False], ids=["server-chases", "client-chases"])
def test_addresses(
    make_dns_server: Callable[..., DnsTestServer],
    make_resolver: Any,
    name: str,
    addresses: set[str],
    canonical: str | None,
    chase: bool,
) -> None:
    server = make_dns_server(ZONES, chase_cnames=chase)
    resolver = make_resolver(server)

    answer = resolve(resolver, name)

    assert answer == Resolution(name, frozenset(map(ip, addresses)), "ok", "dns", canonical)
    if canonical is not None and not chase:
        assert server.count(canonical) == 2  # the client asked for the target itself (A, AAAA)
    if canonical is not None and chase:
        assert server.count(canonical) == 0
    assert server.count(name) == 2


@pytest.mark.parametrize("chase", [True, False], ids=["server-chases", "client-chases"])
@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("loop1.test", "CNAME loop: loop1.test -> loop2.test -> loop1.test"),
        ("c0.test", "CNAME chain too long from c0.test (more than 8 hops)"),
    ],
)
def test_cname_loops_and_long_chains_fail(
    make_dns_server: Callable[..., DnsTestServer],
    make_resolver: Any,
    name: str,
    error: str,
    chase: bool,
) -> None:
    resolver = make_resolver(make_dns_server(ZONES, chase_cnames=chase))

    answer = resolve(resolver, name)

    assert (answer.status, answer.addresses, answer.error) == ("failure", frozenset(), error)


def test_cname_to_a_missing_name_is_nxdomain(server: DnsTestServer, make_resolver: Any) -> None:
    answer = resolve(make_resolver(server), "dangling.test")
    assert answer == Resolution("dangling.test", frozenset(), "nxdomain", "dns", "missing.test")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("::1", "::1"),
        ("::ffff:10.0.0.9", "10.0.0.9"),
        ("[fd00::2]", "fd00::2"),
    ],
)
def test_ip_literals_need_no_query(
    server: DnsTestServer, make_resolver: Any, given: str, expected: str
) -> None:
    resolver = make_resolver(server)
    assert resolve(resolver, given) == Resolution(given, frozenset({ip(expected)}), "ok", "dns")
    assert resolver.queries_sent == 0


def test_an_empty_name_is_a_failure_without_a_query(
    server: DnsTestServer, make_resolver: Any
) -> None:
    resolver = make_resolver(server)
    assert resolve(resolver, "") == Resolution(
        "", frozenset(), "failure", "dns", error="empty name"
    )
    assert resolver.queries_sent == 0


def test_nxdomain_for_one_type_wins_over_a_timeout_for_the_other(
    server: DnsTestServer, make_resolver: Any
) -> None:
    server.set_zones({"test": [soa(minimum=30)]})
    server.set_behaviour("silent", name="gone.test")
    server.set_behaviour("nxdomain", name="gone.test", times=1)  # the first query only
    answer = resolve(make_resolver(server), "gone.test", timeout=0.5)
    assert answer == Resolution("gone.test", frozenset(), "nxdomain", "dns")
    assert [q.behaviour for q in server.queries] == ["nxdomain"] + ["silent"] * (server.total - 1)


def test_names_are_normalised(server: DnsTestServer, make_resolver: Any) -> None:
    resolver = make_resolver(server)
    result = resolver.resolve_many(["A.Test.", "a.test"], timeout=2.0)
    assert result["A.Test."] == result["a.test"]
    assert result["a.test"].name == "a.test"
    assert server.count("a.test") == 2  # one lookup for both spellings


def test_many_names_in_one_call_share_one_deadline(
    server: DnsTestServer, make_resolver: Any
) -> None:
    names = [f"h{i}.test" for i in range(200)]
    server.set_zones(
        {**ZONES, **{n: [("A", f"10.1.{i // 250}.{i % 250}", 60)] for i, n in enumerate(names)}}
    )
    resolver = make_resolver(server, per_try_timeout=2.0)  # no retries on a busy test machine

    result = resolver.resolve_many(names, timeout=5.0)

    assert {n: r.status for n, r in result.items()} == dict.fromkeys(names, "ok")
    assert result["h199.test"].addresses == frozenset({ip("10.1.0.199")})
    assert resolver.queries_sent == 400
    assert len(server.sources()) > 1  # dnspython: a socket (random source port) per query


# -- the hosts file -------------------------------------------------------------------------------


def test_hosts_file_names_never_query(
    server: DnsTestServer, make_resolver: Any, tmp_path: Path, clock: FakeClock
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(
        "# comment\n127.0.0.1 localhost\n10.9.9.9 gpu-box GPU-Box.lan.  # trailing comment\n"
        "fd00::9 gpu-box\nfe80::1%eth0 linklocal\nnot-an-ip broken\n"
    )
    resolver = make_resolver(server, hosts_file=str(hosts), hosts_check_interval=2.0)

    result = resolver.resolve_many(["gpu-box", "gpu-box.lan", "linklocal", "a.test"], timeout=2.0)

    assert result["gpu-box"] == Resolution(
        "gpu-box", frozenset({ip("10.9.9.9"), ip("fd00::9")}), "ok", "hosts-file"
    )
    assert result["gpu-box.lan"].addresses == frozenset({ip("10.9.9.9")})
    assert result["linklocal"].addresses == frozenset({ip("fe80::1")})
    assert result["a.test"].source == "dns"
    assert server.count() == 2  # a.test only
    assert resolver.peek("gpu-box") == result["gpu-box"]

    # Edited: re-read once its mtime changed and the check interval passed on the clock.
    hosts.write_text("10.8.8.8 gpu-box\n")
    os.utime(hosts, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert resolve(resolver, "gpu-box") == result["gpu-box"]  # not checked again yet
    clock.tick(2.0)
    assert resolve(resolver, "gpu-box").addresses == frozenset({ip("10.8.8.8")})
    assert server.count() == 2


def test_hosts_file_none_disables_it(
    server: DnsTestServer, make_resolver: Any, tmp_path: Path
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("10.9.9.9 a.test\n")
    resolver = make_resolver(server, hosts_file=None)
    assert resolve(resolver, "a.test").addresses == frozenset({ip("10.0.0.1"), ip("fd00::1")})


def test_missing_hosts_file_is_empty(
    server: DnsTestServer, make_resolver: Any, tmp_path: Path
) -> None:
    resolver = make_resolver(server, hosts_file=str(tmp_path / "absent"))
    assert resolve(resolver, "a.test").source == "dns"


def test_parse_hosts() -> None:
    assert parse_hosts("10.0.0.1 A.example. b\n::ffff:10.0.0.2 b\n# 10.0.0.3 c\n") == {
        "a.example": frozenset({ip("10.0.0.1")}),
        "b": frozenset({ip("10.0.0.1"), ip("10.0.0.2")}),
    }


# -- caching and expiry ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ttl", "cached_for"),
    [(60, 60.0), (1, 5.0), (10**6, 3600.0)],  # min_ttl 5, max_ttl 3600
    ids=["ttl", "min-ttl", "max-ttl"],
)
def test_positive_answers_live_for_their_clamped_ttl(
    server: DnsTestServer, make_resolver: Any, clock: FakeClock, ttl: int, cached_for: float
) -> None:
    server.set_records("t.test", [("A", "10.0.0.7", ttl)])
    resolver = make_resolver(server, min_ttl=5.0, max_ttl=3600.0)
    assert resolve(resolver, "t.test").status == "ok"
    assert server.count("t.test") == 2

    clock.tick(cached_for - 0.01)
    assert resolve(resolver, "t.test") == Resolution(
        "t.test", frozenset({ip("10.0.0.7")}), "ok", "dns"
    )
    assert resolver.peek("t.test") == resolve(resolver, "t.test")
    assert server.count("t.test") == 2

    clock.tick(0.02)
    assert resolve(resolver, "t.test").stale
    assert resolver.wait_idle(timeout=5.0)
    assert server.count("t.test") == 4


@pytest.mark.parametrize(
    ("kind", "zone", "negative_for"),
    [
        ("nxdomain", {"test": [soa(minimum=30)]}, 30.0),
        ("nodata", {"test": [soa(minimum=30)], "n.test": [("TXT", '"x"', 60)]}, 30.0),
        ("nxdomain", {"test": [soa(minimum=30, ttl=20)]}, 20.0),  # the SOA's own TTL is lower
        ("nxdomain", {"test": [soa(minimum=1)]}, 5.0),  # min_ttl
        ("nxdomain", {"test": [soa(minimum=5000)]}, 60.0),  # negative_ttl bounds the SOA
        ("nxdomain", {}, 60.0),  # no SOA: negative_ttl
        ("nodata", {"n.test": [("TXT", '"x"', 60)]}, 60.0),
    ],
    ids=["nxdomain", "nodata", "soa-ttl", "min-ttl", "max-negative", "no-soa", "nodata-no-soa"],
)
def test_negative_answers_are_cached(
    server: DnsTestServer,
    make_resolver: Any,
    clock: FakeClock,
    kind: str,
    zone: dict[str, Any],
    negative_for: float,
) -> None:
    server.set_zones(zone)
    resolver = make_resolver(server, min_ttl=5.0, negative_ttl=60.0)
    expected = Resolution("n.test", frozenset(), kind, "dns")  # type: ignore[arg-type]

    assert resolve(resolver, "n.test") == expected
    clock.tick(negative_for - 0.01)
    assert resolve(resolver, "n.test") == expected
    assert server.count("n.test") == 2

    clock.tick(0.02)
    assert resolve(resolver, "n.test") == expected  # no stale negatives: asked again
    assert server.count("n.test") == 4


@pytest.mark.parametrize("kind", ["servfail", "refused"])
def test_failures_are_cached_with_backoff(
    server: DnsTestServer, make_resolver: Any, clock: FakeClock, kind: str
) -> None:
    server.set_behaviour(kind)
    resolver = make_resolver(server, failure_ttl=5.0, max_failure_ttl=20.0)

    answer = resolve(resolver, "a.test")
    assert (answer.status, answer.addresses) == ("failure", frozenset())
    assert answer.error == f"a.test: {server.nameserver} answered {kind.upper()}"
    sent = resolver.queries_sent
    assert sent == 2

    for backoff in (5.0, 10.0, 20.0, 20.0):
        clock.tick(backoff - 0.01)
        assert resolve(resolver, "a.test").status == "failure"
        assert resolver.queries_sent == sent  # still cached: the server is not hammered
        clock.tick(0.01)
        assert resolve(resolver, "a.test").status == "failure"
        assert resolver.queries_sent == sent + 2
        sent += 2
    assert server.count() == sent

    server.clear_behaviours()  # the server recovers
    clock.tick(20.0)
    assert resolve(resolver, "a.test").addresses == frozenset({ip("10.0.0.1"), ip("fd00::1")})
    clock.tick(60.0 - 0.01)
    assert resolve(resolver, "a.test").status == "ok"  # cached positive, backoff forgotten
    assert server.count() == sent + 2


@pytest.mark.parametrize("kind", ["servfail", "refused"])
def test_a_failing_server_hands_over_to_the_next(
    make_dns_server: Callable[..., DnsTestServer], make_resolver: Any, kind: str
) -> None:
    first, second = make_dns_server(ZONES), make_dns_server(ZONES)
    first.set_behaviour(kind)
    resolver = make_resolver(first, second)

    assert resolve(resolver, "a.test").addresses == frozenset({ip("10.0.0.1"), ip("fd00::1")})
    assert (first.count(), second.count()) == (2, 2)


def test_every_server_failing_names_them_all(
    make_dns_server: Callable[..., DnsTestServer], make_resolver: Any
) -> None:
    first, second = make_dns_server(ZONES), make_dns_server(ZONES)
    first.set_behaviour("servfail")
    second.set_behaviour("refused")
    answer = resolve(make_resolver(first, second), "a.test")
    assert answer.status == "failure"
    assert answer.error == (
        f"a.test: {first.nameserver} answered SERVFAIL; {second.nameserver} answered REFUSED"
    )


def test_expired_answer_is_served_stale_while_refreshed(
    server: DnsTestServer, make_resolver: Any, clock: FakeClock
) -> None:
    resolver = make_resolver(server)
    assert resolve(resolver, "a.test").addresses == frozenset({ip("10.0.0.1"), ip("fd00::1")})
    server.set_records("a.test", [("A", "10.0.0.99", 60)])

    clock.tick(60.0)
    stale = resolve(resolver, "a.test", timeout=0.0)  # no time needed: served from the cache
    assert stale == Resolution(
        "a.test", frozenset({ip("10.0.0.1"), ip("fd00::1")}), "ok", "dns", stale=True
    )
    assert resolver.wait_idle(timeout=5.0)

    assert server.count("a.test") == 4
    fresh = resolve(resolver, "a.test")
    assert fresh == Resolution("a.test", frozenset({ip("10.0.0.99")}), "ok", "dns")
    assert resolver.stats.refreshes == 1
    assert server.count("a.test") == 4


def test_failed_refresh_keeps_serving_stale_until_stale_ttl(
    server: DnsTestServer, make_resolver: Any, clock: FakeClock
) -> None:
    resolver = make_resolver(server, stale_ttl=300.0, failure_ttl=5.0, max_failure_ttl=5.0)
    first = resolve(resolver, "a.test")
    server.set_behaviour("servfail")

    clock.tick(60.0)
    assert resolve(resolver, "a.test") == dataclasses.replace(first, stale=True)
    assert resolver.wait_idle(timeout=5.0)
    assert server.count() == 4

    served = resolve(resolver, "a.test")  # the refresh failed: still the old answer, stale
    assert (served.status, served.addresses, served.stale) == ("ok", first.addresses, True)
    assert served.error == f"a.test: {server.nameserver} answered SERVFAIL"
    assert server.count() == 4  # within the failure backoff: no refresh queued

    clock.tick(5.0)  # backoff over: the next request refreshes again, in the background
    assert resolve(resolver, "a.test").stale
    assert resolver.wait_idle(timeout=5.0)
    assert server.count() == 6

    clock.tick(300.0 - 5.0)  # the stale window (from the original expiry) has passed
    answer = resolve(resolver, "a.test")
    assert (answer.status, answer.stale) == ("failure", False)
    assert server.count() == 8


def test_nxdomain_after_a_positive_answer_is_not_served_stale(
    server: DnsTestServer, make_resolver: Any, clock: FakeClock
) -> None:
    resolver = make_resolver(server)
    resolve(resolver, "a.test")
    server.remove("a.test")
    clock.tick(60.0)
    assert resolve(resolver, "a.test").stale
    assert resolver.wait_idle(timeout=5.0)
    assert resolve(resolver, "a.test") == Resolution("a.test", frozenset(), "nxdomain", "dns")


def test_one_refresh_thread_at_most(
    server: DnsTestServer, make_resolver: Any, clock: FakeClock
) -> None:
    names = ["a.test", "v6.test", "multi.test"]
    resolver = make_resolver(server)
    resolver.resolve_many(names, timeout=2.0)
    server.set_behaviour("answer", delay=0.3)
    clock.tick(60.0)

    for name in names:  # three calls, each queuing a refresh
        assert resolve(resolver, name).stale
        assert len([t for t in threading.enumerate() if t.name == REFRESH_THREAD]) == 1

    assert resolver.wait_idle(timeout=5.0)
    assert [t for t in threading.enumerate() if t.name == REFRESH_THREAD] == []
    assert {
        n: r.stale for n, r in resolver.resolve_many(names, timeout=2.0).items()
    } == dict.fromkeys(names, False)
    assert resolver.stats.refreshes == 3


def test_close_stops_the_refresh_thread(
    server: DnsTestServer, make_resolver: Any, clock: FakeClock
) -> None:
    resolver = make_resolver(server, refresh_timeout=30.0)
    resolve(resolver, "a.test")
    server.set_behaviour("silent")
    clock.tick(60.0)
    assert resolve(resolver, "a.test").stale
    assert server.wait_for_queries(4)  # the refresh is under way

    started = time.monotonic()
    resolver.close()
    assert time.monotonic() - started < 1.0  # did not wait for the 30 s refresh deadline
    assert [t for t in threading.enumerate() if t.name == REFRESH_THREAD] == []

    # Closed: no more background work; an expired answer is refreshed in the foreground.
    server.clear_behaviours()
    assert resolve(resolver, "a.test") == Resolution(
        "a.test", frozenset({ip("10.0.0.1"), ip("fd00::1")}), "ok", "dns"
    )


# -- deadlines ------------------------------------------------------------------------------------


def test_silent_server_one_deadline_for_all_names(
    server: DnsTestServer, make_resolver: Any
) -> None:
    server.set_behaviour("silent")
    resolver = make_resolver(server, per_try_timeout=0.4)
    names = [f"host{i}.test" for i in range(50)]

    started = time.monotonic()
    result = resolver.resolve_many(names, timeout=1.0)
    elapsed = time.monotonic() - started

    assert elapsed < 1.25
    assert {n: r.status for n, r in result.items()} == dict.fromkeys(names, "timeout")
    assert result["host0.test"].error == (
        f"host0.test: no reply from {server.nameserver} before the deadline"
    )
    sent = resolver.queries_sent
    assert 100 <= sent <= 300  # every name asked (A and AAAA); retries at 0.4 and 0.8 s
    assert server.wait_for_queries(sent)
    assert all(server.count(name, "A") >= 1 and server.count(name, "AAAA") >= 1 for name in names)

    started = time.monotonic()
    again = resolver.resolve_many(names, timeout=1.0)
    assert time.monotonic() - started < 0.1
    assert again == result
    assert resolver.queries_sent == sent
    assert server.count() == sent


def test_slow_reply_to_a_first_try_still_counts(server: DnsTestServer, make_resolver: Any) -> None:
    server.set_behaviour("answer", name="a.test", delay=0.3)
    resolver = make_resolver(server, per_try_timeout=0.2)

    started = time.monotonic()
    result = resolver.resolve_many(["a.test", "multi.test"], timeout=2.0)

    assert time.monotonic() - started < 1.0  # the delayed names did not hold up one another
    assert {n: r.status for n, r in result.items()} == {"a.test": "ok", "multi.test": "ok"}
    assert server.count("a.test") == 4  # retried after 0.2 s; the first reply (0.3 s) was taken
    assert server.count("multi.test") == 2


def test_zero_timeout_sends_nothing_and_caches_nothing(
    server: DnsTestServer, make_resolver: Any
) -> None:
    resolver = make_resolver(server)
    assert resolve(resolver, "a.test", timeout=0.0).status == "timeout"
    assert resolver.queries_sent == 0
    assert resolver.peek("a.test") is None


# -- hostile or broken replies --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["garbage", "wrong-id", "wrong-question", "wrong-source"])
def test_bogus_replies_are_ignored(server: DnsTestServer, make_resolver: Any, kind: str) -> None:
    server.set_behaviour(kind, name="a.test", then_answer=True)
    resolver = make_resolver(server)

    assert resolve(resolver, "a.test").addresses == frozenset({ip("10.0.0.1"), ip("fd00::1")})
    assert resolver.stats.replies_ignored == 2
    assert server.count("a.test") == 2


@pytest.mark.parametrize("kind", ["garbage", "wrong-id", "wrong-question", "wrong-source"])
def test_only_bogus_replies_is_a_timeout(
    server: DnsTestServer, make_resolver: Any, kind: str
) -> None:
    server.set_behaviour(kind)
    resolver = make_resolver(server, per_try_timeout=0.2)
    answer = resolve(resolver, "a.test", timeout=0.5)
    assert (answer.status, answer.addresses) == ("timeout", frozenset())


def test_truncated_reply_falls_back_to_tcp(server: DnsTestServer, make_resolver: Any) -> None:
    server.set_behaviour("truncate")
    resolver = make_resolver(server)

    assert resolve(resolver, "multi.test").addresses == frozenset(
        {ip("10.0.0.2"), ip("10.0.0.3"), ip("10.0.0.4")}
    )
    assert (server.count(transport="udp"), server.count(transport="tcp")) == (2, 2)
    assert (resolver.stats.queries_sent, resolver.stats.tcp_queries) == (4, 2)


def test_tcp_failure_moves_to_the_next_server(
    make_dns_server: Callable[..., DnsTestServer], make_resolver: Any
) -> None:
    first, second = make_dns_server(ZONES, tcp=False), make_dns_server(ZONES)
    first.set_behaviour("truncate")  # ...and then refuses the TCP connection
    resolver = make_resolver(first, second)

    assert resolve(resolver, "a.test").addresses == frozenset({ip("10.0.0.1"), ip("fd00::1")})
    assert (first.count(transport="udp"), first.count(transport="tcp")) == (2, 0)
    assert (second.count(transport="udp"), second.count(transport="tcp")) == (2, 0)


def test_tcp_refused_everywhere_is_a_failure(
    make_dns_server: Callable[..., DnsTestServer], make_resolver: Any
) -> None:
    server = make_dns_server(ZONES, tcp=False)
    server.set_behaviour("truncate")
    answer = resolve(make_resolver(server), "a.test")
    assert answer.status == "failure"
    refused = ConnectionRefusedError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))
    assert answer.error == f"a.test: {server.nameserver} TCP failed: {refused}"


def test_flapping_server_recovers(
    server: DnsTestServer, make_resolver: Any, clock: FakeClock
) -> None:
    server.set_behaviour("servfail", name="a.test", times=2)
    resolver = make_resolver(server, failure_ttl=5.0)
    assert resolve(resolver, "a.test").status == "failure"
    clock.tick(5.0)
    assert resolve(resolver, "a.test").status == "ok"
    assert server.count("a.test") == 4


def test_warns_once_about_a_failing_nameserver(
    server: DnsTestServer, make_resolver: Any, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    server.set_behaviour("servfail")
    resolver = make_resolver(server, failure_ttl=1.0, max_failure_ttl=1.0)
    with caplog.at_level(logging.DEBUG, logger="sollol_locality.resolver"):
        for _ in range(5):
            resolve(resolver, "a.test")
            clock.tick(1.0)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        f"nameserver {server.nameserver} failed 3 resolutions in a row: answered SERVFAIL"
    ]


# -- nameservers ----------------------------------------------------------------------------------


def test_configured_nameservers_are_the_only_ones_asked(
    make_dns_server: Callable[..., DnsTestServer],
    make_resolver: Any,
    tmp_path: Path,
) -> None:
    first, second, bystander = (make_dns_server(ZONES) for _ in range(3))
    first.set_behaviour("silent", name="a.test")  # a.test has to move on to the second server
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text(f"nameserver {bystander.nameserver}\n")  # replaced, never asked
    resolver = make_resolver(first, second, resolv_conf=str(resolv_conf))

    result = resolver.resolve_many(["a.test", "multi.test", "nope.test"], timeout=2.0)

    assert {n: r.status for n, r in result.items()} == {
        "a.test": "ok",
        "multi.test": "ok",
        "nope.test": "nxdomain",
    }
    assert server_counts(first, second, bystander) == (6, 2, 0)
    assert first.count() + second.count() == resolver.queries_sent
    assert resolver.nameservers == (
        parse_nameserver(first.nameserver),
        parse_nameserver(second.nameserver),
    )


def server_counts(*servers: DnsTestServer) -> tuple[int, ...]:
    return tuple(s.count() for s in servers)


def test_system_nameservers_are_read_lazily(tmp_path: Path) -> None:
    resolv_conf = tmp_path / "resolv.conf"
    resolver = DnsResolver(resolv_conf=str(resolv_conf), hosts_file=None)  # no file yet: no I/O
    resolv_conf.write_text(
        "# generated\nsearch example.lan\nnameserver 10.0.0.53\nnameserver fd00::53\n"
        "nameserver fe80::1%eth0\nnameserver bogus\noptions ndots:1\n"
    )
    assert resolver.nameservers == (
        Nameserver(ip("10.0.0.53")),
        Nameserver(ip("fd00::53")),
        Nameserver(ip("fe80::1"), 53, "eth0"),
    )


def test_resolv_conf_without_nameservers_means_localhost(tmp_path: Path) -> None:
    resolver = DnsResolver(resolv_conf=str(tmp_path / "absent"), hosts_file=None)
    assert resolver.nameservers == (Nameserver(ip("127.0.0.1")),)


def test_ipv6_nameserver(make_dns_server: Callable[..., DnsTestServer], make_resolver: Any) -> None:
    try:
        server = make_dns_server(ZONES, host="::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    resolver = make_resolver(server)
    assert server.nameserver.startswith("[::1]:")
    assert resolve(resolver, "a.test").status == "ok"
    assert server.count() == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1", Nameserver(ip("10.0.0.1"), 53)),
        (" 10.0.0.1:5353 ", Nameserver(ip("10.0.0.1"), 5353)),
        ("::1", Nameserver(ip("::1"), 53)),
        ("[::1]", Nameserver(ip("::1"), 53)),
        ("[::1]:5353", Nameserver(ip("::1"), 5353)),
        ("[fe80::1%eth0]:53", Nameserver(ip("fe80::1"), 53, "eth0")),
        ("fe80::1%eth0", Nameserver(ip("fe80::1"), 53, "eth0")),
        ("[::ffff:10.0.0.1]:54", Nameserver(ip("10.0.0.1"), 54)),
    ],
)
def test_parse_nameserver(text: str, expected: Nameserver) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "dns.google",
        "10.0.0.1:0",
        "10.0.0.1:65536",
        "10.0.0.1:x",
        "[::1",
        "[::1]x",
        "[10.0.0.1%e]",
        "10.0.0.1%eth0",
        "",
        "1.2.3.4.5",
        "[::1]:",
    ],
)
def test_bad_nameservers_raise_config_error(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        DnsResolver(nameservers=[text])
    assert str(info.value) == (
        f"Invalid nameserver {text!r}: expected an IP address, ip:port or [ipv6]:port "
        "(port 1 to 65535)"
    )
    assert (info.value.variable, info.value.value) == ("nameservers", text)


def test_nameservers_as_one_comma_separated_string() -> None:
    resolver = DnsResolver(nameservers="10.0.0.1, 10.0.0.2:54")
    assert resolver.nameservers == (Nameserver(ip("10.0.0.1")), Nameserver(ip("10.0.0.2"), 54))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"nameservers": []}, "Invalid nameservers []: expected at least one nameserver"),
        ({"maxsize": 0}, "Invalid maxsize 0: expected an integer of at least 1"),
        ({"min_ttl": -1}, "Invalid min_ttl -1: expected a number of seconds, at least 0.0"),
        (
            {"per_try_timeout": 0},
            "Invalid per_try_timeout 0: expected a number of seconds, more than 0.0",
        ),
        ({"min_ttl": 10, "max_ttl": 5}, "Invalid max_ttl 5: below min_ttl 10"),
    ],
)
def test_bad_options_raise_config_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        DnsResolver(**options)


# -- the cache bound, the constructor, the import -------------------------------------------------


def test_cache_is_bounded_and_evicts_the_least_recently_used(
    server: DnsTestServer, make_resolver: Any
) -> None:
    resolver = make_resolver(server, maxsize=3)
    for name in ("a.test", "v6.test", "multi.test"):
        resolve(resolver, name)
    resolve(resolver, "a.test")  # used again: v6.test is now the least recently used

    resolve(resolver, "short.test")

    assert len(resolver) == 3
    assert resolver.peek("v6.test") is None
    assert [resolver.peek(n) is not None for n in ("a.test", "multi.test", "short.test")] == [
        True
    ] * 3
    before = resolver.queries_sent
    resolve(resolver, "v6.test")  # evicted: asked again
    assert resolver.queries_sent == before + 2


def test_constructor_does_no_io_and_starts_no_thread(tmp_path: Path) -> None:
    threads = threading.active_count()
    resolver = DnsResolver(
        resolv_conf=str(tmp_path / "absent"), hosts_file=str(tmp_path / "absent")
    )
    assert threading.active_count() == threads
    assert resolver.peek("a.test") is None
    assert resolver.stats.queries_sent == 0
    resolver.close()


def test_dns_test_server_stops_cleanly(make_dns_server: Callable[..., DnsTestServer]) -> None:
    threads = set(threading.enumerate())
    server = make_dns_server(ZONES)
    server.set_behaviour("answer", delay=30.0)  # a reply still scheduled when it stops
    query = dns_query("a.test", "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(query, server.address)
        assert server.wait_for_queries(1)
    server.stop()
    server.stop()  # idempotent
    assert set(threading.enumerate()) == threads
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
        assert client.connect_ex(server.address) == errno.ECONNREFUSED


def dns_query(name: str, rdtype: str) -> bytes:
    import dns.message

    return dns.message.make_query(name, rdtype).to_wire()


def test_dns_resolver_is_a_resolver() -> None:
    assert isinstance(DnsResolver(nameservers=["127.0.0.1"]), Resolver)


def test_resolution_is_frozen() -> None:
    answer = Resolution("a.test", frozenset(), "nxdomain", "dns")
    with pytest.raises(AttributeError):
        answer.status = "ok"  # type: ignore[misc]


def test_importing_the_resolver_does_not_import_dnspython() -> None:
    code = (
        "import sys, sollol_locality.resolver\n"
        "print(sorted(m for m in sys.modules if m == 'dns' or m.startswith('dns.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == "[]"
