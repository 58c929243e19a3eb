"""``sollol_locality.install()`` / ``uninstall()`` against the real SOLLOL classes.

Real pools come from the harness of ``test_pool.py`` (no network scan, no Dask, no thread left
running, nothing sent off this machine, no DNS query); see that module's docstring.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

sollol_pool = pytest.importorskip("sollol.pool")
sollol_integration = pytest.importorskip("sollol.integration")
OllamaPool = sollol_pool.OllamaPool
SOLLOLLoadBalancer = sollol_integration.SOLLOLLoadBalancer

from test_pool import (  # noqa: E402 - the harness test_pool documents
    REMOTE_A,
    REMOTE_B,
    REPO_ROOT,
    NetworkGuard,
    PoolHarness,
    locality_config_for,
    own_lan_address,
    run_harness,
)

from sollol_locality import ExecutionPlanner, LocalityConfig, LocalityError  # noqa: E402
from sollol_locality._install import (  # noqa: E402
    TESTED_SOLLOL_VERSIONS,
    Installation,
    install,
    is_installed,
    uninstall,
)
from sollol_locality.balancer import LocalityAwareLoadBalancer  # noqa: E402
from sollol_locality.pool import LocalityAwarePoolMixin  # noqa: E402
from sollol_locality.testing.dnsserver import DnsTestServer  # noqa: E402

POOL_METHODS = ("count_unique_physical_hosts", "should_use_parallel_execution",
                "_normalize_node", "_deduplicate_nodes")
BALANCER_METHODS = ("should_use_parallel", "suggest_execution_mode")
SOLLOL_VERSION = importlib.metadata.version("sollol")


@pytest.fixture
def network_guard(monkeypatch: pytest.MonkeyPatch) -> NetworkGuard:
    """Nothing leaves this machine, no DNS query (see test_pool.NetworkGuard)."""
    return NetworkGuard(monkeypatch)


@pytest.fixture
def harness(dns_server: DnsTestServer, network_guard: NetworkGuard,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[PoolHarness]:
    """Real pools, stopped afterwards with no thread left (see test_pool.PoolHarness)."""
    yield from run_harness(monkeypatch, stub_network=True)


@pytest.fixture
def config(dns_server: DnsTestServer) -> LocalityConfig:
    """No calibration file; DNS only to the loopback test server."""
    return locality_config_for(dns_server)


def _originals() -> dict[tuple[type, str], Any]:
    return {**{(OllamaPool, n): OllamaPool.__dict__[n] for n in POOL_METHODS},
            **{(SOLLOLLoadBalancer, n): SOLLOLLoadBalancer.__dict__[n] for n in BALANCER_METHODS}}


ORIGINALS = _originals()  # taken at import, before any test could install


def _restored() -> bool:
    return all(cls.__dict__.get(name) is original for (cls, name), original in ORIGINALS.items())


@pytest.fixture(autouse=True)
def _never_left_installed() -> Iterator[None]:
    assert _restored() and not is_installed()
    yield
    uninstall()
    assert _restored(), "a test left SOLLOL patched"


class Node:
    """SOLLOL's NodeProtocol: ``.url``, ``.is_healthy``, ``calculate_load_score()``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_healthy = True

    def calculate_load_score(self) -> float:
        return 0.0


class Registry:
    """SOLLOL's NodeRegistryProtocol over a fixed list."""

    def __init__(self, urls: list[str]) -> None:
        self.nodes = [Node(url) for url in urls]

    def get_healthy_nodes(self) -> list[Node]:
        return list(self.nodes)

    def get_gpu_nodes(self) -> list[Node]:
        return []


# -- opt-in, round trip, idempotence, context manager -----------------------------------------


def test_importing_does_not_patch_anything() -> None:
    code = ("import sollol_locality, sollol_locality._install as i, sollol_locality.pool\n"
            "import sollol.pool, sollol.integration\n"
            "assert not i.is_installed()\n"
            "pool = sollol.pool.OllamaPool\n"
            "assert pool.count_unique_physical_hosts.__module__ == 'sollol.pool'\n"
            "assert sollol.integration.SOLLOLLoadBalancer.should_use_parallel.__module__ == "
            "'sollol.integration'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                          check=False)
    assert done.returncode == 0, done.stderr


def test_round_trip_restores_the_originals_by_identity(config: LocalityConfig) -> None:
    handle = install(config)
    assert isinstance(handle, Installation) and handle.active and is_installed()
    for name in POOL_METHODS:
        assert OllamaPool.__dict__[name] is LocalityAwarePoolMixin.__dict__[name]
    for name in BALANCER_METHODS:
        assert SOLLOLLoadBalancer.__dict__[name] is not ORIGINALS[(SOLLOLLoadBalancer, name)]
    assert handle.sollol_version == SOLLOL_VERSION

    assert uninstall() is True
    assert _restored() and not is_installed() and not handle.active
    assert uninstall() is False  # idempotent


def test_install_is_idempotent(config: LocalityConfig, caplog: pytest.LogCaptureFixture) -> None:
    first = install(config)
    patched = {name: OllamaPool.__dict__[name] for name in POOL_METHODS}
    caplog.set_level(logging.WARNING, logger="sollol_locality")
    second = install()
    assert second.active and second.planner is first.planner
    assert {name: OllamaPool.__dict__[name] for name in POOL_METHODS} == patched
    assert caplog.records == []
    install(config)  # a configuration given again is not silently swapped in
    assert [r.getMessage() for r in caplog.records] == [
        "sollol_locality is already installed; its configuration stays in force (call "
        "uninstall() first to change it)"]
    uninstall()  # one uninstall undoes it all
    assert _restored()


def test_install_shares_a_given_planner(config: LocalityConfig) -> None:
    planner = ExecutionPlanner(config=config)
    assert install(planner=planner).planner is planner


def test_context_manager_restores_the_state_it_found(config: LocalityConfig) -> None:
    with install(config) as handle:
        assert handle.active and is_installed()
    assert _restored()

    with pytest.raises(RuntimeError, match="boom"), install(config):
        assert is_installed()
        raise RuntimeError("boom")
    assert _restored()

    outer = install(config)
    with install() as inner:  # already installed: the block leaves it installed
        assert inner.active
    assert outer.active and is_installed()
    outer.uninstall()
    assert _restored()


def test_a_handle_does_not_undo_a_later_installation(config: LocalityConfig) -> None:
    old = install(config)
    uninstall()
    new = install(config)
    assert old.uninstall() is False
    with old:
        pass
    assert new.active and is_installed()


def test_install_and_uninstall_from_many_threads(harness: PoolHarness,
                                                 config: LocalityConfig) -> None:
    """Eight threads install and uninstall (directly and as a context manager) while two more
    keep asking an existing pool; every answer is upstream's or ours, nothing raises, and the
    originals are back by identity at the end."""
    pool = harness.make(OllamaPool, ["http://127.0.0.1:11434", "http://0.0.0.0:11435"])
    rounds, errors, answers = 40, [], set()
    start = threading.Barrier(10)
    done = threading.Event()

    def churn(index: int) -> None:
        try:
            start.wait()
            for turn in range(rounds):
                if (index + turn) % 3 == 0:
                    with install(config):
                        pass
                elif (index + turn) % 3 == 1:
                    install(config)
                else:
                    uninstall()
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    def ask() -> None:
        try:
            start.wait()
            while not done.is_set():
                answers.add(pool.count_unique_physical_hosts())
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    churners = [threading.Thread(target=churn, args=(i,)) for i in range(8)]
    askers = [threading.Thread(target=ask) for _ in range(2)]
    for thread in churners + askers:
        thread.start()
    for thread in churners:
        thread.join()
    done.set()
    for thread in askers:
        thread.join()

    assert errors == []
    assert answers <= {1, 2}  # ours (one machine) or upstream's (two)
    uninstall()
    assert _restored() and not is_installed()


# -- what patched objects answer ---------------------------------------------------------------


def test_existing_pool_instances_change_and_change_back(harness: PoolHarness,
                                                        config: LocalityConfig) -> None:
    pool = harness.make(OllamaPool, ["http://127.0.0.1:11434", "http://0.0.0.0:11435"])
    assert pool.count_unique_physical_hosts() == 2  # upstream's wrong answer
    assert pool.should_use_parallel_execution(3) is True

    with install(config):
        assert pool.count_unique_physical_hosts() == 1
        assert pool.should_use_parallel_execution(3) is False

    assert pool.count_unique_physical_hosts() == 2


def test_pools_built_while_installed_keep_one_machines_instances(harness: PoolHarness,
                                                                 config: LocalityConfig) -> None:
    lan = own_lan_address()
    nodes = ["http://localhost:11435", f"http://{lan}:11434", "http://[::1]:11435", "::1"]
    with install(config):
        pool = harness.make(OllamaPool, nodes)
    assert pool.nodes == [{"host": "localhost", "port": "11435"},
                          {"host": lan, "port": "11434"}]


def test_a_plain_pool_and_locality_aware_pool_agree(harness: PoolHarness,
                                                    config: LocalityConfig) -> None:
    nodes = ["http://localhost:11434", f"http://{REMOTE_A}:11434", f"http://{REMOTE_B}:11434"]
    from sollol_locality.pool import LocalityAwarePool

    with install(config) as handle:
        plain = harness.make(OllamaPool, nodes)
        aware = harness.make(LocalityAwarePool, nodes, planner=handle.planner)
        for tasks in (1, 2, 3, 5):
            assert (plain.should_use_parallel_execution(tasks)
                    == aware.should_use_parallel_execution(tasks))
        assert plain.count_unique_physical_hosts() == aware.count_unique_physical_hosts() == 3


BALANCER_CASES = [
    # (nodes, upstream should_use_parallel, upstream suggest_execution_mode)
    (["http://localhost:11434", "http://localhost:11435"], True, "parallel"),
    (["http://127.0.0.1:11434", "http://0.0.0.0:11435", "http://[::1]:11436"], True,
     "parallel_multi_node"),
    ([f"http://{REMOTE_A}:11434", f"http://{REMOTE_B}:11434"], True, "parallel"),
    ([f"http://{REMOTE_A}:11434", f"http://{REMOTE_B}:11434", "http://localhost:11434"], True,
     "parallel_multi_node"),
    (["http://localhost:11434"], False, "sequential"),
]


@pytest.mark.parametrize(("urls", "upstream_parallel", "upstream_mode"), BALANCER_CASES)
def test_patched_balancer_answers_as_locality_aware_load_balancer(
        config: LocalityConfig, urls: list[str], upstream_parallel: bool,
        upstream_mode: str) -> None:
    registry = Registry(urls)
    balancer = SOLLOLLoadBalancer(registry)
    assert balancer.should_use_parallel() is upstream_parallel
    assert balancer.suggest_execution_mode() == upstream_mode

    with install(config) as handle:
        reference = LocalityAwareLoadBalancer(registry, planner=handle.planner)
        assert balancer.should_use_parallel() is reference.should_use_parallel()
        assert balancer.suggest_execution_mode() == reference.suggest_execution_mode()
        for tasks in (1, 2, 4):
            assert balancer.should_use_parallel(tasks) is reference.should_use_parallel(tasks)
            assert (balancer.suggest_execution_mode(tasks)
                    == reference.suggest_execution_mode(tasks))
        # and the reference's own (subclass) methods are untouched by the patch
        assert type(reference).should_use_parallel is LocalityAwareLoadBalancer.should_use_parallel

    assert balancer.should_use_parallel() is upstream_parallel


def test_same_machine_balancer_is_now_sequential(config: LocalityConfig,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    balancer = SOLLOLLoadBalancer(Registry(["http://localhost:11434", "http://localhost:11435"]))
    caplog.set_level(logging.INFO, logger="sollol_locality")
    with install(config):
        assert balancer.should_use_parallel() is False
        assert balancer.suggest_execution_mode(3) == "sequential"
    assert any(r.getMessage().startswith("parallel execution refused: 2 nodes share one "
                                         "machine (localhost)") for r in caplog.records)


def test_a_patched_method_kept_after_uninstall_still_answers(
        monkeypatch: pytest.MonkeyPatch, harness: PoolHarness, config: LocalityConfig,
        dns_server: DnsTestServer) -> None:
    monkeypatch.setenv("SOLLOL_LOCALITY_CALIBRATION", "none")
    monkeypatch.setenv("SOLLOL_LOCALITY_NAMESERVERS", dns_server.nameserver)
    pool = harness.make(OllamaPool, ["http://127.0.0.1:11434", "http://0.0.0.0:11435"])
    with install(config):
        bound = pool.count_unique_physical_hosts
    assert bound() == 1  # decided with a default state, not a stale or closed one


# -- an incompatible SOLLOL is refused at install() time -----------------------------------------


def _expected_error(*problems: str) -> str:
    return (f"SOLLOL {SOLLOL_VERSION} is not compatible with sollol_locality.install(): "
            + "; ".join(problems)
            + f" (tested with SOLLOL {', '.join(TESTED_SOLLOL_VERSIONS)}). Nothing was patched; "
            "use LocalityAwarePool / LocalityAwareLoadBalancer or the ExecutionPlanner directly.")


def test_a_missing_method_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(OllamaPool, "should_use_parallel_execution")
    with pytest.raises(LocalityError) as caught:
        install()
    assert str(caught.value) == _expected_error(
        "sollol.pool.OllamaPool has no method should_use_parallel_execution()")
    assert not is_installed()
    assert OllamaPool.__dict__["count_unique_physical_hosts"] is ORIGINALS[
        (OllamaPool, "count_unique_physical_hosts")]  # nothing patched


def test_an_unexpected_signature_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def should_use_parallel(self: Any, mode: str, extra: int = 0) -> bool:
        return False

    monkeypatch.setattr(SOLLOLLoadBalancer, "should_use_parallel", should_use_parallel)
    with pytest.raises(LocalityError) as caught:
        install()
    assert str(caught.value) == _expected_error(
        "sollol.integration.SOLLOLLoadBalancer.should_use_parallel(self: 'Any', mode: 'str', "
        "extra: 'int' = 0) -> 'bool' has an unexpected signature (expected (self))")
    assert not is_installed() and OllamaPool.__dict__["_normalize_node"] is ORIGINALS[
        (OllamaPool, "_normalize_node")]


def test_a_foreign_pool_class_is_checked_method_by_method(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class FakePool:
        """A SOLLOL pool that renamed one decision and made the other a property."""

        def count_physical_hosts(self) -> int:
            return 1

        @property
        def should_use_parallel_execution(self) -> bool:
            return True

    monkeypatch.setattr(sollol_pool, "OllamaPool", FakePool)
    with pytest.raises(LocalityError) as caught:
        install()
    assert str(caught.value) == _expected_error(
        "sollol.pool.OllamaPool has no method count_unique_physical_hosts()",
        "sollol.pool.OllamaPool.should_use_parallel_execution is a property, expected a plain "
        "method")


def test_a_missing_private_start_up_step_is_skipped(monkeypatch: pytest.MonkeyPatch,
                                                    config: LocalityConfig,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    class LeanPool:
        """A SOLLOL pool with the two decisions but no _normalize_node/_deduplicate_nodes."""

        def count_unique_physical_hosts(self) -> int:
            return 2

        def should_use_parallel_execution(self, num_tasks: int) -> bool:
            return True

    originals = dict(LeanPool.__dict__)
    monkeypatch.setattr(sollol_pool, "OllamaPool", LeanPool)
    caplog.set_level(logging.INFO, logger="sollol_locality._install")
    with install(config):
        assert "_normalize_node" not in LeanPool.__dict__
        assert LeanPool.__dict__["count_unique_physical_hosts"] is LocalityAwarePoolMixin.__dict__[
            "count_unique_physical_hosts"]
    assert all(LeanPool.__dict__.get(k) is v for k, v in originals.items())
    assert "sollol.pool.OllamaPool has no _normalize_node(); that start-up step is not patched" in [
        r.getMessage() for r in caplog.records]


def test_an_inherited_method_is_restored_by_removing_the_patch(
        monkeypatch: pytest.MonkeyPatch, config: LocalityConfig) -> None:
    class Base:
        def should_use_parallel(self) -> bool:
            return True

        def suggest_execution_mode(self) -> str:
            return "parallel"

    class Balancer(Base):
        pass

    monkeypatch.setattr(sollol_integration, "SOLLOLLoadBalancer", Balancer)
    with install(config):
        assert "should_use_parallel" in Balancer.__dict__
    assert "should_use_parallel" not in Balancer.__dict__
    assert Balancer.should_use_parallel is Base.should_use_parallel


def test_sollol_that_cannot_be_imported_is_a_clear_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sollol.integration", None)
    with pytest.raises(LocalityError, match=r"^sollol_locality.install\(\) cannot import "
                                            r"sollol.integration \(SOLLOL 0\.9\.66\)"):
        install()
    assert not is_installed()


def test_the_tested_version_is_the_installed_one() -> None:
    import sollol

    assert sollol.__version__ == SOLLOL_VERSION
    assert SOLLOL_VERSION in TESTED_SOLLOL_VERSIONS


def test_one_shared_decider_for_every_patched_object(harness: PoolHarness,
                                                     config: LocalityConfig) -> None:
    from sollol_locality.decider import INSTALLED_KEY, Decider

    pool = harness.make(OllamaPool, ["http://localhost:11434", "http://localhost:11435"])
    balancer = SOLLOLLoadBalancer(Registry(["http://localhost:11434", "http://localhost:11435"]))
    with install(config) as handle:
        assert isinstance(handle.decider, Decider) and handle.planner is handle.decider.planner
        assert OllamaPool.__dict__[INSTALLED_KEY] is handle.decider
        assert SOLLOLLoadBalancer.__dict__[INSTALLED_KEY] is handle.decider
        assert pool.should_use_parallel_execution(3) is False
        assert balancer.should_use_parallel() is False
        # One log memory: the balancer's identical decision after the pool's is not logged again.
        assert len(handle.decider._last_logged) == 1
    assert INSTALLED_KEY not in OllamaPool.__dict__
    assert INSTALLED_KEY not in SOLLOLLoadBalancer.__dict__
