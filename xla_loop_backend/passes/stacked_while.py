"""Training through a while_loop at the cost of its real trip count: the loop's autograd.

torch differentiates a while_loop by stacking every iteration's carries into tensors whose
length is the trip count (`while_loop_stack_output`), and reads its backward's indices back
to the host: XLA cannot run either (its shapes are static), and torch 2.9's version drops
gradients of closed-over parameters. xla_loop's version keeps the trip count on the device:

    forward:   one While with the exact trip count n; iteration i writes its carries into
               row i of a preallocated stack of `capacity` rows (a dynamic update slice),
               then runs the body. Returns the final carries and n.
    backward:  one While of exactly n steps, i = n-1 .. 0: reads row i (a dynamic slice),
               applies the body's vector-Jacobian product (the body traced once more, with
               its VJP, as a subgraph) to the carries' gradient, and adds the captured
               tensors' gradients up.

So a loop that runs 8 times costs 8 body steps forward and 8 backward, whatever the capacity;
memory is `capacity` copies of the carries. A loop that runs more than `capacity` times
still computes its results (rows past the end are not written), and reports n: the
call-time wrapper (`call.ReportingCall`) then compiles again with a larger capacity and
reruns the call, so the user never sees the overflow.

With `remat=k`, only every k-th iteration's carries are stored (capacity/k rows); the
backward recomputes each segment of k iterations from its stored start into a k-row
buffer, then runs the segment's VJP steps in reverse: stored carries fall from capacity to
capacity/k + k, for one more forward pass.

Structure follows torch's own `WhileLoopAutogradOp` and `ScanAutogradOp`: `create_bw_fn`
makes the body's VJP (its outputs made distinct tensors, as a While refuses aliased ones), `materialize_as_graph` stages each While body, `while_loop_op` runs
them. Every floating carry of the traced VJP requires grad, whether or not the initial
carry does, so the gradient flowing through the carries is never dropped (the bug torch's
scan has, pytorch/pytorch#184528).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch._higher_order_ops.utils import (
    materialize_as_graph,
    save_tensors_and_symints_for_backward,
    saved_tensors_and_symints,
)
from torch._higher_order_ops.while_loop import while_loop_op

from ..ops import loop_device
from ..sharding import sharding_like, spmd_on
from .torch_fixes import create_bw_fn_fixed, distinct_outputs


@dataclass(frozen=True)
class LoopFunctions:
    """A while_loop's cond and body as the passes leave them: the body may return one more
    output, the report of the loops inside it (`body_reports`)."""

    cond_fn: Callable[..., Any]
    body_fn: Callable[..., Any]
    num_carries: int
    body_reports: bool

    def cond(self, carries: Sequence[Any], captured: Sequence[Any]) -> torch.Tensor:
        """The cond as a bool tensor: with Python int carries it returns a SymBool."""
        pred = self.cond_fn(*carries, *captured)
        return pred if isinstance(pred, torch.Tensor) else torch.scalar_tensor(pred, dtype=torch.bool)

    def step(self, carries: Sequence[Any], captured: Sequence[Any]) -> tuple[list[Any], torch.Tensor | None]:
        """The body: (new carries, report of its inner loops or None)."""
        out = self.body_fn(*carries, *captured)
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        return (out[:-1], out[-1]) if self.body_reports else (out, None)

    def carries_only(self, *args: Any) -> list[Any]:
        """The body as a function of (carries, captured) returning only the carries."""
        return self.step(args[: self.num_carries], args[self.num_carries :])[0]


def segment_length(length: int, remat: bool | int) -> int:
    """Steps per segment: `remat` itself, or about sqrt(length) for remat=True."""
    if remat is True:
        return max(1, math.isqrt(max(length, 1) - 1) + 1)
    return max(1, int(remat))


@dataclass(frozen=True)
class StackSpec:
    loop: LoopFunctions
    capacity: int  # iterations the stack holds
    max_iterations: int | None
    every: int  # store every `every`-th iteration (remat); 1 stores all

    @property
    def rows(self) -> int:
        """Stored rows, plus one the iterations that are not stored write to."""
        return -(-self.capacity // self.every) + 1


def _zeros_int(device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=device)


def _write_row(stack: torch.Tensor, row: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return stack.index_copy(0, row.reshape(1), value.to(stack.device).unsqueeze(0))


def _read_row(stack: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    return stack.index_select(0, row.reshape(1)).squeeze(0)


def _report_of(n: torch.Tensor, ran_out: torch.Tensor | None, max_iterations: int | None, inner: torch.Tensor) -> torch.Tensor:
    """Iterations the loop needed: n, or max_iterations + 1 if it was still running then;
    at least what its inner loops needed."""
    needed = n if ran_out is None else torch.where(ran_out, n.new_full((), max_iterations + 1), n)
    return torch.maximum(needed, inner)


class StackedWhile(torch.autograd.Function):
    """forward(spec, *carries, *captured) -> (*final carries, report); see the module doc."""

    @staticmethod
    def forward(ctx: Any, spec: StackSpec, *operands: Any) -> tuple[Any, ...]:
        loop, nc = spec.loop, spec.loop.num_carries
        carries, captured = operands[:nc], operands[nc:]
        device = loop_device((*carries, *captured))
        with torch._C._AutoDispatchBelowAutograd():
            stacks = [torch.zeros((spec.rows, *c.shape), dtype=c.dtype, device=device) for c in carries]
            last_row = spec.rows - 1

            def cond(i: torch.Tensor, inner: torch.Tensor, *state: Any) -> torch.Tensor:
                going = loop.cond(state[:nc], state[2 * nc :])
                return going if spec.max_iterations is None else (i < spec.max_iterations) & going

            def body(i: torch.Tensor, inner: torch.Tensor, *state: Any) -> tuple[Any, ...]:
                current, stored, captured_ = state[:nc], state[nc : 2 * nc], state[2 * nc :]
                kept = (i % spec.every == 0) & (i < spec.capacity)
                row = torch.where(kept, i // spec.every, last_row)
                stored = [_write_row(s, row, c) for s, c in zip(stored, current)]
                new, inner_report = loop.step(current, captured_)
                if inner_report is not None:
                    inner = torch.maximum(inner, inner_report)
                return (i + 1, inner.clone(), *new, *stored)

            n, inner, *rest = while_loop_op(cond, body, (_zeros_int(device), _zeros_int(device), *carries, *stacks), tuple(captured))
            final, stacks = rest[:nc], rest[nc:]
            ran_out = None
            if spec.max_iterations is not None:
                ran_out = (n >= spec.max_iterations) & loop.cond(final, captured)
            report = _report_of(n, ran_out, spec.max_iterations, inner)
        ctx.spec = spec
        ctx.num_captured = len(captured)
        ctx.include_keys = torch._C._dispatch_tls_local_include_set()
        ctx.exclude_keys = torch._C._dispatch_tls_local_exclude_set()
        save_tensors_and_symints_for_backward(ctx, [n, *stacks, *captured])
        ctx.mark_non_differentiable(report)
        return (*final, report)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
        spec: StackSpec = ctx.spec
        nc = spec.loop.num_carries
        n, *rest = saved_tensors_and_symints(ctx)
        stacks, captured = rest[:nc], rest[nc:]
        floats = [s.is_floating_point() for s in stacks]
        wanted = [
            isinstance(c, torch.Tensor) and c.is_floating_point() and needed
            for c, needed in zip(captured, ctx.needs_input_grad[1 + nc :])
        ]
        # (Autograd may hand two carries one gradient tensor; a While refuses aliased carries.)
        grad_carries = distinct_outputs([
            g if g is not None else torch.zeros(s.shape[1:], dtype=s.dtype, device=s.device)
            for g, s, f in zip(grads[:nc], stacks, floats)
            if f
        ])
        grad_captured = [torch.zeros_like(c) for c, w in zip(captured, wanted) if w]
        if spmd_on():  # (each gradient laid out like its forward value: a row of its stack, a captured input)
            grad_carries = [sharding_like(g, s, 1) for g, s in zip(grad_carries, [s for s, f in zip(stacks, floats) if f])]
            grad_captured = [sharding_like(g, c) for g, c in zip(grad_captured, [c for c, w in zip(captured, wanted) if w])]
        steps = _StepsBack(spec.loop, stacks, captured, floats, wanted, (ctx.include_keys, ctx.exclude_keys))
        with torch.no_grad():  # the Whiles below are the backward itself, not differentiated
            if spec.every == 1:
                grad_init, grad_captured = steps.reverse(stacks, n - 1, captured, grad_carries, grad_captured)
            else:
                grad_init, grad_captured = steps.reverse_segments(n, spec.every, stacks, captured, grad_carries, grad_captured)
        grad_init, grad_captured = iter(grad_init), iter(grad_captured)
        return (
            None,
            *(next(grad_init) if f else None for f in floats),
            *(next(grad_captured) if w else None for w in wanted),
        )


class _StepsBack:
    """The body's vector-Jacobian product, and the reverse Whiles that apply it."""

    def __init__(
        self,
        loop: LoopFunctions,
        stacks: Sequence[torch.Tensor],
        captured: Sequence[Any],
        floats: list[bool],
        wanted: list[bool],
        dispatch_keys: tuple[Any, Any],
    ) -> None:
        self.loop, self.floats, self.wanted, self.dispatch_keys = loop, floats, wanted, dispatch_keys
        samples = [s[0].detach().requires_grad_(f) for s, f in zip(stacks, floats)]
        self.body_vjp = create_bw_fn_fixed(loop.carries_only, (*samples, *captured))

    def step(
        self, carries: Sequence[Any], captured: Sequence[Any], grads: Sequence[torch.Tensor], acc: Sequence[torch.Tensor]
    ) -> tuple[list, list]:
        """One step back: the gradients of the carries before the step, and the captured
        tensors' gradients with this step's added."""
        nc = self.loop.num_carries
        out = self.body_vjp(*carries, *captured, *grads)
        grads = [g for g, f in zip(out[:nc], self.floats) if f]
        step_captured = [g for g, w in zip(out[nc:], self.wanted) if w]
        return grads, [a + g for a, g in zip(acc, step_captured)]

    def _stage(self, fn: Callable[..., Any], carried: Sequence[Any], additional: Sequence[Any], rows_at: int) -> torch.fx.GraphModule:
        """`fn` as a While body or cond graph, traced on (*carried, *additional). The row
        sources at `additional[rows_at:]` (one per carry) require grad while it is traced
        where their carry is floating, so the rows read from them do too, and the VJP
        differentiates the body with respect to every floating carry (see the module doc)."""
        nc = self.loop.num_carries
        traced = list(additional)
        traced[rows_at : rows_at + nc] = [r.detach().requires_grad_(f) for r, f in zip(additional[rows_at : rows_at + nc], self.floats)]
        return materialize_as_graph(fn, (*carried, *traced), *self.dispatch_keys, force_enable_grad=True)

    def reverse(
        self, rows: Sequence[torch.Tensor], last: torch.Tensor, captured: Sequence[Any], grads: list, acc: list
    ) -> tuple[list, list]:
        """i = last .. 0: a step back from the carries in row i of `rows`."""
        num_g, num_a, nc = len(grads), len(acc), self.loop.num_carries

        def cond(i: torch.Tensor, *rest: Any) -> torch.Tensor:
            return i >= 0

        def body(i: torch.Tensor, *rest: Any) -> tuple[Any, ...]:
            g, a = rest[:num_g], rest[num_g : num_g + num_a]
            stored, captured_ = rest[num_g + num_a : num_g + num_a + nc], rest[num_g + num_a + nc :]
            g, a = self.step([_read_row(s, i) for s in stored], captured_, g, a)
            return (i - 1, *g, *a)

        carried, additional = (last, *grads, *acc), (*rows, *captured)
        staged = [self._stage(fn, carried, additional, 0) for fn in (cond, body)]
        _, *result = while_loop_op(*staged, carried, additional)
        return result[:num_g], result[num_g:]

    def reverse_segments(
        self, n: torch.Tensor, k: int, stacks: Sequence[torch.Tensor], captured: Sequence[Any], grads: list, acc: list
    ) -> tuple[list, list]:
        """remat: s = last segment .. 0: recompute segment s's k iterations from its stored
        start, then step back through them."""
        num_g, num_a, nc = len(grads), len(acc), self.loop.num_carries

        def cond(s: torch.Tensor, *rest: Any) -> torch.Tensor:
            return s >= 0

        def body(s: torch.Tensor, *rest: Any) -> tuple[Any, ...]:
            g, a = rest[:num_g], rest[num_g : num_g + num_a]
            trips, stored = rest[num_g + num_a], rest[num_g + num_a + 1 : num_g + num_a + 1 + nc]
            captured_ = rest[num_g + num_a + 1 + nc :]
            length = torch.clamp(trips - s * k, max=k)
            with torch.no_grad():  # (the Whiles inside are not differentiated either)
                segment = self._recompute([_read_row(t, s) for t in stored], captured_, length, k)
                g, a = self.reverse(segment, length - 1, captured_, list(g), list(a))
            return (s - 1, *g, *a)

        carried, additional = ((n - 1) // k, *grads, *acc), (n, *stacks, *captured)
        staged = [self._stage(fn, carried, additional, 1) for fn in (cond, body)]
        _, *result = while_loop_op(*staged, carried, additional)
        return result[:num_g], result[num_g:]

    def _recompute(self, start: list, captured: Sequence[Any], length: torch.Tensor, k: int) -> list[torch.Tensor]:
        """A segment's carries, one row per iteration (k rows), recomputed from its start."""
        nc = self.loop.num_carries
        device = loop_device(start)
        rows = [_write_row(torch.zeros((k, *c.shape), dtype=c.dtype, device=device), _zeros_int(device), c) for c in start]

        def cond(j: torch.Tensor, *rest: Any) -> torch.Tensor:
            return j < rest[2 * nc]

        def body(j: torch.Tensor, *rest: Any) -> tuple[Any, ...]:
            current, written = rest[:nc], rest[nc : 2 * nc]
            new = self.loop.carries_only(*current, *rest[2 * nc + 1 :])
            written = [_write_row(r, torch.clamp(j, max=k - 1), c) for r, c in zip(written, new)]
            return (j + 1, *(c.clone() for c in new), *written)

        # Row 0 holds the start; iteration j = 1 .. length-1 writes row j.
        one = torch.ones((), dtype=torch.int64, device=device)
        out = while_loop_op(cond, body, (one, *(c.clone() for c in start), *rows), (length, *captured))
        return list(out[1 + nc :])
