"""Before AOTAutograd: while_loops that may be trained through, or that have a bound.

A while_loop that may be differentiated (`Site.may_need_grad`) becomes a call of
`trained_while`; with `max_iterations`, every while_loop becomes a call of `bounded_while`.
Both take the loop's operands; when AOTAutograd traces the graph, the call decides what
the loop is:

- differentiated (an operand requires grad): `CheckpointedWhile` (`checkpointed_while.py`),
  the loop with its real trip count that keeps `checkpoints` copies of its carries for its
  backward While, in fixed memory, whatever the trip count;
- otherwise: the loop as it is (`bounded_while`: with an iteration counter).

`bounded_while` also returns a *report*: a 0-dim int64, `max_iterations + 1` when the loop
was still running after `max_iterations` iterations, else 0 (at least its inner loops'
reports). The `reports` pass carries the reports of inner loops out of their enclosing
loops to the graph's output; the call-time wrapper (`call.ReportingCall`) reads the largest
once per call and raises. A trained loop without a bound reports nothing: nothing of it is
read back to the host.

Other while_loops stay torch's op and are lowered as they are.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch._higher_order_ops.while_loop import while_loop_op

from ..ops import loop_device, register
from ..options import PassContext
from ..traversal import GraphPass, Site, replace_call, unchanged
from .checkpointed_while import CheckpointedWhile, CheckpointSpec, LoopFunctions


def bounded_while(
    cond_fn: Any,
    body_fn: Any,
    carried_inputs: Sequence[Any],
    additional_inputs: Sequence[Any],
    *,
    max_iterations: int,
    may_train: bool = False,
    checkpoints: int = 0,
    body_reports: bool = False,
) -> tuple[Any, ...]:
    """The while_loop, returning (*final carries, report); see the module docstring."""
    carries, captured = tuple(carried_inputs), tuple(additional_inputs)
    loop = LoopFunctions(cond_fn, body_fn, len(carries), body_reports)
    operands = (*carries, *captured)
    if may_train and _differentiated(operands):
        # (Python int carries never get here: torch 2.9's Dynamo fails on them when a loop
        # needs gradients, before any backend runs.)
        spec = CheckpointSpec(loop, checkpoints, max_iterations)
        return CheckpointedWhile.apply(spec, *operands)
    return _counted_while(loop, carries, captured, max_iterations)


def trained_while(
    cond_fn: Any,
    body_fn: Any,
    carried_inputs: Sequence[Any],
    additional_inputs: Sequence[Any],
    *,
    checkpoints: int,
) -> tuple[Any, ...]:
    """A while_loop that may be trained, with no bound: its final carries (no report)."""
    carries, captured = tuple(carried_inputs), tuple(additional_inputs)
    operands = (*carries, *captured)
    if _differentiated(operands):
        spec = CheckpointSpec(LoopFunctions(cond_fn, body_fn, len(carries), False), checkpoints, None)
        return tuple(CheckpointedWhile.apply(spec, *operands)[:-1])
    return tuple(while_loop_op(cond_fn, body_fn, carries, captured))


def _differentiated(operands: tuple) -> bool:
    """Whether autograd records this call: grad mode on and an operand requiring grad."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in operands)


register(bounded_while, torch.ops.higher_order.while_loop)
register(trained_while, torch.ops.higher_order.while_loop)


def _counted_while(loop: LoopFunctions, carries: tuple, captured: tuple, max_iterations: int) -> tuple[Any, ...]:
    device = loop_device((*carries, *captured))
    zero = torch.zeros((), dtype=torch.int64, device=device)
    nc = loop.num_carries

    def cond(count: torch.Tensor, inner: torch.Tensor, *state: Any) -> Any:
        return (count < max_iterations) & loop.cond(state[:nc], state[nc:])

    def body(count: torch.Tensor, inner: torch.Tensor, *state: Any) -> tuple[Any, ...]:
        new, inner_report = loop.step(state[:nc], state[nc:])
        inner = inner.clone() if inner_report is None else torch.maximum(inner, inner_report)
        return (count + 1, inner, *new)

    count, inner, *final = while_loop_op(cond, body, (zero, zero.clone(), *carries), captured)
    ran_out = (count >= max_iterations) & loop.cond(final, captured)
    needed = torch.where(ran_out, count.new_full((), max_iterations + 1), torch.zeros_like(count))
    return (*final, torch.maximum(needed, inner))


def bound(site: Site, context: PassContext) -> None:
    """while_loop -> trained_while if it may be trained, bounded_while if it has a bound."""
    may_train = site.may_need_grad(context.training)
    max_iterations, checkpoints = context.options.max_iterations, context.options.checkpoints
    if max_iterations is None and not may_train:
        return
    if max_iterations is None:
        replace_call(site.call, trained_while, checkpoints=checkpoints)
        return
    context.reporting_loops.append(site.name)
    replace_call(site.call, bounded_while, max_iterations=max_iterations, may_train=may_train, checkpoints=checkpoints)


PASS = GraphPass(
    "while_loops",
    "bounds while_loops and makes them trainable",
    {
        "while_loop": bound,
        "scan": unchanged,
        "map": unchanged,
        "cond": unchanged,
        "invoke_subgraph": unchanged,
    },
)
