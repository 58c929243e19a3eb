"""Speed of the library against SOLLOL's own code, measured side by side in one run.

    python -m benchmarks.speed [--quick] [--json]

Prints ratios (ours / SOLLOL's; below 1.0 means faster), each the ratio of medians over
interleaved repetitions, so machine load affects both sides alike:

* the cost of ``import sollol_locality`` against ``import sollol.integration`` (each in a fresh
  interpreter, interpreter start-up subtracted); target <= 0.10;
* a warm ``NodeTopology.count_unique_hosts`` over 8 and 10,000 nodes against SOLLOL's
  ``OllamaPool.count_unique_physical_hosts`` on the same nodes;
* a warm ``ExecutionPlanner.plan`` over 8 nodes (target <= 0.25) and 10,000 nodes
  (target <= 1.0) against the same SOLLOL method;
* the cold decision for 10**9 tasks against the cold decision for 3 tasks over 8 IP-literal
  nodes (target <= 2.0: a decision's cost does not grow with the task count). Cold: a fresh
  ``ExecutionPlanner`` (an empty decision cache) for every call, on one warm topology and cost
  model, the two task counts alternating. It is measured in a child process with a deadline
  (:data:`COLD_DEADLINE`), after one cold plan of 10**6 tasks in another (stopped after 5 x
  :data:`COLD_PROBE_LIMIT`): when that takes more than :data:`COLD_PROBE_LIMIT` seconds, or a
  child runs past its deadline, the line says so instead of a ratio, so the benchmark never
  hangs on a planner whose cost grows with the task count.

The nodes are loopback spellings and IP literals, so neither side sends a DNS query (SOLLOL's
``gethostbyname`` answers them from the hosts file or the literal itself).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, Final

from sollol_locality.testing.baselines import offline_config, sollol_pool

COLD_PROBE_LIMIT: Final = 1.0
"""Seconds a cold plan of 10**6 tasks may take before the 10**9 measurement is skipped."""
COLD_DEADLINE: Final = 120.0
"""Seconds the child measuring cold decisions may run."""
BIG_TASKS: Final = 10**9

EIGHT_LITERALS = [
    "http://127.0.0.1:11434", "http://127.0.0.1:11435", "http://10.0.0.5:11434",
    "http://10.0.0.6:11434", "http://10.0.0.7:11434", "http://10.0.0.8:11434",
    "http://192.168.1.20:11434", "http://192.168.1.21:11434",
]

EIGHT = [
    "http://localhost:11434", "http://localhost:11435", "http://127.0.0.1:11436",
    "http://10.0.0.5:11434", "http://10.0.0.6:11434", "http://10.0.0.7:11434",
    "http://192.168.1.20:11434", "http://192.168.1.21:11434",
]


def many_nodes(count: int) -> list[str]:
    return [f"http://10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:{11434 + i % 3}"
            for i in range(count)]


def _import_seconds(statement: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True,
                   env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    return time.perf_counter() - start


def import_ratio(repeats: int) -> dict[str, float]:
    """Both imports as installed packages run them: with their bytecode compiled (pip compiles
    SOLLOL's on install, and ``pip install .`` ours; an editable checkout gets its
    ``__pycache__`` here, which git ignores), so neither side pays for compiling its source."""
    import compileall

    import sollol_locality

    compileall.compile_dir(os.path.dirname(sollol_locality.__file__), quiet=1)
    ours, theirs, bare = [], [], []
    _import_seconds("import sollol.integration, sollol_locality")  # warm the file cache
    for _ in range(repeats):
        bare.append(_import_seconds("pass"))
        ours.append(_import_seconds("import sollol_locality"))
        theirs.append(_import_seconds("import sollol.integration"))
    base = statistics.median(bare)
    mine = max(0.0, statistics.median(ours) - base)
    sollol = max(1e-9, statistics.median(theirs) - base)
    return {"ours_s": mine, "sollol_s": sollol, "ratio": mine / sollol}


def _per_call(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def side_by_side(ours: Callable[[], Any], theirs: Callable[[], Any], calls: int,
                 repeats: int) -> dict[str, float]:
    ours(), theirs()  # warm both
    a, b = [], []
    for _ in range(repeats):
        a.append(_per_call(ours, calls))
        b.append(_per_call(theirs, calls))
    mine, sollol = statistics.median(a), statistics.median(b)
    return {"ours_us": mine * 1e6, "sollol_us": sollol * 1e6, "ratio": mine / sollol}


def _components() -> tuple[Any, Any, Any]:
    from sollol_locality import NodeTopology, ParallelismCostModel

    config = offline_config(None)
    return config, NodeTopology(config), ParallelismCostModel(config)


def _cold_seconds(tasks: int, components: tuple[Any, Any, Any]) -> float:
    """One decision for ``tasks`` tasks over :data:`EIGHT_LITERALS` by a fresh planner."""
    from sollol_locality import ExecutionPlanner

    config, topology, cost_model = components
    planner = ExecutionPlanner(topology, cost_model, config)
    start = time.perf_counter()
    planner.plan(tasks, EIGHT_LITERALS)
    return time.perf_counter() - start


def cold_pair(repeats: int) -> dict[str, float]:
    """Cold decisions for 3 and for :data:`BIG_TASKS` tasks, alternating (in this process)."""
    components = _components()
    _cold_seconds(3, components)  # the topology learns the nodes once: what stays is the plan
    small: list[float] = []
    big: list[float] = []
    for i in range(repeats):
        for tasks in ((3, BIG_TASKS) if i % 2 == 0 else (BIG_TASKS, 3)):
            (small if tasks == 3 else big).append(_cold_seconds(tasks, components))
    mine, theirs = statistics.median(big), statistics.median(small)
    return {"big_us": mine * 1e6, "small_us": theirs * 1e6, "ratio": mine / theirs}


def cold_probe() -> float:
    """Seconds of one cold plan of 10**6 tasks (what the child of :func:`cold_ratio` runs
    first)."""
    return _cold_seconds(10**6, _components())


def _child(call: str, deadline: float) -> Any:
    """``benchmarks.speed.<call>`` in a child process; its JSON answer, or the reason there is
    none (a string)."""
    code = f"import json\nfrom benchmarks import speed\nprint(json.dumps(speed.{call}))"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=deadline, check=False)
    except subprocess.TimeoutExpired:
        return f"ran past {deadline:g} s and was stopped"
    if done.returncode != 0:
        return "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(done.stdout.strip().splitlines()[-1])


def cold_ratio(repeats: int) -> dict[str, Any]:
    """:func:`cold_pair` in a child process stopped after :data:`COLD_DEADLINE` seconds, once
    a cold plan of 10**6 tasks (another child, stopped after 5 x :data:`COLD_PROBE_LIMIT`)
    took at most :data:`COLD_PROBE_LIMIT` seconds."""
    probe_deadline = 5 * COLD_PROBE_LIMIT
    probe = _child("cold_probe()", probe_deadline)
    if isinstance(probe, str):
        return {"skipped": f"a cold plan of 10**6 tasks {probe}: 10**9 not measured"}
    if probe > COLD_PROBE_LIMIT:
        return {"skipped": f"a cold plan of 10**6 tasks took {probe:.2f} s (more than "
                           f"{COLD_PROBE_LIMIT:g} s): 10**9 not measured", "probe_s": probe}
    pair = _child(f"cold_pair({repeats})", COLD_DEADLINE)
    if isinstance(pair, str):
        return {"skipped": f"the cold 10**9 / 3 measurement {pair}", "probe_s": probe}
    return {**pair, "probe_s": probe}


def run(quick: bool) -> dict[str, Any]:
    from sollol_locality import ExecutionPlanner

    config, topology, cost_model = _components()
    planner = ExecutionPlanner(topology, cost_model, config)
    repeats = 5 if quick else 15
    results: dict[str, Any] = {"python": sys.version.split()[0]}
    results["import"] = import_ratio(3 if quick else 9)
    big = many_nodes(10_000)
    for label, nodes, calls in (("8", EIGHT, 200 if quick else 2000),
                                ("10000", big, 1 if quick else 3)):
        pool = sollol_pool(nodes)

        def count(n: list[str] = nodes) -> Any:
            return topology.count_unique_hosts(n)

        def plan(n: list[str] = nodes) -> Any:
            return planner.plan(3, n)

        results[f"count_unique_hosts_{label}"] = side_by_side(
            count, pool.count_unique_physical_hosts, calls, repeats)
        results[f"plan_{label}"] = side_by_side(
            plan, pool.count_unique_physical_hosts, calls, repeats)
    results["cold_tasks"] = cold_ratio(20 if quick else 100)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    results = run(args.quick)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    imp = results["import"]
    print(f"import sollol_locality / import sollol.integration: {imp['ratio']:.3f} "
          f"({imp['ours_s'] * 1e3:.1f} ms / {imp['sollol_s'] * 1e3:.1f} ms; target <= 0.10)")
    targets = {"plan_8": " (target <= 0.25)", "plan_10000": " (target <= 1.0)"}
    for key in ("count_unique_hosts_8", "count_unique_hosts_10000", "plan_8", "plan_10000"):
        row = results[key]
        name, count = key.rsplit("_", 1)
        print(f"warm {name} over {count} nodes / SOLLOL count_unique_physical_hosts: "
              f"{row['ratio']:.3f} ({row['ours_us']:.1f} us / {row['sollol_us']:.1f} us)"
              f"{targets.get(key, '')}")
    cold = results["cold_tasks"]
    if "skipped" in cold:
        print(f"cold plan of 10**9 tasks / of 3 tasks over 8 nodes: not measured, "
              f"{cold['skipped']} (target <= 2.0)")
    else:
        print(f"cold plan of 10**9 tasks / of 3 tasks over 8 nodes: {cold['ratio']:.3f} "
              f"({cold['big_us']:.1f} us / {cold['small_us']:.1f} us; target <= 2.0)")


if __name__ == "__main__":
    main()
