"""Reliability workloads: concurrency, memory and scale (layer: testing, above ``cli``).

The reusable parts of the reliability benchmark (``python -m benchmarks.reliability``), which the
test suite also runs in short versions (tests/test_concurrency.py, tests/test_scale.py):

* :func:`run_concurrency`: threads deciding while TTLs expire and refresh, interface addresses and
  DNS answers change and calibration observations arrive; every answer checked against the
  possible states of the world; threads, file descriptors and refresh threads counted;
* :func:`churn_resolver_cache`, :func:`churn_topology`, :func:`churn_over_dns`: many distinct names
  through the bounded caches (the last over a loopback :class:`DnsTestServer`);
* :func:`big_decision`: a 10,000-node decision under :mod:`tracemalloc`.

Everything talks only to this machine: DNS goes to loopback servers started here.
"""

from __future__ import annotations

import collections
import gc
import importlib
import ipaddress
import os
import random
import tempfile
import threading
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sollol_locality import (
    ExecutionPlanner,
    LocalityAwareMixin,
    LocalityConfig,
    NodeTopology,
    ParallelismCostModel,
)
from sollol_locality.local import LocalMachine, LocalSnapshot
from sollol_locality.resolver import DnsResolver
from sollol_locality.testing.dnsserver import DnsTestServer, soa

REFRESH_THREAD = "sollol-locality-dns-refresh"


def _rss_mb() -> float:
    # through importlib so type checking does not need psutil's stubs
    psutil: Any = importlib.import_module("psutil")
    return float(psutil.Process().memory_info().rss) / 2**20


def open_fds() -> int:
    """File descriptors open in this process (Linux)."""
    return len(os.listdir("/proc/self/fd"))


def config_for(nameserver: str, **fields: Any) -> LocalityConfig:
    base: dict[str, Any] = dict(mode="auto", min_speedup=1.0, topology_file=None, dns_timeout=1.0,
                                nameservers=nameserver, calibration_file=None, hosts_file=None)
    base.update(fields)
    return LocalityConfig(**base)


class _Base:
    def __init__(self, registry: Any) -> None:
        self.registry = registry


class _Registry:
    def __init__(self, nodes: list[Any]) -> None:
        self.nodes = nodes

    def get_healthy_nodes(self) -> list[Any]:
        return list(self.nodes)


class Balancer(LocalityAwareMixin, _Base):
    """The mixin on a minimal SynapticLlamas-shaped balancer."""


# =============================================================================================
# Concurrency


class TickingClock:
    """A monotonic clock that a ticker thread advances (the cache and probe clocks)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


@dataclass
class _Node:
    """A SynapticLlamas-shaped node with figures."""

    url: str
    metrics: Any = None
    capabilities: Any = None


@dataclass
class ConcurrencyReport:
    seconds: float
    threads: int
    decisions: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    observations: int = 0
    saves: int = 0
    errors: list[str] = field(default_factory=list)
    inconsistent: list[str] = field(default_factory=list)
    interface_changes: int = 0
    dns_changes: int = 0
    local_versions: int = 0
    refreshes: int = 0
    queries: int = 0
    max_refresh_threads: int = 0
    threads_before: int = 0
    threads_after: int = 0
    fds_before: int = 0
    fds_after: int = 0
    objects_before: int = 0  # live objects the garbage collector tracks, after a collection
    objects_after: int = 0
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    counts_seen: dict[int, int] = field(default_factory=dict)


CONCURRENCY_ZONES: dict[str, Any] = {}


def _concurrency_zones() -> dict[str, Any]:

    zones: dict[str, Any] = {"c.test": [soa(minimum=5)],
                             "self.c.test": [("A", "192.0.2.10", 1)],
                             "m.c.test": [("A", "10.50.0.1", 1)]}
    for i in range(4):
        zones[f"n{i}.c.test"] = [("A", f"10.40.{i}.1", 1)]
    return zones


LOCAL_NODES = ["http://localhost:11434", "http://127.0.0.1:11435"]
FLIPPING = ["http://192.0.2.10:11434", "http://self.c.test:11434"]  # this machine, or not
NAMED = [f"http://n{i}.c.test:11434" for i in range(4)]
PAIR = ["http://10.50.0.1:11434", "http://10.50.0.1:11435"]
MERGING = "http://m.c.test:11434"  # 10.50.0.1 (one host with PAIR) or 10.60.0.1
BAD = "http://bad:port"


def _world_nodes() -> list[Any]:
    from types import SimpleNamespace

    other = _Node("http://10.70.0.1:11434",
                  SimpleNamespace(avg_response_time=1.5, total_requests=20, is_healthy=True),
                  SimpleNamespace(has_gpu=False, gpu_count=0))
    return [*LOCAL_NODES, *FLIPPING, *NAMED, *PAIR, MERGING, other]


ALLOWED_COUNTS = frozenset({7, 8, 9})  # 7 + (192.0.2.10 remote) + (m.c.test apart from PAIR)


def _check_groups(groups: dict[str, list[Any]], nodes: list[Any]) -> str | None:
    """None when the grouping is one the world could have produced, else what is wrong."""
    where: dict[int, str] = {}
    for host, members in groups.items():
        for node in members:
            if id(node) in where:
                return f"node {node!r} in two groups"
            where[id(node)] = host
    if sorted(where) != sorted(map(id, nodes)):
        return "not every node grouped exactly once"
    url = {(n if isinstance(n, str) else n.url): where[id(n)] for n in nodes}
    if {url[u] for u in LOCAL_NODES} != {"localhost"}:
        return f"loopback nodes apart: {[url[u] for u in LOCAL_NODES]}"
    flipping = {url[u] for u in FLIPPING}
    if len(flipping) != 1 or not flipping <= {"localhost", "192.0.2.10"}:
        return f"192.0.2.10 and its name disagree: {sorted(flipping)}"
    for i, name in enumerate(NAMED):
        if url[name] not in (f"10.40.{i}.1", f"10.40.{i}.2", f"n{i}.c.test"):
            return f"{name} grouped as {url[name]}"
        if len(groups[url[name]]) != 1:
            return f"{name} shares a machine"
    if {url[u] for u in PAIR} != {"10.50.0.1"}:
        return "the two ports of 10.50.0.1 are apart"
    if url[MERGING] not in ("10.50.0.1", "10.60.0.1", "m.c.test"):
        return f"m.c.test grouped as {url[MERGING]}"
    return None


def run_concurrency(seconds: float, *, threads: int = 16, server: Any = None,
                    workdir: Path | None = None) -> ConcurrencyReport:
    """Decide from ``threads`` threads for ``seconds`` while the world changes underneath.

    ``server``: a started :class:`DnsTestServer` (one is started and stopped when None).
    """

    own_server = server is None
    if own_server:
        server = DnsTestServer().start()
    server.set_zones(_concurrency_zones())
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    directory = Path(tmp.name) if tmp is not None else workdir
    assert directory is not None
    report = ConcurrencyReport(seconds, threads)
    gc.collect()
    report.threads_before = threading.active_count()
    report.fds_before = open_fds()
    report.objects_before = len(gc.get_objects())
    report.rss_before_mb = _rss_mb()

    _run_world(seconds, threads, server, directory, report)
    gc.collect()
    report.threads_after = threading.active_count()
    report.fds_after = open_fds()
    if own_server:
        server.reset_counts()  # the test server's own log of every query is not ours
    gc.collect()
    report.objects_after = len(gc.get_objects())
    report.rss_after_mb = _rss_mb()
    if own_server:
        server.stop()
    if tmp is not None:
        tmp.cleanup()
    return report


def _run_world(seconds: float, threads: int, server: Any, directory: Path,
               report: ConcurrencyReport) -> None:
    """Build the world, run the deciders and the changers, and fill in ``report``."""
    clock = TickingClock()
    interface_up = [False]

    def probe() -> LocalSnapshot:
        addresses = {"127.0.0.1", "::1"} | ({"192.0.2.10"} if interface_up[0] else set())
        return LocalSnapshot(frozenset({"localhost", "thisbox"}),
                             frozenset(map(ipaddress.ip_address, addresses)), ())

    config = config_for(server.nameserver, calibration_file=directory / "calibration.json")
    resolver = DnsResolver(nameservers=[server.nameserver], hosts_file=None, clock=clock)
    local = LocalMachine(probe=probe, clock=clock, refresh_interval=1.0)
    topology = NodeTopology(config, resolver=resolver, local_machine=local, clock=clock)
    model = ParallelismCostModel(config)
    planner = ExecutionPlanner(topology, model, config, clock=clock)
    nodes = _world_nodes()
    candidates = [*nodes, BAD]
    balancer = Balancer(_Registry(candidates), planner=planner)
    many_local = [f"http://localhost:{11434 + k}" for k in range(48)]
    many_identities = [i for i in topology.describe_many(many_local)
                       if not isinstance(i, Exception)]

    stop = threading.Event()
    lock = threading.Lock()
    kinds: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[int] = collections.Counter()

    def fail(kind: str, message: str) -> None:
        with lock:
            (report.errors if kind == "error" else report.inconsistent).append(message)

    def decide(index: int) -> None:
        rng = random.Random(index)
        iteration = 0
        while not stop.is_set():
            iteration += 1
            kind = ("observe" if index in (12, 13) else
                    ["count", "group", "plan", "should_parallelize", "describe"][iteration % 5])
            try:
                if kind == "count":
                    count = topology.count_unique_hosts(nodes)
                    with lock:
                        counts[count] += 1
                    if count not in ALLOWED_COUNTS:
                        fail("inconsistent", f"count_unique_hosts = {count}")
                elif kind == "group":
                    problem = _check_groups(topology.group_by_locality(nodes), nodes)
                    if problem:
                        fail("inconsistent", f"group_by_locality: {problem}")
                elif kind == "plan":
                    plan = planner.plan(rng.randint(2, 6), candidates)
                    if [n for n, _ in plan.excluded] != [BAD]:
                        fail("inconsistent", f"plan excluded {plan.excluded!r}")
                    if plan.unique_hosts not in ALLOWED_COUNTS:
                        fail("inconsistent", f"plan unique_hosts = {plan.unique_hosts}")
                    if not all(any(n is c for c in candidates) for n in plan.nodes):
                        fail("inconsistent", "plan dispatches to a node it was not given")
                    problem = _check_groups(plan.hosts, nodes)
                    if problem:
                        fail("inconsistent", f"plan.hosts: {problem}")
                    if index == 14 and iteration % 40 == 2:
                        model.save()
                        with lock:
                            report.saves += 1
                elif kind == "should_parallelize":
                    if not isinstance(balancer.should_parallelize(rng.randint(0, 6)), bool):
                        fail("inconsistent", "should_parallelize returned a non-bool")
                elif kind == "describe":
                    identities = topology.describe_many(candidates)
                    flipping = {i.is_local for i in identities[2:4]}  # type: ignore[union-attr]
                    if len(flipping) != 1:
                        fail("inconsistent", "192.0.2.10 and self.c.test disagree on is_local")
                else:
                    choice = iteration % 4
                    if choice == 0:
                        model.observe("sequential", [rng.choice(nodes)], 2, rng.uniform(1, 4),
                                      topology=topology)
                    elif choice == 1:
                        model.observe("parallel", LOCAL_NODES, 4, rng.uniform(4, 12),
                                      topology=topology)
                    elif choice == 2:  # a new stream count: a new entry in the contention table
                        k = rng.randint(2, len(many_identities))
                        model.observe("parallel", many_local[:k], k, rng.uniform(k, 3 * k),
                                      identities=many_identities[:k])
                    else:
                        balancer.record_execution(balancer.plan_execution(3), rng.uniform(1, 5))
                    with lock:
                        report.observations += 1
            except Exception as exc:  # the point of the exercise: none may happen
                fail("error", f"{kind}: {type(exc).__name__}: {exc}")
            with lock:
                kinds[kind] += 1

    def ticker() -> None:  # time passes: TTLs (5 s after clamping) and snapshots (1 s) expire
        while not stop.wait(0.005):
            clock.tick(1.0)

    def world() -> None:  # interfaces and DNS answers change
        rng = random.Random(99)
        while not stop.wait(0.02):
            interface_up[0] = not interface_up[0]
            report.interface_changes += 1
            i = rng.randrange(4)
            server.set_records(f"n{i}.c.test", [("A", f"10.40.{i}.{rng.randint(1, 2)}", 1)])
            server.set_records("m.c.test", [("A", rng.choice(["10.50.0.1", "10.60.0.1"]), 1)])
            report.dns_changes += 2

    def sampler() -> None:
        while not stop.wait(0.002):
            running = sum(t.name == REFRESH_THREAD for t in threading.enumerate())
            report.max_refresh_threads = max(report.max_refresh_threads, running)

    workers = [threading.Thread(target=decide, args=(i,), name=f"decider-{i}")
               for i in range(threads)]
    helpers = [threading.Thread(target=f, name=f.__name__) for f in (ticker, world, sampler)]
    for thread in workers + helpers:
        thread.start()
    stop.wait(seconds)
    stop.set()
    for thread in workers + helpers:
        thread.join(60)
    resolver.wait_idle(30)
    resolver.close()
    report.local_versions = local.version
    report.refreshes = resolver.stats.refreshes
    report.queries = resolver.stats.queries_sent
    report.by_kind = dict(kinds)
    report.decisions = sum(v for k, v in kinds.items() if k != "observe")
    report.counts_seen = dict(sorted(counts.items()))

# =============================================================================================
# Scale


def churn_resolver_cache(names: int, *, maxsize: int = 4096, batch: int = 1000,
                         trace: bool = True) -> dict[str, Any]:
    """Drive ``names`` distinct names through ``DnsResolver.resolve_many`` with the network
    exchange replaced by an instant in-memory answer (the resolver's internal I/O boundary), so
    only the cache is exercised. Returns the largest cache size seen and memory figures."""
    from sollol_locality.resolver import _Outcome

    resolver = DnsResolver(nameservers=["127.0.0.1:9"], hosts_file=None, maxsize=maxsize)
    address = frozenset({ipaddress.ip_address("10.9.9.9")})

    def instant(batch_names: list[str], deadline: float, cancel: Any) -> dict[str, Any]:
        return {name: _Outcome("ok", address, 300.0) for name in batch_names}

    resolver._resolve_dns = instant  # type: ignore[method-assign,assignment]
    largest = 0
    if trace:
        tracemalloc.start()
    full_at = None
    start = time.perf_counter()
    for first in range(0, names, batch):
        chunk = [f"host-{i}.churn.test" for i in range(first, min(first + batch, names))]
        resolver.resolve_many(chunk, timeout=1.0)
        largest = max(largest, len(resolver))
        if full_at is None and len(resolver) >= maxsize:
            full_at = tracemalloc.get_traced_memory()[0]
    elapsed = time.perf_counter() - start
    current, peak = tracemalloc.get_traced_memory()  # (0, 0) when not tracing
    tracemalloc.stop()
    last = f"host-{names - 1}.churn.test"
    return {"names": names, "maxsize": maxsize, "largest_cache": largest,
            "final_cache": len(resolver), "newest_cached": resolver.peek(last) is not None,
            "oldest_cached": resolver.peek("host-0.churn.test") is not None,
            "memory_when_full_mb": (full_at or current) / 2**20,
            "memory_at_end_mb": current / 2**20, "peak_mb": peak / 2**20,
            "names_per_second": names / elapsed}


class _InstantDns:
    """In-memory DNS for scale runs: every name resolves at once to one of 64K addresses."""

    def resolve_many(self, names: Any, *, timeout: float) -> dict[str, Any]:
        from sollol_locality.resolver import Resolution

        return {name: Resolution(name, frozenset({ipaddress.ip_address(
            f"10.{100 + hash(name) % 50}.{hash(name) >> 8 & 255}.{hash(name) & 255}")}),
            "ok", "dns") for name in names}

    def peek(self, name: str) -> Any:
        return None


def churn_topology(names: int, *, batch: int = 1000, trace: bool = True) -> dict[str, Any]:
    """Distinct node names through ``NodeTopology.count_unique_hosts``: the topology's own memo
    of identities (one entry per host and port) stays within its bound."""
    from sollol_locality import topology as topology_module

    snapshot = LocalSnapshot(frozenset({"localhost"}),
                             frozenset(map(ipaddress.ip_address, ["127.0.0.1", "::1"])), ())
    topology = NodeTopology(config_for("127.0.0.1:9"), resolver=_InstantDns(),
                            local_machine=LocalMachine(probe=lambda: snapshot))
    largest = 0
    if trace:
        gc.collect()
        tracemalloc.start()
    start = time.perf_counter()
    for first in range(0, names, batch):
        topology.count_unique_hosts([f"http://pod-{i}.churn.test:11434"
                                     for i in range(first, min(first + batch, names))])
        largest = max(largest, len(topology._memo))
    elapsed = time.perf_counter() - start
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"names": names, "memo_max": topology_module._MEMO_MAX, "largest_memo": largest,
            "peak_mb": peak / 2**20, "at_end_mb": current / 2**20,
            "names_per_second": names / elapsed}


def churn_over_dns(server: Any, names: int, *, maxsize: int = 500, batch: int = 250
                   ) -> dict[str, Any]:
    """Distinct names that do not exist, asked of a loopback DNS server: negative answers are
    cached too, and the cache stays within ``maxsize``."""
    resolver = DnsResolver(nameservers=[server.nameserver], hosts_file=None, maxsize=maxsize)
    largest, statuses = 0, collections.Counter[str]()
    for first in range(0, names, batch):
        chunk = [f"gone-{i}.churn.test" for i in range(first, min(first + batch, names))]
        for result in resolver.resolve_many(chunk, timeout=5.0).values():
            statuses[result.status] += 1
        largest = max(largest, len(resolver))
    resolver.close()
    return {"names": names, "maxsize": maxsize, "largest_cache": largest,
            "statuses": dict(statuses), "queries": resolver.stats.queries_sent}


def big_decision(size: int = 10_000, *, workdir: Path, trace: bool = True) -> dict[str, Any]:
    """A decision over ``size`` nodes (IP literals, hosts-file names, loopback spellings) under
    tracemalloc: peak memory of the cold decision, and of a warm one (``trace=False``: no
    tracemalloc, which slows the decision about five times, and memory figures of 0)."""
    hosts_file = workdir / "hosts"
    named = size // 10
    hosts_file.write_text("".join(f"10.{200 + i // 65536}.{(i >> 8) & 255}.{i & 255} "
                                  f"node{i}.big.test\n" for i in range(named)))
    literal = size - named - 4
    nodes: list[Any] = [f"http://10.{(i // 3) >> 16 & 255}.{(i // 3) >> 8 & 255}."
                        f"{(i // 3) & 255}:{11434 + i % 3}" for i in range(literal)]
    nodes += [f"http://node{i}.big.test:11434" for i in range(named)]
    nodes += ["http://localhost:11434", "http://127.0.0.1:11435", "http://[::1]:11436",
              "http://0.0.0.0:11437"]
    config = config_for("127.0.0.1:9", hosts_file=hosts_file)
    snapshot = LocalSnapshot(frozenset({"localhost"}),
                             frozenset(map(ipaddress.ip_address, ["127.0.0.1", "::1"])), ())
    gc.collect()
    if trace:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]  # (0, 0) when not tracing
    topology = NodeTopology(config, local_machine=LocalMachine(probe=lambda: snapshot))
    planner = ExecutionPlanner(topology, ParallelismCostModel(config), config)
    tracemalloc.reset_peak()
    start = time.perf_counter()
    plan = planner.plan(8, nodes)
    cold = time.perf_counter() - start
    _, cold_peak = tracemalloc.get_traced_memory()
    retained = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.reset_peak()
    planner.invalidate()
    start = time.perf_counter()
    again = planner.plan(8, nodes)
    warm = time.perf_counter() - start
    _, warm_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    expected_hosts = len({n.split("//")[1].rsplit(":", 1)[0] for n in nodes[:literal]}) + named + 1
    return {"nodes": len(nodes), "unique_hosts": plan.unique_hosts,
            "expected_hosts": expected_hosts, "mode": plan.mode, "dispatch_to": len(plan.nodes),
            "same_again": (again.mode, again.unique_hosts) == (plan.mode, plan.unique_hosts),
            "cold_peak_mb": (cold_peak - base) / 2**20, "warm_peak_mb": (warm_peak - base) / 2**20,
            "retained_mb": retained / 2**20, "warm_over_cold_time": warm / cold}
