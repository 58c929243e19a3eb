"""An Ollama-compatible emulator node for benchmarks, integration tests and trying things out.

Layer: testing (above ``cli``); nothing in the library imports it. Run it as::

    sollol-locality-emulator --port 11434
    python -m sollol_locality.testing.emulator --host 127.0.0.1 --port 0 --weights-mb 256 --cpus 0
    OLLAMA_HOST=127.0.0.1:11435 OLLAMA_NUM_PARALLEL=4 taskset -c 1 sollol-locality-emulator

It prints exactly one line, ``READY http://HOST:PORT`` (the real port when ``--port 0``), once it
is listening, and exits cleanly on SIGTERM or SIGINT (and, with ``--exit-on-stdin-eof``, when its
parent goes away). Nothing else is written to stdout.

Configured like Ollama: ``OLLAMA_HOST`` (``host``, ``host:port`` or a URL) is the bind address
and ``OLLAMA_NUM_PARALLEL`` the number of requests decoded at once (default 1, as Ollama's);
``OLLAMA_EMULATOR_BATCH_COST`` (this emulator's own) the cost of batching. Flags (``--host``,
``--port``, ``--num-parallel``, ``--batch-cost``) override the environment.

Endpoints (Ollama's shapes):

* ``GET /`` and ``HEAD /``: ``Ollama is running``;
* ``GET /api/version``: ``{"version": ...}``;
* ``GET /api/tags``: the one model this node serves;
* ``GET /api/ps``: that model, always loaded (weights are in RAM from start-up), ``size_vram`` 0;
* ``POST /api/generate``: one answer object with ``model``, ``created_at``, ``response``, ``done``,
  ``done_reason``, ``context`` and the duration fields in nanoseconds (``total_duration``,
  ``load_duration``, ``prompt_eval_count``, ``prompt_eval_duration``, ``eval_count``,
  ``eval_duration``). ``options.num_predict`` is honoured (default ``--default-num-predict``;
  negative means the emulator's cap, :data:`UNBOUNDED_NUM_PREDICT`). Streaming is not emulated:
  even with ``"stream": true`` the answer is one final object, which a line-by-line (NDJSON)
  client reads as a single ``done`` chunk. An empty prompt only "loads" the model
  (``done_reason: "load"``), as Ollama does;
* ``GET /api/emulator``: this emulator's settings and counters (not an Ollama endpoint):
  ``num_parallel``, ``batch_cost``, ``backend``, ``sources`` (flag, environment or default),
  ``served`` (requests answered), ``in_flight`` and ``max_in_flight`` (requests in the batch, now
  and at most), ``max_batch`` (most sequences in one decode step), ``queued`` (requests that found
  every slot taken and waited), ``queue`` and ``max_queue`` (waiting now, at most),
  ``queue_wait_seconds`` (their total wait), ``steps``, ``tokens``, ``affinity``, ``environ``;
* ``GET /api/emulator/wait?waiting=N&timeout=S``: returns once N requests are queued or in the
  batch (408 after S seconds), and ``POST /api/emulator/pause`` / ``/resume`` hold and release
  decoding: a test lines requests up this way, without sleeping.

What a token costs: a float32 matrix-vector product over the whole weight matrix (``--weights-mb``,
held in RAM and bigger than the caches, so decode is memory-bandwidth-bound as CPU decode is), the
next input being the row the previous output selects. ``--slowdown S`` multiplies that work (S full
passes, the fraction as a partial pass), which stands in for a slower machine. The prompt costs one
pass per :data:`PROMPT_BATCH` prompt tokens (batched prompt processing).

Batching: one decode loop serves up to ``num_parallel`` requests by continuous batching. Each
step produces one token for every sequence in the batch and costs ``1 + batch_cost * (b - 1)``
passes for a batch of b (:data:`DEFAULT_BATCH_COST` says why 0.15). A new request joins the
batch at the next step; beyond the slots, requests wait in arrival order (FIFO), and the wait is
reported in ``load_duration`` (as in Ollama, where the time spent waiting for the scheduler is
part of ``load_duration`` and ``total_duration``). With the default of one slot this is one
generate at a time, in arrival order.

Without numpy: the decode work needs no extra package. ``--backend auto`` (the default) uses
numpy when it is importable (the benchmarks' setting: 256 MB of weights, real memory-bandwidth
contention between instances) and otherwise a hashlib backend, which hashes a fraction of the
weights per pass (:data:`HASH_FRACTION`), so a token costs about as long but contends less for
memory bandwidth. ``--help`` says which one ``auto`` picks here; ``/api/emulator`` reports it.

:func:`start_emulator` starts one in a subprocess (optionally inside a network namespace, under
``taskset``, with extra environment variables) and waits for its READY line with a deadline.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import ipaddress
import json
import math
import os
import selectors
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Final

__all__ = [
    "DEFAULT_BATCH_COST",
    "DEFAULT_MODEL",
    "DEFAULT_NUM_PREDICT",
    "DEFAULT_WEIGHTS_MB",
    "EMULATED_OLLAMA_VERSION",
    "EmulatorConfig",
    "EmulatorProcess",
    "EmulatorStartError",
    "auto_backend",
    "emulator_stats",
    "main",
    "make_weights",
    "normalise_model_name",
    "parse_cpus",
    "resolve_settings",
    "serve",
    "set_paused",
    "spawn_emulator",
    "start_emulator",
    "wait_waiting",
]

DEFAULT_MODEL: Final = "llama3.2:latest"
"""The model an emulator serves unless told otherwise (what SynapticLlamas asks for)."""

DEFAULT_WEIGHTS_MB: Final = 256
"""Weight matrix size (MiB). Measured on the 2-core reference VM: 64 MB still streams at cache
speed (~26 GB/s, 2.4 ms per token); 128 MB sits at the cache boundary (~6 ms per token), so two
emulators on *different* cores still slow each other through the shared cache (parallel/sequential
0.69-0.86 for 2 chunks); 256 MB is DRAM-bound (~14 GB/s, ~17 ms per token, ~0.57 s per 32-token
chunk) and two emulators on different cores run independently (0.52-0.56) while two on one core
time-share (1.01-1.06). Pass ``weights_mb`` to trade fidelity for speed."""

DEFAULT_NUM_PREDICT: Final = 32
UNBOUNDED_NUM_PREDICT: Final = 128
"""Tokens generated for ``num_predict < 0`` (Ollama: until end of text; the emulator has none)."""

EMULATED_OLLAMA_VERSION: Final = "0.6.2"
PROMPT_BATCH: Final = 32
"""Prompt tokens processed per pass over the weights."""

ROW_WIDTH: Final = 4096
"""Columns of the weight matrix (float32): the hidden size of the emulated model."""

KEEP_ALIVE_SECONDS: Final = 300

DEFAULT_BATCH_COST: Final = 0.15
"""Extra cost of one decode step per extra sequence in the batch (0.15: a step of 4 sequences
costs 1.45 steps of one). Batched CPU decode reads the weights once per step for the whole batch,
so most of a step's cost (the memory traffic) is shared, while the arithmetic grows with the
batch; 0.15 puts 4 sequences at about 2.8x the throughput of one, between GPU decode (nearly
flat: use ~0.02) and a compute-bound CPU (use ~0.5 or more)."""

BACKENDS: Final = ("auto", "numpy", "hashlib")
HASH_FRACTION: Final = 12
"""The hashlib backend hashes 1/HASH_FRACTION of the weights per pass: hashing runs at roughly
1-2 GB/s where numpy streams ~14 GB/s, so a token costs about as long as with numpy."""

TOKEN_ROWS: Final = 16
"""Rows of the weights that pick a sequence's next token (a small per-sequence cost)."""
READY_PREFIX: Final = "READY "
HOST_VARIABLE: Final = "OLLAMA_HOST"
OLLAMA_DEFAULT_PORT: Final = 11434
NUM_PARALLEL_VARIABLE: Final = "OLLAMA_NUM_PARALLEL"
BATCH_COST_VARIABLE: Final = "OLLAMA_EMULATOR_BATCH_COST"
_REPORTED_VARIABLES: Final = (
    NUM_PARALLEL_VARIABLE, BATCH_COST_VARIABLE, HOST_VARIABLE, "CUDA_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL",
)  # fmt: skip
MAX_BODY_BYTES: Final = 16 * 1024 * 1024

_THIS_FILE: Final = Path(__file__).resolve()
_PACKAGE_ROOT: Final = _THIS_FILE.parents[2]
"""The directory holding the ``sollol_locality`` package: children import this same code."""
_THREAD_VARIABLES: Final = (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)
_VOCABULARY: Final = (
    "the", "model", "node", "machine", "core", "memory", "token", "cache", "batch", "chunk",
    "answer", "local", "remote", "host", "port", "parallel", "sequential", "plan", "speed", "wall",
    "time", "queue", "thread", "lock", "weight", "matrix", "vector", "band", "width", "load",
    "request", "reply", "cluster", "network", "space", "route", "link", "pair", "packet", "bench",
    "measure", "ratio", "contention", "unit", "device", "zone", "group", "topology", "cost", "gain",
    "and", "of", "to", "in", "on", "with", "for", "as", "is", "a", "runs", "waits", "shares",
)  # fmt: skip


class EmulatorStartError(RuntimeError):
    """An emulator process that exited, printed something unexpected or missed its deadline."""


# --------------------------------------------------------------------------------------------
# Pure helpers


def parse_cpus(text: str) -> tuple[int, ...]:
    """Parse a CPU list such as ``"0"``, ``"0,1"`` or ``"0-3,6"`` into sorted unique ids."""
    cpus: set[int] = set()
    for part in text.split(","):
        item = part.strip()
        if not item:
            raise ValueError(f"Invalid CPU list {text!r}: empty item")
        first, dash, last = item.partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            raise ValueError(
                f"Invalid CPU list {text!r}: {item!r} is not a CPU id or range"
            ) from None
        if low < 0 or high < low:
            raise ValueError(f"Invalid CPU list {text!r}: bad range {item!r}")
        cpus.update(range(low, high + 1))
    return tuple(sorted(cpus))


def normalise_model_name(name: str) -> str:
    """Ollama's model naming: ``"llama3.2"`` means ``"llama3.2:latest"``."""
    name = name.strip()
    if not name:
        raise ValueError("Invalid model name '': empty")
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def format_url(host: str, port: int) -> str:
    """``http://host:port`` with IPv6 literals in brackets."""
    try:
        is_v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        is_v6 = False
    return f"http://[{host}]:{port}" if is_v6 else f"http://{host}:{port}"


def _timestamp(moment: datetime | None = None) -> str:
    moment = moment or datetime.now(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    """Settings of one emulator node.

    Attributes:
        host: address to listen on (an IPv4 or IPv6 literal, or a name).
        port: TCP port; 0 lets the kernel choose (reported in the READY line).
        model: the one model served (normalised, e.g. ``"llama3.2:latest"``).
        weights_mb: size of the float32 weight matrix in MiB.
        threads: BLAS threads for the matrix-vector products.
        slowdown: multiplier on per-token work (> 0; 6.0 is a machine six times slower).
        cpus: CPUs to pin the process to, or ``None`` to leave affinity alone.
        default_num_predict: tokens generated when a request gives no ``num_predict``.
        exit_on_stdin_eof: exit when stdin reaches end of file (the parent went away).
        verbose: log each request to stderr.
        num_parallel: requests decoded at once (Ollama's ``OLLAMA_NUM_PARALLEL``), or ``None``
            to read ``OLLAMA_NUM_PARALLEL`` from the emulator process's environment (default 1).
        batch_cost: extra cost of a decode step per extra sequence in the batch (0.15: each one
            adds 15%), or ``None`` to read ``OLLAMA_EMULATOR_BATCH_COST`` (default
            :data:`DEFAULT_BATCH_COST`).
        backend: ``"numpy"``, ``"hashlib"`` or ``"auto"`` (numpy when it can be imported).
    """

    host: str = "127.0.0.1"
    port: int = 0
    model: str = DEFAULT_MODEL
    weights_mb: int = DEFAULT_WEIGHTS_MB
    threads: int = 1
    slowdown: float = 1.0
    cpus: tuple[int, ...] | None = None
    default_num_predict: int = DEFAULT_NUM_PREDICT
    exit_on_stdin_eof: bool = False
    verbose: bool = False
    num_parallel: int | None = None
    batch_cost: float | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.num_parallel is not None and self.num_parallel < 1:
            raise ValueError(f"Invalid num_parallel {self.num_parallel!r}: expected at least 1")
        if self.batch_cost is not None and not (
            self.batch_cost >= 0 and math.isfinite(self.batch_cost)
        ):
            raise ValueError(f"Invalid batch_cost {self.batch_cost!r}: expected 0 or more")
        if self.backend not in BACKENDS:
            raise ValueError(
                f"Invalid backend {self.backend!r}: expected one of {', '.join(BACKENDS)}"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"Invalid port {self.port!r}: expected 0 to 65535")
        if self.weights_mb < 1:
            raise ValueError(f"Invalid weights_mb {self.weights_mb!r}: expected at least 1")
        if self.threads < 1:
            raise ValueError(f"Invalid threads {self.threads!r}: expected at least 1")
        if not (self.slowdown > 0 and math.isfinite(self.slowdown)):
            raise ValueError(f"Invalid slowdown {self.slowdown!r}: expected a number above 0")
        if self.default_num_predict < 0:
            raise ValueError(
                f"Invalid default_num_predict {self.default_num_predict!r}: expected 0 or more"
            )
        if self.cpus is not None and not self.cpus:
            raise ValueError("Invalid cpus (): expected at least one CPU id or None")
        object.__setattr__(self, "model", normalise_model_name(self.model))

    def to_argv(self) -> list[str]:
        """Command-line arguments that rebuild this configuration in ``main``."""
        argv = [
            "--host", self.host, "--port", str(self.port), "--model", self.model,
            "--weights-mb", str(self.weights_mb), "--threads", str(self.threads),
            "--slowdown", repr(self.slowdown),
            "--default-num-predict", str(self.default_num_predict),
        ]  # fmt: skip
        if self.cpus is not None:
            argv += ["--cpus", ",".join(map(str, self.cpus))]
        if self.exit_on_stdin_eof:
            argv.append("--exit-on-stdin-eof")
        if self.verbose:
            argv.append("--verbose")
        if self.num_parallel is not None:
            argv += ["--num-parallel", str(self.num_parallel)]
        if self.batch_cost is not None:
            argv += ["--batch-cost", repr(self.batch_cost)]
        if self.backend != "auto":
            argv += ["--backend", self.backend]
        return argv


# --------------------------------------------------------------------------------------------
# The work


class _Weights:
    """The weights in RAM and the work of one pass over them. Not thread-safe: one decode loop.

    ``work(passes)`` streams the weights ``passes`` times (the fraction as a partial pass);
    ``next_token(row, position)`` is a sequence's next token when its input is weights row
    ``row`` (a small read, so each sequence of a batch stays deterministic per prompt).
    """

    name = "abstract"
    rows: int

    def work(self, passes: float) -> None:
        raise NotImplementedError

    def next_token(self, row: int, position: int) -> int:
        raise NotImplementedError


class _NumpyWeights(_Weights):
    """A float32 matrix; a pass is a matrix-vector product (memory-bandwidth-bound)."""

    name = "numpy"

    def __init__(self, weights_mb: int) -> None:
        import numpy as np  # after the thread variables and CPU affinity are set

        self._np = np
        rows = max(1, weights_mb * 1024 * 1024 // (4 * ROW_WIDTH))
        self.rows = rows
        self.weights = np.empty((rows, ROW_WIDTH), dtype=np.float32)
        # Tile a small random block over the matrix: every page is written (no shared zero
        # pages, which would read at cache speed) and start-up stays fast.
        block = (
            np.random.default_rng(20240601)
            .uniform(-1.0, 1.0, size=(min(rows, 256), ROW_WIDTH))
            .astype(np.float32)
        )
        for start in range(0, rows, block.shape[0]):
            stop = min(rows, start + block.shape[0])
            self.weights[start:stop] = block[: stop - start]
        self._x = self.weights[0].copy()
        self._y = np.zeros(rows, dtype=np.float32)
        self._small = np.zeros(min(rows, TOKEN_ROWS), dtype=np.float32)

    def work(self, passes: float) -> None:
        np = self._np
        full = int(passes)
        for _ in range(full):
            np.dot(self.weights, self._x, out=self._y)
        partial = min(self.rows, round((passes - full) * self.rows))
        if partial:
            np.dot(self.weights[:partial], self._x, out=self._y[:partial])
        # the next pass reads a row this one selected: the passes cannot be skipped
        self._x[:] = self.weights[int(self._y[: max(1, partial or self.rows)].argmax())]

    def next_token(self, row: int, position: int) -> int:
        k = self._small.shape[0]
        self._np.dot(self.weights[:k], self.weights[row], out=self._small)
        return int(self._small.argmax()) * 7919 + position * 31 + row


class _HashWeights(_Weights):
    """Bytes in RAM; a pass hashes 1/:data:`HASH_FRACTION` of them (no numpy needed)."""

    name = "hashlib"

    def __init__(self, weights_mb: int) -> None:
        row_bytes = 4 * ROW_WIDTH
        size = max(row_bytes, weights_mb * 1024 * 1024 // row_bytes * row_bytes)
        self.rows = size // row_bytes
        self._row_bytes = row_bytes
        block = hashlib.shake_256(b"sollol-locality emulator").digest(1 << 16)
        self.weights = bytearray(block * (size // len(block)) + block[: size % len(block)])
        self._view = memoryview(self.weights)
        self._span = max(row_bytes, size // HASH_FRACTION)
        self._offset = 0

    def work(self, passes: float) -> None:
        remaining = int(passes * self._span)
        size = len(self.weights)
        while remaining > 0:
            take = min(remaining, size - self._offset)
            # hashlib releases the GIL on large buffers, as numpy does in dot
            digest = hashlib.sha256(self._view[self._offset : self._offset + take]).digest()
            self._offset = (self._offset + take + digest[0]) % size
            remaining -= take

    def next_token(self, row: int, position: int) -> int:
        start = row * self._row_bytes
        digest = hashlib.sha256(self._view[start : start + self._row_bytes]).digest()
        return int.from_bytes(digest[:4], "big") + position * 31


def make_weights(backend: str, weights_mb: int) -> _Weights:
    """The weights for ``backend`` (``"auto"``: numpy when importable, else hashlib)."""
    if backend == "hashlib":
        return _HashWeights(weights_mb)
    if backend == "numpy":
        return _NumpyWeights(weights_mb)
    try:
        return _NumpyWeights(weights_mb)
    except ImportError:
        return _HashWeights(weights_mb)


def auto_backend() -> str:
    """What ``--backend auto`` picks here, without importing numpy."""
    import importlib.util

    return "numpy" if importlib.util.find_spec("numpy") is not None else "hashlib"


@dataclass(eq=False, slots=True)
class _Sequence:
    """One generate request, from its arrival to its last token."""

    prompt: str
    num_predict: int
    received_ns: int
    row: int
    done: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    admitted_ns: int = 0
    prompt_ns: int = 0
    eval_started_ns: int = 0
    finished_ns: int = 0
    failed: bool = False

    @property
    def prompt_tokens(self) -> int:
        return max(1, len(self.prompt.split()))


class _DecodeLoop:
    """Continuous batching, as Ollama's runner does with ``OLLAMA_NUM_PARALLEL`` slots.

    One thread runs decode steps. Each step produces one token for every sequence in the batch
    and costs ``slowdown * (1 + batch_cost * (batch - 1))`` passes over the weights. A request
    joins the batch at the next step when a slot is free; beyond ``num_parallel`` requests wait
    in arrival order (FIFO). A joining request's prompt is processed before the step it joins
    (one pass per :data:`PROMPT_BATCH` prompt tokens), which delays the batch, as in Ollama.
    With one slot this is one generate at a time, in arrival order.
    """

    def __init__(
        self, weights: _Weights, *, num_parallel: int, batch_cost: float, slowdown: float
    ) -> None:
        self.weights = weights
        self.num_parallel = num_parallel
        self.batch_cost = batch_cost
        self.slowdown = slowdown
        self._condition = threading.Condition()
        self._queue: collections.deque[_Sequence] = collections.deque()
        self._batch: list[_Sequence] = []
        self._stopping = False
        self._paused = False
        self.served = 0
        self.tokens = 0
        self.steps = 0
        self.max_in_flight = 0
        self.max_batch = 0
        self.queued = 0
        self.max_queue = 0
        self.queue_wait_ns = 0
        self.last_used = datetime.now(UTC)
        self._thread = threading.Thread(target=self._run, name="emulator-decode", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop decoding; every request still waiting or in the batch is answered as stopped."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(10)

    def submit(self, sequence: _Sequence) -> None:
        """Queue ``sequence``; it joins the batch at the next step with a free slot."""
        with self._condition:
            if self._stopping:
                sequence.failed = True
                sequence.done.set()
                return
            if len(self._queue) + len(self._batch) >= self.num_parallel:
                self.queued += 1  # every slot taken or promised to those ahead: it waits
            self._queue.append(sequence)
            self.max_queue = max(self.max_queue, self._waiting_for_slot())
            self._condition.notify_all()

    def _waiting_for_slot(self) -> int:
        return max(0, len(self._queue) - max(0, self.num_parallel - len(self._batch)))

    def set_paused(self, paused: bool) -> None:
        """Hold decoding (requests still queue) or resume it: lets a test line requests up."""
        with self._condition:
            self._paused = paused
            self._condition.notify_all()

    def wait_for(self, waiting: int, timeout: float) -> bool:
        """Block until at least ``waiting`` requests are queued or in the batch."""
        with self._condition:
            return self._condition.wait_for(
                lambda: len(self._queue) + len(self._batch) >= waiting, timeout
            )

    @property
    def waiting(self) -> int:
        """Requests in the batch or waiting for it."""
        with self._condition:
            return len(self._queue) + len(self._batch)

    def counters(self) -> dict[str, Any]:
        with self._condition:
            return {
                "num_parallel": self.num_parallel,
                "batch_cost": self.batch_cost,
                "served": self.served,
                "tokens": self.tokens,
                "steps": self.steps,
                "in_flight": len(self._batch),
                "queue": len(self._queue),
                "max_in_flight": self.max_in_flight,
                "max_batch": self.max_batch,
                "queued": self.queued,
                "max_queue": self.max_queue,
                "queue_wait_seconds": self.queue_wait_ns / 1e9,
                "paused": self._paused,
            }

    def _admit(self) -> list[_Sequence] | None:
        """Wait for work; move queued requests into free slots. None when stopping."""
        with self._condition:
            self._condition.wait_for(
                lambda: self._stopping or (not self._paused and (self._queue or self._batch))
            )
            if self._stopping:
                return None
            admitted = []
            now = time.perf_counter_ns()
            while self._queue and len(self._batch) < self.num_parallel:
                sequence = self._queue.popleft()
                sequence.admitted_ns = now
                self.queue_wait_ns += now - sequence.received_ns
                self._batch.append(sequence)
                admitted.append(sequence)
            self.max_in_flight = max(self.max_in_flight, len(self._batch))
            return admitted

    def _run(self) -> None:
        try:
            while (admitted := self._admit()) is not None:
                self._step(admitted)
        finally:
            with self._condition:
                for sequence in (*self._batch, *self._queue):
                    sequence.failed = True
                    sequence.done.set()
                self._batch.clear()
                self._queue.clear()

    def _step(self, admitted: list[_Sequence]) -> None:
        weights = self.weights
        for sequence in admitted:
            started = time.perf_counter_ns()
            weights.work(self.slowdown * math.ceil(sequence.prompt_tokens / PROMPT_BATCH))
            sequence.eval_started_ns = time.perf_counter_ns()
            sequence.prompt_ns = sequence.eval_started_ns - started
        active = [s for s in self._batch if len(s.tokens) < s.num_predict]
        if active:
            weights.work(self.slowdown * (1.0 + self.batch_cost * (len(active) - 1)))
            for sequence in active:
                token = weights.next_token(sequence.row, len(sequence.tokens))
                sequence.tokens.append(token)
                # the next input depends on this output, as in decode
                sequence.row = (token * 31 + len(sequence.tokens) + 7) % weights.rows
        with self._condition:
            if active:
                self.steps += 1
                self.max_batch = max(self.max_batch, len(active))
            finished = [s for s in self._batch if len(s.tokens) >= s.num_predict]
            now = time.perf_counter_ns()
            for sequence in finished:
                self._batch.remove(sequence)
                sequence.finished_ns = now
                self.served += 1
                self.tokens += len(sequence.tokens)
            if finished:
                self.last_used = datetime.now(UTC)
        for sequence in finished:
            sequence.done.set()


class _State:
    def __init__(self, config: EmulatorConfig, loop: _DecodeLoop, sources: Mapping[str, str]
                 ) -> None:  # fmt: skip
        self.config = config
        self.loop = loop
        self.decoder = loop.weights
        self.sources = dict(sources)
        self.started_at = datetime.now(UTC)
        self.size = self.decoder.rows * ROW_WIDTH * 4
        self.digest = hashlib.sha256(f"{config.model}/{self.size}".encode()).hexdigest()

    def details(self) -> dict[str, Any]:
        parameters = self.decoder.rows * ROW_WIDTH
        return {
            "parent_model": "",
            "format": "gguf",
            "family": "emulator",
            "families": ["emulator"],
            "parameter_size": f"{parameters / 1e6:.1f}M",
            "quantization_level": "F32",
        }

    def tags(self) -> dict[str, Any]:
        return {
            "models": [
                {
                    "name": self.config.model,
                    "model": self.config.model,
                    "modified_at": _timestamp(self.started_at),
                    "size": self.size,
                    "digest": self.digest,
                    "details": self.details(),
                }
            ]
        }

    def ps(self) -> dict[str, Any]:
        expires = max(self.started_at, self.loop.last_used) + timedelta(
            seconds=KEEP_ALIVE_SECONDS
        )
        return {
            "models": [
                {
                    "name": self.config.model,
                    "model": self.config.model,
                    "size": self.size,
                    "digest": self.digest,
                    "details": self.details(),
                    "expires_at": _timestamp(expires),
                    "size_vram": 0,
                }
            ]
        }

    def emulator(self) -> dict[str, Any]:
        counters = self.loop.counters()
        settings = asdict(self.config)
        settings["cpus"] = list(self.config.cpus) if self.config.cpus is not None else None
        return {
            "pid": os.getpid(),
            "config": settings,
            "affinity": sorted(os.sched_getaffinity(0)),
            "weight_rows": self.decoder.rows,
            "backend": self.decoder.name,
            "generates": counters["served"],
            "waiting": counters["in_flight"] + counters["queue"],
            "sources": self.sources,
            "environ": {name: os.environ[name] for name in _REPORTED_VARIABLES
                        if name in os.environ},
            **counters,
        }


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _num_predict(options: Any, default: int) -> tuple[int, str]:
    """Tokens to generate and the ``done_reason`` when they are all generated."""
    if options is None:
        return default, "stop"
    if not isinstance(options, Mapping):
        raise _BadRequest(
            HTTPStatus.BAD_REQUEST, f"invalid options {options!r}: expected an object"
        )
    value = options.get("num_predict")
    if value is None:
        return default, "stop"
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise _BadRequest(
            HTTPStatus.BAD_REQUEST, f"invalid num_predict {value!r}: expected an integer"
        )
    count = int(value)
    if count < 0:
        return UNBOUNDED_NUM_PREDICT, "stop"
    return count, "length"


def _generate(state: _State, request: Any, received_ns: int) -> dict[str, Any]:
    if not isinstance(request, Mapping):
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "invalid request: expected a JSON object")
    model = request.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "model is required")
    if normalise_model_name(model) != state.config.model:
        raise _BadRequest(HTTPStatus.NOT_FOUND, f'model "{model}" not found, try pulling it first')
    prompt = request.get("prompt", "")
    if not isinstance(prompt, str):
        raise _BadRequest(HTTPStatus.BAD_REQUEST, f"invalid prompt {prompt!r}: expected a string")
    num_predict, reason = _num_predict(request.get("options"), state.config.default_num_predict)
    if prompt == "":
        return {
            "model": model,
            "created_at": _timestamp(),
            "response": "",
            "done": True,
            "done_reason": "load",
        }
    row = zlib.crc32(prompt.encode("utf-8")) % state.decoder.rows
    sequence = _Sequence(prompt, num_predict, received_ns, row)
    state.loop.submit(sequence)
    sequence.done.wait()
    if sequence.failed:
        raise _BadRequest(HTTPStatus.SERVICE_UNAVAILABLE, "the emulator is stopping")
    words = [_VOCABULARY[token % len(_VOCABULARY)] for token in sequence.tokens]
    return {
        "model": model,
        "created_at": _timestamp(),
        "response": " ".join(words),
        "done": True,
        "done_reason": reason if len(sequence.tokens) == num_predict else "stop",
        "context": list(sequence.tokens),
        "total_duration": time.perf_counter_ns() - received_ns,
        # as in Ollama, the time spent waiting for a slot is part of load_duration
        "load_duration": sequence.admitted_ns - received_ns,
        "prompt_eval_count": sequence.prompt_tokens,
        "prompt_eval_duration": sequence.prompt_ns,
        "eval_count": len(sequence.tokens),
        "eval_duration": sequence.finished_ns - sequence.eval_started_ns,
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ollama-emulator"
    server: _EmulatorServer

    def _send(
        self, status: HTTPStatus, body: bytes, content_type: str, *, head: bool = False
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_json(self, status: HTTPStatus, payload: Any, *, head: bool = False) -> None:
        body = json.dumps(payload).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8", head=head)

    def _route_get(self, head: bool) -> None:
        state = self.server.state
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._send(HTTPStatus.OK, b"Ollama is running", "text/plain; charset=utf-8", head=head)
        elif path == "/api/version":
            self._send_json(HTTPStatus.OK, {"version": EMULATED_OLLAMA_VERSION}, head=head)
        elif path == "/api/tags":
            self._send_json(HTTPStatus.OK, state.tags(), head=head)
        elif path == "/api/ps":
            self._send_json(HTTPStatus.OK, state.ps(), head=head)
        elif path == "/api/emulator":
            self._send_json(HTTPStatus.OK, state.emulator(), head=head)
        elif path == "/api/emulator/wait":
            self._wait(head=head)
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no route for {path!r}"}, head=head)

    def _wait(self, head: bool) -> None:
        """``GET /api/emulator/wait?waiting=N&timeout=S``: block until N requests are queued or
        in the batch (200 with the counters), or S seconds pass (408)."""
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        try:
            waiting = int(query.get("waiting", ["1"])[0])
            timeout = float(query.get("timeout", ["30"])[0])
        except ValueError:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": "waiting and timeout are numbers"})
            return
        state = self.server.state
        reached = state.loop.wait_for(waiting, min(max(timeout, 0.0), 300.0))
        status = HTTPStatus.OK if reached else HTTPStatus.REQUEST_TIMEOUT
        self._send_json(status, state.emulator(), head=head)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._route_get(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._route_get(head=True)

    def do_POST(self) -> None:  # noqa: N802
        received_ns = time.perf_counter_ns()
        path = self.path.split("?", 1)[0]
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.isdigit():
            self.close_connection = True
            self._send_json(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
            return
        length = int(length_text)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._send_json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "request too large"})
            return
        raw = self.rfile.read(length)
        if path in ("/api/emulator/pause", "/api/emulator/resume"):
            self.server.state.loop.set_paused(path.endswith("/pause"))
            self._send_json(HTTPStatus.OK, self.server.state.emulator())
            return
        if path != "/api/generate":
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no route for {path!r}"})
            return
        try:
            try:
                request = json.loads(raw or b"{}")
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise _BadRequest(HTTPStatus.BAD_REQUEST, f"invalid JSON: {exc}") from exc
            answer = _generate(self.server.state, request, received_ns)
        except _BadRequest as exc:
            self._send_json(exc.status, {"error": exc.message})
            return
        self._send_json(HTTPStatus.OK, answer)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base signature)
        if self.server.state.config.verbose:
            super().log_message(format, *args)


class _EmulatorServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, state: _State) -> None:
        self.state = state
        host = state.config.host
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        self.address_family = (
            socket.AF_INET6 if ip is not None and ip.version == 6 else socket.AF_INET
        )
        super().__init__((host, state.config.port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup: skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


# --------------------------------------------------------------------------------------------
# Running one


def _limit_threads(threads: int) -> None:
    for variable in _THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    if "numpy" in sys.modules:  # too late for the variables; fall back to threadpoolctl
        try:
            from threadpoolctl import threadpool_limits  # type: ignore[import-not-found]
        except ImportError:
            print(
                "emulator: numpy was imported before the thread limit; install threadpoolctl",
                file=sys.stderr,
            )
        else:
            threadpool_limits(threads)


def resolve_settings(
    config: EmulatorConfig, environ: Mapping[str, str]
) -> tuple[int, float, dict[str, str]]:
    """``(num_parallel, batch_cost, sources)``: the config's values, else the environment's
    (``OLLAMA_NUM_PARALLEL``, ``OLLAMA_EMULATOR_BATCH_COST``), else the defaults; ``sources``
    says which (``"flag"``, ``"environment"``, ``"default"``)."""
    sources: dict[str, str] = {}
    num_parallel, batch_cost = config.num_parallel, config.batch_cost
    if num_parallel is not None:
        sources["num_parallel"] = "flag"
    elif environ.get(NUM_PARALLEL_VARIABLE, "").strip():
        text = environ[NUM_PARALLEL_VARIABLE].strip()
        try:
            num_parallel = int(text)
        except ValueError:
            raise ValueError(
                f"Invalid {NUM_PARALLEL_VARIABLE} {text!r}: expected a whole number"
            ) from None
        if num_parallel < 1:
            raise ValueError(f"Invalid {NUM_PARALLEL_VARIABLE} {text!r}: expected at least 1")
        sources["num_parallel"] = "environment"
    else:
        num_parallel, sources["num_parallel"] = 1, "default"
    if batch_cost is not None:
        sources["batch_cost"] = "flag"
    elif environ.get(BATCH_COST_VARIABLE, "").strip():
        text = environ[BATCH_COST_VARIABLE].strip()
        try:
            batch_cost = float(text)
        except ValueError:
            batch_cost = -1.0
        if not (batch_cost >= 0 and math.isfinite(batch_cost)):
            raise ValueError(f"Invalid {BATCH_COST_VARIABLE} {text!r}: expected 0 or more")
        sources["batch_cost"] = "environment"
    else:
        batch_cost, sources["batch_cost"] = DEFAULT_BATCH_COST, "default"
    return num_parallel, batch_cost, sources


def serve(config: EmulatorConfig, *, ready_stream: IO[str] | None = None) -> int:
    """Run an emulator in this process until SIGTERM/SIGINT (or stdin EOF). Returns 0.

    Must run in the main thread (it installs signal handlers). Pins the process to
    ``config.cpus`` and limits BLAS threads *before* numpy is imported. Slots and batch cost
    not set in ``config`` come from this process's environment (:func:`resolve_settings`).
    """
    num_parallel, batch_cost, sources = resolve_settings(config, os.environ)
    if config.cpus is not None:
        os.sched_setaffinity(0, config.cpus)
    _limit_threads(config.threads)
    weights = make_weights(config.backend, config.weights_mb)
    sources["backend"] = "flag" if config.backend != "auto" else "auto"
    loop = _DecodeLoop(
        weights, num_parallel=num_parallel, batch_cost=batch_cost, slowdown=config.slowdown
    )
    state = _State(config, loop, sources)
    server = _EmulatorServer(state)
    loop.start()
    stop = threading.Event()
    if config.verbose:
        print(f"emulator: backend {weights.name}, num_parallel {num_parallel}, "
              f"batch_cost {batch_cost:g}", file=sys.stderr, flush=True)  # fmt: skip

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="emulator-http",
            daemon=True,
        )  # fmt: skip
        worker.start()
        if config.exit_on_stdin_eof:
            threading.Thread(
                target=_wait_for_eof, args=(sys.stdin.fileno(), stop), name="emulator-stdin",
                daemon=True,
            ).start()  # fmt: skip
        stream = ready_stream or sys.stdout
        stream.write(f"{READY_PREFIX}{format_url(server.server_name, server.server_port)}\n")
        stream.flush()
        stop.wait()
    finally:
        loop.stop()
        server.shutdown()
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _wait_for_eof(fd: int, stop: threading.Event) -> None:
    # os.read on the raw descriptor: a daemon thread blocked inside sys.stdin.buffer would hold
    # its lock at interpreter shutdown, which aborts the process.
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass
    stop.set()


def _parse_ollama_host(text: str) -> tuple[str, int]:
    """``OLLAMA_HOST`` as Ollama reads it: ``host``, ``host:port``, ``[v6]:port``, a URL; a
    host without a port means Ollama's port, :data:`OLLAMA_DEFAULT_PORT`."""
    value = text.strip()
    if "://" in value:
        value = value.split("://", 1)[1]
    value = value.split("/", 1)[0]
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    else:
        host, port_text = value, ""
    try:
        port = int(port_text) if port_text else OLLAMA_DEFAULT_PORT
    except ValueError:
        raise ValueError(f"Invalid {HOST_VARIABLE} {text!r}: bad port {port_text!r}") from None
    return host or "127.0.0.1", port


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default, except where the help text already says where it comes from."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _build_parser() -> argparse.ArgumentParser:
    backend = auto_backend()
    parser = argparse.ArgumentParser(
        prog="sollol-locality-emulator",
        description=(
            "An Ollama-compatible node whose tokens do memory-bandwidth-bound work. Configured "
            "like Ollama: OLLAMA_HOST (bind address), OLLAMA_NUM_PARALLEL (requests batched at "
            "once); flags override the environment. Prints READY http://HOST:PORT when "
            f"listening. Decode backend here: {backend} (auto picks numpy when installed, "
            "else hashlib)."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--host", default=None,
                        help=f"address to listen on (default: {HOST_VARIABLE}'s host, "
                             "else 127.0.0.1)")  # fmt: skip
    parser.add_argument("--port", type=int, default=None,
                        help=f"TCP port, 0 lets the kernel choose (default: {HOST_VARIABLE}'s "
                             f"port, {OLLAMA_DEFAULT_PORT} if it has none; else 0)")  # fmt: skip
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the one model served")
    parser.add_argument("--weights-mb", type=int, default=DEFAULT_WEIGHTS_MB,
                        help="weights held in RAM (MiB)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads")
    parser.add_argument("--slowdown", type=float, default=1.0, help="per-token work multiplier")
    parser.add_argument("--cpus", type=parse_cpus, default=None, help="pin to CPUs, e.g. 0,1")
    parser.add_argument("--default-num-predict", type=int, default=DEFAULT_NUM_PREDICT,
                        help="tokens generated when a request sets no num_predict")  # fmt: skip
    parser.add_argument("--num-parallel", type=int, default=None,
                        help=f"requests decoded at once, by continuous batching (default: "
                             f"{NUM_PARALLEL_VARIABLE}, else 1)")  # fmt: skip
    parser.add_argument("--batch-cost", type=float, default=None,
                        help=f"extra step cost per extra sequence in a batch (default: "
                             f"{BATCH_COST_VARIABLE}, else {DEFAULT_BATCH_COST:g})")  # fmt: skip
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help=f"decode work: numpy matrix-vector products or hashlib passes "
                             f"(auto here: {backend})")  # fmt: skip
    parser.add_argument(
        "--exit-on-stdin-eof", action="store_true", help="exit when stdin closes (parent gone)"
    )
    parser.add_argument("--verbose", action="store_true", help="log requests to stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``sollol-locality-emulator`` command (``python -m sollol_locality.testing.emulator``)."""
    args = _build_parser().parse_args(argv)
    try:
        host, port = args.host, args.port
        if (host is None or port is None) and os.environ.get(HOST_VARIABLE, "").strip():
            env_host, env_port = _parse_ollama_host(os.environ[HOST_VARIABLE])
            host = env_host if host is None else host
            port = env_port if port is None else port
        config = EmulatorConfig(
            host=host if host is not None else "127.0.0.1", port=port if port is not None else 0,
            model=args.model, weights_mb=args.weights_mb,
            threads=args.threads, slowdown=args.slowdown, cpus=args.cpus,
            default_num_predict=args.default_num_predict,
            exit_on_stdin_eof=args.exit_on_stdin_eof, verbose=args.verbose,
            num_parallel=args.num_parallel, batch_cost=args.batch_cost, backend=args.backend,
        )  # fmt: skip
        resolve_settings(config, os.environ)  # a bad environment is a usage error too
    except ValueError as exc:
        print(f"emulator: {exc}", file=sys.stderr)
        return 2
    return serve(config)


# --------------------------------------------------------------------------------------------
# Starting one in a subprocess


class EmulatorProcess:
    """An emulator in a subprocess. Stop it with :meth:`stop` or use it as a context manager.

    The child runs in its own session (a terminal's Ctrl-C reaches only the parent, whose clean-up
    stops it) and exits by itself when the parent dies, because its stdin pipe closes.
    """

    def __init__(
        self, popen: subprocess.Popen[bytes], config: EmulatorConfig, *, netns: str | None,
        command: Sequence[str], stderr_file: IO[bytes],
    ) -> None:  # fmt: skip
        self._popen = popen
        self.config = config
        self.netns = netns
        self.command = tuple(command)
        self._stderr = stderr_file
        self._url: str | None = None
        self._lock = threading.RLock()  # stop() may run again from a signal handler

    def __repr__(self) -> str:
        where = f" netns={self.netns!r}" if self.netns else ""
        return f"<EmulatorProcess pid={self.pid} url={self._url!r}{where}>"

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def url(self) -> str:
        """``http://host:port`` as printed in the READY line."""
        if self._url is None:
            raise EmulatorStartError(f"emulator pid {self.pid} has not reported READY yet")
        return self._url

    @property
    def host(self) -> str:
        return self.url.rsplit(":", 1)[0].split("//", 1)[1].strip("[]")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def is_running(self) -> bool:
        return self._popen.poll() is None

    def stderr_text(self, limit: int = 4000) -> str:
        """The last ``limit`` characters the child wrote to stderr."""
        with self._lock:
            if self._stderr.closed:
                return ""
            fd = self._stderr.fileno()
            size = os.fstat(fd).st_size
            start = max(0, size - 4 * limit)
            # pread leaves the file offset, which the child shares, where the child put it.
            data = os.pread(fd, size - start, start)
        return data.decode("utf-8", "replace")[-limit:]

    def wait_ready(self, timeout: float = 60.0) -> str:
        """Read the child's stdout until its READY line, for at most ``timeout`` seconds."""
        if self._url is not None:
            return self._url
        assert self._popen.stdout is not None
        fd = self._popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise EmulatorStartError(
                        f"emulator pid {self.pid} printed no READY line within {timeout:g} s "
                        f"(command {' '.join(self.command)!r}); stderr: {self.stderr_text()!r}"
                    )
                chunk = os.read(fd, 4096)
                if not chunk:
                    code = self._popen.wait()
                    raise EmulatorStartError(
                        f"emulator pid {self.pid} exited with code {code} before READY "
                        f"(command {' '.join(self.command)!r}); stderr: {self.stderr_text()!r}"
                    )
                buffer += chunk
        line = buffer.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
        if not line.startswith(READY_PREFIX):
            raise EmulatorStartError(f"emulator pid {self.pid} printed {line!r}, expected READY")
        self._url = line[len(READY_PREFIX) :].strip()
        return self._url

    def send_stop(self) -> None:
        """Ask the child to exit (SIGTERM) without waiting."""
        if self._popen.poll() is None:
            try:
                self._popen.terminate()
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 5.0) -> int:
        """Stop the child (SIGTERM, then SIGKILL after ``timeout``), release pipes; idempotent."""
        self.send_stop()
        try:
            code = self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            code = self._popen.wait(timeout)
        with self._lock:
            for stream in (self._popen.stdin, self._popen.stdout):
                if stream is not None and not stream.closed:
                    stream.close()
            if not self._stderr.closed:
                self._stderr.close()
        return code

    close = stop

    def __enter__(self) -> EmulatorProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.stop()


def _taskset_binary() -> str:
    found = shutil.which("taskset")
    if found is None:
        raise EmulatorStartError("taskset is not installed (util-linux): cannot pin an instance")
    return found


def spawn_emulator(
    host: str = "127.0.0.1", port: int = 0, *, netns: str | None = None,
    cpus: Sequence[int] | None = None, model: str = DEFAULT_MODEL,
    weights_mb: int = DEFAULT_WEIGHTS_MB, threads: int = 1, slowdown: float = 1.0,
    default_num_predict: int = DEFAULT_NUM_PREDICT, verbose: bool = False,
    python: str = sys.executable, env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None, taskset: Sequence[int] | None = None,
    num_parallel: int | None = None, batch_cost: float | None = None, backend: str = "auto",
) -> EmulatorProcess:  # fmt: skip
    """Start an emulator subprocess and return at once (call :meth:`EmulatorProcess.wait_ready`).

    With ``netns`` the child runs under ``ip netns exec NETNS`` (root only). With ``taskset``
    it runs under ``taskset -c CPUS``, as people pin an instance: the kernel gives the process
    that affinity before the interpreter starts (``cpus`` instead pins from inside). ``ip`` and
    ``taskset`` exec the interpreter, so the process id is the emulator's own. ``extra_env``
    is added to the child's environment (``OLLAMA_NUM_PARALLEL``, ``CUDA_VISIBLE_DEVICES``...);
    ``num_parallel`` and ``batch_cost`` given here are flags, which override it.
    """
    config = EmulatorConfig(
        host=host, port=port, model=model, weights_mb=weights_mb, threads=threads,
        slowdown=slowdown, cpus=tuple(cpus) if cpus is not None else None,
        default_num_predict=default_num_predict, exit_on_stdin_eof=True, verbose=verbose,
        num_parallel=num_parallel, batch_cost=batch_cost, backend=backend,
    )  # fmt: skip
    # The file itself, not ``-m``: the package's __init__ (the planner, the cost model) is not
    # needed here and costs 0.14 s of CPU per start; -P keeps this directory off sys.path.
    command = [python, "-P", str(_THIS_FILE), *config.to_argv()]
    if taskset is not None:
        if not taskset:
            raise ValueError("Invalid taskset (): expected at least one CPU id")
        command = [_taskset_binary(), "-c", ",".join(map(str, sorted(set(taskset)))), *command]
    if netns is not None:
        command = ["ip", "netns", "exec", netns, *command]
    child_env = dict(os.environ if env is None else env)
    child_env.update(extra_env or {})
    child_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(_PACKAGE_ROOT), child_env.get("PYTHONPATH", "")])
    )
    child_env["PYTHONUNBUFFERED"] = "1"
    for variable in _THREAD_VARIABLES:
        child_env[variable] = str(threads)
    stderr_file = tempfile.TemporaryFile(prefix="emulator-stderr-")
    try:
        popen = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr_file,
            cwd=_PACKAGE_ROOT, env=child_env, start_new_session=True, bufsize=0,
        )  # fmt: skip
    except BaseException:
        stderr_file.close()
        raise
    return EmulatorProcess(popen, config, netns=netns, command=command, stderr_file=stderr_file)


def start_emulator(
    host: str = "127.0.0.1", port: int = 0, *, netns: str | None = None,
    cpus: Sequence[int] | None = None, model: str = DEFAULT_MODEL,
    weights_mb: int = DEFAULT_WEIGHTS_MB, threads: int = 1, slowdown: float = 1.0,
    default_num_predict: int = DEFAULT_NUM_PREDICT, verbose: bool = False,
    ready_timeout: float = 60.0, extra_env: Mapping[str, str] | None = None,
    taskset: Sequence[int] | None = None, num_parallel: int | None = None,
    batch_cost: float | None = None, backend: str = "auto",
) -> EmulatorProcess:  # fmt: skip
    """Start an emulator subprocess and wait (at most ``ready_timeout`` s) until it listens.

    The options are :func:`spawn_emulator`'s. On any failure, including Ctrl-C while waiting,
    the child is stopped before the error propagates.
    """
    process = spawn_emulator(
        host, port, netns=netns, cpus=cpus, model=model, weights_mb=weights_mb, threads=threads,
        slowdown=slowdown, default_num_predict=default_num_predict, verbose=verbose,
        extra_env=extra_env, taskset=taskset, num_parallel=num_parallel,
        batch_cost=batch_cost, backend=backend,
    )  # fmt: skip
    try:
        process.wait_ready(ready_timeout)
    except BaseException:
        process.stop()
        raise
    return process


# --------------------------------------------------------------------------------------------
# Talking to one (its own endpoints, not Ollama's)


_NO_PROXY: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _emulator_call(url: str, path: str, *, post: bool = False, timeout: float = 10.0
                   ) -> dict[str, Any]:  # fmt: skip
    request = urllib.request.Request(
        url.rstrip("/") + path, data=b"{}" if post else None, method="POST" if post else "GET",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with _NO_PROXY.open(request, timeout=timeout) as response:
            body: dict[str, Any] = json.load(response)
    except urllib.error.HTTPError as exc:
        raise EmulatorStartError(f"emulator {url} answered {exc.code} to {path}") from exc
    return body


def emulator_stats(url: str) -> dict[str, Any]:
    """The emulator's ``/api/emulator``: settings and counters (``served``, ``max_batch``...)."""
    return _emulator_call(url, "/api/emulator")


def set_paused(url: str, paused: bool) -> dict[str, Any]:
    """Hold (``True``) or resume the emulator's decoding; requests still queue while held."""
    return _emulator_call(url, "/api/emulator/" + ("pause" if paused else "resume"), post=True)


def wait_waiting(url: str, count: int, timeout: float = 30.0) -> dict[str, Any]:
    """Block until ``count`` requests are queued or being decoded on the emulator at ``url``."""
    return _emulator_call(
        url, f"/api/emulator/wait?waiting={count}&timeout={timeout:g}", timeout=timeout + 10
    )


if __name__ == "__main__":
    sys.exit(main())
