"""Before/after on real executions: which dispatch each policy picks, and what it then costs.

    python -m benchmarks.dispatch [--quick] [--scenarios a,b,...] [--out DIR] [--json FILE]
    python -m benchmarks.dispatch --from-json FILE [--out DIR]     # re-render a saved run

Run from the repository root, as root for the namespace scenarios (c)-(f). For each scenario of
:data:`benchmarks.machines.SCENARIOS` (emulator nodes on loopback and in network namespaces, never
off this machine), a long-form job of K chunks is run

* **sequentially** on one node,
* **in parallel across all nodes** (what SOLLOL does today), and
* **as each policy says** (``plan.mode`` on ``plan.nodes``; a subset such as one node per machine
  is a strategy of its own),

as interleaved repetitions (the order of the strategies rotates every round, so load that comes
and goes hits all of them alike); each makespan is the median over the rounds. The policies:

* *SOLLOL always-parallel*: ``sollol.integration.SOLLOLLoadBalancer.should_use_parallel()`` on a
  real balancer whose registry (``sollol.registry.NodeRegistry``) holds the scenario's nodes;
* *SOLLOL pool rule*: ``sollol.pool.OllamaPool.should_use_parallel_execution(K)`` on a pool
  holding the scenario's nodes (built with ``OllamaPool.__new__`` and ``_normalize_node``, as
  ``benchmarks/speed.py`` does, to keep its threads and Dask out);
* *sollol-locality, priors*: ``LocalityAwareLoadBalancer.plan_execution(K)`` with no calibration
  file (the priors of ``CostPriors`` only);
* *sollol-locality, calibrated*: the same after ``sollol_locality.calibration.calibrate()`` ran
  against the scenario's live nodes and wrote a per-scenario calibration file (temporary
  directory) that the balancer's config points at.

Reported per scenario: the measured makespans, each policy's choice and regret (its makespan /
the best measured makespan), and the predicted speedup beside the measured one, for the
calibrated plan and for all-parallel against sequential (``plan.naive_speedup`` against measured
sequential / all-parallel). A speedup is measured against the fastest sequential strategy run.

Writes ``DIR/benchmark.md`` (tables; ``DIR`` defaults to ``docs``) and ``DIR/benchmark.png``
(bar charts; matplotlib, Agg backend) and prints the Markdown; ``--json FILE`` also keeps every
round. The full run takes about five and a half minutes on 2 cores; ``--quick`` (about 80
seconds) runs 16 tokens a chunk, 3 rounds and 2 calibration rounds. The weights stay at 256 MB
in both: the smallest size at which two emulators on different cores behave like separate
machines (see ``benchmarks/emulator.py``). Makespans closer than :data:`RESOLUTION` are ties.

Every process and namespace a scenario starts belongs to a :class:`benchmarks.machines.Cluster`
and is gone when the scenario ends, also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from sollol_locality.testing.emulator import DEFAULT_MODEL, DEFAULT_WEIGHTS_MB
from sollol_locality.testing.machines import (
    SCENARIOS,
    Cluster,
    RunningScenario,
    ScenarioUnavailable,
    start_scenario,
)
from sollol_locality.testing.workload import run_parallel, run_sequential, warm_up

__all__ = [
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
    "render_markdown",
    "render_png",
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
}
"""Scenario letter -> key of :data:`benchmarks.machines.SCENARIOS`."""

REQUIRED: Final = ("a", "b", "c", "d", "e")
EXTRA: Final = ("f",)

POLICIES: Final = (
    ("sollol_parallel", "SOLLOL always-parallel"),
    ("sollol_pool", "SOLLOL pool rule"),
    ("priors", "sollol-locality, priors"),
    ("calibrated", "sollol-locality, calibrated"),
)


@dataclass(frozen=True, slots=True)
class Settings:
    """One benchmark configuration.

    Attributes:
        chunks: K, the chunks of the long-form job.
        tokens: ``num_predict`` of each chunk (and of each calibration generate).
        repeats: interleaved rounds of every strategy.
        calibration_rounds: ``calibrate(rounds=...)``.
        weights_mb: emulator weight matrix (MiB).
    """

    chunks: int = 4
    tokens: int = 32
    repeats: int = 7
    calibration_rounds: int = 3
    weights_mb: int = DEFAULT_WEIGHTS_MB


FULL: Final = Settings()
QUICK: Final = Settings(chunks=4, tokens=16, repeats=3, calibration_rounds=2)


@dataclass(frozen=True, slots=True)
class Arm:
    """One way of running the job: ``mode`` on ``urls`` (sequential: ``urls[0]`` only)."""

    mode: str
    urls: tuple[str, ...]

    def label(self, names: dict[str, str], total: int) -> str:
        if self.mode == "sequential":
            return f"sequential {names[self.urls[0]]}"
        if len(self.urls) == total:
            return "all-parallel"
        return "parallel " + "+".join(names[u] for u in self.urls)


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
    policies: dict[str, PolicyResult] = field(default_factory=dict)
    walls: dict[Arm, list[float]] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    seconds: float = 0.0

    # -- derived figures --------------------------------------------------------------------

    def makespan(self, arm: Arm) -> float:
        return statistics.median(self.walls[arm])

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

    def to_json(self) -> dict[str, Any]:
        """Everything measured, as plain data (:meth:`from_json` reads it back)."""
        base = {"letter": self.letter, "scenario": self.key, "description": self.description}
        if self.skipped:
            return {**base, "skipped": self.skipped}
        return {
            **base,
            "nodes": [{"name": self.names[u], "url": u, "machine": self.machines[u]}
                      for u in self.names],
            "strategies": [{"label": self.label(a), "mode": a.mode, "urls": list(a.urls),
                            "makespan": self.makespan(a), "walls": w}
                           for a, w in self.walls.items()],
            "policies": {
                name: {"choice": self.label(p.arm), "mode": p.arm.mode, "urls": list(p.arm.urls),
                       "regret": self.regret(p.arm), "predicted_speedup": p.predicted_speedup,
                       "predicted_all_parallel": p.predicted_all_parallel, "reason": p.reason}
                for name, p in self.policies.items()
            },
            "calibration": self.calibration,
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
        result.walls = {Arm(a["mode"], tuple(a["urls"])): list(a["walls"])
                        for a in data["strategies"]}
        result.policies = {
            name: PolicyResult(Arm(p["mode"], tuple(p["urls"])), p["predicted_speedup"],
                               p["predicted_all_parallel"], p["reason"])
            for name, p in data["policies"].items()}
        result.calibration = data["calibration"]
        result.seconds = data["seconds"]
        return result


# ------------------------------------------------------------------------------------------
# The policies


def sollol_registry(urls: Sequence[str]) -> Any:
    """SOLLOL's own registry holding ``urls`` as healthy ``OllamaNode`` objects (inserted
    directly: ``add_node`` would health-check and resolve this machine's host name)."""
    from sollol.ollama_node import OllamaNode
    from sollol.registry import NodeRegistry

    registry = NodeRegistry()
    for url in urls:
        registry.nodes[url] = OllamaNode(url)
    return registry


def sollol_pool(urls: Sequence[str]) -> Any:
    from sollol.pool import OllamaPool

    pool = OllamaPool.__new__(OllamaPool)
    pool.nodes = [OllamaPool._normalize_node(pool, url) for url in urls]
    return pool


def offline_config(calibration_file: Path | None) -> Any:
    from sollol_locality import LocalityConfig

    # IP literals only: nothing is resolved; a closed loopback port stands in for a nameserver.
    return LocalityConfig(mode="auto", min_speedup=1.0, topology_file=None,
                          nameservers=(("127.0.0.1", 9),), dns_timeout=0.5,
                          calibration_file=calibration_file)


def _library_policy(urls: Sequence[str], chunks: int, calibration_file: Path | None
                    ) -> PolicyResult:
    from sollol_locality import LocalityAwareLoadBalancer

    balancer = LocalityAwareLoadBalancer(sollol_registry(urls),
                                         locality_config=offline_config(calibration_file))
    plan = balancer.plan_execution(chunks)
    arm = Arm(plan.mode, tuple(node.url for node in plan.nodes))
    return PolicyResult(arm, plan.speedup, plan.naive_speedup, plan.reason)


def decide(urls: Sequence[str], chunks: int, calibration_file: Path | None
           ) -> dict[str, PolicyResult]:
    """Each policy's choice for ``chunks`` chunks on ``urls`` (calibrated only with a file)."""
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


# ------------------------------------------------------------------------------------------
# Running a scenario


def _say(line: str) -> None:
    print(f"[dispatch] {line}", file=sys.stderr, flush=True)


def _run_arm(arm: Arm, settings: Settings) -> float:
    if arm.mode == "sequential":
        result = run_sequential(arm.urls[0], settings.chunks, num_predict=settings.tokens)
    else:
        result = run_parallel(arm.urls, settings.chunks, num_predict=settings.tokens)
    return result.wall_seconds


def measure(arms: Sequence[Arm], settings: Settings, *, say: Callable[[str], None] = _say,
            names: dict[str, str] | None = None) -> dict[Arm, list[float]]:
    """``settings.repeats`` rounds of every arm; the order rotates each round (and reverses on
    odd rounds), so no arm always runs first or after the same neighbour. ``names`` (url ->
    "n1") labels the progress lines."""
    walls: dict[Arm, list[float]] = {arm: [] for arm in arms}
    count = len(arms)
    for round_number in range(settings.repeats):
        order = [arms[(i + round_number) % count] for i in range(count)]
        if round_number % 2:
            order.reverse()
        for arm in order:
            walls[arm].append(_run_arm(arm, settings))
        shown = ", ".join(f"{arm.label(names, count) if names else arm.mode}="
                          f"{walls[arm][-1]:.2f}s" for arm in arms)
        say(f"round {round_number + 1}/{settings.repeats}: {shown}")
    return walls


def _calibration_summary(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))

    def med(values: list[float]) -> float:
        return statistics.median(values)

    return {
        "task_seconds": {k: med(v) for k, v in data.get("task_seconds", {}).items()},
        "contention": {u: {k: med(v) for k, v in by_k.items()}
                       for u, by_k in data.get("contention", {}).items()},
        "host_overhead": {k: med(v) for k, v in data.get("host_overhead", {}).items()},
        "dispatch_overhead": (med(data["dispatch_overhead"])
                              if data.get("dispatch_overhead") else None),
        "observations": data.get("observations", 0),
    }


def run_scenario(letter: str, settings: Settings, workdir: Path, *,
                 say: Callable[[str], None] = _say) -> ScenarioResult:
    """Start the scenario, calibrate, decide, measure every strategy; clean up everything."""
    from sollol_locality.probe import calibrate

    key = LETTERS[letter]
    scenario = SCENARIOS[key]
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
        say(f"({letter}) {key}: " + ", ".join(f"{result.names[u]}={u} ({result.machines[u]})"
                                              for u in urls))
        warm_up(urls, model=DEFAULT_MODEL)
        calibration_file = workdir / f"calibration-{key}.json"
        calibrate(urls, model=DEFAULT_MODEL, num_predict=settings.tokens,
                  rounds=settings.calibration_rounds, output=calibration_file,
                  config=offline_config(None), progress=lambda line: say(f"  calibrate: {line}"))
        result.calibration = _calibration_summary(calibration_file)
        result.policies = decide(urls, settings.chunks, calibration_file)
        order = {url: i for i, url in enumerate(urls)}
        for policy in result.policies.values():
            # One strategy however its nodes are listed (a plan lists the best node first).
            if policy.arm.mode == "parallel":
                policy.arm = Arm("parallel", tuple(sorted(policy.arm.urls, key=order.__getitem__)))
        arms: list[Arm] = [Arm("sequential", (urls[0],)), result.all_parallel]
        for policy in result.policies.values():
            if policy.arm not in arms:
                arms.append(policy.arm)
        for name, policy in result.policies.items():
            say(f"  {name}: {policy.arm.label(result.names, len(urls))}"
                + (f" (predicted {policy.predicted_speedup:.2f}x)"
                   if policy.predicted_speedup is not None else ""))
        result.walls = measure(arms, settings, say=say, names=result.names)
    result.seconds = time.perf_counter() - started
    return result


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


def checks(results: Sequence[ScenarioResult]) -> dict[str, Any]:
    """The acceptance figures over the required scenarios that ran."""
    required = [r for r in results if not r.skipped and r.letter in REQUIRED]
    if not required:
        return {}
    regrets = {r.letter: r.regret(r.policies["calibrated"].arm) for r in required}
    margins = {  # calibrated makespan / the better SOLLOL rule's
        r.letter: r.makespan(r.policies["calibrated"].arm)
        / min(r.makespan(r.policies[n].arm) for n in ("sollol_parallel", "sollol_pool"))
        for r in required}
    errors = {f"{r.letter} {kind}": p / m - 1
              for r in required
              for kind, (p, m) in zip(("plan", "all-parallel"), _predictions(r), strict=True)}
    return {
        "worst_regret": max(regrets.values()),
        "regret_ok": max(regrets.values()) <= 1.05,
        "worst_against_sollol": max(margins.values()),
        "never_worse_than_sollol": max(margins.values()) <= 1.0 + RESOLUTION,
        "largest_prediction_error": max(errors.values(), key=abs),
        "predictions_ok": all(abs(e) <= 0.20 for e in errors.values()),
    }


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
        "sequentially on one node, in parallel on every node (what SOLLOL does today), and as "
        "each policy decides (a subset such as one node per machine is a strategy of its own).")
    add(f"* **Nodes**: Ollama emulators (`benchmarks/emulator.py`, {settings.weights_mb} MB of "
        "weights, one generate at a time as Ollama); a machine is a set of pinned CPUs, other "
        "machines are network namespaces (`benchmarks/machines.py`); nothing leaves this host.")
    add("* **Policies**: SOLLOL's `SOLLOLLoadBalancer.should_use_parallel()` and "
        "`OllamaPool.should_use_parallel_execution(K)` (the real methods, SOLLOL "
        f"{context['sollol']}), and `LocalityAwareLoadBalancer.plan_execution(K)` with the "
        "priors only, then after `sollol_locality.calibration.calibrate("
        f"rounds={settings.calibration_rounds}, num_predict={settings.tokens})` ran against the "
        "scenario's live nodes and wrote the calibration file its config points at.")
    add(f"* **Machine**: {context['cpus']} CPUs, Python {context['python']}; load average "
        f"{context['load_before']} before the run, {context['load_after']} after.")
    add("")
    add("**Regret** = the makespan of the strategy the policy picked / the best makespan measured "
        f"in the scenario (1.00: it picked the fastest). Makespans within {RESOLUTION:.0%} of "
        "each other are a tie (=).")
    add("")
    add("| scenario | best measured | SOLLOL always-parallel | SOLLOL pool rule "
        "| sollol-locality, priors | **sollol-locality, calibrated** |")
    add("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        title = f"({r.letter}) {r.key}" + (" *(extra)*" if r.letter in EXTRA else "")
        if r.skipped:
            add(f"| {title} | skipped: {r.skipped} | | | | |")
            continue
        best = r.makespan(r.best)
        tied = [a for a in sorted(r.walls, key=r.makespan)
                if r.makespan(a) <= best * (1 + RESOLUTION)]
        cells = []
        for name, _ in POLICIES:
            policy = r.policies[name]
            text = f"{r.label(policy.arm)}: {r.regret(policy.arm):.2f}"
            cells.append(f"**{text}**" if name == "calibrated" else text)
        add(f"| {title} | {' = '.join(r.label(a) for a in tied)} | " + " | ".join(cells) + " |")
    add("")
    summary = checks(results)
    if summary:
        def ok(flag: bool) -> str:
            return "yes" if flag else "**no**"

        add("Over the required scenarios (a)-(e): calibrated regret <= 1.05 in every one: "
            f"{ok(summary['regret_ok'])} (worst {summary['worst_regret']:.2f}); never worse than "
            f"the better of SOLLOL's two rules: {ok(summary['never_worse_than_sollol'])} "
            f"(calibrated makespan / the better rule's, worst "
            f"{summary['worst_against_sollol']:.2f}); calibrated predicted speedups within 20% "
            f"of measured: {ok(summary['predictions_ok'])} (largest error "
            f"{summary['largest_prediction_error'] * 100:+.0f}%).")
        add("")
    add("## Predicted against measured speedup")
    add("")
    add("Speedup = the fastest sequential makespan measured / the strategy's makespan. "
        "\"All-parallel\" is `plan.naive_speedup`, the library's prediction for dispatching "
        "to every node at once.")
    add("")
    add("| scenario | calibrated plan | predicted | measured | error "
        "| all-parallel, predicted by priors | predicted calibrated | measured | error |")
    add("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in ran:
        cal, pri = r.policies["calibrated"], r.policies["priors"]
        (plan_p, plan_m), (all_p, all_m) = _predictions(r)
        assert pri.predicted_all_parallel is not None
        add(f"| ({r.letter}) {r.key} | {r.label(cal.arm)} | {plan_p:.2f}x | {plan_m:.2f}x "
            f"| {_error(plan_p, plan_m)} | {pri.predicted_all_parallel:.2f}x | {all_p:.2f}x "
            f"| {all_m:.2f}x | {_error(all_p, all_m)} |")
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
        spans = "; ".join(f"{r.label(a)}: {r.makespan(a):.2f} s"
                          for a in sorted(r.walls, key=r.makespan))
        add(f"| ({r.letter}) {r.key} | {nodes} | {spans} |")
    add("")
    add("## What calibration learned")
    add("")
    add("Medians of the samples in each scenario's calibration file. Contention `c`: k nodes "
        "sharing one unit each take k x (1 + c) times as long per task as one alone (0: pure "
        "time-sharing; the prior is 1.0). Dispatch overhead: what running on several machines "
        "at once loses (the prior is 0.05).")
    add("")
    add("| scenario | seconds per task, per unit | contention c | dispatch overhead |")
    add("| --- | --- | --- | --- |")
    for r in ran:
        learned = r.calibration
        tasks = ", ".join(f"{u}: {v:.3f}" for u, v in learned["task_seconds"].items())
        cont = ", ".join(f"{u} k={k}: {c:+.3f}" for u, by_k in learned["contention"].items()
                         for k, c in by_k.items()) or "-"
        disp = (f"{learned['dispatch_overhead']:.3f}"
                if learned["dispatch_overhead"] is not None else "-")
        add(f"| ({r.letter}) {r.key} | {tasks} | {cont} | {disp} |")
    add("")
    add("## Why (the calibrated plan's reason)")
    add("")
    for r in ran:
        add(f"* ({r.letter}) {r.policies['calibrated'].reason}")
    add("")
    return "\n".join(lines)


def _short(r: ScenarioResult) -> str:
    name = textwrap.fill(r.key.replace("-", " "), 13)
    return f"({r.letter}) {name}" + ("\n(extra)" if r.letter in EXTRA else "")


def render_png(results: Sequence[ScenarioResult], path: Path) -> None:
    """Left: each policy's regret per scenario. Right: the speedup of dispatching to every node
    at once, predicted by the priors, predicted after calibration, and measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in results if not r.skipped]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.2),
                                      gridspec_kw={"width_ratios": [3, 2]})
    labels = [_short(r) for r in ran]
    colours = ("#c44e52", "#dd8452", "#8c8c8c", "#4c72b0")
    width = 0.8 / len(POLICIES)
    top = 1.0
    for i, ((name, title), colour) in enumerate(zip(POLICIES, colours, strict=True)):
        values = [r.regret(r.policies[name].arm) for r in ran]
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
                f"unknown scenario {item!r}: expected letters a-f or keys "
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
    parser.add_argument("--scenarios", type=_parse_scenarios, default=list(REQUIRED + EXTRA),
                        help="comma-separated letters or keys (default a,b,c,d,e,f)")
    parser.add_argument("--out", type=Path, default=Path("docs"),
                        help="directory for benchmark.md and benchmark.png (default docs)")
    parser.add_argument("--no-write", action="store_true", help="print only; write no files")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write every measurement (each round) as JSON")
    parser.add_argument("--from-json", type=Path, metavar="FILE",
                        help="measure nothing: render the tables and chart of a run saved "
                             "with --json")
    args = parser.parse_args(argv)
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
        command = "python -m benchmarks.dispatch" + (" --quick" if args.quick else "")
        if args.scenarios != list(REQUIRED + EXTRA):
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
