"""calibration: the store of what was learned, and its file."""

from __future__ import annotations

import json
import re
import threading

import pytest
from helpers import offline_config, offline_topology

from sollol_locality import CalibrationError, ParallelismCostModel, calibration
from sollol_locality.calibration import Calibration
from sollol_locality.colocation import ColocationFacts, PairFact
from sollol_locality.topology import ExecutionUnit


def test_round_trip_keeps_every_table(tmp_path):
    cal = Calibration()
    cal.push(cal.task_seconds, "h/cpu", 2.0)
    cal.push_k(cal.contention, "h/cpu", 2, 0.5)
    cal.push(cal.host_overhead, "h", 0.1)
    cal.dispatch.append(0.02)
    cal.push_k(cal.batching, "h:11434", 4, 1.6)
    cal.colocation = ColocationFacts.of([PairFact("a:1", "b:1", True, 1.9, 1.7e9, "calibrate")])
    cal.observations = 7
    path = calibration.write(tmp_path / "c.json", cal, {"cpu_contention": 0.8})
    back = calibration.read(path)
    assert calibration.to_dict(back) == calibration.to_dict(cal, {"cpu_contention": 0.8})
    assert back.batching == {"h:11434": {4: calibration.samples([1.6])}}
    assert back.priors == {"cpu_contention": 0.8} and back.observations == 7
    assert back.colocation == cal.colocation
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "is not valid JSON (line 1)"),
        ('{"format": "other"}', "is not a sollol-locality calibration file"),
        ('{"format": "sollol-locality-calibration", "batching": {"h:1": {"0": [1]}}}',
         "batching['h:1'] stream counts must be at least 1"),
        ('{"format": "sollol-locality-calibration", "colocation": []}',
         "colocation is []: expected an object"),
        ('{"format": "sollol-locality-calibration", "colocation": {"version": 1, "pairs": '
         '[{"a": "b:1", "b": "a:1", "colocated": true, "strength": 2, "measured_at": 1, '
         '"source": "calibrate", "runs": 1}]}}',
         "colocation.pairs[0].b is 'a:1': expected a key sorting after a = 'b:1'"),
        ('{"format": "sollol-locality-calibration", "priors": {"gpu_speed_factor": 0}}',
         "prior gpu_speed_factor = 0 is out of range (expected more than 0)"),
    ],
)
def test_a_bad_file_names_itself_and_the_reason_and_is_not_touched(tmp_path, content, reason):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(CalibrationError, match=re.escape(str(path)) + ".*" + re.escape(reason)):
        calibration.read(path)
    assert path.read_text() == content


def test_the_configured_file_is_read_on_first_use_not_in_the_constructor(tmp_path):
    path = tmp_path / "c.json"
    model = ParallelismCostModel(offline_config(calibration_file=path))
    source = ParallelismCostModel(offline_config())
    source.observe("sequential", ["localhost"], 1, 2.5, topology=offline_topology())
    source.save(path)  # written after the constructor ran: only a lazy read can see it
    assert model.measured_task_seconds(ExecutionUnit("localhost")) == pytest.approx(2.5)


def test_the_round_one_file_is_read_while_the_new_one_does_not_exist(tmp_path):
    new, old = tmp_path / "state" / "c.json", tmp_path / "cache" / "c.json"
    source = ParallelismCostModel(offline_config())
    source.observe("sequential", ["localhost"], 1, 3.0, topology=offline_topology())
    source.save(old)
    before = old.read_bytes()
    model = ParallelismCostModel(offline_config(calibration_file=new, calibration_fallback=old))
    assert model.measured_task_seconds(ExecutionUnit("localhost")) == pytest.approx(3.0)
    assert model.save() == new and json.loads(new.read_text())["task_seconds"]
    assert old.read_bytes() == before  # the old file is read, never written


def test_concurrent_writers_never_leave_a_torn_file(tmp_path):
    path = tmp_path / "c.json"
    cals = []
    for value in range(8):
        cal = Calibration()
        for unit in range(200):
            cal.push(cal.task_seconds, f"h{unit}/cpu", value + 1.0)
        cals.append(cal)
    threads = [threading.Thread(target=calibration.write, args=(path, c)) for c in cals]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    values = {v[0] for v in json.loads(path.read_text())["task_seconds"].values()}
    assert len(values) == 1  # one writer's file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_a_file_without_colocation_reads_as_nothing_measured(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"format": "sollol-locality-calibration"}')
    assert calibration.read(path).colocation == ColocationFacts()


def test_saving_merges_the_colocation_another_process_saved_meanwhile(tmp_path):
    path = tmp_path / "c.json"
    old = PairFact("a:1", "b:1", True, 1.9, 1000.0, "calibrate")
    mine, theirs = Calibration(), Calibration()
    mine.colocation = ColocationFacts.of([old])
    # the other process measured the same pair later (independent) and another pair
    theirs.colocation = ColocationFacts.of([
        PairFact("a:1", "b:1", False, 1.02, 2000.0, "recorded"),
        PairFact("c:1", "d:1", True, 2.0, 1500.0, "calibrate")])
    calibration.write(path, theirs)
    calibration.write(path, mine)  # saved last, knowing less
    saved = calibration.read(path).colocation
    assert saved == theirs.colocation.merge(mine.colocation)
    assert saved.fact("a:1", "b:1") == theirs.colocation.fact("a:1", "b:1")  # the newer wins
    assert saved.groups() == (frozenset({"c:1", "d:1"}),)
    assert mine.colocation == ColocationFacts.of([old])  # the object saved is not changed
