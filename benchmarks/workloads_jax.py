"""JAX worker: the same workloads with lax.fori_loop / while_loop / scan under jax.jit.

Runs in its own venv (benchmarks/.venv-jax, made by suite.py): JAX and torch_xla each bring
their own XLA, so they never share a process. The trip count of A/B is a traced argument
(fori_loop with traced bounds is a while_loop), so one executable serves every trip count,
as for xla_loop. Host transfers are not counted (n/a); compiles: the first call compiles,
the counters report jit cache misses during the repeated calls.

Run by hand:  benchmarks/.venv-jax/bin/python benchmarks/workloads_jax.py --system jax --workload B --trips 100
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import _common as C  # noqa: E402


def build(workload: str, trips: int) -> tuple[Callable[[], Any], Callable[[Any], dict]]:
    if workload in ("A", "B"):
        h, w = map(jnp.asarray, C.ab_inputs(workload))
        n = jnp.asarray(trips, dtype=jnp.int32)
        f = jax.jit(lambda n, h, w: lax.fori_loop(0, n, lambda i, h: jnp.tanh(h @ w), h))
        return (lambda: f(n, h, w)), (lambda out: {"checksum": float(out.astype(jnp.float32).sum())})

    if workload in ("C", "E"):
        h0, xs, wx, wh = map(jnp.asarray, C.rnn_inputs(trips))

        def rnn(h0, xs, wx, wh):
            def step(h, x):
                h = jnp.tanh(x @ wx + h @ wh)
                return h, h
            return lax.scan(step, h0, xs)

        if workload == "C":
            f = jax.jit(rnn)
            return (lambda: f(h0, xs, wx, wh)), (lambda out: {"checksum": float(out[0].sum()) + float(out[1].sum())})

        def loss(wx, wh):
            h, ys = rnn(h0, xs, wx, wh)
            return jnp.mean(ys**2) + jnp.mean(h**2)

        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

        def summarize(out):
            value, (gx, gh) = out
            return {"checksum": float(value) + float(jnp.abs(gx).sum()) + float(jnp.abs(gh).sum())}

        return (lambda: f(wx, wh)), summarize

    if workload == "D":
        x0 = jnp.asarray(C.d_inputs())

        def prog(x):
            def body(state):
                i, x, _ = state
                step = C.D_ALPHA * (x - jnp.cos(x))
                return i + 1, x - step, jnp.abs(step).max()

            def cond(state):
                i, _, delta = state
                return (delta > C.D_TOL) & (i < C.D_MAX_ITERATIONS)

            return lax.while_loop(cond, body, (jnp.int32(0), x, jnp.float32(jnp.inf)))

        f = jax.jit(prog)
        return (lambda: f(x0)), (lambda out: {"trip_count": int(out[0]), "checksum": float(out[1].sum())})
    raise ValueError(f"unknown workload {workload}")


def run(system: str, workload: str, trips: int, *, base: dict, **kw: Any) -> None:
    if system != "jax":
        raise ValueError(f"unknown system {system}")
    misses = []

    def clear() -> None:
        misses.clear()

    def read() -> dict[str, float]:
        return {"compiles": len(misses)}

    # jit cache misses ("tracing cache miss" / backend compile events) during the repeats
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_a, **_k: misses.append(event) if event.endswith("backend_compile_duration") else None)
    base = {**base, "rss_before_mb": C.peak_rss_mb(), "versions": {"jax": jax.__version__}}
    import jaxlib

    base["versions"]["jaxlib"] = jaxlib.__version__
    call, summarize = build(workload, trips)
    C.measure(call, lambda out: jax.block_until_ready(out), summarize, base=base, counters=(clear, read), **kw)


if __name__ == "__main__":
    C.worker_main(run)
