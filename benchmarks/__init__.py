"""Benchmark infrastructure for sollol-locality (not shipped in the wheel).

* :mod:`benchmarks.emulator`: an Ollama-compatible node whose tokens do memory-bandwidth-bound
  work, one generate at a time, runnable as ``python -m benchmarks.emulator``.
* :mod:`benchmarks.machines`: simulated machines (this machine's loopback and LAN addresses,
  network namespaces pinned to their own cores) and the scenarios built from them.
* :mod:`benchmarks.workload`: a long-form job (K chunks) run sequentially on one node or in
  parallel across several, timed with :func:`time.perf_counter`.

Run from the repository root so ``python -m benchmarks.<module>`` finds this package.
"""
