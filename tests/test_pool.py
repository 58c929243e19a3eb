"""`sollol_locality.pool` against the real ``sollol.pool.OllamaPool``.

Every pool here is a real ``OllamaPool`` (or :class:`LocalityAwarePool`, its subclass), built the
way SynapticLlamas builds one, and for each upstream failure case the same nodes are also given to a
plain ``OllamaPool`` so the test shows the wrong answer being fixed.

How these tests stay on this machine and leave nothing running (the harness below):

* **Construction.** ``enable_dask=False`` (no Dask cluster), ``register_with_dashboard=False``,
  ``enable_gpu_redis=False`` (no Redis subscriber thread), ``enable_cache=False`` and explicit nodes
  (``nodes=None`` would scan the network). What is left: the constructor asks every node for its
  free VRAM over HTTP (``_query_node_vram`` -> ``GET /api/ps``, httpx with 3 retries, 1.5 s of
  back-off per unreachable node), and starts two threads.
* **Network.** By default ``_query_node_vram`` / ``_query_loaded_models`` are replaced by stubs
  answering what OllamaPool itself answers for a node that does not respond (0 MB, no models); no
  decision under test depends on them. Two tests keep the real methods: one with loopback nodes
  (showing the IPv6 URL the pool builds really connects), one with nodes in network namespaces
  (root only); their retries skip the back-off. In every test :class:`NetworkGuard` refuses,
  before any packet is sent, a TCP connect to anything but this machine (or a namespace a test
  created) and records it; name
  lookups through the socket module are answered from the hosts file or refused (never DNS).
  Locality decisions resolve through the loopback DNS server of ``tests/dnsserver.py``.
  Upstream's ``_deduplicate_nodes`` ``connect()``s a UDP socket to 10.255.255.255 to learn its
  route; a UDP connect sends nothing, so the guard lets datagram connects through and records them.
* **Threads.** OllamaPool's VRAM thread sleeps 30 s between rounds and only then looks at its
  stop flag (and queries every node once more); ``stop()`` joins it for 5 s and gives up. The
  harness makes those sleeps interruptible (``sollol.pool.time`` only), clears the two flags that
  ``stop()`` clears, wakes the sleeps (the loops end without touching a node), calls ``stop()`` and
  joins both threads. Each test ends with exactly the threads it started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

sollol_pool = pytest.importorskip("sollol.pool")
OllamaPool = sollol_pool.OllamaPool

from sollol_locality import (  # noqa: E402
    ExecutionPlanner,
    InvalidNodeAddress,
    LocalityConfig,
    NodeTopology,
)
from sollol_locality.local import LocalMachine, LocalSnapshot  # noqa: E402
from sollol_locality.pool import (  # noqa: E402
    LocalityAwarePool,
    LocalityAwarePoolMixin,
    normalize_pool_node,
)
from sollol_locality.testing.dnsserver import DnsTestServer  # noqa: E402

SAFE_POOL_OPTIONS: dict[str, Any] = {
    "enable_dask": False,
    "register_with_dashboard": False,
    "enable_gpu_redis": False,
    "enable_cache": False,
}
POOL_THREAD_NAMES = ("OllamaPool-VRAM-Monitor", "OllamaPool-Health-Monitor")
REPO_ROOT = Path(__file__).resolve().parents[1]
REMOTE_A, REMOTE_B = "198.51.100.7", "203.0.113.9"  # TEST-NET-2 and -3: never contacted


# -- harness -------------------------------------------------------------------------------------


class LoopStopped(Exception):
    """Raised from a pool loop's sleep once the harness stops the pools."""


class InterruptibleTime:
    """Stands in for the ``time`` module inside ``sollol.pool`` only: ``sleep`` waits on an event
    and raises :class:`LoopStopped` once the harness sets it; everything else is ``time``."""

    def __init__(self) -> None:
        self._stopped = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if self._stopped.wait(seconds):
            raise LoopStopped("the test harness stopped this pool")

    def wake_all(self) -> None:
        self._stopped.set()

    def rearm(self) -> None:
        self._stopped = threading.Event()


def _hosts_table(path: str = "/etc/hosts") -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            fields = line.split("#", 1)[0].split()
            if len(fields) >= 2:
                for name in fields[1:]:
                    table.setdefault(name.lower(), []).append(fields[0])
    return table


def _numeric(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


class NetworkGuard:
    """Keeps a test on this machine.

    * ``socket.connect`` / ``connect_ex`` of a TCP socket to an address that is not this
      machine's (loopback, unspecified, an interface address) nor explicitly allowed (a network
      namespace a test made) is refused with ``ECONNREFUSED`` before anything is sent, and
      recorded in ``refused``; allowed ones are recorded in ``connects``. A connect to a *name*
      is refused too (the C library would resolve it). Datagram connects send nothing and are
      let through (recorded in ``datagram``).
    * ``gethostbyname`` / ``gethostbyname_ex`` / ``getaddrinfo``: IP literals as usual (numeric
      only), names from the hosts file, anything else refused with ``EAI_NONAME`` and recorded in
      ``lookups_refused``: no DNS query leaves a test.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.allowed: set[Any] = set()
        for addresses in psutil.net_if_addrs().values():
            for item in addresses:
                if item.family in (socket.AF_INET, socket.AF_INET6):
                    ip = _numeric(item.address)
                    if ip is not None:
                        self.allowed.add(ip)
        self.connects: list[tuple[str, int]] = []
        self.refused: list[tuple[str, int]] = []
        self.datagram: list[tuple[str, int]] = []
        self.lookups_refused: list[str] = []
        self._lock = threading.Lock()
        self._hosts = _hosts_table()
        real_connect = socket.socket.connect
        real_connect_ex = socket.socket.connect_ex
        real_getaddrinfo = socket.getaddrinfo
        real_gethostbyname = socket.gethostbyname
        real_gethostbyname_ex = socket.gethostbyname_ex
        guard = self

        def connect(sock: socket.socket, address: Any) -> None:
            if not guard._may_connect(sock, address):
                raise ConnectionRefusedError(errno.ECONNREFUSED,
                                             f"test guard: {address!r} is off this machine")
            return real_connect(sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> int:
            if not guard._may_connect(sock, address):
                return errno.ECONNREFUSED
            return real_connect_ex(sock, address)

        def getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0,
                        flags: int = 0) -> Any:
            if host is None:
                return real_getaddrinfo(host, port, family, type, proto, flags)
            text = host.decode() if isinstance(host, bytes) else str(host)
            if _numeric(text) is not None:
                return real_getaddrinfo(host, port, family, type, proto,
                                        flags | socket.AI_NUMERICHOST)
            results: list[Any] = []
            for ip in guard._hosts.get(text.lower().rstrip("."), ()):
                with contextlib.suppress(socket.gaierror):
                    results += real_getaddrinfo(ip, port, family, type, proto,
                                                flags | socket.AI_NUMERICHOST)
            if results:
                return results
            raise guard._refuse_lookup(text)

        def gethostbyname(name: str) -> str:
            ip = _numeric(name)
            if ip is not None:
                return real_gethostbyname(name)
            for candidate in guard._hosts.get(name.lower().rstrip("."), ()):
                if ipaddress.ip_address(candidate).version == 4:
                    return candidate
            raise guard._refuse_lookup(name)

        def gethostbyname_ex(name: str) -> Any:
            if _numeric(name) is not None:
                return real_gethostbyname_ex(name)
            v4 = [ip for ip in guard._hosts.get(name.lower().rstrip("."), ())
                  if ipaddress.ip_address(ip).version == 4]
            if v4:
                return (name, [], v4)
            raise guard._refuse_lookup(name)

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(socket, "gethostbyname", gethostbyname)
        monkeypatch.setattr(socket, "gethostbyname_ex", gethostbyname_ex)

    def allow(self, address: str) -> None:
        """Let connects to ``address`` through (a simulated machine in a network namespace)."""
        self.allowed.add(ipaddress.ip_address(address))

    def connected_to(self, host: str, port: int) -> bool:
        """Whether a TCP connect to ``(host, port)`` was let through."""
        return any(_numeric(h) == _numeric(host) and p == port for h, p in self.connects)

    def _refuse_lookup(self, name: str) -> socket.gaierror:
        with self._lock:
            self.lookups_refused.append(name)
        return socket.gaierror(socket.EAI_NONAME,
                               f"test guard: {name!r} is not in the hosts file (no DNS in tests)")

    def _may_connect(self, sock: socket.socket, address: Any) -> bool:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return True
        host, port = str(address[0]), int(address[1])
        with self._lock:
            if sock.type == socket.SOCK_DGRAM:
                self.datagram.append((host, port))
                return True
            ip = _numeric(host)
            if ip is not None and (ip.is_loopback or ip.is_unspecified or ip in self.allowed):
                self.connects.append((host, port))
                return True
            self.refused.append((host, port))
            return False


class PoolHarness:
    """Builds real pools that stay on this machine, and stops them leaving no thread behind."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, stub_network: bool) -> None:
        self.clock = InterruptibleTime()
        monkeypatch.setattr(sollol_pool, "time", self.clock)
        self.vram_queries: list[str] = []
        if stub_network:
            harness = self

            def query_node_vram(pool: Any, node: dict[str, Any]) -> int:
                # Stub: OllamaPool asks each node for free VRAM over HTTP here; 0 is what it
                # answers itself for a node that does not respond. Nothing under test uses it.
                harness.vram_queries.append(f"{node['host']}:{node['port']}")
                return 0

            def query_loaded_models(pool: Any, node: dict[str, Any]) -> list[str]:
                return []  # Stub: the same HTTP request (/api/ps) from the VRAM thread.

            monkeypatch.setattr(OllamaPool, "_query_node_vram", query_node_vram)
            monkeypatch.setattr(OllamaPool, "_query_loaded_models", query_loaded_models)
        self.pools: list[Any] = []
        self.threads_before = list(threading.enumerate())

    def make(self, cls: type, nodes: list[Any], **options: Any) -> Any:
        """A pool of class ``cls`` (OllamaPool or a subclass) over ``nodes``."""
        pool = cls(nodes=nodes, **SAFE_POOL_OPTIONS, **options)
        self.pools.append(pool)
        return pool

    def stop_all(self) -> None:
        """Stop every pool made and join its threads (no sleeping, no timeouts hit)."""
        pools, self.pools = self.pools, []
        for pool in pools:
            # The flags stop() clears, cleared first so a woken loop ends instead of sleeping on.
            pool._vram_refresh_enabled = False
            pool._health_check_enabled = False
        self.clock.wake_all()
        for pool in pools:
            pool.stop()
            _close_loop_left_by_stop()
            for thread in (pool._vram_refresh_thread, pool._health_check_thread):
                thread.join(timeout=30)
                assert not thread.is_alive(), f"{thread.name} did not end"
        self.clock.rearm()

    def leftover_threads(self) -> list[threading.Thread]:
        """Threads running now that were not running when the harness was made."""
        return [t for t in threading.enumerate() if t not in self.threads_before]


def _close_loop_left_by_stop() -> None:
    # OllamaPool.stop() closes its httpx AsyncClient on a new event loop it sets as current and
    # never closes; close it so no "unclosed event loop" warning follows the test.
    policy = asyncio.get_event_loop_policy()
    with contextlib.suppress(RuntimeError):
        loop = policy.get_event_loop()
        if not loop.is_running():
            loop.close()
    asyncio.set_event_loop(None)


@pytest.fixture
def network_guard(monkeypatch: pytest.MonkeyPatch) -> NetworkGuard:
    """The guard that keeps the test on this machine (see :class:`NetworkGuard`)."""
    return NetworkGuard(monkeypatch)


def run_harness(monkeypatch: pytest.MonkeyPatch, stub_network: bool) -> Iterator[PoolHarness]:
    """A :class:`PoolHarness` for a fixture: stops its pools afterwards and checks that no thread
    the test started is still running."""
    harness = PoolHarness(monkeypatch, stub_network=stub_network)
    try:
        yield harness
    finally:
        harness.stop_all()
    leftover = harness.leftover_threads()
    assert not leftover, f"threads left running: {leftover}"


@pytest.fixture
def harness(dns_server: DnsTestServer, network_guard: NetworkGuard,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[PoolHarness]:
    """Real pools with the VRAM HTTP queries stubbed (see the module docstring)."""
    yield from run_harness(monkeypatch, stub_network=True)


@pytest.fixture
def network_harness(dns_server: DnsTestServer, network_guard: NetworkGuard,
                    monkeypatch: pytest.MonkeyPatch) -> Iterator[PoolHarness]:
    """Real pools with OllamaPool's own network methods (nodes must be on this machine or in a
    network namespace)."""
    # OllamaPool's httpx transport retries a refused connect 3 times, after 0, 0.5 and 1 s
    # (httpcore's backoff): 1.5 s per node of waiting that no check here is about. The connects
    # and retries still happen, the retries at once.
    import httpcore._sync.connection

    monkeypatch.setattr(httpcore._sync.connection, "RETRIES_BACKOFF_FACTOR", 0)
    yield from run_harness(monkeypatch, stub_network=False)


def locality_config_for(dns_server: DnsTestServer) -> LocalityConfig:
    """No calibration file; every DNS query goes to the loopback test server."""
    return LocalityConfig(calibration_file=None, nameservers=(dns_server.address,))


@pytest.fixture
def config(dns_server: DnsTestServer) -> LocalityConfig:
    """See :func:`locality_config_for`."""
    return locality_config_for(dns_server)


def own_lan_address() -> str:
    """This machine's own non-loopback IPv4 interface address (read now, with psutil)."""
    candidates = []
    for name, addresses in psutil.net_if_addrs().items():
        if name == "lo" or name.startswith(("br-", "docker", "veth", "virbr", "vslt", "cni")):
            continue
        for item in addresses:
            ip = _numeric(item.address)
            if item.family == socket.AF_INET and ip is not None and not (
                    ip.is_loopback or ip.is_link_local):
                rank = 0 if name.startswith(("eth", "en", "wl")) else 1
                candidates.append((rank, name, item.address))
    if not candidates:
        pytest.skip("this machine has no non-loopback IPv4 interface address")
    return str(min(candidates)[2])


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)


def _used_ipv4() -> list[ipaddress.IPv4Address]:
    return [ipaddress.IPv4Address(item.address) for addresses in psutil.net_if_addrs().values()
            for item in addresses if item.family == socket.AF_INET]


def _require_root_networking() -> None:
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root on Linux with iproute2 (ip) to create interfaces")


@pytest.fixture
def container_bridge() -> Iterator[ipaddress.IPv4Network]:
    """A Docker-style bridge ``br-<12 hex>`` with 172.31.x.1/24 in the root namespace; deleted
    after the test. Its network is what a container on it would have an address in."""
    _require_root_networking()
    name = "br-" + secrets.token_hex(6)
    used = _used_ipv4()
    network = None
    for _ in range(50):
        candidate = ipaddress.IPv4Network(f"172.31.{64 + secrets.randbelow(190)}.0/24")
        if not any(ip in candidate for ip in used):
            network = candidate
            break
    if network is None:
        pytest.skip("no free 172.31.x.0/24 network for a test bridge")
    made = _run("ip", "link", "add", "name", name, "type", "bridge")
    if made.returncode != 0:
        pytest.skip(f"cannot create a bridge: {made.stderr.strip()}")
    try:
        for command in (("ip", "addr", "add", f"{network[1]}/24", "dev", name),
                        ("ip", "link", "set", name, "up")):
            done = _run(*command)
            assert done.returncode == 0, done.stderr
        yield network
    finally:
        _run("ip", "link", "del", name)


@pytest.fixture
def netns_machines(network_guard: NetworkGuard) -> Iterator[Callable[[], str]]:
    """Make simulated remote machines: each call creates a network namespace joined to this one
    by a veth pair and returns the namespace's address (the guard lets connects to it through;
    nothing listens there, so they are refused at once, inside this machine)."""
    _require_root_networking()
    made: list[tuple[str, str]] = []

    def make() -> str:
        tag = secrets.token_hex(3)
        namespace, veth, peer = f"slt-{tag}", f"vslt{tag}", f"vslt{tag}p"
        used = _used_ipv4()
        for _ in range(50):
            network = ipaddress.IPv4Network(
                f"10.254.{secrets.randbelow(256)}.{4 * secrets.randbelow(64)}/30")
            if not any(ip in network for ip in used):
                break
        else:
            pytest.skip("no free 10.254.x.y/30 network for a test namespace")
        if _run("ip", "netns", "add", namespace).returncode != 0:
            pytest.skip("cannot create network namespaces here")
        made.append((namespace, veth))
        for command in (
            ("ip", "link", "add", veth, "type", "veth", "peer", "name", peer),
            ("ip", "link", "set", peer, "netns", namespace),
            ("ip", "addr", "add", f"{network[1]}/30", "dev", veth),
            ("ip", "link", "set", veth, "up"),
            ("ip", "netns", "exec", namespace, "ip", "addr", "add", f"{network[2]}/30", "dev",
             peer),
            ("ip", "netns", "exec", namespace, "ip", "link", "set", peer, "up"),
        ):
            done = _run(*command)
            if done.returncode != 0:
                pytest.skip(f"cannot set up a test namespace ({' '.join(command)}): "
                            f"{done.stderr.strip()}")
        network_guard.allow(str(network[2]))
        return str(network[2])

    try:
        yield make
    finally:
        for namespace, veth in made:
            _run("ip", "netns", "del", namespace)
            _run("ip", "link", "del", veth)


# -- node normalisation --------------------------------------------------------------------------


class UrlNode:
    """A node object with ``.url`` (SOLLOL's NodeProtocol, SynapticLlamas' OllamaNode)."""

    def __init__(self, url: str) -> None:
        self.url = url


NORMALISATION = [
    # (node, ours, upstream OllamaPool._normalize_node: a dict or the exception type)
    ("http://[::1]:11434", {"host": "[::1]", "port": "11434"}, {"host": "[::1]", "port": "11434"}),
    ("::1", {"host": "[::1]", "port": "11434"}, {"host": ":", "port": "1"}),
    ("http://[fe80::1%eth0]:11434", {"host": "[fe80::1%eth0]", "port": "11434"},
     {"host": "[fe80::1%eth0]", "port": "11434"}),
    ("http://[fe80::1%25eth0]:11434", {"host": "[fe80::1%eth0]", "port": "11434"},
     {"host": "[fe80::1%25eth0]", "port": "11434"}),
    ("http://localhost:11434/", {"host": "localhost", "port": "11434"},
     {"host": "localhost", "port": "11434/"}),
    ("http://user:secret@gpu-box:11435", {"host": "gpu-box", "port": "11435"},
     {"host": "user:secret@gpu-box", "port": "11435"}),
    ("GPU-Box.LAN.", {"host": "gpu-box.lan", "port": "11434"},
     {"host": "GPU-Box.LAN.", "port": "11434"}),
    ({"url": "http://[::1]:11435"}, {"host": "[::1]", "port": "11435"},
     {"host": "[::1]", "port": "11435"}),
    ({"host": "::1", "port": 11434}, {"host": "[::1]", "port": "11434"},
     {"host": "::1", "port": 11434}),
    (UrlNode("http://10.0.0.5:11434"), {"host": "10.0.0.5", "port": "11434"}, ValueError),
]


@pytest.mark.parametrize(("node", "ours", "upstream"), NORMALISATION,
                         ids=[repr(case[0]) if not isinstance(case[0], UrlNode)
                              else "UrlNode" for case in NORMALISATION])
def test_normalisation_against_upstream(node: Any, ours: dict[str, str], upstream: Any) -> None:
    """Every node shape becomes the pool's {"host", "port"} dict; upstream's split(":") parser is
    shown beside it."""
    assert normalize_pool_node(node) == ours
    if isinstance(upstream, type):
        with pytest.raises(upstream):
            OllamaPool._normalize_node(None, node)
    else:
        assert OllamaPool._normalize_node(None, node) == upstream


@pytest.mark.parametrize(("node", "host", "port"), [
    ("http://[::1]:11434", "::1", 11434),
    ("::1", "::1", 11434),
    ("http://[fe80::1%eth0]:11434", "fe80::1%eth0", 11434),
    ("http://localhost:11434/", "localhost", 11434),
    ({"host": "::1", "port": 11435}, "::1", 11435),
])
def test_normalised_nodes_make_the_urls_ollamapool_builds(node: Any, host: str,
                                                          port: int) -> None:
    """OllamaPool builds f"http://{host}:{port}{endpoint}" (_make_request, _query_node_vram);
    the normalised host keeps IPv6 in brackets, so the URL parses to the right host and port."""
    entry = normalize_pool_node(node)
    url = httpx.URL(f"http://{entry['host']}:{entry['port']}/api/ps")
    assert (url.host, url.port) == (host, port)


def test_a_node_already_in_pool_form_is_returned_as_is() -> None:
    node = {"host": "localhost", "port": 11434, "models": ["llama3.2"]}
    assert normalize_pool_node(node) is node
    copied = normalize_pool_node({"host": "::1", "port": "11434", "gpu": "0"})
    assert copied == {"gpu": "0", "host": "[::1]", "port": "11434"}


@pytest.mark.parametrize(("node", "message"), [
    ("http://gpu-box:99999", "Invalid node address 'http://gpu-box:99999': invalid port '99999' "
                             "(expected 1 to 65535)"),
    ("", "Invalid node address '': empty address"),
    ({"port": 11434}, "Invalid node address <mapping with keys ['port']>: expected a 'url' key "
                      "or a 'host' key"),
])
def test_an_unusable_node_is_a_clear_value_error(node: Any, message: str) -> None:
    with pytest.raises(InvalidNodeAddress) as caught:
        normalize_pool_node(node)
    assert isinstance(caught.value, ValueError)  # what OllamaPool's callers already catch
    assert str(caught.value) == message


def test_https_and_paths_are_reported_not_silently_dropped(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sollol_locality.pool")
    assert normalize_pool_node("https://gpu-box/ollama") == {"host": "gpu-box", "port": "11434"}
    assert [r.getMessage() for r in caplog.records] == [
        "OllamaPool connects over plain HTTP; the https scheme of node 'https://gpu-box/ollama' "
        "is not used",
        "OllamaPool sends requests to the root of each node; the path '/ollama' of node "
        "'https://gpu-box/ollama' is not used",
    ]


# -- the upstream failure cases, on real pools -------------------------------------------------


def test_loopback_and_unspecified_address_are_one_machine(harness: PoolHarness,
                                                          config: LocalityConfig) -> None:
    nodes = ["http://127.0.0.1:11434", "http://0.0.0.0:11435"]
    pool = harness.make(LocalityAwarePool, nodes, locality_config=config)
    upstream = harness.make(OllamaPool, nodes)

    assert pool.nodes == upstream.nodes == [{"host": "127.0.0.1", "port": "11434"},
                                            {"host": "0.0.0.0", "port": "11435"}]
    assert pool.count_unique_physical_hosts() == 1
    assert pool.should_use_parallel_execution(3) is False
    # Upstream: gethostbyname("0.0.0.0") is "0.0.0.0", not 127.x, so two "machines".
    assert upstream.count_unique_physical_hosts() == 2
    assert upstream.should_use_parallel_execution(3) is True


def test_localhost_and_ipv6_loopback_are_one_machine(harness: PoolHarness,
                                                     network_guard: NetworkGuard,
                                                     config: LocalityConfig) -> None:
    nodes = ["http://localhost:11434", "http://[::1]:11435"]
    pool = harness.make(LocalityAwarePool, nodes, locality_config=config)
    upstream = harness.make(OllamaPool, nodes)

    assert pool.nodes == [{"host": "localhost", "port": "11434"},
                          {"host": "[::1]", "port": "11435"}]
    assert pool.count_unique_physical_hosts() == 1
    assert pool.should_use_parallel_execution(3) is False
    assert network_guard.lookups_refused == []  # decided without a system name lookup

    # Upstream: gethostbyname("[::1]") fails (a blocking lookup, here refused by the guard),
    # so the bracketed name counts as a second machine.
    assert upstream.count_unique_physical_hosts() == 2
    assert network_guard.lookups_refused == ["[::1]"]


def test_localhost_and_own_lan_address_on_another_port(
        harness: PoolHarness, config: LocalityConfig,
        caplog: pytest.LogCaptureFixture) -> None:
    """Two real instances of one machine: localhost:11435 and <LAN address>:11434."""
    lan = own_lan_address()
    nodes = ["http://localhost:11435", f"http://{lan}:11434"]
    caplog.set_level(logging.INFO, logger="sollol_locality")
    pool = harness.make(LocalityAwarePool, nodes, locality_config=config)
    upstream = harness.make(OllamaPool, nodes)

    assert pool.nodes == [{"host": "localhost", "port": "11435"},
                          {"host": lan, "port": "11434"}]  # both instances kept
    assert pool.count_unique_physical_hosts() == 1
    assert pool.should_use_parallel_execution(3) is False
    plan = pool.plan_execution(3)
    assert (plan.mode, plan.shared_host, plan.unique_hosts) == ("sequential", "localhost", 1)
    assert plan.nodes[0] in pool.nodes  # the pool's own dict, ready to dispatch to
    messages = [r.getMessage() for r in caplog.records]
    assert (f"pool nodes localhost:11435, {lan}:11434 are separate Ollama instances on one "
            "machine (localhost); all are kept") in messages
    assert any(m.startswith("parallel execution refused: 2 nodes share one machine (localhost)")
               for m in messages)

    # Upstream either drops the localhost:11435 instance at start-up (when the LAN address is
    # the one its UDP-route trick finds) or counts the two addresses as two machines.
    assert (upstream.nodes == [{"host": lan, "port": "11434"}]
            or upstream.count_unique_physical_hosts() == 2)


def test_one_instance_named_several_ways_is_merged_and_each_merge_logged(
        harness: PoolHarness, config: LocalityConfig,
        caplog: pytest.LogCaptureFixture) -> None:
    lan = own_lan_address()
    caplog.set_level(logging.INFO, logger="sollol_locality.pool")
    pool = harness.make(LocalityAwarePool, [
        "http://127.0.0.1:11434", "http://localhost:11434", f"http://{lan}:11434",
        "http://[::1]:11434", "http://localhost:11435",
    ], locality_config=config)

    assert pool.nodes == [{"host": "127.0.0.1", "port": "11434"},
                          {"host": "localhost", "port": "11435"}]
    merged = [r.getMessage() for r in caplog.records
              if getattr(r, "event", None) == "pool_node_merged"]
    assert merged == [
        f"pool nodes 127.0.0.1:11434 and {other} are one Ollama instance (machine localhost, "
        "port 11434); keeping 127.0.0.1:11434"
        for other in ("localhost:11434", f"{lan}:11434", "[::1]:11434")
    ]


def test_container_bridge_address_is_this_machine(harness: PoolHarness, config: LocalityConfig,
                                                  container_bridge: ipaddress.IPv4Network
                                                  ) -> None:
    container = str(container_bridge[2])  # a container on the bridge, with its own Ollama
    nodes = ["http://localhost:11434", f"http://{container}:11434"]
    pool = harness.make(LocalityAwarePool, nodes, locality_config=config)
    upstream = harness.make(OllamaPool, nodes)

    # Same machine, same port number, yet two instances: the container has its own ports.
    assert pool.nodes == [{"host": "localhost", "port": "11434"},
                          {"host": container, "port": "11434"}]
    assert pool.topology.describe(pool.nodes[1]).source == "container"
    assert pool.count_unique_physical_hosts() == 1
    assert pool.should_use_parallel_execution(3) is False
    # Upstream: the bridge address is just another IP, so another "machine".
    assert upstream.count_unique_physical_hosts() == 2
    assert upstream.should_use_parallel_execution(3) is True


def test_one_container_named_twice_is_merged(harness: PoolHarness, config: LocalityConfig,
                                             container_bridge: ipaddress.IPv4Network) -> None:
    container = str(container_bridge[2])
    pool = harness.make(LocalityAwarePool, [f"http://{container}:11434", f"{container}:11434",
                                            "http://localhost:11434"], locality_config=config)
    assert pool.nodes == [{"host": container, "port": "11434"},
                          {"host": "localhost", "port": "11434"}]


def test_planner_keeps_a_container_instance_on_the_host_port(
        dns_server: DnsTestServer, container_bridge: ipaddress.IPv4Network) -> None:
    container = f"http://{container_bridge[2]}:11434"
    forced = LocalityConfig(calibration_file=None, nameservers=(dns_server.address,),
                            mode="parallel")
    plan = ExecutionPlanner(NodeTopology(forced)).plan(2, ["http://localhost:11434", container])
    assert plan.nodes == ["http://localhost:11434", container]


def test_two_distinct_machines(harness: PoolHarness, network_guard: NetworkGuard,
                               config: LocalityConfig) -> None:
    nodes = [f"http://{REMOTE_A}:11434", f"http://{REMOTE_B}:11434"]
    pool = harness.make(LocalityAwarePool, nodes, locality_config=config)
    upstream = harness.make(OllamaPool, nodes)

    assert pool.count_unique_physical_hosts() == 2 == upstream.count_unique_physical_hosts()
    assert pool.should_use_parallel_execution(3) is True
    assert upstream.should_use_parallel_execution(3) is True
    plan = pool.plan_execution(3)
    assert plan.mode == "parallel" and plan.nodes == pool.nodes
    assert all(planned is own for planned, own in zip(plan.nodes, pool.nodes, strict=True))
    # Nothing tried to reach the two addresses (stubbed VRAM queries, loops stopped asleep).
    assert not [c for c in network_guard.connects + network_guard.refused
                if c[0] in (REMOTE_A, REMOTE_B)]


def test_a_name_resolved_by_the_configured_dns_to_this_machine(
        harness: PoolHarness, dns_server: DnsTestServer, config: LocalityConfig) -> None:
    lan = own_lan_address()
    dns_server.set_zones({"box.test": [("A", lan, 60)]})
    pool = harness.make(LocalityAwarePool, ["http://box.test:11435", "http://localhost:11434"],
                        locality_config=config)

    assert len(pool.nodes) == 2
    assert pool.count_unique_physical_hosts() == 1
    assert pool.should_use_parallel_execution(2) is False
    assert dns_server.count("box.test", "A") >= 1


def test_real_network_methods_reach_the_ipv6_url(network_harness: PoolHarness,
                                                 network_guard: NetworkGuard,
                                                 config: LocalityConfig) -> None:
    """Unpatched: OllamaPool's own VRAM query connects to [::1] through the URL it builds from
    the normalised node (refused at once: nothing listens on these ports)."""
    pool = network_harness.make(LocalityAwarePool, ["http://[::1]:11434", "127.0.0.1:11435"],
                                locality_config=config)

    assert pool.nodes == [{"host": "[::1]", "port": "11434"},
                          {"host": "127.0.0.1", "port": "11435"}]
    assert network_guard.connected_to("::1", 11434)
    assert network_guard.connected_to("127.0.0.1", 11435)
    assert network_guard.refused == []
    assert pool.count_unique_physical_hosts() == 1


def test_machines_in_network_namespaces_with_unpatched_pool(
        network_harness: PoolHarness, network_guard: NetworkGuard, config: LocalityConfig,
        netns_machines: Callable[[], str]) -> None:
    first, second = netns_machines(), netns_machines()
    nodes = ["http://127.0.0.1:11434", f"http://{first}:11434", f"http://{second}:11434"]
    pool = network_harness.make(LocalityAwarePool, nodes, locality_config=config)

    assert network_guard.connected_to(first, 11434) and network_guard.connected_to(second, 11434)
    assert network_guard.refused == []
    assert pool.count_unique_physical_hosts() == 3
    plan = pool.plan_execution(3)
    assert plan.mode == "parallel" and len(plan.nodes) == 3


# -- the mixin itself ----------------------------------------------------------------------------


def test_pools_leave_no_thread_running(harness: PoolHarness, config: LocalityConfig) -> None:
    before = list(threading.enumerate())
    count = threading.active_count()
    harness.make(LocalityAwarePool, ["http://localhost:11434"], locality_config=config)
    harness.make(OllamaPool, ["http://localhost:11434"])
    started = sorted(t.name for t in threading.enumerate() if t not in before)
    assert started == sorted(POOL_THREAD_NAMES * 2)

    harness.stop_all()

    assert threading.active_count() == count
    assert set(threading.enumerate()) == set(before)


def test_locality_options_are_taken_out_before_ollamapool_runs(harness: PoolHarness,
                                                               config: LocalityConfig) -> None:
    planner = ExecutionPlanner(NodeTopology(config))
    first = harness.make(LocalityAwarePool, ["localhost:11434"], planner=planner)
    second = harness.make(LocalityAwarePool, ["localhost:11435"], planner=planner)
    assert first.planner is second.planner is planner
    assert first.topology is planner.topology and first.cost_model is planner.cost_model
    assert isinstance(first, OllamaPool) and isinstance(first, LocalityAwarePoolMixin)


def test_mixin_state_is_created_lazily_without_the_mixin_constructor(
        monkeypatch: pytest.MonkeyPatch, dns_server: DnsTestServer) -> None:
    """A subclass whose __init__ never reaches the mixin still answers (defaults from the
    environment, pointed at the loopback DNS server and no calibration file)."""
    monkeypatch.setenv("SOLLOL_LOCALITY_CALIBRATION", "none")
    monkeypatch.setenv("SOLLOL_LOCALITY_NAMESERVERS", dns_server.nameserver)

    class Bare(LocalityAwarePoolMixin):
        def __init__(self) -> None:  # no super().__init__()
            self.nodes = [{"host": "127.0.0.1", "port": "11434"},
                          {"host": REMOTE_A, "port": "11434"}]

    bare = Bare()
    assert bare.count_unique_physical_hosts() == 2
    assert bare.should_use_parallel_execution(2) is True


def test_decisions_follow_the_node_list_and_skip_unusable_nodes(
        harness: PoolHarness, config: LocalityConfig) -> None:
    pool = harness.make(LocalityAwarePool, ["http://localhost:11434", f"http://{REMOTE_A}:11434"],
                        locality_config=config)
    assert pool.should_use_parallel_execution(1) is False
    assert pool.should_use_parallel_execution(2) is True

    pool.nodes.append({"host": "", "port": "11434"})  # e.g. a bad add_node()
    assert pool.count_unique_physical_hosts() == 2
    plan = pool.plan_execution(2)
    assert plan.mode == "parallel"
    assert [node for node, _ in plan.excluded] == [{"host": "", "port": "11434"}]

    pool.nodes = []
    assert pool.count_unique_physical_hosts() == 0
    assert pool.should_use_parallel_execution(3) is False


def test_plan_execution_takes_explicit_candidates(harness: PoolHarness,
                                                  config: LocalityConfig) -> None:
    pool = harness.make(LocalityAwarePool, ["http://localhost:11434"], locality_config=config)
    candidates = [f"http://{REMOTE_A}:11434", f"http://{REMOTE_B}:11434"]
    plan = pool.plan_execution(4, candidates)
    assert plan.mode == "parallel" and plan.nodes == candidates
    assert pool.should_parallelize(4, candidates) is True
    pool.record_execution(plan, 2.0)
    assert pool.cost_model.observations == 1


def test_importing_the_pool_module_does_not_import_sollol() -> None:
    code = ("import sys, sollol_locality, sollol_locality.pool, sollol_locality._install\n"
            "assert 'sollol' not in sys.modules and 'sollol.pool' not in sys.modules\n"
            "from sollol_locality.pool import LocalityAwarePool\n"
            "import sollol.pool\n"
            "assert issubclass(LocalityAwarePool, sollol.pool.OllamaPool)\n"
            "assert LocalityAwarePool.__module__ == 'sollol_locality.pool'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                          check=False)
    assert done.returncode == 0, done.stderr


# -- one definition of an Ollama instance, shared with the planner ------------------------------


class _ContainerHost:
    """A probe of this machine faked as hosting a container bridge (172.30.0.0/16), so the test
    needs no root: 172.30.0.5 is a container here, with its own network namespace."""

    def __call__(self) -> LocalSnapshot:
        return LocalSnapshot(
            hostnames=frozenset({"localhost"}),
            addresses=frozenset(ipaddress.ip_address(a) for a in ("127.0.0.1", "::1",
                                                                 "172.30.0.1")),
            container_networks=(ipaddress.ip_network("172.30.0.0/16"),))


@pytest.mark.parametrize(("nodes", "instances"), [
    # A hosts-file name of the container, and the host's own instance on the same port: two.
    (["http://localhost:11434", "http://ollama-box:11434"], 2),
    # The container by its hosts-file name and by its address: one instance named twice.
    (["http://ollama-box:11434", "http://172.30.0.5:11434"], 1),
])
def test_the_pool_and_the_planner_agree_on_instances(
        harness: PoolHarness, tmp_path: Path, nodes: list[str], instances: int) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n172.30.0.5 ollama-box\n")
    config = LocalityConfig(calibration_file=None, nameservers=(("127.0.0.1", 9),),
                            hosts_file=hosts, dns_timeout=0.3)
    topology = NodeTopology(config, local_machine=LocalMachine(probe=_ContainerHost()))
    named = topology.describe("http://ollama-box:11434")
    assert (named.source, named.is_local, named.instance_host) == ("hosts-file", True, "172.30.0.5")

    pool = harness.make(LocalityAwarePool, list(nodes), topology=topology)
    plan = ExecutionPlanner(topology, config=config).plan(3, nodes)

    assert len(pool.nodes) == instances  # the pool's start-up de-duplication
    assert len({topology.describe(n).instance for n in nodes}) == instances
    assert ("aliases of one instance" in plan.reason) is (instances == 1)  # the planner's
    assert plan.shared_host == "localhost"
