"""cost_model: predictions against the proposal's figures, calibration, persistence."""

from __future__ import annotations

import json

import pytest
from helpers import OllamaNode, gpu_node, offline_config, offline_topology, timed_node

from sollol_locality import CalibrationError, CostPriors, ParallelismCostModel
from sollol_locality.topology import ExecutionUnit


@pytest.fixture(scope="module")
def topology():
    return offline_topology()


@pytest.fixture
def model():
    return ParallelismCostModel(offline_config())


# The proposal's measured figures (its "Resource Contention Model"):
# same host, CPU: ~50% slower in parallel; one GPU shared: ~20% slower (0.8x);
# different GPUs of one host: 5-10% overhead; different hosts: near-ideal, minus dispatch.
@pytest.mark.parametrize(
    ("case", "nodes", "low", "high"),
    [
        ("same host, CPU", ["http://localhost:11434", "http://localhost:11435"], 0.45, 0.55),
        ("same host, CPU, LAN+loopback", ["http://127.0.0.1:11434", "http://0.0.0.0:11435"],
         0.45, 0.55),
        ("same GPU", [gpu_node("http://10.0.0.5:11434"), gpu_node("http://10.0.0.5:11435")],
         0.75, 0.85),
        ("different GPUs of one host",
         [gpu_node("http://10.0.0.5:11434", "0"), gpu_node("http://10.0.0.5:11435", "1")],
         2 / 1.10, 2 / 1.05),
        ("different hosts", ["http://10.0.0.5:11434", "http://10.0.0.6:11434"], 1.85, 1.98),
    ],
)
def test_two_tasks_match_the_proposal_figures(model, topology, case, nodes, low, high):
    estimate = model.estimate(2, nodes, topology)
    assert low <= estimate.speedup <= high, (case, estimate)
    assert estimate.speedup == model.estimate_parallel_benefit(2, nodes, topology)


def test_estimate_fields(model, topology):
    estimate = model.estimate(2, ["http://localhost:11434", "http://localhost:11435"], topology)
    assert estimate.sequential_seconds == 2.0
    assert estimate.parallel_seconds == 4.0
    assert estimate.units == ("localhost/cpu",)
    assert estimate.time_unit == "tasks"
    assert estimate.tasks_per_node == (1, 1)
    assert estimate.reason == (
        "2 nodes share one CPU on localhost and contend for it (predicted 0.50x)")


def test_uneven_split_lets_a_lone_stream_speed_back_up(model, topology):
    # 3 tasks on 2 nodes of one CPU: both run one task at half speed (4 units), then the third
    # runs alone (1 unit): 5 units against 3 sequential.
    estimate = model.estimate(3, ["localhost:1", "localhost:2"], topology)
    assert estimate.parallel_seconds == pytest.approx(5.0)
    assert estimate.speedup == pytest.approx(0.6)


def test_aliases_of_one_instance_are_one_stream(model, topology):
    estimate = model.estimate(2, ["http://localhost:11434", "http://127.0.0.1:11434"], topology)
    assert estimate.speedup == pytest.approx(1.0)
    assert estimate.tasks_per_node == (2, 0)


def test_a_much_faster_node_takes_every_task(model, topology):
    nodes = [timed_node("http://10.0.0.5:11434", 1.0), timed_node("http://10.0.0.6:11434", 10.0)]
    estimate = model.estimate(3, nodes, topology)
    assert estimate.time_unit == "seconds"
    assert estimate.tasks_per_node == (3, 0)
    assert estimate.speedup == pytest.approx(1.0)


def test_metrics_need_enough_samples(model, topology):
    young = [timed_node("http://10.0.0.5:11434", 1.0, requests=1),
             timed_node("http://10.0.0.6:11434", 10.0, requests=2)]
    assert model.estimate(2, young, topology).time_unit == "tasks"


@pytest.mark.parametrize(
    "node",
    [
        {"url": "http://10.0.0.5:11434", "latency_ms": 2000, "total_requests": 5},
        OllamaNode("http://10.0.0.5:11434"),
    ],
)
def test_latency_shapes(model, topology, node):
    if isinstance(node, OllamaNode):
        node.metrics.avg_response_time, node.metrics.total_requests = 2.0, 5
    profiles, unit = model.profiles(topology.describe_many([node]))
    assert unit == "seconds" and profiles[0].task_time == pytest.approx(2.0)


def test_sollol_avg_latency_in_milliseconds(model, topology):
    class Node:
        url = "http://10.0.0.5:11434"

        class metrics:  # noqa: N801 - SOLLOL's attribute name
            avg_latency = 1500.0
            total_requests = 9

    profiles, _ = model.profiles(topology.describe_many([Node()]))
    assert profiles[0].task_time == pytest.approx(1.5)


def test_gpu_without_data_is_faster_by_the_prior(topology):
    model = ParallelismCostModel(offline_config(), priors=CostPriors(gpu_speed_factor=5.0))
    profiles, _ = model.profiles(topology.describe_many(
        ["http://10.0.0.5:11434", gpu_node("http://10.0.0.6:11434")]))
    assert [p.task_time for p in profiles] == [1.0, 0.2]


def test_invalid_nodes_are_left_out_of_an_estimate(model, topology):
    estimate = model.estimate(2, ["10.0.0.5", "bad:port", "10.0.0.6"], topology)
    assert estimate.tasks_per_node == (1, 0, 1)
    assert "1 node(s) could not be parsed" in estimate.reason


@pytest.mark.parametrize("tasks", [-1, 1.5, True, "2"])
def test_bad_task_count(model, topology, tasks):
    with pytest.raises(ValueError, match="num_tasks must be a non-negative integer"):
        model.estimate(tasks, ["10.0.0.5"], topology)


# -- calibration ---------------------------------------------------------------------------------


def test_observe_learns_task_time_and_contention(model, topology):
    nodes = ["http://localhost:11434", "http://localhost:11435"]
    for wall in (2.0, 2.1, 1.9, 50.0):  # one outlier
        model.observe("sequential", nodes[:1], 1, wall, topology=topology)
    assert model.measured_task_seconds(ExecutionUnit("localhost")) == pytest.approx(2.05)
    # two streams of one task each took 3 s where one alone takes ~2 s: c = 3 / (2 * 2) - 1
    model.observe("parallel", nodes, 2, 3.0, topology=topology)
    assert model.contention(ExecutionUnit("localhost"), 2) == pytest.approx(3.0 / (2.05 * 2) - 1)
    assert model.observations == 5
    estimate = model.estimate(2, nodes, topology)
    assert estimate.time_unit == "seconds"
    assert estimate.speedup == pytest.approx(4.1 / 3.0)


def test_calibrated_gain_allows_parallel_on_one_unit(model, topology):
    from sollol_locality import ExecutionPlanner

    nodes = ["http://localhost:11434", "http://localhost:11435"]
    model.observe("sequential", nodes[:1], 2, 4.0, topology=topology)
    model.observe("parallel", nodes, 2, 2.5, topology=topology)  # 2 tasks in 2.5 s, not 4
    assert model.gains_from_concurrency(ExecutionUnit("localhost")) == 2
    plan = ExecutionPlanner(topology, model, topology.config).plan(2, nodes)
    assert plan.mode == "parallel"
    assert plan.speedup == pytest.approx(4.0 / 2.5)


def test_observe_rejects_impossible_runs(model, topology):
    with pytest.raises(ValueError, match="mode must be"):
        model.observe("both", ["10.0.0.5"], 1, 1.0, topology=topology)
    with pytest.raises(ValueError, match="wall_seconds must be a positive number"):
        model.observe("sequential", ["10.0.0.5"], 1, 0.0, topology=topology)
    with pytest.raises(ValueError, match="num_tasks must be a positive integer"):
        model.observe("sequential", ["10.0.0.5"], 0, 1.0, topology=topology)


def test_save_and_load_round_trip(model, topology, tmp_path):
    model.observe("sequential", ["localhost"], 2, 3.0, topology=topology)
    path = model.save(tmp_path / "sub" / "cal.json")
    assert json.loads(path.read_text())["format"] == "sollol-locality-calibration"
    assert [p.name for p in path.parent.iterdir()] == ["cal.json"]  # no temporary file left
    other = ParallelismCostModel(offline_config())
    other.load(path)
    assert other.measured_task_seconds(ExecutionUnit("localhost")) == pytest.approx(1.5)
    assert other.observations == 1


def test_calibration_file_from_config_is_used_when_present(model, topology, tmp_path):
    model.observe("sequential", ["localhost"], 1, 2.5, topology=topology)
    path = model.save(tmp_path / "cal.json")
    fresh = ParallelismCostModel(offline_config(calibration_file=path))
    assert fresh.measured_task_seconds(ExecutionUnit("localhost")) == pytest.approx(2.5)


def test_corrupt_calibration_is_left_alone_and_priors_used(tmp_path, caplog):
    # Round 1 renamed it aside; a read never changes the file now (issue 14, point 3).
    path = tmp_path / "cal.json"
    path.write_text("{not json")
    model = ParallelismCostModel(offline_config(calibration_file=path))
    assert not model.calibrated
    assert path.read_text() == "{not json" and list(tmp_path.iterdir()) == [path]
    assert "is not valid JSON" in caplog.text


@pytest.mark.parametrize(
    "content",
    ['{"format": "other"}',
     '{"format": "sollol-locality-calibration", "task_seconds": {"a": [-1]}}',
     '{"format": "sollol-locality-calibration", "contention": {"a": [1]}}', "[]"],
)
def test_load_rejects_malformed_files(tmp_path, content):
    path = tmp_path / "cal.json"
    path.write_text(content)
    with pytest.raises(CalibrationError):
        ParallelismCostModel(offline_config()).load(path)


def test_an_estimate_on_a_batching_node_says_it_batches(model, topology):
    estimate = model.estimate(5, [{"url": "http://10.0.0.5:11434", "num_parallel": 4}],
                              topology)
    assert estimate.speedup == pytest.approx(5 / 3.05)
    assert estimate.tasks_per_node == (5,)
    assert estimate.reason == ("5 tasks at once on http://10.0.0.5:11434, which batches 4: "
                               "predicted 1.64x")


def test_batch_cost_priors_change_the_prediction(topology):
    node = {"url": "http://10.0.0.5:11434", "num_parallel": 4}
    free = ParallelismCostModel(offline_config(), priors=CostPriors(cpu_batch_cost=0.0))
    assert free.estimate(4, [node], topology).speedup == pytest.approx(4.0)
    assert CostPriors().cpu_batch_cost == 0.35 and CostPriors().gpu_batch_cost == 0.15


@pytest.mark.parametrize(("content", "message"), [
    ('{"format": "sollol-locality-calibration", "priors": {"cpu_batch_cost": -0.5}}',
     "prior cpu_batch_cost = -0.5 is out of range (expected at least 0)"),
    ('{"format": "sollol-locality-calibration", "batching": {"h:1": {"0": [1.0]}}}',
     "batching['h:1'] stream counts must be at least 1"),
    ('{"format": "sollol-locality-calibration", "batching": {"h:1": {"2": [-1.0]}}}',
     "batching['h:1']['2'] must be at least 0"),
])
def test_load_rejects_bad_batching_figures(tmp_path, content, message):
    path = tmp_path / "cal.json"
    path.write_text(content)
    with pytest.raises(CalibrationError) as info:
        ParallelismCostModel(offline_config()).load(path)
    assert str(info.value) == f"{path}: {message}"


def test_batching_curves_round_trip_and_a_recalibration_forgets_them(model, topology, tmp_path):
    node = {"url": "http://10.0.0.5:11434", "num_parallel": 4}
    identity = topology.describe(node)
    for k, wall in ((1, 1.0), (2, 1.3), (4, 1.9)):
        model.observe_batching(identity, k, wall)
    path = model.save(tmp_path / "cal.json")
    assert json.loads(path.read_text())["batching"] == {
        "10.0.0.5:11434": {"1": [1.0], "2": [1.3], "4": [1.9]}}
    loaded = ParallelismCostModel(offline_config())
    loaded.load(path)
    assert loaded.measured_batching(identity) == pytest.approx({2: 1.3, 4: 1.9})
    loaded._forget(instances={"10.0.0.5:11434"})
    assert loaded.batching(identity).curve_source == "prior"


# -- learning batching from the per-task times of recorded runs (issue 13) -------------------

BATCHER = {"url": "http://10.0.0.5:11434", "num_parallel": 4}
PLAIN = "http://10.0.0.6:11434"


def _timed(topology, rows):
    """``(node, start, end)`` rows as the cost model takes them."""
    return [(topology.describe(node), start, end) for node, start, end in rows]


def test_a_batch_served_together_while_nothing_else_ran_is_a_point_of_its_curve(model,
                                                                                topology):
    batcher = topology.describe(BATCHER)
    rows = [(BATCHER, 0.0, 1.3), (BATCHER, 0.01, 1.3), (BATCHER, 0.02, 1.31),
            (PLAIN, 1.31, 2.3)]  # the plain node's task ran after the batch
    timings = _timed(topology, rows)
    model.observe("parallel", [t[0].node for t in timings], 4, 2.3,
                  identities=[t[0] for t in timings], timings=timings)
    points = model.calibration.batching[batcher.instance.label]
    assert {k: list(v) for k, v in points.items()} == {3: [pytest.approx(1.31)]}
    # seen only in batches: its time per task is the batch over the prior curve's ratio
    prior = 1 + 2 * model.priors.cpu_batch_cost
    assert model.known_task_seconds(batcher) == pytest.approx(1.31 / prior)
    assert model.batching(batcher).curve_source == "measured"


@pytest.mark.parametrize("rows", [
    # the plain node was busy for the whole batch: its slowdown is not the curve's
    [(BATCHER, 0.0, 1.3), (BATCHER, 0.0, 1.3), (BATCHER, 0.0, 1.3), (PLAIN, 0.0, 1.2)],
    # served in turn, not together: a queue (fewer slots than sent)
    [(BATCHER, 0.0, 0.5), (BATCHER, 0.0, 1.0), (PLAIN, 1.0, 2.0)],
    # sent at different times: not one batch
    [(BATCHER, 0.0, 1.0), (BATCHER, 0.5, 1.5), (PLAIN, 1.5, 2.5)],
])
def test_what_is_not_a_clean_batch_is_no_point_of_the_curve(model, topology, rows):
    timings = _timed(topology, rows)
    model.observe("parallel", [t[0].node for t in timings], len(rows), 2.5,
                  identities=[t[0] for t in timings], timings=timings)
    assert not model.calibration.batching


def test_a_run_whose_node_had_no_solo_time_is_learned_from_once_it_has_one(model, topology):
    """A split run (3 batched on one node, 1 on another) teaches no overhead while the batching
    node's time per task is unknown; once a batch of its own gives one, the kept run teaches
    the dispatch overhead it showed."""
    split = _timed(topology, [(BATCHER, 0.0, 1.8), (BATCHER, 0.0, 1.8), (BATCHER, 0.0, 1.8),
                              (PLAIN, 0.0, 1.5)])
    model.observe("parallel", [t[0].node for t in split], 4, 1.8,
                  identities=[t[0] for t in split], timings=split)
    assert not model.calibration.dispatch and not model.calibration.batching
    alone = _timed(topology, [(BATCHER, 0.0, 2.05)] * 4)
    model.observe("parallel", [t[0].node for t in alone], 4, 2.05,
                  identities=[t[0] for t in alone], timings=alone)
    # batcher: 2.05 / ratio(4) = 1.0 per task, so 3 at once take 1.7; the plain node 1.5
    # (learned from the split run): predicted 1.7, measured 1.8
    assert model.dispatch_overhead() == pytest.approx(1.8 / 1.7 - 1, rel=1e-3)
