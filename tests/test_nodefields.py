"""_nodefields: one reader of the caller's node objects, and the decision cache's key."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import OllamaNode, offline_config, offline_topology, timed_node

from sollol_locality import ExecutionPlanner, ParallelismCostModel, _nodefields


class Raising:
    url = "http://10.0.0.5:11434"

    @property
    def metrics(self) -> Any:
        raise RuntimeError("a foreign property that fails")


def test_a_property_that_raises_reads_as_absent():
    node = Raising()
    assert _nodefields.read(node, ("metrics", "total_requests")) is None
    assert _nodefields.latency(node, 1) is None
    assert _nodefields.signature(node)[2] == "http://10.0.0.5:11434"


def test_the_signature_is_derived_from_the_declared_fields(monkeypatch):
    a, b = OllamaNode("http://10.0.0.5:11434", name="a"), OllamaNode("http://10.0.0.5:11434")
    before = _nodefields.signature(a)
    assert len(before) == 2 + len(_nodefields.FIELDS)
    b.name = "b"
    a_named, b_named = _nodefields.signature(a), _nodefields.signature(b)
    assert a_named[2:] == b_named[2:]  # ``name`` is not a declared field: not part of the key
    monkeypatch.setattr(_nodefields, "FIELDS", (*_nodefields.FIELDS, ("name",)))
    assert _nodefields.signature(a)[2:] != _nodefields.signature(b)[2:]
    assert _nodefields.signature(a) != before


def test_a_declared_field_that_changes_changes_the_cached_decision(monkeypatch):
    """The planner's cache key follows FIELDS: a field added there invalidates a plan."""
    monkeypatch.setattr(_nodefields, "FIELDS", (*_nodefields.FIELDS, ("name",)))
    config = offline_config()
    planner = ExecutionPlanner(offline_topology(), ParallelismCostModel(config), config)
    a, b = timed_node("http://10.0.0.5:11434", 1.0), timed_node("http://10.0.0.6:11434", 1.0)
    first = planner.plan(2, [a, b])
    assert planner.plan(2, [a, b]).detail is first.detail  # served from the cache
    a.name = "renamed"
    assert planner.plan(2, [a, b]).detail is not first.detail


@pytest.mark.parametrize(
    ("node", "slots"),
    [
        ("http://h:1", None),
        ({"url": "http://h:1", "num_parallel": 4}, 4),
        ({"url": "http://h:1", "num_parallel": "3"}, 3),
        ({"url": "http://h:1", "options": {"num_parallel": 2}}, 2),
        ({"url": "http://h:1", "num_parallel": 0}, None),
        ({"url": "http://h:1", "num_parallel": True}, None),
    ],
)
def test_slots_from_the_node(node, slots):
    assert _nodefields.slots(node) == slots


@pytest.mark.parametrize(
    ("node", "device", "gpu"),
    [
        ({"url": "http://h:1", "gpu": "1"}, "1", False),  # a device id, not a flag
        ({"url": "http://h:1", "gpu": True}, None, True),
        ({"url": "http://h:1", "gpu_count": 2}, None, True),
        ({"url": "http://h:1", "device": 0}, "0", False),
        ("http://h:1", None, False),
    ],
)
def test_gpu_fields(node, device, gpu):
    assert _nodefields.device(node) == device
    assert _nodefields.has_gpu(node) is gpu
