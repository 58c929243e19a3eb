"""An Ollama-compatible emulator node for benchmarks and integration tests.

Run it from the repository root::

    python -m sollol_locality.testing.emulator --host 127.0.0.1 --port 0 --weights-mb 256 --cpus 0

It prints exactly one line, ``READY http://HOST:PORT`` (the real port when ``--port 0``), once it
is listening, and exits cleanly on SIGTERM or SIGINT (and, with ``--exit-on-stdin-eof``, when its
parent goes away). Nothing else is written to stdout.

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
* ``GET /api/emulator``: this emulator's settings and counters (not an Ollama endpoint).

What a token costs: a float32 matrix-vector product over the whole weight matrix (``--weights-mb``,
held in RAM and bigger than the caches, so decode is memory-bandwidth-bound as CPU decode is), the
next input being the row the previous output selects. ``--slowdown S`` multiplies that work (S full
passes, the fraction as a partial pass), which stands in for a slower machine. The prompt costs one
pass per :data:`PROMPT_BATCH` prompt tokens (batched prompt processing). One generate runs at a
time, in arrival order, as Ollama does with its default of one parallel request: later requests
wait, and the wait is reported in ``load_duration`` (as in Ollama, where the time spent waiting for
the scheduler is part of ``load_duration`` and ``total_duration``).

:func:`start_emulator` starts one in a subprocess (optionally inside a network namespace) and waits
for its READY line with a deadline.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import math
import os
import selectors
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Final

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_NUM_PREDICT",
    "DEFAULT_WEIGHTS_MB",
    "EMULATED_OLLAMA_VERSION",
    "EmulatorConfig",
    "EmulatorProcess",
    "EmulatorStartError",
    "main",
    "normalise_model_name",
    "parse_cpus",
    "serve",
    "spawn_emulator",
    "start_emulator",
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
READY_PREFIX: Final = "READY "
MAX_BODY_BYTES: Final = 16 * 1024 * 1024

_PACKAGE_ROOT: Final = Path(__file__).resolve().parents[2]
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

    def __post_init__(self) -> None:
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
        return argv


# --------------------------------------------------------------------------------------------
# The work


@dataclass(frozen=True, slots=True)
class _Generation:
    tokens: tuple[int, ...]
    prompt_tokens: int
    prompt_ns: int
    eval_ns: int


class _Decoder:
    """Weights in RAM and the per-token matrix-vector work. Not thread-safe: used under the lock."""

    def __init__(self, weights_mb: int, slowdown: float) -> None:
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
        self._x = np.empty(ROW_WIDTH, dtype=np.float32)
        self._y = np.zeros(rows, dtype=np.float32)
        self._full_passes = int(slowdown)
        partial = round((slowdown - self._full_passes) * rows)
        if self._full_passes == 0:
            partial = max(1, partial)
        self._partial_rows = min(partial, rows)
        self._active_rows = rows if self._full_passes else self._partial_rows

    def _pass(self) -> None:
        np = self._np
        for _ in range(self._full_passes):
            np.dot(self.weights, self._x, out=self._y)
        if self._partial_rows:
            k = self._partial_rows
            np.dot(self.weights[:k], self._x, out=self._y[:k])

    def generate(self, prompt: str, num_predict: int, stopping: threading.Event) -> _Generation:
        prompt_tokens = max(1, len(prompt.split()))
        self._x[:] = self.weights[zlib.crc32(prompt.encode("utf-8")) % self.rows]
        started = time.perf_counter_ns()
        for _ in range(math.ceil(prompt_tokens / PROMPT_BATCH)):
            self._pass()
        prompt_done = time.perf_counter_ns()
        tokens: list[int] = []
        for _ in range(num_predict):
            if stopping.is_set():
                break
            self._pass()
            token = int(self._y[: self._active_rows].argmax())
            # The next input depends on this output (as in decode), moved along by the position
            # so the sequence does not settle on the row most similar to itself.
            self._x[:] = self.weights[(token * 31 + len(tokens) + 7) % self.rows]
            tokens.append(token)
        finished = time.perf_counter_ns()
        return _Generation(
            tuple(tokens), prompt_tokens, prompt_done - started, finished - prompt_done
        )


class _FifoLock:
    """A lock granted in arrival order, which also counts who is waiting."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def acquire(self) -> None:
        with self._condition:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                self._condition.wait()

    def release(self) -> None:
        with self._condition:
            self._serving += 1
            self._condition.notify_all()

    @property
    def waiting(self) -> int:
        """Requests holding or waiting for the lock."""
        with self._condition:
            return self._next_ticket - self._serving


class _State:
    def __init__(self, config: EmulatorConfig, decoder: _Decoder) -> None:
        self.config = config
        self.decoder = decoder
        self.lock = _FifoLock()
        self.stopping = threading.Event()
        self.started_at = datetime.now(UTC)
        self.last_used = self.started_at
        self.generates = 0
        self.tokens = 0
        self.size = decoder.rows * ROW_WIDTH * 4
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
        expires = self.last_used + timedelta(seconds=KEEP_ALIVE_SECONDS)
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
        settings = asdict(self.config)
        settings["cpus"] = list(self.config.cpus) if self.config.cpus is not None else None
        return {
            "pid": os.getpid(),
            "config": settings,
            "affinity": sorted(os.sched_getaffinity(0)),
            "weight_rows": self.decoder.rows,
            "generates": self.generates,
            "tokens": self.tokens,
            "waiting": self.lock.waiting,
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
    state.lock.acquire()
    try:
        acquired_ns = time.perf_counter_ns()
        generation = state.decoder.generate(prompt, num_predict, state.stopping)
        state.generates += 1
        state.tokens += len(generation.tokens)
        state.last_used = datetime.now(UTC)
    finally:
        state.lock.release()
    words = [_VOCABULARY[token % len(_VOCABULARY)] for token in generation.tokens]
    return {
        "model": model,
        "created_at": _timestamp(),
        "response": " ".join(words),
        "done": True,
        "done_reason": reason if len(generation.tokens) == num_predict else "stop",
        "context": list(generation.tokens),
        "total_duration": time.perf_counter_ns() - received_ns,
        "load_duration": acquired_ns - received_ns,
        "prompt_eval_count": generation.prompt_tokens,
        "prompt_eval_duration": generation.prompt_ns,
        "eval_count": len(generation.tokens),
        "eval_duration": generation.eval_ns,
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
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no route for {path!r}"}, head=head)

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


def serve(config: EmulatorConfig, *, ready_stream: IO[str] | None = None) -> int:
    """Run an emulator in this process until SIGTERM/SIGINT (or stdin EOF). Returns 0.

    Must run in the main thread (it installs signal handlers). Pins the process to
    ``config.cpus`` and limits BLAS threads *before* numpy is imported.
    """
    if config.cpus is not None:
        os.sched_setaffinity(0, config.cpus)
    _limit_threads(config.threads)
    state = _State(config, _Decoder(config.weights_mb, config.slowdown))
    server = _EmulatorServer(state)
    stop = threading.Event()

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
        state.stopping.set()
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


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sollol_locality.testing.emulator",
        description="An Ollama-compatible node whose tokens do memory-bandwidth-bound work.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: let the kernel choose")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--weights-mb", type=int, default=DEFAULT_WEIGHTS_MB)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads")
    parser.add_argument("--slowdown", type=float, default=1.0, help="per-token work multiplier")
    parser.add_argument("--cpus", type=parse_cpus, default=None, help="pin to CPUs, e.g. 0,1")
    parser.add_argument("--default-num-predict", type=int, default=DEFAULT_NUM_PREDICT)
    parser.add_argument(
        "--exit-on-stdin-eof", action="store_true", help="exit when stdin closes (parent gone)"
    )
    parser.add_argument("--verbose", action="store_true", help="log requests to stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        config = EmulatorConfig(
            host=args.host, port=args.port, model=args.model, weights_mb=args.weights_mb,
            threads=args.threads, slowdown=args.slowdown, cpus=args.cpus,
            default_num_predict=args.default_num_predict,
            exit_on_stdin_eof=args.exit_on_stdin_eof, verbose=args.verbose,
        )  # fmt: skip
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


def spawn_emulator(
    host: str = "127.0.0.1", port: int = 0, *, netns: str | None = None,
    cpus: Sequence[int] | None = None, model: str = DEFAULT_MODEL,
    weights_mb: int = DEFAULT_WEIGHTS_MB, threads: int = 1, slowdown: float = 1.0,
    default_num_predict: int = DEFAULT_NUM_PREDICT, verbose: bool = False,
    python: str = sys.executable, env: Mapping[str, str] | None = None,
) -> EmulatorProcess:  # fmt: skip
    """Start an emulator subprocess and return at once (call :meth:`EmulatorProcess.wait_ready`).

    With ``netns`` the child runs under ``ip netns exec NETNS`` (root only); ``ip`` execs the
    interpreter, so the process id is the emulator's own.
    """
    config = EmulatorConfig(
        host=host, port=port, model=model, weights_mb=weights_mb, threads=threads,
        slowdown=slowdown, cpus=tuple(cpus) if cpus is not None else None,
        default_num_predict=default_num_predict, exit_on_stdin_eof=True, verbose=verbose,
    )  # fmt: skip
    command = [python, "-m", "sollol_locality.testing.emulator", *config.to_argv()]
    if netns is not None:
        command = ["ip", "netns", "exec", netns, *command]
    child_env = dict(os.environ if env is None else env)
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
    ready_timeout: float = 60.0,
) -> EmulatorProcess:  # fmt: skip
    """Start an emulator subprocess and wait (at most ``ready_timeout`` s) until it listens.

    On any failure, including Ctrl-C while waiting, the child is stopped before the error
    propagates.
    """
    process = spawn_emulator(
        host, port, netns=netns, cpus=cpus, model=model, weights_mb=weights_mb, threads=threads,
        slowdown=slowdown, default_num_predict=default_num_predict, verbose=verbose,
    )  # fmt: skip
    try:
        process.wait_ready(ready_timeout)
    except BaseException:
        process.stop()
        raise
    return process


if __name__ == "__main__":
    sys.exit(main())
