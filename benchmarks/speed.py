"""Speed of the library against SOLLOL's own code, measured side by side in one run.

    python -m benchmarks.speed [--quick] [--json]

Prints ratios (ours / SOLLOL's; below 1.0 means faster), each the ratio of medians over
interleaved repetitions, so machine load affects both sides alike:

* the cost of ``import sollol_locality`` against ``import sollol.integration`` (each in a fresh
  interpreter, interpreter start-up subtracted); target <= 0.10;
* a warm ``NodeTopology.count_unique_hosts`` over 8 and 10,000 nodes against SOLLOL's
  ``OllamaPool.count_unique_physical_hosts`` on the same nodes;
* a warm ``ExecutionPlanner.plan`` over 8 nodes (target <= 0.25) and 10,000 nodes
  (target <= 1.0) against the same SOLLOL method.

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
from typing import Any

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


def sollol_pool(nodes: list[str]) -> Any:
    """An OllamaPool holding ``nodes``, without running its constructor (which starts threads,
    HTTP clients and a Dask cluster); the method measured only reads ``self.nodes``."""
    from sollol.pool import OllamaPool

    pool = OllamaPool.__new__(OllamaPool)
    pool.nodes = [OllamaPool._normalize_node(pool, n) for n in nodes]
    return pool


def run(quick: bool) -> dict[str, Any]:
    from sollol_locality import ExecutionPlanner, LocalityConfig, NodeTopology, ParallelismCostModel

    config = LocalityConfig(calibration_file=None, nameservers="127.0.0.1:9")
    topology = NodeTopology(config)
    planner = ExecutionPlanner(topology, ParallelismCostModel(config), config)
    repeats = 5 if quick else 15
    results: dict[str, Any] = {"python": sys.version.split()[0]}
    results["import"] = import_ratio(3 if quick else 9)
    big = many_nodes(10_000)
    for label, nodes, calls in (("8", EIGHT, 200 if quick else 2000),
                                ("10000", big, 1 if quick else 3)):
        pool = sollol_pool(nodes)
        results[f"count_unique_hosts_{label}"] = side_by_side(
            lambda n=nodes: topology.count_unique_hosts(n),
            pool.count_unique_physical_hosts, calls, repeats)
        results[f"plan_{label}"] = side_by_side(
            lambda n=nodes: planner.plan(3, n), pool.count_unique_physical_hosts, calls, repeats)
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


if __name__ == "__main__":
    main()
