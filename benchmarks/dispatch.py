"""Before/after on real executions: which dispatch each policy picks, and what it then costs.

    python -m benchmarks.dispatch [--quick] [--scenarios a,b,...] [--out DIR] [--json FILE]
    python -m benchmarks.dispatch --from-json FILE [--out DIR]     # re-render a saved run
    python -m benchmarks.dispatch --run-counts                     # the detector's run counts

Run from the repository root, as root for the namespace scenarios. For each scenario of
:data:`sollol_locality.testing.machines.SCENARIOS` (emulator nodes on loopback and in network
namespaces, never off this machine), a long-form job of K chunks is run

* **sequentially** on one node,
* **in parallel across all nodes** (what SOLLOL does today),
* **all at once on one batching instance** (every chunk on a node whose ground truth has
  ``OLLAMA_NUM_PARALLEL`` > 1, as many at a time as its slots), where the scenario has one,
* **on one node per true unit** (the ground truth of what shares hardware), and
* **as each policy says**: ``plan.mode`` on ``plan.nodes``, with the plan's
  ``tasks_per_node`` and ``concurrency_per_node`` where it has them (else an even split, one
  request at a time per node; a subset such as one node per machine is a strategy of its own),

as interleaved repetitions (the order of the strategies rotates every round, so load that comes
and goes hits all of them alike); each makespan is the median over the rounds. The policies:

* *SOLLOL always-parallel*: ``sollol.integration.SOLLOLLoadBalancer.should_use_parallel()`` on a
  real balancer whose registry (``sollol.registry.NodeRegistry``) holds the scenario's nodes;
* *SOLLOL pool rule*: ``sollol.pool.OllamaPool.should_use_parallel_execution(K)`` on a pool
  holding the scenario's nodes (:func:`sollol_locality.testing.baselines.sollol_pool`, which
  keeps its threads and Dask out);
* *sollol-locality, priors*: ``LocalityAwareLoadBalancer.plan_execution(K)`` with no calibration
  file (the priors of ``CostPriors`` only);
* *sollol-locality, calibrated*: the same after ``calibrate()`` ran against the scenario's live
  nodes and wrote a per-scenario calibration file (temporary directory) that the balancer's
  config points at;
* *sollol-locality, online*: a fresh ``ExecutionPlanner`` whose calibration file does not exist
  yet runs ``Settings.online_jobs`` real jobs (``ExecutionPlanner.run`` where the planner has
  it, else the plan run by the workload and given to ``record_execution``, with per-task
  timings where it takes them), then decides.

The scenarios are grouped by what they test: (a)-(e) addresses and machines (round 1); (g)-(i)
slots and continuous batching (issue 10); (j) pinned instances (issue 11); (f), (k), (l)
co-location the addresses hide (issue 12). Each prints its ground truth
(:meth:`~sollol_locality.testing.machines.RunningScenario.facts`).

Reported per scenario: the measured makespans, each policy's choice and regret (its makespan /
the best measured makespan), and the predicted speedup beside the measured one, for the
calibrated plan and for all-parallel against sequential (``plan.naive_speedup`` against measured
sequential / all-parallel). A speedup is measured against the fastest sequential strategy run.
The report also gives the co-location detector's run count on N = 4, 8, 16 simulated nodes
(:func:`sollol_locality.colocation.simulated_run_counts`) beside the N(N-1)/2 pair runs of
testing every pair; ``--run-counts`` prints only that (no emulator is started).

Writes ``DIR/benchmark.md`` (tables; ``DIR`` defaults to ``docs``) and ``DIR/benchmark.png``
(bar charts; matplotlib, Agg backend) and prints the Markdown; ``--json FILE`` also keeps every
round. ``--quick`` runs 16 tokens a chunk, 3 rounds and 2 calibration rounds. The weights stay
at 256 MB in both: the smallest size at which two emulators on different cores behave like
separate machines (see :mod:`sollol_locality.testing.emulator`). Makespans closer than
:data:`RESOLUTION` are ties.

Every process and namespace a scenario starts belongs to a
:class:`sollol_locality.testing.machines.Cluster` and is gone when the scenario ends, also on an
error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import textwrap
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from sollol_locality.testing.baselines import offline_config, sollol_pool, sollol_registry
from sollol_locality.testing.emulator import DEFAULT_MODEL
from sollol_locality.testing.machines import (
    SCENARIOS,
    Cluster,
    RunningScenario,
    Scenario,
    ScenarioUnavailable,
    start_scenario,
)
from sollol_locality.testing.workload import (
    PROMPT_TEMPLATE,
    Arm,
    Settings,
    generate,
    measure,
    run_arm,
    warm_up,
)

__all__ = [
    "GROUPS",
    "LETTERS",
    "RESOLUTION",
    "Arm",
    "PolicyResult",
    "ScenarioResult",
    "Settings",
    "checks",
    "decide",
    "main",
    "measure",
    "offline_config",
    "online_policy",
    "render_markdown",
    "render_png",
    "run_counts",
    "run_scenario",
    "sollol_pool",
    "sollol_registry",
]

LETTERS: Final = {
    "a": "same-host-ports",
    "b": "localhost-and-lan",
    "c": "two-machines",
    "d": "slow-and-fast",
    "e": "two-plus-one",
    "f": "shared-core-namespaces",
    "g": "batching-node",
    "h": "two-batching-instances",
    "i": "batching-beside-plain",
    "j": "pinned-instances",
    "k": "hidden-colocation",
    "l": "two-colocated-pairs",
}
"""Scenario letter -> key of :data:`sollol_locality.testing.machines.SCENARIOS`."""

GROUPS: Final = (
    ("round1", "Addresses and machines (round 1)", ("a", "b", "c", "d", "e")),
    ("issue10", "Slots and continuous batching (issue 10)", ("g", "h", "i")),
    ("issue11", "Pinned instances (issue 11)", ("j",)),
    ("issue12", "Co-location the addresses hide (issue 12)", ("f", "k", "l")),
)
"""(id, title, letters): the phenomenon each group of scenarios tests, in report order."""

REQUIRED: Final = ("a", "b", "c", "d", "e")
EXTRA: Final = ("f",)
"""(f) was the extra scenario of round 1 (no check there); it is checked with issue 12 now."""

ORDER: Final = tuple(letter for _, _, letters in GROUPS for letter in letters)

POLICIES: Final = (
    ("sollol_parallel", "SOLLOL always-parallel"),
    ("sollol_pool", "SOLLOL pool rule"),
    ("priors", "sollol-locality, priors"),
    ("calibrated", "sollol-locality, calibrated"),
    ("online", "sollol-locality, online"),
)

RUN_COUNT_SIZES: Final = (4, 8, 16)

FULL: Final = Settings()
QUICK: Final = Settings(chunks=4, tokens=16, repeats=3, calibration_rounds=2)


def _group_of(letter: str) -> str:
    return next(gid for gid, _, letters in GROUPS if letter in letters)


@dataclass(slots=True)
class PolicyResult:
    """What one policy chose and what it predicted."""

    arm: Arm
    predicted_speedup: float | None = None
    predicted_all_parallel: float | None = None
    reason: str = ""


@dataclass(slots=True)
class ScenarioResult:
    """Everything measured for one scenario."""

    letter: str
    key: str
    description: str
    names: dict[str, str] = field(default_factory=dict)  # url -> "n1"
    machines: dict[str, str] = field(default_factory=dict)  # url -> ground-truth machine
    truth: dict[str, dict[str, Any]] = field(default_factory=dict)  # url -> facts() row
    policies: dict[str, PolicyResult] = field(default_factory=dict)
    walls: dict[Arm, list[float]] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    online: dict[str, Any] = field(default_factory=dict)  # how the online jobs ran
    skipped: str | None = None
    seconds: float = 0.0

    # -- derived figures --------------------------------------------------------------------

    def own_makespan(self, arm: Arm) -> float:
        """The median of ``arm``'s own rounds."""
        return statistics.median(self.walls[arm])

    def makespan(self, arm: Arm) -> float:
        """The median of the rounds of ``arm`` and of its twins (:meth:`twin_key`): one
        strategy measured under several names is one strategy, so its regret against itself
        is 1.00 rather than the noise between two of its names."""
        key = self.twin_key(arm)
        return statistics.median([w for other, walls in self.walls.items()
                                  if self.twin_key(other) == key for w in walls])

    def _node_twin(self, url: str) -> tuple[Any, ...]:
        """What a node is under the ground truth, without its name or address: its unit, CPUs,
        pinning, slots, environment, GPUs, namespace and its machine's speed."""
        row = self.truth.get(url)
        if not row:
            return ("url", url)
        return (row["unit"], bool(row.get("netns")), tuple(row.get("cpus", ())),
                row.get("pinned"), row.get("num_parallel", 1),
                tuple(sorted(row.get("env", {}).items())), tuple(row.get("gpus", ())),
                row.get("slowdown"))

    def twin_key(self, arm: Arm) -> tuple[Any, ...]:
        """Arms with one key are the same strategy: the same work on nodes that differ only by
        name and address (two namespaces of one core, with the same settings, swapped)."""
        if arm.mode == "sequential":
            return ("sequential", self._node_twin(arm.urls[0]))
        count = len(arm.urls)
        tasks = arm.tasks or (None,) * count
        concurrency = arm.concurrency or (None,) * count
        parts = sorted(((self._node_twin(u), t, c)
                        for u, t, c in zip(arm.urls, tasks, concurrency, strict=True)), key=repr)
        return ("parallel", tuple(parts))

    @property
    def arms(self) -> list[Arm]:
        return list(self.walls)

    @property
    def best(self) -> Arm:
        return min(self.walls, key=self.makespan)

    def regret(self, arm: Arm) -> float:
        return self.makespan(arm) / self.makespan(self.best)

    @property
    def sequential_reference(self) -> float:
        """The fastest sequential strategy measured (what "sequential" predictions mean)."""
        return min(self.makespan(a) for a in self.walls if a.mode == "sequential")

    def measured_speedup(self, arm: Arm) -> float:
        return self.sequential_reference / self.makespan(arm)

    @property
    def all_parallel(self) -> Arm:
        return Arm("parallel", tuple(self.names))

    def label(self, arm: Arm) -> str:
        return arm.label(self.names, len(self.names))

    def truth_line(self, url: str) -> str:
        """One node's ground truth, in words."""
        row = self.truth.get(url)
        if not row:
            return f"{self.names[url]} ({self.machines.get(url, '?')})"
        parts = [f"machine {row['machine']}", f"box {row['host']}",
                 f"CPUs {','.join(map(str, row['cpus']))}"
                 + (" (taskset)" if row.get("pinned") == "taskset" else ""),
                 f"unit {row['unit']}"]
        if row.get("num_parallel", 1) > 1:
            parts.append(f"batches {row['num_parallel']}")
        if row.get("gpus"):
            parts.append(f"GPUs {','.join(row['gpus'])}")
        mates = [self.names.get(u, u) for u in row.get("shares_unit_with", [])]
        if mates:
            parts.append("shares its unit with " + ", ".join(mates)
                         + (" (hidden: other address)" if row.get("hidden") else ""))
        return f"{self.names[url]}: " + ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        """Everything measured, as plain data (:meth:`from_json` reads it back)."""
        base = {"letter": self.letter, "scenario": self.key, "description": self.description}
        if self.skipped:
            return {**base, "skipped": self.skipped}
        return {
            **base,
            "nodes": [{"name": self.names[u], "url": u, "machine": self.machines[u],
                       "truth": self.truth.get(u, {})} for u in self.names],
            "strategies": [{"label": self.label(a), **a.to_json(),
                            "makespan": self.own_makespan(a),
                            "pooled_makespan": self.makespan(a), "walls": w}
                           for a, w in self.walls.items()],
            "policies": {
                name: {"choice": self.label(p.arm), **p.arm.to_json(),
                       "regret": self.regret(p.arm), "predicted_speedup": p.predicted_speedup,
                       "predicted_all_parallel": p.predicted_all_parallel, "reason": p.reason}
                for name, p in self.policies.items()
            },
            "calibration": self.calibration,
            "online": self.online,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScenarioResult:
        result = cls(data["letter"], data["scenario"], data["description"],
                     skipped=data.get("skipped"))
        if result.skipped:
            return result
        result.names = {n["url"]: n["name"] for n in data["nodes"]}
        result.machines = {n["url"]: n["machine"] for n in data["nodes"]}
        result.truth = {n["url"]: n["truth"] for n in data["nodes"] if n.get("truth")}
        result.walls = {Arm.from_json(a): list(a["walls"]) for a in data["strategies"]}
        result.policies = {
            name: PolicyResult(Arm.from_json(p), p["predicted_speedup"],
                               p["predicted_all_parallel"], p["reason"])
            for name, p in data["policies"].items()}
        result.calibration = data["calibration"]
        result.online = data.get("online", {})
        result.seconds = data["seconds"]
        return result


# ------------------------------------------------------------------------------------------
# The policies


def _library_policy(urls: Sequence[str], chunks: int, calibration_file: Path | None
                    ) -> PolicyResult:
    from sollol_locality import LocalityAwareLoadBalancer

    balancer = LocalityAwareLoadBalancer(sollol_registry(urls),
                                         locality_config=offline_config(calibration_file))
    plan = balancer.plan_execution(chunks)
    return PolicyResult(Arm.of_plan(plan), plan.speedup, plan.naive_speedup, plan.reason)


def decide(urls: Sequence[str], chunks: int, calibration_file: Path | None
           ) -> dict[str, PolicyResult]:
    """Each policy's choice for ``chunks`` chunks on ``urls`` (calibrated only with a file; the
    online policy, which runs jobs, is :func:`online_policy`)."""
    from sollol.integration import SOLLOLLoadBalancer

    everything = Arm("parallel", tuple(urls))
    first = Arm("sequential", (urls[0],))
    always = SOLLOLLoadBalancer(sollol_registry(urls)).should_use_parallel()
    pool = sollol_pool(urls).should_use_parallel_execution(chunks)
    result = {
        "sollol_parallel": PolicyResult(everything if always else first),
        "sollol_pool": PolicyResult(everything if pool else first),
        "priors": _library_policy(urls, chunks, None),
    }
    if calibration_file is not None:
        result["calibrated"] = _library_policy(urls, chunks, calibration_file)
    return result


def _takes_timings(record: Callable[..., Any]) -> bool:
    try:
        return "timings" in inspect.signature(record).parameters
    except (TypeError, ValueError):
        return False


def online_policy(urls: Sequence[str], settings: Settings, calibration_file: Path, *,
                  say: Callable[[str], None] = lambda line: None
                  ) -> tuple[PolicyResult, dict[str, Any]]:
    """A fresh planner that knows only the priors (its calibration file ``calibration_file``
    does not exist yet) runs ``settings.online_jobs`` real jobs, then decides.

    Each job goes through ``ExecutionPlanner.run(tasks, call, nodes)`` when the planner has it.
    Otherwise the job is planned, run by the workload as the plan says, and recorded with
    ``record_execution(plan, wall, timings=...)`` (one ``(node, start, end)`` per chunk) where
    the planner or, failing that, a balancer on the same planner takes timings, else with
    ``record_execution(plan, wall)``. Returns the decision and how the jobs ran.
    """
    from sollol_locality import ExecutionPlanner, LocalityAwareLoadBalancer

    if calibration_file.exists():
        calibration_file.unlink()
    config = offline_config(calibration_file)
    planner = ExecutionPlanner(config=config)
    balancer = LocalityAwareLoadBalancer(sollol_registry(urls), planner=planner)
    run = getattr(planner, "run", None)
    found = getattr(planner, "record_execution", None)
    chunks = settings.chunks
    how = ("ExecutionPlanner.run" if callable(run) else
           "ExecutionPlanner.record_execution" if callable(found) else
           "LocalityAwareLoadBalancer.record_execution")
    record: Callable[..., Any] = found if callable(found) else balancer.record_execution
    with_timings = _takes_timings(record)
    jobs: list[dict[str, Any]] = []
    for job in range(settings.online_jobs):
        if callable(run):
            def call(node: Any, task: int) -> Any:
                url = str(getattr(node, "url", node))
                prompt = PROMPT_TEMPLATE.format(part=task + 1, total=chunks)
                return generate(url, prompt, model=DEFAULT_MODEL, num_predict=settings.tokens)

            started = time.perf_counter()
            run(list(range(chunks)), call, list(urls))
            wall = time.perf_counter() - started
            jobs.append({"job": job + 1, "wall": wall})
        else:
            plan = planner.plan(chunks, list(urls))
            arm = Arm.of_plan(plan)
            result = run_arm(arm, settings)
            by_url = {str(getattr(n, "url", n)): n for n in plan.nodes}
            if with_timings:
                timings = [(by_url.get(c.node, c.node), c.start, c.end) for c in result.chunks]
                record(plan, result.wall_seconds, timings=timings)
            else:
                record(plan, result.wall_seconds)
            jobs.append({"job": job + 1, "arm": arm.to_json(), "wall": result.wall_seconds})
        say(f"  online job {job + 1}/{settings.online_jobs}: {jobs[-1]['wall']:.2f}s")
    plan = planner.plan(chunks, list(urls))
    info = {"jobs": jobs, "through": how, "timings": callable(run) or with_timings}
    return PolicyResult(Arm.of_plan(plan), plan.speedup, plan.naive_speedup, plan.reason), info


# ------------------------------------------------------------------------------------------
# Running a scenario


def _say(line: str) -> None:
    print(f"[dispatch] {line}", file=sys.stderr, flush=True)


def _calibration_summary(path: Path) -> dict[str, Any]:
    """The medians of what the calibration file holds, whatever of it this version writes."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"task_seconds": {}, "contention": {}, "host_overhead": {},
                "dispatch_overhead": None, "observations": 0}

    def med(values: Any) -> Any:
        if isinstance(values, list) and values and all(
                isinstance(v, (int, float)) for v in values):
            return statistics.median(values)
        return values

    def table(name: str) -> dict[str, Any]:
        value = data.get(name, {})
        return {k: med(v) for k, v in value.items()} if isinstance(value, dict) else {}

    contention = data.get("contention", {})
    summary: dict[str, Any] = {
        "task_seconds": table("task_seconds"),
        "contention": ({u: {k: med(v) for k, v in by_k.items()}
                        for u, by_k in contention.items() if isinstance(by_k, dict)}
                       if isinstance(contention, dict) else {}),
        "host_overhead": table("host_overhead"),
        "dispatch_overhead": med(data["dispatch_overhead"]) if data.get("dispatch_overhead")
        else None,
        "observations": data.get("observations", 0),
    }
    # What later formats add (batching curves, measured co-location), kept as written.
    for key in ("batching", "curves", "slots", "colocation", "co_location", "independence"):
        if key in data:
            summary[key] = data[key]
    return summary


def _strategies(urls: Sequence[str], running: RunningScenario, chunks: int,
                policies: dict[str, PolicyResult]) -> list[Arm]:
    """Sequential on the first node, all-parallel, all at once on each batching instance, one
    node per true unit, and every policy's choice (each once)."""
    arms: list[Arm] = [Arm("sequential", (urls[0],)), Arm("parallel", tuple(urls))]
    facts = running.facts()
    for url in urls:
        slots = int(facts[url].get("num_parallel", 1))
        if slots > 1:
            arms.append(Arm("parallel", (url,), (chunks,), (min(chunks, slots),)))
    order = {url: i for i, url in enumerate(urls)}
    firsts = sorted((min(unit, key=order.__getitem__) for unit in running.units()),
                    key=order.__getitem__)
    if len(firsts) > 1:
        arms.append(Arm("parallel", tuple(firsts)))
    for policy in policies.values():
        arms.append(policy.arm)
    return list(dict.fromkeys(arms))


def run_scenario(letter: str, settings: Settings, workdir: Path, *,
                 say: Callable[[str], None] = _say,
                 scenario: Scenario | None = None) -> ScenarioResult:
    """Start the scenario, calibrate, decide, measure every strategy; clean up everything.

    ``scenario``: a layout of the caller's, shown under ``letter`` (default: the benchmark's
    scenario of that letter)."""
    from sollol_locality.probe import calibrate

    if scenario is None:
        scenario = SCENARIOS[LETTERS[letter]]
    key = scenario.key
    result = ScenarioResult(letter, key, scenario.description)
    started = time.perf_counter()
    with Cluster() as cluster:
        try:
            running: RunningScenario = start_scenario(scenario, cluster,
                                                      weights_mb=settings.weights_mb)
        except ScenarioUnavailable as exc:
            result.skipped = exc.reason
            say(exc.reason)
            return result
        # Nodes of one machine in port order: the order the planner breaks ties in, so that
        # "sequential n1" is the same node whichever policy runs the job sequentially there.
        machine_order = {m.name: i for i, m in enumerate(scenario.machines)}
        urls = [node.url for node in sorted(
            running.nodes, key=lambda n: (machine_order[n.machine], n.process.port))]
        result.names = {url: f"n{i + 1}" for i, url in enumerate(urls)}
        result.machines = {node.url: node.machine for node in running.nodes}
        result.truth = {url: {k: v for k, v in row.items() if k != "pid"}
                        for url, row in running.facts().items()}
        say(f"({letter}) {key}: " + ", ".join(f"{result.names[u]}={u} ({result.machines[u]})"
                                              for u in urls))
        for url in urls:
            say(f"  truth: {result.truth_line(url)}")
        warm_up(urls, model=DEFAULT_MODEL)
        calibration_file = workdir / f"calibration-{key}.json"
        calibrate(urls, model=DEFAULT_MODEL, num_predict=settings.tokens,
                  rounds=settings.calibration_rounds, output=calibration_file,
                  config=offline_config(None), progress=lambda line: say(f"  calibrate: {line}"))
        result.calibration = _calibration_summary(calibration_file)
        result.policies = decide(urls, settings.chunks, calibration_file)
        result.policies["online"], result.online = online_policy(
            urls, settings, workdir / f"online-{key}.json", say=say)
        order = {url: i for i, url in enumerate(urls)}
        for policy in result.policies.values():
            # One strategy however its nodes are listed (a plan lists the best node first).
            policy.arm = policy.arm.sorted_by(order)
        arms = _strategies(urls, running, settings.chunks, result.policies)
        for name, policy in result.policies.items():
            say(f"  {name}: {policy.arm.label(result.names, len(urls))}"
                + (f" (predicted {policy.predicted_speedup:.2f}x)"
                   if policy.predicted_speedup is not None else ""))
        result.walls = measure(arms, settings, say=say, names=result.names)
    result.seconds = time.perf_counter() - started
    return result


def run_counts(sizes: Sequence[int] = RUN_COUNT_SIZES) -> dict[int, dict[str, int]]:
    """The co-location detector's run count on simulated clusters of each size N (independent
    nodes, one hidden pair, two interleaved units), with the N(N-1)/2 pair runs of testing
    every pair (``"pairs"``)."""
    from sollol_locality.colocation import simulated_run_counts

    figures = simulated_run_counts(tuple(sizes))
    return {n: {**counts, "pairs": n * (n - 1) // 2} for n, counts in figures.items()}


def render_run_counts(counts: dict[int, dict[str, int]]) -> list[str]:
    lines = ["| N nodes | independent | one hidden pair | two interleaved units (worst case) "
             "| every pair: N(N-1)/2 |", "| --- | --- | --- | --- | --- |"]
    for n, row in sorted(counts.items()):
        lines.append(f"| {n} | {row.get('independent', '-')} | {row.get('one_pair', '-')} "
                     f"| {row.get('two_units', '-')} | {row['pairs']} |")
    return lines


# ------------------------------------------------------------------------------------------
# Reporting


RESOLUTION: Final = 0.02
"""Makespans closer than this (2%) are a tie: the interleaved rounds of two strategies that do
the same work on one core (scenario (a)) scatter by about that much."""


def _predictions(r: ScenarioResult) -> list[tuple[float, float]]:
    """(predicted, measured) speedups of the calibrated plan and of all-parallel."""
    cal = r.policies["calibrated"]
    assert cal.predicted_speedup is not None and cal.predicted_all_parallel is not None
    return [(cal.predicted_speedup, r.measured_speedup(cal.arm)),
            (cal.predicted_all_parallel, r.measured_speedup(r.all_parallel))]


def _error(predicted: float, measured: float) -> str:
    return f"{(predicted / measured - 1) * 100:+.0f}%"


def _group_checks(ran: Sequence[ScenarioResult]) -> dict[str, Any]:
    regrets = {r.letter: r.regret(r.policies["calibrated"].arm) for r in ran}
    online = {r.letter: r.regret(r.policies["online"].arm) for r in ran if "online" in r.policies}
    errors = {f"{r.letter} {kind}": p / m - 1
              for r in ran
              for kind, (p, m) in zip(("plan", "all-parallel"), _predictions(r), strict=True)}
    plan_errors = {k: e for k, e in errors.items() if k.endswith(" plan")}
    figures: dict[str, Any] = {
        "scenarios": [r.letter for r in ran],
        "worst_regret": max(regrets.values()),
        "regret_ok": max(regrets.values()) <= 1.05,
        "largest_prediction_error": max(errors.values(), key=abs),
        "predictions_ok": all(abs(e) <= 0.20 for e in errors.values()),
        "largest_plan_prediction_error": max(plan_errors.values(), key=abs),
        "plan_predictions_ok": all(abs(e) <= 0.20 for e in plan_errors.values()),
    }
    if online:
        figures["worst_online_regret"] = max(online.values())
        figures["online_ok"] = max(online.values()) <= 1.10
    return figures


def checks(results: Sequence[ScenarioResult]) -> dict[str, dict[str, Any]]:
    """The acceptance figures per group (:data:`GROUPS` id -> figures) over the scenarios that
    ran: calibrated regret <= 1.05 in every one, predicted speedups (the calibrated plan's and
    all-parallel's) within 20% of measured, online regret <= 1.10; for round 1 also never worse
    than the better of SOLLOL's two rules, for issue 11 the pinned scenario's priors regret
    (decided without calibration), for issue 12 whether the calibrated reasons name a unit."""
    summary: dict[str, dict[str, Any]] = {}
    for gid, _, letters in GROUPS:
        ran = [r for r in results if not r.skipped and r.letter in letters]
        if not ran:
            continue
        figures = _group_checks(ran)
        if gid == "round1":
            margins = {  # calibrated makespan / the better SOLLOL rule's
                r.letter: r.makespan(r.policies["calibrated"].arm)
                / min(r.makespan(r.policies[n].arm) for n in ("sollol_parallel", "sollol_pool"))
                for r in ran}
            figures["worst_against_sollol"] = max(margins.values())
            figures["never_worse_than_sollol"] = max(margins.values()) <= 1.0 + RESOLUTION
        if gid == "issue11":
            priors = {r.letter: r.regret(r.policies["priors"].arm) for r in ran}
            figures["worst_priors_regret"] = max(priors.values())
            figures["priors_ok"] = max(priors.values()) <= 1.05
            unpinned = [r for r in results if not r.skipped and r.letter == "a"]
            if unpinned:  # two unpinned instances of one machine: still sequential
                figures["unpinned_sequential"] = unpinned[0].policies["priors"].arm.mode == (
                    "sequential")
        if gid == "issue12":
            named = {r.letter: _names_its_units(r) for r in ran}
            figures["units_named"] = [x for x, ok in named.items() if ok]
            figures["units_unnamed"] = [x for x, ok in named.items() if not ok]
            figures["units_named_ok"] = all(named.values())
        summary[gid] = figures
    return summary


def _names_its_units(r: ScenarioResult) -> bool:
    """Whether the calibrated plan's reason names a node of every co-located group (by URL or
    address) other than a node it runs on, i.e. says which nodes were kept apart and why."""
    reason = r.policies["calibrated"].reason
    groups = {frozenset([url, *row.get("shares_unit_with", [])]) for url, row in r.truth.items()
              if row.get("shares_unit_with")}

    def mentioned(url: str) -> bool:
        host = urllib.parse.urlsplit(url).hostname or url
        return url in reason or host in reason

    return bool(groups) and all(sum(mentioned(u) for u in group) >= 2 for group in groups)


def _ok(flag: bool) -> str:
    return "yes" if flag else "**no**"


def _summary_line(gid: str, title: str, figures: dict[str, Any]) -> str:
    letters = ", ".join(f"({x})" for x in figures["scenarios"])
    parts = [f"calibrated regret <= 1.05 in every one: {_ok(figures['regret_ok'])} "
             f"(worst {figures['worst_regret']:.2f})",
             f"calibrated plan's predicted speedup within 20% of measured: "
             f"{_ok(figures['plan_predictions_ok'])} (largest error "
             f"{figures['largest_plan_prediction_error'] * 100:+.0f}%), and all-parallel's too: "
             f"{_ok(figures['predictions_ok'])} (largest "
             f"{figures['largest_prediction_error'] * 100:+.0f}%)"]
    if "online_ok" in figures:
        parts.append(f"online regret <= 1.10: {_ok(figures['online_ok'])} "
                     f"(worst {figures['worst_online_regret']:.2f})")
    if "never_worse_than_sollol" in figures:
        parts.append(f"never worse than the better of SOLLOL's two rules (no regression): "
                     f"{_ok(figures['never_worse_than_sollol'])} (calibrated makespan / the "
                     f"better rule's, worst {figures['worst_against_sollol']:.2f})")
    if "priors_ok" in figures:
        parts.append(f"decided right without calibration (priors regret <= 1.05): "
                     f"{_ok(figures['priors_ok'])} (worst {figures['worst_priors_regret']:.2f})")
    if "unpinned_sequential" in figures:
        parts.append("two unpinned instances of one machine (a) still sequential on priors: "
                     f"{_ok(figures['unpinned_sequential'])}")
    if "units_named_ok" in figures:
        parts.append("the calibrated reason names the co-located nodes: "
                     f"{_ok(figures['units_named_ok'])}"
                     + (f" (not in {', '.join(f'({x})' for x in figures['units_unnamed'])})"
                        if figures.get("units_unnamed") else ""))
    return f"* **{title}**, {letters}: " + "; ".join(parts) + "."


def _regret_table(rows: Sequence[ScenarioResult]) -> list[str]:
    lines = ["| scenario | best measured | " + " | ".join(
        f"**{title}**" if name == "calibrated" else title for name, title in POLICIES) + " |",
        "| --- " * (len(POLICIES) + 2) + "|"]
    for r in rows:
        title = f"({r.letter}) {r.key}"
        if r.skipped:
            lines.append(f"| {title} | skipped: {r.skipped} |" + " |" * len(POLICIES))
            continue
        best = r.makespan(r.best)
        tied = [a for a in sorted(r.walls, key=r.makespan)
                if r.makespan(a) <= best * (1 + RESOLUTION)]
        cells = []
        for name, _ in POLICIES:
            policy = r.policies.get(name)
            if policy is None:
                cells.append("-")
                continue
            text = f"{r.label(policy.arm)}: {r.regret(policy.arm):.2f}"
            cells.append(f"**{text}**" if name == "calibrated" else text)
        lines.append(f"| {title} | {' = '.join(r.label(a) for a in tied)} | "
                     + " | ".join(cells) + " |")
    return lines


def render_markdown(results: Sequence[ScenarioResult], settings: Settings, *, command: str,
                    context: dict[str, Any]) -> str:
    ran = [r for r in results if not r.skipped]
    lines: list[str] = []
    add = lines.append
    add("# Dispatch benchmark: before and after, on real executions")
    add("")
    add(f"`{command}` (repository root, as root for the namespace scenarios) wrote this page "
        "and `benchmark.png`. Every figure comes from that one run: makespans are medians of "
        f"{settings.repeats} interleaved rounds (the order of the strategies rotates every "
        "round), and regrets and speedups are ratios of makespans measured side by side.")
    add("")
    add(f"* **Job**: {settings.chunks} chunks of {settings.tokens} tokens, dispatched "
        "sequentially on one node, in parallel on every node (what SOLLOL does today), all at "
        "once on one batching instance (as many at a time as its slots), on one node per true "
        "unit, and as each policy decides, with the plan's tasks and concurrency per node.")
    add(f"* **Nodes**: Ollama emulators (`sollol_locality.testing.emulator`, "
        f"{settings.weights_mb} MB of weights; one generate at a time as Ollama, or batched "
        "with `OLLAMA_NUM_PARALLEL`); a machine is a set of pinned CPUs, other machines are "
        "network namespaces, instances may be pinned with `taskset` "
        "(`sollol_locality.testing.machines`); nothing leaves this host.")
    add("* **Policies**: SOLLOL's `SOLLOLLoadBalancer.should_use_parallel()` and "
        "`OllamaPool.should_use_parallel_execution(K)` (the real methods, SOLLOL "
        f"{context['sollol']}), and `LocalityAwareLoadBalancer.plan_execution(K)` with the "
        f"priors only, then after `calibrate(rounds={settings.calibration_rounds}, "
        f"num_predict={settings.tokens})` ran against the scenario's live nodes and wrote the "
        "calibration file its config points at; *online*: a fresh `ExecutionPlanner` with no "
        f"calibration file that ran {settings.online_jobs} real jobs through the planner "
        "first.")
    add(f"* **Machine**: {context['cpus']} CPUs, Python {context['python']}; load average "
        f"{context['load_before']} before the run, {context['load_after']} after.")
    add("")
    add("**Regret** = the makespan of the strategy the policy picked / the best makespan measured "
        f"in the scenario (1.00: it picked the fastest). Makespans within {RESOLUTION:.0%} of "
        "each other are a tie (=). Strategies that differ only by nodes the ground truth makes "
        "identical (two namespaces of one core with the same settings, swapped) are one "
        "strategy: their rounds are pooled before the median, so that a policy is not charged "
        "the noise between two names of what it chose. In a strategy, `n1:5` is 5 tasks on n1 "
        "and `n1x4` 4 of them at a time (`n1:5x4`); without them, the chunks are split evenly, "
        "one at a time per node.")
    add("")
    summary = checks(results)
    for _, title, letters in GROUPS:
        rows = [r for r in results if r.letter in letters]
        if not rows:
            continue
        add(f"## {title}")
        add("")
        lines.extend(_regret_table(rows))
        add("")
        for r in rows:
            if r.skipped or not r.truth:
                continue
            add(f"Ground truth of ({r.letter}) {r.key}: " + "; ".join(
                r.truth_line(u) for u in r.names) + ".")
            add("")
    if summary:
        add("## Checks, per issue")
        add("")
        for gid, title, _ in GROUPS:
            if gid in summary:
                add(_summary_line(gid, title, summary[gid]))
        add("")
    add("## Predicted against measured speedup")
    add("")
    add("Speedup = the fastest sequential makespan measured / the strategy's makespan. "
        "\"All-parallel\" is `plan.naive_speedup`, the library's prediction for dispatching "
        "to every node at once.")
    add("")
    add("| scenario | calibrated plan | predicted | measured | error "
        "| all-parallel, predicted by priors | predicted calibrated | measured | error "
        "| online plan | predicted | measured |")
    add("| --- " * 12 + "|")
    for r in ran:
        cal, pri = r.policies["calibrated"], r.policies["priors"]
        (plan_p, plan_m), (all_p, all_m) = _predictions(r)
        assert pri.predicted_all_parallel is not None
        online = r.policies.get("online")
        tail = "| - | - | - |"
        if online is not None:
            predicted = (f"{online.predicted_speedup:.2f}x"
                         if online.predicted_speedup is not None else "-")
            tail = (f"| {r.label(online.arm)} | {predicted} "
                    f"| {r.measured_speedup(online.arm):.2f}x |")
        add(f"| ({r.letter}) {r.key} | {r.label(cal.arm)} | {plan_p:.2f}x | {plan_m:.2f}x "
            f"| {_error(plan_p, plan_m)} | {pri.predicted_all_parallel:.2f}x | {all_p:.2f}x "
            f"| {all_m:.2f}x | {_error(all_p, all_m)} {tail}")
    add("")
    add("## Measured makespans")
    add("")
    where = f"`{context['raw']}`" if context.get("raw") else "the `--json` output"
    add(f"Median seconds over the rounds (every round is in {where}). Nodes n1, n2, ... are "
        "listed by machine, then port.")
    add("")
    add("| scenario | nodes (machine) | strategy: makespan |")
    add("| --- | --- | --- |")
    for r in ran:
        nodes = ", ".join(f"{r.names[u]} `{u}` ({r.machines[u]})" for u in r.names)
        spans = "; ".join(f"{r.label(a)}: {r.own_makespan(a):.2f} s"
                          for a in sorted(r.walls, key=r.own_makespan))
        add(f"| ({r.letter}) {r.key} | {nodes} | {spans} |")
    add("")
    add("## What calibration learned")
    add("")
    add("Medians of the samples in each scenario's calibration file. Contention `c`: k nodes "
        "sharing one unit each take k x (1 + c) times as long per task as one alone (0: pure "
        "time-sharing; the prior is 1.0). Dispatch overhead: what running on several machines "
        "at once loses (the prior is 0.05). Batching curves and measured co-location are in "
        "the `--json` output where the calibration file holds them.")
    add("")
    add("| scenario | seconds per task, per unit | contention c | dispatch overhead |")
    add("| --- | --- | --- | --- |")
    for r in ran:
        learned = r.calibration
        tasks = ", ".join(f"{u}: {v:.3f}" if isinstance(v, (int, float)) else f"{u}: {v}"
                          for u, v in learned.get("task_seconds", {}).items()) or "-"
        cont = ", ".join(f"{u} k={k}: {c:+.3f}" if isinstance(c, (int, float)) else f"{u}: {c}"
                         for u, by_k in learned.get("contention", {}).items()
                         for k, c in by_k.items()) or "-"
        overhead = learned.get("dispatch_overhead")
        disp = f"{overhead:.3f}" if isinstance(overhead, (int, float)) else "-"
        add(f"| ({r.letter}) {r.key} | {tasks} | {cont} | {disp} |")
    add("")
    add("## Why (the calibrated and the online plans' reasons)")
    add("")
    for r in ran:
        add(f"* ({r.letter}) calibrated: {r.policies['calibrated'].reason}")
        if "online" in r.policies:
            add(f"  online: {r.policies['online'].reason}")
    add("")
    add("## Co-location detector: runs to find hidden pairs (issue 12)")
    add("")
    counts = context.get("run_counts") or run_counts()
    add("Concurrent runs the detector makes (the all-nodes run, then the runs that confirm or "
        "clear suspected groups), given each node's solo time, on N simulated nodes "
        "(`sollol_locality.colocation.simulated_run_counts`: solo times 1 s, noise up to 5%), "
        "against the N(N-1)/2 runs of testing every pair.")
    add("")
    lines.extend(render_run_counts({int(n): row for n, row in counts.items()}))
    add("")
    return "\n".join(lines)


def _short(r: ScenarioResult) -> str:
    name = textwrap.fill(r.key.replace("-", " "), 13)
    return f"({r.letter}) {name}"


def render_png(results: Sequence[ScenarioResult], path: Path) -> None:
    """Left: each policy's regret per scenario. Right: the speedup of dispatching to every node
    at once, predicted by the priors, predicted after calibration, and measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in results if not r.skipped]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(14.0, 1.6 * len(ran) + 5), 5.2),
                                      gridspec_kw={"width_ratios": [3, 2]})
    labels = [_short(r) for r in ran]
    colours = ("#c44e52", "#dd8452", "#8c8c8c", "#4c72b0", "#55a868")
    width = 0.8 / len(POLICIES)
    top = 1.0
    for i, ((name, title), colour) in enumerate(zip(POLICIES, colours, strict=True)):
        values = [r.regret(r.policies[name].arm) if name in r.policies else 1.0 for r in ran]
        top = max(top, *values)
        xs = [x + (i - (len(POLICIES) - 1) / 2) * width for x in range(len(ran))]
        # bars rise from 1.0 (the best strategy): their height is the time lost
        bars = left.bar(xs, [v - 1.0 for v in values], width, bottom=1.0, label=title,
                        color=colour)
        for bar, value in zip(bars, values, strict=True):
            left.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value),
                          xytext=(0, 2), textcoords="offset points", ha="center", fontsize=6,
                          rotation=90)
    left.axhline(1.05, color="black", linewidth=0.6, linestyle=":")
    left.annotate("1.05", (len(ran) - 0.5, 1.05), xytext=(2, 1), textcoords="offset points",
                  fontsize=7)
    left.set_ylim(0.98, top + 0.1)
    left.set_xlim(-0.5, len(ran) - 0.5)
    left.set_xticks(range(len(ran)), labels, fontsize=7.5)
    left.set_ylabel("regret: makespan / best measured makespan")
    left.set_title("The dispatch each policy picks (1.00 = the fastest measured)", fontsize=10)
    left.legend(fontsize=8, loc="upper left")
    series = (
        ("predicted by the priors", "#c9c9c9",
         [r.policies["priors"].predicted_all_parallel or 0.0 for r in ran]),
        ("predicted after calibration", "#4c72b0",
         [r.policies["calibrated"].predicted_all_parallel or 0.0 for r in ran]),
        ("measured", "#222222", [r.measured_speedup(r.all_parallel) for r in ran]),
    )
    width = 0.8 / len(series)
    for i, (title, colour, values) in enumerate(series):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(ran))]
        bars = right.bar(xs, values, width, label=title, color=colour)
        for bar, value in zip(bars, values, strict=True):
            right.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value),
                           xytext=(0, 2), textcoords="offset points", ha="center", fontsize=6,
                           rotation=90)
    right.axhline(1.0, color="black", linewidth=0.6)
    right.set_ylim(0, max(v for _, _, values in series for v in values) * 1.25)
    right.set_xticks(range(len(ran)), [f"({r.letter})" for r in ran], fontsize=8)
    right.set_ylabel("speedup over sequential (above 1: parallel is faster)")
    right.set_title("Dispatching to every node at once: predicted and measured", fontsize=10)
    right.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load() -> str:
    with contextlib.suppress(OSError):
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return "unknown"


def _parse_scenarios(text: str) -> list[str]:
    wanted = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        if item in LETTERS:
            wanted.append(item)
            continue
        matches = [letter for letter, key in LETTERS.items() if key == item]
        if not matches:
            raise argparse.ArgumentTypeError(
                f"unknown scenario {item!r}: expected letters a-l or keys "
                f"{', '.join(LETTERS.values())}")
        wanted.append(matches[0])
    if not wanted:
        raise argparse.ArgumentTypeError("no scenario given")
    return list(dict.fromkeys(wanted))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dispatch",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer tokens and rounds (about two minutes on 2 cores)")
    parser.add_argument("--scenarios", type=_parse_scenarios, default=list(ORDER),
                        help="comma-separated letters or keys (default: all, "
                             f"{','.join(ORDER)})")
    parser.add_argument("--out", type=Path, default=Path("docs"),
                        help="directory for benchmark.md and benchmark.png (default docs)")
    parser.add_argument("--no-write", action="store_true", help="print only; write no files")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write every measurement (each round) as JSON")
    parser.add_argument("--from-json", type=Path, metavar="FILE",
                        help="measure nothing: render the tables and chart of a run saved "
                             "with --json")
    parser.add_argument("--run-counts", action="store_true",
                        help="only print the co-location detector's run counts on simulated "
                             "nodes (N = 4, 8, 16); starts no emulator")
    args = parser.parse_args(argv)
    if args.run_counts:
        print("\n".join(render_run_counts(run_counts())))
        return 0
    if args.from_json:
        raw = json.loads(args.from_json.read_text(encoding="utf-8"))
        settings = Settings(**raw["settings"])
        context, command = raw["context"], raw["command"]
        results = [ScenarioResult.from_json(item) for item in raw["results"]]
    else:
        settings = QUICK if args.quick else FULL
        import sollol

        context = {"cpus": os.cpu_count(), "python": platform.python_version(),
                   "sollol": getattr(sollol, "__version__", "?"), "load_before": _load()}
        _say(f"{settings}; load average {context['load_before']}")
        started = time.perf_counter()
        results = []
        with tempfile.TemporaryDirectory(prefix="sollol-dispatch-") as workdir:
            for letter in args.scenarios:
                results.append(run_scenario(letter, settings, Path(workdir)))
        context["load_after"] = _load()
        _say(f"finished in {time.perf_counter() - started:.0f} s; load average "
             f"{context['load_after']}")
        context["run_counts"] = run_counts()
        command = "python -m benchmarks.dispatch" + (" --quick" if args.quick else "")
        if args.scenarios != list(ORDER):
            command += " --scenarios " + ",".join(args.scenarios)
        if args.json:
            command += f" --json {args.json}"
            context["raw"] = str(args.json)
        if args.json:
            raw = {"command": command, "settings": dataclasses.asdict(settings),
                   "context": context, "results": [r.to_json() for r in results]}
            args.json.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    markdown = render_markdown(results, settings, command=command, context=context)
    print(markdown)
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "benchmark.md").write_text(markdown, encoding="utf-8")
        if any(not r.skipped for r in results):
            render_png(results, args.out / "benchmark.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
