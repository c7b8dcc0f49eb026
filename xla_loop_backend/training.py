"""Training through loops: what a Dynamo graph needs before AOTAutograd differentiates it.

1. while_loop -> a bounded masked scan.

AOTAutograd differentiates a while_loop by stacking every iteration's carries into tensors
whose length is the trip count, known only at run time (`while_loop_stack_output`), and
its backward indexes them with host reads; XLA needs static shapes. Given a bound
(`max_iterations`), each while_loop that needs gradients becomes a scan of exactly
`max_iterations` steps that runs the body only while the loop is still going:

    active = True
    repeat max_iterations times:
        active = active & cond(carries)
        carries = where(active, body(carries), carries)

scan's autograd (which xla_loop lowers to XLA Whiles, forward and backward) stores the
carries of every step, `max_iterations` x (size of the carries), and recomputes the body in
the backward pass. Every step runs the body, also after the loop has ended, so a bound far
above the real trip counts wastes compute; the results and gradients are exact.

The rewritten graph returns one more output: whether some loop was still going after
`max_iterations` steps. The backend reads it once per call (not per iteration) and raises.
while_loops inside the body are bounded the same way, and report running out through the
enclosing loop. torch 2.9's scan autograd cannot take int or bool carries (it asserts), so
the scan keeps them as float64 (exact up to 2**53) and the step casts them back.

2. Rematerialization (option `remat`): scan's autograd stores the carries of every step.
With `remat=k` (or True for k = sqrt(length)), a scan of length T runs as a scan over T/k
segments whose body is a scan over k steps; the outer autograd stores only the carries at
segment starts and recomputes a segment's steps in the backward pass, so stored carries
drop from T to T/k + k at the price of one more forward pass. (A length that k does not
divide is padded with masked steps.)

3. scan: torch 2.9's scan autograd silently drops part of the gradient of closed-over
parameters when a floating carry does not require grad (pytorch/pytorch#184528, fixed
after 2.9). Such carries are made to require grad, with a zero-gradient link
`where(False, p, carry)` to a tensor p that does.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.fx
from torch._higher_order_ops.scan import scan_op

from .bounds import Flag, requiring_grad, return_flag, scalar_bool
from .errors import LoopLoweringError, describe_value, loop_name

_WHILE = torch.ops.higher_order.while_loop


def prepare_for_autograd(gm: torch.fx.GraphModule, max_iterations: int | None, remat: bool | int = False) -> list[Flag]:
    """Rewrite, in place, the loops of a Dynamo graph that need gradients (see above);
    returns the "ran out" flags of the bounded while_loops, for `bounds.returning_flags`."""
    if not torch.is_grad_enabled():
        return []
    _fix_scan_carries(gm)
    if remat:
        _segment_scans(gm, remat)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _WHILE and _needs_grad(n)]
    names = [loop_name("while_loop", n) for n in nodes]
    if nodes and max_iterations is None:
        raise LoopLoweringError(
            f"{names[0]}: training through a while_loop needs a bound on its trip count, so "
            "that XLA can store each iteration's carries for the backward pass in static "
            "shapes; compile with xla_loop_backend.compile(..., max_iterations=N) or "
            "torch.compile(..., backend='xla_loop', options={'max_iterations': N})"
        )
    return [(name, _replace(gm, node, name, max_iterations, remat)) for node, name in zip(nodes, names)]


def _example(node: Any) -> Any:
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else node


def _requires_grad(node: Any) -> bool:
    value = _example(node)
    return isinstance(value, torch.Tensor) and value.requires_grad


def _needs_grad(node: torch.fx.Node) -> bool:
    _, _, carries, extras = node.args
    return any(_requires_grad(a) for a in (*carries, *extras))


def _fix_scan_carries(gm: torch.fx.GraphModule) -> None:
    """Workaround for pytorch/pytorch#184528 on the scan nodes of the graph (see above)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.higher_order.scan:
            continue
        combine, init, xs, extras = node.args
        reference = next((a for a in (*init, *xs, *extras) if _requires_grad(a) and _example(a).is_floating_point()), None)
        if reference is None:
            continue
        fixed = []
        for carry in init:
            value = _example(carry)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.requires_grad:
                with gm.graph.inserting_before(node):
                    carry = gm.graph.call_function(requiring_grad, (carry, reference))
                carry.meta["example_value"] = value
            fixed.append(carry)
        node.args = (combine, fixed, xs, extras)


def _replace(
    gm: torch.fx.GraphModule, node: torch.fx.Node, name: str, max_iterations: int, remat: bool | int
) -> torch.fx.Node:
    cond_node, body_node, carries, extras = node.args
    cond_gm, body_gm = getattr(gm, cond_node.target), getattr(gm, body_node.target)
    for i, carry in enumerate(carries):
        value = carry.meta.get("example_value", carry.meta.get("val")) if isinstance(carry, torch.fx.Node) else carry
        if not isinstance(value, torch.Tensor):
            raise LoopLoweringError(
                f"{name}: training through a while_loop needs tensor carries; carry {i} is "
                f"{describe_value(value)} (make it a 0-dim tensor)"
            )
    _check_no_while_in(name, cond_gm)
    body_reports_overflow = _bound_inner_loops(body_gm, max_iterations, remat)
    run = _masked_scan(cond_gm, body_gm, len(carries), max_iterations, remat, body_reports_overflow)
    run.__name__ = f"xla_loop_bounded_while_{node.name}"
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(run, (*carries, *extras))
        flag = gm.graph.call_function(operator.getitem, (new, len(carries)))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    for sub in (cond_node, body_node):
        if not sub.users:
            gm.graph.erase_node(sub)
    return flag


def _check_no_while_in(name: str, cond_gm: torch.fx.GraphModule) -> None:
    for module in cond_gm.modules():
        if isinstance(module, torch.fx.GraphModule) and any(
            n.op == "call_function" and n.target is _WHILE for n in module.graph.nodes
        ):
            raise LoopLoweringError(
                f"{name}: training through a while_loop whose cond runs another while_loop is "
                "not supported; compute the condition in the body and carry it"
            )


def _bound_inner_loops(body_gm: torch.fx.GraphModule, max_iterations: int, remat: bool | int) -> bool:
    """Bound the while_loops inside a bounded loop's body (they run under autograd too);
    if there are any, the body returns one more output: whether one ran out of steps."""
    nodes = [n for n in body_gm.graph.nodes if n.op == "call_function" and n.target is _WHILE]
    if not nodes:
        return False
    flags = [_replace(body_gm, n, loop_name("while_loop", n), max_iterations, remat) for n in nodes]
    return_flag(body_gm, flags)
    body_gm.graph.lint()
    body_gm.recompile()
    return True


def _masked_scan(
    cond_gm: torch.fx.GraphModule,
    body_gm: torch.fx.GraphModule,
    num_carries: int,
    max_iterations: int,
    remat: bool | int,
    body_reports_overflow: bool = False,
) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The while_loop as `max_iterations` masked scan steps: returns (*carries, exceeded).

    The scan's state is (active, inner loop ran out, *carries); both flags are float (0/1)
    for torch's scan autograd."""

    def run(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        carries, extras = args[:num_carries], args[num_carries:]
        dtypes = [c.dtype for c in carries]
        reference = next((a for a in args if a.requires_grad and a.is_floating_point()), None)
        device = carries[0].device

        def step(*state: torch.Tensor) -> list[torch.Tensor]:
            # state: (active, inner ran out, *stored carries, step index, *extras)
            active, inner_exceeded = state[0] > 0, state[1].clone()  # (no output may alias an input)
            current = [_unstore(c, dtype) for c, dtype in zip(state[2 : 2 + num_carries], dtypes)]
            extras = state[3 + num_carries :]
            running = active & scalar_bool(cond_gm(*current, *extras))
            new = body_gm(*current, *extras)
            new = list(new) if isinstance(new, (tuple, list)) else [new]
            if body_reports_overflow:
                inner = new.pop()
                inner_exceeded = torch.maximum(inner_exceeded, (running & inner).to(torch.float32))
            kept = [torch.where(running, n, c) for n, c in zip(new, current)]
            return [running.to(torch.float32), inner_exceeded, *(_store(c, None) for c in kept)]

        active = torch.ones((), dtype=torch.float32, device=device)
        inner_exceeded = torch.zeros((), dtype=torch.float32, device=device)
        stored = [_store(c, reference) for c in carries]
        steps = torch.arange(max_iterations, device=device)
        out = scan_in_segments(step, [active, inner_exceeded, *stored], [steps], tuple(extras), remat)
        final = [_unstore(c, dtype) for c, dtype in zip(out[2 : 2 + num_carries], dtypes)]
        exceeded = ((out[0] > 0) & scalar_bool(cond_gm(*final, *extras))) | (out[1] > 0)
        return (*final, exceeded)

    return run


def _segment_scans(gm: torch.fx.GraphModule, remat: bool | int) -> None:
    """Replace the graph's scan nodes by segmented scans (see `scan_in_segments`)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.higher_order.scan:
            continue
        combine_node, init, xs, extras = node.args
        combine = getattr(gm, combine_node.target)
        num_init, num_xs = len(init), len(xs)

        def run(*args: torch.Tensor, combine: Callable = combine, num_init: int = num_init, num_xs: int = num_xs) -> list:
            init, xs, extras = args[:num_init], args[num_init : num_init + num_xs], args[num_init + num_xs :]
            return scan_in_segments(combine, list(init), list(xs), tuple(extras), remat)

        run.__name__ = f"xla_loop_remat_{node.name}"
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(run, (*init, *xs, *extras))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        if not combine_node.users:
            gm.graph.erase_node(combine_node)


def segment_length(length: int, remat: bool | int) -> int:
    """Steps per segment: `remat` itself, or about sqrt(length) for remat=True."""
    return max(1, math.isqrt(length - 1) + 1) if remat is True else int(remat)


def scan_in_segments(
    combine: Callable, init: list[torch.Tensor], xs: list[torch.Tensor], extras: tuple, remat: bool | int
) -> list[torch.Tensor]:
    """scan_op(combine, init, xs, extras), as a scan over segments of a scan over steps."""
    length = xs[0].shape[0]
    k = segment_length(length, remat) if remat else length
    if k >= length:
        return list(scan_op(combine, init, xs, extras))
    segments = -(-length // k)
    pad = segments * k - length
    num_carries, num_xs = len(init), len(xs)
    if pad:
        xs = [torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) for x in xs]
    grouped = [x.reshape(segments, k, *x.shape[1:]) for x in xs]
    index = torch.arange(segments * k, device=xs[0].device).reshape(segments, k)

    def step(*args: torch.Tensor) -> list[torch.Tensor]:
        carries, x = args[:num_carries], args[num_carries : num_carries + num_xs]
        i, extras = args[num_carries + num_xs], args[num_carries + num_xs + 1 :]
        out = list(combine(*carries, *x, *extras))
        if pad:  # the padding steps leave the carries as they are
            out[:num_carries] = [torch.where(i < length, n, c) for n, c in zip(out[:num_carries], carries)]
        return out

    def segment(*args: torch.Tensor) -> list[torch.Tensor]:
        carries, x = args[:num_carries], args[num_carries : num_carries + num_xs]
        i, extras = args[num_carries + num_xs], args[num_carries + num_xs + 1 :]
        return list(scan_op(step, list(carries), [*x, i], tuple(extras)))

    out = scan_op(segment, init, [*grouped, index], extras)
    ys = [y.reshape(segments * k, *y.shape[2:])[:length] for y in out[num_carries:]]
    return [*out[:num_carries], *ys]


def _store(carry: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    """A carry as scan's autograd can take it: floating, and requiring grad when training."""
    if not carry.is_floating_point():
        return carry.to(torch.float64)
    if reference is not None and not carry.requires_grad:
        return requiring_grad(carry, reference)
    return carry


def _unstore(stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return stored if stored.dtype == dtype else stored.to(dtype)
