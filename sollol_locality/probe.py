"""Live probing: measure Ollama nodes and teach the cost model this cluster (layer 8).

:func:`calibrate` (the ``sollol-locality calibrate [--model M] NODE...`` command) runs, for real:

1. a check that every node answers (``GET /api/version``) and has the model; if one does not,
   nothing is measured and nothing is written;
2. one untimed generate per node, so each node has the model loaded;
3. ``--rounds`` rounds, each measuring, one after another:

   * each node alone: the time per task of its execution unit;
   * the nodes of each execution unit together (two instances on one CPU or GPU): the unit's
     contention; the units of each host together (several GPUs): the same-host overhead;
   * each node's batching curve: ``k = 2, 4, ...`` requests sent to it at once, up to its
     slots (up to 8 when nobody declared them), stopping once ``k`` at once no longer raises
     its throughput by more than ``min_concurrency_gain`` (decided in the first round; later
     rounds repeat the same ``k``). A node declared to serve one request at a time is not
     measured. The curve is stored per instance and gives its slot count when the topology
     file does not;

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

It then writes the calibration file (atomically) that later decisions load automatically, with the
model measured and the instances (``host:port``) it measured. By default the run merges into the
file: what it measured replaces what the file knew about the same units and hosts (a cluster is
calibrated as it is now); what it knew about others is kept. A file that measured another model
is not merged into (the figures would mix two models): the run stops before measuring, and
``replace=True`` (``--replace``) starts the file afresh. A file at the target that is not a
calibration file is refused, never overwritten. Progress goes to ``progress``, one line per
measurement; where the file was written is the caller's to say (:class:`CalibrationReport`).

Requests go straight to the nodes (no HTTP proxy from the environment is used), at the address
the node's identity resolved: the connection is made to that IP (the configured nameservers,
search domains, hosts file and topology file decided it, never a second lookup through the
system), with the node's own host name and port in the ``Host`` header (an IPv6 literal in
brackets). Over HTTPS the TLS handshake names the host (SNI) and its certificate is verified
against that name, not the IP. A name that did not resolve is reported as not answering; only a
name of this machine (``localhost``, its own host name) is connected to by name. What is learned
is kept by :mod:`sollol_locality.calibration`, the store this module writes through the cost model.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import ssl
import statistics
import threading
import time
import urllib.error
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import CalibrationError, InvalidNodeAddress
from .colocation import (
    UNIT_STRENGTH,
    ColocationFacts,
    ColocationReport,
    detect_colocation,
    facts_from_report,
)
from .config import LocalityConfig
from .cost_model import ParallelismCostModel
from .cost_model import served_in_turn as _served_in_turn
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
    observations_before: int = 0  # what the file held before this run (0: no file)
    merged: bool = False  # whether the run merged into an existing file (else a fresh one)
    batching: dict[str, dict[int, float]] = field(default_factory=dict)  # url -> k -> ratio
    colocation: dict[str, Any] | None = None  # see colocation_summary(); None: not searched


# What a node that does not answer properly raises: refused or reset connections and timeouts
# (OSError, including urllib's URLError/HTTPError), a broken HTTP exchange (HTTPException) and
# an answer that is not JSON (ValueError).
_NODE_ERRORS = (OSError, http.client.HTTPException, ValueError)


class _NamedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an IP address, with SNI and certificate checks for the node's host name."""

    def __init__(self, ip: str, port: int, server_name: str, *, timeout: float,
                 context: ssl.SSLContext) -> None:
        super().__init__(ip, port, timeout=timeout, context=context)
        self._server_name = server_name
        self._tls = context

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self._server_name)


def _connect_to(identity: HostIdentity) -> str:
    """The IP address to open a connection to: the one the identity resolved (IPv4 first),
    or the node's own host name for a name of this machine."""
    address = identity.address
    if address.ip is not None:
        return address.ip.compressed
    if identity.addresses:
        return min(identity.addresses, key=lambda ip: (":" in ip, ip))
    if identity.is_local:
        return address.host
    raise OSError(f"its host name {address.host!r} did not resolve")


def _request(identity: HostIdentity, path: str, *, payload: dict[str, Any] | None = None,
             timeout: float) -> Any:
    """One JSON request to the node, at the address its identity resolved (see the module
    docstring)."""
    address = identity.address
    ip = _connect_to(identity)
    host = f"[{address.host}]" if ":" in address.host else address.host
    connection: http.client.HTTPConnection
    if address.scheme == "https":
        connection = _NamedHTTPSConnection(ip, address.port, address.host, timeout=timeout,
                                           context=ssl.create_default_context())
    else:
        connection = http.client.HTTPConnection(ip, address.port, timeout=timeout)
    data = None if payload is None else json.dumps(payload).encode()
    try:
        connection.request("POST" if data else "GET", path, body=data,
                           headers={"Host": f"{host}:{address.port}",
                                    "Content-Type": "application/json"})
        response = connection.getresponse()
        body = response.read()
        if response.status >= 400:
            raise urllib.error.HTTPError(f"{address.url}{path}", response.status,
                                         response.reason, response.headers, None)
        return json.loads(body.decode() or "null")
    finally:
        connection.close()


def _generate(identity: HostIdentity, model: str, num_predict: int, timeout: float) -> float:
    start = time.perf_counter()
    _request(identity, "/api/generate",
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
    strength), ``interference`` (pairs of separate units that slow each other a little, and
    how much), ``independent`` (pairs), ``untested_pairs``, ``untested_nodes``,
    ``budget_exhausted`` and ``runs`` (purpose, members, per-node slowdowns, slowed)."""
    def pairs(items: Any) -> list[list[str]]:
        return sorted(sorted(p) for p in items)

    return {
        "groups": [{"members": sorted(g.members), "strength": round(g.strength, 4)}
                   for g in report.groups],
        "interference": [{"members": sorted(p), "strength": round(v, 4)}
                         for p, v in report.interference],
        "independent": pairs(report.independent),
        "untested_pairs": pairs(report.untested_pairs),
        "untested_nodes": list(report.untested_nodes),
        "budget_exhausted": report.budget_exhausted,
        "runs": [{"purpose": r.purpose, "members": list(r.members),
                  "slowdowns": {k: round(v, 4) for k, v in r.slowdowns},
                  "slowed": sorted(r.slowed)} for r in report.runs],
    }


def _per_unit(machines: Sequence[HostIdentity], facts: ColocationFacts
              ) -> list[HostIdentity]:
    """One node per measured unit among ``machines`` (the first of each, in order): the units
    decisions use (:meth:`ColocationFacts.units`), so that what separate units lose together
    is measured as the dispatch overhead."""
    units = facts.units()
    seen: set[frozenset[str]] = set()
    kept = []
    for identity in machines:
        label = identity.instance.label
        unit = next((u for u in units if label in u), frozenset((label,)))
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
    replace: bool = False,
    budget: float | None = None,
) -> CalibrationReport:
    """Measure ``nodes`` and write the calibration file; see the module docstring.

    ``replace`` starts the file afresh instead of merging into what it holds. ``budget``: the
    seconds the co-location search may take (``None``: no bound); pairs and nodes it left
    untested are in ``report.colocation``.

    Raises:
        CalibrationError: a node cannot be parsed, does not answer or lacks the model, or the
            file measured another model and ``replace`` is false (nothing is written), or a
            measurement fails.
    """
    for name, value in (("rounds", rounds), ("num_predict", num_predict)):
        if value < 1:
            raise CalibrationError(f"{name} must be at least 1, got {value!r}")
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
    if cost_model is not None:
        model_, before, merged = cost_model, cost_model.observations, True
    else:
        model_, before, merged = _model_for(target, config, replace)
    # 1. every node answers and has the model, before anything is measured or written
    chosen_model = model
    for identity in identities:
        url = identity.address.url
        try:
            _request(identity, "/api/version", timeout=min(timeout, 5.0))
            tags = _request(identity, "/api/tags", timeout=min(timeout, 5.0))
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
    recorded = model_.calibration.model
    if merged and recorded is not None and recorded != chosen_model:
        raise CalibrationError(
            f"calibration file {target} measured model {recorded!r}, this run measures "
            f"{chosen_model!r}: pass --replace to start it afresh, or another --calibration "
            "file; nothing was measured")
    report = CalibrationReport(path=None, model=chosen_model, observations_before=before,
                               merged=merged)
    groups = _groups(identities)
    # What this run measures replaces what the model knew about the same units and hosts.
    model_._forget(units={i.unit.label for i in identities}
                   | {i.own_unit.label for i in identities},
                   hosts={g.key for g in groups if g.kind == "host"},
                   dispatch=any(g.kind == "machines" for g in groups),
                   instances={i.instance.label for i in identities})
    batching = {i.address.url: _batching_ks(i) for i in identities}
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
                if batching[identity.address.url]:
                    model_.observe_batching(identity, 1, wall)
                    batching[identity.address.url] = _measure_batching(
                        identity, batching[identity.address.url], wall, model_,
                        first_round=round_ == 0, model=chosen_model, num_predict=num_predict,
                        timeout=timeout, say=say, where=f"round {round_ + 1}/{rounds}")
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
    learned = model_.calibration
    learned.model = chosen_model
    learned.instances = sorted({*learned.instances, *(i.instance.label for i in identities)})
    report.batching = {i.address.url: model_.measured_batching(i) for i in identities
                       if batching[i.address.url]}
    report.path = model_.save(target)
    report.observations = model_.observations
    return report


_UNDECLARED_SLOTS_LIMIT = 8
"""How many requests at once calibration tries on an instance whose slots nobody declared."""


def _batching_ks(identity: HostIdentity) -> list[int]:
    """The ``k`` to measure ``identity``'s batching curve at: 2, 4, ... up to its slots (the
    slots themselves included), or up to :data:`_UNDECLARED_SLOTS_LIMIT` when no source gave
    them; none for an instance said to serve one request at a time."""
    declared = identity.facts.get("slots", "prior") != "prior"
    limit = identity.slots if declared else max(identity.slots, _UNDECLARED_SLOTS_LIMIT)
    ks: list[int] = []
    k = 2
    while k < limit:
        ks.append(k)
        k *= 2
    if limit >= 2:
        ks.append(limit)
    return ks


def _measure_batching(identity: HostIdentity, ks: list[int], solo: float,
                      cost_model: ParallelismCostModel, *, first_round: bool, model: str,
                      num_predict: int, timeout: float, say: Callable[[str], None],
                      where: str) -> list[int]:
    """Send ``k`` requests at once to ``identity`` for each ``k`` of ``ks`` and record each
    wall time; returns the ``k`` later rounds measure. In the first round the list stops at
    the first ``k`` whose throughput (``k * solo / wall``) is not above the best so far by
    more than ``min_concurrency_gain`` (that ``k`` is kept: it shows where the gain ends)."""
    margin = cost_model.priors.min_concurrency_gain
    best = 1.0
    measured: list[int] = []
    url = identity.address.url
    for k in ks:
        wall, times = _together_timed([identity] * k, model, num_predict, timeout)
        queued = _served_in_turn(times)
        if queued:
            # The requests were answered one after another, as a server with fewer than k
            # slots answers them: sending k at once gains nothing, whatever the overlap of
            # their network and prompt phases made the wall look like.
            wall = max(wall, k * solo)
        cost_model.observe_batching(identity, k, wall)
        measured.append(k)
        rate = k * solo / wall if wall > 0 else 0.0
        say(f"{url} {k} at once, {where}: {wall:.3f}s ({rate:.2f}x the throughput of one"
            + (", served in turn: fewer slots than that)" if queued else ")"))
        if first_round or queued:
            if rate <= best * (1.0 + margin) or queued:
                break
            best = rate
    return measured
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
    facts = facts_from_report(found, time.time())
    model.update_colocation(facts)
    report.colocation = colocation_summary(found)
    for group in found.groups:
        say(f"co-located: {', '.join(sorted(group.members))} share one unit "
            f"(each {group.strength:.2f}x slower with the other)")
    for pair, strength in found.interference:
        say(f"interference: {' and '.join(sorted(pair))} slow each other {strength:.2f}x but "
            f"stay separate units (less than the {UNIT_STRENGTH:.2f}x of a shared unit)")
    if found.untested_pairs or found.untested_nodes:
        say(f"co-location budget spent: {len(found.untested_pairs)} pair(s) left untested")
    separate = _per_unit(machines, facts)
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


def _model_for(target: Path, config: LocalityConfig,
               replace: bool) -> tuple[ParallelismCostModel, int, bool]:
    """A model holding what ``target`` already knows (nothing when it does not exist yet, or
    when ``replace``), the observations the file held, and whether the run merges into it.

    Raises:
        CalibrationError: ``target`` exists but is not a readable calibration file (it is not
            overwritten).
    """
    bare = dataclasses.replace(config, calibration_file=None, calibration_fallback=None)
    model = ParallelismCostModel(bare)
    if not target.exists():
        return model, 0, False
    try:
        model.load(target)
    except CalibrationError as exc:
        raise CalibrationError(f"{exc}; not overwriting it (remove it or pass another "
                               "--output)") from exc
    if replace:
        return ParallelismCostModel(bare), model.observations, False
    return model, model.observations, True
