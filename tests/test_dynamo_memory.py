"""dynamo_memory.py: guard managers of dead cache entries are freed; live ones are kept."""
from __future__ import annotations

import gc
import linecache
import weakref

import torch
from loop_testing import xla_device
from torch._dynamo.guards import CheckFunctionManager

import xla_loop_backend
from xla_loop_backend.dynamo_memory import release_dead_guard_managers


def _loop_function(k: int):
    source = (
        "def loop(n, x):\n"
        "    i0 = torch.zeros((), dtype=torch.int64, device=x.device)\n"
        f"    return L.while_loop(lambda i, x: i < n, lambda i, x: (i + 1, torch.tanh(x * {1 + k / 10})), (i0, x))[1]\n"
    )
    filename = f"<dynamo memory loop {k}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace = {"torch": torch, "L": xla_loop_backend}
    exec(compile(source, filename, "exec"), namespace)
    return namespace["loop"]


def _managers() -> list[CheckFunctionManager]:
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is CheckFunctionManager]


def _invalidating_finalizers() -> int:
    count = 0
    for info in weakref.finalize._registry.values():
        func = getattr(info.func, "func", None)
        count += isinstance(getattr(func, "__self__", None), CheckFunctionManager)
    return count


def test_managers_of_reset_entries_are_freed_and_live_ones_kept():
    torch._dynamo.reset()
    release_dead_guard_managers(force=True)
    dev = xla_device()
    n, x = torch.tensor(3).to(dev), torch.ones(4).to(dev)
    compiled = [torch.compile(_loop_function(k), backend="xla_loop", fullgraph=True) for k in range(4)]
    for f in compiled:
        f(n, x)
    assert len(_managers()) >= 4
    torch._dynamo.reset()
    # Dynamo alone keeps them: their finalizers on immortal objects (modules, code) hold them.
    assert len(_managers()) >= 4

    assert release_dead_guard_managers(force=True) > 0
    assert _managers() == []

    # A live entry keeps its manager and its invalidation finalizers, and stays cached.
    live = torch.compile(_loop_function(9), backend="xla_loop", fullgraph=True)
    live(n, x)
    finalizers = _invalidating_finalizers()
    assert finalizers > 0
    assert release_dead_guard_managers(force=True) == 0
    assert len(_managers()) == 1 and _invalidating_finalizers() == finalizers
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    live(n, x)
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames, "the live entry was recompiled"
