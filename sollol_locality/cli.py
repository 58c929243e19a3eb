"""The ``sollol-locality`` command.

``sollol-locality hosts [--json] NODE...``
    group nodes by physical host, each with how its identity was decided;
``sollol-locality plan --tasks N [--json] NODE...``
    the execution plan for N tasks: mode, nodes to use, predicted speedup, reason, and what
    dispatching to every node at once would cost;
``sollol-locality calibrate [--model M] NODE...``
    probe live nodes (:mod:`sollol_locality.probe`) and write the calibration file.

``hosts`` and ``plan`` reason about addresses only: no Ollama needs to run, and nothing is
probed.
Exit status: 0 when an answer was printed (nodes that cannot be parsed are listed as invalid),
2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from ._errors import CalibrationError, ConfigError, InvalidNodeAddress, LocalityError
from .addresses import describe_input

__all__ = ["build_parser", "main"]

_Handler = Callable[[argparse.Namespace, TextIO], int]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object")
    common.add_argument("--topology", metavar="FILE",
                        help="topology file (TOML); default $SOLLOL_LOCALITY_TOPOLOGY")
    common.add_argument("--nameserver", metavar="IP[:PORT]", action="append",
                        help="DNS server to ask (repeatable); default the system's")
    common.add_argument("--dns-timeout", type=float, metavar="SECONDS",
                        help="deadline for resolving all names together (default 1.0)")
    common.add_argument("--no-hosts-file", action="store_true",
                        help="do not read /etc/hosts before DNS")
    common.add_argument("-v", "--verbose", action="count", default=0,
                        help="log to stderr (-v info, -vv debug)")
    parser = argparse.ArgumentParser(
        prog="sollol-locality",
        description="Which Ollama nodes share a machine, and whether to run a batch on them in "
                    "parallel or sequentially.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    hosts = sub.add_parser("hosts", parents=[common], help="group nodes by physical host",
                           description="Group nodes by physical host.")
    hosts.add_argument("nodes", nargs="+", metavar="NODE",
                       help="node address: URL, host:port or host")
    hosts.set_defaults(handler=_cmd_hosts)
    plan = sub.add_parser("plan", parents=[common], help="plan a batch of tasks",
                          description="Plan N tasks on the given nodes.")
    plan.add_argument("--tasks", "-n", type=int, required=True, metavar="N",
                      help="number of tasks in the batch")
    plan.add_argument("--mode", choices=["auto", "parallel", "sequential"],
                      help="force a mode (default $SOLLOL_LOCALITY_MODE or auto)")
    plan.add_argument("--min-speedup", type=float, metavar="X",
                      help="parallel only above this predicted speedup (default 1.0)")
    plan.add_argument("--calibration", metavar="FILE",
                      help="calibration file (default $SOLLOL_LOCALITY_CALIBRATION or the "
                           "user state directory)")
    plan.add_argument("nodes", nargs="+", metavar="NODE",
                      help="node address: URL, host:port or host")
    plan.set_defaults(handler=_cmd_plan)
    _add_calibrate(sub, common)
    return parser


def _add_calibrate(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``sollol-locality calibrate`` on the command's sub-parsers."""
    parser = sub.add_parser(
        "calibrate", parents=[common], help="measure live nodes and write the calibration file",
        description="Probe live Ollama nodes (alone, then together where they share a machine) "
                    "and write the calibration file later decisions use.")
    parser.add_argument("--model", "-m", help="model to run (default: the first the node has)")
    parser.add_argument("--tokens", type=int, default=32, metavar="N",
                        help="tokens per generate (num_predict; default 32)")
    parser.add_argument("--rounds", type=int, default=3, metavar="R",
                        help="repetitions of each measurement (default 3)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="seconds one request may take (default 120)")
    parser.add_argument("--output", "-o", metavar="FILE",
                        help="where to write (default $SOLLOL_LOCALITY_CALIBRATION or the user "
                             "state directory)")
    parser.add_argument("nodes", nargs="+", metavar="NODE", help="node address")
    parser.set_defaults(handler=_cmd_calibrate)


def _cmd_calibrate(args: argparse.Namespace, out: TextIO) -> int:
    from .probe import calibrate

    config = _config(args)
    if args.output is None and config.calibration_file is None:
        raise CalibrationError("the calibration file is turned off; pass --output FILE")

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = calibrate(args.nodes, model=args.model, num_predict=args.tokens, rounds=args.rounds,
                       timeout=args.timeout, output=args.output, config=config,
                       progress=progress)
    if args.json:
        json.dump({"path": str(report.path), "model": report.model,
                   "solo_seconds": report.solo_seconds, "together": report.together,
                   "observations": report.observations}, out, indent=2)
        out.write("\n")
    else:
        out.write(f"calibrated {len(report.solo_seconds)} node(s) with {report.model}; "
                  f"wrote {report.path}\n")
    return 0


def _config(args: argparse.Namespace) -> Any:
    from .config import LocalityConfig

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
    if getattr(args, "min_speedup", None) is not None:
        fields["min_speedup"] = args.min_speedup
    if getattr(args, "calibration", None):
        fields["calibration_file"] = args.calibration
    return LocalityConfig.from_env(**fields)


def describe_identity(identity: Any) -> dict[str, Any]:
    """A JSON-friendly description of a :class:`HostIdentity` (no credentials): where it runs,
    its unit and slots, where each fact came from (``facts``), and for a node of this machine
    the process behind it (``process``: pid, CPU set, GPUs, slots, or why it was not read)."""
    return {
        "node": identity.address.url,
        "physical_host_id": identity.physical_host_id,
        "is_local": identity.is_local,
        "addresses": sorted(identity.addresses),
        "device": identity.device,
        "unit": identity.unit.label,
        "locality_group": identity.locality_group,
        "resolved": identity.resolved,
        "source": identity.source,
        "cpus": _cpu_list(identity.cpus),
        "slots": identity.slots,
        "facts": dict(identity.facts),
        "process": _describe_process(identity.process),
    }


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
    from .topology import NodeTopology

    topology = NodeTopology(_config(args))
    identities = topology.describe_many(args.nodes)
    groups: dict[str, list[dict[str, Any]]] = {}
    invalid: list[dict[str, str]] = []
    for raw, identity in zip(args.nodes, identities, strict=True):
        if isinstance(identity, InvalidNodeAddress):
            invalid.append({"node": describe_input(raw).strip("'"), "reason": identity.reason})
        else:
            groups.setdefault(identity.physical_host_id, []).append(describe_identity(identity))
    if args.json:
        json.dump({"hosts": groups, "unique_hosts": len(groups), "invalid": invalid}, out,
                  indent=2)
        out.write("\n")
        return 0
    total = sum(len(v) for v in groups.values())
    out.write(f"{total} node{'s' if total != 1 else ''} on {len(groups)} physical "
              f"host{'s' if len(groups) != 1 else ''}\n")
    for host, members in groups.items():
        first = members[0]
        where = "this machine" if first["is_local"] else first["locality_group"]
        addresses = ", ".join(first["addresses"]) if not first["is_local"] else ""
        out.write(f"\n{host}  ({where}{'; ' + addresses if addresses else ''})\n")
        width = max(len(m["node"]) for m in members)
        for member in members:
            extra = "" if member["resolved"] else "  (not resolved)"
            device = f"  gpu {member['device']}" if member["device"] is not None else ""
            out.write(f"  {member['node']:<{width}}  {member['source']}{device}{extra}"
                      f"{_process_line(member)}\n")
    if invalid:
        out.write("\ninvalid nodes (left out)\n")
        for item in invalid:
            out.write(f"  {item['node']}: {item['reason']}\n")
    return 0


def _cmd_plan(args: argparse.Namespace, out: TextIO) -> int:
    from .planner import ExecutionPlanner

    if args.tasks < 0:
        raise ConfigError(f"--tasks {args.tasks} must not be negative", variable="--tasks",
                          value=args.tasks)
    planner = ExecutionPlanner(config=_config(args))
    plan = planner.plan(args.tasks, list(args.nodes))
    data = plan.to_dict()
    if args.json:
        json.dump(data, out, indent=2)
        out.write("\n")
        return 0
    unit = "s" if plan.time_unit == "seconds" else " task-times"
    nodes = data["nodes"]
    out.write(f"mode:        {plan.mode}{' (forced)' if plan.forced else ''}\n")
    out.write(f"speedup:     {plan.speedup:.2f}x predicted "
              f"({plan.predicted_seconds:.3g}{unit} against {plan.sequential_seconds:.3g}{unit} "
              "one after another)\n")
    out.write(f"naive:       {plan.naive_speedup:.2f}x if every node got tasks at once\n")
    out.write(f"dispatch to: {', '.join(nodes) if nodes else '(nothing)'}\n")
    if plan.mode == "parallel":
        out.write(f"tasks each:  {', '.join(map(str, plan.tasks_per_node))}\n")
    out.write(f"machines:    {plan.unique_hosts} physical host"
              f"{'s' if plan.unique_hosts != 1 else ''}, {plan.units} execution unit"
              f"{'s' if plan.units != 1 else ''}\n")
    out.write(f"reason:      {plan.reason}\n")
    for warning in plan.warnings:
        out.write(f"warning:     {warning}\n")
    return 0


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run the command line; returns the exit status."""
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
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
