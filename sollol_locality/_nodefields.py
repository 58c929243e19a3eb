"""Reading the caller's node objects, in one place (layer 1: imports nothing of the package).

Nodes come in many shapes: strings, mappings (SOLLOL ``OllamaPool`` nodes) and objects (SOLLOL
``NodeProtocol``, SynapticLlamas ``OllamaNode`` with ``.metrics`` and ``.capabilities``). Every
field the library reads from a node object is declared in :data:`FIELDS`, and read through
:func:`read`, which treats a foreign property that raises as absent. The decision cache's key
(:func:`signature`) is built from the same list, so a field added there is part of the key.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any, Final, TypeGuard

__all__ = [
    "FIELDS",
    "device",
    "has_gpu",
    "latency",
    "priority",
    "read",
    "safe_getattr",
    "signature",
    "slots",
]

FIELDS: tuple[tuple[str, ...], ...] = (
    ("url",),
    ("host",),
    ("port",),
    ("metrics", "avg_response_time"),  # SynapticLlamas: seconds
    ("metrics", "total_requests"),
    ("metrics", "avg_latency"),  # SOLLOL: milliseconds
    ("capabilities", "has_gpu"),
    ("capabilities", "gpu_count"),
    ("capabilities", "num_parallel"),
    ("gpu",),
    ("device",),
    ("gpu_id",),
    ("has_gpu",),
    ("num_parallel",),
    ("options", "num_parallel"),
    ("priority",),
)
"""Every attribute path the library reads from a node object (not a string or a mapping)."""

_DEVICE_KEYS: Final = ("gpu_id", "device", "gpu")
_SLOT_PATHS: Final = (("num_parallel",), ("options", "num_parallel"),
                      ("capabilities", "num_parallel"))


def safe_getattr(obj: object, name: str) -> Any:
    """``getattr(obj, name, None)``, with a property that raises counting as absent."""
    try:
        return getattr(obj, name, None)
    except Exception:  # a foreign property that raises is treated as absent
        return None


def read(node: object, path: tuple[str, ...]) -> Any:
    """The value at ``path`` on a node (attributes of objects, keys of mappings), or ``None``."""
    value: Any = node
    for name in path:
        if value is None:
            return None
        value = value.get(name) if isinstance(value, Mapping) else safe_getattr(value, name)
    return value


def signature(node: object) -> Hashable:
    """What a decision depends on for one node: a string itself, a mapping's items, and for an
    object its identity plus every field of :data:`FIELDS` (raises ``TypeError`` when a value
    cannot be hashed: such a node is not cached)."""
    if type(node) is str:
        return node
    if isinstance(node, Mapping):
        return (Mapping, *sorted(node.items()))
    plan = _plan()
    parts: list[Any] = [type(node), id(node)]
    for head, tails in plan:
        try:
            value = getattr(node, head, None)
        except Exception:  # a foreign property that raises counts as absent
            value = None
        for tail in tails:
            if tail is None:
                parts.append(value)
            elif value is None:
                parts.append(None)
            elif type(value) is dict or isinstance(value, Mapping):
                parts.append(value.get(tail))
            else:
                try:
                    parts.append(getattr(value, tail, None))
                except Exception:
                    parts.append(None)
    return tuple(parts)


_Plan = tuple[tuple[str, tuple[str | None, ...]], ...]
_plans: dict[int, tuple[tuple[tuple[str, ...], ...], _Plan]] = {}


def _plan() -> _Plan:
    """:data:`FIELDS` grouped by their first attribute (each read once per node), rebuilt
    whenever ``FIELDS`` is replaced."""
    fields_ = FIELDS
    cached = _plans.get(id(fields_))
    if cached is not None and cached[0] is fields_:
        return cached[1]
    grouped: dict[str, list[str | None]] = {}
    for path in fields_:
        if len(path) > 2:
            raise ValueError(f"node field paths are one or two attributes long, got {path!r}")
        grouped.setdefault(path[0], []).append(path[1] if len(path) == 2 else None)
    plan = tuple((head, tuple(tails)) for head, tails in grouped.items())
    _plans.clear()
    _plans[id(fields_)] = (fields_, plan)
    return plan


def is_number(value: object) -> TypeGuard[int | float]:
    """A finite int or float that is not a bool."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def device(node: object) -> str | None:
    """A GPU id the node itself declares (``gpu_id``, ``device`` or ``gpu``), else ``None``."""
    if isinstance(node, str):
        return None
    for key in _DEVICE_KEYS:
        value = read(node, (key,))
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (str, int)) and str(value).strip():
            return str(value).strip()
    return None


def has_gpu(node: object) -> bool:
    """Whether the node reports running on a GPU (SynapticLlamas capabilities, mapping flags)."""
    if isinstance(node, str):
        return False
    if isinstance(node, Mapping):
        if node.get("gpu") is True or node.get("has_gpu") is True:
            return True
        count = node.get("gpu_count")
        return isinstance(count, int) and not isinstance(count, bool) and count > 0
    if read(node, ("has_gpu",)) is True or read(node, ("capabilities", "has_gpu")) is True:
        return True
    count = read(node, ("capabilities", "gpu_count"))
    return isinstance(count, int) and not isinstance(count, bool) and count > 0


def slots(node: object) -> int | None:
    """How many requests the node says its instance serves at once (``num_parallel`` on it, in
    its ``options`` or its ``capabilities``), else ``None``. Only a positive integer counts."""
    if isinstance(node, str):
        return None
    for path in _SLOT_PATHS:
        value = read(node, path)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None


def priority(node: object) -> int | None:
    """The node's own priority (SynapticLlamas ``OllamaNode.priority``), else ``None``."""
    if isinstance(node, str):
        return None
    value = read(node, ("priority",))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def latency(node: object, min_samples: int) -> float | None:
    """Seconds per request the node object itself reports, once it has ``min_samples``
    requests: SynapticLlamas ``metrics.avg_response_time`` (seconds) with
    ``metrics.total_requests``, SOLLOL ``metrics.avg_latency`` (milliseconds), or a mapping's
    ``latency_ms`` / ``avg_latency_ms`` / ``avg_response_time`` (with ``total_requests`` or
    ``requests`` when it gives one)."""
    if isinstance(node, str):
        return None
    if isinstance(node, Mapping):
        count = node.get("total_requests", node.get("requests"))
        if count is not None and not (is_number(count) and float(count) >= min_samples):
            return None
        for key, scale in (("latency_ms", 1e-3), ("avg_latency_ms", 1e-3),
                           ("avg_response_time", 1.0)):
            value = node.get(key)
            if is_number(value) and float(value) > 0:
                return float(value) * scale
        return None
    metrics = safe_getattr(node, "metrics")
    if metrics is None:
        return None
    count = read(metrics, ("total_requests",))
    if not is_number(count) or count < min_samples:
        return None
    seconds = read(metrics, ("avg_response_time",))
    if is_number(seconds) and seconds > 0:
        return float(seconds)
    millis = read(metrics, ("avg_latency",))
    if is_number(millis) and millis > 0:
        return float(millis) / 1000.0
    return None
