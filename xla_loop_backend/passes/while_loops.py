"""Before AOTAutograd: while_loops that may be trained through, or that have a bound.

Every such while_loop, at any depth, becomes a call of `bounded_while` with the same
operands. When AOTAutograd traces the graph, that call decides what the loop is:

- differentiated (an operand requires grad): `StackedWhile` (`stacked_while.py`), the loop
  with its real trip count that stores each iteration's carries for its backward While;
- otherwise: the loop with an iteration counter.

Either returns the carries and a *report*: a 0-dim int64, the number of iterations the loop
needed (`max_iterations + 1` when it was still running after `max_iterations`). A loop that
may be trained reports its trip count, also when it runs without gradients (inside the
forward of an enclosing loop, whose backward will run it with gradients); it sizes the
stack. A loop only bounded reports 0, or `max_iterations + 1` if it ran out. The `reports`
pass carries the reports of inner loops out of their enclosing loops to the graph's output;
the call-time wrapper (`call.ReportingCall`) reads the largest once per call.

Which loops: with `max_iterations`, every while_loop; when the graph may be trained, every
while_loop that may be differentiated (`Site.may_need_grad`). Other while_loops stay
torch's op and are lowered as they are, with no report and no host read.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch._higher_order_ops.while_loop import while_loop_op

from ..explain import carry_bytes, kib, record
from ..ops import loop_device, register
from ..options import PassContext, current_capacity
from ..traversal import GraphPass, Site, replace_call, unchanged
from .stacked_while import LoopFunctions, StackedWhile, StackSpec, segment_length

_LOG = logging.getLogger(__name__)


def bounded_while(
    cond_fn: Any,
    body_fn: Any,
    carried_inputs: Sequence[Any],
    additional_inputs: Sequence[Any],
    *,
    max_iterations: int | None = None,
    may_train: bool = False,
    remat: bool | int = False,
    body_reports: bool = False,
) -> tuple[Any, ...]:
    """The while_loop, returning (*final carries, report); see the module docstring."""
    carries, captured = tuple(carried_inputs), tuple(additional_inputs)
    loop = LoopFunctions(cond_fn, body_fn, len(carries), body_reports)
    operands = (*carries, *captured)
    if may_train and torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in operands):
        # (Python int carries never get here: torch 2.9's Dynamo fails on them when a loop
        # needs gradients, before any backend runs.)
        capacity = current_capacity()
        every = segment_length(capacity, remat) if remat else 1
        return StackedWhile.apply(StackSpec(loop, capacity, max_iterations, every), *operands)
    return _counted_while(loop, carries, captured, max_iterations, count_trips=may_train)


register(bounded_while, torch.ops.higher_order.while_loop)


def _counted_while(
    loop: LoopFunctions, carries: tuple, captured: tuple, max_iterations: int | None, count_trips: bool
) -> tuple[Any, ...]:
    device = loop_device((*carries, *captured))
    zero = torch.zeros((), dtype=torch.int64, device=device)
    nc = loop.num_carries

    def cond(count: torch.Tensor, inner: torch.Tensor, *state: Any) -> Any:
        going = loop.cond(state[:nc], state[nc:])
        return going if max_iterations is None else (count < max_iterations) & going

    def body(count: torch.Tensor, inner: torch.Tensor, *state: Any) -> tuple[Any, ...]:
        new, inner_report = loop.step(state[:nc], state[nc:])
        inner = inner.clone() if inner_report is None else torch.maximum(inner, inner_report)
        return (count + 1, inner, *new)

    count, inner, *final = while_loop_op(cond, body, (zero, zero.clone(), *carries), captured)
    needed = count if count_trips else torch.zeros_like(count)
    if max_iterations is not None:
        ran_out = (count >= max_iterations) & loop.cond(final, captured)
        needed = torch.where(ran_out, count.new_full((), max_iterations + 1), needed)
    return (*final, torch.maximum(needed, inner))


def bound(site: Site, context: PassContext) -> None:
    """while_loop -> bounded_while, if it has a bound or may be trained."""
    may_train = site.may_need_grad(context.training)
    max_iterations = context.options.max_iterations
    if max_iterations is None and not may_train:
        return
    context.trains_loops |= may_train
    context.reporting_loops.append(site.name)
    if may_train:
        each, rows = kib(carry_bytes(site)), context.options.first_capacity()
        stores = f"every iteration's carries, {each} each, in a stack of {rows} iterations that grows by recompiling"
        if context.options.remat and site.depth == 0:
            stores = f"every k-th iteration's carries (remat={context.options.remat}), {each} each, and recomputes the rest"
        record(_LOG, "stores", f"{site.name}: its backward stores {stores}", where=site.name.split(" at ", 1)[-1], stores=stores)
    replace_call(site.call, bounded_while, max_iterations=max_iterations, may_train=may_train)


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
