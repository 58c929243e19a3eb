"""Concurrency: many threads deciding while the world changes underneath them.

The workload lives in benchmarks/reliability.py (``run_concurrency``); the reliability script
runs it for 30 seconds, the suite for a few. While 16 threads plan, count, group, describe and
ask ``should_parallelize``, a ticker moves the cache clock (TTLs expire and are refreshed in the
background), this machine's interface addresses and the DNS answers change, and calibration
observations arrive (and the calibration is saved). Every answer must be one that some state of
the world allows, no thread may raise, at most one refresh thread may run, and no thread or file
descriptor may be left behind.
"""

from __future__ import annotations

import ipaddress
import random
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import offline_config

from sollol_locality import NodeTopology, ParallelismCostModel
from sollol_locality.local import LocalMachine, LocalSnapshot
from sollol_locality.resolver import Resolution
from sollol_locality.testing.dnsserver import DnsTestServer
from sollol_locality.testing.reliability import run_concurrency


def test_sixteen_threads_deciding_while_the_world_changes(
        make_dns_server: Callable[..., DnsTestServer], tmp_path: Path) -> None:
    server = make_dns_server()
    report = run_concurrency(3.0, threads=16, server=server, workdir=tmp_path)
    assert report.errors == []
    assert report.inconsistent == []
    assert report.decisions > 16 * 10
    assert report.observations > 0 and report.saves > 0
    assert len(report.counts_seen) >= 2  # the world really did change under the deciders
    assert report.interface_changes > 0 and report.local_versions > 2
    assert report.refreshes > 0  # TTLs expired and were refreshed in the background
    assert report.max_refresh_threads <= 1
    assert report.threads_after == report.threads_before
    assert report.fds_after == report.fds_before


class _AddressBook:
    """In-memory DNS: ``self.test`` is this machine's (changing) interface address."""

    def resolve_many(self, names: Any, *, timeout: float) -> dict[str, Resolution]:
        ip = ipaddress.ip_address("192.0.2.10")
        return {name: Resolution(name, frozenset({ip}), "ok", "dns") for name in names}

    def peek(self, name: str) -> Resolution | None:
        return None


def test_one_decision_sees_one_state_of_this_machine() -> None:
    """A snapshot refresh in the middle of a decision must not split one machine in two.

    The probe flips a coin every time it runs and the snapshot is never trusted
    (refresh_interval=0), so every lookup of "this machine" during a decision sees a new state.
    The address and a name for it must still land on the same host within each decision.
    """
    calls = [0]
    coin = random.Random(3)

    def flapping() -> LocalSnapshot:
        calls[0] += 1
        own = {"127.0.0.1", "::1"} | ({"192.0.2.10"} if coin.random() < 0.5 else set())
        return LocalSnapshot(frozenset({"localhost"}), frozenset(map(ipaddress.ip_address, own)),
                             ())

    topology = NodeTopology(offline_config(), resolver=_AddressBook(),
                            local_machine=LocalMachine(probe=flapping, refresh_interval=0))
    nodes = ["http://192.0.2.10:11434", "http://self.test:11435", "http://localhost:11436"]
    for _ in range(20):
        groups = topology.group_by_locality(nodes)
        together = [members for members in groups.values() if nodes[0] in members]
        assert nodes[1] in together[0], groups
        identities = topology.describe_many(nodes)
        assert identities[0].is_local == identities[1].is_local  # type: ignore[union-attr]
    assert calls[0] > 20


def test_contention_table_grows_while_others_read_it() -> None:
    """observe() adds stream counts to the contention table while deciders iterate it."""
    topology = NodeTopology(offline_config())
    model = ParallelismCostModel(offline_config())
    # 58 stream counts added while three readers copy the table: a reader that iterated the
    # live table instead failed within the first 8 (mutation tried on both readers, 10 runs
    # each); 200 nodes took 7 s of GIL switching for nothing more.
    nodes = [f"http://localhost:{11434 + k}" for k in range(60)]
    identities = [i for i in topology.describe_many(nodes) if not isinstance(i, Exception)]
    model.observe("sequential", nodes[:1], 1, 1.0, topology=topology)
    unit = identities[0].unit
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                model.gains_from_concurrency(unit)
                model.contention(unit, 7)
            except BaseException as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(exc)
                return

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    readers = [threading.Thread(target=read) for _ in range(3)]
    try:
        for reader in readers:
            reader.start()
        for k in range(2, len(identities)):
            model.observe("parallel", nodes[:k], k, 1.5 * k, identities=identities[:k])
            if errors:
                break
    finally:
        done.set()
        for reader in readers:
            reader.join()
        sys.setswitchinterval(interval)
    assert errors == []
    assert model.gains_from_concurrency(unit) == 1  # every run was slower: no gain
    assert len(model.to_dict()["contention"]["localhost/cpu"]) == len(identities) - 2


@pytest.mark.parametrize("threads", [1, 8])
def test_each_expiry_is_refreshed_once_by_one_background_thread(
        make_dns_server: Callable[..., DnsTestServer], threads: int) -> None:
    from sollol_locality.resolver import DnsResolver
    from sollol_locality.testing.dnsserver import soa

    server = make_dns_server({"r.test": [soa()],
                              **{f"h{i}.r.test": [("A", f"10.1.0.{i}", 1)] for i in range(50)}})
    now = [1000.0]
    resolver = DnsResolver(nameservers=[server.nameserver], hosts_file=None,
                           clock=lambda: now[0])
    names = [f"h{i}.r.test" for i in range(50)]
    before = threading.active_count()
    resolver.resolve_many(names, timeout=2.0)
    seen: list[int] = []

    def ask() -> None:
        for _ in range(10):
            resolver.resolve_many(names, timeout=2.0)  # all stale: served at once, refreshed
            seen.append(sum(t.name == "sollol-locality-dns-refresh"
                            for t in threading.enumerate()))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the askers and the refresher as much as possible
    try:
        for expiry in range(1, 6):
            now[0] += 10  # every answer expired (TTL clamped to 5 s)
            workers = [threading.Thread(target=ask) for _ in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            assert resolver.wait_idle(10)
            # each expired name refreshed once per expiry, however many callers saw it stale
            assert resolver.stats.refreshes == 50 * expiry
    finally:
        sys.setswitchinterval(interval)
    assert max(seen) <= 1
    resolver.close()
    assert threading.active_count() == before
