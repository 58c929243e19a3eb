"""Concurrency inside instances: slots, batching curves, and the allocation of tasks to them.

Layer 4, beside ``cost_model`` and below it (``cost_model`` and ``planner`` import it; it
imports nothing from the package, only the standard library). Pure arithmetic on small frozen
inputs, no I/O; bad input is a ``ValueError`` naming the value with ``!r``. The cost model maps
its profiles onto :class:`SlotInstance` and :class:`Contention`; the planner calls
:func:`allocate` and reads the :class:`Allocation`; learning fits figures with
:func:`predict`.

**Slots and the batching curve.** An instance serves up to ``slots`` requests at once (Ollama's
``OLLAMA_NUM_PARALLEL``). Requests that run together are batched: each decode step serves them all,
so ``k`` tasks at once take ``curve.ratio(k)`` times as long as one task alone (``ratio(1) ==
1``). Send more than the concurrency ``c`` an instance is given and the extra requests wait
(FIFO): ``n`` tasks at concurrency ``c`` run as ``n // c`` full rounds of ``c`` tasks, then one
round of the ``n % c`` left, taking ``seconds * ((n // c) * ratio(c) + ratio(n % c))`` (with
``ratio(0) == 0``). With equal tasks this is what continuous batching does: a batch of ``c``
finishes together and the next ``c`` waiting requests take its slots.

**Contention between instances.** Batching happens inside one instance. Instances that share an
execution unit still share it as today's model says: while ``k >= 2`` instances of one unit are
busy, each runs ``k * max(0.05, 1 + c)`` times slower (``c`` from :meth:`Contention.unit`); busy
units of one host slow each other by :meth:`Contention.host` per other busy unit, and two
units whose interference was measured (``Contention.between``, on one host or not) by that
figure instead, added to each task's time rather than multiplied by the unit's time-sharing
(:func:`_factors_between` gives the measurements); a plan over two or more hosts loses
``Contention.dispatch`` of its makespan.
How many tasks an instance is batching does not change what it costs the other instances of
its unit.

**The search.** Sequential is every task one after another on the fastest instance. Against it
:func:`allocate` tries, for the units ranked by the throughput of their best instance (the fastest
at its best concurrency), every prefix of that ranking (the first unit alone, the first two, ...),
each unit contributing its best ``Contention.streams`` instances (one unless calibration measured
that more gain, or measured interference with another unit, which makes a second stream pay while
that unit is busy); where a prefix has several streams on a unit, it is also tried with one stream
per unit, which it must beat by ``Contention.stream_margin``. A prefix of one instance is tried when
it batches. For a candidate, tasks are balanced so that each goes where it finishes first, given
each instance's best concurrency for the tasks it holds and the contention of the instances working;
the run is then simulated as the instances finish (an instance left alone speeds back up), and the
balance is redone on the instances that got work (at most six times). Each step costs the same for
three tasks as for a billion: counts come in closed form from the instances' throughputs, and only a
bounded number of tasks near the balance point (at most twice the candidate's slots plus one per
instance) are placed one by one. Each instance runs its tasks at the concurrency that finishes them
soonest (the larger on a tie); an instance whose curve gains nothing at any ``k`` is planned as one
slot.

With one slot everywhere this is, step for step, what ``ParallelismCostModel.parallel_makespan``
and the planner's search over units compute today, without the per-task loops. Where two finish
times tie exactly, the earlier instance takes the task, as today's loop means to; that loop adds
times up one task at a time, and its rounding can break such a tie the other way.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final

__all__ = [
    "CPU_BATCH_COST",
    "GPU_BATCH_COST",
    "Allocation",
    "Assignment",
    "BatchingCurve",
    "Contention",
    "SlotInstance",
    "allocate",
    "allocate_across",
    "describe_allocation",
    "dispatch_all",
    "predict",
    "prior_curve",
]

CPU_BATCH_COST: Final = 0.35
"""Prior cost of each extra concurrent sequence on a CPU instance, as a fraction of one task's
time: 4 tasks at once take 2.05x one task (about twice the throughput). CPU decode is
memory-bandwidth bound, so batching pays, but the matrix work grows with every sequence and a
CPU has far less compute headroom than a GPU. Public figures span a wide range: llama.cpp issue
4064 reports 4, 8 and 16 tokens/s at batch 1, 2 and 4 on an x86 CPU (sequences nearly free)
and no gain at all on a phone. An estimate between the two, on the cautious side of the x86
figure; calibration (``k = 1, 2, 4`` measured) replaces it."""

GPU_BATCH_COST: Final = 0.15
"""Prior cost of each extra concurrent sequence on a GPU instance: 4 tasks at once take 1.45x one
task (2.8x the throughput). GPU decode reads every weight once per step whatever the batch, so
an extra sequence costs little until the batch fills the compute units. From
``llama-batched-bench`` in llama.cpp pull request 16894 (a 7B Q8_0 model, GPU offload): 32
generated tokens take 0.405 s, 0.469 s and 0.570 s at batch 1, 2 and 4 (ratios 1.16 and 1.41;
1.20 and 1.53 with a 4096-token prompt). Prompt processing itself scales almost linearly with
the batch, so prompt-heavy tasks batch worse; calibration replaces the figure."""

_MIN_FACTOR: Final = 0.05  # the most a unit can gain from concurrent instances (as today)
_ROUNDS: Final = 6  # balance, simulate, re-balance on the instances that got work: at most this
_TIE: Final = 1e-12  # relative: two finish times this close are equal


def _check_number(value: object, what: str, *, low: float, strict: bool) -> float:
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or value < low or (strict and value == low)):
        bound = f"more than {low:g}" if strict else f"at least {low:g}"
        raise ValueError(f"{what} must be a finite number {bound}, got {value!r}")
    return float(value)


def _check_count(value: object, what: str, *, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{what} must be an integer of at least {low}, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class BatchingCurve:
    """The time of ``k`` concurrent tasks on one instance divided by the time of one.

    Held as points ``(k, ratio)``, the first always ``(1, 1.0)``, ``k`` increasing and ratios
    non-decreasing, plus ``tail``: the ratio added by each task beyond the last point. Between
    points the ratio is linear in ``k``; beyond the last point it grows by ``tail`` per task
    (the marginal cost of the last measured segment, never negative, so the curve never drops
    below a point it has passed).

    Build one with :meth:`measured` (what calibration saw), :meth:`prior` (a cost per extra
    sequence) or :meth:`none` (no batching: ``k`` tasks take ``k`` times one).

    Attributes:
        points: ``((1, 1.0), (k2, r2), ...)``.
        tail: ratio per task beyond the last point.
    """

    points: tuple[tuple[int, float], ...] = ((1, 1.0),)
    tail: float = 1.0

    def __post_init__(self) -> None:
        points = self.points
        if not points or points[0] != (1, 1.0):
            raise ValueError(f"a batching curve starts at (1, 1.0), got {points!r}")
        for (k0, r0), (k1, r1) in zip(points, points[1:], strict=False):
            if not isinstance(k1, int) or isinstance(k1, bool) or k1 <= k0:
                raise ValueError(f"batching curve points need increasing integer k, "
                                 f"got {points!r}")
            if (not isinstance(r1, (int, float)) or isinstance(r1, bool)
                    or not math.isfinite(r1) or r1 < r0):
                raise ValueError(f"batching curve ratios must be finite and non-decreasing, "
                                 f"got {points!r}")
        _check_number(self.tail, "batching curve tail", low=0.0, strict=False)

    @classmethod
    def none(cls) -> BatchingCurve:
        """No batching gain: ``k`` tasks at once take ``k`` times one (a queue)."""
        if cls is BatchingCurve:
            return _NO_BATCHING  # frozen: one shared object serves every instance
        return cls()

    @classmethod
    def prior(cls, cost_per_extra: float) -> BatchingCurve:
        """``ratio(k) = 1 + cost_per_extra * (k - 1)``: each extra sequence costs that fraction
        of one task (see :data:`CPU_BATCH_COST` and :data:`GPU_BATCH_COST`)."""
        cost = _check_number(cost_per_extra, "cost_per_extra", low=0.0, strict=False)
        return cls(((1, 1.0),), cost)

    @classmethod
    def measured(cls, points: Mapping[int, float] | Iterable[tuple[int, float]]
                 ) -> BatchingCurve:
        """A curve through measured ``k -> ratio`` points (``ratio`` = time of ``k`` tasks at
        once / time of one).

        A point at ``k = 1`` may be given and must be 1.0. A ratio below an earlier point's
        (measurement noise: ``k`` tasks cannot take less than fewer tasks) is raised to it.
        Beyond the last point the curve extends with the last segment's marginal cost; with no
        point beyond ``k = 1`` it is :meth:`none`.

        Raises:
            ValueError: ``k`` not a positive integer or given twice, a ratio not a positive
                finite number, or a ratio at ``k = 1`` other than 1.0.
        """
        items = list(points.items()) if isinstance(points, Mapping) else list(points)
        table: dict[int, float] = {}
        for item in items:
            k, ratio = item
            _check_count(k, "batching curve k", low=1)
            value = _check_number(ratio, f"batching curve ratio at k={k!r}", low=0.0,
                                  strict=True)
            if k in table:
                raise ValueError(f"batching curve k={k!r} is given twice")
            if k == 1 and value != 1.0:
                raise ValueError(f"batching curve ratio at k=1 is 1.0 by definition, "
                                 f"got {ratio!r}")
            table[k] = value
        result: list[tuple[int, float]] = [(1, 1.0)]
        for k in sorted(table):
            if k > 1:
                result.append((k, max(table[k], result[-1][1])))
        if len(result) == 1:
            return cls.none()
        (k0, r0), (k1, r1) = result[-2], result[-1]
        return cls(tuple(result), (r1 - r0) / (k1 - k0))

    def ratio(self, k: int) -> float:
        """Time of ``k`` tasks at once over the time of one (``ratio(0) == 0``)."""
        if k <= 0:
            return 0.0
        points = self.points
        previous = points[0]
        for point in points[1:]:
            if k <= point[0]:
                (k0, r0), (k1, r1) = previous, point
                return r0 + (r1 - r0) * (k - k0) / (k1 - k0)
            previous = point
        last_k, last_r = previous
        return last_r + self.tail * (k - last_k)


_NO_BATCHING: Final = BatchingCurve()


def prior_curve(is_gpu: bool, *, cpu_cost: float = CPU_BATCH_COST,
                gpu_cost: float = GPU_BATCH_COST) -> BatchingCurve:
    """The prior curve of a GPU or a CPU instance whose slots are known but not yet measured."""
    return BatchingCurve.prior(gpu_cost if is_gpu else cpu_cost)


@dataclass(frozen=True, slots=True)
class SlotInstance:
    """One Ollama server process as the allocation sees it.

    Attributes:
        key: names the instance (unique among the instances of one call), e.g. its URL.
        unit: the execution unit it runs on (instances of one unit contend); unique across
            hosts, e.g. ``"host/cpu"``.
        host: the physical host of the unit.
        seconds: time of one task alone on it (any unit of time, the same for all instances).
        slots: requests it serves at once (1: one at a time, the rest queue).
        curve: its batching curve, read up to ``slots``.
        is_gpu: whether its unit is a GPU (for the sentence and the prior, not the arithmetic).
    """

    key: str
    unit: str
    host: str
    seconds: float
    slots: int = 1
    curve: BatchingCurve = field(default_factory=BatchingCurve)
    is_gpu: bool = False

    def __post_init__(self) -> None:
        for name in ("key", "unit", "host"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"instance {name} must be a non-empty string, got {value!r}")
        _check_number(self.seconds, f"seconds of instance {self.key!r}", low=0.0, strict=True)
        _check_count(self.slots, f"slots of instance {self.key!r}", low=1)
        if not isinstance(self.curve, BatchingCurve):
            raise ValueError(f"curve of instance {self.key!r} must be a BatchingCurve, "
                             f"got {self.curve!r}")


def _frozen_table(table: Mapping[str, object]) -> Mapping[str, object]:
    return MappingProxyType(dict(table))


@dataclass(frozen=True, slots=True)
class Contention:
    """How instances that run at the same time slow each other (today's cost-model figures).

    Attributes:
        cpu: ``c`` for instances sharing a CPU unit when nothing is measured (1.0: two run at
            0.5x).
        gpu: ``c`` for instances sharing a GPU.
        same_host: slowdown of each busy unit per other busy unit of its host.
        dispatch: fraction of a makespan lost dispatching to two or more hosts.
        measured: unit -> ``k`` -> measured ``c`` (the nearest measured ``k`` is used, the
            larger on a tie).
        host_measured: host -> measured same-host overhead.
        streams: unit -> how many of its instances may run at once (1 when absent): more only
            where calibration measured a gain.
        between: ``frozenset((unit_a, unit_b))`` -> measured interference of two separate
            units: while both are busy, each task takes ``value`` solo-task times longer
            (two VMs on separate cores of one host sharing its memory bandwidth); one task on
            each, that is ``1 + value`` times slower. Per other busy unit, a measured pair's
            value replaces the same-host overhead (units of one host) or adds to nothing
            (units of separate hosts, where only the dispatch overhead applies).
        stream_margin: how much faster (a fraction) a candidate with several streams on a
            unit must be predicted than the same units with one stream each before it is
            chosen (the cost model sets its ``min_concurrency_gain`` where interference gave
            the streams: a gain the pairs' figures compose, never measured as such).
    """

    cpu: float = 1.0
    gpu: float = 0.25
    same_host: float = 0.075
    dispatch: float = 0.05
    measured: Mapping[str, Mapping[int, float]] = field(default_factory=dict)
    host_measured: Mapping[str, float] = field(default_factory=dict)
    streams: Mapping[str, int] = field(default_factory=dict)
    between: Mapping[frozenset[str], float] = field(default_factory=dict)
    stream_margin: float = 0.0

    def __post_init__(self) -> None:
        for name in ("cpu", "gpu", "same_host", "dispatch"):
            _check_number(getattr(self, name), f"contention {name}", low=-math.inf,
                          strict=False)
        _check_number(self.stream_margin, "stream_margin", low=0.0, strict=False)
        measured = {str(unit): MappingProxyType(dict(by_k))
                    for unit, by_k in self.measured.items()}
        object.__setattr__(self, "measured", MappingProxyType(measured))
        object.__setattr__(self, "host_measured", _frozen_table(self.host_measured))
        for unit, count in self.streams.items():
            _check_count(count, f"streams of unit {unit!r}", low=1)
        object.__setattr__(self, "streams", _frozen_table(self.streams))
        between: dict[frozenset[str], float] = {}
        for pair, value in self.between.items():
            if not isinstance(pair, frozenset) or len(pair) != 2:
                raise ValueError(f"between needs pairs of two unit names, got {pair!r}")
            between[pair] = _check_number(value, f"interference of {sorted(pair)!r}", low=0.0,
                                          strict=False)
        object.__setattr__(self, "between", MappingProxyType(between))

    def unit(self, unit: str, k: int, is_gpu: bool) -> float:
        """``c`` for ``k`` busy instances of ``unit``."""
        by_k = self.measured.get(unit)
        if by_k:
            nearest = min(by_k, key=lambda known: (abs(known - k), -known))
            return by_k[nearest]
        return self.gpu if is_gpu else self.cpu

    def host(self, host: str) -> float:
        """The same-host overhead of ``host``."""
        value = self.host_measured.get(host)
        return self.same_host if value is None else value


@dataclass(frozen=True, slots=True)
class Assignment:
    """What one instance does in a plan: ``tasks`` tasks, ``concurrency`` of them at once (the
    rest wait in its queue); ``slots`` is what it could take at once."""

    key: str
    tasks: int
    concurrency: int
    slots: int


@dataclass(frozen=True, slots=True)
class Allocation:
    """The best allocation of a batch found, against sequential on the fastest instance.

    Attributes:
        num_tasks: the task count planned for.
        assignments: the instances that get tasks, in the order the instances were given
            (counts sum to ``num_tasks``). When no concurrent plan exists (fewer than two
            tasks, one unit whose instances have one slot) it is the sequential one; when the
            best candidate gave every task to one instance at concurrency 1 it is that one
            (``parallel`` is false either way).
        makespan: predicted makespan of ``assignments``.
        sequential_key: the fastest instance.
        sequential_makespan: ``num_tasks`` one after another on it.
    """

    num_tasks: int
    assignments: tuple[Assignment, ...]
    makespan: float
    sequential_key: str
    sequential_makespan: float

    @property
    def speedup(self) -> float:
        """Sequential makespan over this plan's (below 1.0: the plan is slower)."""
        return self.sequential_makespan / self.makespan if self.makespan > 0 else 1.0

    @property
    def parallel(self) -> bool:
        """Whether tasks overlap: two or more instances, or several tasks at once on one."""
        return len(self.assignments) >= 2 or any(a.concurrency >= 2 for a in self.assignments)

    @property
    def by_instance(self) -> dict[str, tuple[int, int]]:
        """``{instance key: (tasks, concurrency)}`` for the instances that get tasks."""
        return {a.key: (a.tasks, a.concurrency) for a in self.assignments}

    @property
    def tasks_per_instance(self) -> dict[str, int]:
        """``{instance key: tasks}`` (the plan's ``tasks_per_node``)."""
        return {a.key: a.tasks for a in self.assignments}

    @property
    def concurrency_per_instance(self) -> dict[str, int]:
        """``{instance key: tasks sent at once}`` (the plan's ``concurrency_per_node``)."""
        return {a.key: a.concurrency for a in self.assignments}


# -- per-instance arithmetic ------------------------------------------------------------------


class _Inst:
    """An instance prepared for the search: its ratios up to its slots, its best throughput."""

    __slots__ = ("best_c", "best_cost", "host", "index", "inst", "is_gpu", "ratios", "seconds",
                 "settled", "slots", "unit")

    def __init__(self, index: int, inst: SlotInstance) -> None:
        self.index = index
        self.inst = inst
        self.unit, self.host, self.seconds, self.is_gpu = (inst.unit, inst.host, inst.seconds,
                                                           inst.is_gpu)
        self.slots = inst.slots
        ratios = [0.0, 1.0] + [inst.curve.ratio(k) for k in range(2, inst.slots + 1)]
        self.ratios = ratios
        # The least time per task it can reach (at its best concurrency, the larger on a tie),
        # in its own units.
        self.best_c = min(range(1, self.slots + 1), key=lambda c: (ratios[c] / c, -c))
        self.best_cost = ratios[self.best_c] / self.best_c
        if self.best_cost >= 1.0 - _TIE:  # batching gains nothing: planned as one slot
            self.slots, self.best_c, self.best_cost = 1, 1, 1.0
        # From how many tasks on the best concurrency always wins: any other c, at cost
        # a = ratios[c] / c per task, is at least (j - c + 1) * a against at most
        # (j + best_c - 1) * best_cost, so it loses once j * (a - best_cost) exceeds the rest
        # (twice that, for the tie tolerance). Equal costs never settle.
        settled = 0.0
        b, cb = self.best_cost, self.best_c
        for c in range(1, self.slots + 1):
            if c == cb:
                continue
            a = ratios[c] / c
            if a - b <= 1e-9 * b:
                settled = math.inf
                break
            settled = max(settled, 2.0 * ((c - 1) * a + (cb - 1) * b) / (a - b) + 2.0)
        self.settled = settled

    def value(self, n: int) -> float:
        """``work(n)``'s time alone (``n >= 1``), for the balance's inner loop."""
        if self.slots == 1:
            return float(n)
        if n > self.settled:
            q, r = divmod(n, self.best_c)
            return q * self.ratios[self.best_c] + self.ratios[r]
        return self.work(n)[0]

    def work(self, n: int) -> tuple[float, int]:
        """Solo-task times that ``n`` tasks take at the best concurrency, and that concurrency
        (the larger on a tie: sending more at once costs nothing then)."""
        if n <= 0:
            return 0.0, 0
        ratios = self.ratios
        if self.slots == 1:
            return float(n), 1
        if n > self.settled:
            q, r = divmod(n, self.best_c)
            return q * ratios[self.best_c] + ratios[r], self.best_c
        best, best_c = math.inf, 1
        for c in range(1, min(self.slots, n) + 1):
            q, r = divmod(n, c)
            value = q * ratios[c] + ratios[r]
            if value <= best * (1.0 + _TIE):
                best, best_c = value, c  # the value of the concurrency returned
        return best, best_c


_Memo = dict[tuple[object, ...], float]


def _factors(members: Sequence[_Inst], active: set[int], targets: Iterable[int],
             contention: Contention, memo: _Memo) -> dict[int, float]:
    """Time per solo task of each target while the ``active`` members (and itself) are busy:
    its seconds times the unit's contention and the host's overhead. ``memo`` keeps each
    (unit, busy instances, busy units of its host) factor for the rest of one search."""
    streams: dict[str, int] = {}
    host_units: dict[str, set[str]] = {}
    for i in active:
        member = members[i]
        streams[member.unit] = streams.get(member.unit, 0) + 1
        host_units.setdefault(member.host, set()).add(member.unit)
    if contention.between:
        return _factors_between(members, active, targets, contention, memo, streams)
    times: dict[int, float] = {}
    for i in targets:
        member = members[i]
        unit = member.unit
        k = streams.get(unit, 0) + (0 if i in active else 1)
        units = host_units.get(member.host)
        busy = 1 if units is None else len(units) + (unit not in units)
        factor = memo.get((unit, k, busy))
        if factor is None:
            factor = 1.0
            if k > 1:
                factor = k * max(_MIN_FACTOR, 1.0 + contention.unit(unit, k, member.is_gpu))
            if busy > 1:
                factor *= 1.0 + contention.host(member.host) * (busy - 1)
            memo[(unit, k, busy)] = factor
        times[i] = member.seconds * factor
    return times


def _factors_between(members: Sequence[_Inst], active: set[int], targets: Iterable[int],
                     contention: Contention, memo: _Memo, streams: Mapping[str, int]
                     ) -> dict[int, float]:
    """:func:`_factors` where measured interference between units is known.

    Each other busy unit on the target's host whose pair was not measured slows the target as
    in :func:`_factors` (the host's overhead, a factor on the unit's time-sharing). A measured
    pair value ``s - 1`` was measured with one task on each unit: it adds ``s - 1`` solo-task
    times to each task of the target while the other unit is busy, and is not multiplied by the
    target unit's own time-sharing. Measured on two cores of this VM with two instances on each
    (``two-colocated-pairs``), the product of sharing and interference overshot every time
    while the sum stayed close: sharing 2.04x and interference 1.37x, all four at once 2.3x per
    task (product 2.80x, sum 2.41x); in another run 2.10x, 1.28x and 2.49x (2.69x, 2.38x)."""
    host_of = {members[i].unit: members[i].host for i in active}
    times: dict[int, float] = {}
    for i in targets:
        member = members[i]
        unit = member.unit
        k = streams.get(unit, 0) + (0 if i in active else 1)
        others = frozenset(u for u in host_of if u != unit)
        key = (unit, k, others)
        factor = memo.get(key)
        if factor is None:
            factor = 1.0
            if k > 1:
                factor = k * max(_MIN_FACTOR, 1.0 + contention.unit(unit, k, member.is_gpu))
            measured = overhead = 0.0
            for other in others:
                value = contention.between.get(frozenset((unit, other)))
                if value is not None:
                    measured += value
                elif host_of[other] == member.host:
                    overhead += contention.host(member.host)
            factor = factor * (1.0 + overhead) + measured
            memo[key] = factor
        times[i] = member.seconds * factor
    return times


def _balance(num_tasks: int, members: Sequence[_Inst], times: Sequence[float]) -> list[int]:
    """Give each task to the member that would finish it first (ties: the earlier member).

    Member ``i``'s finish time after ``j`` tasks is ``times[i] * work(j)``, non-decreasing in
    ``j``, so this takes the ``num_tasks`` smallest of those finish times. Every member's first
    ``base`` tasks finish before a level ``T`` that the balance point provably lies above, so
    they are given at once; only the few left (at most twice the slots plus one per member)
    go one by one.
    """
    count = len(members)
    per_task = [times[i] * members[i].best_cost for i in range(count)]
    slots = [m.slots for m in members]
    base = [0] * count
    throughput = sum(1.0 / p for p in per_task)
    level = (num_tasks - sum(slots)) / throughput
    if level > 0:
        for i in range(count):
            j = max(0, math.floor(level / per_task[i]) - slots[i])
            while j > 0 and times[i] * members[i].value(j) > level:
                j -= 1  # rounding only: the bound puts j below the level
            base[i] = j
    left = num_tasks - sum(base)
    values = [m.value for m in members]
    heap = [(times[i] * values[i](base[i] + 1), i) for i in range(count)]
    heapq.heapify(heap)
    for _ in range(left):
        i = heap[0][1]
        base[i] += 1
        heapq.heapreplace(heap, (times[i] * values[i](base[i] + 1), i))
    return base


def _simulate(members: Sequence[_Inst], work: Mapping[int, float],
              contention: Contention, memo: _Memo) -> float:
    """Wall time until every member has done its work (in solo-task times), the contention of
    the members still busy applied as they finish."""
    left = {i: w for i, w in work.items() if w > 0}
    done_below = {i: 1e-9 * max(1.0, w) for i, w in left.items()}
    clock = 0.0
    while left:
        times = _factors(members, set(left), left, contention, memo)
        first = min(left, key=lambda i: left[i] * times[i])
        step = left[first] * times[first]
        clock += step
        for i in list(left):
            remaining = 0.0 if i == first else left[i] - step / times[i]
            if remaining <= done_below[i]:
                del left[i]
            else:
                left[i] = remaining
    return clock


def _evaluate(num_tasks: int, members: Sequence[_Inst], contention: Contention,
              memo: _Memo) -> tuple[float, list[int], list[int]]:
    """Makespan, tasks and concurrency per member of running the batch across ``members``."""
    everyone = range(len(members))
    active = set(everyone)
    best: tuple[float, list[int], list[int]] | None = None
    for _ in range(_ROUNDS):
        factors = _factors(members, active, everyone, contention, memo)
        shares = _balance(num_tasks, members, [factors[i] for i in everyone])
        now_active = {i for i in everyone if shares[i] > 0}
        plans = [members[i].work(shares[i]) for i in everyone]
        makespan = _simulate(members, {i: plans[i][0] for i in now_active}, contention,
                             memo)
        if len({members[i].inst.host for i in now_active}) > 1:
            makespan *= 1.0 + contention.dispatch
        if best is None or makespan < best[0] - 1e-12:
            best = (makespan, shares, [c for _, c in plans])
        if now_active == active:
            break
        active = now_active
    assert best is not None
    return best


# -- the search -------------------------------------------------------------------------------


def allocate(num_tasks: int, instances: Sequence[SlotInstance],
             contention: Contention | None = None) -> Allocation:
    """The best allocation of ``num_tasks`` equal tasks to ``instances`` found by the search
    described in the module docstring, against running them one after another on the fastest.

    ``instances`` are given best first (the caller's ranking: it breaks every tie). The result
    is the best plan in which tasks overlap, even when it is slower than sequential (the caller
    compares ``speedup`` with its threshold); when none exists it is the sequential plan.

    Raises:
        ValueError: ``num_tasks`` is not a non-negative integer, no instance is given, or two
            instances share a key.
    """
    prepared, contention, sequential_plan = _prepare(num_tasks, instances, contention)
    sequential = sequential_plan.sequential_makespan
    if num_tasks < 2:
        return sequential_plan
    # Units ranked by their best instance's least time per task; each unit's members likewise.
    by_unit: dict[str, list[_Inst]] = {}
    for member in sorted(prepared, key=lambda m: (m.inst.seconds * m.best_cost, m.index)):
        by_unit.setdefault(member.inst.unit, []).append(member)
    ordered = [members[:contention.streams.get(unit, 1)] for unit, members in by_unit.items()]
    best: tuple[float, list[_Inst], list[int], list[int], float] | None = None
    memo: _Memo = {}
    for m in range(1, min(num_tasks, len(ordered)) + 1):
        everyone = [member for streams in ordered[:m] for member in streams]
        # With several streams on a unit, one per unit is tried too (first: a tie keeps it).
        single = [streams[0] for streams in ordered[:m]]
        floor = 0.0  # what "everyone" must beat: one stream per unit, by the margin
        for chosen in (single, everyone) if len(everyone) > m else (everyone,):
            if len(chosen) < 2 and chosen[0].slots < 2:
                continue
            makespan, shares, concurrency = _evaluate(num_tasks, chosen, contention, memo)
            speedup = sequential / makespan if makespan > 0 else 1.0
            if chosen is single:
                floor = speedup * (1.0 + contention.stream_margin)
            elif speedup <= floor:
                continue
            if best is None or speedup > best[0] + 1e-9:
                best = (speedup, chosen, shares, concurrency, makespan)
    if best is None:
        return sequential_plan
    _, chosen, shares, concurrency, makespan = best
    return _result(num_tasks, chosen, shares, concurrency, makespan, sequential_plan)


def allocate_across(num_tasks: int, instances: Sequence[SlotInstance],
                    contention: Contention | None = None) -> Allocation:
    """Running ``num_tasks`` tasks concurrently across exactly ``instances`` (no search: every
    instance may get tasks, balanced as in :func:`allocate`), against sequential on the
    fastest; what ``ParallelismCostModel.estimate`` predicts for the nodes it is given.

    Raises:
        ValueError: as :func:`allocate`.
    """
    prepared, contention, sequential_plan = _prepare(num_tasks, instances, contention)
    if num_tasks < 1:
        return sequential_plan
    makespan, shares, concurrency = _evaluate(num_tasks, prepared, contention, {})
    return _result(num_tasks, prepared, shares, concurrency, makespan, sequential_plan)


def predict(instances: Sequence[SlotInstance], plan: Mapping[str, tuple[int, int]],
            contention: Contention | None = None) -> float:
    """Makespan of a given allocation: ``plan`` maps instance keys to ``(tasks,
    concurrency)``; each instance runs its tasks in FIFO rounds at that concurrency, with the
    contention of the instances still busy, and a plan over two or more hosts pays the dispatch
    overhead. What learning needs: the figure at which a finished run's prediction meets its
    wall time (``dataclasses.replace`` on ``contention`` or the curve stands in a trial value).

    Raises:
        ValueError: a key that is not an instance, a negative task count, or a concurrency
            outside ``1..slots``.
    """
    contention = contention if contention is not None else Contention()
    members = [_Inst(i, inst) for i, inst in enumerate(instances)]
    index = {m.inst.key: i for i, m in enumerate(members)}
    work: dict[int, float] = {}
    for key, (tasks, concurrency) in plan.items():
        if key not in index:
            raise ValueError(f"plan names {key!r}, which is not one of the instances")
        member = members[index[key]]
        _check_count(tasks, f"tasks on {key!r}", low=0)
        if tasks == 0:
            continue
        if (not isinstance(concurrency, int) or isinstance(concurrency, bool)
                or not 1 <= concurrency <= member.inst.slots):
            raise ValueError(f"concurrency on {key!r} must be an integer from 1 to "
                             f"{member.inst.slots}, got {concurrency!r}")
        ratios = [0.0, 1.0] + [member.inst.curve.ratio(k) for k in range(2, concurrency + 1)]
        q, r = divmod(tasks, concurrency)
        work[index[key]] = q * ratios[concurrency] + ratios[r]
    makespan = _simulate(members, work, contention, {})
    if len({members[i].host for i in work}) > 1:
        makespan *= 1.0 + contention.dispatch
    return makespan


def dispatch_all(num_tasks: int, instances: Sequence[SlotInstance],
                 contention: Contention | None = None) -> float:
    """Makespan of "parallel whenever two nodes are healthy": the first ``num_tasks`` instances
    (in the order given) start one task each, and whenever one finishes a task it takes the
    next one waiting, however slow it is; no instance is sent more than one at a time.

    In closed form: while tasks wait every instance stays busy, so the queue empties at the
    ``num_tasks - started``-th completion of the merged sequences ``j * time``; from there the
    tasks in progress finish with the contention of those still running. What
    ``ParallelismCostModel.dispatch_all_makespan`` computes task by task.

    Raises:
        ValueError: as :func:`allocate`.
    """
    prepared, contention, _ = _prepare(num_tasks, instances, contention)
    if num_tasks < 1:
        return 0.0
    workers = [_Inst(i, replace(m.inst, slots=1)) for i, m in
               enumerate(prepared[:num_tasks])]
    memo: _Memo = {}
    everyone = set(range(len(workers)))
    times = _factors(workers, everyone, everyone, contention, memo)
    waiting = num_tasks - len(workers)
    done = _balance(waiting, workers, [times[i] for i in range(len(workers))])
    emptied = max((done[i] * times[i] for i in everyone), default=0.0)
    # Each instance holds one task, begun at its last completion before the queue emptied.
    left = {i: 1.0 - (emptied - done[i] * times[i]) / times[i] for i in everyone}
    makespan = emptied + _simulate(workers, {i: w for i, w in left.items() if w > 1e-9},
                                   contention, memo)
    if len({m.inst.host for m in workers}) > 1:
        makespan *= 1.0 + contention.dispatch
    return makespan


def _prepare(num_tasks: int, instances: Sequence[SlotInstance], contention: Contention | None
             ) -> tuple[list[_Inst], Contention, Allocation]:
    _check_count(num_tasks, "num_tasks", low=0)
    contention = contention if contention is not None else Contention()
    if not instances:
        raise ValueError("allocate() needs at least one instance")
    seen: set[str] = set()
    for inst in instances:
        if not isinstance(inst, SlotInstance):
            raise ValueError(f"instances must be SlotInstance objects, got {inst!r}")
        if inst.key in seen:
            raise ValueError(f"instance {inst.key!r} is given twice")
        seen.add(inst.key)
    prepared = [_Inst(i, inst) for i, inst in enumerate(instances)]
    fastest = min(prepared, key=lambda m: (m.inst.seconds, m.index))
    sequential = num_tasks * fastest.inst.seconds if num_tasks > 0 else 0.0
    sequential_plan = Allocation(
        num_tasks, (Assignment(fastest.inst.key, num_tasks, min(1, num_tasks),
                               fastest.inst.slots),),
        sequential, fastest.inst.key, sequential)
    return prepared, contention, sequential_plan


def _result(num_tasks: int, chosen: Sequence[_Inst], shares: Sequence[int],
            concurrency: Sequence[int], makespan: float, sequential_plan: Allocation
            ) -> Allocation:
    used = sorted((i for i in range(len(chosen)) if shares[i] > 0), key=lambda i: chosen[i].index)
    assignments = tuple(Assignment(chosen[i].inst.key, shares[i], concurrency[i],
                                   chosen[i].inst.slots) for i in used)
    return Allocation(num_tasks, assignments, makespan, sequential_plan.sequential_key,
                      sequential_plan.sequential_makespan)


# -- the sentence -----------------------------------------------------------------------------


def _tasks(count: int) -> str:
    return f"{count} task" if count == 1 else f"{count} tasks"


def _on(assignment: Assignment, name: str) -> str:
    if assignment.concurrency <= 1:
        return f"{assignment.tasks} on {name}"
    if assignment.concurrency >= assignment.tasks:
        return f"{assignment.tasks} on {name} (all at once)"
    return f"{assignment.tasks} on {name} ({assignment.concurrency} at a time)"


def describe_allocation(allocation: Allocation, names: Mapping[str, str] | None = None) -> str:
    """A fragment of the planner's reason saying what the allocation does, e.g. ``"5 tasks at
    once on http://h:11434, which batches 4: predicted 2.10x"`` or ``"20 tasks across 2
    instances: 16 on http://g:11434 (4 at a time), 4 on http://p:11434; predicted 3.28x"``.

    ``names`` maps instance keys to what the sentence calls them (default: the keys).
    """
    shown = names or {}
    speedup = f"predicted {allocation.speedup:.2f}x"
    parts = allocation.assignments
    if not allocation.parallel:
        key = parts[0].key if parts else allocation.sequential_key
        return (f"{_tasks(allocation.num_tasks)} one after another on "
                f"{shown.get(key, key)}")
    if len(parts) == 1:
        (only,) = parts
        name = shown.get(only.key, only.key)
        queued = ("" if only.concurrency >= only.tasks
                  else f", {only.concurrency} at a time" if only.concurrency < only.slots
                  else "")
        return (f"{_tasks(only.tasks)} at once on {name}, which batches {only.slots}{queued}: "
                f"{speedup}")
    spread = ", ".join(_on(a, shown.get(a.key, a.key)) for a in parts)
    return f"{_tasks(allocation.num_tasks)} across {len(parts)} instances: {spread}; {speedup}"
