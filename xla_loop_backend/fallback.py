"""No silent host loops: a warning whenever a loop runs as a per-iteration Python loop.

That happens when xla_loop cannot lower a loop (without fullgraph=True), and when torch's
loop ops run on XLA tensors outside a compiled graph (an eager call, or a Dynamo graph break
around the loop). For the latter we register XLA-key implementations of the loop ops that
warn, then run torch's own implementation: a host loop for while_loop; for scan and map an
unrolled graph, whose compile time grows with the length. (`xla_loop_backend.while_loop`,
`scan` and `fori_loop` compile themselves when called eagerly, so they do not get here.)
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

from torch._C import DispatchKey
from torch._higher_order_ops.map import map_impl
from torch._higher_order_ops.scan import scan_op
from torch._higher_order_ops.while_loop import while_loop_dense, while_loop_op

from . import metrics
from .explain import record

_LOG = logging.getLogger(__name__)


class LoopFallbackWarning(UserWarning):
    """A loop runs as a per-iteration host loop instead of one XLA While."""


def warn_host_loop(why: str, kind: str = "a Python loop with host syncs every iteration") -> None:
    metrics.increment(metrics.HOST_LOOP_FALLBACKS)
    record(_LOG, "fallback", f"fallback: {why}; the loop runs as {kind}", why=f"{why}; the loop runs as {kind}")
    warnings.warn(
        f"xla_loop: {why}; the loop runs as {kind}.",
        LoopFallbackWarning,
        stacklevel=3,
    )


def _while_loop_on_xla_outside_graph(
    cond_fn: Any, body_fn: Any, carried_inputs: Any, additional_inputs: Any, stack_output: bool = False
) -> Any:
    warn_host_loop(
        "a while_loop on XLA tensors ran outside a compiled graph (called eagerly, or Dynamo "
        "broke the graph around it; compile with backend='xla_loop', fullgraph=True to see why)"
    )
    return while_loop_dense(cond_fn, body_fn, carried_inputs, additional_inputs, stack_output)


def _unrolled_on_xla_outside_graph(op: Any) -> Any:
    composite = op.py_kernels[DispatchKey.CompositeExplicitAutograd]

    def warn_then_unroll(*args: Any, **kwargs: Any) -> Any:
        warn_host_loop(
            f"a {op.__name__} on XLA tensors ran outside a compiled graph, so it is unrolled "
            "(compile time grows with its length; use xla_loop_backend.scan or compile with "
            "backend='xla_loop', fullgraph=True)",
            kind="unrolled into the graph, one copy of the body per step",
        )
        return composite(*args, **kwargs)

    return warn_then_unroll


def remove_eager_while_loop_kernel() -> None:
    """Take back the XLA kernel of torch's while_loop registered below (torch allows one
    registration, and torch_xla's fori_loop module makes its own at import)."""
    if while_loop_op.py_kernels.get(DispatchKey.XLA) is _while_loop_on_xla_outside_graph:
        del while_loop_op.py_kernels[DispatchKey.XLA]
        while_loop_op._dispatch_cache.clear()


def install_eager_warning() -> None:
    """Register the warning XLA implementations once (and never over other ones)."""
    if DispatchKey.XLA not in while_loop_op.py_kernels:
        while_loop_op.py_impl(DispatchKey.XLA)(_while_loop_on_xla_outside_graph)
    for op in (scan_op, map_impl):
        if DispatchKey.XLA not in op.py_kernels:
            op.py_impl(DispatchKey.XLA)(_unrolled_on_xla_outside_graph(op))


