"""The public surface: exactly the documented names, and a light import."""

from __future__ import annotations

import subprocess
import sys

import sollol_locality

DOCUMENTED = {
    "CalibrationError",
    "ConfigError",
    "CostPriors",
    "ExecutionPlan",
    "ExecutionPlanner",
    "HostIdentity",
    "InvalidNodeAddress",
    "LocalityAwareLoadBalancer",
    "LocalityAwareMixin",
    "LocalityAwarePool",
    "LocalityAwarePoolMixin",
    "LocalityConfig",
    "LocalityError",
    "NodeAddress",
    "NodeTopology",
    "ParallelismCostModel",
    "PlanDetail",
    "SpeedupEstimate",
    "TopologyFileError",
    "install",
    "parse_node_address",
    "uninstall",
}


def test_all_is_sorted_and_matches_the_documented_names():
    assert list(sollol_locality.__all__) == sorted(sollol_locality.__all__)
    assert set(sollol_locality.__all__) == DOCUMENTED


def test_every_exported_name_resolves():
    for name in sollol_locality.__all__:
        assert getattr(sollol_locality, name) is not None


def test_invalid_node_address_is_a_value_error_and_a_locality_error():
    assert issubclass(sollol_locality.InvalidNodeAddress, ValueError)
    assert issubclass(sollol_locality.InvalidNodeAddress, sollol_locality.LocalityError)
    assert issubclass(sollol_locality.ConfigError, ValueError)


def test_import_does_not_import_sollol_dnspython_or_psutil():
    code = (
        "import sys, sollol_locality\n"
        "heavy = [m for m in ('sollol', 'ray', 'dask', 'dns', 'psutil') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_balancer_is_loaded_on_first_use():
    code = (
        "import sys, sollol_locality\n"
        "assert 'sollol' not in sys.modules\n"
        "cls = sollol_locality.LocalityAwareLoadBalancer\n"
        "assert 'sollol.integration' in sys.modules\n"
        "print(cls.__mro__[2].__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "sollol.integration"


def test_package_is_typed():
    from importlib.resources import files

    assert files("sollol_locality").joinpath("py.typed").is_file()
