"""``sollol_locality.install()``: locality-aware answers for SOLLOL objects you do not construct.

::

    import sollol_locality

    sollol_locality.install()                # explicit opt-in; importing does nothing
    pool = OllamaPool(nodes=...)             # built by code you do not own
    pool.should_use_parallel_execution(3)    # answered by the locality planner
    sollol_locality.uninstall()              # SOLLOL's own methods are back, by identity

    with sollol_locality.install():          # or for a block only
        ...

``install()`` patches the *classes*, so instances that already exist change too:

* ``sollol.pool.OllamaPool``: ``count_unique_physical_hosts()`` and
  ``should_use_parallel_execution(num_tasks)`` become :class:`LocalityAwarePoolMixin`'s functions;
  so do ``_normalize_node()`` and ``_deduplicate_nodes()``, so that pools built afterwards parse
  ``[::1]:11434`` and keep one machine's instances on different ports.
* ``sollol.integration.SOLLOLLoadBalancer``: ``should_use_parallel()`` and
  ``suggest_execution_mode()`` run :class:`LocalityAwareLoadBalancer`'s methods for the patched
  balancer (both gain an optional ``num_tasks``).

Patched objects decide with one shared :class:`~sollol_locality.decider.Decider` (one
:class:`ExecutionPlanner`: one DNS cache, one calibration; one log memory; one in-flight count),
built from ``install(config)`` or around ``install(planner=...)``; each patched class carries it
as a class attribute while installed. Instances of the locality
classes themselves (:class:`LocalityAwarePool`, :class:`LocalityAwareLoadBalancer`, any
:class:`LocalityAwareMixin`) keep their own planner.

Before patching anything, ``install()`` checks that every method exists with the signature this
integration was written against; an incompatible SOLLOL raises :class:`LocalityError` naming the
class, the method and the SOLLOL version found, and nothing is patched. ``install()`` and
``uninstall()`` are idempotent and thread-safe; ``uninstall()`` puts back the exact original
objects (or removes the attribute when the method was inherited).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from ._errors import LocalityError
from .config import LocalityConfig
from .decider import INSTALLED_KEY, Decider, installed_decider
from .mixin import LocalityAwareMixin
from .planner import ExecutionPlanner
from .pool import LocalityAwarePoolMixin

__all__ = ["TESTED_SOLLOL_VERSIONS", "Installation", "install", "is_installed", "uninstall"]

logger = logging.getLogger(__name__)

TESTED_SOLLOL_VERSIONS: Final = ("0.9.66",)
"""SOLLOL releases this integration is tested with."""

_MISSING: Final[Any] = object()


@dataclass(frozen=True, slots=True)
class _Method:
    name: str
    parameters: tuple[str, ...]
    required: bool  # a private start-up step SOLLOL may drop is optional; a changed one is not


@dataclass(frozen=True, slots=True)
class _Target:
    module: str
    cls: str
    methods: tuple[_Method, ...]


_TARGETS: Final = (
    _Target("sollol.pool", "OllamaPool", (
        _Method("count_unique_physical_hosts", ("self",), True),
        _Method("should_use_parallel_execution", ("self", "num_tasks"), True),
        _Method("_normalize_node", ("self", "node"), False),
        _Method("_deduplicate_nodes", ("self",), False),
    )),
    _Target("sollol.integration", "SOLLOLLoadBalancer", (
        _Method("should_use_parallel", ("self",), True),
        _Method("suggest_execution_mode", ("self",), True),
    )),
)


@dataclass(frozen=True, slots=True)
class _Patch:
    cls: type
    name: str
    original: Any  # the raw class __dict__ entry, or _MISSING when the method was inherited
    replacement: Callable[..., Any]


@dataclass(frozen=True, slots=True)
class _Active:
    patches: tuple[_Patch, ...]
    decider: Decider
    classes: tuple[type, ...]
    sollol_version: str


_LOCK = threading.RLock()
_ACTIVE: _Active | None = None


# -- the patched balancer methods (the pool's are LocalityAwarePoolMixin's own functions) ----


def _balancer_decision(balancer: Any) -> tuple[Decider, list[Any]]:
    """The decider and the candidates a patched balancer answers with."""
    if isinstance(balancer, LocalityAwareMixin):
        return balancer.decider, balancer._locality_candidates(None)
    registry = getattr(balancer, "registry", None)
    if registry is None or not hasattr(registry, "get_healthy_nodes"):
        raise LocalityError(f"{type(balancer).__name__} has no registry with "
                            "get_healthy_nodes()")
    return installed_decider(balancer), list(registry.get_healthy_nodes())


def _should_use_parallel(self: Any, num_tasks: int | None = None) -> bool:
    """Locality-aware (sollol_locality.install()): whether parallel execution is predicted to be
    faster for ``num_tasks`` tasks (default: one per healthy node, at least two)."""
    decider, nodes = _balancer_decision(self)
    return decider.should_use_parallel(nodes, num_tasks)


def _suggest_execution_mode(self: Any, num_tasks: int | None = None) -> str:
    """Locality-aware (sollol_locality.install()): ``"parallel_multi_node"``, ``"parallel"`` or
    ``"sequential"`` from the locality plan."""
    decider, nodes = _balancer_decision(self)
    return decider.suggest_execution_mode(nodes, num_tasks)


_should_use_parallel.__name__ = _should_use_parallel.__qualname__ = "should_use_parallel"
_suggest_execution_mode.__name__ = "suggest_execution_mode"
_suggest_execution_mode.__qualname__ = "suggest_execution_mode"


def _replacement(target: _Target, name: str) -> Callable[..., Any]:
    if target.cls == "OllamaPool":
        return LocalityAwarePoolMixin.__dict__[name]  # type: ignore[no-any-return]
    return {"should_use_parallel": _should_use_parallel,
            "suggest_execution_mode": _suggest_execution_mode}[name]


# -- public API ------------------------------------------------------------------------------


class Installation:
    """What :func:`install` did. As a context manager it restores the state it found: it
    uninstalls on exit only if this very call installed (and that installation is still active).
    """

    __slots__ = ("_active", "_owner")

    def __init__(self, active: _Active, owner: bool) -> None:
        self._active = active
        self._owner = owner

    @property
    def active(self) -> bool:
        """Whether this installation is still in force."""
        return _ACTIVE is self._active

    @property
    def planner(self) -> ExecutionPlanner:
        """The planner patched pools and balancers decide with."""
        return self._active.decider.planner

    @property
    def decider(self) -> Decider:
        """The decider patched pools and balancers share."""
        return self._active.decider

    @property
    def sollol_version(self) -> str:
        """The SOLLOL version that was patched."""
        return self._active.sollol_version

    def uninstall(self) -> bool:
        """Undo this installation if it is still in force (see :func:`uninstall`)."""
        return _uninstall(self._active)

    def __enter__(self) -> Installation:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._owner:
            _uninstall(self._active)

    def __repr__(self) -> str:
        state = "active" if self.active else "inactive"
        return f"<sollol_locality Installation {state}, SOLLOL {self.sollol_version}>"


def install(config: LocalityConfig | None = None, *,
            planner: ExecutionPlanner | None = None) -> Installation:
    """Make ``OllamaPool`` and ``SOLLOLLoadBalancer`` (classes and existing instances) answer
    their parallelism questions from the locality planner. Idempotent and thread-safe.

    Args:
        config: settings for the shared planner (read from the environment by
            ``LocalityConfig.from_env()`` when omitted).
        planner: an existing :class:`ExecutionPlanner` to share instead.

    Returns:
        An :class:`Installation`, also a context manager (``with install(): ...``). When already
        installed, the existing installation's handle (its exit does not uninstall).

    Raises:
        LocalityError: SOLLOL cannot be imported, or a method is missing or has an unexpected
            signature; the message names the class, the method and the SOLLOL version found.
            Nothing is patched then.
    """
    global _ACTIVE
    with _LOCK:
        if _ACTIVE is not None:
            if config is not None or planner is not None:
                logger.warning("sollol_locality is already installed; its configuration stays in "
                               "force (call uninstall() first to change it)",
                               extra={"event": "install_repeated"})
            return Installation(_ACTIVE, owner=False)
        version, patches = _prepare()
        decider = Decider(config, planner=planner)
        classes = tuple(dict.fromkeys(p.cls for p in patches))
        active = _Active(patches, decider, classes, version)
        for cls in classes:
            setattr(cls, INSTALLED_KEY, decider)
        for patch in patches:
            setattr(patch.cls, patch.name, patch.replacement)
        _ACTIVE = active
    logger.info("sollol_locality installed on SOLLOL %s: %s answer from the locality planner",
                version, ", ".join(f"{p.cls.__name__}.{p.name}" for p in patches),
                extra={"event": "installed", "sollol_version": version})
    return Installation(active, owner=True)


def uninstall() -> bool:
    """Put SOLLOL's original methods back (the same objects). Idempotent and thread-safe.

    Returns:
        Whether anything was installed.
    """
    with _LOCK:
        active = _ACTIVE
        return active is not None and _uninstall(active)


def is_installed() -> bool:
    """Whether :func:`install` is in force."""
    return _ACTIVE is not None


# -- internals -------------------------------------------------------------------------------


def _uninstall(active: _Active) -> bool:
    global _ACTIVE
    with _LOCK:
        if _ACTIVE is not active:
            return False
        for patch in reversed(active.patches):
            current = patch.cls.__dict__.get(patch.name, _MISSING)
            if current is not patch.replacement:
                logger.warning("%s.%s was replaced after sollol_locality.install(); restoring "
                               "SOLLOL's original anyway", patch.cls.__name__, patch.name,
                               extra={"event": "uninstall_overwrote"})
            if patch.original is _MISSING:
                if patch.name in patch.cls.__dict__:
                    delattr(patch.cls, patch.name)
            else:
                setattr(patch.cls, patch.name, patch.original)
        for cls in active.classes:
            if cls.__dict__.get(INSTALLED_KEY) is active.decider:
                delattr(cls, INSTALLED_KEY)
        _ACTIVE = None
    active.decider.close()
    logger.info("sollol_locality uninstalled: SOLLOL %s's own methods restored",
                active.sollol_version, extra={"event": "uninstalled"})
    return True


def _sollol_version() -> str:
    module = sys.modules.get("sollol")
    version = getattr(module, "__version__", None)
    if isinstance(version, str) and version:
        return version
    try:
        return importlib.metadata.version("sollol")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _prepare() -> tuple[str, tuple[_Patch, ...]]:
    """Import and check every target; the patches to apply, or LocalityError naming each
    incompatibility."""
    classes: list[tuple[_Target, type]] = []
    for target in _TARGETS:
        try:
            module = importlib.import_module(target.module)
        except ImportError as exc:
            raise LocalityError(
                f"sollol_locality.install() cannot import {target.module} (SOLLOL "
                f"{_sollol_version()}): {exc}") from exc
        classes.append((target, getattr(module, target.cls, _MISSING)))
    version = _sollol_version()
    tested = ", ".join(TESTED_SOLLOL_VERSIONS)
    problems: list[str] = []
    patches: list[_Patch] = []
    for target, cls in classes:
        qualified = f"{target.module}.{target.cls}"
        if not isinstance(cls, type):
            problems.append(f"{qualified} is missing")
            continue
        for method in target.methods:
            replacement = _replacement(target, method.name)
            found = inspect.getattr_static(cls, method.name, _MISSING)
            if found is _MISSING:
                if method.required:
                    problems.append(f"{qualified} has no method {method.name}()")
                else:
                    logger.info("%s has no %s(); that start-up step is not patched", qualified,
                                method.name, extra={"event": "install_step_absent"})
                continue
            problem = _signature_problem(qualified, method, found, replacement)
            if problem:
                problems.append(problem)
                continue
            patches.append(_Patch(cls, method.name, cls.__dict__.get(method.name, _MISSING),
                                  replacement))
    if problems:
        raise LocalityError(
            f"SOLLOL {version} is not compatible with sollol_locality.install(): "
            + "; ".join(problems) + f" (tested with SOLLOL {tested}). Nothing was patched; "
            "use LocalityAwarePool / LocalityAwareLoadBalancer or the ExecutionPlanner directly.")
    return version, tuple(patches)


def _signature_problem(qualified: str, method: _Method, found: Any,
                       replacement: Callable[..., Any]) -> str | None:
    where = f"{qualified}.{method.name}"
    if found is replacement:
        return (f"{where} is already sollol_locality's (patched by another copy of "
                "sollol_locality, e.g. a reloaded module)")
    if not inspect.isfunction(found):
        return f"{where} is a {type(found).__name__}, expected a plain method"
    signature = inspect.signature(found)
    parameters = list(signature.parameters.values())
    names = tuple(p.name for p in parameters)
    if names != method.parameters or any(
            p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters):
        return (f"{where}{signature} has an unexpected signature (expected "
                f"({', '.join(method.parameters)}))")
    return None
