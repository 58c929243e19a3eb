"""Benchmarks for sollol-locality (not shipped in the wheel).

* :mod:`benchmarks.dispatch`: policies against measured makespans on simulated machines;
* :mod:`benchmarks.speed`: decision and import time against SOLLOL's;
* :mod:`benchmarks.reliability`: DNS faults, hostile input, concurrency, scale, crash safety.

The machinery they run on (the Ollama emulator, simulated machines, the workload, the loopback DNS
server) is :mod:`sollol_locality.testing`, which the tests import too.

Run from the repository root so ``python -m benchmarks.<module>`` finds this package.
"""
