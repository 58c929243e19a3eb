"""Test support shipped with sollol-locality: what the tests and the benchmarks both use.

Layer: testing, the top layer (above ``cli``). Its modules import from :mod:`sollol_locality`;
nothing in the library imports them, and ``import sollol_locality`` does not load this package.

* :mod:`sollol_locality.testing.dnsserver`: a loopback DNS server with zones, TTLs and faults on
  demand (silence, truncation, wrong ids, ...), for tests that must never send a packet elsewhere;
* :mod:`sollol_locality.testing.emulator`: an Ollama-compatible node whose tokens do
  memory-bandwidth-bound work, one request at a time or batched (``OLLAMA_NUM_PARALLEL``), run as
  ``python -m sollol_locality.testing.emulator`` or ``sollol-locality-emulator``;
* :mod:`sollol_locality.testing.machines`: simulated machines (this machine's loopback and LAN
  addresses, network namespaces, instances under ``taskset`` with their own environment) and the
  scenarios built from them;
* :mod:`sollol_locality.testing.workload`: a long-form job (K chunks) run sequentially on one
  node or in parallel across several (per-node task counts and concurrency), and the arms a
  benchmark measures side by side;
* :mod:`sollol_locality.testing.baselines`: SOLLOL's registry and pool holding given nodes, and
  a configuration of ours that reads nothing;
* :mod:`sollol_locality.testing.fakes`: node objects, a registry, a minimal balancer, a clock;
* :mod:`sollol_locality.testing.cases`: the DNS-fault and hostile-input case tables and the
  calibration writer, shared by the tests and the reliability benchmark;
* :mod:`sollol_locality.testing.properties`: the hostile-input Hypothesis properties (needs
  Hypothesis and pytest);
* :mod:`sollol_locality.testing.reliability`: the concurrency and scale workloads.

Nothing in the tests is imported by a benchmark, and no test imports ``benchmarks``.
"""
