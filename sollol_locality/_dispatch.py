"""Running a plan: a batch's tasks dispatched across its nodes, with retries and node health.

Layer: between ``cost_model`` and ``planner``. It imports only ``_errors``, ``addresses`` and the
standard library; the planner's ``run()`` is a thin wrapper over :func:`dispatch`.

How a batch runs:

* **As the plan says.** ``nodes[i]`` gets ``tasks_per_node[i]`` tasks, assigned up front and dealt
  in task order like a weighted round robin (shares 3 and 3 go A, B, A, B, A, B; shares 4 and 2
  go A, B, A, A, B, A), so the first tasks of the batch start first on every node. The calling
  thread schedules; a :class:`concurrent.futures.ThreadPoolExecutor` with a worker per concurrent
  slot makes the calls. A task is handed to a worker only when its node has a free slot: never
  more than ``concurrency_per_node[i]`` calls in flight on ``nodes[i]``.
* **No work stealing by default.** A node that finishes its share early stays idle. The shares
  are the cost model's optimum; moving a queued task onto whichever node is free first can put the
  last task on a slow node and lengthen the batch, and the timings recorded would describe a plan
  nobody decided. ``steal=True`` lets a node with a free slot (and nothing queued) take the next
  queued task of the node with the longest queue per slot; the per-node bound still holds.
* **Failure.** A call that raises an :class:`Exception` marks its node failed: the node takes no
  more tasks in this batch, :class:`NodeHealth` keeps it out of later decisions for a back-off
  period, its queued tasks move to the least loaded surviving node, and the task is retried there
  (at most ``max_attempts`` calls per task). Retries and moved tasks go to the plan's own nodes
  while one survives: a candidate the plan left out may share a machine with a plan node. When
  none survives, the usable candidates not in the plan are brought in one at a time, each with
  one slot, in the order given. A task that gets no result (out of attempts, or no node left)
  makes the batch end in one :class:`DispatchError` naming every failed node and its error and
  carrying the results that did come back.
* **Stopping.** When ``cancel.is_set()`` (checked before every call and every ``poll_interval``
  seconds while calls run), when a call raises a ``BaseException`` that is not an
  ``Exception`` (``KeyboardInterrupt``, ``SystemExit``), or on Ctrl-C in the calling thread: no
  new call starts, the calls in flight are awaited (their results are kept), the workers exit and
  the exception propagates (cancellation raises :class:`DispatchError` with ``cancelled=True``).
  ``grace`` bounds the wait: after ``grace`` seconds (or at a second Ctrl-C) the calls still in
  flight are abandoned; their threads end when those calls return.
* **Progress.** ``on_event`` receives a frozen :class:`DispatchEvent` for every call started,
  finished or failed and every retry. It is called from the dispatching thread, one event at a
  time; an ``Exception`` it raises is logged and dispatch goes on.
"""

from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

from ._errors import DispatchError, InvalidNodeAddress
from .addresses import describe_input, parse_node_address

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "CancelToken",
    "DispatchEvent",
    "DispatchPlan",
    "DispatchResult",
    "EventKind",
    "NodeFailure",
    "NodeHealth",
    "TaskAttempt",
    "dispatch",
    "node_key",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS: Final = 3
"""Calls per task, the first included, before the task is given up."""

EventKind = Literal["started", "finished", "failed", "retried"]
_Reason = Literal["attempts", "task", "no-node", "stopped"]  # why a task got no result

T = TypeVar("T")
R = TypeVar("R")


class DispatchPlan(Protocol):
    """What :func:`dispatch` reads from a plan (an ``ExecutionPlan`` has all of it).

    ``nodes``, ``tasks_per_node`` and ``concurrency_per_node`` are aligned. A sequential plan is
    one node with concurrency 1.
    """

    @property
    def mode(self) -> str: ...

    @property
    def nodes(self) -> Sequence[Any]: ...

    @property
    def tasks_per_node(self) -> Sequence[int]: ...

    @property
    def concurrency_per_node(self) -> Sequence[int]: ...


class CancelToken(Protocol):
    """Anything with ``is_set()``, such as a :class:`threading.Event`."""

    def is_set(self) -> bool: ...


def node_key(node: object) -> str:
    """A node's identity in :class:`NodeHealth` by default: its normalised URL.

    Raises:
        InvalidNodeAddress: the node cannot be parsed.
    """
    return parse_node_address(node).url


# ------------------------------------------------------------------------------------ results


@dataclass(frozen=True, slots=True)
class NodeFailure:
    """A node that failed, as :class:`NodeHealth` holds it.

    Attributes:
        node: the caller's node object (last seen failing).
        key: the node's registry key (its URL by default).
        error: the exception its last failed call raised.
        consecutive: failures since its last success.
        failed_at: when it last failed (the registry's clock).
        until: when its back-off ends (the registry's clock).
    """

    node: Any = field(repr=False)
    key: str
    error: BaseException
    consecutive: int
    failed_at: float
    until: float


@dataclass(frozen=True, slots=True)
class TaskAttempt:
    """One call of ``call(node, task)``.

    Attributes:
        task: the task's index in the batch.
        node: the caller's node object it ran on.
        key: the node's registry key.
        attempt: 1 for the task's first call, 2 for its first retry, ...
        start_s, end_s: seconds from the batch's start (the dispatch clock).
        error: what the call raised, ``None`` when it returned.
    """

    task: int
    node: Any = field(repr=False)
    key: str
    attempt: int
    start_s: float
    end_s: float
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class DispatchEvent:
    """One step of a batch, for progress reporting.

    Attributes:
        kind: ``"started"`` (a call was handed to a worker), ``"finished"`` (it returned),
            ``"failed"`` (it raised), ``"retried"`` (the task was queued again, on ``node``).
        task: the task's index in the batch.
        node: the caller's node object the event is about (for ``"retried"``, the next one).
        key: that node's registry key (its URL by default, never any credentials).
        attempt: the call's attempt number (for ``"retried"``, the coming attempt's).
        seconds: when the event happened, seconds from the batch's start.
        duration: the call's length in seconds (``"finished"`` and ``"failed"``), else ``None``.
        error: what the call raised (``"failed"``, and ``"retried"``: the error retried after).
        completed: tasks with a final outcome (a result, or given up) so far.
        total: tasks in the batch.
    """

    kind: EventKind
    task: int
    node: Any = field(repr=False)
    key: str
    attempt: int
    seconds: float
    duration: float | None = None
    error: BaseException | None = None
    completed: int = 0
    total: int = 0


@dataclass(frozen=True, slots=True, repr=False)
class DispatchResult(Generic[R]):
    """What a finished batch gives back.

    Attributes:
        results: one result per task, in task order.
        timings: ``(node, start_s, end_s)`` per task, in task order: the node its result came
            from and when that call ran, seconds from the batch's start. This is the shape
            ``record_execution(plan, wall_seconds, timings=...)`` takes.
        attempts: every call made, failed ones included, in the order they were handed out.
        wall_seconds: the batch's length, first call handed out to last result.
        failed_nodes: the nodes that failed during the batch, in the order they failed.
    """

    results: tuple[R, ...]
    timings: tuple[tuple[Any, float, float], ...]
    attempts: tuple[TaskAttempt, ...]
    wall_seconds: float
    failed_nodes: tuple[NodeFailure, ...] = ()

    def __repr__(self) -> str:
        failed = [failure.key for failure in self.failed_nodes]
        return (f"DispatchResult({len(self.results)} results, {len(self.attempts)} calls, "
                f"wall_seconds={self.wall_seconds!r}, failed_nodes={failed!r})")


# ---------------------------------------------------------------------------------- health


class NodeHealth:
    """Which nodes failed recently, so that decisions leave them out for a while.

    A failure puts a node in back-off for ``backoff * factor ** (consecutive - 1)`` seconds,
    at most ``max_backoff``; a success resets it. Nodes are told apart by ``key(node)``, a stable
    string (by default the normalised URL, :func:`node_key`), so the caller's objects need not be
    hashable or identical between batches. Thread-safe; the clock is injected.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 key: Callable[[Any], str] = node_key, backoff: float = 10.0,
                 max_backoff: float = 300.0, factor: float = 2.0) -> None:
        if not backoff > 0:
            raise ValueError(f"Invalid backoff {backoff!r}: expected a number of seconds above 0")
        if not max_backoff >= backoff:
            raise ValueError(f"Invalid max_backoff {max_backoff!r}: expected at least backoff "
                             f"({backoff!r})")
        if not factor >= 1:
            raise ValueError(f"Invalid factor {factor!r}: expected at least 1")
        self._clock = clock
        self._key = key
        self._backoff = float(backoff)
        self._max_backoff = float(max_backoff)
        self._factor = float(factor)
        self._records: dict[str, NodeFailure] = {}
        self._lock = threading.Lock()

    def key(self, node: object) -> str:
        """The node's registry key."""
        return self._key(node)

    def now(self) -> float:
        """The registry's clock (what ``failed_at`` and ``until`` are measured on)."""
        return self._clock()

    def backoff_for(self, consecutive: int) -> float:
        """The back-off, in seconds, after ``consecutive`` failures in a row."""
        try:
            seconds = self._backoff * self._factor ** max(0, consecutive - 1)
        except OverflowError:
            return self._max_backoff
        return min(seconds, self._max_backoff)

    def record_failure(self, node: object, error: BaseException) -> NodeFailure:
        """Note a failed call on ``node``; returns the node's record (with its back-off end)."""
        key = self._key(node)
        with self._lock:
            now = self._clock()
            previous = self._records.get(key)
            consecutive = 1 if previous is None else previous.consecutive + 1
            record = NodeFailure(node, key, error, consecutive, now,
                                 now + self.backoff_for(consecutive))
            self._records[key] = record
        return record

    def record_success(self, node: object) -> None:
        """Note a call that returned on ``node``: its failures are forgotten."""
        key = self._try_key(node)
        if key is not None:
            with self._lock:
                self._records.pop(key, None)

    def failure(self, node: object) -> NodeFailure | None:
        """The node's record while it is in back-off, else ``None``."""
        key = self._try_key(node)
        if key is None:
            return None
        with self._lock:
            record = self._records.get(key)
            if record is None or self._clock() >= record.until:
                return None
            return record

    def is_failed(self, node: object) -> bool:
        """Whether ``node`` is in back-off now (a node that cannot be parsed never is)."""
        return self.failure(node) is not None

    def failed_nodes(self) -> tuple[NodeFailure, ...]:
        """The nodes in back-off now, in the order they last failed."""
        with self._lock:
            now = self._clock()
            current = [r for r in self._records.values() if now < r.until]
        return tuple(sorted(current, key=lambda record: record.failed_at))

    def failed_keys(self) -> frozenset[str]:
        """The keys of the nodes in back-off now: what a decision cache keys on (cheap when no
        node has failed)."""
        with self._lock:
            if not self._records:
                return frozenset()
            now = self._clock()
            return frozenset(key for key, r in self._records.items() if now < r.until)

    def exclude(self, nodes: Iterable[T]) -> list[T]:
        """``nodes`` without those in back-off, order kept (nodes that cannot be parsed stay:
        whoever reads them reports them)."""
        with self._lock:
            if not self._records:
                return list(nodes)
        return [node for node in nodes if not self.is_failed(node)]

    def forget(self, node: object) -> None:
        """Drop ``node``'s record, as a success would."""
        self.record_success(node)

    def _try_key(self, node: object) -> str | None:
        try:
            return self._key(node)
        except InvalidNodeAddress:
            return None

    def __repr__(self) -> str:
        return f"NodeHealth(failed={[r.key for r in self.failed_nodes()]!r})"


# -------------------------------------------------------------------------------- dispatch


def dispatch(
    plan: DispatchPlan, tasks: Sequence[T], call: Callable[[Any, T], R], *,
    candidates: Iterable[Any] = (), health: NodeHealth | None = None,
    on_event: Callable[[DispatchEvent], object] | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS, cancel: CancelToken | None = None,
    clock: Callable[[], float] = time.monotonic, steal: bool = False,
    grace: float | None = None, poll_interval: float = 0.05,
    node_error: Callable[[Exception], bool] | None = None,
) -> DispatchResult[R]:  # fmt: skip
    """Run ``call(node, task)`` for every task as ``plan`` says; results in task order.

    Args:
        plan: where each task goes and how many to have in flight on each node.
        tasks: the batch; ``sum(plan.tasks_per_node)`` must equal ``len(tasks)``.
        call: makes one call; runs in a worker thread, several at once.
        candidates: every node the caller would accept. Those not in the plan (by key), not in
            back-off and parseable may take retried tasks when no node of the plan survives.
        health: the registry failures are noted in and back-off is read from (a new one when
            ``None``, so nothing is remembered past this batch).
        on_event: progress callback, see :class:`DispatchEvent`.
        max_attempts: calls per task, the first included.
        cancel: stops the batch once ``cancel.is_set()``.
        clock: monotonic clock for timings.
        steal: let a node with a free slot take queued tasks of another plan node.
        grace: seconds to await calls in flight when stopping (``None``: until they return).
        poll_interval: how often ``cancel`` is checked while calls run.
        node_error: tells a node's failure from the task's own: when it returns ``False`` the
            task is given up (not retried) and its node stays usable. By default every
            ``Exception`` is the node's.

    Raises:
        DispatchError: some task got no result (the error carries the others), or the batch was
            cancelled.
        ValueError: a malformed plan or option (the plan's shares do not add up to the tasks, a
            node listed twice, ...); ``InvalidNodeAddress`` for a plan node that cannot be parsed.
        KeyboardInterrupt, SystemExit: raised by ``call`` or in the calling thread, once the
            calls in flight are done.
    """
    batch: _Batch[T, R] = _Batch(
        plan, tasks, call, candidates=candidates, health=health, on_event=on_event,
        max_attempts=max_attempts, cancel=cancel, clock=clock, steal=steal, grace=grace,
        poll_interval=poll_interval, node_error=node_error,
    )  # fmt: skip
    return batch.run()


@dataclass(eq=False, slots=True)
class _NodeRun:
    """One node's part of a batch (scheduler thread only)."""

    node: Any
    key: str
    concurrency: int
    in_plan: bool
    queue: list[int] = field(default_factory=list)  # a heap of task indices: lowest first
    in_flight: int = 0
    failed: BaseException | None = None

    @property
    def load(self) -> float:
        return (len(self.queue) + self.in_flight) / self.concurrency


@dataclass(frozen=True, slots=True)
class _Outcome:
    run: _NodeRun
    task: int
    attempt: int
    start: float
    end: float
    value: Any
    error: BaseException | None


class _Batch(Generic[T, R]):
    """The state of one :func:`dispatch` call. Only the scheduling thread touches it; workers
    hand their outcomes back through a queue."""

    def __init__(
        self, plan: DispatchPlan, tasks: Sequence[T], call: Callable[[Any, T], R], *,
        candidates: Iterable[Any], health: NodeHealth | None,
        on_event: Callable[[DispatchEvent], object] | None, max_attempts: int,
        cancel: CancelToken | None, clock: Callable[[], float], steal: bool,
        grace: float | None, poll_interval: float,
        node_error: Callable[[Exception], bool] | None,
    ) -> None:  # fmt: skip
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"Invalid max_attempts {max_attempts!r}: expected an integer of at "
                             "least 1")
        if grace is not None and not grace >= 0:
            raise ValueError(f"Invalid grace {grace!r}: expected seconds (0 or more) or None")
        if not poll_interval > 0:
            raise ValueError(f"Invalid poll_interval {poll_interval!r}: expected seconds above 0")
        self._tasks = tasks
        self._call = call
        self._health = health if health is not None else NodeHealth(clock=clock)
        self._on_event = on_event
        self._max_attempts = max_attempts
        self._cancel = cancel
        self._clock = clock
        self._steal = steal
        self._grace = grace
        self._poll = poll_interval
        self._node_error = node_error
        count = len(tasks)
        self._runs = self._plan_runs(plan, count)
        self._reserve = self._reserve_of(candidates)
        self._results: list[Any] = [None] * count
        self._have = [False] * count
        self._timings: list[tuple[Any, float, float] | None] = [None] * count
        self._attempt_count = [0] * count
        self._attempts: list[TaskAttempt] = []
        self._given_up: dict[int, tuple[_Reason, BaseException | None]] = {}
        self._node_failures: list[NodeFailure] = []
        self._completed = 0
        self._in_flight = 0
        self._stopping = False
        self._cancelled = False
        self._interrupt: BaseException | None = None
        self._done: queue.SimpleQueue[_Outcome] = queue.SimpleQueue()
        self._executor: ThreadPoolExecutor | None = None
        self._futures: list[Future[None]] = []  # the calls handed out (done ones pruned)
        self._start = 0.0

    # -- set-up

    def _plan_runs(self, plan: DispatchPlan, count: int) -> list[_NodeRun]:
        nodes, shares = list(plan.nodes), list(plan.tasks_per_node)
        slots = list(plan.concurrency_per_node)
        if not len(nodes) == len(shares) == len(slots):
            raise ValueError(f"Invalid plan: {len(nodes)} nodes, {len(shares)} tasks_per_node "
                             f"and {len(slots)} concurrency_per_node entries (expected one each)")
        for name, values, least in (("tasks_per_node", shares, 0),
                                    ("concurrency_per_node", slots, 1)):
            for index, value in enumerate(values):
                if isinstance(value, bool) or not isinstance(value, int) or value < least:
                    raise ValueError(f"Invalid plan: {name}[{index}] is {value!r} (expected an "
                                     f"integer of at least {least})")
        if plan.mode == "sequential" and (len(nodes) > 1 or any(s != 1 for s in slots)):
            raise ValueError(f"Invalid plan: a sequential plan runs one task at a time on one "
                             f"node, got {len(nodes)} nodes with concurrency_per_node {slots!r}")
        if nodes and sum(shares) != count:
            raise ValueError(f"Invalid plan: tasks_per_node {shares!r} adds up to {sum(shares)}, "
                             f"the batch has {count} tasks")
        runs: list[_NodeRun] = []
        seen: dict[str, int] = {}
        for index, (node, slot) in enumerate(zip(nodes, slots, strict=True)):
            key = self._health.key(node)
            if key in seen:
                raise ValueError(f"Invalid plan: nodes[{seen[key]}] and nodes[{index}] are one "
                                 f"node ({key!r})")
            seen[key] = index
            runs.append(_NodeRun(node, key, slot, in_plan=True))
        # Deal the tasks in order, like a weighted round robin: the next task goes to the node
        # that is furthest behind its share, (dealt + 1/2) / share lowest (ties: plan order).
        dealer = [(0.5 / share, index) for index, share in enumerate(shares) if share]
        heapq.heapify(dealer)
        dealt = [0] * len(shares)
        for task in range(count if nodes else 0):
            _, index = heapq.heappop(dealer)
            runs[index].queue.append(task)  # ascending, so already a heap
            dealt[index] += 1
            if dealt[index] < shares[index]:
                heapq.heappush(dealer, ((dealt[index] + 0.5) / shares[index], index))
        return runs

    def _reserve_of(self, candidates: Iterable[Any]) -> deque[tuple[Any, str]]:
        taken = {run.key for run in self._runs}
        reserve: deque[tuple[Any, str]] = deque()
        for node in candidates:
            try:
                key = self._health.key(node)
            except InvalidNodeAddress as exc:
                logger.debug("candidate %s cannot take retries: %s", describe_input(node), exc)
                continue
            if key not in taken:
                taken.add(key)
                reserve.append((node, key))
        return reserve

    # -- the batch

    def run(self) -> DispatchResult[R]:
        self._start = self._clock()
        count = len(self._tasks)
        if count and not self._runs:
            self._give_up_all("no-node")
            raise self._error(f"no node to run {_tasks(count)} on: the plan has none")
        workers = sum(run.concurrency for run in self._runs) + len(self._reserve)
        executor = ThreadPoolExecutor(max_workers=max(1, workers),
                                      thread_name_prefix="sollol-locality-dispatch")
        self._executor = executor
        abandoned = False
        try:
            try:
                self._loop()
            except BaseException:  # Ctrl-C here, or a callback's BaseException: stop cleanly
                self._stopping = True
                abandoned = not self._drain()
                raise
            if self._stopping:
                abandoned = not self._drain()
                if self._interrupt is not None:
                    raise self._interrupt
        finally:
            executor.shutdown(wait=not abandoned, cancel_futures=True)
        return self._finish()

    def _loop(self) -> None:
        self._fill()
        while self._in_flight > 0 and not self._stopping:
            outcome = self._next_outcome()
            if outcome is None:
                return
            self._settle(outcome)
            if not self._stopping:
                self._fill()

    def _next_outcome(self) -> _Outcome | None:
        """The next finished call, or ``None`` once the batch is cancelled."""
        if self._cancel is None:
            return self._done.get()
        while True:
            if self._cancelled_now():
                return None
            try:
                return self._done.get(timeout=self._poll)
            except queue.Empty:
                continue

    def _cancelled_now(self) -> bool:
        if self._cancel is not None and not self._cancelled and self._cancel.is_set():
            self._cancelled = self._stopping = True
            logger.info("dispatch cancelled: no new call starts, %d in flight awaited",
                        self._in_flight, extra={"event": "dispatch_cancelled"})
        return self._cancelled

    def _fill(self) -> None:
        for run in self._runs:
            while run.failed is None and run.queue and run.in_flight < run.concurrency:
                if self._stopping or self._cancelled_now():
                    return
                self._submit(run, heapq.heappop(run.queue))
        if self._steal:
            self._balance()

    def _balance(self) -> None:
        """Free slots with nothing queued take the next queued task of the busiest node."""
        while not self._stopping:
            thief = next((r for r in self._runs if r.failed is None and not r.queue
                          and r.in_flight < r.concurrency), None)
            victims = [r for r in self._runs if r.failed is None and r.queue]
            if thief is None or not victims or self._cancelled_now():
                return
            victim = max(victims, key=lambda r: len(r.queue) / r.concurrency)
            self._submit(thief, heapq.heappop(victim.queue))

    def _submit(self, run: _NodeRun, task: int) -> None:
        assert self._executor is not None
        self._attempt_count[task] += 1
        attempt = self._attempt_count[task]
        future = self._executor.submit(self._work, run, task, attempt)
        self._futures.append(future)
        if len(self._futures) > 64 and len(self._futures) > 4 * self._in_flight:
            self._futures = [f for f in self._futures if not f.done()]
        run.in_flight += 1  # counted once submitted: an interrupt in between under-counts, and
        self._in_flight += 1  # shutdown(wait=True) still joins the call
        self._emit("started", task, run, attempt)

    def _work(self, run: _NodeRun, task: int, attempt: int) -> None:
        """A worker: one call, its outcome handed back to the scheduler (never raised here)."""
        start = self._clock()
        try:
            value = self._call(run.node, self._tasks[task])
        except BaseException as exc:  # the scheduler decides, KeyboardInterrupt included
            self._done.put(_Outcome(run, task, attempt, start, self._clock(), None, exc))
            return
        self._done.put(_Outcome(run, task, attempt, start, self._clock(), value, None))

    def _settle(self, outcome: _Outcome) -> None:
        run, task, attempt, error = outcome.run, outcome.task, outcome.attempt, outcome.error
        run.in_flight -= 1
        self._in_flight -= 1
        start, end = outcome.start - self._start, outcome.end - self._start
        self._attempts.append(TaskAttempt(task, run.node, run.key, attempt, start, end, error))
        if error is None:
            self._results[task] = outcome.value
            self._have[task] = True
            self._timings[task] = (run.node, start, end)
            self._completed += 1
            if run.failed is None:
                self._health.record_success(run.node)
            self._emit("finished", task, run, attempt, duration=end - start)
            return
        if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: stop everything
            if self._interrupt is None:
                self._interrupt = error
            self._stopping = True
            self._give_up(task, "stopped", error)
            self._emit("failed", task, run, attempt, duration=end - start, error=error)
            return
        if self._node_error is not None and not self._node_error(error):
            self._give_up(task, "task", error)  # the task's own fault: its node stays usable
            self._emit("failed", task, run, attempt, duration=end - start, error=error)
            return
        self._fail_node(run, error)
        if self._stopping or attempt >= self._max_attempts:
            self._give_up(task, "stopped" if self._stopping else "attempts", error)
            self._emit("failed", task, run, attempt, duration=end - start, error=error)
            return
        target = self._pick()
        if target is None:
            self._give_up(task, "no-node", error)
        self._emit("failed", task, run, attempt, duration=end - start, error=error)
        if target is not None:
            heapq.heappush(target.queue, task)
            self._emit("retried", task, target, attempt + 1, error=error)

    def _fail_node(self, run: _NodeRun, error: BaseException) -> None:
        if run.failed is not None:
            return  # another call in flight there when it failed: one failure per batch
        run.failed = error
        failure = self._health.record_failure(run.node, error)
        self._node_failures.append(failure)
        moved, run.queue = sorted(run.queue), []
        targets: list[str] = []
        for task in moved if not self._stopping else ():
            target = self._pick()
            if target is None:
                self._give_up(task, "no-node", None)
            else:
                heapq.heappush(target.queue, task)
                targets.append(target.key)
        logger.warning(
            "node %r failed (%s); it takes no more tasks in this batch and sits out %.3gs; "
            "%s", run.key, _describe_error(error), failure.until - failure.failed_at,
            _moved(len(moved), targets),
            extra={"event": "dispatch_node_failed", "node": run.key,
                   "until": failure.until, "moved": len(moved)},
        )

    def _pick(self) -> _NodeRun | None:
        """The surviving node with the least work per slot; a reserve candidate when none."""
        alive = [run for run in self._runs if run.failed is None]
        if alive:
            return min(alive, key=lambda run: run.load)
        while self._reserve:
            node, key = self._reserve.popleft()
            if self._health.is_failed(node):
                continue
            run = _NodeRun(node, key, 1, in_plan=False)
            self._runs.append(run)
            logger.info("no node of the plan is left: candidate %r takes the remaining tasks",
                        key, extra={"event": "dispatch_candidate_added", "node": key})
            return run
        return None

    def _give_up(self, task: int, reason: _Reason, error: BaseException | None) -> None:
        if task not in self._given_up:
            self._given_up[task] = (reason, error)
            self._completed += 1

    def _give_up_all(self, reason: _Reason) -> None:
        for task in range(len(self._tasks)):
            if not self._have[task]:
                self._give_up(task, reason, None)

    def _drain(self) -> bool:
        """Await the calls in flight (at most ``grace`` seconds); ``False`` if some are
        abandoned. Their outcomes are kept; nothing new starts.

        It waits on the futures, not on the count of calls in flight: a Ctrl-C can land between
        taking an outcome off the queue and counting it.
        """
        deadline = None if self._grace is None else time.monotonic() + self._grace
        pending: set[Future[None]] = {f for f in self._futures if not f.done()}
        try:
            while pending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                _, pending = wait(pending, timeout=remaining, return_when=FIRST_COMPLETED)
                self._settle_queued()
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
            pending = {f for f in pending if not f.done()}
        self._settle_queued()
        if pending:
            logger.warning("dispatch stopped with %d call(s) still in flight; they are "
                           "abandoned and their threads end when the calls return",
                           len(pending), extra={"event": "dispatch_abandoned"})
            return False
        return True

    def _settle_queued(self) -> None:
        """Settle every outcome already handed back (a worker queues its outcome before its
        future is done)."""
        while True:
            try:
                outcome = self._done.get_nowait()
            except queue.Empty:
                return
            self._settle(outcome)

    # -- the end

    def _finish(self) -> DispatchResult[R]:
        count = len(self._tasks)
        if not all(self._have):
            self._give_up_all("stopped" if self._stopping else "no-node")
            raise self._error(self._failure_message(count))
        timings = tuple(t for t in self._timings if t is not None)
        return DispatchResult(tuple(self._results), timings, tuple(self._attempts),
                              self._clock() - self._start, tuple(self._node_failures))

    def _failure_message(self, count: int) -> str:
        missing = count - sum(self._have)
        head = f"{missing} of {_tasks(count)} got no result"
        if self._cancelled:
            return f"dispatch cancelled: {head}"
        alive = any(run.failed is None for run in self._runs) or self._reserve
        parts = [head + ("" if alive else ": every node failed")]
        if self._node_failures:
            parts.append("failed nodes: " + ", ".join(
                f"{f.key!r} ({_describe_error(f.error)})" for f in self._node_failures))
        by_reason: dict[_Reason, list[str]] = {}
        for task, (reason, error) in sorted(self._given_up.items(), key=lambda item: item[0]):
            if reason == "task" and error is not None:
                by_reason.setdefault(reason, []).append(
                    f"task {task} ({_describe_error(error)})")
            else:
                by_reason.setdefault(reason, []).append(f"task {task}")
        if "attempts" in by_reason:
            parts.append(f"out of attempts ({self._max_attempts} each): "
                         + ", ".join(by_reason["attempts"]))
        if "task" in by_reason:
            parts.append("failed on their own: " + ", ".join(by_reason["task"]))
        return "; ".join(parts)

    def _error(self, message: str) -> DispatchError:
        failed = tuple(task for task in range(len(self._tasks)) if not self._have[task])
        task_errors = tuple((task, error) for task, (_, error) in sorted(
            self._given_up.items(), key=lambda item: item[0]) if error is not None)
        return DispatchError(
            message, results=tuple(self._results), failed_tasks=failed,
            node_errors=tuple((f.key, f.error) for f in self._node_failures),
            task_errors=task_errors, attempts=tuple(self._attempts), cancelled=self._cancelled,
        )  # fmt: skip

    def _emit(self, kind: EventKind, task: int, run: _NodeRun, attempt: int, *,
              duration: float | None = None, error: BaseException | None = None) -> None:
        if self._on_event is None:
            return
        event = DispatchEvent(kind, task, run.node, run.key, attempt,
                              self._clock() - self._start, duration, error, self._completed,
                              len(self._tasks))
        try:
            self._on_event(event)
        except Exception:  # a progress callback must not break the batch
            logger.warning("the on_event callback raised on %r of task %d; dispatch goes on",
                           kind, task, exc_info=True,
                           extra={"event": "dispatch_callback_failed"})


def _describe_error(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _tasks(count: int) -> str:
    return f"{count} task" if count == 1 else f"{count} tasks"


def _moved(count: int, targets: list[str]) -> str:
    if not count:
        return "nothing was queued there"
    if not targets:
        return f"its {_tasks(count)} queued there have no node left"
    where = ", ".join(repr(key) for key in dict.fromkeys(targets))
    return f"its {_tasks(count)} queued there move to {where}"
