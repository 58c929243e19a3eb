"""The dispatch benchmark at another job size, and on layouts it does not ship.

    python -m benchmarks.sizes --chunks 6 --scenarios k,l,f
    python -m benchmarks.sizes --chunks 4 --scenarios x,y

Each scenario runs exactly as in ``python -m benchmarks.dispatch`` (start, calibrate, decide,
the online jobs, then every strategy measured side by side), with ``--chunks`` chunks per job;
the regret table is printed and nothing is written. Two layouts are added to the benchmark's
letters, to check the decision on clusters its scenarios do not name:

* ``x`` three-on-one-core: three namespaces on CPU 0 (one hidden unit of three) and one on CPU 1;
* ``y`` pair-and-loopback: a hidden pair of namespaces on CPU 1 beside a loopback node on CPU 0.

Needs root for the namespaces, like the benchmark.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks import dispatch
from sollol_locality.testing.machines import MachineSpec, NodeSpec, Scenario

EXTRA = {
    "x": Scenario(
        "three-on-one-core", "three namespaces on CPU 0 (one hidden unit of three), one on CPU 1",
        (MachineSpec("a1", (0,), "10.213.81.2", host="boxA"),
         MachineSpec("a2", (0,), "10.213.82.2", host="boxA"),
         MachineSpec("a3", (0,), "10.213.83.2", host="boxA"),
         MachineSpec("b1", (1,), "10.213.84.2", host="boxB")),
        tuple(NodeSpec(m, "netns") for m in ("a1", "b1", "a2", "a3")),
    ),
    "y": Scenario(
        "pair-and-loopback", "a hidden pair of namespaces on CPU 1 and a loopback node on CPU 0",
        (MachineSpec("local", (0,)), MachineSpec("v1", (1,), "10.213.91.2", host="boxV"),
         MachineSpec("v2", (1,), "10.213.92.2", host="boxV")),
        (NodeSpec("local", "loopback"), NodeSpec("v1", "netns"), NodeSpec("v2", "netns")),
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sizes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=dispatch.FULL.chunks,
                        help="chunks per job (default: the benchmark's)")
    parser.add_argument("--scenarios", default="k,l,x,y",
                        help="letters, comma-separated: the benchmark's and x, y")
    args = parser.parse_args(argv)
    if args.chunks < 2:
        parser.error(f"--chunks {args.chunks}: expected at least 2")
    chosen = [part.strip() for part in args.scenarios.split(",") if part.strip()]
    unknown = [letter for letter in chosen
               if letter not in dispatch.LETTERS and letter not in EXTRA]
    if unknown:
        parser.error(f"unknown scenario letter(s) {', '.join(unknown)}: "
                     f"expected some of {', '.join(sorted([*dispatch.LETTERS, *EXTRA]))}")
    settings = dataclasses.replace(dispatch.FULL, chunks=args.chunks)
    with tempfile.TemporaryDirectory(prefix="sollol-sizes-") as workdir:
        results = [dispatch.run_scenario(letter, settings, Path(workdir),
                                         scenario=EXTRA.get(letter)) for letter in chosen]
    print(f"{settings}")
    print("\n".join(dispatch._regret_table(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
