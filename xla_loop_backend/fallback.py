"""No silent host loops: a warning whenever a loop runs as a per-iteration Python loop.

That happens when xla_loop cannot lower a loop (without fullgraph=True), and when a
while_loop on XLA tensors runs outside a compiled graph (an eager call, or a Dynamo graph
break around the loop). For the latter we register an XLA-key implementation of the
while_loop op that warns, then runs torch's own dense (host-loop) implementation.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch._C import DispatchKey
from torch._higher_order_ops.while_loop import while_loop_dense, while_loop_op

from . import metrics

class LoopFallbackWarning(UserWarning):
    """A loop runs as a per-iteration host loop instead of one XLA While."""


def warn_host_loop(why: str) -> None:
    metrics.increment(metrics.HOST_LOOP_FALLBACKS)
    warnings.warn(
        f"xla_loop: {why}; the loop runs as a Python loop with host syncs every iteration.",
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


def install_eager_warning() -> None:
    """Register the warning XLA implementation once (and never over another one)."""
    if DispatchKey.XLA not in while_loop_op.py_kernels:
        while_loop_op.py_impl(DispatchKey.XLA)(_while_loop_on_xla_outside_graph)


