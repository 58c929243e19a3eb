"""The Ollama-compatible emulator node (sollol_locality.testing.emulator), on loopback only."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

from sollol_locality.testing.emulator import (  # noqa: E402
    DEFAULT_MODEL,
    DEFAULT_NUM_PREDICT,
    EmulatorConfig,
    EmulatorProcess,
    EmulatorStartError,
    auto_backend,
    normalise_model_name,
    parse_cpus,
    resolve_settings,
    start_emulator,
)

pytestmark = pytest.mark.integration

WEIGHTS_MB = 8
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def get(url: str) -> tuple[int, Any]:
    try:
        with _OPENER.open(url, timeout=10) as response:
            body = response.read()
            status = response.status
            kind = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        body, status, kind = exc.read(), exc.code, exc.headers.get("Content-Type", "")
    return status, json.loads(body) if kind.startswith("application/json") else body.decode()


def post(url: str, payload: Any, *, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else json.dumps(payload).encode()
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with _OPENER.open(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def generate(url: str, num_predict: int | None = None, **extra: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": DEFAULT_MODEL, "prompt": "tell me a story", **extra}
    payload["stream"] = False
    if num_predict is not None:
        payload["options"] = {"num_predict": num_predict}
    status, answer = post(f"{url}/api/generate", payload)
    assert status == 200, answer
    assert isinstance(answer, dict)
    return answer


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait for any process (not only a child) to end, on a pidfd: no polling loop."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def node() -> Iterator[EmulatorProcess]:
    with start_emulator("127.0.0.1", 0, weights_mb=WEIGHTS_MB, ready_timeout=30) as process:
        yield process


# ------------------------------------------------------------------------------------ helpers


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", (0,)), ("0,1", (0, 1)), ("1,0,1", (0, 1)), ("0-2", (0, 1, 2)), (" 3 , 0-1", (0, 1, 3))],
)
def test_parse_cpus(text: str, expected: tuple[int, ...]) -> None:
    assert parse_cpus(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "Invalid CPU list '': empty item"),
        ("0,", "Invalid CPU list '0,': empty item"),
        ("a", "Invalid CPU list 'a': 'a' is not a CPU id or range"),
        ("3-1", "Invalid CPU list '3-1': bad range '3-1'"),
    ],
)
def test_parse_cpus_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_cpus(text)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("llama3.2", "llama3.2:latest"),
        ("llama3.2:latest", "llama3.2:latest"),
        ("qwen:7b", "qwen:7b"),
        ("registry.local:5000/team/model", "registry.local:5000/team/model:latest"),
    ],
)
def test_normalise_model_name(name: str, expected: str) -> None:
    assert normalise_model_name(name) == expected


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"port": 70000}, "Invalid port 70000: expected 0 to 65535"),
        ({"weights_mb": 0}, "Invalid weights_mb 0: expected at least 1"),
        ({"threads": 0}, "Invalid threads 0: expected at least 1"),
        ({"slowdown": 0.0}, "Invalid slowdown 0.0: expected a number above 0"),
        ({"cpus": ()}, "Invalid cpus (): expected at least one CPU id or None"),
        ({"num_parallel": 0}, "Invalid num_parallel 0: expected at least 1"),
        ({"batch_cost": -0.5}, "Invalid batch_cost -0.5: expected 0 or more"),
        ({"backend": "gpu"}, "Invalid backend 'gpu': expected one of auto, numpy, hashlib"),
    ],
)
def test_config_rejects(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        EmulatorConfig(**fields)
    assert str(info.value) == message


def test_config_round_trips_through_argv() -> None:
    from sollol_locality.testing.emulator import _build_parser

    config = EmulatorConfig(
        host="::1", port=0, model="m", weights_mb=3, threads=2, slowdown=2.5, cpus=(0, 1),
        default_num_predict=7, exit_on_stdin_eof=True,
    )  # fmt: skip
    args = _build_parser().parse_args(config.to_argv())
    rebuilt = EmulatorConfig(
        host=args.host, port=args.port, model=args.model, weights_mb=args.weights_mb,
        threads=args.threads, slowdown=args.slowdown, cpus=args.cpus,
        default_num_predict=args.default_num_predict, exit_on_stdin_eof=args.exit_on_stdin_eof,
    )  # fmt: skip
    assert rebuilt == config


# ---------------------------------------------------------------------------------- endpoints


def test_ready_line_reports_the_real_port(node: EmulatorProcess) -> None:
    assert node.url.startswith("http://127.0.0.1:")
    assert node.port > 0 and node.host == "127.0.0.1"
    with socket.create_connection(("127.0.0.1", node.port), timeout=5):
        pass


def test_root_says_ollama_is_running(node: EmulatorProcess) -> None:
    assert get(node.url + "/") == (200, "Ollama is running")


def test_version(node: EmulatorProcess) -> None:
    status, body = get(node.url + "/api/version")
    assert status == 200
    assert set(body) == {"version"} and re.match(r"^\d+\.\d+\.\d+$", body["version"])


def test_tags(node: EmulatorProcess) -> None:
    status, body = get(node.url + "/api/tags")
    assert status == 200
    [model] = body["models"]
    assert set(model) == {"name", "model", "modified_at", "size", "digest", "details"}
    assert model["name"] == model["model"] == DEFAULT_MODEL
    assert model["size"] == WEIGHTS_MB * 1024 * 1024
    assert re.match(r"^[0-9a-f]{64}$", model["digest"])
    assert _TIMESTAMP.match(model["modified_at"])
    assert {"format", "family", "families", "parameter_size", "quantization_level"} <= set(
        model["details"]
    )


def test_ps(node: EmulatorProcess) -> None:
    status, body = get(node.url + "/api/ps")
    assert status == 200
    [model] = body["models"]
    assert {"name", "model", "size", "digest", "details", "expires_at", "size_vram"} == set(model)
    assert model["name"] == DEFAULT_MODEL and model["size_vram"] == 0
    assert _TIMESTAMP.match(model["expires_at"])


def test_generate_shape_and_num_predict(node: EmulatorProcess) -> None:
    answer = generate(node.url, 7)
    assert {
        "model", "created_at", "response", "done", "done_reason", "total_duration",
        "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
        "eval_duration",
    } <= set(answer)  # fmt: skip
    assert answer["model"] == DEFAULT_MODEL
    assert _TIMESTAMP.match(answer["created_at"])
    assert answer["done"] is True and answer["done_reason"] == "length"
    assert answer["eval_count"] == 7 and len(answer["response"].split()) == 7
    assert answer["prompt_eval_count"] == 4
    for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(answer[name], int) and answer[name] >= 0, name
    parts = answer["load_duration"] + answer["prompt_eval_duration"] + answer["eval_duration"]
    assert answer["total_duration"] >= parts


@pytest.mark.parametrize(("num_predict", "count"), [(0, 0), (1, 1), (50, 50)])
def test_generate_honours_num_predict(node: EmulatorProcess, num_predict: int, count: int) -> None:
    assert generate(node.url, num_predict)["eval_count"] == count


def test_generate_default_num_predict(node: EmulatorProcess) -> None:
    answer = generate(node.url)
    assert answer["eval_count"] == DEFAULT_NUM_PREDICT and answer["done_reason"] == "stop"


def test_generate_accepts_untagged_model_name_and_stream_true(node: EmulatorProcess) -> None:
    answer = generate(node.url, 3, model="llama3.2", stream=True)
    assert answer["model"] == "llama3.2" and answer["eval_count"] == 3 and answer["done"] is True


def test_generate_is_deterministic_per_prompt(node: EmulatorProcess) -> None:
    assert generate(node.url, 5)["response"] == generate(node.url, 5)["response"]


def test_empty_prompt_only_loads(node: EmulatorProcess) -> None:
    status, answer = post(f"{node.url}/api/generate", {"model": DEFAULT_MODEL, "prompt": ""})
    assert status == 200
    assert answer["done"] is True and answer["done_reason"] == "load" and answer["response"] == ""


@pytest.mark.parametrize(
    ("payload", "status", "error"),
    [
        ({"model": "nope", "prompt": "x"}, 404, 'model "nope" not found, try pulling it first'),
        ({"prompt": "x"}, 400, "model is required"),
        (
            {"model": DEFAULT_MODEL, "prompt": "x", "options": {"num_predict": "many"}},
            400,
            "invalid num_predict 'many': expected an integer",
        ),
    ],
)
def test_generate_errors(node: EmulatorProcess, payload: Any, status: int, error: str) -> None:
    assert post(f"{node.url}/api/generate", payload) == (status, {"error": error})


def test_generate_bad_json(node: EmulatorProcess) -> None:
    status, body = post(f"{node.url}/api/generate", None, raw=b"{not json")
    assert status == 400 and body["error"].startswith("invalid JSON")


def test_unknown_path_is_404(node: EmulatorProcess) -> None:
    status, body = get(node.url + "/api/nothing")
    assert status == 404 and "error" in body


def test_emulator_endpoint_reports_settings(node: EmulatorProcess) -> None:
    status, body = get(node.url + "/api/emulator")
    assert status == 200
    assert body["pid"] == node.pid
    assert body["config"]["weights_mb"] == WEIGHTS_MB and body["waiting"] == 0


# --------------------------------------------------------------------------- one at a time


def interleaved_ratio(
    first: Callable[[], float], second: Callable[[], float], rounds: int = 3
) -> float:
    """Median over rounds of second() / first(), measured next to each other in each round (order
    alternating), so a load change between measurements moves one round, not the answer."""
    ratios = []
    for round_number in range(rounds):
        if round_number % 2:
            b = second()
            a = first()
        else:
            a = first()
            b = second()
        ratios.append(b / a)
    return statistics.median(ratios)


@pytest.mark.timing  # one request's time against two's
def test_one_generate_at_a_time(node: EmulatorProcess) -> None:
    tokens = 300  # about 0.1 s of work at 8 MB
    generate(node.url, 5)  # warm
    answers: list[dict[str, Any]] = []

    def single() -> float:
        started = time.perf_counter()
        generate(node.url, tokens)
        return time.perf_counter() - started

    def concurrent() -> float:
        barrier = threading.Barrier(2)
        answers.clear()

        def one() -> None:
            barrier.wait()
            answers.append(generate(node.url, tokens))

        threads = [threading.Thread(target=one) for _ in range(2)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - started

    ratio = interleaved_ratio(single, concurrent, rounds=5)
    assert ratio >= 1.6
    # The direct evidence, independent of machine load: the request that waited reports the
    # wait in load_duration, and it covers most of the other request's work.
    assert len(answers) == 2
    waited = max(answers, key=lambda a: a["load_duration"])
    other = min(answers, key=lambda a: a["load_duration"])
    assert waited["load_duration"] >= 0.8 * other["eval_duration"]


@pytest.mark.timing  # two nodes' decode times compared
def test_slowdown_multiplies_token_work() -> None:
    with (
        start_emulator(weights_mb=WEIGHTS_MB) as fast,
        start_emulator(weights_mb=WEIGHTS_MB, slowdown=3.0) as slow,
    ):
        generate(fast.url, 5), generate(slow.url, 5)
        ratio = interleaved_ratio(
            lambda: generate(fast.url, 150)["eval_duration"],
            lambda: generate(slow.url, 150)["eval_duration"],
            rounds=5,
        )
    assert 2.0 <= ratio <= 4.5


def test_pinned_to_the_cpus_asked() -> None:
    cpu = min(os.sched_getaffinity(0))
    with start_emulator(weights_mb=1, cpus=[cpu]) as process:
        status, body = get(process.url + "/api/emulator")
    assert status == 200 and body["affinity"] == [cpu]


# ------------------------------------------------------------------------------- lifecycle


def test_clean_stop() -> None:
    process = start_emulator(weights_mb=1)
    port = process.port
    assert process.is_running()
    assert process.stop() == 0
    assert process.returncode == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert process.stop() == 0  # idempotent


def test_sigint_also_stops_cleanly() -> None:
    process = start_emulator(weights_mb=1)
    os.kill(process.pid, signal.SIGINT)
    assert wait_gone(process.pid, 10)
    assert process.stop() == 0


def test_start_error_names_the_cause() -> None:
    with start_emulator(weights_mb=1) as first:
        with pytest.raises(EmulatorStartError) as info:
            start_emulator("127.0.0.1", first.port, weights_mb=1)
    message = str(info.value)
    assert "exited with code 1 before READY" in message
    assert "Address already in use" in message


def test_emulator_exits_when_its_parent_is_killed() -> None:
    code = (
        "from sollol_locality.testing.emulator import start_emulator\n"
        "p = start_emulator(weights_mb=1)\n"
        "print(p.pid, flush=True)\n"
        "import threading; threading.Event().wait()\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        emulator_pid = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    assert wait_gone(emulator_pid, 10), f"emulator {emulator_pid} outlived its parent"


# ------------------------------------------------------------------------- batching (slots)


def stats(url: str) -> dict[str, Any]:
    status, body = get(url + "/api/emulator")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def lined_up(url: str, count: int, num_predict: int = 6) -> list[dict[str, Any]]:
    """``count`` generates sent while decoding is paused, released together once all ``count``
    are queued (the emulator's wait endpoint blocks until then): no timing involved."""
    post(url + "/api/emulator/pause", {})
    answers: list[dict[str, Any]] = []
    threads = [
        threading.Thread(target=lambda: answers.append(generate(url, num_predict)))
        for _ in range(count)
    ]
    for thread in threads:
        thread.start()
    status, body = get(f"{url}/api/emulator/wait?waiting={count}&timeout=30")
    assert status == 200, body
    post(url + "/api/emulator/resume", {})
    for thread in threads:
        thread.join(60)
    assert len(answers) == count
    return answers


def test_num_parallel_4_batches_four_and_queues_the_fifth() -> None:
    with start_emulator(weights_mb=1, extra_env={"OLLAMA_NUM_PARALLEL": "4"}) as node:
        answers = lined_up(node.url, 5)
        body = stats(node.url)
    assert body["num_parallel"] == 4 and body["sources"]["num_parallel"] == "environment"
    assert body["served"] == 5 and body["generates"] == 5
    assert body["max_batch"] == 4 and body["max_in_flight"] == 4
    assert body["queued"] == 1 and body["max_queue"] == 1
    assert body["in_flight"] == 0 and body["queue"] == 0 and body["waiting"] == 0
    assert all(answer["eval_count"] == 6 for answer in answers)
    assert body["steps"] < 5 * 6  # tokens of several sequences per step


def test_default_is_one_request_at_a_time() -> None:
    with start_emulator(weights_mb=1, extra_env={"OLLAMA_NUM_PARALLEL": ""}) as node:
        lined_up(node.url, 3)
        body = stats(node.url)
    assert body["num_parallel"] == 1 and body["sources"]["num_parallel"] == "default"
    assert body["max_batch"] == 1 and body["max_in_flight"] == 1
    assert body["queued"] == 2 and body["steps"] == 3 * 6


def test_a_flag_overrides_the_environment() -> None:
    env = {"OLLAMA_NUM_PARALLEL": "4", "OLLAMA_EMULATOR_BATCH_COST": "0.5"}
    with start_emulator(weights_mb=1, extra_env=env, num_parallel=2) as node:
        lined_up(node.url, 3)
        body = stats(node.url)
    assert body["num_parallel"] == 2 and body["sources"]["num_parallel"] == "flag"
    assert body["batch_cost"] == 0.5 and body["sources"]["batch_cost"] == "environment"
    assert body["max_batch"] == 2 and body["queued"] == 1
    assert body["environ"]["OLLAMA_NUM_PARALLEL"] == "4"


def test_a_batched_answer_is_the_one_given_alone() -> None:
    with start_emulator(weights_mb=1, num_parallel=3) as node:
        alone = generate(node.url, 6)["response"]
        together = lined_up(node.url, 3)
    assert all(answer["response"] == alone for answer in together)


@pytest.mark.parametrize(
    ("config", "environ", "expected"),
    [
        (EmulatorConfig(), {}, (1, 0.15, {"num_parallel": "default", "batch_cost": "default"})),
        (EmulatorConfig(), {"OLLAMA_NUM_PARALLEL": " 8 ", "OLLAMA_EMULATOR_BATCH_COST": "0"},
         (8, 0.0, {"num_parallel": "environment", "batch_cost": "environment"})),
        (EmulatorConfig(num_parallel=2, batch_cost=0.3), {"OLLAMA_NUM_PARALLEL": "8"},
         (2, 0.3, {"num_parallel": "flag", "batch_cost": "flag"})),
    ],
)  # fmt: skip
def test_resolve_settings(
    config: EmulatorConfig, environ: dict[str, str], expected: tuple[Any, ...]
) -> None:
    assert resolve_settings(config, environ) == expected


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OLLAMA_NUM_PARALLEL": "four"},
         "Invalid OLLAMA_NUM_PARALLEL 'four': expected a whole number"),
        ({"OLLAMA_NUM_PARALLEL": "0"}, "Invalid OLLAMA_NUM_PARALLEL '0': expected at least 1"),
        ({"OLLAMA_EMULATOR_BATCH_COST": "-1"},
         "Invalid OLLAMA_EMULATOR_BATCH_COST '-1': expected 0 or more"),
    ],
)  # fmt: skip
def test_a_bad_environment_is_a_usage_error(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        resolve_settings(EmulatorConfig(), environ)
    assert str(info.value) == message
    done = subprocess.run(
        [sys.executable, "-m", "sollol_locality.testing.emulator", "--weights-mb", "1"],
        cwd=ROOT, env={**os.environ, **environ}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.strip() == f"emulator: {message}"


def test_ollama_host_sets_the_bind_address() -> None:
    env = {**os.environ, "OLLAMA_HOST": "127.0.0.2:0"}
    env.pop("OLLAMA_NUM_PARALLEL", None)
    child = subprocess.Popen(
        [sys.executable, "-m", "sollol_locality.testing.emulator", "--weights-mb", "1",
         "--exit-on-stdin-eof"],
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        assert re.fullmatch(r"READY http://127\.0\.0\.2:\d+", line), line
        assert stats(line.split()[1])["config"]["host"] == "127.0.0.2"
    finally:
        child.terminate()
        child.wait(10)


def test_help_shows_the_defaults_and_the_backend() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sollol_locality.testing.emulator", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    text = " ".join(done.stdout.split())
    assert done.returncode == 0
    assert "--weights-mb WEIGHTS_MB weights held in RAM (MiB) (default: 256)" in text
    assert "(default: OLLAMA_NUM_PARALLEL, else 1)" in text
    assert "(default: OLLAMA_EMULATOR_BATCH_COST, else 0.15)" in text
    assert f"Decode backend here: {auto_backend()}" in text


def test_hashlib_backend_needs_no_numpy() -> None:
    code = (
        "import sys; sys.modules['numpy'] = None\n"  # an import of numpy now fails
        "from sollol_locality.testing.emulator import make_weights\n"
        "weights = make_weights('auto', 1)\n"
        "weights.work(1.5)\n"
        "print(weights.name, weights.next_token(3, 0) == weights.next_token(3, 0))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.stdout.split() == ["hashlib", "True"], done.stderr
    with start_emulator(weights_mb=1, backend="hashlib", num_parallel=2) as node:
        first, second = generate(node.url, 5), generate(node.url, 5)
        body = stats(node.url)
    assert body["backend"] == "hashlib" and first["response"] == second["response"]
    assert first["eval_count"] == 5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.2:0", ("127.0.0.2", 0)),
        ("0.0.0.0", ("0.0.0.0", 11434)),
        ("http://10.0.0.5:11500/", ("10.0.0.5", 11500)),
        ("[::1]:8080", ("::1", 8080)),
        ("::1", ("::1", 11434)),
    ],
)
def test_ollama_host_is_read_as_ollama_does(text: str, expected: tuple[str, int]) -> None:
    from sollol_locality.testing.emulator import _parse_ollama_host

    assert _parse_ollama_host(text) == expected


def test_the_library_never_loads_its_test_support() -> None:
    code = (
        "import sys, sollol_locality, sollol_locality.cli\n"
        "print(sorted(m for m in sys.modules if m.startswith('sollol_locality.testing')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.stdout.strip() == "[]", done.stderr
    core = sorted((ROOT / "sollol_locality").glob("*.py"))
    assert core and not [
        path.name for path in core
        if re.search(r"^\s*(from|import)\s+(sollol_locality\.testing|\.testing)\b",
                     path.read_text(), re.MULTILINE)
    ]  # fmt: skip
