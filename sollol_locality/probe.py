"""Live probing: measure Ollama nodes and teach the cost model this cluster (layer 8).

:func:`calibrate` (the ``sollol-locality calibrate [--model M] NODE...`` command) runs, for real:

1. a check that every node answers (``GET /api/version``) and has the model; if one does not,
   nothing is measured and nothing is written;
2. one untimed generate per node, so each node has the model loaded;
3. ``--rounds`` rounds, each measuring, one after another:

   * each node alone: the time per task of its execution unit;
   * the nodes of each execution unit together (two instances on one CPU or GPU): the unit's
     contention; the units of each host together (several GPUs): the same-host overhead;

   interleaved this way, load that comes and goes during the run moves the solo and the
   concurrent measurements alike instead of biasing the ratio between them;

4. the co-location search (:func:`~sollol_locality.colocation.detect_colocation`) over one node
   per machine: concurrent runs in which every request is timed by its own thread, each
   repeated ``--rounds`` times right after the same nodes ran alone (the median per-node
   slowdown kept), to find the "machines" that are one (two VMs of one host, two pods of one
   node); ``--budget SECONDS`` bounds it, and what it left untested is reported. Its facts (which
   instances share a unit, how strongly, which are independent) go to the calibration file;
5. ``--rounds`` runs of one node per *measured unit* together: the dispatch overhead between
   machines that really are separate (co-located "machines" would pass their slowdown off as
   dispatch overhead).

then writes the calibration file (atomically) that later decisions load automatically. What the
run measured replaces what the file knew about the same units and hosts (a cluster is calibrated
as it is now); what it knew about others is kept. A file at the target that is not a calibration
file is refused, never overwritten. Progress goes to stderr, one line per measurement.

Requests go straight to the nodes (no HTTP proxy from the environment is used). What is learned
is kept by :mod:`sollol_locality.calibration`, the store this module writes through the cost model.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import CalibrationError, InvalidNodeAddress
from .colocation import ColocationReport, detect_colocation, facts_from_report
from .config import LocalityConfig
from .cost_model import ParallelismCostModel
from .topology import ExecutionUnit, HostIdentity, Instance, NodeTopology

__all__ = ["CalibrationReport", "calibrate"]

_PROMPT = "Write one long paragraph about the history of distributed computing."


@dataclass
class CalibrationReport:
    """What a calibration run measured and where it was written."""

    path: Path | None
    model: str
    solo_seconds: dict[str, float] = field(default_factory=dict)  # node url -> median s/task
    together: list[dict[str, Any]] = field(default_factory=list)
    observations: int = 0
    colocation: dict[str, Any] | None = None  # see colocation_summary(); None: not searched


# Nodes are reached directly: a proxy from the environment (http_proxy) would send a request
# for a LAN or loopback node elsewhere, or time the proxy instead of the node.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# What a node that does not answer properly raises: refused or reset connections and timeouts
# (OSError, including urllib's URLError/HTTPError), a broken HTTP exchange (HTTPException) and
# an answer that is not JSON (ValueError).
_NODE_ERRORS = (OSError, http.client.HTTPException, ValueError)


def _request(url: str, *, payload: dict[str, Any] | None = None, timeout: float) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json"})
    with _OPENER.open(request, timeout=timeout) as response:
        return json.loads(response.read().decode() or "null")


def _generate(identity: HostIdentity, model: str, num_predict: int, timeout: float) -> float:
    start = time.perf_counter()
    _request(f"{identity.address.url}/api/generate",
             payload={"model": model, "prompt": _PROMPT, "stream": False,
                      "options": {"num_predict": num_predict}},
             timeout=timeout)
    return time.perf_counter() - start


def _together(identities: Sequence[HostIdentity], model: str, num_predict: int,
              timeout: float) -> float:
    return _together_timed(identities, model, num_predict, timeout)[0]


def _together_timed(identities: Sequence[HostIdentity], model: str, num_predict: int,
                    timeout: float) -> tuple[float, list[float]]:
    """Run one generate on each node at once: the wall time, and each node's own time (timed
    by the thread that sent its request), in the order given."""
    errors: list[BaseException] = []
    times = [0.0] * len(identities)
    barrier = threading.Barrier(len(identities) + 1)

    def work(position: int, identity: HostIdentity) -> None:
        barrier.wait()
        try:
            times[position] = _generate(identity, model, num_predict, timeout)
        except _NODE_ERRORS as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=pair, daemon=True)
               for pair in enumerate(identities)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise CalibrationError(f"a node failed during a concurrent run: {errors[0]}")
    return wall, times


def colocation_measure(identities: Sequence[HostIdentity], model: str, *, num_predict: int,
                       timeout: float, rounds: int, solo: Mapping[str, float],
                       progress: Callable[[str], None] | None = None
                       ) -> Callable[[Sequence[str]], dict[str, float]]:
    """The ``measure`` :func:`~sollol_locality.colocation.detect_colocation` drives, over live
    nodes keyed by instance label.

    Each of ``rounds`` rounds runs every member of the group alone, one after another, then
    all of them at once (each request timed by its own thread). A node's slowdown in a round is
    its time together over its time alone *in that round*, so load that comes and goes on the
    machines moves both alike instead of passing for sharing; the time returned is the median
    slowdown over the rounds times the node's ``solo`` median (what the detector divides by).
    """
    by_label = {i.instance.label: i for i in identities}
    say = progress or (lambda line: None)

    def measure(group: Sequence[str]) -> dict[str, float]:
        members = [by_label[label] for label in group]
        ratios: list[list[float]] = [[] for _ in members]
        for _ in range(rounds):
            alone = [_generate(m, model, num_predict, timeout) for m in members]
            _, times = _together_timed(members, model, num_predict, timeout)
            for position, seconds in enumerate(times):
                ratios[position].append(seconds / alone[position])
        result = {label: statistics.median(values) * solo[label]
                  for label, values in zip(group, ratios, strict=True)}
        say(f"co-location run of {len(group)} node(s): "
            + ", ".join(f"{label} {result[label] / solo[label]:.2f}x" for label in group))
        return result

    return measure


def search_colocation(identities: Sequence[HostIdentity], solo: dict[str, float],
                      measure: Callable[[Sequence[str]], dict[str, float]], *,
                      budget: float | None = None,
                      clock: Callable[[], float] = time.monotonic) -> ColocationReport[str]:
    """Run the co-location search over ``identities`` (one per machine), keyed by instance
    label; ``solo`` is each label's median solo time and ``budget`` the seconds it may take."""
    labels = [i.instance.label for i in identities]
    return detect_colocation(labels, {k: solo[k] for k in labels}, measure, max_seconds=budget,
                             clock=clock)


def colocation_summary(report: ColocationReport[str]) -> dict[str, Any]:
    """What the search found, for the report and ``calibrate --json``: ``groups`` (members and
    strength), ``independent`` (pairs), ``untested_pairs``, ``untested_nodes``,
    ``budget_exhausted`` and ``runs`` (purpose, members, per-node slowdowns, slowed)."""
    def pairs(items: Any) -> list[list[str]]:
        return sorted(sorted(p) for p in items)

    return {
        "groups": [{"members": sorted(g.members), "strength": round(g.strength, 4)}
                   for g in report.groups],
        "independent": pairs(report.independent),
        "untested_pairs": pairs(report.untested_pairs),
        "untested_nodes": list(report.untested_nodes),
        "budget_exhausted": report.budget_exhausted,
        "runs": [{"purpose": r.purpose, "members": list(r.members),
                  "slowdowns": {k: round(v, 4) for k, v in r.slowdowns},
                  "slowed": sorted(r.slowed)} for r in report.runs],
    }


def _per_unit(machines: Sequence[HostIdentity], report: ColocationReport[str]
              ) -> list[HostIdentity]:
    """One node per measured unit among ``machines`` (the first of each, in order)."""
    seen: set[frozenset[str]] = set()
    kept = []
    for identity in machines:
        unit = report.unit_of(identity.instance.label)
        if unit not in seen:
            seen.add(unit)
            kept.append(identity)
    return kept


def calibrate(
    nodes: Sequence[Any],
    *,
    model: str | None = None,
    num_predict: int = 32,
    rounds: int = 3,
    timeout: float = 120.0,
    output: str | Path | None = None,
    config: LocalityConfig | None = None,
    topology: NodeTopology | None = None,
    cost_model: ParallelismCostModel | None = None,
    progress: Callable[[str], None] | None = None,
    budget: float | None = None,
) -> CalibrationReport:
    """Measure ``nodes`` and write the calibration file; see the module docstring.

    ``budget``: the seconds the co-location search may take (``None``: no bound); pairs and
    nodes it left untested are in ``report.colocation``.

    Raises:
        CalibrationError: a node cannot be parsed, does not answer or lacks the model (nothing
            is written), or a measurement fails.
    """
    if rounds < 1 or num_predict < 1:
        raise CalibrationError("rounds and num_predict must be at least 1")
    if budget is not None and not budget >= 0:
        raise CalibrationError(f"budget {budget!r} must be a number of seconds >= 0")
    config = config if config is not None else LocalityConfig.from_env()
    topology = topology if topology is not None else NodeTopology(config)
    target = Path(output) if output is not None else config.calibration_file
    if target is None:
        raise CalibrationError("no calibration file configured; pass --output")
    say = progress or (lambda line: None)
    identities: list[HostIdentity] = []
    seen: set[Instance] = set()
    for result in topology.describe_many(list(nodes)):
        if isinstance(result, InvalidNodeAddress):
            raise CalibrationError(str(result))
        instance = result.instance
        if instance not in seen:  # aliases of one instance are measured once
            seen.add(instance)
            identities.append(result)
    if not identities:
        raise CalibrationError("no nodes to calibrate")
    model_ = cost_model if cost_model is not None else _model_for(target, config)
    # 1. every node answers and has the model, before anything is measured or written
    chosen_model = model
    for identity in identities:
        url = identity.address.url
        try:
            _request(f"{url}/api/version", timeout=min(timeout, 5.0))
            tags = _request(f"{url}/api/tags", timeout=min(timeout, 5.0))
        except _NODE_ERRORS as exc:
            reason = getattr(exc, "reason", exc)
            raise CalibrationError(f"node {url} does not answer: {reason}") from exc
        names = [m.get("name") for m in (tags or {}).get("models", []) if isinstance(m, dict)]
        if chosen_model is None:
            if not names:
                raise CalibrationError(f"node {url} has no model; pass --model")
            chosen_model = names[0]
        elif names and chosen_model not in names and f"{chosen_model}:latest" not in names:
            raise CalibrationError(f"node {url} does not have model {chosen_model!r} "
                                   f"(it has {', '.join(map(str, names))})")
    assert chosen_model is not None
    report = CalibrationReport(path=None, model=chosen_model)
    groups = _groups(identities)
    # What this run measures replaces what the model knew about the same units and hosts.
    model_._forget(units={i.unit.label for i in identities}
                   | {i.own_unit.label for i in identities},
                   hosts={g.key for g in groups if g.kind == "host"},
                   dispatch=any(g.kind == "machines" for g in groups))
    solo: dict[str, list[float]] = {i.address.url: [] for i in identities}
    try:
        # 2. load the model everywhere
        for identity in identities:
            say(f"warming {identity.address.url} ({chosen_model})")
            _generate(identity, chosen_model, num_predict, timeout)
        # 3. rounds of: each node alone, then each group together
        for round_ in range(rounds):
            for identity in identities:
                wall = _generate(identity, chosen_model, num_predict, timeout)
                solo[identity.address.url].append(wall)
                model_.observe("sequential", [identity.node], 1, wall, identities=[identity])
                say(f"{identity.address.url} alone, round {round_ + 1}/{rounds}: {wall:.3f}s")
            for group in groups:
                if group.kind == "machines":
                    continue  # after the co-location search, one node per measured unit
                members = group.members
                wall, each = _together_timed(members, chosen_model, num_predict, timeout)
                model_.observe("parallel", [m.node for m in members], len(members), wall,
                               identities=members)
                say(f"{group.label} together, round {round_ + 1}/{rounds}: {wall:.3f}s")
                report.together.append({"group": group.label, "nodes": len(members),
                                        "wall": wall, "times": {
                                            m.address.url: t
                                            for m, t in zip(members, each, strict=True)}})
        report.solo_seconds = {url: sorted(times)[len(times) // 2]
                               for url, times in solo.items()}
        machines = next((g.members for g in groups if g.kind == "machines"), [])
        if machines:
            _machines_step(report, machines, model_, chosen_model, num_predict=num_predict,
                           timeout=timeout, rounds=rounds, budget=budget, say=say)
    except _NODE_ERRORS as exc:
        raise CalibrationError(f"calibration failed, nothing written: {exc}") from exc
    report.path = model_.save(target)
    report.observations = model_.observations
    say(f"wrote {report.path}")
    return report


def _machines_step(report: CalibrationReport, machines: Sequence[HostIdentity],
                   model: ParallelismCostModel, chosen_model: str, *, num_predict: int,
                   timeout: float, rounds: int, budget: float | None,
                   say: Callable[[str], None]) -> None:
    """Steps 4 and 5: the co-location search over one node per machine, its facts into the
    model, then the dispatch overhead over one node per measured unit."""
    solo = {i.instance.label: report.solo_seconds[i.address.url] for i in machines}
    measure = colocation_measure(machines, chosen_model, num_predict=num_predict,
                                 timeout=timeout, rounds=rounds, solo=solo, progress=say)
    found = search_colocation(machines, solo, measure, budget=budget)
    model.update_colocation(facts_from_report(found, time.time()))
    report.colocation = colocation_summary(found)
    for group in found.groups:
        say(f"co-located: {', '.join(sorted(group.members))} share one unit "
            f"(each {group.strength:.2f}x slower with the other)")
    if found.untested_pairs or found.untested_nodes:
        say(f"co-location budget spent: {len(found.untested_pairs)} pair(s) left untested")
    separate = _per_unit(machines, found)
    if len(separate) < 2:
        return
    label = f"one node on each of {len(separate)} measured units"
    for round_ in range(rounds):
        wall, times = _together_timed(separate, chosen_model, num_predict, timeout)
        model.observe("parallel", [m.node for m in separate], len(separate), wall,
                      identities=separate)
        say(f"{label} together, round {round_ + 1}/{rounds}: {wall:.3f}s")
        report.together.append({"group": label, "nodes": len(separate), "wall": wall,
                                "times": {m.address.url: t
                                          for m, t in zip(separate, times, strict=True)}})


@dataclass(frozen=True)
class _Group:
    """Nodes measured together: ``kind`` ``"unit"`` (the nodes of one execution unit, ``key``
    its label), ``"host"`` (one node per unit of a host with several, ``key`` the host id) or
    ``"machines"`` (one node per machine)."""

    kind: str
    key: str
    label: str
    members: list[HostIdentity]


def _groups(identities: Sequence[HostIdentity]) -> list[_Group]:
    groups: list[_Group] = []
    by_unit: dict[ExecutionUnit, list[HostIdentity]] = {}
    by_host: dict[str, dict[ExecutionUnit, HostIdentity]] = {}
    for identity in identities:
        by_unit.setdefault(identity.unit, []).append(identity)
        by_host.setdefault(identity.physical_host_id, {}).setdefault(identity.unit, identity)
    for unit, members in by_unit.items():
        if len(members) > 1:
            label = unit.label
            groups.append(_Group("unit", label, f"{len(members)} nodes on {label}", members))
    for host, units in by_host.items():
        if len(units) > 1:
            groups.append(_Group("host", host, f"{len(units)} units of {host}",
                                 list(units.values())))
    if len(by_host) > 1:
        groups.append(_Group("machines", "", f"one node on each of {len(by_host)} machines",
                             [next(iter(u.values())) for u in by_host.values()]))
    return groups


def _model_for(target: Path, config: LocalityConfig) -> ParallelismCostModel:
    """A model holding what ``target`` already knows (nothing when it does not exist yet).

    Raises:
        CalibrationError: ``target`` exists but is not a readable calibration file (it is not
            overwritten).
    """
    model = ParallelismCostModel(dataclasses.replace(config, calibration_file=None))
    if target.exists():
        try:
            model.load(target)
        except CalibrationError as exc:
            raise CalibrationError(f"{exc}; not overwriting it (remove it or pass another "
                                   "--output)") from exc
    return model
