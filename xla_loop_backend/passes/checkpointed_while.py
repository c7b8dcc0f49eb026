"""Training through a while_loop in fixed memory, with nothing read back: the loop's autograd.

The trip count n of a while_loop is known only on the device, when the loop has run. So the
forward cannot size a stack for it, and the backward cannot plan its recomputation on the
host. Both work instead with a fixed number C of checkpoints (option `checkpoints`), each
holding the loop's carries before some iteration, placed online and reversed on the device,
in the spirit of online checkpointing (Stumm and Walther, 2010; equinox's
`checkpointed_while_loop` on JAX):

    forward:   one While with the exact trip count. Before iteration i, if i is a multiple
               of the stride s (1 at first), its carries go into a free checkpoint. When
               none is free, s doubles, which frees every checkpoint at an odd multiple of
               the old s. Once it has doubled, the forward fills at most C/2 of them, so
               the backward has room to place more. So after n iterations up to C/2
               checkpoints are spread evenly over the loop, whatever n is; with n <= C
               every iteration is stored.
    backward:  one While, t = n-1 .. 0, each step the body's vector-Jacobian product at the
               carries before iteration t. Those carries come from the latest checkpoint
               at or before t, run forward to t in an inner While. On the way that While
               fills free checkpoints: every position when they fit, otherwise the midpoint
               between the latest checkpoint and t (bisection, so reversing a segment of L
               iterations costs about L/2 log2 L steps forward and log2 L checkpoints).
               After step t, the checkpoints at t and above are free again.

The schedule's state lives in the Whiles' state: the stride, and each checkpoint's position
(-1: free) in a small int64 tensor. Memory is C+1 copies of the carries (one more row the
iterations that are not stored write to) at any trip count; no capacity, no report, no
recompile. A loop that fits (n <= C) recomputes nothing.

(Option `remat` acts on C: the `remat` pass divides it, `passes/remat.py`.)

Structure follows torch's own `WhileLoopAutogradOp` and `ScanAutogradOp`: the body's VJP from
`create_bw_fn`, each While body staged with `materialize_as_graph`, `while_loop_op` runs them. torch instead stacks every iteration's
carries into tensors whose length is the trip count (`while_loop_stack_output`) and reads
its backward's indices back to the host: XLA cannot run either (its shapes are static), and
torch 2.9's version drops gradients of closed-over parameters. Every floating carry of the
traced VJP requires grad, whether or not the initial carry does, so the gradient flowing
through the carries is never dropped (the bug torch's scan has, pytorch/pytorch#184528).
"""
from __future__ import annotations

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


def _write_row(stack: torch.Tensor, row: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return stack.index_copy(0, row.reshape(1), value.to(stack.device).unsqueeze(0))


def _read_row(stack: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    return stack.index_select(0, row.reshape(1)).squeeze(0)


@dataclass(frozen=True)
class CheckpointSpec:
    loop: LoopFunctions
    checkpoints: int  # C
    max_iterations: int | None

    def cap(self, stride: torch.Tensor) -> torch.Tensor:
        """How many checkpoints the forward fills: all C at stride 1 (so a loop of at most C
        iterations stores each), half once it thins, leaving the backward room."""
        return torch.where(stride == 1, self.checkpoints, (self.checkpoints + 1) // 2)


def _used(positions: torch.Tensor) -> torch.Tensor:
    return (positions >= 0).sum()


def _free(positions: torch.Tensor) -> torch.Tensor:
    """Which checkpoints are free (the last row, written by iterations not stored, never is)."""
    free = positions < 0
    return torch.cat([free[:-1], torch.zeros_like(free[-1:])])


def _store(
    positions: torch.Tensor, buffers: Sequence[torch.Tensor], carries: Sequence[torch.Tensor],
    store: torch.Tensor, position: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`carries` into the first free checkpoint at `position` if `store`, else into the last
    row (which stays free)."""
    free = _free(positions)
    slot = torch.where(store, torch.argmax(free.to(torch.int64)), positions.new_full((), positions.shape[0] - 1))
    positions = positions.index_copy(0, slot.reshape(1), torch.where(store, position, -1).reshape(1))
    return positions, [_write_row(b, slot, c) for b, c in zip(buffers, carries)]


class CheckpointedWhile(torch.autograd.Function):
    """forward(spec, *carries, *captured) -> (*final carries, report); see the module doc.
    The report is what `max_iterations` needs (max_iterations + 1 if the loop was still
    running then, else 0), at least the inner loops' reports."""

    @staticmethod
    def forward(ctx: Any, spec: CheckpointSpec, *operands: Any) -> tuple[Any, ...]:
        loop, nc, rows = spec.loop, spec.loop.num_carries, spec.checkpoints + 1
        carries, captured = operands[:nc], operands[nc:]
        device = loop_device((*carries, *captured))
        with torch._C._AutoDispatchBelowAutograd():
            buffers = [torch.zeros((rows, *c.shape), dtype=c.dtype, device=device) for c in carries]
            positions = torch.full((rows,), -1, dtype=torch.int64, device=device)
            zero = torch.zeros((), dtype=torch.int64, device=device)
            stride = torch.ones((), dtype=torch.int64, device=device)

            def cond(i: torch.Tensor, inner: torch.Tensor, stride: torch.Tensor, positions: torch.Tensor, *state: Any) -> torch.Tensor:
                going = loop.cond(state[:nc], state[2 * nc :])
                return going if spec.max_iterations is None else (i < spec.max_iterations) & going

            def body(i: torch.Tensor, inner: torch.Tensor, stride: torch.Tensor, positions: torch.Tensor, *state: Any) -> tuple[Any, ...]:
                current, stored, captured_ = state[:nc], state[nc : 2 * nc], state[2 * nc :]
                due = i % stride == 0
                stride = torch.where(due & (_used(positions) >= spec.cap(stride)), stride * 2, stride)
                positions = torch.where((positions >= 0) & (positions % stride == 0), positions, -1)
                store = (i % stride == 0) & (_used(positions) < spec.cap(stride))
                positions, stored = _store(positions, stored, current, store, i)
                new, inner_report = loop.step(current, captured_)
                if inner_report is not None:
                    inner = torch.maximum(inner, inner_report)
                return (i + 1, inner.clone(), stride.clone(), positions, *new, *stored)

            n, inner, _, positions, *rest = while_loop_op(
                cond, body, (zero, zero.clone(), stride, positions, *carries, *buffers), tuple(captured)
            )
            final, buffers = rest[:nc], rest[nc:]
            report = inner
            if spec.max_iterations is not None:
                ran_out = (n >= spec.max_iterations) & loop.cond(final, captured)
                report = torch.maximum(torch.where(ran_out, n.new_full((), spec.max_iterations + 1), 0), inner)
        ctx.spec = spec
        ctx.include_keys = torch._C._dispatch_tls_local_include_set()
        ctx.exclude_keys = torch._C._dispatch_tls_local_exclude_set()
        save_tensors_and_symints_for_backward(ctx, [n, positions, *buffers, *captured])
        ctx.mark_non_differentiable(report)
        return (*final, report)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
        spec: CheckpointSpec = ctx.spec
        nc = spec.loop.num_carries
        n, positions, *rest = saved_tensors_and_symints(ctx)
        buffers, captured = rest[:nc], rest[nc:]
        floats = [b.is_floating_point() for b in buffers]
        wanted = [
            isinstance(c, torch.Tensor) and c.is_floating_point() and needed
            for c, needed in zip(captured, ctx.needs_input_grad[1 + nc :])
        ]
        # (Autograd may hand two carries one gradient tensor; a While refuses aliased carries.)
        grad_carries = distinct_outputs([
            g if g is not None else torch.zeros(b.shape[1:], dtype=b.dtype, device=b.device)
            for g, b, f in zip(grads[:nc], buffers, floats)
            if f
        ])
        grad_captured = [torch.zeros_like(c) for c, w in zip(captured, wanted) if w]
        if spmd_on():  # (each gradient laid out like its forward value: a checkpoint's carry, a captured input)
            grad_carries = [sharding_like(g, b, 1) for g, b in zip(grad_carries, [b for b, f in zip(buffers, floats) if f])]
            grad_captured = [sharding_like(g, c) for g, c in zip(grad_captured, [c for c, w in zip(captured, wanted) if w])]
        steps = _StepBack(spec.loop, buffers, captured, floats, wanted, (ctx.include_keys, ctx.exclude_keys))
        with torch.no_grad():  # the Whiles below are the backward itself, not differentiated
            grad_init, grad_captured = _Reverse(steps).run(n, positions, buffers, captured, grad_carries, grad_captured)
        grad_init, grad_captured = iter(grad_init), iter(grad_captured)
        return (
            None,
            *(next(grad_init) if f else None for f in floats),
            *(next(grad_captured) if w else None for w in wanted),
        )


class _StepBack:
    """The body's vector-Jacobian product: one step back."""

    def __init__(
        self, loop: LoopFunctions, buffers: Sequence[torch.Tensor], captured: Sequence[Any], floats: list[bool],
        wanted: list[bool], dispatch_keys: tuple[Any, Any],
    ) -> None:
        self.loop, self.floats, self.wanted, self.dispatch_keys = loop, floats, wanted, dispatch_keys
        samples = [b[0].detach().requires_grad_(f) for b, f in zip(buffers, floats)]
        self.body_vjp = create_bw_fn_fixed(loop.carries_only, (*samples, *captured))

    def step(
        self, carries: Sequence[Any], captured: Sequence[Any], grads: Sequence[torch.Tensor], acc: Sequence[torch.Tensor]
    ) -> tuple[list, list]:
        """The gradients of the carries before the step, and the captured tensors'
        gradients with this step's added."""
        nc = self.loop.num_carries
        out = self.body_vjp(*carries, *captured, *grads)
        grads = [g for g, f in zip(out[:nc], self.floats) if f]
        step_captured = [g for g, w in zip(out[nc:], self.wanted) if w]
        return grads, [a + g for a, g in zip(acc, step_captured)]


class _Reverse:
    """The backward While and the inner While that runs forward from a checkpoint."""

    def __init__(self, steps: _StepBack):
        self.steps, self.loop = steps, steps.loop

    def run(
        self, n: torch.Tensor, positions: torch.Tensor, buffers: Sequence[torch.Tensor], captured: Sequence[Any],
        grads: list, acc: list,
    ) -> tuple[list, list]:
        num_g, num_a, nc = len(grads), len(acc), self.loop.num_carries
        floats = self.steps.floats

        def cond(t: torch.Tensor, *rest: Any) -> torch.Tensor:
            return t >= 0

        def body(t: torch.Tensor, positions: torch.Tensor, *rest: Any) -> tuple[Any, ...]:
            g, a = rest[:num_g], rest[num_g : num_g + num_a]
            stored, captured_ = rest[num_g + num_a : num_g + num_a + nc], rest[num_g + num_a + nc :]
            with torch.no_grad():
                positions, stored, current = self._advance(t, positions, stored, captured_)
            current = [c.detach().requires_grad_(f) for c, f in zip(current, floats)]
            g, a = self.steps.step(current, captured_, g, a)
            positions = torch.where(positions >= t, -1, positions)  # (t and later are reversed)
            return (t - 1, positions, *g, *a, *stored)

        carried, additional = (n - 1, positions, *grads, *acc, *buffers), tuple(captured)
        staged = [
            materialize_as_graph(fn, (*carried, *additional), *self.steps.dispatch_keys, force_enable_grad=True)
            for fn in (cond, body)
        ]
        _, _, *result = while_loop_op(*staged, carried, additional)
        return result[:num_g], result[num_g : num_g + num_a]

    def _advance(
        self, t: torch.Tensor, positions: torch.Tensor, stored: Sequence[torch.Tensor], captured: Sequence[Any]
    ) -> tuple[torch.Tensor, list, list]:
        """The carries before iteration t, run forward from the latest checkpoint at or
        before it, storing some of the way (see the module doc)."""
        nc = self.loop.num_carries
        top = torch.argmax(positions)
        start = [_read_row(b, top) for b in stored]

        def cond(p: torch.Tensor, positions: torch.Tensor, *rest: Any) -> torch.Tensor:
            return p < rest[2 * nc]

        def body(p: torch.Tensor, positions: torch.Tensor, *rest: Any) -> tuple[Any, ...]:
            current, stored_, t_, captured_ = rest[:nc], rest[nc : 2 * nc], rest[2 * nc], rest[2 * nc + 1 :]
            new = self.loop.carries_only(*current, *captured_)
            p = p + 1
            free = _free(positions).sum()
            latest = torch.amax(positions)
            fits = t_ - p <= free
            store = (p < t_) & (free > 0) & (fits | (p == latest + (t_ + 1 - latest) // 2))
            positions, stored_ = _store(positions, stored_, new, store, p)
            return (p, positions, *(c.clone() for c in new), *stored_)

        out = while_loop_op(cond, body, (_read_row(positions, top), positions, *start, *stored), (t, *captured))
        return out[1], list(out[2 + nc :]), list(out[2 : 2 + nc])
