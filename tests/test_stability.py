"""Stability: hundreds of compile/run cycles of distinct loops in one process.

Each cycle compiles a new loop function (its own code and constants, so Dynamo traces it
and XLA compiles it anew) and checks its result against the plain Python loop on CPU;
Dynamo's caches are reset every so often, as a long-lived process might. Host memory
may grow only within a small bound once the process is warm, and nothing cached earlier
may change a later result: the loops compiled first are run again at the end, both the old compiled
functions (after resets) and fresh compiles of the same source.
"""
from __future__ import annotations

import gc
import linecache

import torch
import torch_xla
from loop_testing import to_device, xla_device
from test_fuzz import assert_close_by_dtype

import reference_loops
import xla_loop_backend

CYCLES = 500
WARM_UP = 100  # cycles before the memory baseline: caches and allocator pools fill first
# After warm-up, over the remaining 400 cycles. Measured: 81 MB (about 0.2 MB per compile,
# Dynamo's and torch_xla's own caches); 169 MB before dynamo_memory freed the guard
# managers Dynamo keeps alive.
MAX_GROWTH_MB = 120
RESET_EVERY = 37

_KINDS = {
    "while": (
        "def loop(n, x, w):\n"
        "    i0 = torch.zeros((), dtype=torch.int64, device=x.device)\n"
        "    return L.while_loop(lambda i, x: i < n, lambda i, x: (i + 1, torch.tanh(x @ w * {a} + {b})), (i0, x))[1]\n"
    ),
    "scan": (
        "def loop(n, x, w):\n"
        "    xs = torch.stack([x * {a}, x + {b}, x - {b}])\n"
        "    c, ys = L.scan(lambda c, y: (torch.tanh(c @ w + y), (c * {a}).sum()), x, xs)\n"
        "    return c + ys.sum() + n\n"
    ),
    "fori": (
        "def loop(n, x, w):\n"
        "    return L.fori_loop(0, n, lambda i, c: torch.sin(c @ w) * {a} + i * {b}, x)\n"
    ),
    "static fori": (
        "def loop(n, x, w):\n"
        "    return L.fori_loop(1, 4, lambda i, c: torch.cos(c * {a}) @ w + {b}, x) + n\n"
    ),
}


def _source(cycle: int) -> str:
    kind = list(_KINDS)[cycle % len(_KINDS)]
    return _KINDS[kind].format(a=1 + cycle / 1000, b=cycle / 10000)


def _function(source: str, loops: object) -> object:
    # A file name of its own, known to linecache: torch.compile wraps functions without
    # source in one shared frame, which would hit Dynamo's recompile limit.
    filename = f"<stability loop {abs(hash(source))}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace = {"torch": torch, "L": loops}
    exec(compile(source, filename, "exec"), namespace)
    return namespace["loop"]


def _arguments(cycle: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(cycle)
    width = 2 + cycle % 3
    return [torch.tensor(2 + cycle % 3), torch.randn(width, generator=gen), torch.randn(width, width, generator=gen) * 0.5]


def _run_and_check(compiled: object, source: str, cycle: int) -> None:
    args = _arguments(cycle)
    expected = _function(source, reference_loops)(*args)
    actual = compiled(*to_device(args, xla_device()))
    assert_close_by_dtype(to_device(actual, "cpu"), expected)


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_hundreds_of_compile_run_cycles_keep_memory_bounded_and_results_right():
    first = []
    baseline = None
    for cycle in range(CYCLES):
        if cycle and cycle % RESET_EVERY == 0:
            torch._dynamo.reset()
        source = _source(cycle)
        compiled = torch.compile(_function(source, xla_loop_backend), backend="xla_loop", fullgraph=True)
        _run_and_check(compiled, source, cycle)
        if cycle < 4:
            first.append((compiled, source, cycle))
        if cycle == WARM_UP:
            gc.collect()
            torch_xla.sync()
            baseline = _rss_mb()
    gc.collect()
    growth = _rss_mb() - baseline
    print(f"RSS growth over cycles {WARM_UP}..{CYCLES}: {growth:.0f} MB")  # noqa: T201
    # Nothing stale: the first loops, both as compiled then (their caches reset since) and
    # compiled again now, still give the right results.
    for compiled, source, cycle in first:
        _run_and_check(compiled, source, cycle)
        fresh = torch.compile(_function(source, xla_loop_backend), backend="xla_loop", fullgraph=True)
        _run_and_check(fresh, source, cycle)
    assert growth < MAX_GROWTH_MB, f"host memory grew {growth:.0f} MB over {CYCLES - WARM_UP} compile/run cycles (bound {MAX_GROWTH_MB} MB)"
