"""config: LocalityConfig from arguments and environment, and the topology file."""

from __future__ import annotations

from pathlib import Path

import pytest

from sollol_locality import ConfigError, LocalityConfig, TopologyFileError
from sollol_locality.config import (
    default_calibration_file,
    legacy_calibration_file,
    load_topology_file,
    parse_topology,
)


def test_defaults_with_an_empty_environment(tmp_path):
    config = LocalityConfig.from_env({"HOME": str(tmp_path)})
    assert config.mode == "auto"
    assert config.min_speedup == 1.0
    assert config.topology_file is None
    assert config.dns_timeout == 1.0
    assert config.nameservers is None
    # The default moved to the user state directory; the first release's cache path is still read.
    assert config.calibration_file == (
        tmp_path / ".local" / "state" / "sollol-locality" / "calibration.json")
    assert config.calibration_fallback == (
        tmp_path / ".cache" / "sollol-locality" / "calibration.json")
    assert not config.forced


def test_plain_construction_reads_no_environment(monkeypatch):
    for variable in ("SOLLOL_LOCALITY_MODE", "SOLLOL_LOCALITY_MIN_SPEEDUP",
                     "SOLLOL_LOCALITY_TOPOLOGY", "SOLLOL_LOCALITY_CALIBRATION"):
        monkeypatch.setenv(variable, "bogus")
    config = LocalityConfig()
    assert config == LocalityConfig(mode="auto", min_speedup=1.0, topology_file=None,
                                    dns_timeout=1.0, nameservers=None, calibration_file=None)
    with pytest.raises(ConfigError, match=r"^SOLLOL_LOCALITY_MODE='bogus' is not a valid mode"):
        LocalityConfig.from_env()


def test_from_env_overrides_win_and_are_checked_by_field():
    env = {"SOLLOL_LOCALITY_MIN_SPEEDUP": "2", "SOLLOL_LOCALITY_MODE": "parallel"}
    config = LocalityConfig.from_env(env, min_speedup=1.5, calibration_file=None)
    assert (config.min_speedup, config.mode, config.calibration_file) == (1.5, "parallel", None)
    with pytest.raises(ConfigError, match=r"^min_speedup='x' is not a number$"):
        LocalityConfig.from_env({}, min_speedup="x")


def test_environment_is_read_for_fields_not_given(tmp_path):
    env = {
        "SOLLOL_LOCALITY_MODE": "Sequential",
        "SOLLOL_LOCALITY_MIN_SPEEDUP": "1.2",
        "SOLLOL_LOCALITY_TOPOLOGY": str(tmp_path / "t.toml"),
        "SOLLOL_LOCALITY_DNS_TIMEOUT": "0.25",
        "SOLLOL_LOCALITY_NAMESERVERS": "127.0.0.1:5353, [::1]:53,10.0.0.1",
        "SOLLOL_LOCALITY_CALIBRATION": str(tmp_path / "c.json"),
    }
    config = LocalityConfig.from_env(env)
    assert config.mode == "sequential" and config.forced
    assert config.min_speedup == 1.2
    assert config.topology_file == tmp_path / "t.toml"
    assert config.dns_timeout == 0.25
    assert config.nameservers == (("127.0.0.1", 5353), ("::1", 53), ("10.0.0.1", 53))
    assert config.calibration_file == tmp_path / "c.json"


def test_arguments_win_over_environment():
    config = LocalityConfig.from_env({"SOLLOL_LOCALITY_MODE": "sequential"}, mode="parallel")
    assert config.mode == "parallel"


@pytest.mark.parametrize("value", ["", "none", "NONE"])
def test_calibration_can_be_turned_off(value):
    assert LocalityConfig.from_env({"SOLLOL_LOCALITY_CALIBRATION": value}).calibration_file is None
    assert LocalityConfig(calibration_file=None).calibration_file is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SOLLOL_LOCALITY_MODE": "fast"},
         "SOLLOL_LOCALITY_MODE='fast' is not a valid mode (expected one of auto, parallel, "
         "sequential)"),
        ({"SOLLOL_LOCALITY_MIN_SPEEDUP": "abc"},
         "SOLLOL_LOCALITY_MIN_SPEEDUP='abc' is not a number"),
        ({"SOLLOL_LOCALITY_MIN_SPEEDUP": "-1"},
         "SOLLOL_LOCALITY_MIN_SPEEDUP='-1' is out of range (expected a number greater than 0)"),
        ({"SOLLOL_LOCALITY_DNS_TIMEOUT": "0"},
         "SOLLOL_LOCALITY_DNS_TIMEOUT='0' is out of range (expected a number greater than 0 and "
         "at most 60)"),
        ({"SOLLOL_LOCALITY_DNS_TIMEOUT": "nan"},
         "SOLLOL_LOCALITY_DNS_TIMEOUT='nan' is out of range (expected a number greater than 0 and "
         "at most 60)"),
        ({"SOLLOL_LOCALITY_NAMESERVERS": "dns.example"},
         "SOLLOL_LOCALITY_NAMESERVERS: Invalid nameserver 'dns.example': expected an IP address, "
         "ip:port or [ipv6]:port (port 1 to 65535)"),
        ({"SOLLOL_LOCALITY_NAMESERVERS": "127.0.0.1:99999"},
         "SOLLOL_LOCALITY_NAMESERVERS: Invalid nameserver '127.0.0.1:99999': expected an IP "
         "address, ip:port or [ipv6]:port (port 1 to 65535)"),
    ],
)
def test_bad_environment_values_name_variable_and_value(env, message):
    with pytest.raises(ConfigError) as info:
        LocalityConfig.from_env(env)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)
    assert info.value.variable == next(iter(env))


def test_bad_argument_names_the_field():
    with pytest.raises(ConfigError, match=r"^mode='x' is not a valid mode"):
        LocalityConfig(mode="x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^dns_timeout=-2 is out of range"):
        LocalityConfig(dns_timeout=-2)


def test_default_calibration_file_follows_xdg(tmp_path):
    assert default_calibration_file({"XDG_STATE_HOME": str(tmp_path)}) == (
        tmp_path / "sollol-locality" / "calibration.json")
    assert legacy_calibration_file({"XDG_CACHE_HOME": str(tmp_path)}) == (
        tmp_path / "sollol-locality" / "calibration.json")


def test_default_calibration_file_is_platformdirs_user_state_path():
    import platformdirs

    assert default_calibration_file() == (
        platformdirs.user_state_path("sollol-locality") / "calibration.json")


TOPOLOGY = """
[hosts.gpu-box-1]
aliases = ["10.0.0.5", "192.168.1.5", "GPU-Box-1.lan.", "::FFFF:10.0.0.6"]
zone = "rack-1"

[nodes."http://10.0.0.5:11435"]
host = "gpu-box-1"
gpu = "1"

[nodes."10.0.0.5"]
gpu = 0
"""


def test_topology_file_is_parsed_and_normalised(tmp_path):
    path = tmp_path / "topology.toml"
    path.write_text(TOPOLOGY)
    overrides = load_topology_file(path)
    host = overrides.hosts["gpu-box-1"]
    assert host.zone == "rack-1"
    assert host.aliases == {"10.0.0.5", "192.168.1.5", "gpu-box-1.lan", "10.0.0.6"}
    assert overrides.alias_index["gpu-box-1.lan"] == "gpu-box-1"
    node = overrides.nodes[("10.0.0.5", 11435)]
    assert (node.host, node.gpu) == ("gpu-box-1", "1")
    assert overrides.nodes[("10.0.0.5", 11434)].gpu == "0"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[hosts.a]\naliases = [1, 2]\n",
         "Invalid topology file t.toml, line 2: [hosts.a]: 'aliases' must be a list of strings"),
        ("[hosts.a]\naliases = ['x']\nrack = 1\n",
         "Invalid topology file t.toml, line 3: [hosts.a]: unknown key 'rack' (expected aliases, "
         "zone)"),
        ("[hosts.a]\naliases = ['10.0.0.1']\n[hosts.b]\naliases = ['10.0.0.1']\n",
         "Invalid topology file t.toml, line 2: alias '10.0.0.1' is given to both 'a' and 'b'"),
        ("[nodes.\"http://h:notaport\"]\nhost = 'a'\n",
         "Invalid topology file t.toml, line 1: [nodes.'http://h:notaport']: invalid port "
         "'notaport' (expected 1 to 65535)"),
        ("[hosts.a]\naliases = [\n",
         "Invalid topology file t.toml, line 2: not valid TOML: Cannot declare ('hosts', 'a') "
         "twice"),
        ("[machines.a]\n",
         "Invalid topology file t.toml, line 1: unknown table 'machines' (expected [hosts.NAME] "
         "or [nodes.\"URL\"])"),
        ("[nodes.\"http://h:1\"]\nhost = 'a'\nnum_parallel = 0\n",
         "Invalid topology file t.toml, line 3: [nodes.'http://h:1']: 'num_parallel' must be an "
         "integer from 1 to 4096, got 0"),
        ("[nodes.\"http://h:1\"]\nnum_parallel = true\n",
         "Invalid topology file t.toml, line 2: [nodes.'http://h:1']: 'num_parallel' must be an "
         "integer from 1 to 4096, got True"),
        ("[nodes.\"http://h:1\"]\n\ncpus = \"0-x\"\n",
         "Invalid topology file t.toml, line 3: [nodes.'http://h:1']: 'cpus' must be a CPU list "
         "such as \"0-7\" or \"0,2,4\", got '0-x'"),
        ("[nodes.\"http://h:1\"]\ncpus = \"7-3\"\n",
         "Invalid topology file t.toml, line 2: [nodes.'http://h:1']: 'cpus' must list CPUs from "
         "0 to 65535 in rising ranges, got '7-3'"),
        ("[nodes.\"http://h:1\"]\ncores = 2\n",
         "Invalid topology file t.toml, line 2: [nodes.'http://h:1']: unknown key 'cores' "
         "(expected host, gpu, zone, num_parallel, cpus)"),
    ],
)
def test_malformed_topology_names_file_and_line(text, message):
    with pytest.raises(TopologyFileError) as info:
        parse_topology(text, "t.toml")
    if "not valid TOML" in message:
        assert str(info.value).startswith("Invalid topology file t.toml, line ")
        assert "not valid TOML" in str(info.value)
    else:
        assert str(info.value) == message


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0-3", {0, 1, 2, 3}), ("0,2,4", {0, 2, 4}), (" 0-1 , 8 ", {0, 1, 8}), ([4, 5], {4, 5})],
)
def test_node_cpus_and_slots_are_parsed(text, cpus):
    value = f'"{text}"' if isinstance(text, str) else str(text)
    parsed = parse_topology(f'[nodes."http://h:1"]\nnum_parallel = 4\ncpus = {value}\n', "t")
    node = parsed.nodes[("h", 1)]
    assert node.num_parallel == 4 and node.cpus == frozenset(cpus)


def test_missing_topology_file_is_a_clear_error(tmp_path):
    with pytest.raises(TopologyFileError, match=r"missing\.toml: cannot be read"):
        load_topology_file(tmp_path / "missing.toml")


def test_topology_path_from_environment_is_a_path(tmp_path: Path):
    config = LocalityConfig.from_env({"SOLLOL_LOCALITY_TOPOLOGY": "~/x.toml"})
    assert config.topology_file == Path.home() / "x.toml"


# -- reading only what a command uses; what forced the mode ------------------------------------


def test_from_env_only_reads_the_fields_named(tmp_path):
    env = {"HOME": str(tmp_path), "SOLLOL_LOCALITY_MODE": "bogus",
           "SOLLOL_LOCALITY_MIN_SPEEDUP": "x", "SOLLOL_LOCALITY_DNS_TIMEOUT": "0.5",
           "SOLLOL_LOCALITY_CALIBRATION": str(tmp_path / "c.json")}
    config = LocalityConfig.from_env(env, only=("dns_timeout", "nameservers", "topology_file"))
    assert (config.mode, config.min_speedup, config.dns_timeout) == ("auto", 1.0, 0.5)
    assert config.calibration_file is None and config.calibration_fallback is None
    with_file = LocalityConfig.from_env({"HOME": str(tmp_path)}, only=("calibration_file",))
    assert with_file.calibration_file == (
        tmp_path / ".local" / "state" / "sollol-locality" / "calibration.json")
    with pytest.raises(ConfigError, match=r"^SOLLOL_LOCALITY_MODE='bogus' is not a valid mode"):
        LocalityConfig.from_env(env, only=("mode",))
    with pytest.raises(TypeError, match="unknown field"):
        LocalityConfig.from_env(env, only=("colour",))


@pytest.mark.parametrize(("fields", "forced_by"), [
    ({"mode": "parallel"}, "configuration (SOLLOL_LOCALITY_MODE=parallel)"),
    ({"mode": "sequential", "mode_source": "--mode sequential"}, "--mode sequential"),
])
def test_forced_by_says_where_the_mode_came_from(fields, forced_by):
    config = LocalityConfig(**fields)
    assert config.forced and config.forced_by == forced_by
    assert config == LocalityConfig(mode=fields["mode"])  # the source is not part of the value
