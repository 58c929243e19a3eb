"""Live probing: measure Ollama nodes and teach the cost model this cluster (layer 8).

:func:`calibrate` (the ``sollol-locality calibrate [--model M] NODE...`` command) runs, for real:

1. a check that every node answers (``GET /api/version``) and has the model; if one does not,
   nothing is measured and nothing is written;
2. one untimed generate per node, so each node has the model loaded;
3. ``--rounds`` rounds, each measuring, one after another:

   * each node alone: the time per task of its execution unit;
   * the nodes of each execution unit together (two instances on one CPU or GPU): the unit's
     contention; the units of each host together (several GPUs): the same-host overhead; one
     node per host together: the dispatch overhead between machines;

   interleaved this way, load that comes and goes during the run moves the solo and the
   concurrent measurements alike instead of biasing the ratio between them;

then writes the calibration file (atomically) that later decisions load automatically, with the
model measured and the instances (``host:port``) it measured. By default the run merges into the
file: what it measured replaces what the file knew about the same units and hosts (a cluster is
calibrated as it is now); what it knew about others is kept. A file that measured another model
is not merged into (the figures would mix two models): the run stops before measuring, and
``replace=True`` (``--replace``) starts the file afresh. A file at the target that is not a
calibration file is refused, never overwritten. Progress goes to ``progress``, one line per
measurement; where the file was written is the caller's to say (:class:`CalibrationReport`).

Requests go straight to the nodes (no HTTP proxy from the environment is used). What is learned
is kept by :mod:`sollol_locality.calibration`, the store this module writes through the cost model.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import CalibrationError, InvalidNodeAddress
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
    observations_before: int = 0  # what the file held before this run (0: no file)
    merged: bool = False  # whether the run merged into an existing file (else a fresh one)


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
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(identities) + 1)

    def work(identity: HostIdentity) -> None:
        barrier.wait()
        try:
            _generate(identity, model, num_predict, timeout)
        except _NODE_ERRORS as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in identities]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise CalibrationError(f"a node failed during a concurrent run: {errors[0]}")
    return wall


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
) -> CalibrationReport:
    """Measure ``nodes`` and write the calibration file; see the module docstring.

    ``replace`` starts the file afresh instead of merging into what it holds.

    Raises:
        CalibrationError: a node cannot be parsed, does not answer or lacks the model, or the
            file measured another model and ``replace`` is false (nothing is written), or a
            measurement fails.
    """
    for name, value in (("rounds", rounds), ("num_predict", num_predict)):
        if value < 1:
            raise CalibrationError(f"{name} must be at least 1, got {value!r}")
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
    model_._forget(units={i.unit.label for i in identities},
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
                members = group.members
                wall = _together(members, chosen_model, num_predict, timeout)
                model_.observe("parallel", [m.node for m in members], len(members), wall,
                               identities=members)
                say(f"{group.label} together, round {round_ + 1}/{rounds}: {wall:.3f}s")
                report.together.append({"group": group.label, "nodes": len(members),
                                        "wall": wall})
    except _NODE_ERRORS as exc:
        raise CalibrationError(f"calibration failed, nothing written: {exc}") from exc
    report.solo_seconds = {url: sorted(times)[len(times) // 2] for url, times in solo.items()}
    learned = model_.calibration
    learned.model = chosen_model
    learned.instances = sorted({*learned.instances, *(i.instance.label for i in identities)})
    report.path = model_.save(target)
    report.observations = model_.observations
    return report


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
