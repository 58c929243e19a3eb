"""The execution decision: parallel or sequential, and on which nodes.

:meth:`ExecutionPlanner.plan` compares running the batch one after another on the fastest node with
running it concurrently on one node per execution unit (best units first, adding units only while
they shorten the predicted makespan), and picks parallel only when its predicted speedup exceeds
``LocalityConfig.min_speedup``. Forced modes (``LocalityConfig.mode``) win over the model and say
so. A node that cannot be parsed is left out with a warning that names it; every node given comes
back in the plan, either in ``hosts`` (grouped by machine) or in ``excluded``.

Decisions are cached for one second per (task count, node set, node metrics, calibration) so that a
warm decision costs microseconds; the cache never changes an answer the inputs would change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

from . import _nodefields
from ._errors import InvalidNodeAddress
from .addresses import describe_input
from .config import LocalityConfig
from .cost_model import NodeProfile, ParallelismCostModel
from .topology import ExecutionUnit, HostIdentity, Instance, NodeTopology

__all__ = ["DECISION_CACHE_SECONDS", "ExecutionPlan", "ExecutionPlanner", "PlanDetail"]

logger = logging.getLogger(__name__)

DECISION_CACHE_SECONDS: Final = 1.0
"""How long an identical decision is served from cache."""

_MEMO_MAX: Final = 1024

Cause = Literal["no-nodes", "one-task", "one-unit", "parallel", "fast-node", "below-threshold",
                "forced-parallel", "forced-sequential"]


@dataclass(frozen=True, slots=True)
class ExecutionPlan:
    """How to run a batch, and why.

    Attributes:
        mode: ``"parallel"`` or ``"sequential"``.
        speedup: the chosen plan's predicted speedup over running the tasks one after another on
            the fastest node (1.0 when sequential).
        nodes: where to dispatch, the caller's own node objects, best first: one node per
            execution unit when parallel, one node when sequential (empty when no node is usable).
        unique_hosts: distinct physical machines among the usable candidates.
        reason: one sentence a person understands.
        warnings: things the caller should know (nodes left out, names not resolved, ...).
        forced: whether ``mode`` was forced by configuration rather than chosen by the model.

        detail: the :class:`PlanDetail` behind the decision (``None`` only for a plan built by
            hand).

    The properties below are thin aliases of ``detail`` (``cause``, ``num_tasks``, ``units``,
    ``tasks_per_node``, ``concurrency_per_node``, ``naive_speedup``, ``sequential_seconds``,
    ``predicted_seconds``, ``time_unit``, ``hosts``, ``excluded``, ``shared_host``,
    ``identities``), giving back this call's node objects; :meth:`to_dict` gives all of it as
    JSON-friendly data.
    """

    mode: Literal["parallel", "sequential"]
    speedup: float
    nodes: list[Any]
    unique_hosts: int
    reason: str
    warnings: list[str]
    forced: bool
    detail: PlanDetail | None = field(default=None, repr=False, compare=False)
    _candidates: tuple[Any, ...] = field(default=(), repr=False, compare=False)

    def __repr__(self) -> str:
        # ``nodes`` are the caller's objects; their URLs may carry credentials: shown masked.
        nodes = ", ".join(describe_input(node) for node in self.nodes)
        return (f"ExecutionPlan(mode={self.mode!r}, speedup={self.speedup!r}, nodes=[{nodes}], "
                f"unique_hosts={self.unique_hosts!r}, reason={self.reason!r}, "
                f"warnings={self.warnings!r}, forced={self.forced!r})")

    @property
    def parallel(self) -> bool:
        """Whether the plan runs tasks concurrently."""
        return self.mode == "parallel"

    @property
    def cause(self) -> Cause:
        """A stable key for ``reason``: ``"parallel"``, ``"one-unit"``, ``"fast-node"``,
        ``"below-threshold"``, ``"one-task"``, ``"no-nodes"``, ``"forced-parallel"`` or
        ``"forced-sequential"``."""
        return self.detail.cause if self.detail else "parallel"

    @property
    def num_tasks(self) -> int:
        """The task count planned for."""
        return self.detail.num_tasks if self.detail else 0

    @property
    def units(self) -> int:
        """Distinct execution units among the usable candidates."""
        return self.detail.units if self.detail else 0

    @property
    def tasks_per_node(self) -> list[int]:
        """Predicted tasks for each node of ``nodes``."""
        return list(self.detail.tasks) if self.detail else []

    @property
    def concurrency_per_node(self) -> list[int]:
        """How many tasks to have in flight at once on each node of ``nodes`` (1 per node: each
        node serves one request at a time)."""
        return list(self.detail.concurrency) if self.detail else []

    @property
    def naive_speedup(self) -> float:
        """Predicted speedup of dispatching across every usable candidate at once (what
        "parallel whenever two nodes are healthy" does)."""
        return self.detail.naive_speedup if self.detail else 1.0

    @property
    def sequential_seconds(self) -> float:
        """Predicted makespan running one after another on the fastest node."""
        return self.detail.sequential_seconds if self.detail else 0.0

    @property
    def predicted_seconds(self) -> float:
        """Predicted makespan of this plan."""
        return self.detail.predicted_seconds if self.detail else 0.0

    @property
    def time_unit(self) -> str:
        """``"seconds"``, or ``"tasks"`` (units of one task on a reference node) when no node's
        speed is known."""
        return self.detail.time_unit if self.detail else "tasks"

    @property
    def hosts(self) -> dict[str, list[Any]]:
        """Every usable candidate grouped by physical host id (input order kept)."""
        if self.detail is None:
            return {}
        nodes = self._candidates
        return {h: [nodes[i] for i in idx] for h, idx in self.detail.hosts}

    @property
    def excluded(self) -> list[tuple[Any, str]]:
        """``(node, reason)`` for each candidate that could not be used."""
        if self.detail is None:
            return []
        return [(self._candidates[i], r) for i, r in self.detail.excluded]

    @property
    def shared_host(self) -> str | None:
        """When parallel was refused because the nodes share one machine, that machine."""
        return self.detail.shared_host if self.detail else None

    @property
    def identities(self) -> tuple[HostIdentity, ...]:
        """The :class:`HostIdentity` of each node of ``nodes``."""
        detail = self.detail
        if detail is None:
            return ()
        nodes = self._candidates
        return tuple(i if i.node is nodes[pos] else replace(i, node=nodes[pos])
                     for i, pos in zip(detail.identities, detail.chosen, strict=True))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form: nodes as their normalised URLs (never credentials)."""
        urls = [i.address.url for i in self.identities]
        return {
            "mode": self.mode,
            "speedup": round(self.speedup, 4),
            "nodes": urls,
            "tasks_per_node": self.tasks_per_node,
            "concurrency_per_node": self.concurrency_per_node,
            "unique_hosts": self.unique_hosts,
            "units": self.units,
            "reason": self.reason,
            "warnings": list(self.warnings),
            "forced": self.forced,
            "cause": self.cause,
            "num_tasks": self.num_tasks,
            "naive_speedup": round(self.naive_speedup, 4),
            "sequential_seconds": round(self.sequential_seconds, 6),
            "predicted_seconds": round(self.predicted_seconds, 6),
            "time_unit": self.time_unit,
            "shared_host": self.shared_host,
            "hosts": {h: [_safe_url(n) for n in ns] for h, ns in self.hosts.items()},
            "excluded": [{"node": _safe_url(n), "reason": r} for n, r in self.excluded],
        }


def _safe_url(node: Any) -> str:
    from .addresses import describe_input, parse_node_address

    try:
        return parse_node_address(node).url
    except InvalidNodeAddress:
        return describe_input(node).strip("'")


@dataclass(frozen=True, slots=True)
class PlanDetail:
    """Everything behind an :class:`ExecutionPlan`, with node positions instead of node objects.

    One detail is computed per decision and shared by every plan served from the decision cache,
    so it never holds a list a caller could change; :class:`ExecutionPlan` turns the positions
    back into the node objects of the call that asks.

    Attributes:
        mode, speedup, unique_hosts, reason, warnings, forced: as on the plan.
        chosen: positions, in the candidate list, of the plan's ``nodes`` (best first).
        tasks: predicted tasks for each chosen node.
        concurrency: tasks in flight at once on each chosen node (1 each).
        cause, num_tasks, units, naive_speedup, sequential_seconds, predicted_seconds,
            time_unit, shared_host: as the plan's properties of the same names.
        hosts: ``(host id, candidate positions)`` for each physical host, input order kept.
        excluded: ``(candidate position, reason)`` for each node that could not be used.
        identities: the identity of each chosen node as the decision described it (its
            ``node`` is the object of the call first decided; ``ExecutionPlan.identities``
            gives this call's).
        host_ids, chosen_urls: the decision in brief (which machines, which nodes), for telling
            a changed decision from a repeated one.
    """

    mode: Literal["parallel", "sequential"]
    speedup: float
    chosen: tuple[int, ...]
    tasks: tuple[int, ...]
    unique_hosts: int
    reason: str
    warnings: tuple[str, ...]
    forced: bool
    cause: Cause
    num_tasks: int
    units: int
    naive_speedup: float
    sequential_seconds: float
    predicted_seconds: float
    time_unit: str
    hosts: tuple[tuple[str, tuple[int, ...]], ...]
    excluded: tuple[tuple[int, str], ...]
    shared_host: str | None
    identities: tuple[HostIdentity, ...]
    concurrency: tuple[int, ...] = ()
    # What a decision is, for telling a changed decision from a repeated one (computed once).
    host_ids: frozenset[str] = field(init=False, repr=False, compare=False)
    chosen_urls: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "host_ids", frozenset(host for host, _ in self.hosts))
        object.__setattr__(self, "chosen_urls",
                           tuple(i.address.url for i in self.identities))
        if len(self.concurrency) != len(self.chosen):
            object.__setattr__(self, "concurrency", (1,) * len(self.chosen))

    def build(self, nodes: Sequence[Any]) -> ExecutionPlan:
        """A plan for this call: fresh lists, this call's node objects."""
        return ExecutionPlan(self.mode, self.speedup, [nodes[i] for i in self.chosen],
                             self.unique_hosts, self.reason, list(self.warnings), self.forced,
                             self, tuple(nodes))


class ExecutionPlanner:
    """Chooses parallel or sequential execution and the nodes to dispatch to.

    Args:
        topology: host identity (:class:`NodeTopology`); built from ``config`` when omitted.
        cost_model: the makespan model (:class:`ParallelismCostModel`); built when omitted.
        config: settings; taken from the topology or cost model when they are given, else
            ``LocalityConfig.from_env()``.
        clock: monotonic clock for the decision cache.
    """

    def __init__(self, topology: NodeTopology | None = None,
                 cost_model: ParallelismCostModel | None = None,
                 config: LocalityConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if config is None:
            config = (topology.config if topology is not None
                      else cost_model.config if cost_model is not None
                      else LocalityConfig.from_env())
        self.config = config
        self.topology = topology if topology is not None else NodeTopology(config)
        self.cost_model = cost_model if cost_model is not None else ParallelismCostModel(config)
        self._clock = clock
        self._memo: dict[tuple[Any, ...], tuple[float, int, PlanDetail]] = {}

    def select_mode(self, num_tasks: int, nodes: Iterable[Any]) -> Literal["parallel",
                                                                           "sequential"]:
        """``"parallel"`` or ``"sequential"`` for ``num_tasks`` tasks on ``nodes``."""
        return self.plan(num_tasks, nodes).mode

    def plan(self, num_tasks: int, nodes: Iterable[Any]) -> ExecutionPlan:
        """The full decision for ``num_tasks`` tasks on the candidate ``nodes``.

        Raises:
            ValueError: ``num_tasks`` is not a non-negative integer. Bad nodes never raise: they
                are left out, listed in ``excluded`` and named in ``warnings``.
        """
        if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 0:
            raise ValueError(f"num_tasks must be a non-negative integer, got {num_tasks!r}")
        node_list = nodes if isinstance(nodes, list) else list(nodes)
        key: tuple[Any, ...] | None
        try:
            # process_version: a restarted local instance (new pid, new CPU set) is a new key.
            key = (num_tasks, self.topology.process_version,
                   *map(_nodefields.signature, node_list))
            hash(key)
        except TypeError:
            key = None
        now = self._clock()
        version = self.cost_model.version
        if key is not None:
            cached = self._memo.get(key)
            if cached is not None and cached[0] > now and cached[1] == version:
                return cached[2].build(node_list)
        template = self._decide(num_tasks, node_list)
        if key is not None:
            if len(self._memo) >= _MEMO_MAX:
                self._memo.clear()
            self._memo[key] = (now + DECISION_CACHE_SECONDS, version, template)
        return template.build(node_list)

    def invalidate(self) -> None:
        """Forget cached decisions (the next plan is computed afresh)."""
        self._memo.clear()

    # -- the decision -----------------------------------------------------------------------

    def _decide(self, num_tasks: int, nodes: Sequence[Any]) -> PlanDetail:
        identities = self.topology.describe_many(nodes)
        model = self.cost_model
        warnings: list[str] = []
        excluded: list[tuple[int, str]] = []
        hosts: dict[str, list[int]] = {}
        unresolved: set[str] = set()
        for index, identity in enumerate(identities):
            if isinstance(identity, InvalidNodeAddress):
                excluded.append((index, identity.reason))
                warnings.append(f"node {identity.node} left out: {identity.reason}")
                continue
            hosts.setdefault(identity.physical_host_id, []).append(index)
            if not identity.resolved and identity.physical_host_id not in unresolved:
                unresolved.add(identity.physical_host_id)
                why = f" ({identity.resolution_error})" if identity.resolution_error else ""
                warnings.append(f"host {identity.address.host!r} could not be resolved{why}; "
                                "it is treated as a separate machine")
        profiles, time_unit = model.profiles(identities)
        all_units = {p.unit for p in profiles}
        common = dict(num_tasks=num_tasks, unique_hosts=len(hosts), units=len(all_units),
                      time_unit=time_unit,
                      hosts=tuple((h, tuple(ix)) for h, ix in hosts.items()),
                      excluded=tuple(excluded))
        if not profiles:
            reason = (f"No usable node among the {len(nodes)} given, so nothing can be "
                      "dispatched." if nodes else "No candidate nodes were given.")
            return PlanDetail("sequential", 1.0, (), (), reason=reason,
                             warnings=tuple(warnings), forced=self.config.forced,
                             cause="no-nodes", naive_speedup=1.0, sequential_seconds=0.0,
                             predicted_seconds=0.0, shared_host=None, identities=(),
                             **common)  # type: ignore[arg-type]
        fastest = min(profiles, key=_rank)
        sequential = model.sequential_makespan(num_tasks, profiles)
        # What "parallel whenever two nodes are healthy" does: every node gets tasks.
        naive_time = model.dispatch_all_makespan(num_tasks, profiles)
        naive = sequential / naive_time if naive_time > 0 else 1.0

        def seq(reason: str, cause: Cause, *, shared: str | None = None,
                forced: bool = False) -> PlanDetail:
            return PlanDetail("sequential", 1.0, (fastest.index,), (num_tasks,), reason=reason,
                             warnings=tuple(warnings), forced=forced, cause=cause,
                             naive_speedup=naive, sequential_seconds=sequential,
                             predicted_seconds=sequential, shared_host=shared,
                             identities=(fastest.identity,), **common)  # type: ignore[arg-type]

        def par(chosen: Sequence[NodeProfile], shares: Sequence[int], makespan: float,
                reason: str, cause: Cause, *, forced: bool = False) -> PlanDetail:
            order = sorted(range(len(chosen)), key=lambda i: _rank(chosen[i]))
            used = [i for i in order if shares[i] > 0]
            speedup = sequential / makespan if makespan > 0 else 1.0
            return PlanDetail("parallel", speedup, tuple(chosen[i].index for i in used),
                             tuple(shares[i] for i in used), reason=reason,
                             warnings=tuple(warnings), forced=forced, cause=cause,
                             naive_speedup=naive, sequential_seconds=sequential,
                             predicted_seconds=makespan, shared_host=None,
                             identities=tuple(chosen[i].identity for i in used),
                             **common)  # type: ignore[arg-type]

        fastest_url = fastest.identity.address.url
        if self.config.mode == "sequential":
            return seq(f"Sequential forced by {self.config.forced_by}; "
                       f"{_tasks(num_tasks)} go to {fastest_url} (the model predicts "
                       f"{naive:.2f}x for running them in parallel).", "forced-sequential",
                       forced=True)
        if self.config.mode == "parallel":
            streams = _distinct_instances(sorted(profiles, key=_rank))
            makespan, shares = model.parallel_makespan(num_tasks, streams)
            if num_tasks >= 2 and naive < 1.0:
                warnings.append(f"forced parallel is predicted slower than sequential "
                                f"({naive:.2f}x)")
            working = sum(1 for s in shares if s > 0)
            return par(streams, shares, makespan,
                       f"Parallel forced by {self.config.forced_by}: "
                       f"{_tasks(num_tasks)} across {_count(working, 'node')}, predicted "
                       f"{(sequential / makespan if makespan else 1.0):.2f}x.",
                       "forced-parallel", forced=True)
        if num_tasks < 2:
            return seq("Sequential: there are no tasks to run." if num_tasks == 0 else
                       f"Sequential: a single task cannot run in parallel; it goes to "
                       f"{fastest_url}.", "one-task")

        # One stream per execution unit (more where calibration measured a gain), best first.
        per_unit: dict[ExecutionUnit, list[NodeProfile]] = {}
        for profile in sorted(profiles, key=_rank):
            per_unit.setdefault(profile.unit, []).append(profile)
        ordered: list[list[NodeProfile]] = []
        for unit, members in per_unit.items():
            streams = _distinct_instances(members)
            ordered.append(streams[:max(1, model.gains_from_concurrency(unit))])
        if len(ordered) == 1 and len(ordered[0]) == 1:
            members = per_unit[fastest.unit]
            unit = fastest.unit
            kind = ("its CPU" if not unit.is_gpu else "its GPU" if unit.device is None
                    else f"GPU {unit.device}")
            if len(profiles) == 1:
                return seq(f"Sequential: only one node ({fastest_url}) is available.",
                           "one-unit")
            instances = len(_distinct_instances(members))
            return seq(
                f"Sequential: all {len(profiles)} nodes run on one machine "
                f"({unit.host}) and share {kind}; {_tasks(num_tasks)} in parallel there are "
                f"predicted to run at {naive:.2f}x the speed of running them one after "
                f"another on {fastest_url}"
                + (f", a gain under the {model.priors.min_concurrency_gain:.0%} that "
                   "calibration must measure before it is trusted over noise." if naive > 1.0
                   else ".")
                if instances > 1 else
                f"Sequential: the {len(profiles)} nodes given are aliases of one instance "
                f"({fastest_url}).",
                "one-unit", shared=unit.host)
        best: tuple[float, list[NodeProfile], list[int], float] | None = None
        limit = min(num_tasks, len(ordered))
        for m in range(1, limit + 1):
            chosen = [p for streams in ordered[:m] for p in streams]
            if len(chosen) < 2:
                continue
            makespan, shares = model.parallel_makespan(num_tasks, chosen)
            speedup = sequential / makespan if makespan > 0 else 1.0
            if best is None or speedup > best[0] + 1e-9:
                best = (speedup, chosen, shares, makespan)
        if best is None:  # pragma: no cover - len(ordered) >= 2 guarantees a candidate
            return seq("Sequential: no parallel plan is possible.", "below-threshold")
        speedup, chosen, shares, makespan = best
        used = [p for p, s in zip(chosen, shares, strict=True) if s > 0]
        if speedup > self.config.min_speedup and len(used) >= 2:
            used_hosts = list(dict.fromkeys(p.unit.host for p in used))
            used_units = {p.unit for p in used}
            where = (f"{len(used_hosts)} machines ({_names(used_hosts)})" if len(used_hosts) > 1
                     else f"{_count(len(used_units), 'unit')} of {used_hosts[0]} "
                          f"({_names(u.label for u in used_units)})")
            left = len(profiles) - len(used)
            tail = (f"; {left} other node(s) would add contention or no speed and are left out"
                    if left else "")
            return par(chosen, shares, makespan,
                       f"Parallel: {_tasks(num_tasks)} across {where}, predicted "
                       f"{speedup:.2f}x faster than one after another{tail}.", "parallel")
        if len(used) < 2 or speedup <= 1.0 and _dominates(fastest, profiles):
            others = [p for p in profiles if p.unit != fastest.unit]
            ratio = min(p.task_time for p in others) / fastest.task_time if others else 1.0
            rivals = ("machine" if any(p.unit.host != fastest.unit.host for p in others)
                      else f"unit of {fastest.unit.host}")
            return seq(f"Sequential on {fastest_url}: it is {ratio:.1f}x faster than any other "
                       f"{rivals}, so {_tasks(num_tasks)} one after another beat the best "
                       f"parallel plan ({speedup:.2f}x).", "fast-node")
        return seq(f"Sequential on {fastest_url}: the best parallel plan is predicted at "
                   f"{speedup:.2f}x, not above the required {self.config.min_speedup:.2f}x.",
                   "below-threshold")


def _rank(profile: NodeProfile) -> tuple[float, bool, bool, str, int, int]:
    """Best first: fastest; among equals this machine (no network hop) and its own servers
    before its containers, then by host id and port, so the choice does not depend on the
    order nodes were listed in."""
    identity = profile.identity
    return (profile.task_time, not identity.is_local, identity.source == "container",
            profile.instance.host, profile.instance.port, profile.index)


def _distinct_instances(profiles: Iterable[NodeProfile]) -> list[NodeProfile]:
    seen: set[Instance] = set()
    result = []
    for profile in profiles:
        if profile.instance not in seen:
            seen.add(profile.instance)
            result.append(profile)
    return result


def _dominates(fastest: NodeProfile, profiles: Sequence[NodeProfile]) -> bool:
    others = [p.task_time for p in profiles if p.unit != fastest.unit]
    return bool(others) and min(others) >= 2.0 * fastest.task_time


def _tasks(count: int) -> str:
    return _count(count, "task")


def _count(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _names(items: Iterable[str], limit: int = 3) -> str:
    names = list(items)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
