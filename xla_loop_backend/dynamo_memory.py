"""Frees Dynamo's guard managers once their compiled code is gone (torch 2.9 keeps them).

Each frame Dynamo compiles gets a `CheckFunctionManager`, which holds the frame's guard
tree, its globals and its closure variables. For every object a guard matches by identity
(a module, a function's ``__code__``, ``torch.tanh``...) it registers
``weakref.finalize(obj, manager.invalidate)``, and that finalizer keeps the manager alive as
long as the object lives. The objects are mostly immortal, so the manager outlives its
cache entry, through ``torch._dynamo.reset()`` and the death of the compiled function alike.
A loop program inlines xla_loop's API and pytree code, so its frame matches some 80 such
objects and leaks about 0.3 MB per compiled frame (tests/test_stability.py measured it).

Once a manager's cache entry is destroyed, Dynamo sets its ``cache_entry`` to None and
`invalidate` has nothing left to do: such finalizers can be detached, and the manager is
freed. The backend does this before each compile (when the finalizer registry has grown),
at a point where no other frame is between building its manager and entering the cache.
If torch's internals differ from what this expects, nothing is touched.
"""
from __future__ import annotations

import logging
import weakref
from typing import Any

log = logging.getLogger(__name__)

_PRUNE_AFTER_GROWTH = 500  # new finalizers since the last pass before scanning again
_registry_size_after_last_pass = 0


def release_dead_guard_managers(force: bool = False) -> int:
    """Detach the finalizers that only keep dead guard managers alive; returns how many."""
    global _registry_size_after_last_pass
    registry = getattr(weakref.finalize, "_registry", None)
    if not isinstance(registry, dict):
        return 0
    if not force and len(registry) - _registry_size_after_last_pass < _PRUNE_AFTER_GROWTH:
        return 0
    try:
        from torch._dynamo.guards import CheckFunctionManager
    except ImportError:
        return 0
    released = 0
    for finalizer, info in list(registry.items()):
        manager = _manager_invalidated_by(info, CheckFunctionManager)
        if manager is not None and _cache_entry_is_gone(manager):
            finalizer.detach()
            released += 1
    _registry_size_after_last_pass = len(registry)
    if released:
        log.debug("released %d guard-manager finalizers of dead Dynamo cache entries", released)
    return released


def _manager_invalidated_by(info: Any, manager_type: type) -> Any:
    """The CheckFunctionManager whose `invalidate` this finalizer calls, or None."""
    func = getattr(getattr(info, "func", None), "func", None)  # functools.partial(manager.invalidate, ...)
    manager = getattr(func, "__self__", None)
    if isinstance(manager, manager_type) and getattr(func, "__name__", None) == "invalidate":
        return manager
    return None


def _cache_entry_is_gone(manager: Any) -> bool:
    guard_manager = getattr(manager, "guard_manager", None)
    return guard_manager is not None and hasattr(guard_manager, "cache_entry") and guard_manager.cache_entry is None
