"""Shared fixtures. Each block is self-contained; append new fixtures below."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sollol_locality.testing.dnsserver import DnsTestServer

# -- DNS: loopback test servers (tests never send a packet off this machine) ----------------------


@pytest.fixture
def make_dns_server() -> Iterator[Callable[..., DnsTestServer]]:
    """A factory of started loopback DNS servers: ``make_dns_server(zones, host=..., ...)``.

    Every server made is stopped (thread joined, sockets closed) after the test.
    """
    servers: list[DnsTestServer] = []

    def make(zones: dict[str, Any] | None = None, **options: Any) -> DnsTestServer:
        server = DnsTestServer(zones, **options).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
    errors = [error for server in servers for error in server.errors]
    assert not errors, f"the DNS test server failed: {errors!r}"


@pytest.fixture
def dns_server(make_dns_server: Callable[..., DnsTestServer]) -> DnsTestServer:
    """A started loopback DNS server with no zones yet (``dns_server.set_zones({...})``)."""
    return make_dns_server()


# -- timing tests run alone, under pytest-xdist too ------------------------------------------------
# The suite runs on pytest-xdist workers (``-n`` in pyproject.toml's addopts). A test marked
# ``timing`` compares times measured on this machine (makespans, calibration, co-location
# slowdowns): another worker's test beside it would be measured too. So every test holds a lock
# from its setup to its teardown, a timing test exclusively and any other test shared; a worker
# holds it shared from its start until it has collected (imports are CPU too). While a timing test
# runs, no other test of the run does (the other workers wait between two tests), and a timing
# test waits for the tests already running to end. The timing tests are ordered first and keep the
# lock from one to the next, so they run as one block at the start. Without xdist (``-n 0``)
# nothing changes: no lock, the usual order.

_LOCK_DIR = "sollol_locality_lock_dir"  # the key in each worker's workerinput
_lock_dir = pytest.StashKey[Path]()
_run_lock = pytest.StashKey["_RunLock"]()


class _RunLock:
    """A readers-writer lock over two files (flock): ``gate`` keeps new readers out while a writer
    waits for the readers inside to leave, so that a timing test is never starved."""

    def __init__(self, directory: Path) -> None:
        self._gate = os.open(directory / "gate", os.O_RDWR | os.O_CREAT, 0o600)
        self._lock = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        self.exclusive = False  # held exclusively by this worker now

    def acquire(self, exclusive: bool) -> None:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        fcntl.flock(self._gate, mode)
        try:
            fcntl.flock(self._lock, mode)
        finally:
            fcntl.flock(self._gate, fcntl.LOCK_UN)
        self.exclusive = exclusive

    def release(self) -> None:
        self.exclusive = False
        fcntl.flock(self._lock, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._gate)
        os.close(self._lock)


def _compile_the_package() -> None:
    """Write the package's bytecode once, before any test: the emulators, CLIs and fresh
    interpreters the tests start (hundreds) then load it instead of compiling every module
    again. Python still reads bytecode under ``PYTHONDONTWRITEBYTECODE``, which this machine
    sets; it only stops writing it. Stale files are ignored by Python (the source's time is
    checked), so this changes nothing but speed."""
    import compileall

    import sollol_locality

    package = Path(sollol_locality.__file__).parent
    compileall.compile_dir(package, quiet=2, workers=1)


def pytest_configure(config: pytest.Config) -> None:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:  # an xdist worker: the controller made the directory
        if _LOCK_DIR in workerinput:
            lock = config.stash[_run_lock] = _RunLock(Path(workerinput[_LOCK_DIR]))
            lock.acquire(exclusive=False)  # until collected (imports: CPU), as for a test
        return
    _compile_the_package()  # the controller (or a run without xdist): once per run
    if config.pluginmanager.hasplugin("xdist") and config.getoption("numprocesses", None):
        config.stash[_lock_dir] = Path(tempfile.mkdtemp(prefix="sollol-locality-tests-"))


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> Any:
    """A worker's start and collection (imports: CPU) are not beside a timing test either."""
    try:
        return (yield)
    finally:
        lock = session.config.stash.get(_run_lock, None)
        if lock is not None:
            lock.release()  # taken in pytest_configure


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, timing tests first (every worker collects, and orders, the same way): the
    workers take them in turn one after another while nothing else runs, then share the rest."""
    if config.stash.get(_run_lock, None) is not None:
        items.sort(key=lambda item: item.get_closest_marker("timing") is None)  # stable


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist's controller, once per worker it starts: where the lock files are."""
    node.workerinput[_LOCK_DIR] = str(node.config.stash[_lock_dir])


def pytest_unconfigure(config: pytest.Config) -> None:
    lock = config.stash.get(_run_lock, None)
    if lock is not None:
        lock.close()
    directory = config.stash.get(_lock_dir, None)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outside pytest-timeout: waiting is not the test's
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    lock = item.config.stash.get(_run_lock, None)
    if lock is None:
        return (yield)
    timing = item.get_closest_marker("timing") is not None
    if not (timing and lock.exclusive):  # (still held from the timing test before this one)
        lock.acquire(exclusive=timing)
    try:
        return (yield)
    finally:
        # A timing test followed by another keeps the lock: the next one runs at once, instead
        # of after the test another worker would slip in between.
        if not (timing and nextitem is not None and nextitem.get_closest_marker("timing")):
            lock.release()
