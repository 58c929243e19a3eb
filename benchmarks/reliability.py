"""Reliability figures: DNS faults, hostile input, concurrency, memory and scale, crash safety.

    python -m benchmarks.reliability [--quick] [--json]

Run from the repository root. Everything talks only to this machine: DNS goes to loopback servers
started here (:mod:`sollol_locality.testing.dnsserver`), nothing else leaves the process but a
child writer that is killed on purpose. Prints Markdown tables (``--json``: one JSON object);
RELIABILITY.md quotes a full run. The workloads live in :mod:`sollol_locality.testing.reliability`,
which the test suite runs in short versions (the concurrency and scale tests).

Sections:

* **faults**: every DNS fault case of :mod:`sollol_locality.testing.cases` (the fault tests run
  them too) at the decision level (plan, count,
  should_parallelize), the worst decision latency against ``dns_timeout`` + 25%, and the query
  bursts a failing server sees over 40 simulated seconds of repeated decisions;
* **hostile input**: the Hypothesis properties of :mod:`sollol_locality.testing.properties`
  (the hostile-input tests run them with 200 examples) with many more, and the number of inputs
  each one tried;
* **concurrency**: 16 threads deciding for 30 s while TTLs expire and refresh, interface addresses
  and DNS answers change and calibration observations arrive; every answer checked against the
  possible states of the world; threads, file descriptors and refresh threads counted;
* **scale**: a million distinct names through the resolver cache (bounded by ``maxsize``), real
  loopback DNS churn, and a 10,000-node decision under :mod:`tracemalloc`;
* **crash safety**: a writer saving the calibration file in a loop is killed at random moments;
  the file must always load.

The faults, hostile-input and crash-safety sections share their case tables, properties and the
calibration writer with the tests through :mod:`sollol_locality.testing`; nothing here reads the
test suite.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sollol_locality.testing import cases
from sollol_locality.testing.dnsserver import DnsTestServer
from sollol_locality.testing.reliability import (
    _rss_mb,
    big_decision,
    churn_over_dns,
    churn_resolver_cache,
    churn_topology,
    open_fds,
    run_concurrency,
)

REPO = Path(__file__).resolve().parent.parent


# =============================================================================================
# Faults


@contextmanager
def _servers() -> Iterator[Callable[..., Any]]:
    made: list[Any] = []

    def make(zones: Any = None, **options: Any) -> Any:
        server = DnsTestServer(zones, **options).start()
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            server.stop()


def fault_matrix() -> list[dict[str, Any]]:
    """Every DNS fault case: the worst decision latency over the three decision
    entry points and the repeated decisions, and the bursts of queries in 40 simulated s."""
    rows = []
    for case in cases.CASES:
        row: dict[str, Any] = {"fault": case.id, "worst_s": 0.0, "first_s": {}, "bursts": 0,
                               "queries": 0, "resolved_first": case.resolved}
        for api in cases.APIS:
            with _servers() as make:
                world = cases.build(make, case, api)
                result, elapsed = cases.timed(world.decide)
                cases.check_outcome(world, case, api, result, case.resolved)
                row["first_s"][api] = elapsed
                row["worst_s"] = max(row["worst_s"], elapsed)
                if api != "count":
                    continue
                for _ in range(20):
                    world.clock.tick(0.01)
                    row["worst_s"] = max(row["worst_s"], cases.timed(world.decide)[1])
                after_first = world.queries
                bursts = 0
                for _ in range(cases.WINDOW):
                    world.clock.tick(1.0)
                    before = world.queries
                    row["worst_s"] = max(row["worst_s"], cases.timed(world.decide)[1])
                    world.resolver.wait_idle(10)
                    bursts += world.queries > before
                row["bursts"] = bursts
                row["queries_first"] = after_first
                row["queries"] = world.queries
                row["bursts_allowed"] = case.bursts
        row["bound_s"] = cases.BOUND
        row["within_bound"] = row["worst_s"] <= cases.BOUND
        rows.append(row)
    return rows


# =============================================================================================
# Hostile input


def hostile_input(examples: int) -> dict[str, Any]:
    from sollol_locality.testing import properties

    failures = []
    start = time.perf_counter()
    for name in properties.PROPERTIES:
        try:
            properties.property_test(name, examples)()
        except Exception as exc:  # reported, not hidden
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    return {"examples_per_property": examples, "tried": dict(properties.TRIED),
            "table_cases": len(cases.VALID) + len(cases.INVALID), "failures": failures,
            "seconds": time.perf_counter() - start}


# =============================================================================================
# Crash safety


def kill_loop(kills: int, *, workdir: Path) -> dict[str, Any]:
    path = workdir / "calibration.json"
    rng = random.Random(7)
    torn, mid_save, versions = 0, 0, collections.Counter[int]()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(kills):
        for leftover in workdir.glob(".calibration.json.*.tmp"):
            leftover.unlink()
        child = subprocess.Popen([sys.executable, "-c", cases.CALIBRATION_WRITER, str(path),
                                  "loop"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 cwd=REPO, env=env)
        assert child.stdout is not None
        child.stdout.readline()
        begun = time.perf_counter()
        child.stdout.readline()
        cycle = time.perf_counter() - begun
        time.sleep(rng.random() * cycle)  # a random moment of the save cycle, not a wait
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        child.stdout.close()
        if child.stdin is not None:
            child.stdin.close()
        mid_save += any(workdir.glob(".calibration.json.*.tmp"))
        try:
            data = json.loads(path.read_text())
            versions[data["observations"]] += 1
        except (ValueError, KeyError):
            torn += 1
    return {"kills": kills, "torn_files": torn, "kills_inside_a_save": mid_save,
            "versions_found": dict(versions)}


# =============================================================================================
# Report


def run(quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {"quick": quick, "python": sys.version.split()[0],
                               "cpus": os.cpu_count()}
    results["process_before"] = {"threads": threading.active_count(), "fds": open_fds(),
                                 "rss_mb": _rss_mb()}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        results["faults"] = fault_matrix()
        run_concurrency(1.0)  # warm-up: first-use imports and caches are not a leak
        results["concurrency"] = asdict(run_concurrency(5.0 if quick else 30.0))
        results["churn"] = churn_resolver_cache(100_000 if quick else 1_000_000)
        results["churn_topology"] = churn_topology(70_000 if quick else 200_000)
        with _servers() as make:
            results["churn_dns"] = churn_over_dns(make({}), 1_000 if quick else 5_000)
        results["big_decision"] = big_decision(10_000, workdir=workdir)
        (workdir / "kills").mkdir()
        results["kills"] = kill_loop(10 if quick else 50, workdir=workdir / "kills")
        results["hostile"] = hostile_input(500 if quick else 5000)  # last: its globals grow
    gc.collect()
    results["process_after"] = {"threads": threading.active_count(), "fds": open_fds(),
                                "rss_mb": _rss_mb()}
    return results


def markdown(r: dict[str, Any]) -> str:
    lines = [f"Python {r['python']}, {r['cpus']} CPUs{', --quick' if r['quick'] else ''}.", ""]
    lines += ["### DNS faults (decision level)", "",
              "| fault | first decision: plan / count / should_parallelize (s) | worst (s) "
              "| bound (s) | resolved | query bursts in 40 s (allowed) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for row in r["faults"]:
        first = " / ".join(f"{row['first_s'][a]:.3f}" for a in ("plan", "count",
                                                               "should_parallelize"))
        lines.append(f"| {row['fault']} | {first} | {row['worst_s']:.3f} | {row['bound_s']:.2f} "
                     f"| {'yes' if row['resolved_first'] else 'no'} | {row['bursts']} "
                     f"({row['bursts_allowed']}) |")
    h = r["hostile"]
    lines += ["", "### Hostile input (Hypothesis)", "",
              "| property | inputs tried |", "| --- | --- |"]
    lines += [f"| {name} | {count} |" for name, count in h["tried"].items()]
    lines += [f"| table cases (parametrised) | {h['table_cases']} |", "",
              f"Failures: {h['failures'] or 'none'}."]
    c = r["concurrency"]
    lines += ["", "### Concurrency", "", "| figure | value |", "| --- | --- |",
              f"| threads x seconds | {c['threads']} x {c['seconds']:.0f} |",
              f"| decisions (count, group, plan, should_parallelize, describe) | "
              f"{c['decisions']} |",
              f"| calibration observations | {c['observations']} |",
              f"| calibration saves | {c['saves']} |",
              f"| interface changes / DNS record changes | {c['interface_changes']} / "
              f"{c['dns_changes']} |",
              f"| local snapshot versions / background DNS refreshes | {c['local_versions']} / "
              f"{c['refreshes']} |",
              f"| exceptions / inconsistent answers | {len(c['errors'])} / "
              f"{len(c['inconsistent'])} |",
              f"| host counts seen | {c['counts_seen']} |",
              f"| most refresh threads at once | {c['max_refresh_threads']} |",
              f"| threads before / after | {c['threads_before']} / {c['threads_after']} |",
              f"| file descriptors before / after | {c['fds_before']} / {c['fds_after']} |",
              f"| live objects before / after | {c['objects_before']} / {c['objects_after']} |",
              f"| RSS before / after (MB) | {c['rss_before_mb']:.0f} / "
              f"{c['rss_after_mb']:.0f} |"]
    ch, cd, b, ct = r["churn"], r["churn_dns"], r["big_decision"], r["churn_topology"]
    lines += ["", "### Memory and scale", "", "| figure | value |", "| --- | --- |",
              f"| distinct names through the resolver cache | {ch['names']:,} |",
              f"| cache maxsize / largest seen / at end | {ch['maxsize']} / "
              f"{ch['largest_cache']} / {ch['final_cache']} |",
              f"| traced memory when first full / at end (MB) | "
              f"{ch['memory_when_full_mb']:.2f} / {ch['memory_at_end_mb']:.2f} |",
              f"| topology memo: distinct node names / bound / largest seen | "
              f"{ct['names']:,} / {ct['memo_max']:,} / {ct['largest_memo']:,} |",
              f"| topology memo: peak traced memory (MB) | {ct['peak_mb']:.0f} |",
              f"| loopback DNS: distinct names / maxsize / largest seen | {cd['names']:,} / "
              f"{cd['maxsize']} / {cd['largest_cache']} |",
              f"| 10,000-node decision: nodes / hosts (expected) | {b['nodes']:,} / "
              f"{b['unique_hosts']:,} ({b['expected_hosts']:,}) |",
              f"| 10,000-node decision: peak traced memory cold / warm (MB) | "
              f"{b['cold_peak_mb']:.1f} / {b['warm_peak_mb']:.1f} |",
              f"| 10,000-node decision: memory retained after (MB) | {b['retained_mb']:.1f} |",
              f"| 10,000-node decision: warm / cold time | {b['warm_over_cold_time']:.2f} |"]
    k, pb, pa = r["kills"], r["process_before"], r["process_after"]
    lines += ["", "### Crash safety and the whole run", "", "| figure | value |",
              "| --- | --- |",
              f"| writer killed at random moments | {k['kills']} |",
              f"| ... of which inside a save (temporary file left) | "
              f"{k['kills_inside_a_save']} |",
              f"| torn calibration files | {k['torn_files']} |",
              f"| threads before / after the whole run | {pb['threads']} / {pa['threads']} |",
              f"| file descriptors before / after | {pb['fds']} / {pa['fds']} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about a minute)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    # The library logs a warning per changed decision; thousands of them are not the report.
    quiet = logging.getLogger("sollol_locality")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    results = run(args.quick)
    print(json.dumps(results, indent=2, default=str) if args.json else markdown(results))
    c = results["concurrency"]
    problems = (c["errors"] or c["inconsistent"] or results["hostile"]["failures"]
                or results["kills"]["torn_files"]
                or not all(row["within_bound"] for row in results["faults"]))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
