"""What the torch and JAX workers share: workload sizes, inputs, the timing protocol, output.

Pure Python + numpy, so that both the torch venv and the JAX venv can import it (torch and
JAX each bring their own XLA and never share a process). Inputs come from numpy with fixed
seeds, so every system computes on the same numbers and the report can compare checksums.
"""
from __future__ import annotations

import json
import math
import resource
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

# Workload sizes. A, B: h = tanh(h @ w) n times. C: RNN over a sequence (scan). D: damped
# fixed-point iteration x <- x - ALPHA (x - cos x) until max |step| < TOL (the trip count
# depends on the data). E: forward + backward of the RNN loss through the loop.
AB_SHAPES = {"A": (64, 256), "B": (8, 32)}
RNN_BATCH, RNN_FEATURES, RNN_HIDDEN = 16, 32, 64
D_SHAPE, D_ALPHA, D_TOL, D_MAX_ITERATIONS = (64, 256), 0.01, 1e-6, 100_000

WORKLOAD_TITLES = {
    "A": "A: h = tanh(h @ w), h[64,256] (compute-bound)",
    "B": "B: h = tanh(h @ w), h[8,32] (overhead-bound)",
    "C": f"C: RNN tanh(x_t @ wx + h @ wh), batch {RNN_BATCH}, hidden {RNN_HIDDEN} (scan)",
    "D": f"D: x <- x - {D_ALPHA}(x - cos x) on [64,256] until max|step| < {D_TOL:g} (data-dependent while)",
    "E": "E: training step (forward + backward) of the RNN loss through the loop",
}
# What "iterations" means for per-iteration time: trip count (A, B, D), sequence length (C, E).
ITERATION_UNIT = {"A": "trip", "B": "trip", "C": "step", "D": "trip", "E": "step"}


def ab_inputs(workload: str) -> tuple[np.ndarray, np.ndarray]:
    """h, w for A/B. w = 1.3 randn / sqrt(d): h stays around 0.4 for 10000 steps, neither
    chaotic (float32 results of different systems agree to ~1e-4) nor decaying to zero
    (gain 1 sends B into denormals, which slows eager CPU down for reasons that have
    nothing to do with loops)."""
    rows, d = AB_SHAPES[workload]
    rng = np.random.default_rng(0)
    h = rng.standard_normal((rows, d)).astype(np.float32)
    w = (1.3 * rng.standard_normal((d, d)) / math.sqrt(d)).astype(np.float32)
    return h, w


def rnn_inputs(steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """h0 [batch, hidden], xs [steps, batch, features], wx, wh."""
    rng = np.random.default_rng(1)
    h0 = np.zeros((RNN_BATCH, RNN_HIDDEN), np.float32)
    xs = rng.standard_normal((steps, RNN_BATCH, RNN_FEATURES)).astype(np.float32)
    wx = (rng.standard_normal((RNN_FEATURES, RNN_HIDDEN)) / math.sqrt(RNN_FEATURES)).astype(np.float32)
    wh = (rng.standard_normal((RNN_HIDDEN, RNN_HIDDEN)) / math.sqrt(RNN_HIDDEN)).astype(np.float32)
    return h0, xs, wx, wh


def d_inputs() -> np.ndarray:
    """x0 uniform in [-3, 3]: about 600 damped steps to converge."""
    return np.random.default_rng(2).uniform(-3.0, 3.0, D_SHAPE).astype(np.float32)


def emit(record: dict[str, Any]) -> None:
    """One JSON line per event; the driver keeps the last of each kind (a worker killed at
    the cap still leaves its first-call line behind)."""
    print("BENCH " + json.dumps(record), flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(
    call: Callable[[], Any],
    wait: Callable[[Any], None],
    summarize: Callable[[Any], dict[str, Any]],
    *,
    deadline: float,
    steady_budget_s: float,
    max_repeats: int,
    counters: tuple[Callable[[], None], Callable[[], dict[str, float]]] | None = None,
    stages: Callable[[], dict[str, float]] | None = None,
    base: dict[str, Any],
) -> None:
    """Time call(): the first call (compile included), one warm-up call (some systems compile
    again on the second call, e.g. xla_loop's training step), then the median of repeated calls on the same inputs.

    wait(result) blocks until the work is done, without reading anything back where it can
    (so a system's own host transfers are what the counters see). summarize(result) runs once,
    untimed, after the first call: {"checksum": ..., maybe "trip_count": ...}.
    counters = (clear, read) gives compile/sync counts of the first call and per call over
    the repeated calls. stages() (optional) splits the first call: {stage: seconds}.
    Repeats shrink to what fits before the deadline (monotonic seconds).
    """
    if counters:
        counters[0]()
    start = time.perf_counter()
    result = call()
    wait(result)
    first = time.perf_counter() - start
    first_counts = counters[1]() if counters else {}
    first_stages = {"first_call_stages": stages()} if stages else {}  # (before summarize, which compiles)
    record = {**base, **summarize(result), "first_call_s": first, "first_call_counts": first_counts,
              "peak_rss_mb": peak_rss_mb(), **first_stages}
    emit({**record, "event": "first_call"})

    # the warm-up may pass the deadline (the driver then kills us and keeps the line above)
    start = time.perf_counter()
    wait(call())
    warm = time.perf_counter() - start
    budget = min(steady_budget_s, deadline - time.monotonic() - 1.0)
    repeats = max(1, min(max_repeats, int(budget / max(warm, 1e-6))))
    if counters:
        counters[0]()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        wait(call())
        times.append(time.perf_counter() - start)
    counts = {k: v / repeats for k, v in counters[1]().items()} if counters else {}
    emit({
        **record,
        "event": "result",
        "second_call_s": warm,
        "steady_s": statistics.median(times),
        "steady_min_s": min(times),
        "repeats": repeats,
        "per_call": counts,
        "peak_rss_mb": peak_rss_mb(),
    })


def worker_main(run: Callable[..., None]) -> None:
    """CLI shared by the workers: --system S --workload W --trips N --deadline-s X
    --steady-budget-s Y --max-repeats R. Errors become a result line with the error."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--system", required=True)
    p.add_argument("--workload", required=True)
    p.add_argument("--trips", type=int, default=0)
    p.add_argument("--deadline-s", type=float, default=60.0)
    p.add_argument("--steady-budget-s", type=float, default=3.0)
    p.add_argument("--max-repeats", type=int, default=20)
    a = p.parse_args()
    deadline = time.monotonic() + a.deadline_s - 1.0
    base = {"system": a.system, "workload": a.workload, "trips": a.trips}
    try:
        run(a.system, a.workload, a.trips, base=base, deadline=deadline,
            steady_budget_s=a.steady_budget_s, max_repeats=a.max_repeats)
    except Exception as e:  # noqa: BLE001 - the error is the measurement
        import traceback

        traceback.print_exc()
        lines = [line.strip() for line in str(e).splitlines() if line.strip()][:3]
        emit({**base, "event": "result", "error": f"{type(e).__name__}: {' / '.join(lines)}"[:400],
              "peak_rss_mb": peak_rss_mb()})
        sys.exit(0)
