"""The sollol-locality command: hosts and plan, human and JSON output."""

from __future__ import annotations

import io
import json
import subprocess
import sys

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
             "locality_group", "resolved", "source"}
    assert {key: local[key] for key in shown} == {
                     "node": "http://localhost:11434", "physical_host_id": "localhost",
                     "is_local": True, "addresses": [], "device": None, "unit": "localhost/cpu",
                     "locality_group": "local", "resolved": True, "source": "loopback"}
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
