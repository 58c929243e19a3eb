"""The sollol-locality command: hosts and plan, human and JSON output."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sollol_locality.cli import main

OFFLINE = ["--nameserver", "127.0.0.1:9", "--dns-timeout", "0.3"]
LOOPBACK_ALIASES = ["http://localhost:11434", "http://127.0.0.1:11435", "http://[::1]:11436",
                    "http://0.0.0.0:11437", "http://[::ffff:127.0.0.1]:11438", "127.0.0.2"]


@pytest.fixture(autouse=True)
def _no_user_state(monkeypatch):
    monkeypatch.setenv("SOLLOL_LOCALITY_CALIBRATION", "")
    for name in ("SOLLOL_LOCALITY_MODE", "SOLLOL_LOCALITY_TOPOLOGY", "SOLLOL_LOCALITY_MIN_SPEEDUP"):
        monkeypatch.delenv(name, raising=False)


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_hosts_on_loopback_aliases_prints_one_machine():
    code, text = run("hosts", *OFFLINE, *LOOPBACK_ALIASES)
    assert code == 0
    assert text.splitlines()[0] == "6 nodes on 1 physical host"
    assert "localhost  (this machine)" in text


def test_hosts_json():
    code, text = run("hosts", "--json", *OFFLINE, "localhost:11434", "10.0.0.5", "nope:port")
    data = json.loads(text)
    assert code == 0
    assert list(data["hosts"]) == ["localhost", "10.0.0.5"]
    assert data["unique_hosts"] == 2
    local = data["hosts"]["localhost"][0]
    shown = {"node", "physical_host_id", "is_local", "addresses", "device", "unit",
             "locality_group", "resolved", "source", "resolution_error"}
    assert {key: local[key] for key in shown} == {
                     "node": "http://localhost:11434", "physical_host_id": "localhost",
                     "is_local": True, "addresses": [], "device": None, "unit": "localhost/cpu",
                     "locality_group": "local", "resolved": True, "source": "loopback",
                     "resolution_error": None}
    assert data["hosts"]["10.0.0.5"][0]["source"] == "address"
    assert data["invalid"] == [{"node": "nope:port",
                                "reason": "invalid port 'port' (expected 1 to 65535)"}]


def test_plan_on_one_machine_is_sequential_with_a_reason():
    code, text = run("plan", "--tasks", "3", "--json", *OFFLINE,
                     "http://localhost:11434", "http://localhost:11435")
    data = json.loads(text)
    assert code == 0
    assert data["mode"] == "sequential" and data["speedup"] == 1.0
    assert data["reason"].startswith("Sequential: all 2 nodes run on one machine (localhost)")
    assert data["nodes"] == ["http://localhost:11434"]
    for key in ("unique_hosts", "warnings", "forced", "naive_speedup", "units"):
        assert key in data


def test_plan_on_two_machines_is_parallel_above_one():
    code, text = run("plan", "--tasks", "3", "--json", *OFFLINE,
                     "http://10.0.0.5:11434", "http://10.0.0.6:11434")
    data = json.loads(text)
    assert data["mode"] == "parallel" and data["speedup"] > 1.0
    assert data["nodes"] == ["http://10.0.0.5:11434", "http://10.0.0.6:11434"]


def test_plan_human_output():
    code, text = run("plan", "--tasks", "2", *OFFLINE, "10.0.0.5", "10.0.0.6", "localhost")
    assert code == 0
    assert text.splitlines()[0] == "mode:        parallel"
    assert "dispatch to: http://localhost:11434, http://10.0.0.5:11434" in text


def test_plan_forced_mode_flag():
    _, text = run("plan", "--tasks", "2", "--mode", "parallel", "--json", *OFFLINE,
                  "localhost:1", "localhost:2")
    data = json.loads(text)
    assert data["forced"] is True and data["mode"] == "parallel"


def test_credentials_never_printed():
    for argv in (["hosts"], ["hosts", "--json"], ["plan", "--tasks", "2"],
                 ["plan", "--tasks", "2", "--json"]):
        _, text = run(*argv, *OFFLINE, "http://alice:s3cr3t@10.0.0.5:11434",
                      "http://bob:s3cr3t@bad:port")
        assert "s3cr3t" not in text and "alice" not in text


def test_configuration_error_exits_2(capsys, tmp_path):
    bad = tmp_path / "t.toml"
    bad.write_text("[hosts.a]\naliases = 3\n")
    code, _ = run("hosts", "--topology", str(bad), *OFFLINE, "localhost")
    assert code == 2
    assert "Invalid topology file" in capsys.readouterr().err


def test_usage_error_exits_2():
    with pytest.raises(SystemExit) as info:
        main(["plan", "localhost"])
    assert info.value.code == 2


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "sollol_locality", "hosts", *OFFLINE, "localhost",
                          "127.0.0.1:2"], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "SOLLOL_LOCALITY_CALIBRATION": "",
                              "PYTHONPATH": "."})
    assert out.stdout.splitlines()[0] == "2 nodes on 1 physical host"


# -- issue 14: a newcomer's first hour, as a user runs it (subprocesses) --------------------------
# Each test names the point of the issue it shows. Every run gets its own HOME and XDG
# directories, so the default calibration file is one the test controls.

ROOT = Path(__file__).resolve().parents[1]


def user_env(home: Path, **extra: str) -> dict[str, str]:
    """A user's environment: no SOLLOL_LOCALITY_* variable unless given, private HOME/XDG."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SOLLOL_LOCALITY_", "XDG_"))}
    env.update(HOME=str(home), XDG_STATE_HOME=str(home / "state"),
               XDG_CACHE_HOME=str(home / "cache"), PYTHONPATH=str(ROOT),
               SOLLOL_LOCALITY_NAMESERVERS="127.0.0.1:9", SOLLOL_LOCALITY_DNS_TIMEOUT="0.3")
    env.update(extra)
    return env


def cli(home: Path, *argv: str, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sollol_locality", *argv], capture_output=True,
                          text=True, env=env if env is not None else user_env(home),
                          cwd=cwd or home, timeout=60)


def default_file(home: Path) -> Path:
    return home / "state" / "sollol-locality" / "calibration.json"


def calibration_json(observations: int = 4, model: str | None = "llama3.2:latest",
                     seconds: float = 2.0) -> str:
    return json.dumps({"format": "sollol-locality-calibration", "version": 1,
                       "observations": observations, "model": model,
                       "instances": ["localhost:11434", "localhost:11435"],
                       "task_seconds": {"localhost/cpu": [seconds] * 3},
                       "contention": {"localhost/cpu": {"2": [0.1]}}})


TWO_LOCAL = ["http://localhost:11434", "http://localhost:11435"]


# 1. the README's mixin example: tests/test_readme.py runs every Python block of README.md.

# 2. calibration is visible, and scoped to its model


def test_plan_says_it_decided_with_the_priors_when_there_is_no_file(tmp_path):
    done = cli(tmp_path, "plan", "--tasks", "3", *TWO_LOCAL)
    assert done.returncode == 0, done.stderr
    assert ("calibration: priors (no file at ~/state/sollol-locality/calibration.json)"
            in done.stdout.splitlines())
    data = json.loads(cli(tmp_path, "plan", "--tasks", "3", "--json", *TWO_LOCAL).stdout)
    assert data["calibration"] == {
        "path": None, "observations": 0, "source": "priors", "model": None, "instances": [],
        "note": f"no file at {default_file(tmp_path)}"}


def test_plan_names_the_calibration_file_it_used(tmp_path):
    target = default_file(tmp_path)
    target.parent.mkdir(parents=True)
    target.write_text(calibration_json())
    done = cli(tmp_path, "plan", "--tasks", "3", *TWO_LOCAL)
    assert done.returncode == 0, done.stderr
    assert ("calibration: ~/state/sollol-locality/calibration.json (4 observations, model "
            "llama3.2:latest, 2 instances)") in done.stdout.splitlines()
    assert "speedup:     1.00x predicted (6 s against 6 s one after another)" in done.stdout
    data = json.loads(cli(tmp_path, "plan", "-n", "3", "--json", *TWO_LOCAL).stdout)
    assert data["calibration"]["path"] == str(target)
    assert (data["calibration"]["source"], data["calibration"]["observations"]) == ("file", 4)
    explicit = tmp_path / "mine.json"
    explicit.write_text(calibration_json(observations=1))
    done = cli(tmp_path, "plan", "-n", "3", "--calibration", str(explicit), *TWO_LOCAL)
    assert "calibration: ~/mine.json (1 observation, model llama3.2:latest, 2 instances)" in (
        done.stdout.splitlines())


def test_the_first_releases_file_is_named_as_the_fallback(tmp_path):
    legacy = tmp_path / "cache" / "sollol-locality" / "calibration.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(calibration_json())
    data = json.loads(cli(tmp_path, "plan", "-n", "3", "--json", *TWO_LOCAL).stdout)
    assert (data["calibration"]["path"], data["calibration"]["source"]) == (str(legacy),
                                                                          "fallback")


def test_a_calibration_of_another_model_is_not_used(tmp_path):
    target = tmp_path / "cal.json"
    target.write_text(calibration_json(model="llama3.2:latest"))
    argv = ["plan", "-n", "3", "--calibration", str(target)]
    same = json.loads(cli(tmp_path, *argv, "--json", "--model", "llama3.2:latest",
                          *TWO_LOCAL).stdout)
    assert same["time_unit"] == "seconds" and same["calibration"]["source"] == "file"
    done = cli(tmp_path, *argv, "--model", "qwen2:7b", *TWO_LOCAL)
    assert done.returncode == 0
    assert ("calibration: priors (it measured llama3.2:latest, not qwen2:7b: the priors decide "
            "for qwen2:7b)") in done.stdout.splitlines()
    assert "speedup:     1.00x predicted (3 task-times against 3 one after another)" in done.stdout
    other = json.loads(cli(tmp_path, *argv, "--json", "--model", "qwen2:7b", *TWO_LOCAL).stdout)
    assert other["time_unit"] == "tasks"
    assert other["calibration"]["source"] == "priors"
    assert other["calibration"]["path"] == str(target)


# 3. read-only commands never write or rename; a path named explicitly must be usable


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file()
                                       else b"") for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("content", [None, "{not json", calibration_json()],
                         ids=["missing", "corrupt", "valid"])
def test_hosts_and_plan_change_no_file(tmp_path, content):
    home = tmp_path / "home"
    state = default_file(home).parent
    state.mkdir(parents=True)
    if content is not None:
        default_file(home).write_text(content)
    (home / "cache").mkdir()
    before = snapshot(home)
    for argv in (["hosts", *TWO_LOCAL], ["hosts", "--json", *TWO_LOCAL],
                 ["plan", "-n", "3", *TWO_LOCAL], ["plan", "-n", "3", "--json", *TWO_LOCAL],
                 ["plan", "-n", "3", "--calibration", str(default_file(home)), *TWO_LOCAL]):
        cli(home, *argv)
    assert snapshot(home) == before


def test_a_corrupt_default_file_only_warns(tmp_path):
    target = default_file(tmp_path)
    target.parent.mkdir(parents=True)
    target.write_text("{not json")
    done = cli(tmp_path, "plan", "-n", "3", *TWO_LOCAL)
    assert done.returncode == 0
    assert done.stderr.splitlines() == [
        f"sollol-locality: warning: calibration file {target} is not valid JSON (line 1): "
        "Expecting property name enclosed in double quotes; the file is left as it is, deciding "
        "with the priors"]
    assert target.read_text() == "{not json"


@pytest.mark.parametrize(("name", "message"), [
    ("missing.json", "sollol-locality: error: --calibration {path}: no such file"),
    ("no-dir/cal.json", "sollol-locality: error: --calibration {path}: directory {parent} does "
                        "not exist"),
    ("corrupt.json", "sollol-locality: error: calibration file {path} is not valid JSON (line 1): "
                     "Expecting value"),
])
def test_a_calibration_named_explicitly_must_be_usable(tmp_path, name, message):
    (tmp_path / "corrupt.json").write_text("nope")
    path = tmp_path / name
    done = cli(tmp_path, "plan", "-n", "3", "--calibration", str(path), *TWO_LOCAL)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [message.format(path=path, parent=path.parent)]
    assert done.stdout == ""
    assert (tmp_path / "corrupt.json").read_text() == "nope"


# 4. exit codes: 3 when no node is usable


def test_hosts_with_no_usable_node_exits_3(tmp_path):
    done = cli(tmp_path, "hosts", "http://[::1")
    assert done.returncode == 3
    assert done.stderr.splitlines() == ["sollol-locality: the node given is not usable:",
                                        "  http://[::1: unclosed '[' in IPv6 address"]


def test_plan_with_no_usable_node_exits_3(tmp_path):
    done = cli(tmp_path, "plan", "--tasks", "3", "http://[::1", "ftp://x", "localhost:99999", "")
    assert done.returncode == 3
    assert done.stderr.splitlines() == [
        "sollol-locality: none of the 4 nodes given is usable:",
        "  http://[::1: unclosed '[' in IPv6 address",
        "  ftp://x: unsupported scheme 'ftp' (expected http or https)",
        "  localhost:99999: invalid port '99999' (expected 1 to 65535)",
        "  '': empty address"]
    assert "dispatch to: (nothing)" in done.stdout.splitlines()


def test_exit_codes_are_documented(tmp_path):
    done = cli(tmp_path, "--help")
    assert done.returncode == 0
    assert "  3  none of the nodes given is usable" in done.stdout.splitlines()
    assert "  2  usage or configuration error (bad option, variable, topology or calibration " \
           "file)" in done.stdout.splitlines()
    import sollol_locality.cli

    assert "* 3: none of the nodes given is usable" in (sollol_locality.cli.__doc__ or "")


# 5. unresolved names say why


def test_unresolved_names_say_why(tmp_path):
    from sollol_locality.testing.dnsserver import DnsTestServer, soa

    name = "http://ollama-gpu-box.test:11434"
    with DnsTestServer({"test": [soa()]}) as server:
        # A generous deadline: the answer comes at once, but a loaded machine may start slowly.
        env = user_env(tmp_path, SOLLOL_LOCALITY_NAMESERVERS=server.nameserver,
                       SOLLOL_LOCALITY_DNS_TIMEOUT="10")
        done = cli(tmp_path, "hosts", "--no-hosts-file", name, env=env)
        data = json.loads(cli(tmp_path, "hosts", "--json", "--no-hosts-file", name,
                              env=env).stdout)
    assert done.returncode == 0
    assert f"  {name}  unresolved (NXDOMAIN)" in done.stdout.splitlines()
    entry = data["hosts"]["ollama-gpu-box.test"][0]
    assert (entry["resolved"], entry["resolution_error"]) == (False, "NXDOMAIN")
    # Nothing answers on 127.0.0.1:9: a timeout, with what the resolver said.
    silent = cli(tmp_path, "hosts", "--no-hosts-file", name)
    assert silent.returncode == 0
    assert any(line.startswith(f"  {name}  unresolved (timeout: ollama-gpu-box.test: ")
               for line in silent.stdout.splitlines()), silent.stdout
    plan = cli(tmp_path, "plan", "-n", "2", "--no-hosts-file", name, "localhost")
    # A node whose name did not resolve gets no work while a resolved one is there; why it did
    # not resolve is in the warning.
    assert any(line.startswith("warning:     node http://ollama-gpu-box.test:11434 left out: host "
                               "'ollama-gpu-box.test' could not be resolved (timeout: "
                               "ollama-gpu-box.test: ")
               for line in plan.stdout.splitlines()), plan.stdout


# 6. wording


@pytest.mark.parametrize(("argv", "message"), [
    (["hosts", "--dns-timeout", "-3", "localhost"],
     "sollol-locality hosts: error: --dns-timeout: expected a positive number of seconds, got "
     "'-3'"),
    (["plan", "-n", "2", "--dns-timeout", "soon", "localhost"],
     "sollol-locality plan: error: --dns-timeout: expected a positive number of seconds, got "
     "'soon'"),
    (["plan", "-n", "2", "--min-speedup", "0", "localhost"],
     "sollol-locality plan: error: --min-speedup: expected a positive number, got '0'"),
    (["plan", "-n", "two", "localhost"],
     "sollol-locality plan: error: --tasks/-n: expected a whole number, got 'two'"),
    (["plan", "-n", "-1", "localhost"],
     "sollol-locality: error: --tasks must be 0 or more, got -1"),
    (["calibrate", "--rounds", "0", "localhost"],
     "sollol-locality: error: --rounds must be at least 1, got 0"),
    (["calibrate", "--tokens", "0", "localhost"],
     "sollol-locality: error: --tokens must be at least 1, got 0"),
])
def test_errors_name_the_flag_as_typed(tmp_path, argv, message):
    done = cli(tmp_path, *argv)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == message


def test_a_bad_variable_is_named(tmp_path):
    done = cli(tmp_path, "plan", "-n", "2", "localhost",
               env=user_env(tmp_path, SOLLOL_LOCALITY_MODE="bogus"))
    assert done.returncode == 2
    assert done.stderr == ("sollol-locality: error: SOLLOL_LOCALITY_MODE='bogus' is not a valid "
                           "mode (expected one of auto, parallel, sequential)\n")


def test_forced_mode_says_what_forced_it(tmp_path):
    flag = cli(tmp_path, "plan", "-n", "2", "--mode", "parallel", *TWO_LOCAL)
    assert flag.stdout.splitlines()[0] == "mode:        parallel (forced by --mode parallel)"
    assert ("reason:      Parallel forced by --mode parallel: 2 tasks across 2 nodes, predicted "
            "0.50x.") in flag.stdout.splitlines()
    env = cli(tmp_path, "plan", "-n", "2", *TWO_LOCAL,
              env=user_env(tmp_path, SOLLOL_LOCALITY_MODE="parallel"))
    assert env.stdout.splitlines()[0] == (
        "mode:        parallel (forced by configuration (SOLLOL_LOCALITY_MODE=parallel))")
    assert "--mode" not in env.stdout


@pytest.mark.parametrize(("argv", "line"), [
    (["-n", "1", *TWO_LOCAL], "speedup:     1.00x predicted (1 task-time against 1 one after "
                              "another)"),
    (["-n", "1000", "10.0.0.5", "10.0.0.6"],
     "speedup:     1.90x predicted (525 task-times against 1000 one after another)"),
    (["-n", "3", "localhost"], "machines:    1 physical host, 1 execution unit"),
    (["-n", "3", "10.0.0.5", "10.0.0.6"], "machines:    2 physical hosts, 2 execution units"),
])
def test_counts_read_as_plain_words_and_numbers(tmp_path, argv, line):
    done = cli(tmp_path, "plan", *argv)
    assert done.returncode == 0
    assert line in done.stdout.splitlines()
    assert "e+" not in done.stdout and "1 units" not in done.stdout


def test_a_gpu_on_the_only_machine_is_not_called_faster_than_other_machines(tmp_path):
    topology = tmp_path / "t.toml"
    topology.write_text('[nodes."http://localhost:11434"]\ngpu = "0"\n')
    done = cli(tmp_path, "plan", "-n", "2", "--topology", str(topology), *TWO_LOCAL)
    assert done.returncode == 0
    assert "machines:    1 physical host, 2 execution units" in done.stdout.splitlines()
    assert ("reason:      Sequential on http://localhost:11434: it is 4.0x faster than any other "
            "unit of localhost, so 2 tasks one after another beat the best parallel plan "
            "(1.00x).") in done.stdout.splitlines()
    assert "other machine" not in done.stdout


def test_zero_tasks_is_a_plan_with_nothing_to_run(tmp_path):
    done = cli(tmp_path, "plan", "--tasks", "0", *TWO_LOCAL)
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert lines[:3] == ["mode:        sequential", "tasks:       0 (nothing to run)",
                         "dispatch to: (nothing)"]
    assert "reason:      Sequential: there are no tasks to run." in lines
    data = json.loads(cli(tmp_path, "plan", "--tasks", "0", "--json", *TWO_LOCAL).stdout)
    assert (data["nodes"], data["tasks_per_node"], data["num_tasks"]) == ([], [], 0)


def test_a_node_listed_twice_is_counted_once_with_a_note(tmp_path):
    argv = ["http://localhost:11434", "localhost:11434", "http://localhost:11435"]
    hosts = cli(tmp_path, "hosts", *argv)
    assert hosts.stdout.splitlines()[0] == "2 nodes on 1 physical host"
    assert "note: http://localhost:11434 is listed 2 times; counted once" in (
        hosts.stdout.splitlines())
    data = json.loads(cli(tmp_path, "hosts", "--json", *argv).stdout)
    assert data["notes"] == ["http://localhost:11434 is listed 2 times; counted once"]
    plan = cli(tmp_path, "plan", "-n", "2", "--mode", "parallel", *argv)
    assert "tasks each:  1, 1" in plan.stdout.splitlines()
    assert "note:        http://localhost:11434 is listed 2 times; counted once" in (
        plan.stdout.splitlines())


# 7. polish


def test_version(tmp_path):
    from importlib.metadata import version

    done = cli(tmp_path, "--version")
    assert done.returncode == 0
    assert done.stdout == f"sollol-locality {version('sollol-locality')}\n"


def test_verbose_logs_a_refused_parallel_plan(tmp_path):
    done = cli(tmp_path, "plan", "-n", "3", "-v", *TWO_LOCAL)
    assert done.returncode == 0
    assert ("INFO sollol_locality.cli: parallel refused for 3 tasks: Sequential: all 2 nodes run "
            "on one machine (localhost) and share its CPU; 3 tasks in parallel there are "
            "predicted to run at 0.60x the speed of running them one after another on "
            "http://localhost:11434.") in done.stderr.splitlines()
    chosen = cli(tmp_path, "plan", "-n", "2", "-v", "10.0.0.5", "10.0.0.6")
    assert any(line.startswith("INFO sollol_locality.cli: parallel for 2 tasks: Parallel: ")
               for line in chosen.stderr.splitlines())


def test_each_command_reads_only_the_variables_it_uses(tmp_path):
    env = user_env(tmp_path, SOLLOL_LOCALITY_MODE="bogus", SOLLOL_LOCALITY_MIN_SPEEDUP="x",
                   SOLLOL_LOCALITY_CALIBRATION=str(tmp_path / "nowhere" / "c.json"))
    done = cli(tmp_path, "hosts", "localhost", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "1 node on 1 physical host"


def test_a_bad_topology_file_from_the_environment_says_so(tmp_path):
    bad = tmp_path / "t.toml"
    bad.write_text("[hosts.a]\naliases = 3\n")
    done = cli(tmp_path, "hosts", "localhost",
               env=user_env(tmp_path, SOLLOL_LOCALITY_TOPOLOGY=str(bad)))
    assert done.returncode == 2
    assert done.stderr == (f"sollol-locality: error: Invalid topology file {bad}, line 2: "
                           "[hosts.a]: 'aliases' must be a list of strings (the file named by "
                           "SOLLOL_LOCALITY_TOPOLOGY)\n")
    flag = cli(tmp_path, "hosts", "--topology", str(bad), "localhost")
    assert flag.returncode == 2 and "SOLLOL_LOCALITY_TOPOLOGY" not in flag.stderr


def test_help_shows_the_defaults(tmp_path):
    done = cli(tmp_path, "calibrate", "--help")
    assert done.returncode == 0
    text = "".join(done.stdout.split())  # help wraps lines, even inside a path at a hyphen
    for default in ("(default 3)", "(num_predict; default 32)", "(default 120)", "(default: merge)",
                    f"else {default_file(tmp_path)})"):
        assert "".join(default.split()) in text
    emulator = subprocess.run([sys.executable, "-m", "sollol_locality.testing.emulator", "--help"],
                              capture_output=True, text=True, env=user_env(tmp_path), timeout=60)
    assert emulator.returncode == 0 and "(default: llama3.2:latest)" in emulator.stdout


def test_a_broken_pipe_is_not_a_traceback(tmp_path):
    nodes = [f"http://localhost:{port}" for port in range(11434, 14434)]
    process = subprocess.Popen([sys.executable, "-m", "sollol_locality", "hosts", *nodes],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=user_env(tmp_path))
    assert process.stdout is not None and process.stderr is not None
    process.stdout.readline()
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=60) == 0
    assert "Traceback" not in err


# 2. (live) calibrate: one "wrote", the merge said, --replace, another model refused


@pytest.fixture(scope="module")
def emulators():
    pytest.importorskip("numpy", reason="the emulator needs numpy")
    from sollol_locality.testing.emulator import start_emulator

    processes = [start_emulator(weights_mb=8), start_emulator(weights_mb=8, num_parallel=4)]
    try:
        yield [p.url for p in processes]
    finally:
        for process in processes:
            process.stop()


@pytest.mark.integration
def test_calibrate_says_where_it_wrote_once_and_what_it_merged(tmp_path, emulators):
    argv = ["calibrate", "--tokens", "4", "--rounds", "1", "--calibration", "cal.json"]
    first = cli(tmp_path, *argv, *emulators)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "calibrated 2 nodes with llama3.2:latest; wrote cal.json\n"
    assert "wrote" not in first.stderr
    data = json.loads((tmp_path / "cal.json").read_text())
    assert data["model"] == "llama3.2:latest" and data["observations"] == 3
    assert data["instances"] == sorted(  # 127.0.0.1 is this machine: "localhost"
        url.removeprefix("http://").replace("127.0.0.1", "localhost") for url in emulators)

    again = cli(tmp_path, *argv, *emulators)
    assert again.returncode == 0, again.stderr
    assert again.stdout == ("calibrated 2 nodes with llama3.2:latest; merged into cal.json "
                            "(3 observations before, 6 now)\n")
    fresh = cli(tmp_path, *argv, "--replace", *emulators)
    assert fresh.stdout == ("calibrated 2 nodes with llama3.2:latest; wrote cal.json afresh "
                            "(--replace: the 6 observations it held were dropped)\n")
    assert json.loads((tmp_path / "cal.json").read_text())["observations"] == 3

    plan = cli(tmp_path, "plan", "-n", "4", "--calibration", "cal.json", *emulators)
    assert ("calibration: cal.json (3 observations, model llama3.2:latest, 2 instances)"
            in plan.stdout.splitlines())

    # A file that measured another model is not merged into: nothing is measured or written.
    data = json.loads((tmp_path / "cal.json").read_text())
    (tmp_path / "cal.json").write_text(json.dumps({**data, "model": "qwen2:7b"}))
    before = (tmp_path / "cal.json").read_bytes()
    refused = cli(tmp_path, *argv, *emulators)
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[-1] == (
        "sollol-locality: error: calibration file cal.json measured model 'qwen2:7b', this run "
        "measures 'llama3.2:latest': pass --replace to start it afresh, or another "
        "--calibration file; nothing was measured")
    assert (tmp_path / "cal.json").read_bytes() == before


def test_calibrate_into_a_directory_that_does_not_exist_is_refused(tmp_path):
    done = cli(tmp_path, "calibrate", "--calibration", "no-dir/cal.json", "localhost:9")
    assert done.returncode == 2
    assert done.stderr == ("sollol-locality: error: --calibration no-dir/cal.json: directory "
                           "no-dir does not exist\n")
def test_plan_on_one_batching_node_runs_its_tasks_at_once(tmp_path):
    # As a user runs it: a topology file declares the node's slots (and that h is a machine of
    # its own, so nothing is resolved).
    topology = tmp_path / "topology.toml"
    topology.write_text('[hosts.h]\naliases = ["h"]\n\n'
                        '[nodes."http://h:11434"]\nnum_parallel = 4\n')
    argv = [sys.executable, "-m", "sollol_locality", "plan", "--tasks", "5", "--topology",
            str(topology), "--nameserver", "127.0.0.1:9", "--no-hosts-file", "http://h:11434"]
    env = {"PATH": "/usr/bin:/bin", "SOLLOL_LOCALITY_CALIBRATION": "", "PYTHONPATH": "."}
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env)
    lines = out.stdout.splitlines()
    assert lines[0] == "mode:        parallel"
    assert "dispatch to: http://h:11434" in lines
    assert "tasks each:  5" in lines and "at once:     4 (slots 4)" in lines
    assert ("reason:      Parallel: 5 tasks at once on http://h:11434, which batches 4: "
            "predicted 1.64x.") in lines
    data = json.loads(subprocess.run([*argv[:4], "--json", *argv[4:]], capture_output=True,
                                     text=True, check=True, env=env).stdout)
    assert data["concurrency_per_node"] == [4] and data["tasks_per_node"] == [5]
    assert data["batching_per_node"] == [{"slots": 4, "slots_source": "topology file",
                                          "curve": "prior"}]
