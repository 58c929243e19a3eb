"""Nothing lost: the calibration file is replaced atomically, a corrupt one is reported and set
aside while decisions go on with priors, and a broken topology edit names its file and line and
leaves the previous topology in force. The library never writes topology files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeClock, gpu_node, offline_config, offline_topology

from sollol_locality import (
    CalibrationError,
    ExecutionPlanner,
    NodeTopology,
    ParallelismCostModel,
)
from sollol_locality.testing.cases import CALIBRATION_WRITER

REPO = Path(__file__).resolve().parent.parent


def calibrated_model(observations: int = 3, units: int = 2) -> ParallelismCostModel:
    model = ParallelismCostModel(offline_config())
    topology = offline_topology()
    for i in range(observations):
        for u in range(units):
            model.observe("sequential", [f"http://10.{u // 250}.{u % 250}.1:11434"], 2,
                          2.0 + i + u / 1000, topology=topology)
    return model


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# -- atomic save --------------------------------------------------------------------------------


@pytest.mark.parametrize("failing", ["replace", "fsync", "write"])
def test_a_failed_save_leaves_the_previous_file_intact(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       failing: str) -> None:
    path = tmp_path / "calibration.json"
    calibrated_model(1).save(path)
    before = path.read_bytes()
    newer = calibrated_model(5)

    def no_space(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "write":
        real_fdopen = os.fdopen

        def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
            handle = real_fdopen(fd, *args, **kwargs)
            handle.write = no_space  # type: ignore[method-assign]
            return handle

        monkeypatch.setattr(os, "fdopen", fdopen)
    else:
        monkeypatch.setattr(os, failing, no_space)
    with pytest.raises(OSError, match="No space left"):
        newer.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []  # the temporary file is removed
    fresh = ParallelismCostModel(offline_config())
    fresh.load(path)
    assert fresh.observations == 2


def _writer(path: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CALIBRATION_WRITER, str(path), mode],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})


def _kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    for stream in (child.stdin, child.stdout):
        if stream is not None:
            stream.close()


def test_a_kill_between_writing_and_renaming_leaves_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    child = _writer(path, "stop-after-fsync")
    assert child.stdout is not None
    assert child.stdout.readline() == "saved 1\n"
    previous = path.read_bytes()
    assert child.stdout.readline() == "synced\n"  # the save of version 2 is under way
    [temporary] = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert json.loads(temporary.read_text())["observations"] == 2
    _kill(child)
    assert path.read_bytes() == previous  # the crash lost the new save, never the old file
    model = ParallelismCostModel(offline_config())
    model.load(path)
    assert model.observations == 1


def test_kills_at_random_moments_never_leave_a_torn_file(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    rng = random.Random(5)
    for _ in range(3):
        child = _writer(path, "loop")
        assert child.stdout is not None
        for _ in range(rng.randint(1, 4)):  # a few saves complete, then a kill mid-loop
            assert child.stdout.readline().startswith("saved")
        _kill(child)
        model = ParallelismCostModel(offline_config())
        model.load(path)  # a complete calibration file, never a torn one
        assert model.observations in (1, 2)


# -- a corrupt calibration file -----------------------------------------------------------------

_VALID = calibrated_model(3).to_dict()


def _with(**changes: Any) -> str:
    return json.dumps({**_VALID, **changes})


CORRUPT = {
    "truncated": json.dumps(_VALID, indent=2)[: len(json.dumps(_VALID, indent=2)) // 2],
    "binary": bytes(range(256)) * 4,
    "empty": "",
    "null": "null",
    "other-format": '{"format": "something-else"}',
    "nested-too-deep": "[" * 100_000 + "]" * 100_000,
    "negative-task-time": _with(task_seconds={"localhost/cpu": [-1.0]}),
    "not-a-number": _with(dispatch_overhead=["fast"]),
    "nan": _with(host_overhead={"localhost": [float("nan")]}),
    "zero-gpu-speed-prior": _with(priors={"gpu_speed_factor": 0}),
    "negative-host-overhead": _with(host_overhead={"localhost": [-0.5]}),
    "impossible-contention": _with(contention={"localhost/cpu": {"2": [-5.0]}}),
    "one-stream-contention": _with(contention={"localhost/cpu": {"1": [0.5]}}),
    "contention-not-a-table": _with(contention={"localhost/cpu": [0.5]}),
}

DECISIONS = [
    ["http://localhost:11434", "http://localhost:11435"],
    ["http://10.0.0.1:11434", "http://10.0.0.2:11434", "http://localhost:11434"],
    [gpu_node("http://localhost:11434", "0"), gpu_node("http://localhost:11435", "1")],
    [gpu_node("http://10.0.0.1:11434"), "http://10.0.0.2:11434"],
]


def decisions(model: ParallelismCostModel) -> list[tuple[str, float, int]]:
    planner = ExecutionPlanner(offline_topology(), model, offline_config())
    return [(p.mode, round(p.speedup, 9), len(p.nodes))
            for p in (planner.plan(4, nodes) for nodes in DECISIONS)]


PRIOR_DECISIONS = decisions(ParallelismCostModel(offline_config()))


@pytest.mark.parametrize("content", list(CORRUPT.values()), ids=list(CORRUPT))
def test_a_corrupt_calibration_file_is_left_alone_and_priors_decide(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str | bytes) -> None:
    # Round 1 renamed a corrupt file aside; a read must never change the file (issue 14,
    # point 3), so it now stays byte for byte where it is and the priors decide.
    path = tmp_path / "calibration.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    original = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="sollol_locality"):
        model = ParallelismCostModel(offline_config(calibration_file=path))
        assert list(caplog.records) == []  # nothing is read in the constructor
        assert not model.calibrated
        assert decisions(model) == PRIOR_DECISIONS
    assert path.read_bytes() == original and list(tmp_path.iterdir()) == [path]
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "calibration_corrupt"]
    assert str(path) in record.getMessage() and "deciding with priors" in record.getMessage()
    assert record.levelno == logging.WARNING
    with pytest.raises(CalibrationError, match=re.escape(str(path))):
        ParallelismCostModel(offline_config()).load(path)


def test_when_it_cannot_be_renamed_the_corrupt_file_stays_and_decisions_go_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(CORRUPT["truncated"])

    def refuse(*args: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with caplog.at_level(logging.WARNING, logger="sollol_locality"):
        model = ParallelismCostModel(offline_config(calibration_file=path))
    assert path.read_text() == CORRUPT["truncated"]
    assert decisions(model) == PRIOR_DECISIONS
    assert "deciding with priors" in caplog.text


def test_a_good_calibration_file_is_used_not_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    calibrated_model(3).save(path)
    model = ParallelismCostModel(offline_config(calibration_file=path))
    assert model.calibrated and model.observations == 6
    assert path.exists() and list(tmp_path.iterdir()) == [path]


# -- the topology file ----------------------------------------------------------------------------

GOOD = """\
[hosts.gpu-box-1]
aliases = ["10.0.0.5", "gpu-box-1.lan"]
zone = "rack-1"
"""
RENAMED = GOOD.replace("gpu-box-1]", "renamed]")

BROKEN: dict[str, tuple[str | bytes | None, int | None, str]] = {
    # name: (content, or None to delete the file; the line named; part of the reason)
    "toml-syntax": ('[hosts.gpu-box-1]\naliases = ["10.0.0.5"]\nzone = \n', 3,
                    "not valid TOML"),
    "unclosed-array": ('[hosts.gpu-box-1]\naliases = ["10.0.0.5"\n', 2, "not valid TOML"),
    "unknown-key": ('[hosts.gpu-box-1]\nbogus = 1\n', 2, "unknown key 'bogus'"),
    "aliases-not-a-list": ('[hosts.gpu-box-1]\naliases = 5\n', 2, "'aliases' must be a list"),
    "bad-alias": ('\n[hosts.gpu-box-1]\naliases = ["10.0.0.5", "bad host"]\n', 3,
                  "invalid alias 'bad host'"),
    "bad-node-url": ('\n\n[nodes."http://10.0.0.5:x"]\nhost = "gpu-box-1"\n', 3,
                     "invalid port 'x'"),
    "unknown-table": ('[clusters.a]\nx = 1\n', 1, "unknown table 'clusters'"),
    "not-utf8": (b'[hosts.gpu-box-1]\naliases = ["\xff"]\n', None, "is not UTF-8 text"),
    "deleted": (None, None, "cannot be read"),
}



def _rewrite(path: Path, content: str | bytes | None) -> None:
    """Replace the file's content with a strictly newer mtime (coarse file system clocks)."""
    previous = path.stat().st_mtime_ns if path.exists() else 0
    if content is None:
        path.unlink()
        return
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    stamp = max(path.stat().st_mtime_ns, previous + 1_000_000_000)
    os.utime(path, ns=(stamp, stamp))


def _digest(directory: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_a_broken_topology_edit_names_file_and_line_and_keeps_the_previous(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str) -> None:
    content, line, reason = BROKEN[case]
    path = tmp_path / "topology.toml"
    path.write_text(GOOD)
    clock = FakeClock()
    topology = NodeTopology(offline_config(topology_file=path), clock=clock)
    planner = ExecutionPlanner(topology, ParallelismCostModel(offline_config()),
                               offline_config(), clock=clock)
    assert topology.get_physical_host_id("10.0.0.5") == "gpu-box-1"

    _rewrite(path, content)
    clock.now += 5
    with caplog.at_level(logging.INFO, logger="sollol_locality"):
        assert topology.get_physical_host_id("10.0.0.5") == "gpu-box-1"  # previous in force
        assert topology.describe("gpu-box-1.lan").locality_group == "rack-1"
        plan = planner.plan(2, ["http://10.0.0.5:11434", "http://gpu-box-1.lan:11435"])
        assert plan.unique_hosts == 1 and plan.mode == "sequential"
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    where = f"{path}, line {line}:" if line is not None else f"{path}:"
    assert f"Invalid topology file {where}" in error.getMessage()
    assert reason in error.getMessage()
    assert "keeping the previous topology in force" in error.getMessage()
    assert getattr(error, "event", None) == "topology_file_invalid"

    clock.now += 5  # asked again: the broken file is not re-read or re-reported
    topology.get_physical_host_id("10.0.0.5")
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1

    if path.exists():
        path.unlink()
    path.write_text(RENAMED)  # a good edit is picked up
    _rewrite(path, RENAMED)
    clock.now += 5
    assert topology.get_physical_host_id("10.0.0.5") == "renamed"


def test_the_library_never_writes_the_topology_file(tmp_path: Path) -> None:
    path = tmp_path / "topology.toml"
    path.write_text(GOOD)
    before = _digest(tmp_path)
    clock = FakeClock()
    config = offline_config(topology_file=path)
    topology = NodeTopology(config, clock=clock)
    planner = ExecutionPlanner(topology, ParallelismCostModel(config), config, clock=clock)
    for step in range(20):
        clock.now += 3
        planner.plan(3, ["http://10.0.0.5:11434", "http://gpu-box-1.lan:11435",
                         f"http://10.0.1.{step}:11434", "localhost"])
        topology.count_unique_hosts(["10.0.0.5", "gpu-box-1.lan"])
    assert _digest(tmp_path) == before  # same bytes, same mtime, no new file beside it
