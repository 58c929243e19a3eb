"""The ``sollol-locality`` command (layer 9).

``sollol-locality hosts [--json] NODE...``
    group nodes by physical host, each with how its identity was decided;
``sollol-locality plan --tasks N [--json] [--model M] NODE...``
    the execution plan for N tasks: mode, nodes to use, predicted speedup, reason, what
    dispatching to every node at once would cost, and which calibration it used;
``sollol-locality calibrate [--model M] [--replace] NODE...``
    probe live nodes (:mod:`sollol_locality.probe`) and write the calibration file.

``hosts`` and ``plan`` reason about addresses only: no Ollama needs to run, nothing is probed,
and nothing is written or renamed. Each command reads only the settings it uses: ``hosts`` the
topology and DNS settings, ``plan`` also the mode, minimum speedup and calibration file,
``calibrate`` the topology, DNS settings and calibration file.

Exit status:

* 0: an answer was printed (nodes that cannot be parsed are listed as invalid);
* 2: a usage or configuration error (a bad option or environment variable, a topology or
  calibration file that cannot be used, a node that does not answer ``calibrate``);
* 3: none of the nodes given is usable (every one is invalid), so there is no answer.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Final, TextIO

from ._errors import (
    CalibrationError,
    ConfigError,
    InvalidNodeAddress,
    LocalityError,
    TopologyFileError,
)
from .addresses import describe_input, parse_node_address

__all__ = ["EXIT_NO_USABLE_NODE", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

logger = logging.getLogger(__name__)

EXIT_OK: Final = 0
"""An answer was printed."""
EXIT_USAGE: Final = 2
"""A usage or configuration error (argparse uses 2 for its own)."""
EXIT_NO_USABLE_NODE: Final = 3
"""None of the nodes given is usable."""

_EPILOG: Final = """\
exit status:
  0  an answer was printed (nodes that cannot be parsed are listed as invalid)
  2  usage or configuration error (bad option, variable, topology or calibration file)
  3  none of the nodes given is usable
"""

# What each command reads from the environment (LocalityConfig field names).
_NETWORK: Final = ("topology_file", "dns_timeout", "nameservers", "read_processes")
_READS: Final[dict[str, tuple[str, ...]]] = {
    # hosts reads the calibration file (never writes it) to show measured co-location
    "hosts": (*_NETWORK, "calibration_file", "colocation_max_age"),
    "plan": (*_NETWORK, "mode", "min_speedup", "calibration_file", "colocation_max_age",
             "use_unresolved"),
    "calibrate": (*_NETWORK, "calibration_file"),
}

_Handler = Callable[[argparse.Namespace, TextIO], int]


# -- argument types: errors name the flag and what was typed -------------------------------


def _seconds(text: str) -> float:
    """``--dns-timeout``: a positive number of seconds, at most 60."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a positive number of seconds, got {text!r}")
    if value > 60:
        raise argparse.ArgumentTypeError(f"expected at most 60 seconds, got {text!r}")
    return value


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _count(text: str) -> int:
    """An integer (range checks are the command's, so that they name the flag)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """argparse with the flag named at the start of a type error: ``--dns-timeout: expected
    ...`` instead of ``argument --dns-timeout: ...``."""

    def error(self, message: str) -> Any:
        if message.startswith("argument "):
            message = message[len("argument "):]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sollol-locality")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    from .config import default_calibration_file

    default_file = default_calibration_file()
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object")
    common.add_argument("--topology", metavar="FILE",
                        help="topology file (TOML); default $SOLLOL_LOCALITY_TOPOLOGY, else none")
    common.add_argument("--nameserver", metavar="IP[:PORT]", action="append",
                        help="DNS server to ask (repeatable); default $SOLLOL_LOCALITY_NAMESERVERS"
                             ", else the system's")
    common.add_argument("--dns-timeout", type=_seconds, metavar="SECONDS",
                        help="deadline for resolving all names together (default 1.0)")
    common.add_argument("--no-hosts-file", action="store_true",
                        help="do not read /etc/hosts before DNS")
    common.add_argument("-v", "--verbose", action="count", default=0,
                        help="log to stderr: -v every decision, -vv debug")
    kinds: dict[str, Any] = {"formatter_class": argparse.RawDescriptionHelpFormatter,
                             "epilog": _EPILOG}
    parser = _Parser(
        prog="sollol-locality",
        description="Which Ollama nodes share a machine, and whether to run a batch on them in "
                    "parallel or sequentially.", **kinds)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    hosts = sub.add_parser("hosts", parents=[common], help="group nodes by physical host",
                           description="Group nodes by physical host. Reads nothing but the "
                                       "topology file, the hosts file and DNS.", **kinds)
    hosts.add_argument("nodes", nargs="+", metavar="NODE",
                       help="node address: URL, host:port or host")
    hosts.set_defaults(handler=_cmd_hosts)
    plan = sub.add_parser("plan", parents=[common], help="plan a batch of tasks",
                          description="Plan N tasks on the given nodes. Reads the calibration "
                                      "file, never writes or renames it.", **kinds)
    plan.add_argument("--tasks", "-n", type=_count, required=True, metavar="N",
                      help="number of tasks in the batch (0 or more)")
    plan.add_argument("--mode", choices=["auto", "parallel", "sequential"],
                      help="force a mode (default $SOLLOL_LOCALITY_MODE, else auto)")
    plan.add_argument("--min-speedup", type=_positive_number, metavar="X",
                      help="parallel only above this predicted speedup (default "
                           "$SOLLOL_LOCALITY_MIN_SPEEDUP, else 1.0)")
    plan.add_argument("--calibration", metavar="FILE",
                      help="calibration file, which must exist (default "
                           f"$SOLLOL_LOCALITY_CALIBRATION, else {default_file}, used when "
                           "present)")
    plan.add_argument("--model", "-m", metavar="NAME",
                      help="the model the batch runs: a calibration that measured another "
                           "model is not used (default: any calibration applies)")
    plan.add_argument("nodes", nargs="+", metavar="NODE",
                      help="node address: URL, host:port or host")
    plan.set_defaults(handler=_cmd_plan)
    _add_calibrate(sub, common, default_file, kinds)
    return parser


def _add_calibrate(sub: Any, common: argparse.ArgumentParser, default_file: Path,
                   kinds: dict[str, Any]) -> None:
    """Register ``sollol-locality calibrate`` on the command's sub-parsers."""
    parser = sub.add_parser(
        "calibrate", parents=[common], help="measure live nodes and write the calibration file",
        description="Probe live Ollama nodes (alone, then together where they share a machine) "
                    "and write the calibration file later decisions use. What this run measures "
                    "replaces what the file knew about the same units and hosts; the rest of the "
                    "file is kept (--replace starts afresh).", **kinds)
    parser.add_argument("--model", "-m",
                        help="model to run (default: the first model the first node lists)")
    parser.add_argument("--tokens", type=_count, default=32, metavar="N",
                        help="tokens per generate (num_predict; default 32)")
    parser.add_argument("--rounds", type=_count, default=3, metavar="R",
                        help="repetitions of each measurement (default 3)")
    parser.add_argument("--timeout", type=_positive_number, default=120.0, metavar="S",
                        help="seconds one request may take (default 120)")
    parser.add_argument("--calibration", "--output", "-o", dest="output", metavar="FILE",
                        help="where to write (default $SOLLOL_LOCALITY_CALIBRATION, else "
                             f"{default_file})")
    parser.add_argument("--replace", action="store_true",
                        help="start the file afresh instead of merging into it (default: merge)")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="time the search for co-located machines may take (default: no "
                             "bound); what it leaves untested is reported")
    parser.add_argument("nodes", nargs="+", metavar="NODE", help="node address")
    parser.set_defaults(handler=_cmd_calibrate)


# -- settings -------------------------------------------------------------------------------


def _colocation_lines(found: dict[str, Any] | None) -> list[str]:
    """What the co-location search found, for ``calibrate``'s text output."""
    if not found:
        return []
    lines = [f"co-located: {' and '.join(g['members'])} share one unit "
             f"({g['strength']:.2f}x)" for g in found["groups"]]
    if found["untested_pairs"] or found["untested_nodes"]:
        pairs = ", ".join(f"{a}/{b}" for a, b in found["untested_pairs"])
        lines.append(f"left untested (budget spent): {pairs or 'none'}"
                     + (f"; nodes {', '.join(found['untested_nodes'])}"
                        if found["untested_nodes"] else ""))
    return lines


def _config(args: argparse.Namespace) -> Any:
    """The settings of this command: its flags, then the variables it reads (only those)."""
    from .config import LocalityConfig

    reads = _READS[args.command]
    fields: dict[str, Any] = {}
    if args.topology:
        fields["topology_file"] = args.topology
    if args.nameserver:
        fields["nameservers"] = ",".join(args.nameserver)
    if args.dns_timeout is not None:
        fields["dns_timeout"] = args.dns_timeout
    if args.no_hosts_file:
        fields["hosts_file"] = None
    if getattr(args, "mode", None):
        fields["mode"] = args.mode
        fields["mode_source"] = f"--mode {args.mode}"
    if getattr(args, "min_speedup", None) is not None:
        fields["min_speedup"] = args.min_speedup
    if getattr(args, "calibration", None):
        fields["calibration_file"] = args.calibration
    if args.command == "calibrate" and args.output:
        fields["calibration_file"] = args.output
    return LocalityConfig.from_env(only=reads, **fields)


def _topology(args: argparse.Namespace, config: Any) -> Any:
    """The topology of ``config``; a bad topology file says where its name came from."""
    from .config import ENV_TOPOLOGY
    from .topology import NodeTopology

    try:
        return NodeTopology(config)
    except TopologyFileError as exc:
        if not args.topology and config.topology_file is not None:
            raise ConfigError(f"{exc} (the file named by {ENV_TOPOLOGY})", variable=ENV_TOPOLOGY,
                              value=os.fspath(config.topology_file)) from exc
        raise


def _unique(nodes: Sequence[str]) -> tuple[list[str], list[tuple[str, int]]]:
    """The nodes with repeats of one address dropped (first kept), and each repeated address
    with how many times it was given."""
    counts: dict[str, int] = {}
    kept: list[str] = []
    for raw in nodes:
        try:
            key = parse_node_address(raw).url
        except InvalidNodeAddress:
            kept.append(raw)  # invalid ones are listed each time, as given
            continue
        if key not in counts:
            kept.append(raw)
        counts[key] = counts.get(key, 0) + 1
    return kept, [(url, n) for url, n in counts.items() if n > 1]


def _notes(repeats: Sequence[tuple[str, int]]) -> list[str]:
    return [f"{url} is listed {n} times; counted once" for url, n in repeats]


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def _plain(value: float) -> str:
    """A number as people write it: ``3``, ``1000``, ``1.45``, ``0.0123`` (no exponent)."""
    if abs(value - round(value)) < 1e-9 and abs(value) < 1e15:
        return str(int(round(value)))
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}" if abs(value) >= 1e-4 else f"{value:.6f}"


def _shown(node: str) -> str:
    """A node as shown in JSON (credentials already masked), for a line of text: an empty one
    is shown as ``''``."""
    return node if node.strip() else repr(node)


# -- hosts ----------------------------------------------------------------------------------


def describe_identity(identity: Any, colocation: Any = None, *,
                      max_age: float | None = None, now: float | None = None) -> dict[str, Any]:
    """A JSON-friendly description of a :class:`HostIdentity` (no credentials): where it runs,
    its unit and slots, where each fact came from (``facts``), and for a node of this machine
    the process behind it (``process``: pid, CPU set, GPUs, slots, or why it was not read).

    With ``colocation`` (the :class:`~sollol_locality.colocation.ColocationFacts` in force),
    ``"colocation"`` lists the node's measured unit-mates: ``"shares a unit with X (measured
    DATE, 1.93x)"``, ``", stale"`` when older than ``max_age`` seconds at ``now``.
    """
    data = {
        "node": identity.address.url,
        "physical_host_id": identity.physical_host_id,
        "is_local": identity.is_local,
        "addresses": sorted(identity.addresses),
        "device": identity.device,
        "unit": identity.unit.label,
        "locality_group": identity.locality_group,
        "resolved": identity.resolved,
        "source": identity.source,
        "resolution_error": identity.resolution_error,
        "cpus": _cpu_list(identity.cpus),
        "slots": identity.slots,
        "facts": dict(identity.facts),
        "process": _describe_process(identity.process),
    }
    if colocation is not None and identity.unit.measured is not None:
        from .colocation import DEFAULT_MAX_AGE, describe_colocation

        data["colocation"] = list(describe_colocation(
            colocation, identity.instance.label, now=time.time() if now is None else now,
            max_age=DEFAULT_MAX_AGE if max_age is None else max_age))
    return data


def _cpu_list(cpus: Any) -> str | None:
    if not cpus:
        return None
    from .topology import ExecutionUnit

    return ExecutionUnit("", cpus=frozenset(cpus)).label.partition(":")[2]


def _describe_process(found: Any) -> dict[str, Any] | None:
    if found is None:
        return None
    facts = found.facts
    return {
        "status": found.status,
        "reason": found.reason,
        "listener": found.listener,
        "proxy": found.proxy,
        "pid": facts.pid if facts is not None else None,
        "name": facts.name if facts is not None else None,
        "cpus": _cpu_list(facts.cpus) if facts is not None else None,
        "cpu_quota": facts.cpu_quota if facts is not None else None,
        "gpus": list(facts.gpus) if facts is not None and facts.gpus is not None else None,
        "gpu_variable": facts.gpu_variable if facts is not None else None,
        "slots": facts.slots if facts is not None else None,
        "container": facts.container if facts is not None else None,
        "not_read": dict(facts.notes) if facts is not None else {},
    }


def _process_line(member: dict[str, Any]) -> str:
    """``pid 812 (ollama) cpus 0-3 gpus 0 slots 4  [unit: process, slots: process]``, or why
    the process was not read."""
    process = member["process"]
    facts = member["facts"]
    sources = f"[unit: {facts.get('unit')}, slots: {facts.get('slots')}]"
    if process is None:
        return ""
    if process["pid"] is None:
        return f"  process not read: {process['reason']}  {sources}"
    parts = [f"pid {process['pid']} ({process['name'] or 'unnamed'})"]
    parts.append(f"cpus {process['cpus'] or '?'}")
    if process["cpu_quota"] is not None:
        parts.append(f"quota {process['cpu_quota']:g}")
    gpus = process["gpus"]
    if gpus is not None:  # None: no GPU variable set
        parts.append("gpus " + (",".join(gpus) if gpus else "none"))
    parts.append(f"slots {member['slots']}")
    if process["container"] is not None:
        parts.append(f"container {process['container']}")
    return "  " + " ".join(parts) + f"  {sources}"


def _cmd_hosts(args: argparse.Namespace, out: TextIO) -> int:
    from .planner import ExecutionPlanner

    config = _config(args)
    # the planner's topology reads the calibration file's measured co-location (never writes it)
    topology = ExecutionPlanner(_topology(args, config), None, config).topology
    facts = topology.colocation_facts()
    nodes, repeats = _unique(args.nodes)
    identities = topology.describe_many(nodes)
    groups: dict[str, list[dict[str, Any]]] = {}
    invalid: list[dict[str, str]] = []
    for raw, identity in zip(nodes, identities, strict=True):
        if isinstance(identity, InvalidNodeAddress):
            invalid.append({"node": describe_input(raw).strip("'"), "reason": identity.reason})
        else:
            groups.setdefault(identity.physical_host_id, []).append(
                describe_identity(identity, facts, max_age=config.colocation_max_age))
    notes = _notes(repeats)
    for note in notes:
        logger.info("note: %s", note)
    code = EXIT_OK if groups else EXIT_NO_USABLE_NODE
    if args.json:
        json.dump({"hosts": groups, "unique_hosts": len(groups), "invalid": invalid,
                   "notes": notes}, out, indent=2)
        out.write("\n")
    else:
        _print_hosts(groups, invalid, notes, out)
    if code != EXIT_OK:
        _no_usable_node(invalid)
    return code


def _print_hosts(groups: dict[str, list[dict[str, Any]]], invalid: list[dict[str, str]],
                 notes: list[str], out: TextIO) -> None:
    total = sum(len(v) for v in groups.values())
    out.write(f"{_plural(total, 'node')} on {_plural(len(groups), 'physical host')}\n")
    for host, members in groups.items():
        first = members[0]
        where = "this machine" if first["is_local"] else first["locality_group"]
        addresses = ", ".join(first["addresses"]) if not first["is_local"] else ""
        out.write(f"\n{host}  ({where}{'; ' + addresses if addresses else ''})\n")
        width = max(len(m["node"]) for m in members)
        for member in members:
            how = member["source"]
            if not member["resolved"]:
                how = f"unresolved ({member['resolution_error'] or 'no reason given'})"
            device = f"  gpu {member['device']}" if member["device"] is not None else ""
            out.write(f"  {member['node']:<{width}}  {how}{device}"
                      f"{_process_line(member)}\n")
            for line in member.get("colocation", ()):
                out.write(f"  {'':<{width}}  {line}\n")
    if invalid:
        out.write("\ninvalid nodes (left out)\n")
        for item in invalid:
            out.write(f"  {_shown(item['node'])}: {item['reason']}\n")
    for note in notes:
        out.write(f"\nnote: {note}\n")


def _no_usable_node(invalid: Sequence[dict[str, str]]) -> None:
    if not invalid:
        print("sollol-locality: no usable node was given", file=sys.stderr)
        return
    given = ("the node given is not usable" if len(invalid) == 1
             else f"none of the {len(invalid)} nodes given is usable")
    print(f"sollol-locality: {given}:", file=sys.stderr)
    for item in invalid:
        print(f"  {_shown(item['node'])}: {item['reason']}", file=sys.stderr)


# -- plan -----------------------------------------------------------------------------------


def _calibration(args: argparse.Namespace, config: Any) -> tuple[Any, dict[str, Any]]:
    """The cost model for ``plan`` and what it says about the calibration it uses.

    The file is only read. One named with ``--calibration`` must exist and be valid (else a
    :class:`ConfigError` / :class:`CalibrationError`, exit 2); a default one that is missing
    means the priors, and one that is corrupt is warned about and left as it is.
    """
    from .cost_model import ParallelismCostModel

    model = ParallelismCostModel(replace(config, calibration_file=None,
                                         calibration_fallback=None), model=args.model)
    info: dict[str, Any] = {"path": None, "observations": 0, "source": "priors", "model": None,
                            "instances": [], "note": None}
    if args.calibration:
        path = Path(args.calibration).expanduser()
        if not path.parent.is_dir():
            raise ConfigError(f"--calibration {args.calibration}: directory {path.parent} does "
                              "not exist", variable="--calibration", value=args.calibration)
        if not path.is_file():
            raise ConfigError(f"--calibration {args.calibration}: no such file",
                              variable="--calibration", value=args.calibration)
        candidates = [(path, "file")]
    else:
        candidates = [(Path(p), source) for p, source in
                      ((config.calibration_file, "file"), (config.calibration_fallback,
                                                           "fallback")) if p is not None]
    found = next(((p, s) for p, s in candidates if p.is_file()), None)
    if found is None:
        if candidates:
            info["note"] = f"no file at {candidates[0][0]}"
        else:
            info["note"] = "the calibration file is turned off"
        return model, info
    path, source = found
    info["path"] = os.fspath(path)
    try:
        model.load(path)
    except CalibrationError as exc:
        if args.calibration:
            raise
        print(f"sollol-locality: warning: {exc}; the file is left as it is, deciding with the "
              "priors", file=sys.stderr)
        info["note"] = f"{path} cannot be used: {exc}"
        return model, info
    learned = model.calibration
    info.update(observations=learned.observations, model=learned.model,
                instances=list(learned.instances), source=source)
    if not model.applies:
        info["source"] = "priors"
        info["note"] = (f"it measured {learned.model}, not {args.model}: the priors decide for "
                        f"{args.model}")
    return model, info


def _home(text: str) -> str:
    """``text`` with paths under the home directory shown as ``~/...`` (text output only)."""
    home = os.path.expanduser("~").rstrip(os.sep)
    return text.replace(home + os.sep, "~" + os.sep) if home else text


def _describe_calibration(info: dict[str, Any]) -> str:
    if info["path"] is None or info["source"] == "priors":
        return f"priors ({_home(info['note'])})" if info["note"] else "priors"
    parts = [_plural(info["observations"], "observation")]
    if info["model"]:
        parts.append(f"model {info['model']}")
    if info["instances"]:
        parts.append(_plural(len(info["instances"]), "instance"))
    if info["source"] == "fallback":
        parts.append("the first release's location")
    return f"{_home(info['path'])} ({', '.join(parts)})"


def _cmd_plan(args: argparse.Namespace, out: TextIO) -> int:
    from .planner import ExecutionPlanner

    if args.tasks < 0:
        raise ConfigError(f"--tasks must be 0 or more, got {args.tasks}", variable="--tasks",
                          value=args.tasks)
    config = _config(args)
    topology = _topology(args, config)
    cost_model, calibration = _calibration(args, config)
    nodes, repeats = _unique(args.nodes)
    planner = ExecutionPlanner(topology, cost_model, config)
    plan = planner.plan(args.tasks, nodes)
    data = plan.to_dict()
    notes = _notes(repeats)
    nothing = args.tasks == 0 and plan.cause != "no-nodes"
    if nothing:  # no task goes anywhere
        data.update(nodes=[], tasks_per_node=[], concurrency_per_node=[])
    data["calibration"] = {k: calibration[k] for k in ("path", "observations", "source",
                                                       "model", "instances", "note")}
    data["notes"] = notes
    _log_decision(plan, calibration)
    code = EXIT_NO_USABLE_NODE if plan.cause == "no-nodes" else EXIT_OK
    if args.json:
        json.dump(data, out, indent=2)
        out.write("\n")
    else:
        _print_plan(plan, data, config, calibration, notes, nothing, out)
    if code != EXIT_OK:
        _no_usable_node(data["excluded"])
    return code


def _log_decision(plan: Any, calibration: dict[str, Any]) -> None:
    """One log line per decision (``-v``), a refused parallel plan included."""
    logger.info("calibration: %s", _describe_calibration(calibration))
    if plan.mode == "sequential" and plan.cause in ("one-unit", "fast-node", "below-threshold"):
        logger.info("parallel refused for %s: %s", _plural(plan.num_tasks, "task"), plan.reason)
    else:
        logger.info("%s for %s: %s", plan.mode, _plural(plan.num_tasks, "task"), plan.reason)


def _print_plan(plan: Any, data: dict[str, Any], config: Any, calibration: dict[str, Any],
                notes: list[str], nothing: bool, out: TextIO) -> None:
    forced = f" (forced by {config.forced_by})" if plan.forced else ""
    out.write(f"mode:        {plan.mode}{forced}\n")
    if nothing:
        out.write("tasks:       0 (nothing to run)\n")
    elif plan.cause != "no-nodes":
        unit = plan.time_unit == "seconds"
        predicted, sequential = plan.predicted_seconds, plan.sequential_seconds
        if unit:
            against = f"{_plain(predicted)} s against {_plain(sequential)} s"
        else:
            against = (f"{_plain(predicted)} task-time{'' if predicted == 1 else 's'} "
                       f"against {_plain(sequential)}")
        out.write(f"speedup:     {plan.speedup:.2f}x predicted ({against} one after "
                  "another)\n")
        out.write(f"naive:       {plan.naive_speedup:.2f}x if every node got tasks at once\n")
    nodes = data["nodes"]
    out.write(f"dispatch to: {', '.join(nodes) if nodes else '(nothing)'}\n")
    if plan.mode == "parallel" and not nothing:
        out.write(f"tasks each:  {', '.join(map(str, plan.tasks_per_node))}\n")
        if any(c > 1 for c in plan.concurrency_per_node):
            out.write(f"at once:     {', '.join(map(str, plan.concurrency_per_node))} "
                      f"(slots {', '.join(map(str, plan.slots_per_node))})\n")
    out.write(f"machines:    {_plural(plan.unique_hosts, 'physical host')}, "
              f"{_plural(plan.units, 'execution unit')}\n")
    out.write(f"calibration: {_describe_calibration(calibration)}\n")
    out.write(f"reason:      {plan.reason}\n")
    for warning in plan.warnings:
        out.write(f"warning:     {warning}\n")
    for note in notes:
        out.write(f"note:        {note}\n")


# -- calibrate ------------------------------------------------------------------------------


def _cmd_calibrate(args: argparse.Namespace, out: TextIO) -> int:
    from .probe import calibrate

    for flag, value in (("--rounds", args.rounds), ("--tokens", args.tokens)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}", variable=flag,
                              value=value)
    config = _config(args)
    if config.calibration_file is None:
        raise CalibrationError("the calibration file is turned off (SOLLOL_LOCALITY_CALIBRATION "
                               "is empty or none); pass --calibration FILE")
    target = Path(config.calibration_file)
    if args.output and not target.parent.is_dir():
        raise ConfigError(f"--calibration {args.output}: directory {target.parent} does not "
                          "exist", variable="--calibration", value=args.output)
    topology = _topology(args, config)
    nodes, _ = _unique(args.nodes)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = calibrate(nodes, model=args.model, num_predict=args.tokens, rounds=args.rounds,
                       timeout=args.timeout, output=target, config=config, topology=topology,
                       progress=progress, replace=args.replace, budget=args.budget)
    if args.json:
        json.dump({"path": str(report.path), "model": report.model,
                   "solo_seconds": report.solo_seconds, "together": report.together,
                   "observations": report.observations,
                   "observations_before": report.observations_before,
                   "merged": report.merged, "batching": report.batching,
                   "colocation": report.colocation}, out, indent=2)
        out.write("\n")
        return EXIT_OK
    done = f"calibrated {_plural(len(report.solo_seconds), 'node')} with {report.model}"
    before = _plural(report.observations_before, "observation")
    if report.merged:
        how = f"merged into {report.path} ({before} before, {report.observations} now)"
    elif report.observations_before:
        how = f"wrote {report.path} afresh (--replace: the {before} it held were dropped)"
    else:
        how = f"wrote {report.path}"
    out.write(f"{done}; {how}\n")
    for line in _colocation_lines(report.colocation):
        out.write(line + "\n")
    return EXIT_OK


# -- entry point ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    stream = out if out is not None else sys.stdout
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    handler: _Handler = args.handler
    try:
        return handler(args, stream)
    except LocalityError as exc:
        print(f"sollol-locality: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # the reader went away (| head): not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
