"""A long-form job for benchmarks: K chunks, each one ``/api/generate`` with ``num_predict`` N.

* :func:`run_sequential`: the chunks one after another on one node.
* :func:`run_parallel`: one worker per listed node; worker i starts with chunk i, then each takes
  the next chunk from a shared queue whenever its node is free (greedy, as a dispatcher with one
  in-flight request per node). With no more chunks than nodes the first nodes listed run them.
  List a URL twice to keep two requests in flight on it. With ``tasks_per_node`` each node runs
  exactly its share of the chunks, and ``concurrency_per_node`` keeps that many in flight on it
  (a plan's ``tasks_per_node`` / ``concurrency_per_node``; k at once on one batching node).
* :class:`Arm`: one way of running a job (sequential on a node, or parallel with per-node task
  counts and concurrency), :func:`run_arm` runs it, and :func:`measure` runs several arms in
  interleaved rounds under one :class:`Settings`.
* :func:`compare`: both, side by side and alternating, repeated; the figure to use is the ratio
  ``parallel wall / sequential wall`` measured in the same run (below 1.0: parallel wins).

Wall times come from :func:`time.perf_counter`. HTTP is :mod:`urllib` with proxies disabled, so a
request for a simulated machine never leaves this one.

Command line (from the repository root)::

    python -m sollol_locality.testing.workload --scenario two-machines --chunks 2 \
        --num-predict 32 --repeats 5
    python -m sollol_locality.testing.workload --chunks 4 \
        --nodes http://127.0.0.1:11434 http://127.0.0.1:11435
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from .emulator import DEFAULT_MODEL, DEFAULT_NUM_PREDICT, DEFAULT_WEIGHTS_MB

__all__ = [
    "Arm",
    "ChunkTiming",
    "Comparison",
    "GenerateError",
    "WorkloadResult",
    "compare",
    "generate",
    "Settings",
    "main",
    "measure",
    "run_arm",
    "run_parallel",
    "run_sequential",
    "run_workload",
    "warm_up",
]

PROMPT_TEMPLATE: Final = (
    "Write part {part} of {total} of a long answer on why two model servers on one machine "
    "compete for memory bandwidth."
)
_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_NS: Final = 1e-9

Mode = Literal["sequential", "parallel"]


class GenerateError(RuntimeError):
    """A generate request that failed; names the node and what it answered."""


@dataclass(frozen=True, slots=True)
class ChunkTiming:
    """One chunk of a job.

    Attributes:
        index: chunk number, 0-based.
        node: URL of the node that ran it.
        start: seconds from the job's start to sending the request.
        seconds: wall time of the request as the client saw it.
        eval_count: tokens the node generated.
        total_duration: node-reported seconds from receipt to answer.
        load_duration: node-reported seconds before work began (the emulator's queue wait).
        eval_duration: node-reported seconds generating tokens.
    """

    index: int
    node: str
    start: float
    seconds: float
    eval_count: int
    total_duration: float
    load_duration: float
    eval_duration: float

    @property
    def end(self) -> float:
        return self.start + self.seconds


@dataclass(frozen=True, slots=True)
class WorkloadResult:
    """A finished job: its chunks (by index) and its wall time."""

    mode: Mode
    nodes: tuple[str, ...]
    num_predict: int
    chunks: tuple[ChunkTiming, ...]
    wall_seconds: float

    @property
    def chunk_seconds(self) -> tuple[float, ...]:
        return tuple(chunk.seconds for chunk in self.chunks)

    @property
    def mean_chunk_seconds(self) -> float:
        return statistics.fmean(self.chunk_seconds) if self.chunks else 0.0

    def chunks_per_node(self) -> dict[str, int]:
        counts = dict.fromkeys(self.nodes, 0)
        for chunk in self.chunks:
            counts[chunk.node] = counts.get(chunk.node, 0) + 1
        return counts


def _base(url: str) -> str:
    return url.rstrip("/")


def generate(
    url: str, prompt: str, *, model: str = DEFAULT_MODEL,
    num_predict: int = DEFAULT_NUM_PREDICT, timeout: float = 300.0,
) -> dict[str, Any]:  # fmt: skip
    """One non-streaming ``POST /api/generate``; returns the answer object."""
    body = json.dumps(
        {"model": model, "prompt": prompt, "stream": False, "options": {"num_predict": num_predict}}
    ).encode("utf-8")
    request = urllib.request.Request(
        f"{_base(url)}/api/generate", data=body, method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            answer: dict[str, Any] = json.load(response)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        raise GenerateError(f"{url}: HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
        raise GenerateError(f"{url}: {exc}") from exc
    if not answer.get("done"):
        raise GenerateError(f"{url}: answer not done: {answer!r}")
    return answer


def _run_chunk(
    url: str, index: int, total: int, origin: float, *, model: str, num_predict: int,
    timeout: float,
) -> ChunkTiming:  # fmt: skip
    prompt = PROMPT_TEMPLATE.format(part=index + 1, total=total)
    started = time.perf_counter()
    answer = generate(url, prompt, model=model, num_predict=num_predict, timeout=timeout)
    finished = time.perf_counter()
    return ChunkTiming(
        index=index, node=url, start=started - origin, seconds=finished - started,
        eval_count=int(answer.get("eval_count", 0)),
        total_duration=int(answer.get("total_duration", 0)) * _NS,
        load_duration=int(answer.get("load_duration", 0)) * _NS,
        eval_duration=int(answer.get("eval_duration", 0)) * _NS,
    )  # fmt: skip


def run_sequential(
    node: str, chunks: int, *, num_predict: int = DEFAULT_NUM_PREDICT,
    model: str = DEFAULT_MODEL, timeout: float = 300.0,
) -> WorkloadResult:  # fmt: skip
    """The chunks one after another on ``node``."""
    if chunks < 1:
        raise ValueError(f"Invalid chunks {chunks!r}: expected at least 1")
    origin = time.perf_counter()
    timings = [
        _run_chunk(node, i, chunks, origin, model=model, num_predict=num_predict, timeout=timeout)
        for i in range(chunks)
    ]
    wall = time.perf_counter() - origin
    return WorkloadResult("sequential", (node,), num_predict, tuple(timings), wall)


def _split(chunks: int, count: int) -> list[int]:
    """``chunks`` as evenly as possible over ``count`` nodes, the first nodes taking the rest."""
    return [chunks // count + (i < chunks % count) for i in range(count)]


def run_parallel(
    nodes: Sequence[str], chunks: int, *, num_predict: int = DEFAULT_NUM_PREDICT,
    model: str = DEFAULT_MODEL, timeout: float = 300.0,
    tasks_per_node: Sequence[int] | None = None,
    concurrency_per_node: Sequence[int] | None = None,
) -> WorkloadResult:  # fmt: skip
    """Run the chunks across ``nodes`` at once.

    Without ``tasks_per_node``: ``concurrency_per_node[i]`` workers (default 1) per entry of
    ``nodes``, each taking the next chunk from one shared queue when its request finishes
    (worker i starts with chunk i). With ``tasks_per_node`` (one count per node, summing to
    ``chunks``): node i runs exactly ``tasks_per_node[i]`` chunks (consecutive indexes, in node
    order), at most ``concurrency_per_node[i]`` of them at once.

    The first failure stops every worker from taking more chunks and is raised after all joined.
    """
    if chunks < 1:
        raise ValueError(f"Invalid chunks {chunks!r}: expected at least 1")
    if not nodes:
        raise ValueError("Invalid nodes []: expected at least one node URL")
    concurrency = [1] * len(nodes) if concurrency_per_node is None else list(concurrency_per_node)
    if len(concurrency) != len(nodes) or any(c < 1 for c in concurrency):
        raise ValueError(f"Invalid concurrency_per_node {concurrency_per_node!r}: expected one "
                         f"count >= 1 per node ({len(nodes)})")
    if tasks_per_node is not None:
        tasks = list(tasks_per_node)
        if len(tasks) != len(nodes) or any(t < 0 for t in tasks) or sum(tasks) != chunks:
            raise ValueError(f"Invalid tasks_per_node {tasks_per_node!r}: expected one count >= 0 "
                             f"per node ({len(nodes)}) summing to {chunks}")
    # One queue per node with its own chunks, or one shared queue; every worker of a node takes
    # from its node's queue. Shared: worker i starts with chunk i (so with no more chunks than
    # workers, the first listed run them, the same every time).
    workers: list[tuple[str, int | None, queue.SimpleQueue[int]]] = []
    if tasks_per_node is None:
        shared: queue.SimpleQueue[int] = queue.SimpleQueue()
        for url, count in zip(nodes, concurrency, strict=True):
            workers += [(url, None, shared)] * count
        for position in range(len(workers)):
            url, _, pool = workers[position]
            workers[position] = (url, position if position < chunks else None, pool)
        for index in range(len(workers), chunks):
            shared.put(index)
    else:
        first = 0
        for url, count, share in zip(nodes, concurrency, tasks, strict=True):
            own: queue.SimpleQueue[int] = queue.SimpleQueue()
            for index in range(first, first + share):
                own.put(index)
            first += share
            workers += [(url, None, own)] * min(count, share)
    timings: list[ChunkTiming] = []
    errors: list[BaseException] = []
    failed = threading.Event()
    lock = threading.Lock()
    start_gate = threading.Barrier(len(workers) + 1)
    origin = 0.0

    def worker(url: str, first: int | None, pending: queue.SimpleQueue[int]) -> None:
        start_gate.wait()
        index = first
        while not failed.is_set():
            if index is None:
                try:
                    index = pending.get_nowait()
                except queue.Empty:
                    return
            try:
                timing = _run_chunk(
                    url, index, chunks, origin, model=model, num_predict=num_predict,
                    timeout=timeout,
                )  # fmt: skip
            except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
                with lock:
                    errors.append(exc)
                failed.set()
                return
            with lock:
                timings.append(timing)
            index = None

    threads = [
        threading.Thread(target=worker, args=spec, name=f"chunk-worker-{i}", daemon=True)
        for i, spec in enumerate(workers)
    ]
    for thread in threads:
        thread.start()
    origin = time.perf_counter()
    start_gate.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - origin
    if errors:
        raise errors[0]
    ordered = tuple(sorted(timings, key=lambda t: t.index))
    return WorkloadResult("parallel", tuple(nodes), num_predict, ordered, wall)


def run_workload(
    nodes: Sequence[str], chunks: int, *, mode: Mode, num_predict: int = DEFAULT_NUM_PREDICT,
    model: str = DEFAULT_MODEL, timeout: float = 300.0,
) -> WorkloadResult:  # fmt: skip
    """Sequential on ``nodes[0]``, or parallel across ``nodes``."""
    if mode == "sequential":
        if not nodes:
            raise ValueError("Invalid nodes []: expected at least one node URL")
        return run_sequential(
            nodes[0], chunks, num_predict=num_predict, model=model, timeout=timeout
        )
    if mode == "parallel":
        return run_parallel(nodes, chunks, num_predict=num_predict, model=model, timeout=timeout)
    raise ValueError(f"Invalid mode {mode!r}: expected 'sequential' or 'parallel'")


def warm_up(nodes: Sequence[str], *, model: str = DEFAULT_MODEL, tokens: int = 4) -> None:
    """One short generate per node (first-request costs out of the measurement)."""
    for url in dict.fromkeys(nodes):
        generate(url, "warm up", model=model, num_predict=tokens)


# ------------------------------------------------------------------------------------------
# Arms: ways of running one job, measured side by side


@dataclass(frozen=True, slots=True)
class Settings:
    """One benchmark configuration.

    Attributes:
        chunks: K, the chunks of the long-form job.
        tokens: ``num_predict`` of each chunk (and of each calibration generate).
        repeats: interleaved rounds of every strategy.
        calibration_rounds: ``calibrate(rounds=...)``.
        weights_mb: emulator weight matrix (MiB).
        online_jobs: real jobs the "online" policy runs through a fresh planner before deciding.
    """

    chunks: int = 4
    tokens: int = 32
    repeats: int = 7
    calibration_rounds: int = 3
    weights_mb: int = DEFAULT_WEIGHTS_MB
    online_jobs: int = 3


@dataclass(frozen=True, slots=True)
class Arm:
    """One way of running the job: ``mode`` on ``urls`` (sequential: ``urls[0]`` only).

    ``tasks`` (one count per URL, summing to the job's chunks) and ``concurrency`` (requests in
    flight per URL) come from a plan's ``tasks_per_node`` / ``concurrency_per_node``; ``None``
    means today's dispatch: a shared queue, one request at a time per node.
    """

    mode: str
    urls: tuple[str, ...]
    tasks: tuple[int, ...] | None = None
    concurrency: tuple[int, ...] | None = None

    @classmethod
    def plain(cls, mode: str, urls: Sequence[str]) -> Arm:
        return cls(mode, tuple(urls) if mode == "parallel" else tuple(urls[:1]))

    @classmethod
    def of_plan(cls, plan: Any) -> Arm:
        """What ``plan`` (an ``ExecutionPlan``) says: its nodes, with its per-node task counts
        and concurrency where it has them (a concurrency of 1 everywhere is left out)."""
        urls = tuple(str(getattr(node, "url", node)) for node in plan.nodes)
        if plan.mode != "parallel":
            return cls("sequential", urls[:1])
        tasks = getattr(plan, "tasks_per_node", None)
        concurrency = getattr(plan, "concurrency_per_node", None)
        counts = tuple(int(t) for t in tasks) if tasks is not None else None
        at_once = tuple(int(c) for c in concurrency) if concurrency is not None else None
        if at_once is not None and all(c == 1 for c in at_once):
            at_once = None
        if counts is not None and at_once is None and list(counts) == _split(sum(counts),
                                                                              len(counts)):
            counts = None  # today's even split: the shared queue does the same
        if counts is not None and len(counts) != len(urls):
            counts = None
        if at_once is not None and len(at_once) != len(urls):
            at_once = None
        return cls("parallel", urls, counts, at_once)

    def sorted_by(self, order: dict[str, int]) -> Arm:
        """The same strategy with its URLs in ``order`` (url -> rank), counts kept with them."""
        if self.mode != "parallel":
            return self
        ranks = sorted(range(len(self.urls)), key=lambda i: order[self.urls[i]])
        return Arm(
            self.mode, tuple(self.urls[i] for i in ranks),
            None if self.tasks is None else tuple(self.tasks[i] for i in ranks),
            None if self.concurrency is None else tuple(self.concurrency[i] for i in ranks),
        )  # fmt: skip

    def label(self, names: dict[str, str], total: int) -> str:
        """``sequential n1``, ``all-parallel``, ``parallel n1+n3``; a node with its own task
        count reads ``n1:5``, with several requests at once ``n1x4`` (``n1:5x4``: 5 tasks on n1,
        4 at a time)."""
        if self.mode == "sequential":
            return f"sequential {names[self.urls[0]]}"
        if self.tasks is None and self.concurrency is None and len(self.urls) == total:
            return "all-parallel"
        parts = []
        for i, url in enumerate(self.urls):
            text = names[url]
            if self.tasks is not None:
                text += f":{self.tasks[i]}"
            if self.concurrency is not None and self.concurrency[i] > 1:
                text += f"x{self.concurrency[i]}"
            parts.append(text)
        return "parallel " + "+".join(parts)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"mode": self.mode, "urls": list(self.urls)}
        if self.tasks is not None:
            data["tasks"] = list(self.tasks)
        if self.concurrency is not None:
            data["concurrency"] = list(self.concurrency)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Arm:
        tasks, concurrency = data.get("tasks"), data.get("concurrency")
        return cls(data["mode"], tuple(data["urls"]),
                   None if tasks is None else tuple(tasks),
                   None if concurrency is None else tuple(concurrency))


def run_arm(arm: Arm, settings: Settings, *, model: str = DEFAULT_MODEL) -> WorkloadResult:
    """Run ``settings.chunks`` chunks as ``arm`` says."""
    if arm.mode == "sequential":
        return run_sequential(arm.urls[0], settings.chunks, num_predict=settings.tokens,
                              model=model)
    return run_parallel(arm.urls, settings.chunks, num_predict=settings.tokens, model=model,
                        tasks_per_node=arm.tasks, concurrency_per_node=arm.concurrency)


def _quiet(line: str) -> None:
    del line


def measure(arms: Sequence[Arm], settings: Settings, *, say: Callable[[str], None] = _quiet,
            names: dict[str, str] | None = None) -> dict[Arm, list[float]]:
    """``settings.repeats`` rounds of every arm; the order rotates each round (and reverses on
    odd rounds), so no arm always runs first or after the same neighbour. ``names`` (url ->
    "n1") labels the progress lines given to ``say``."""
    walls: dict[Arm, list[float]] = {arm: [] for arm in arms}
    count = len(arms)
    total = len(names) if names else 0
    for round_number in range(settings.repeats):
        order = [arms[(i + round_number) % count] for i in range(count)]
        if round_number % 2:
            order.reverse()
        for arm in order:
            walls[arm].append(run_arm(arm, settings).wall_seconds)
        shown = ", ".join(f"{arm.label(names, total) if names else arm.mode}="
                          f"{walls[arm][-1]:.2f}s" for arm in arms)
        say(f"round {round_number + 1}/{settings.repeats}: {shown}")
    return walls


@dataclass(frozen=True, slots=True)
class Comparison:
    """Sequential and parallel runs of one job, alternated and repeated.

    Attributes:
        ratios: per repeat, parallel wall / sequential wall (below 1.0: parallel is faster).
        ratio: their median.
        single_chunk_seconds: median client-side time of one chunk alone on the sequential node.
    """

    sequential: tuple[WorkloadResult, ...]
    parallel: tuple[WorkloadResult, ...]
    ratios: tuple[float, ...]
    ratio: float
    single_chunk_seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "ratio_parallel_over_sequential": self.ratio,
            "ratios": list(self.ratios),
            "single_chunk_seconds": self.single_chunk_seconds,
            "sequential_wall_seconds": [r.wall_seconds for r in self.sequential],
            "parallel_wall_seconds": [r.wall_seconds for r in self.parallel],
            "parallel_chunks_per_node": [r.chunks_per_node() for r in self.parallel],
        }


def compare(
    sequential_node: str, parallel_nodes: Sequence[str], chunks: int, *, repeats: int = 5,
    num_predict: int = DEFAULT_NUM_PREDICT, model: str = DEFAULT_MODEL, timeout: float = 300.0,
) -> Comparison:  # fmt: skip
    """Warm up, then ``repeats`` rounds of sequential and parallel (order alternating per round)."""
    if repeats < 1:
        raise ValueError(f"Invalid repeats {repeats!r}: expected at least 1")
    options: dict[str, Any] = {"num_predict": num_predict, "model": model, "timeout": timeout}
    warm_up([sequential_node, *parallel_nodes], model=model)
    single = run_sequential(sequential_node, 1, **options)
    singles = [single.wall_seconds]
    sequential_runs: list[WorkloadResult] = []
    parallel_runs: list[WorkloadResult] = []
    for round_number in range(repeats):
        order: tuple[Mode, ...] = ("sequential", "parallel")
        if round_number % 2:
            order = order[::-1]
        for mode in order:
            if mode == "sequential":
                sequential_runs.append(run_sequential(sequential_node, chunks, **options))
            else:
                parallel_runs.append(run_parallel(parallel_nodes, chunks, **options))
        singles.append(run_sequential(sequential_node, 1, **options).wall_seconds)
    ratios = tuple(
        p.wall_seconds / s.wall_seconds for p, s in zip(parallel_runs, sequential_runs, strict=True)
    )
    return Comparison(
        tuple(sequential_runs), tuple(parallel_runs), ratios, statistics.median(ratios),
        statistics.median(singles),
    )  # fmt: skip


def _print_comparison(label: str, comparison: Comparison, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"label": label, **comparison.summary()}, indent=2))
        return
    seq = statistics.median(r.wall_seconds for r in comparison.sequential)
    par = statistics.median(r.wall_seconds for r in comparison.parallel)
    print(label)
    print(f"  one chunk alone (median):      {comparison.single_chunk_seconds * 1000:8.1f} ms")
    print(f"  sequential wall (median):      {seq * 1000:8.1f} ms")
    print(f"  parallel wall (median):        {par * 1000:8.1f} ms")
    ratios = ", ".join(f"{r:.2f}" for r in comparison.ratios)
    print(f"  parallel / sequential:         {comparison.ratio:8.2f}   (per round: {ratios})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sollol_locality.testing.workload",
        description="Time K chunks sequentially on one node against in parallel across nodes.",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--scenario", help="start this scenario (machines.SCENARIOS)")
    where.add_argument("--nodes", nargs="+", help="existing node URLs (first: sequential node)")
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--num-predict", type=int, default=DEFAULT_NUM_PREDICT)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weights-mb", type=int, default=DEFAULT_WEIGHTS_MB)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    options: dict[str, Any] = {
        "repeats": args.repeats, "num_predict": args.num_predict, "model": args.model,
    }  # fmt: skip
    if args.nodes:
        comparison = compare(args.nodes[0], args.nodes, args.chunks, **options)
        _print_comparison(f"nodes {' '.join(args.nodes)}", comparison, args.json)
        return 0
    from .machines import Cluster, ScenarioUnavailable, start_scenario

    try:
        with Cluster() as cluster:
            try:
                running = start_scenario(
                    args.scenario, cluster, weights_mb=args.weights_mb, model=args.model
                )
            except ScenarioUnavailable as exc:
                print(exc.reason, file=sys.stderr)
                return 3
            urls = list(running.urls)
            comparison = compare(urls[0], urls, args.chunks, **options)
            label = (
                f"scenario {args.scenario}: {running.scenario.description}; weights "
                f"{args.weights_mb} MB, {args.chunks} chunks x {args.num_predict} tokens, "
                f"{args.repeats} rounds; nodes {urls}"
            )
            _print_comparison(label, comparison, args.json)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
